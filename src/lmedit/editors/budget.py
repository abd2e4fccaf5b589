"""The fine-tuning loop's degradation budget (DESIGN §5, §8): what it measures and keeps, apart from the loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lmedit.degradation_budget import loss_within
from lmedit.patches import fingerprint

if TYPE_CHECKING:
    from lmedit.editors.train_config import TrainConfig


_LOSS_BEFORE: dict[tuple, float] = {}  # (hash of every weight, corpus, docs, tokens) → loss


class Budget:
    """The degradation budget (DESIGN §5, §8; the rule is lmedit.degradation_budget's): per-token loss on general
    text may rise by at most a factor 1 + ε.
    Measured before training and after every epoch; the weights of the last epoch within it are kept."""

    def __init__(self, model, tokenizer, config: TrainConfig, params: dict[str, nn.Parameter]):
        from lmedit.stats.corpora import get_corpus

        self.model, self.tokenizer, self.config, self.params = model, tokenizer, config, params
        self.texts = list(get_corpus(config.budget_corpus).documents[:config.budget_docs])
        # Single editing starts every edit from the same W₀: its loss before training is measured once.
        key = (fingerprint(model, [n for n, _ in model.named_parameters()]), config.budget_corpus,
               config.budget_docs, config.budget_tokens)
        if key not in _LOSS_BEFORE:
            while len(_LOSS_BEFORE) >= 8:
                _LOSS_BEFORE.pop(next(iter(_LOSS_BEFORE)))
            _LOSS_BEFORE[key] = self.measure()
        self.losses = [_LOSS_BEFORE[key]]
        self.limit = (1 + config.budget) * self.losses[0]
        self.kept = self.snapshot()

    def measure(self) -> float:
        from lmedit.models.logprobs import token_loss

        return token_loss(self.model, self.tokenizer, self.texts, self.config.budget_tokens)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def within_after_epoch(self) -> bool:
        """Measure; keep these weights if within budget, else put back the last kept ones."""
        self.losses.append(self.measure())
        if loss_within(self.losses[-1], self.losses[0], self.config.budget, strict=False):
            self.kept = self.snapshot()
            return True
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.kept[n])
        return False
