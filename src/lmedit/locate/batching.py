"""Run many (prefix, suffix) rows through the model with the frozen prefix computed once.

Why: in v* optimisation δ is added at the last subject token, so every token before it is unaffected by δ.
Those prefixes (context + start of prompt, ~3/4 of all tokens) run once with a KV cache; each optimisation step
then runs only the short suffixes. The prefix is left-padded and the suffix right-padded so every row's split
point sits at the same column; position ids follow the real tokens, so results equal a plain forward.

The same holds in depth: δ enters at layer L, so the suffixes' hidden states below L never change either.
With `frozen_layers=L` the first pass over each row records the input of layer L, and later passes replay it:
layers 0..L−1 are swapped for a module that returns the recorded states (L/n_layers of every step saved).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from lmedit.models.arch import arch_for, get_module
from lmedit.models.forward import body, inference, right_pad, unembed  # noqa: F401  (also used from here)


@dataclass
class SplitBatch:
    prefix_ids: torch.Tensor  # (rows, P) left-padded
    prefix_mask: torch.Tensor  # (rows, P)
    suffix_ids: torch.Tensor  # (rows, S) right-padded; column 0 is each row's split token
    suffix_mask: torch.Tensor  # (rows, S)

    @classmethod
    def build(cls, rows: list[list[int]], splits: list[int], pad_id: int, device) -> "SplitBatch":
        P = max(splits)
        S = max(len(ids) - s for ids, s in zip(rows, splits))
        n = len(rows)
        prefix_ids = torch.full((n, P), pad_id, dtype=torch.long)
        prefix_mask = torch.zeros((n, P), dtype=torch.long)
        suffix_ids = torch.full((n, S), pad_id, dtype=torch.long)
        suffix_mask = torch.zeros((n, S), dtype=torch.long)
        for i, (ids, s) in enumerate(zip(rows, splits)):
            if s:
                prefix_ids[i, P - s:] = torch.tensor(ids[:s])
                prefix_mask[i, P - s:] = 1
            rest = ids[s:]
            suffix_ids[i, : len(rest)] = torch.tensor(rest)
            suffix_mask[i, : len(rest)] = 1
        return cls(prefix_ids.to(device), prefix_mask.to(device), suffix_ids.to(device), suffix_mask.to(device))


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns recorded hidden states, in the layer's own output form."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_module(model, arch_for(model).layers)


class PrefixCache:
    """The frozen prefixes' keys/values, computed once; `forward` runs any subset of rows' suffixes.

    frozen_layers=L: the caller promises nothing below layer L changes between calls (v*: δ enters at L)."""

    def __init__(self, model: nn.Module, batch: SplitBatch, chunk: int = 256, frozen_layers: int = 0):
        self.model = model
        self.batch = batch
        self.frozen_layers = frozen_layers
        self.frozen_input: torch.Tensor | None = None  # (rows, S, d): input of layer `frozen_layers`
        self.recorded = torch.zeros(batch.suffix_ids.shape[0], dtype=torch.bool, device=batch.suffix_ids.device)
        self.tuple_output = False  # whether the decoder layers return tuples (GPT-J) rather than tensors
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if batch.prefix_ids.shape[1] == 0:
            return
        parts = []
        with torch.no_grad():
            for lo in range(0, batch.prefix_ids.shape[0], chunk):
                ids, mask = batch.prefix_ids[lo:lo + chunk], batch.prefix_mask[lo:lo + chunk]
                # A plain DynamicCache keeps every prefix key: sliding-window cache layers would drop keys and
                # break the alignment with the [prefix, suffix] mask (the mask itself still applies the window).
                out = body(model)(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                                  past_key_values=DynamicCache(), use_cache=True)
                parts.append([(layer.keys, layer.values) for layer in out.past_key_values.layers])
        self.kv = [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts]))
                   for i in range(len(parts[0]))]

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Final hidden states (rows, S', d) of the suffixes of `rows` (a LongTensor of row indices).

        S' is the longest suffix among `rows`, not the whole batch's: the right padding beyond it is never run
        (causal attention: no real token sees a later column, so trimming it changes nothing)."""
        b = self.batch
        width = int(b.suffix_mask[rows].sum(1).max())
        prefix_mask, suffix_mask = b.prefix_mask[rows], b.suffix_mask[rows, :width]
        positions = prefix_mask.sum(1, keepdim=True) + torch.arange(width, device=rows.device)
        cache = None
        if self.kv is not None:
            cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in self.kv])

        def run():
            return body(self.model)(input_ids=b.suffix_ids[rows, :width],
                                    attention_mask=torch.cat([prefix_mask, suffix_mask], 1),
                                    position_ids=positions, past_key_values=cache,
                                    use_cache=cache is not None).last_hidden_state

        if not self.frozen_layers:
            return run()
        if bool(self.recorded[rows].all()):
            # columns a row never had (recorded in a narrower group) replay as zeros: padding, never read
            with self._replaying(self.frozen_input[rows, :width]):
                return run()
        with self._recording(rows, width):
            return run()

    @contextmanager
    def _recording(self, rows: torch.Tensor, width: int):
        layers = _decoder_layers(self.model)

        def record_input(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.frozen_input is None:
                n, S = self.batch.suffix_ids.shape
                self.frozen_input = hidden.new_zeros((n, S, hidden.shape[-1]))
            self.frozen_input[rows, :width] = hidden.detach()
            self.recorded[rows] = True

        def record_form(module, args, output):
            self.tuple_output = isinstance(output, tuple)

        handles = [layers[self.frozen_layers].register_forward_pre_hook(record_input, with_kwargs=True),
                   layers[self.frozen_layers - 1].register_forward_hook(record_form)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def _replaying(self, hidden: torch.Tensor):
        layers = _decoder_layers(self.model)
        originals = [layers[i] for i in range(self.frozen_layers)]
        replay = _Replay(hidden, self.tuple_output)
        try:
            for i in range(self.frozen_layers):
                layers[i] = replay
            yield
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp(min=0)
