"""Degradation leagues (Hewitt et al. 2024): an edit counts only while it stays within (1 + ε) of the unedited loss.

A training trace is one point per epoch, `{"success_rate", "general_loss", "targeted_loss"}` after epoch 1, 2, …;
`before` is the same for the unedited model. An epoch is admissible in league ε when BOTH its general-text loss
and its targeted-text loss are ≤ (1 + ε) × their values before editing (DESIGN §8; the reference code checks the
general loss only, with a strict <: equal losses are measure-zero apart from the unedited point itself). The
score is the change in success rate at the LAST admissible epoch — not the best one, so a method cannot pick a
lucky epoch it then degrades past — and 0 (epoch None) when no epoch is admissible, i.e. the unedited model.
A NaN loss (a diverged run) is never admissible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from lmedit.errors import InputError

LEAGUES: tuple[float, ...] = (1e-3, 1e-4, 1e-5)
KEYS = ("success_rate", "general_loss", "targeted_loss")


def check_epsilon(epsilon) -> float:
    """A league's ε as a float: a positive, finite number (a numeric string such as "1e-5" is accepted)."""
    value = epsilon
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InputError(f"league must be a positive number such as 1e-5, got {epsilon!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"league must be a positive number such as 1e-5, got {epsilon!r}")
    return float(value)


@dataclass(frozen=True)
class LeagueResult:
    epsilon: float
    score: float  # success_rate at `epoch` − success_rate before; 0 when no epoch is admissible
    epoch: int | None  # 1-based epoch of the last admissible point, None when there is none
    point: Mapping[str, float] | None  # that epoch's trace entry


def _number(point: Mapping, key: str, where: str) -> float:
    if not isinstance(point, Mapping) or key not in point:
        raise InputError(f"{where} lacks {key!r} (a trace point needs {', '.join(KEYS)})")
    v = point[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"{where}: {key} must be a number, got {v!r}")
    return float(v)


def _check_before(before: Mapping) -> dict[str, float]:
    out = {k: _number(before, k, "the unedited point") for k in KEYS}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise InputError(f"the unedited point has non-finite {', '.join(bad)}")
    return out


def admissible(point: Mapping, before: Mapping, epsilon) -> bool:
    """Whether general and targeted loss of `point` are both ≤ (1 + ε) × before."""
    eps = check_epsilon(epsilon)
    b = _check_before(before)
    return all(_number(point, k, "trace point") <= (1 + eps) * b[k] for k in ("general_loss", "targeted_loss"))


def league_score(trace: Sequence[Mapping], before: Mapping, epsilon) -> LeagueResult:
    """Score of one training run in league ε: Δ success rate at the last admissible epoch, else 0."""
    eps = check_epsilon(epsilon)
    b = _check_before(before)
    last = None
    for i, point in enumerate(trace):
        where = f"trace epoch {i + 1}"
        vals = {k: _number(point, k, where) for k in KEYS}
        if all(vals[k] <= (1 + eps) * b[k] for k in ("general_loss", "targeted_loss")):
            last = i
    if last is None:
        return LeagueResult(eps, 0.0, None, None)
    point = trace[last]
    return LeagueResult(eps, float(point["success_rate"]) - b["success_rate"], last + 1, dict(point))


def league_scores(trace: Sequence[Mapping], before: Mapping,
                  leagues: Sequence[float] = LEAGUES) -> dict[float, LeagueResult]:
    return {float(eps): league_score(trace, before, eps) for eps in leagues}
