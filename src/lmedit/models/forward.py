"""Forward passes every layer shares: the transformer body and the unembedding, padding, eval mode without grad.
(Teacher-forced log-probabilities, the per-token loss of texts among them, are in models/logprobs.py.)"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from lmedit.models.arch import arch_for, get_module

DEFAULT_MAX_TOKENS = 256  # each general-text record is cut to this many tokens (evaluate/degradation.py)


@contextmanager
def inference(model: nn.Module):
    """Eval mode (no dropout) and no gradients for the block; the model's own mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextmanager
def frozen_weights(model: nn.Module):
    """Eval mode and no weight gradients for the block (flags restored after): a backward pass for v* or for
    UltraEdit's gradients then computes only activation gradients, never the (much larger) weight ones, even
    for a model built or loaded outside lmedit with its parameters trainable."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def right_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), right-padded: each real token keeps its position."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def body(model: nn.Module) -> nn.Module:
    """The transformer without its unembedding (its output is already through the final norm)."""
    arch = arch_for(model)
    return get_module(model, arch.body or arch.layers.rsplit(".", 1)[0])


def unembed(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = get_module(model, arch_for(model).unembed)(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
