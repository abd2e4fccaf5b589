"""Batched text generation for the generation-based metrics: greedy continuations and ROME's top-k sampling.

Both batch with LEFT padding, so every row generates from its own last token and a prompt's text does not
depend on the batch it is in. Sampling is reproducible: each prompt draws its own uniform numbers from a
generator seeded by (seed, prompt text), so the same prompt gets the same draws in any batch, shard or run,
and the edited and the unedited model are sampled with the same random numbers.
"""

from __future__ import annotations

import hashlib
import unicodedata

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from lmedit.locate.prompts import encode


def _left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def greedy_continuations(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                         batch_size: int = 32) -> list[str]:
    """Greedy continuations (the generated text only), batched with left padding."""
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    out: list[str] = []
    for lo in range(0, len(prompts), batch_size):
        ids, mask = _left_padded([encode(tokenizer, p) for p in prompts[lo:lo + batch_size]], pad, device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        out += [tokenizer.decode(g[ids.shape[1]:], skip_special_tokens=True) for g in gen]
    return out


def prompt_uniforms(prompt: str, seed: int, steps: int) -> torch.Tensor:
    """The uniform numbers in [0, 1) that sampling `prompt` uses, one per generated token (float64, CPU)."""
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(steps, generator=generator, dtype=torch.float64)


class _TopKSampler(LogitsProcessor):
    """Top-k sampling as ROME's `generate_fast` does it (softmax, keep the k largest, renormalise, draw), with
    each row's draw taken from its own uniforms by inverse CDF; the chosen token is all `generate` may pick."""

    def __init__(self, uniforms: torch.Tensor, top_k: int, start: int):
        self.uniforms, self.top_k, self.start = uniforms, top_k, start  # uniforms: (batch, steps)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.start
        top = torch.softmax(scores.float(), dim=-1).topk(self.top_k, dim=-1)
        cdf = (top.values / top.values.sum(-1, keepdim=True)).cumsum(-1).double()  # (batch, k)
        u = self.uniforms[:, step].to(cdf.device)
        choice = (cdf <= u[:, None]).sum(-1).clamp(max=self.top_k - 1)
        token = top.indices.gather(1, choice[:, None])
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


@torch.no_grad()
def sampled_texts(model: nn.Module, tokenizer, prompts: list[str], max_length: int = 100, top_k: int = 5,
                  seed: int = 0, batch_size: int = 32) -> list[str]:
    """ROME's fluency generations: prompt + top-k sampled tokens up to `max_length` tokens in all.

    As in ROME's `generate_fast` (max_out_len=100): the length counts the prompt's tokens, the generation does not
    stop at an end-of-text token, and the text returned is the whole decoded row (prompt included), NFKD-normalised
    with blank lines turned into spaces.
    """
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    encoded = [encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    out: list[str | None] = [None] * len(prompts)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo:lo + batch_size]
        budgets = [max(0, max_length - len(encoded[i])) for i in chunk]
        steps = max(budgets)
        new: list[list[int]] = [[] for _ in chunk]
        if steps:
            ids, mask = _left_padded([encoded[i] for i in chunk], pad, device)
            uniforms = torch.stack([prompt_uniforms(prompts[i], seed, steps) for i in chunk])
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=0,
                                 do_sample=False, pad_token_id=pad, eos_token_id=None,
                                 logits_processor=LogitsProcessorList([_TopKSampler(uniforms, top_k, ids.shape[1])]))
            new = [g[ids.shape[1]:ids.shape[1] + b].tolist() for g, b in zip(gen, budgets)]
        for i, tokens in zip(chunk, new):
            text = tokenizer.decode(encoded[i] + tokens, skip_special_tokens=True)
            out[i] = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    return out
