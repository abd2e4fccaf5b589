"""Training state on disk for the long training loops (fine-tuning edits, the Backpack trainer): tensors in
safetensors, the rest in JSON, never pickle. The JSON is written last, so a state whose JSON exists is complete."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmedit.fileio import atomic_save_tensors, atomic_write_json, read_json

STATE_JSON, STATE_TENSORS = "state.json", "state.safetensors"


def train_dir_beside(path: str | os.PathLike) -> Path:
    """Where the training state of the work that will end in `path` (a patch, a journal) is kept: `path.train`."""
    path = Path(path)
    return path.with_name(path.name + ".train")


def adam_tensors(optimiser: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Adam's moments as `{param name}::exp_avg` / `::exp_avg_sq` (its step count is the caller's step)."""
    tensors = {}
    for group in optimiser.param_groups:
        for p in group["params"]:
            for key, value in optimiser.state.get(p, {}).items():
                if torch.is_tensor(value) and key != "step":
                    tensors[f"{names[id(p)]}::{key}"] = value.detach().contiguous()
    return tensors


def restore_adam(optimiser: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter],
                 tensors: dict[str, torch.Tensor], step: int) -> None:
    """Put back the moments `adam_tensors` saved, after `step` optimiser steps: the next step is the one an
    uninterrupted run would take."""
    for name, p in params.items():
        if f"{name}::exp_avg" in tensors:
            optimiser.state[p] = {"step": torch.tensor(float(step)),
                                  "exp_avg": tensors[f"{name}::exp_avg"].to(p.device),
                                  "exp_avg_sq": tensors[f"{name}::exp_avg_sq"].to(p.device)}


def save_state(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    atomic_save_tensors(Path(directory) / STATE_TENSORS, tensors)
    atomic_write_json(Path(directory) / STATE_JSON, meta)


def load_state(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) of a complete state in `directory`, or None."""
    directory = Path(directory)
    if not (directory / STATE_JSON).is_file() or not (directory / STATE_TENSORS).is_file():
        return None
    return load_file(str(directory / STATE_TENSORS)), read_json(directory / STATE_JSON)
