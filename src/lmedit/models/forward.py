"""Forward passes every layer shares: the transformer body and the unembedding, padding, eval mode without grad,
and the teacher-forced per-token loss of plain texts (the general-text degradation measure)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmedit.errors import InputError
from lmedit.models.arch import arch_for, get_module
from lmedit.models.tokens import encode

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


# ---------------------------------------------------------------- per-token loss of texts

def token_nll(model: nn.Module, tokenizer, texts: Sequence[str], max_tokens: int | None = DEFAULT_MAX_TOKENS,
              batch_size: int = 16, chunk: int = 512) -> tuple[float, int]:
    """(total NLL, number of predicted tokens) of `texts`; no grad, eval mode while scoring."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
        raise InputError(f"max_tokens must be an integer >= 2 (or None), got {max_tokens!r}")
    rows = []
    for t in texts:
        ids = encode(tokenizer, t)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if len(ids) >= 2:
            rows.append(ids)
    if not rows:
        raise InputError("no text has two tokens or more: there is nothing to predict")
    limit = max_positions(model)
    longest = max(len(r) for r in rows)
    if limit is not None and longest > limit:
        raise InputError(f"a text is {longest} tokens long, more than this model's {limit} positions; "
                         "lower max_tokens")
    rows.sort(key=len)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    with inference(model):
        for lo in range(0, len(rows), batch_size):
            batch = rows[lo:lo + batch_size]
            ids, mask = right_pad(batch, pad)
            hidden = body(model)(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            pred = mask.clone()
            pred[:, :-1] = mask[:, 1:]  # position j predicts token j+1 when that token is real
            pred[:, -1] = 0
            sel = pred.bool().to(device)
            h = hidden[sel]
            targets = ids.to(device)[:, 1:][sel[:, :-1]]
            for c in range(0, h.shape[0], chunk):
                logits = unembed(model, h[c:c + chunk]).float()
                total += F.cross_entropy(logits, targets[c:c + chunk], reduction="sum").item()
            count += int(sel.sum().item())
    return total, count


def token_loss(model: nn.Module, tokenizer, texts: Sequence[str], max_tokens: int | None = DEFAULT_MAX_TOKENS,
               batch_size: int = 16) -> float:
    """Per-token loss (mean NLL over every predicted token of `texts`)."""
    total, count = token_nll(model, tokenizer, texts, max_tokens, batch_size)
    return total / count
