"""ROME (Meng et al. 2022): one fact, one layer, equality-constrained rank-one update.

ΔW = (v* − W k*) (kᵀ C⁻¹ k)⁻¹ kᵀ C⁻¹ — the equality solver with a single key. Several requests are edited one
after another, each on top of the previous (as ROME does); pass one request for the classic setting.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmedit.editors import register_editor
from lmedit.locate.core import LocateConfig, locate_then_edit
from lmedit.patches import compose


@dataclass
class RomeConfig(LocateConfig):
    solver: str = "equality"
    mu: float = 0.0  # exact constraint W′k* = v*
    mom2_weight: float = 1.0  # scale of C is irrelevant when μ = 0


def edit(model, tokenizer, requests, config: RomeConfig, progress: bool = True, announce=print):
    if len(config.layers) != 1:
        from lmedit.errors import InputError

        raise InputError(f"ROME edits exactly one layer, got {list(config.layers)}")
    patches = []
    for req in requests:
        handles = [p.apply(model) for p in patches]
        try:
            patches.append(locate_then_edit(model, tokenizer, [req], config, "rome", progress, announce))
        finally:
            for h in reversed(handles):
                h.revert()
    if len(patches) == 1:
        return patches[0]
    patch = compose(*patches)
    meta = dict(patches[0].meta)
    meta["requests"] = [r for p in patches for r in p.meta["requests"]]
    meta["v_star"] = {k: [x for p in patches for x in p.meta["v_star"][k]] for k in ("target_prob", "steps")}
    meta["timing"] = {k: sum(p.meta["timing"][k] for p in patches) for k in patches[0].meta["timing"]}
    patch.meta.update(meta)
    return patch


register_editor("rome", RomeConfig, edit, "one fact at one layer, equality-constrained rank-one update")
