"""Which documents of a corpus C = E[k kᵀ] averages over, and in which batches they run.

ROME and MEMIT's reference code draws its sample of documents in a seeded random order (a shuffled index
list), cuts each document to the model's context length, and counts its sample size in documents. lmedit
does the same, and lets the size be counted in tokens instead. Everything here is a pure function of
(corpus, tokenizer, sample): every rank under torch.distributed and every resumed pass sees the same
documents in the same batches, so a pass can be split or interrupted without changing C.

Defaults. max_length 1024 is the reference's cut (GPT-2's context), bounded by the model's own context. Longer
cuts cost more per token on a CPU (attention grows with length: about +1/3 per token at 1024 positions for
SmolLM2's width), and the offline corpus has no lead over 474 tokens, so there it cuts nothing. The sample
size defaults to 100,000 tokens: the reference's 100,000 documents are every one of the 10,033 offline leads
(1,048,280 tokens), a pass 9.3 times as long on two CPU cores (ROME's layer 6 of SmolLM2: 2 min 59 s vs
27 min 48 s) that changed none of 50 ROME edits' CounterFact outcomes (README, key statistics).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from lmedit.errors import InputError

UNITS = ("documents", "tokens")
ALL = "all"
TOKENIZE_CHUNK = 256  # documents tokenized per call while the sample is drawn


@dataclass(frozen=True)
class Sample:
    """The part of a corpus C averages over.

    unit/n: n documents, or n tokens (the last document cut so exactly n are counted); n=None is the whole
    corpus. max_length: tokens kept at the start of each document (bounded by the model's context).
    seed: the shuffle of the documents (seed 1 is the reference's `random_sample=1`).
    """

    unit: str = "tokens"
    n: int | None = 100_000
    max_length: int = 1024
    seed: int = 1

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise InputError(f"unknown statistics unit (stats_unit, --unit) {self.unit!r}; valid: {', '.join(UNITS)}")
        if self.n is not None and (isinstance(self.n, bool) or not isinstance(self.n, int) or self.n <= 0):
            raise InputError(f"the statistics sample size (stats_n, --n) must be a positive integer or '{ALL}', got {self.n!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length <= 0:
            raise InputError(f"stats_max_length must be a positive integer, got {self.max_length!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"stats_seed must be an integer, got {self.seed!r}")

    @classmethod
    def parse(cls, unit: str = "tokens", n: int | str | None = 100_000, max_length: int | str = 1024,
              seed: int | str = 1) -> "Sample":
        """From settings as a user writes them: n may be 'all' or digits, the others digits."""
        return cls(str(unit).strip().lower(), parse_count(n), _parse_int(max_length, "stats_max_length"),
                   _parse_int(seed, "stats_seed"))

    @classmethod
    def from_config(cls, config) -> "Sample":
        """From a LocateConfig's stats_* settings. An old config's stats_tokens=N means unit=tokens, n=N."""
        legacy = getattr(config, "stats_tokens", None)
        unit, n = ("tokens", legacy) if legacy is not None else (config.stats_unit, config.stats_n)
        return cls.parse(unit, n, config.stats_max_length, config.stats_seed)

    def bounded(self, context: int | None) -> "Sample":
        """The sample as it runs on a model with `context` positions; the whole corpus is one sample whatever
        the unit (it is every document) and whatever the seed (a sum does not depend on its order)."""
        out = self if context is None else replace(self, max_length=min(self.max_length, context))
        return replace(out, unit="documents", seed=0) if out.n is None else out

    @property
    def key(self) -> str:
        """The cache-file name part: the unit, the size, the cut and the seed, e.g. tokens100000_max1024_seed1."""
        if self.n is None:
            return f"documents-all_max{self.max_length}"
        return f"{self.unit}{self.n}_max{self.max_length}_seed{self.seed}"

    def describe(self) -> str:
        if self.n is None:
            return f"all documents (at most {self.max_length} tokens each)"
        return (f"{self.n} {self.unit} (documents in random order, seed {self.seed}, "
                f"at most {self.max_length} tokens each)")


def parse_count(n) -> int | None:
    """A positive count, or None for 'all'."""
    if n is None or (isinstance(n, str) and n.strip().lower() == ALL):
        return None
    if isinstance(n, str) and n.strip().replace("_", "").isdigit():
        n = int(n.strip().replace("_", ""))
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InputError(f"the statistics sample size (stats_n, --n) must be a positive integer or '{ALL}', got {n!r}")
    return n


def _parse_int(value, name: str) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise InputError(f"{name} must be an integer, got {value!r}") from None
    return value


def model_context(model) -> int | None:
    """The number of positions the model was trained on, if its config says."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def permutation(n_docs: int, seed: int) -> list[int]:
    """The order documents are drawn in: Python's Mersenne-Twister shuffle of 0..n-1, stable across Python
    versions, and for the same dataset order the very documents the reference code picks with this seed."""
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    return order


def token_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]


def draw(tokenizer, documents, sample: Sample) -> list[tuple[int, int]]:
    """The sample as (document index, tokens counted from its start), in the seeded order.

    documents: the first n documents of the order (all if n ≥ the corpus). tokens: documents of the order
    until n tokens are reached, the last one cut so that Σ counted = n exactly; fewer in the corpus is an error.
    Documents with no tokens are skipped and do not count.
    """
    order = permutation(len(documents), sample.seed) if sample.n is not None else list(range(len(documents)))
    plan: list[tuple[int, int]] = []
    total = 0
    for start in range(0, len(order), TOKENIZE_CHUNK):
        chunk = order[start:start + TOKENIZE_CHUNK]
        for i, ids in zip(chunk, token_ids(tokenizer, [documents[i] for i in chunk], sample.max_length)):
            if not ids:
                continue
            length = len(ids) if sample.unit == "documents" or sample.n is None else min(len(ids), sample.n - total)
            plan.append((i, length))
            total += length
            if sample.n is not None and (len(plan) if sample.unit == "documents" else total) >= sample.n:
                return plan
    if sample.unit == "tokens" and sample.n is not None:
        raise InputError(f"the corpus has only {total} tokens (at most {sample.max_length} per document), fewer "
                         f"than the {sample.n} asked for; stats_n=all takes them all")
    return plan


def batches(plan: list[tuple[int, int]], batch_tokens: int = 4096, window: int = 128) -> list[list[tuple[int, int]]]:
    """Cut the plan into forward passes of at most `batch_tokens` tokens, padding included.

    Within each window of `window` consecutive planned documents they are sorted longest first (ties in plan
    order), so each batch holds documents of similar length and right-padding wastes little; a document
    longer than the budget runs alone. The batches depend only on the plan: the unit of resumption.
    """
    out: list[list[tuple[int, int]]] = []
    for start in range(0, len(plan), window):
        docs = sorted(plan[start:start + window], key=lambda d: -d[1])  # sorted() is stable
        batch: list[tuple[int, int]] = []
        for doc in docs:
            width = batch[0][1] if batch else doc[1]  # the longest, so the padded width
            if batch and width * (len(batch) + 1) > batch_tokens:
                out.append(batch)
                batch = []
            batch.append(doc)
        if batch:
            out.append(batch)
    return out
