"""Random context prefixes written by the model itself, so k* and v* hold in many contexts (ROME §3.1).

Generated once per (model, seed, n, length) and cached as JSON under the lmedit cache.
"""

from __future__ import annotations

import hashlib
import json

import torch

from lmedit.fileio import atomic_write_json
from lmedit.models.loading import cache_dir

SEED_WORDS = ["The", "Therefore", "Because", "I", "You"]


def _cache_key(model, n: int, length: int, seed: int) -> str:
    cfg = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    first = next(model.parameters()).detach().flatten()[:4096].cpu().float().numpy().tobytes()
    return hashlib.sha256(cfg.encode() + first + f"{n}/{length}/{seed}".encode()).hexdigest()[:16]


@torch.no_grad()
def context_templates(model, tokenizer, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
    """["{}"] + n templates "<generated text>. {}" (top-k sampling from the model, seeded)."""
    if n == 0:
        return ["{}"]
    path = cache_dir() / "contexts" / f"{_cache_key(model, n, length, seed)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    templates = ["{}"]
    for i in range(n):
        ids = tokenizer(SEED_WORDS[i % len(SEED_WORDS)], add_special_tokens=True, return_tensors="pt")["input_ids"]
        ids = ids.to(device)
        for _ in range(length - 1):
            logits = model(input_ids=ids).logits[0, -1].float().cpu()
            top = logits.topk(5)
            pick = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=generator)]
            ids = torch.cat([ids, pick.to(device).view(1, 1)], dim=1)
        text = tokenizer.decode(ids[0], skip_special_tokens=True)
        text = text.replace("{", " ").replace("}", " ").replace("\n", " ").strip()
        templates.append(text + ". {}")
    atomic_write_json(path, templates)
    return templates
