"""Generation fluency (ROME §4): weighted n-gram entropy of greedy continuations.

entropy = mean_n( w_n · H(n-gram frequencies) ), n ∈ {2, 3}, w = (2/3, 4/3), H in bits over word n-grams.
A model that repeats itself after an edit ("Rome Rome Rome ...") scores low.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch
from torch import nn

from lmedit.locate.prompts import encode

_WORDS = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    words = _WORDS.findall(text.lower())
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)


@torch.no_grad()
def greedy_continuations(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                         batch_size: int = 32) -> list[str]:
    """Greedy continuations, batched with LEFT padding (so every row generates from its own last token)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[str] = []
    for lo in range(0, len(prompts), batch_size):
        rows = [encode(tokenizer, p) for p in prompts[lo:lo + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        out += [tokenizer.decode(g[width:], skip_special_tokens=True) for g in gen]
    return out


def fluency(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[float]:
    texts = greedy_continuations(model, tokenizer, prompts, max_new_tokens)
    return [ngram_entropy(p + t) for p, t in zip(prompts, texts)]
