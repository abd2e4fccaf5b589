"""The one training loop: Adam over shuffled mini-batches, with callbacks after each step and each epoch.

Every trainer of lmedit runs through `fit`: the fine-tuning editors (`ft`, `ft-conditional`, `lora`: the loss of
`finetune`, per-step projection and divergence checks, a degradation budget, early stopping, checkpoints) and the
canonical-examples protocol (`ft`, `ft-conditional`, `lora`, `senses`: the task's loss, an evaluation after every
epoch, patience on the widest league). What differs is the loss of a batch and what happens between steps and
between epochs; the optimiser, the shuffling (one seeded generator, `randperm` each epoch), the epoch loss (the
example-weighted mean of the batch losses) and the divergence rule are the same for all of them.

A checkpoint (`Checkpoint`) saves the trained tensors, Adam's moments, the shuffling generator and the caller's
own state after every epoch but the last; a call whose `key` matches resumes from it bit-identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lmedit.checkpoints import adam_tensors, load_state, restore_adam, save_state

DIVERGED = 1e4  # ‖W‖ above this many times its initial norm: no edit needs that, the step size is wrong


class NonFiniteLoss(Exception):
    """The loss of a batch became NaN or infinite (the trained tensors are as the step before left them)."""

    def __init__(self, epoch: int, step: int, value: float):
        super().__init__(f"non-finite loss {value} at step {step} (epoch {epoch})")
        self.epoch, self.step, self.value = epoch, step, value


def initial_norms(params: dict[str, nn.Parameter]) -> dict[str, float]:
    return {n: float(p.detach().float().norm()) for n, p in params.items()}


def diverged_weights(params: dict[str, nn.Parameter], norms0: dict[str, float]) -> tuple[str, str] | None:
    """(name, what happened) of the first tensor that became non-finite or grew past DIVERGED × its initial norm.

    In float32 a normalised transformer rarely overflows: a step size gone wrong shows as weights that explode."""
    for name, p in params.items():
        norm = float(p.detach().float().norm())
        if not math.isfinite(norm):
            return name, "became non-finite"
        if norms0[name] > 0 and norm > DIVERGED * norms0[name]:
            return name, f"grew to {norm / norms0[name]:.3g} times their initial norm"
    return None


@dataclass
class Checkpoint:
    """Where and under which key a run keeps its state; `save` returns the caller's state to keep beside the
    tensors (JSON), `restore` puts it back when a matching state is found."""

    directory: Path
    key: str
    save: Callable[[], dict]
    restore: Callable[[dict], None]


@dataclass
class Fitted:
    epochs: int  # epochs run (a resumed run counts the ones before the interruption)
    steps: int
    stopped: str | None  # what an epoch callback returned to stop training; None when every epoch ran


def fit(params: dict[str, nn.Parameter], n_examples: int, batch_loss: Callable[[list[int]], torch.Tensor], *,
        lr: float, epochs: int, batch_size: int, seed: int,
        after_step: Callable[[int], None] | None = None,
        after_epoch: Callable[[int, float], str | None] | None = None,
        checkpoint: Checkpoint | None = None, progress: bool = False, desc: str = "train") -> Fitted:
    """Adam on `params` for `epochs` epochs over shuffled mini-batches of example indices.

    `batch_loss(indices)` returns the scalar loss of those examples. `after_step(step)` runs after each optimiser
    step (a projection, a divergence check); `after_epoch(epoch, mean loss)` after each epoch (1-based) and
    returns a reason to stop, or None to go on. A non-finite loss raises NonFiniteLoss before its step is taken."""
    optimiser = torch.optim.Adam(list(params.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(n_examples / batch_size)
    first_epoch = step = 0
    if checkpoint is not None:
        saved = load_state(checkpoint.directory)
        if saved is not None and saved[1].get("key") == checkpoint.key:
            tensors, meta = saved
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(tensors[f"param::{name}"])
            restore_adam(optimiser, params, tensors, meta["step"])
            generator.set_state(tensors["generator"])
            first_epoch, step = meta["epoch"], meta["step"]
            checkpoint.restore(meta)
    bar = tqdm(total=epochs * per_epoch, initial=first_epoch * per_epoch, desc=desc, disable=not progress,
               leave=False)
    stopped, epoch = None, first_epoch
    try:
        for epoch in range(first_epoch + 1, epochs + 1):
            order, total = torch.randperm(n_examples, generator=generator).tolist(), 0.0
            with torch.enable_grad():
                for start in range(0, n_examples, batch_size):
                    idx = order[start:start + batch_size]
                    loss = batch_loss(idx)
                    step += 1
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(epoch, step, float(loss.detach()))
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    if after_step is not None:
                        after_step(step)
                    total += float(loss.detach()) * len(idx)
                    bar.update(1)
            optimiser.zero_grad(set_to_none=True)
            stopped = after_epoch(epoch, total / n_examples) if after_epoch is not None else None
            if stopped is not None:
                break
            if checkpoint is not None and epoch < epochs:
                tensors = {f"param::{n}": p for n, p in params.items()}
                tensors.update(adam_tensors(optimiser, {id(p): n for n, p in params.items()}),
                               generator=generator.get_state())
                save_state(checkpoint.directory, tensors, {"key": checkpoint.key, "epoch": epoch, "step": step,
                                                           **checkpoint.save()})
    finally:
        bar.close()
        optimiser.zero_grad(set_to_none=True)
    return Fitted(epoch, step, stopped)
