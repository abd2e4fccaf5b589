"""The degradation budget, one rule for every part of lmedit that holds an edit to one: a loss may rise to at most
(1 + ε) times its value before editing.

Used by the canonical-examples leagues (evaluate/leagues.py: the general-text loss strictly below the bound, the
reference's rule, or both losses at most the bound, lmedit's earlier one) and by the fine-tuning editors'
`--set budget=ε` (editors/budget.py: at most the bound, the weights of the last epoch within it kept). A NaN loss
(a diverged run) is never within any budget.
"""

from __future__ import annotations

import math

from lmedit.errors import InputError


def check_epsilon(epsilon) -> float:
    """A budget's ε as a float: a positive, finite number (a numeric string such as "1e-5" is accepted)."""
    value = epsilon
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InputError(f"league must be a positive number such as 1e-5, got {epsilon!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"league must be a positive number such as 1e-5, got {epsilon!r}")
    return float(value)


def loss_within(loss: float, before: float, epsilon: float, strict: bool) -> bool:
    """Whether `loss` is within (1 + ε) × `before`: strictly below it (strict) or at most it."""
    bound = (1 + epsilon) * before
    return loss < bound if strict else loss <= bound
