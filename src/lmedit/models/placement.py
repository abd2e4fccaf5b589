"""Where and in what precision a model's weights live: the one module that names a device.

Everything else follows the tensors: a step reads its device and dtype from the parameter it works on (keys and
values are read where each layer is, the solvers run in float64 there, a patch's ΔW is cast to each parameter's
own device and dtype). So choosing a device is choosing where the model is put, once, here: `--device` /
`LMEDIT_DEVICE` on every command that loads a model, `LMEDIT_DTYPE` and `LMEDIT_DEVICE_MAP` beside them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from lmedit.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACCELERATOR = "cuda"  # the accelerator lmedit's GPU path is exercised on (benchmarks/device.sh)


def accelerator_available() -> bool:
    return torch.cuda.is_available()


def check_device(text: str) -> torch.device:
    """`text` as a torch device that this machine has (cpu, cuda, cuda:N, mps); an InputError in one line if not."""
    try:
        device = torch.device(text.strip())
    except (RuntimeError, ValueError):
        raise InputError(f"--device expects cpu, {ACCELERATOR} or {ACCELERATOR}:N, got {text!r}") from None
    if device.type == ACCELERATOR:
        if not accelerator_available():
            built = torch.version.cuda or "none"
            raise InputError(f"--device {text} (or LMEDIT_DEVICE): this machine has no CUDA device "
                             f"(torch {torch.__version__}, built with CUDA {built}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(f"--device {text}: this machine has {count} CUDA device(s), "
                             f"{ACCELERATOR}:0..{ACCELERATOR}:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {text}: this machine has no MPS device; use --device cpu")
    elif device.type not in ("cpu", "mps"):
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            raise InputError(f"--device {text}: {str(e).splitlines()[0]}") from None
    return device


@dataclass(frozen=True)
class Placement:
    """Where and in what precision the weights live. float32 on the CPU by default; `device` puts the whole model
    on one device (cpu, cuda, cuda:1); a model too large for that loads in bfloat16/float16 and/or spread by
    accelerate's `device_map` ("auto": over the GPUs, then CPU)."""

    dtype: str = "float32"
    device_map: str | None = None
    device: str | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise InputError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.device and self.device_map:
            raise InputError("set --device (LMEDIT_DEVICE) or LMEDIT_DEVICE_MAP, not both")
        if self.device:
            check_device(self.device)  # before any weights are read

    @classmethod
    def from_env(cls, device: str | None = None) -> "Placement":
        """LMEDIT_DTYPE, LMEDIT_DEVICE_MAP and (unless `device` is given, as --device gives it) LMEDIT_DEVICE."""
        return cls(os.environ.get("LMEDIT_DTYPE") or "float32", os.environ.get("LMEDIT_DEVICE_MAP") or None,
                   device or os.environ.get("LMEDIT_DEVICE") or None)

    def place(self, model: nn.Module) -> nn.Module:
        """The loaded model in this dtype and on this device (a device-mapped model stays where accelerate put it,
        in the dtype it was loaded in)."""
        if self.device_map:
            return model
        model.to(DTYPES[self.dtype])
        if self.device:
            model.to(check_device(self.device))
        return model


def rank_device(local_rank: int) -> tuple[str, str]:
    """(process-group backend, device) of one rank under torchrun: NCCL on its own GPU where there are GPUs,
    gloo on the CPU otherwise."""
    if accelerator_available():
        torch.cuda.set_device(local_rank)
        return "nccl", f"{ACCELERATOR}:{local_rank}"
    return "gloo", "cpu"
