"""LoRA (Hu et al. 2022) through `peft`, trained by the fine-tuning loop and exported as an lmedit Patch.

Each chosen projection W gets W + (α/r) B A with A (r, in) random and B (out, r) zero, so training starts from
the unedited model; only A and B train, with the loss of `ft-conditional` (or `ft`'s, loss="full"). After
training each adapter becomes the low-rank delta ΔW = (α/r) B A in W's storage layout — (out, in) for
nn.Linear; for GPT-2's Conv1D, stored (in, out) and handled by peft with fan_in_fan_out, ΔW = Aᵀ ((α/r) Bᵀ) —
and the peft wrappers are removed, so the model is the one that came in and the patch applies, reverts and
composes like every other.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from lmedit.editors.registry import register_editor
from lmedit.editors.finetune import TRAINER, TrainConfig, resolve_modules, run_editor, train
from lmedit.errors import InputError, LmeditError
from lmedit.models.arch import arch_for, get_module
from lmedit.patches import Delta, Patch
from lmedit.settings import choice, integer, number

ADAPTER = "lmedit"


@dataclass
class LoraEditConfig(TrainConfig):
    lr: float = 1e-3  # adapters start at zero and are small: a larger step than full fine-tuning
    rank: int = integer(8, ge=1)  # r: inner dimension of B A (the patch stores r (in + out) numbers per module)
    alpha: float = number(16.0, gt=0)  # ΔW = (alpha / r) B A
    # target tokens only (ft-conditional) or all (ft)
    loss: Literal["conditional", "full"] = choice("conditional", ("conditional", "full"))


def _is_adapter(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _strip(model: nn.Module) -> None:
    """Put every wrapped module's base layer back (what peft's unload does; also after a half-done injection)."""
    for name, module in list(model.named_modules()):
        if name and _is_adapter(module):
            parent, _, child = name.rpartition(".")
            setattr(get_module(model, parent) if parent else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


@contextmanager
def lora_adapters(model: nn.Module, targets: list[str], rank: int, alpha: float, seed: int
                  ) -> Iterator[dict[str, nn.Module]]:
    """Inject LoRA adapters into the `targets` (module paths) in place; yields {path: adapted module}. On exit the
    wrappers are removed and the requires_grad flags restored, even on error; the same parameters are back."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel
    from transformers.pytorch_utils import Conv1D

    if hasattr(model, "peft_config") or any(_is_adapter(m) for m in model.modules()):
        raise InputError("the model already carries peft adapters; lmedit edits a plain model")
    for name in targets:
        if type(get_module(model, name)) not in (nn.Linear, Conv1D):
            raise InputError(f"LoRA needs linear projections; {name} is a {type(get_module(model, name)).__name__}")
    before = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in before.items()}
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=list(targets),
                        fan_in_fan_out=arch_for(model).transposed, init_lora_weights=True)
    tuner = None
    try:
        with torch.random.fork_rng(devices=[]):  # A's random init from `seed`, the global RNG left alone
            torch.manual_seed(seed)
            tuner = LoraModel(model, config, ADAPTER)
        yield {name: get_module(model, name) for name in targets}
    finally:
        if tuner is not None:
            tuner.unload()
        _strip(model)
        after = dict(model.named_parameters())
        for n, p in after.items():
            p.requires_grad_(flags.get(n, False))
        if set(after) != set(before) or any(after[n] is not before[n] for n in before):
            raise LmeditError("removing the LoRA adapters did not restore the model's parameters")  # a peft change


def lora_deltas(adapted: dict[str, nn.Module]) -> dict[str, Delta]:
    """ΔW = (α/r) B A per adapted module, as low-rank factors in the base weight's storage layout."""
    deltas = {}
    for name, layer in adapted.items():
        A = layer.lora_A[ADAPTER].weight.detach().float()  # (r, in)
        B = layer.lora_B[ADAPTER].weight.detach().float()  # (out, r)
        s = float(layer.scaling[ADAPTER])
        if layer.fan_in_fan_out:  # stored (in, out): ΔWᵀ = Aᵀ (s Bᵀ)
            deltas[f"{name}.weight"] = Delta(left=A.T.contiguous(), right=(s * B.T).contiguous())
        else:
            deltas[f"{name}.weight"] = Delta(left=(s * B).contiguous(), right=A.contiguous())
    return deltas


def _train_lora(model, tokenizer, examples, config: LoraEditConfig, conditional: bool, progress: bool, desc: str,
                checkpoint_dir=None):
    targets = resolve_modules(model, config.layers, config.modules)
    with lora_adapters(model, targets, config.rank, config.alpha, config.seed) as adapted:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # A and B only
        curve = train(model, tokenizer, examples, params, config, conditional, progress, None, desc, checkpoint_dir)
        deltas = lora_deltas(adapted)
    return Patch(deltas), curve


def edit(model, tokenizer, requests, config: LoraEditConfig, progress: bool = True, announce=print,
         checkpoint_dir=None):
    return run_editor(model, tokenizer, requests, config, "lora", config.loss == "conditional", _train_lora,
                      progress, checkpoint_dir)


register_editor("lora", LoraEditConfig, edit, "LoRA adapters (peft) on chosen modules, merged into low-rank deltas",
                **TRAINER)
