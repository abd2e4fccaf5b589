"""k*: the key at the last subject token — the input of W at a layer — averaged over context templates.

Also reads the current output of W at the edit point (z), which layer spreading needs after each update.
"""

from __future__ import annotations

import torch
from torch import nn

from lmedit.locate.batching import right_pad
from lmedit.locate.prompts import subject_last_token
from lmedit.models.arch import mlp_out_module
from lmedit.models.hooks import capture_io, run_until_stop
from lmedit.requests import EditRequest


@torch.no_grad()
def read_at_subject(model: nn.Module, tokenizer, requests: list[EditRequest], templates: list[str],
                    key_layers: list[int], out_layer: int | None = None, chunk: int = 128):
    """Keys at `key_layers` averaged over templates, (n, d_in) each; and, if `out_layer` is given, the output
    of W at `out_layer` on the bare prompt (n, d_out). One forward per chunk, stopped after the last layer read."""
    texts, owners = [], []
    for i, req in enumerate(requests):
        for t in templates:
            texts.append(t.replace("{}", req.prompt))
            owners.append(i)
    encoded = [subject_last_token(tokenizer, text, req_subject)
               for text, req_subject in zip(texts, [requests[o].subject for o in owners])]
    layers = sorted(set(key_layers) | ({out_layer} if out_layer is not None else set()))
    modules = {str(l): mlp_out_module(model, l) for l in layers}
    device = next(modules[str(layers[0])].parameters()).device
    keys = {l: [] for l in key_layers}
    outs = []
    for lo in range(0, len(texts), chunk):
        part = encoded[lo:lo + chunk]
        ids, mask = right_pad([e[0] for e in part], tokenizer.pad_token_id, device)  # right padding
        where = torch.tensor([e[1] for e in part], device=device)
        rows = torch.arange(len(part), device=device)
        with capture_io(modules, inputs=True, outputs=True, stop_after=str(layers[-1])) as store:
            run_until_stop(lambda: model(input_ids=ids, attention_mask=mask))
        for l in key_layers:
            keys[l].append(store[str(l)]["input"][rows, where].float())
        if out_layer is not None:
            outs.append(store[str(out_layer)]["output"][rows, where].float())
    owner_t = torch.tensor(owners, device=device)
    n, T = len(requests), len(templates)
    mean_keys = {}
    for l in key_layers:
        k = torch.cat(keys[l])
        mean_keys[l] = torch.zeros(n, k.shape[1], device=device).index_add_(0, owner_t, k) / T
    z = None
    if out_layer is not None:
        z = torch.cat(outs)[torch.arange(n, device=device) * T]  # template 0 is the bare prompt "{}"
    return mean_keys, z
