"""The ensemble as the paper runs it (Hewitt et al. 2024 §6): a large model steered by a small edited Backpack.

1. The Backpack is sense-fine-tuned ALONE under the canonical protocol (`run_canonical(..., "senses")` on the
   Backpack: its own unedited point, its own general-text budget), keeping the sense deltas of every epoch.
2. Per league ε: the deltas of the Backpack's last admissible epoch in ε are attached, and the ensemble
   logits_big + w · (log_softmax(edited Backpack) − log_softmax(original Backpack)) (backpack/ensemble.py) is
   evaluated at w = 1.0, 0.9, …, 0.1 (`W_STEPS`) until the LARGE model's general-text loss is admissible in ε
   against the large model's own unedited point (`weight_schedule`). w = 0 is the large model itself, so a league
   in which no w is admissible, or in which the Backpack had no admissible epoch, scores 0.
The score of a league is the ensemble's change in success rate at that w. This replaces lmedit's earlier
ensemble, which trained the sense deltas through the large model and halved w against the widest league only.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from lmedit.errors import InputError
from lmedit.evaluate.canonical_run import _jsonable, league_key, run_canonical
from lmedit.evaluate.leagues import admissible

W_STEPS: tuple[float, ...] = tuple(round(1.0 - 0.1 * i, 1) for i in range(10))  # 1.0, 0.9, …, 0.1 (then w = 0)


def weight_schedule(evaluate_at: Callable[[float], dict], before: dict, epsilon: float,
                    rule: str) -> tuple[float, dict, list[dict]]:
    """(w, its point, every point tried): the first w of W_STEPS whose point is admissible in league ε under
    `rule`; when none is, w = 0 and the unedited point (the large model alone, admissible by construction)."""
    tried = []
    for w in W_STEPS:
        point = evaluate_at(w)
        tried.append({"w": w, "general_loss": point["general_loss"], "targeted_loss": point["targeted_loss"]})
        if admissible(point, before, epsilon, rule):
            return w, point, tried
    return 0.0, dict(before), tried


def run_ensemble(small, big, task, settings, announce: Callable[[str], None] | None = None) -> dict:
    """The protocol above. `small`: a canonical_run.Runner on the Backpack; `big`: a Runner on the EnsembleLM of
    the large model and that same Backpack, under the same protocol. Both models come back unchanged."""
    from lmedit.backpack import senses as se
    from lmedit.backpack.ensemble import EnsembleLM

    ensemble = big.model
    if not isinstance(ensemble, EnsembleLM) or ensemble.backpack_lm is not small.model:
        raise InputError("the ensemble runner's model must be an EnsembleLM of the small runner's Backpack")
    if small.protocol != big.protocol:
        raise InputError("the Backpack and the ensemble must be measured under the same protocol")
    t0 = time.perf_counter()
    keep: dict = {}
    backpack = run_canonical(small, task, "senses", settings, announce=announce, keep=keep)
    before, from_cache = big.unedited(task)  # no sense edits attached: the ensemble is the large model
    protocol, leagues = big.protocol, {}
    for eps in protocol.leagues:
        key = league_key(eps)
        epoch = backpack["leagues"][key]["epoch"]
        if epoch is None:  # the Backpack never stayed in this league: nothing to carry over
            w, point, tried = 0.0, dict(before), []
        else:
            with se.attached_senses(small.model, keep["chosen"]) as edits, torch.no_grad():
                edits.vectors.copy_(keep["epochs"][epoch - 1]["backpack.sense_edits.vectors"])

                def evaluate_at(w: float) -> dict:
                    ensemble.w = w
                    return big.evaluate(task, before, eps)

                try:
                    w, point, tried = weight_schedule(evaluate_at, before, eps, protocol.admissible)
                finally:
                    ensemble.w = 1.0
        leagues[key] = {
            "epsilon": eps, "score": point["success_rate"] - before["success_rate"], "epoch": epoch,
            "ensemble_weight": w, "weights_tried": tried, "success_rate": point["success_rate"],
            "general_loss": point["general_loss"], "general_change": point["general_loss"] / before["general_loss"] - 1,
            "targeted_loss": point["targeted_loss"],
            "targeted_change": point["targeted_loss"] / before["targeted_loss"] - 1,
            "hard_negative_nll": point["hard_negative_nll"],
            "hard_negative_change": point["hard_negative_nll"] - before["hard_negative_nll"],
        }
        if announce:
            announce(f"ensemble ε={key}: Backpack epoch {epoch or '–'}, w = {w:.1f}, "
                     f"success {point['success_rate']:.3f} (large model alone {before['success_rate']:.3f})")
    result = {
        "task": task.name, "split": task.split, "model": big.model_name, "method": "senses",
        "ensemble": {"backpack": small.model_name, "weight_steps": list(W_STEPS),
                     "rule": "the Backpack trained alone; per league its last admissible epoch, then w lowered from "
                             "1.0 in steps of 0.1 until the large model's loss is admissible (w = 0: the large "
                             "model alone)"},
        "config": backpack["config"], "kind": task.kind, "rule": task.spec.rule, "n": backpack["n"],
        "protocol": backpack["protocol"],  # the Backpack's run is under the same protocol (checked above)
        "unedited": before, "unedited_from_cache": from_cache, "backpack_run": backpack, "trace": backpack["trace"],
        "leagues": leagues, "diverged": backpack["diverged"],
        "timing": {"run_seconds": time.perf_counter() - t0,
                   "backpack_seconds": backpack["timing"]["run_seconds"]},
    }
    return _jsonable(result)

