"""k*: the key at the last subject token — the input of W at a layer — averaged over context templates.

Two averages, as the two reference codes take them: "uniform" gives every template the same weight (ROME's
compute_u); "by_kind" averages the bare prompt and the model-prefixed prompts as two kinds, each half of
k* (MEMIT's compute_ks: the bare prompt weighs 1/2, each of N prefixed ones 1/(2N)).

Also reads, on the bare prompt, the outputs layer spreading needs after each update: the hidden state h_L at
the output of block L (z, where MEMIT's residual is measured) and W's own output (mapped through a post-MLP
norm, sites.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lmedit.errors import InputError
from lmedit.models.forward import right_pad
from lmedit.locate.prompts import subject_last_token
from lmedit.locate.sites import site_module
from lmedit.models.hooks import capture_io, run_until_stop
from lmedit.requests import EditRequest

Site = tuple[int, str]  # (layer, "residual" | "mlp_out")
KEY_AVERAGES = ("by_kind", "uniform")


def template_weights(templates: list[str], key_average: str) -> torch.Tensor:
    """The weight of each template in k* (they sum to 1); templates[0] is the bare prompt "{}"."""
    if key_average not in KEY_AVERAGES:
        raise InputError(f"unknown key_average {key_average!r}; choose one of: {', '.join(KEY_AVERAGES)}")
    T = len(templates)
    if key_average == "uniform" or T == 1:
        return torch.full((T,), 1.0 / T, dtype=torch.float64)
    return torch.tensor([0.5] + [0.5 / (T - 1)] * (T - 1), dtype=torch.float64)


def _order(site: Site) -> tuple[int, int]:
    """Forward order of the modules read: by layer, and W before the end of its block."""
    return site[0], 0 if site[1] == "mlp_out" else 1


@torch.no_grad()
def read_at_subject(model: nn.Module, tokenizer, requests: list[EditRequest], templates: list[str],
                    key_layers: list[int], bare_outputs: dict[str, Site] | None = None, chunk: int = 128,
                    key_average: str = "uniform"):
    """(keys, outputs): keys at `key_layers` averaged over templates (`key_average`), (n, d_in) each; and for each named
    (layer, site) in `bare_outputs`, that module's output on the bare prompt (n, d). One forward per chunk,
    stopped after the last module read. Without key layers only the bare prompts run."""
    bare_outputs = bare_outputs or {}
    if not key_layers:
        templates = ["{}"]
    texts, owners = [], []
    for i, req in enumerate(requests):
        for t in templates:
            texts.append(t.replace("{}", req.prompt))
            owners.append(i)
    encoded = [subject_last_token(tokenizer, text, requests[o].subject) for text, o in zip(texts, owners)]
    reads: dict[str, Site] = {f"key{l}": (l, "mlp_out") for l in key_layers}
    reads.update(bare_outputs)
    where_read = {name: f"{l}:{site}" for name, (l, site) in reads.items()}  # one hook per module read
    modules = {where_read[name]: site_module(model, l, site) for name, (l, site) in reads.items()}
    last = where_read[max(reads, key=lambda name: _order(reads[name]))]
    device = next(modules[last].parameters()).device
    keys = {l: [] for l in key_layers}
    outs = {name: [] for name in bare_outputs}
    for lo in range(0, len(texts), chunk):
        part = encoded[lo:lo + chunk]
        ids, mask = right_pad([e[0] for e in part], tokenizer.pad_token_id, device)  # right padding
        where = torch.tensor([e[1] for e in part], device=device)
        rows = torch.arange(len(part), device=device)
        with capture_io(modules, inputs=True, outputs=True, stop_after=last) as store:
            run_until_stop(lambda: model(input_ids=ids, attention_mask=mask))
        for l in key_layers:
            keys[l].append(store[where_read[f"key{l}"]]["input"][rows, where])
        for name in bare_outputs:
            outs[name].append(store[where_read[name]]["output"][rows, where])
    owner_t = torch.tensor(owners, device=device)
    n, T = len(requests), len(templates)
    weights = template_weights(templates, key_average).to(device)
    mean_keys = {}
    for l in key_layers:
        k = working_precision(torch.cat(keys[l]))
        w = weights.to(k.dtype).repeat(n)[:, None]  # rows are (request, template) in that order
        mean_keys[l] = torch.zeros(n, k.shape[1], dtype=k.dtype, device=device).index_add_(0, owner_t, w * k)
    bare = torch.arange(n, device=device) * T  # template 0 is the bare prompt "{}"
    return mean_keys, {name: working_precision(torch.cat(o))[bare] for name, o in outs.items()}


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least (16-bit activations are widened); a float64 model stays float64, so the oracle tests
    can compare ΔW to 1e-6."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def working_precision(x: torch.Tensor) -> torch.Tensor:
    return x.to(working_dtype(x.dtype))
