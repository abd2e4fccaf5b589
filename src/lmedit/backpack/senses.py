"""Sense fine-tuning of a Backpack (Hewitt et al. 2024, "Model Editing with Canonical Examples"; DESIGN §6).

A Backpack predicts from a weighted sum of non-contextual sense vectors, o_i = Σ_j Σ_ℓ α_ℓij C(x_j)_ℓ. An edit
that changes a few sense vectors changes every prediction that reads them, and nothing else. So:

1. Score every (token t, sense ℓ) by how much weight α the canonical example's predictions give it,

       score(t, ℓ) = A_example(t, ℓ) − λ · A_background(t, ℓ),
       A(t, ℓ) = Σ_{i ∈ predicting positions} Σ_{j ≤ i, x_j = t} α_ℓij

   where the example's predicting positions are those of its suffix tokens (prefer: suffix1's minus suffix2's;
   balance: both), and A_background is the mean over background documents with every position predicting.
   A pair is a candidate only where A_example > 0.
2. Per example, keep its top `senses_per_example` candidates; fine-tune the union.
3. Train additive, zero-initialised deltas Δ(t, ℓ) on those senses only (`models.backpack.SenseEdits`); every
   weight of the model stays as it is, so removing the deltas restores the model exactly.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from lmedit.errors import InputError
from lmedit.models.arch import arch_for
from lmedit.models.backpack import MODEL_TYPE, SenseEdits


def backpack_of(model):
    """The Backpack whose senses an edit of `model` trains: the model itself, or an ensemble's small model."""
    from lmedit.backpack.ensemble import MODEL_TYPE as ENSEMBLE

    kind = arch_for(model).model_type
    if kind == MODEL_TYPE:
        return model
    if kind == ENSEMBLE:
        return model.backpack_lm
    raise InputError(f"sense fine-tuning needs a Backpack model ({MODEL_TYPE}) or an ensemble with one; this model "
                     f"is {kind} (use ft, ft-conditional or lora)")


def check_backpack(model) -> None:
    backpack_of(model)


def _alpha_mass(model, ids: list[int], predicting: Sequence[int] | None) -> torch.Tensor:
    """A(t, ℓ) of one sequence as a (vocab, k) tensor: α summed over the predicting rows (None = all), then
    added up per source token."""
    model = backpack_of(model)
    backpack = model.backpack
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    alpha = backpack(x).contextualization[0]  # (k, s_target, s_source)
    rows = alpha if predicting is None else alpha[:, list(predicting)]
    per_source = rows.sum(dim=1).T  # (s_source, k)
    out = torch.zeros(model.config.vocab_size, backpack.num_senses, device=device, dtype=per_source.dtype)
    return out.index_add(0, x[0], per_source)


def background_mass(model, tokenizer, texts: Sequence[str], max_tokens: int = 128) -> torch.Tensor:
    """Mean A(t, ℓ) over the background documents (each cut to `max_tokens`), every position predicting."""
    from lmedit.locate.prompts import encode

    docs = [ids[:max_tokens] for ids in (encode(tokenizer, t) for t in texts) if ids]
    if not docs:
        raise InputError("sense selection needs at least one non-empty background document")
    with torch.no_grad():
        return sum(_alpha_mass(model, ids, None) for ids in docs) / len(docs)


@dataclass(frozen=True)
class ChosenSense:
    token: int
    sense: int
    score: float  # the best score(t, ℓ) over the examples that chose it


def select_senses(model, tokenizer, kind: str, pairs_per_example: Sequence[Sequence[tuple[str, str]]],
                  background: torch.Tensor, per_example: int = 8, lam: float = 300.0) -> list[ChosenSense]:
    """The union of each example's top `per_example` (token, sense) pairs by score (module docstring).

    `pairs_per_example`: per example its (prefix, suffix) pairs — one, or (suffix1, suffix2) for balance/prefer."""
    from lmedit.locate.prompts import encode_pair

    if per_example < 1:
        raise InputError(f"senses_per_example must be at least 1, got {per_example}")
    chosen: dict[tuple[int, int], float] = {}
    k = backpack_of(model).backpack.num_senses
    with torch.no_grad():
        for pairs in pairs_per_example:
            mass = None
            for n, (prefix, suffix) in enumerate(pairs):
                p, s = encode_pair(tokenizer, prefix, suffix)
                ids = p + s[:-1]
                part = _alpha_mass(model, ids, range(len(p) - 1, len(ids)))  # rows predicting suffix tokens
                sign = -1.0 if kind == "prefer" and n == 1 else 1.0  # prefer: away from suffix2's senses
                mass = sign * part if mass is None else mass + sign * part
            score = mass - lam * background
            score = torch.where(mass > 0, score, torch.full_like(score, -torch.inf)).reshape(-1)
            top = torch.topk(score, min(per_example, int(torch.isfinite(score).sum())))
            for value, flat in zip(top.values.tolist(), top.indices.tolist()):
                key = (flat // k, flat % k)
                chosen[key] = max(chosen.get(key, -float("inf")), value)
    if not chosen:
        raise InputError("no sense carries any weight toward the canonical examples' suffixes")
    return [ChosenSense(t, l, v) for (t, l), v in sorted(chosen.items(), key=lambda kv: -kv[1])]


def choose_senses(model, tokenizer, kind: str, pairs_per_example: Sequence[Sequence[tuple[str, str]]],
                  per_example: int, lam: float, background_docs: int) -> tuple[list[ChosenSense], dict]:
    """Steps 1–2 with the offline Wikipedia leads as background: the chosen senses, and a record of the choice for
    the result (how many, how long it took, the top 20 decoded)."""
    from lmedit.stats.corpora import wiki_corpus

    t0 = time.perf_counter()
    background = background_mass(model, tokenizer, wiki_corpus().documents[:background_docs])
    chosen = select_senses(model, tokenizer, kind, pairs_per_example, background, per_example, lam)
    record = {"n": len(chosen), "select_seconds": time.perf_counter() - t0,
              "top": [{"token": tokenizer.decode([c.token]), "sense": c.sense, "score": c.score} for c in chosen[:20]]}
    return chosen, record


@contextmanager
def attached_senses(model, chosen: Sequence[ChosenSense]) -> Iterator[SenseEdits]:
    """Attach zero-initialised, trainable deltas on `chosen`, on top of any sense edits already attached (an applied
    patch); detached again on exit (the model is then exactly as before: no weight was touched)."""
    model = backpack_of(model)
    edits = SenseEdits([c.token for c in chosen], [c.sense for c in chosen], model.config.n_embd)
    previous = model.backpack.attach_sense_edits(edits)
    try:
        yield edits
    finally:
        model.backpack.restore_sense_edits(previous)
