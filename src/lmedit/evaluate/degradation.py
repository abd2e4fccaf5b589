"""Degradation: the model's per-token loss on general text and on a task's targeted text, and cached baselines.

Per-token loss = total NLL of every predicted token / number of predicted tokens (token-weighted over the whole
set, as the reference code's `normalize='token'`): each text is tokenized with the tokenizer's special tokens,
cut to `max_tokens`, and tokens 2..n are predicted from the ones before them. Rows are right-padded with an
attention mask, sorted by length, and the NLL is taken in float32, so batching changes no number beyond
float32 rounding (≈1e-7 relative, far below the smallest league, 1e-5).

General text: `../shared/data/text/openwebtext-val100.jsonl` holds 4007 chunks of OpenWebText (each about 100
SmolLM2 tokens, beginning with "<|endoftext|>"). The fixed subset is its first `n_docs` records, each cut to
`max_tokens` tokens: defaults DEFAULT_N_DOCS = 200 chunks and DEFAULT_MAX_TOKENS = 256 (no chunk is longer than
~290 tokens), about 21k tokens. Targeted text: the task's `*_unconditional*` file, all of it, uncut by default.

Baselines of the unedited model (success rate, general loss, targeted loss, hard-negative NLL) are cached as small
JSON files under `cache_dir()/canonical/`, one per key; the key holds a fingerprint of the model's weights and
tokenizer, a sha256 of the task examples used (so half of a file is its own entry), the sha256 of the
general-text file and the sizes, so a trial reuses them and any change recomputes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from lmedit.errors import InputError
from lmedit.evaluate.canonical_scores import hard_negative_nll, success_rate
from lmedit.fileio import atomic_write_json, iter_jsonl
from lmedit.models.forward import DEFAULT_MAX_TOKENS
from lmedit.models.logprobs import token_loss, token_nll  # noqa: F401  (part of this API)
from lmedit.models.tokens import encode

DEFAULT_N_DOCS = 200
CACHE_VERSION = 1  # bump when the way a cached number is computed changes


# ---------------------------------------------------------------- texts

def load_texts(path: str | Path, n_docs: int | None = None) -> list[str]:
    """The `text` field of the first `n_docs` records of a JSONL file (all when None)."""
    if n_docs is not None and (isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 1):
        raise InputError(f"n_docs must be a positive integer, got {n_docs!r}")
    path = Path(path)
    texts = []
    for lineno, rec in iter_jsonl(path, what="text file"):
        if n_docs is not None and len(texts) >= n_docs:
            break
        if not isinstance(rec, dict) or "text" not in rec:
            raise InputError(f"{path}, line {lineno}: record lacks field 'text'")
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise InputError(f"{path}, line {lineno}: field 'text' must be a non-empty string")
        texts.append(rec["text"])
    if not texts:
        raise InputError(f"{path} holds no texts")
    return texts


# ---------------------------------------------------------------- per-token loss

def general_loss(model: nn.Module, tokenizer, path: str | Path, n_docs: int = DEFAULT_N_DOCS,
                 max_tokens: int | None = DEFAULT_MAX_TOKENS, batch_size: int = 16) -> float:
    return token_loss(model, tokenizer, load_texts(path, n_docs), max_tokens, batch_size)


def targeted_loss(model: nn.Module, tokenizer, task_data, max_tokens: int | None = None, batch_size: int = 16) -> float:
    """Per-token loss on the task's targeted text (its `*_unconditional*` file)."""
    return token_loss(model, tokenizer, [t.text for t in task_data.unconditional], max_tokens, batch_size)


# ---------------------------------------------------------------- one evaluation point

def evaluate_point(model: nn.Module, tokenizer, task_data, general_texts: Sequence[str], *,
                   max_tokens: int | None = DEFAULT_MAX_TOKENS, targeted_max_tokens: int | None = None,
                   batch_size: int = 16, within: Callable[[dict[str, float]], bool] | None = None) -> dict:
    """Everything the protocol records after an epoch (and before editing): success rate on the evaluation
    file, general and targeted per-token loss, hard-negative NLL.

    The two losses come first. When `within(losses)` says they are beyond every league, the epoch can never be
    the one a league scores, so success rate and hard negatives (most of the cost) are not measured: None."""
    point: dict = {
        "general_loss": token_loss(model, tokenizer, general_texts, max_tokens, batch_size),
        "targeted_loss": targeted_loss(model, tokenizer, task_data, targeted_max_tokens, batch_size),
    }
    scored = within is None or within(point)
    point["success_rate"] = success_rate(model, tokenizer, task_data, batch_size=batch_size) if scored else None
    point["hard_negative_nll"] = hard_negative_nll(model, tokenizer, task_data.hard_neg, batch_size) if scored else None
    return point


# ---------------------------------------------------------------- fingerprints and the cache

def model_fingerprint(model: nn.Module, tokenizer) -> str:
    """sha256 over the class, every parameter (name, shape, dtype, bytes) and the tokenizer's vocabulary.

    Hashing SmolLM2-135M's weights takes about a second: compute it once, on the unedited model, and pass it."""
    from lmedit.patches import fingerprint

    weights = fingerprint(model, [n for n, _ in model.named_parameters()])
    h = hashlib.sha256()
    h.update(f"{type(model).__name__}\0{weights}\0{type(tokenizer).__name__}\0{len(tokenizer)}\0".encode())
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                         encode(tokenizer, "Fingerprint: the tokenizer's special tokens, e.g. a BOS.")]).encode())
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def examples_digest(task_data) -> str:
    """sha256 of the examples an evaluation point reads (eval, hard negatives, targeted text), so a subset of a
    file (e.g. half of `val`) gets its own cache entry."""
    blob = json.dumps({role: [dataclasses.asdict(e) for e in getattr(task_data, role)]
                       for role in ("eval", "hard_neg", "unconditional")}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class BaselineCache:
    """Small JSON files, one per key (a dict of JSON values), under `root` (default cache_dir()/canonical).

    One file per key keeps concurrent workers from overwriting each other's entries; writes are atomic; an
    unreadable or mismatched file is treated as missing."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            from lmedit.models.loading import cache_dir

            root = cache_dir() / "canonical"
        self.root = Path(root)

    def _path(self, key: dict) -> Path:
        blob = json.dumps(key, sort_keys=True, separators=(",", ":"))
        return self.root / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.json"

    def get(self, key: dict) -> Any | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(key)):
            return None
        return entry.get("value")

    def put(self, key: dict, value: Any) -> None:
        atomic_write_json(self._path(key), {"key": key, "value": value})

    def get_or_compute(self, key: dict, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, whether it came from the cache)."""
        value = self.get(key)
        if value is not None:
            return value, True
        value = compute()
        self.put(key, value)
        return value, False


def unedited_point(model: nn.Module, tokenizer, task_data, general_path: str | Path, *,
                   n_docs: int = DEFAULT_N_DOCS, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                   targeted_max_tokens: int | None = None, batch_size: int = 16,
                   cache: BaselineCache | None = None, fingerprint: str | None = None) -> tuple[dict[str, float], bool]:
    """`evaluate_point` of the (unedited) model, from the cache when this model, data and sizes were seen before.

    Returns (point, from_cache). Pass `fingerprint` (model_fingerprint of the unedited model) to skip hashing."""
    cache = cache or BaselineCache()
    fp = fingerprint or model_fingerprint(model, tokenizer)
    key = {
        "what": "canonical-unedited-point", "version": CACHE_VERSION, "model": fp, "task": task_data.name,
        "data": examples_digest(task_data),
        "general": {"file": file_digest(general_path), "n_docs": n_docs, "max_tokens": max_tokens},
        "targeted_max_tokens": targeted_max_tokens,
    }

    def compute():
        point = evaluate_point(model, tokenizer, task_data, load_texts(general_path, n_docs), max_tokens=max_tokens,
                               targeted_max_tokens=targeted_max_tokens, batch_size=batch_size)
        bad = [k for k, v in point.items() if not math.isfinite(v)]
        if bad:
            raise InputError(f"the unedited model gives non-finite {', '.join(bad)}; nothing to compare against")
        return point

    return cache.get_or_compute(key, compute)
