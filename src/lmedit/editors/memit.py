"""MEMIT (Meng et al. 2023): many facts spread over several layers by least squares.

ΔW_l = R_l Kᵀ (λ C + K Kᵀ)⁻¹, with R_l the layer's share of the remaining residual at the last edit layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmedit.editors.registry import register_editor
from lmedit.locate.core import LocateConfig, locate_then_edit


@dataclass
class MemitConfig(LocateConfig):
    solver: str = "least_squares"


def edit(model, tokenizer, requests, config: MemitConfig, progress: bool = True, announce=print, values=None):
    return locate_then_edit(model, tokenizer, requests, config, "memit", progress, announce, values=values)


register_editor("memit", MemitConfig, edit, "batched facts over several layers, least squares",
                reuses_values=True, needs_kv_cache=True, canonical=True)
