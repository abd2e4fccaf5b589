"""ROME (Meng et al. 2022): one fact, one layer, equality-constrained rank-one update.

ΔW = (v* − W k) (k*ᵀ C⁻¹ k*)⁻¹ k*ᵀ C⁻¹ — the equality solver with a single key, where k* is the key averaged
over the bare prompt and its random-prefixed variants, and v* − W k = δ is measured on the bare prompt (v* is
W's output there plus the optimised δ). So the edit satisfies W′k* = W k* + δ: the residual δ lands on the
averaged key, as MEMIT places it. ROME's paper writes W′k* = v*, and its code W′k = v* on the bare-prompt key
k with the direction C⁻¹k*; README ("Departures from the reference code") says why lmedit keeps its form.
Several requests are edited one after another, each on top of the previous (as ROME does); pass one request
for the classic setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmedit.editors.registry import register_editor
from lmedit.locate.core import LocateConfig, locate_then_edit
from lmedit.locate.values import ValueConfig
from lmedit.patches import compose


@dataclass
class RomeConfig(LocateConfig):
    solver: str = "equality"
    mu: float = 0.0  # exact constraint W′k* = v*
    mom2_weight: float = 1.0  # scale of C is irrelevant when μ = 0
    key_average: str = "uniform"  # ROME's compute_u: every context template weighs the same in k*
    value: ValueConfig = field(default_factory=lambda: ValueConfig(site="mlp_out"))  # v* is W's output (ROME §3.1)


def edit(model, tokenizer, requests, config: RomeConfig, progress: bool = True, announce=print, values=None):
    if len(config.layers) != 1:
        from lmedit.errors import InputError

        raise InputError(f"ROME edits exactly one layer, got {list(config.layers)}")
    patches = []
    for req in requests:
        handles = [p.apply(model, force=True) for p in patches]  # computed here, not read from a file
        try:
            patches.append(locate_then_edit(model, tokenizer, [req], config, "rome", progress, announce,
                                            values=values))
        finally:
            for h in reversed(handles):
                h.revert()
    if len(patches) == 1:
        return patches[0]
    patch = compose(*patches)
    meta = dict(patches[0].meta)
    meta["requests"] = [r for p in patches for r in p.meta["requests"]]
    meta["v_star"] = {k: [x for p in patches for x in p.meta["v_star"][k]] for k in ("target_prob", "steps", "z_reached")}
    meta["v_star"]["site"] = patches[0].meta["v_star"]["site"]
    meta["timing"] = {k: sum(p.meta["timing"][k] for p in patches) for k in patches[0].meta["timing"]}
    patch.meta.update(meta)
    return patch


register_editor("rome", RomeConfig, edit, "one fact at one layer, equality-constrained rank-one update",
                reuses_values=True, needs_kv_cache=True)
