"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's loop with every update projected onto the null space of C.

ΔW_l = R_l K_lᵀ P_l ((K_l K_lᵀ + K_p K_pᵀ) P_l + α I)⁻¹, P_l = U₀U₀ᵀ over C_l's eigenvectors with eigenvalue below
`null_space_threshold`; in a sequence the carried state holds K_p K_pᵀ, the keys of the edits made so far.
Settings follow the reference hparams (threshold 2e-2, L2 = 10); v*, keys and layers are MEMIT's.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmedit.editors.registry import register_editor
from lmedit.locate.core import LocateConfig, locate_then_edit


@dataclass
class AlphaEditConfig(LocateConfig):
    solver: str = "null_space"


def edit(model, tokenizer, requests, config: AlphaEditConfig, progress: bool = True, announce=print, state=None,
         values=None):
    return locate_then_edit(model, tokenizer, requests, config, "alphaedit", progress, announce, state=state,
                            values=values)


register_editor("alphaedit", AlphaEditConfig, edit, "lifelong batches: MEMIT projected onto the null space of C",
                carries_state=True, reuses_values=True, needs_kv_cache=True)
