"""Canonical-examples scores, training losses and success rules (Hewitt et al. 2024), on the tasks of canonical.py.

log P is summed over the suffix tokens, teacher-forced. The text scored is exactly `prefix + suffix` as stored
(no space is added: most suffixes already start with one, and some — temporal "(" + "BLM", stereoset
"… is " + "a native …" — must not get one). As in the reference code, prefix and suffix are tokenized apart
(prefix with the tokenizer's special tokens, suffix without), so the suffix tokens are exactly the suffix's.

Training losses (`training_loss`), defaults as in the reference code (john-hewitt/model-editing-canonical-
examples, utils.score_suffix / score_pair_suffix): each suffix's log-prob is averaged over its tokens
(`normalize="token"`), then the loss is averaged over the examples of the batch:
- raise:   −log P(suffix)/n                                   (reference "good")
- lower:   +log P(suffix)/n, unbounded                        (reference "bad": plain gradient ascent on the NLL)
           options: `floor` (hinge: examples whose summed log P is already below it add no gradient) or
           `lower="unlikelihood"`: −log(1 − P(suffix)) on the whole-suffix probability (Welleck et al. 2020)
- balance: |log P(s1)/n1 − log P(s2)/n2|                      (reference "balance"); option `balance="square"`
- prefer:  −(log P(s1)/n1 − log P(s2)/n2), unbounded          (reference "good-v-bad"); option `margin`:
           max(0, margin − (log P(s1)/n1 − log P(s2)/n2))
The unbounded losses are meant for the league protocol: training stops being counted at the last epoch whose
degradation stays within (1 + ε) (see `leagues`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Literal, Sequence, Union

import torch
from torch import nn

from lmedit.errors import InputError
from lmedit.evaluate.canonical import PAIR_KINDS, CanonicalTask, Example, PairExample, SuffixExample, _kind, get_task
from lmedit.evaluate.scoring import check_batch_size, score_rows
from lmedit.locate.prompts import Scored, encode_pair
from lmedit.models.forward import max_positions
from lmedit.models.logprobs import pad_id, predicted_logprobs

_OPS = {">": operator.gt, "<": operator.lt, ">=": operator.ge}


# ---------------------------------------------------------------- teacher-forced suffix log-probs

def _check_width(model: nn.Module, encoded: Sequence[tuple[list[int], list[int]]]) -> int:
    """The longest prefix + suffix input; an example longer than the model's positions is bad input."""
    limit = max_positions(model)
    width = max(len(p) + len(s) - 1 for p, s in encoded)
    if limit is not None and width > limit:
        raise InputError(f"an example is {width} tokens long, more than this model's {limit} positions")
    return width


def _forward(model: nn.Module, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int,
             chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """One right-padded forward (models/logprobs.py); per row the summed log-prob of its suffix tokens and their
    number. Differentiable when grad is enabled."""
    _check_width(model, encoded)
    predicted = predicted_logprobs(model, [p + s[:-1] for p, s in encoded], [len(p) - 1 for p, _ in encoded],
                                   [s for _, s in encoded], pad_id, chunk)
    counts = torch.tensor([len(s) for _, s in encoded], dtype=torch.float32, device=predicted.logprobs.device)
    return predicted.row_sums(len(encoded)), counts


def suffix_logprobs(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable: one batched forward over (prefix, suffix) pairs, scoring exactly prefix + suffix.

    Returns (log P(suffix | prefix) summed over the suffix tokens, number of suffix tokens), each of shape (n,).
    The model's train/eval mode and grad mode are left to the caller."""
    if not pairs:
        raise InputError("no examples to score")
    encoded = [encode_pair(tokenizer, p, s) for p, s in pairs]
    return _forward(model, encoded, pad_id(tokenizer))


def score_suffixes(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> list[float]:
    """No-grad scorer: summed log P(suffix | prefix) per pair, in the order of `pairs`.

    Through the shared scorer (evaluate/scoring.py): identical pairs are scored once, rows are sorted by length
    before batching, and the two suffixes of one prefix (balance, prefer) share its forward pass; `batch_size`
    changes no number beyond float32 rounding."""
    check_batch_size(batch_size)
    pairs = [(p, s) for p, s in pairs]
    unique = list(dict.fromkeys(pairs))
    if not unique:
        return []
    encoded = [encode_pair(tokenizer, p, s) for p, s in unique]
    _check_width(model, encoded)
    rows = [Scored(p + s[:-1], s, len(p) - 1) for p, s in encoded]
    scores = score_rows(model, tokenizer, rows, batch_size)
    by_pair = {pair: float(sum(sc.logprobs)) for pair, sc in zip(unique, scores)}
    return [by_pair[p] for p in pairs]


def pairs_of(kind: str, examples: Sequence) -> list[tuple[str, str]]:
    """Rows to score: (prefix, suffix) per example, or (prefix, suffix1), (prefix, suffix2) interleaved."""
    pairs = []
    for ex in examples:
        if kind in PAIR_KINDS:
            if not isinstance(ex, PairExample):
                raise InputError(f"a {kind} task needs examples with suffix1 and suffix2, got {ex!r}")
            pairs += [(ex.prefix, ex.suffix1), (ex.prefix, ex.suffix2)]
        else:
            if not isinstance(ex, SuffixExample):
                raise InputError(f"a {kind} task needs examples with one suffix, got {ex!r}")
            pairs.append((ex.prefix, ex.suffix))
    return pairs


# ---------------------------------------------------------------- training losses

@dataclass(frozen=True)
class LossOptions:
    """Variants of the training loss; the defaults are the reference code's (see the module docstring).

    normalize: "token" divides each suffix's log-prob by its token count (reference), "sum" keeps the sum.
    lower: "logp" (reference, unbounded) or "unlikelihood" (−log(1 − P), whole-suffix P; ignores normalize).
    floor: for lower="logp", a natural-log level of the summed log P below which an example adds no gradient.
    balance: "abs" (reference) or "square".
    margin: for prefer, None = the reference's unbounded −d, a number m ≥ 0 = max(0, m − d)."""

    normalize: Literal["token", "sum"] = "token"
    lower: Literal["logp", "unlikelihood"] = "logp"
    floor: float | None = None
    balance: Literal["abs", "square"] = "abs"
    margin: float | None = None

    def __post_init__(self):
        if self.normalize not in ("token", "sum"):
            raise InputError(f"loss normalize must be 'token' or 'sum', got {self.normalize!r}")
        if self.lower not in ("logp", "unlikelihood"):
            raise InputError(f"lower loss must be 'logp' or 'unlikelihood', got {self.lower!r}")
        if self.balance not in ("abs", "square"):
            raise InputError(f"balance loss must be 'abs' or 'square', got {self.balance!r}")
        if self.floor is not None and not (_is_number(self.floor) and math.isfinite(self.floor) and self.floor < 0):
            raise InputError(f"floor must be a negative log-probability, got {self.floor!r}")
        if self.margin is not None and not (_is_number(self.margin) and math.isfinite(self.margin)
                                            and self.margin >= 0):
            raise InputError(f"margin must be a number >= 0, got {self.margin!r}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def training_loss(model: nn.Module, tokenizer, task, examples: Sequence[Example],
                  options: LossOptions = LossOptions()) -> torch.Tensor:
    """Scalar, differentiable loss of one batch of canonical examples; `task` is a task name/spec/data or a kind.

    Lower is better for every kind; one gradient step moves each example toward its success rule."""
    kind = _kind(task)
    if not examples:
        raise InputError("a training batch needs at least one example")
    lp, n = suffix_logprobs(model, tokenizer, pairs_of(kind, examples))
    div = n if options.normalize == "token" else torch.ones_like(n)
    if kind == "raise":
        return (-lp / div).mean()
    if kind == "lower":
        if options.lower == "unlikelihood":
            lp = lp.clamp(max=-1e-6)  # P < 1, so log(1 − P) stays finite
            return (-torch.log(-torch.expm1(lp))).mean()
        if options.floor is not None:
            lp = lp.clamp(min=options.floor)  # below the floor: constant, no gradient
        return (lp / div).mean()
    d = lp[0::2] / div[0::2] - lp[1::2] / div[1::2]
    if kind == "balance":
        return (d.abs() if options.balance == "abs" else d.square()).mean()
    if options.margin is None:
        return (-d).mean()
    return torch.relu(options.margin - d).mean()


# ---------------------------------------------------------------- success rules and evaluation

Score = Union[float, tuple[float, float]]


def rule_quantity(task, score: Score) -> float:
    """The number the success rule compares: log P, abs(log P1 − log P2) or log P1 − log P2."""
    kind = _kind(task)
    if kind in PAIR_KINDS:
        if not (isinstance(score, (tuple, list)) and len(score) == 2):
            raise InputError(f"a {kind} task scores an example as (log P(suffix1), log P(suffix2)), got {score!r}")
        d = float(score[0]) - float(score[1])
        return abs(d) if kind == "balance" else d
    if isinstance(score, (tuple, list)) or not _is_number(score):
        raise InputError(f"a {kind} task scores an example as one log-probability, got {score!r}")
    return float(score)


def success(task, score: Score) -> bool:
    """The paper's rule for one evaluation example; `score` is log P(suffix), or the pair for balance/prefer.
    A NaN score never succeeds."""
    spec = get_task(task)
    q = rule_quantity(spec, score)
    return bool(_OPS[spec.op](q, spec.threshold)) and not math.isnan(q)


def example_scores(model: nn.Module, tokenizer, task, examples: Sequence[Example],
                   batch_size: int = 32) -> list[Score]:
    """Per example, its summed log P(suffix) (raise/lower) or (log P(suffix1), log P(suffix2))."""
    kind = _kind(task)
    flat = score_suffixes(model, tokenizer, pairs_of(kind, examples), batch_size)
    if kind in PAIR_KINDS:
        return list(zip(flat[0::2], flat[1::2]))
    return flat


def success_rate(model: nn.Module, tokenizer, task_data: CanonicalTask, examples: Sequence[Example] | None = None,
                 batch_size: int = 32) -> float:
    """Share of evaluation examples (task_data.eval unless `examples` is given) that meet the task's rule."""
    examples = task_data.eval if examples is None else examples
    if not examples:
        raise InputError(f"{task_data.name}: no evaluation examples")
    scores = example_scores(model, tokenizer, task_data.spec, examples, batch_size)
    return sum(success(task_data.spec, s) for s in scores) / len(scores)


def hard_negative_nll(model: nn.Module, tokenizer, examples: Sequence[SuffixExample], batch_size: int = 32) -> float:
    """Mean over hard negatives of −log P(suffix | prefix) summed over the suffix (lower is better; compare
    with the unedited model: an edit must not make it worse)."""
    if not examples:
        raise InputError("no hard negatives to score")
    lps = score_suffixes(model, tokenizer, pairs_of("raise", examples), batch_size)
    return -sum(lps) / len(lps)
