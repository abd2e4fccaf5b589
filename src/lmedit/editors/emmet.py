"""EMMET (Gupta et al. 2024, "A Unified Framework for Model Editing"): batched equality-constrained edits.

ΔW_l = R_l (Kᵀ C⁻¹ K + μ I)⁻¹ Kᵀ C⁻¹ — ROME's constraint for a whole batch, spread over layers like MEMIT.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmedit.editors.registry import register_editor
from lmedit.locate.core import LocateConfig, locate_then_edit


@dataclass
class EmmetConfig(LocateConfig):
    solver: str = "equality"
    mu: float = 0.1  # softens the constraint when keys of a large batch are nearly dependent


def edit(model, tokenizer, requests, config: EmmetConfig, progress: bool = True, announce=print, values=None):
    return locate_then_edit(model, tokenizer, requests, config, "emmet", progress, announce, values=values)


register_editor("emmet", EmmetConfig, edit, "batched facts, equality-constrained (ROME's constraint for a batch)",
                reuses_values=True, needs_kv_cache=True)
