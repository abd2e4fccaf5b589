"""A large model steered by the edit of a small Backpack (Hewitt et al. 2024, §6; DESIGN §6).

    logits = logits_big + w · (log_softmax(edited Backpack) − log_softmax(original Backpack))

The Backpack's edit (its sense deltas, `models.backpack.SenseEdits`) is carried over to the large model as the
change it makes to the Backpack's log-probabilities, scaled by w. With no sense edits attached the difference is
exactly zero, so the unedited ensemble IS the large model: same logits, same baseline. Both models must share a
tokenizer (a Backpack trained with the large model's tokenizer, as DESIGN §6 asks).

The ensemble presents itself to lmedit as one more architecture (`lmedit-ensemble` in the table): its `body`
returns the ensemble logits as its "hidden state" and its unembedding is the identity, so every evaluation
(scoring, degradation, canonical losses) runs on it unchanged. How w is chosen per league, after the Backpack is
trained alone, is evaluate/canonical_ensemble.py (the paper's protocol).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from lmedit.errors import InputError
from lmedit.models.arch import arch_for

MODEL_TYPE = "lmedit-ensemble"


class EnsembleConfig(PretrainedConfig):
    model_type = MODEL_TYPE


def _max_positions(model: nn.Module) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if isinstance(value, int):
            return value
    return None


class _Body(nn.Module):
    """The ensemble's logits, shaped as a body output (last_hidden_state) for lmedit's evaluations."""

    def __init__(self, owner: EnsembleLM):
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **_) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self._owner[0].logits(input_ids, attention_mask, position_ids))


class EnsembleLM(nn.Module):
    """`big` (any lmedit model) plus `w` × the log-probability change of `backpack_lm` (a BackpackForCausalLM)."""

    def __init__(self, big: nn.Module, backpack_lm: nn.Module, weight: float = 1.0):
        super().__init__()
        from lmedit.models.backpack import MODEL_TYPE as BACKPACK

        if arch_for(backpack_lm).model_type != BACKPACK:
            raise InputError(f"the ensemble's small model must be a Backpack, not {arch_for(backpack_lm).model_type}")
        v_big, v_small = big.get_output_embeddings().weight.shape[0], backpack_lm.config.vocab_size
        if v_big != v_small:
            raise InputError(f"the two models do not share a vocabulary ({v_big} vs {v_small} tokens): train the "
                             "Backpack with the large model's tokenizer")
        self.big, self.backpack_lm = big, backpack_lm
        limits = [p for p in (_max_positions(big), _max_positions(backpack_lm)) if p is not None]
        self.config = EnsembleConfig(vocab_size=v_big, max_position_embeddings=min(limits) if limits else None)
        self.w = weight
        self.ensemble = _Body(self)
        self.head = nn.Identity()

    @property
    def w(self) -> float:
        return self._w

    @w.setter
    def w(self, value: float) -> None:
        if not (isinstance(value, (int, float)) and value >= 0 and value == value and value != float("inf")):
            raise InputError(f"the ensemble weight w must be a finite number >= 0, got {value!r}")
        self._w = float(value)

    def logits(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        big = self.big(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits.float()
        backpack = self.backpack_lm.backpack
        if not len(backpack.sense_edits) or self._w == 0:
            return big
        edited = self.backpack_lm(input_ids, attention_mask=attention_mask).logits.float().log_softmax(-1)
        with backpack.without_sense_edits(), torch.no_grad():
            original = self.backpack_lm(input_ids, attention_mask=attention_mask).logits.float().log_softmax(-1)
        return big + self._w * (edited - original)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_) -> CausalLMOutput:
        return CausalLMOutput(logits=self.logits(input_ids, attention_mask, position_ids))
