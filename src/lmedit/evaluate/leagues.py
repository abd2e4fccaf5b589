"""Degradation leagues (Hewitt et al. 2024): an edit counts only while it stays within (1 + ε) of the unedited loss.

A training trace is one point per epoch, `{"success_rate", "general_loss", "targeted_loss"}` after epoch 1, 2, …;
`before` is the same for the unedited model. Which epochs are admissible in league ε is a rule (`RULES`):
- "general" (the default, as the reference code and the paper: its general-text loss is strictly below
  (1 + ε) × its value before editing);
- "general_and_targeted" (lmedit's earlier rule, DESIGN §8: the general-text AND the targeted-text loss are both
  ≤ (1 + ε) × before), kept as an option.
The score is the change in success rate at the LAST admissible epoch — not the best one, so a method cannot pick
a lucky epoch it then degrades past — and 0 (epoch None) when no epoch is admissible, i.e. the unedited model.
A NaN loss (a diverged run) is never admissible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from lmedit.degradation_budget import check_epsilon, loss_within
from lmedit.errors import InputError

LEAGUES: tuple[float, ...] = (1e-3, 1e-4, 1e-5)
KEYS = ("success_rate", "general_loss", "targeted_loss")
RULES = {  # rule -> what a result says it used
    "general": "general-text per-token loss < (1 + eps) x unedited (the reference's rule); score = change in "
               "success rate at the last admissible epoch, 0 if none",
    "general_and_targeted": "general and targeted per-token loss <= (1 + eps) x unedited (lmedit's earlier "
                            "rule); score = change in success rate at the last admissible epoch, 0 if none",
}
DEFAULT_RULE = "general"


def check_rule(rule) -> str:
    if rule not in RULES:
        raise InputError(f"unknown admissibility rule {rule!r}; choose one of: {', '.join(RULES)}")
    return rule


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


def _within(vals: Mapping[str, float], b: Mapping[str, float], eps: float, rule: str) -> bool:
    if rule == "general":
        return loss_within(vals["general_loss"], b["general_loss"], eps, strict=True)
    return all(loss_within(vals[k], b[k], eps, strict=False) for k in ("general_loss", "targeted_loss"))


def admissible(point: Mapping, before: Mapping, epsilon, rule: str = DEFAULT_RULE) -> bool:
    """Whether `point` is admissible in league ε under `rule` (see the module docstring)."""
    eps = check_epsilon(epsilon)
    b = _check_before(before)
    vals = {k: _number(point, k, "trace point") for k in ("general_loss", "targeted_loss")}
    return _within(vals, b, eps, check_rule(rule))


def league_score(trace: Sequence[Mapping], before: Mapping, epsilon, rule: str = DEFAULT_RULE) -> LeagueResult:
    """Score of one training run in league ε: Δ success rate at the last admissible epoch, else 0."""
    eps = check_epsilon(epsilon)
    b = _check_before(before)
    check_rule(rule)
    last = None
    for i, point in enumerate(trace):
        where = f"trace epoch {i + 1}"
        vals = {k: _number(point, k, where) for k in KEYS}
        if _within(vals, b, eps, rule):
            last = i
    if last is None:
        return LeagueResult(eps, 0.0, None, None)
    point = trace[last]
    return LeagueResult(eps, float(point["success_rate"]) - b["success_rate"], last + 1, dict(point))


def league_scores(trace: Sequence[Mapping], before: Mapping, leagues: Sequence[float] = LEAGUES,
                  rule: str = DEFAULT_RULE) -> dict[float, LeagueResult]:
    return {float(eps): league_score(trace, before, eps, rule) for eps in leagues}
