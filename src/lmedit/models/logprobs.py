"""Teacher-forced log-probabilities: the one implementation every scorer and every loss of lmedit uses.

log P(y_j | y_<j) is taken from the unembedded hidden state at the position before y_j, with log_softmax in
float32 whatever the model's dtype, and only at the positions that are read (the unembedding is the largest
matrix of a small model: a 49k-token vocabulary times every position would dominate the cost). Rows are
right-padded with an attention mask, so every real token keeps its position and never sees a pad, and batching
changes no number beyond float32 rounding. Everything here is differentiable when grad is enabled; callers
that only score wrap it in `forward.inference`.

Built on it: the CounterFact/zsRE scorer (evaluate/scoring.py, which adds KV-cache sharing of one prompt's
targets), the canonical-examples suffix scores and losses (evaluate/canonical.py), the general-text loss
(forward.token_nll), the fine-tuning losses (editors/finetune.py) and the `ft` prefix term of the canonical
protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from lmedit.errors import InputError
from lmedit.models.forward import DEFAULT_MAX_TOKENS, body, inference, max_positions, right_pad, unembed
from lmedit.models.tokens import encode

CHUNK = 1024  # positions unembedded at once: bounds the (positions × vocabulary) float32 logits in memory


def pad_id(tokenizer) -> int:
    """The id right-padding uses (masked out, so any id works): the tokenizer's pad token, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n,) log P(targets[i]) under logits[i] (n, vocab), in `dtype` (float32; v* and UltraEdit work in their
    own precision, float64 in the oracle tests)."""
    return torch.log_softmax(logits.to(dtype), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def hidden_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """(n,) log P(targets[i]) from final hidden states (n, d), unembedded `chunk` positions at a time."""
    parts = [token_logprobs(unembed(model, hidden[lo:lo + chunk]), targets[lo:lo + chunk])
             for lo in range(0, hidden.shape[0], chunk)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


@dataclass(frozen=True)
class Predicted:
    """Per predicted token of a batch of rows: its log-probability, its row and its target id (flat, row order)."""

    logprobs: torch.Tensor  # (n,) float32
    rows: torch.Tensor  # (n,) long
    targets: torch.Tensor  # (n,) long

    def row_sums(self, n_rows: int) -> torch.Tensor:
        """(n_rows,) summed log-probability of each row's predicted tokens."""
        return torch.zeros(n_rows, dtype=self.logprobs.dtype, device=self.logprobs.device).index_add(
            0, self.rows, self.logprobs)


def predicted_logprobs(model: nn.Module, inputs: Sequence[Sequence[int]], first: Sequence[int],
                       targets: Sequence[Sequence[int]], pad: int, chunk: int = CHUNK) -> Predicted:
    """One right-padded forward of `inputs`; row r predicts targets[r][j] at position first[r] + j.

    The suffix of a (prefix, suffix) pair: inputs = prefix + suffix[:-1], first = len(prefix) − 1, targets =
    suffix. A whole text: inputs = ids, first = 0, targets = ids[1:]."""
    device = next(model.parameters()).device
    ids, mask = right_pad([list(r) for r in inputs], pad, device)
    hidden = body(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = [r for r, t in enumerate(targets) for _ in t]
    positions = [f + j for f, t in zip(first, targets) for j in range(len(t))]
    rsel = torch.tensor(rows, dtype=torch.long, device=device)
    tsel = torch.tensor([x for t in targets for x in t], dtype=torch.long, device=device)
    h = hidden[rsel, torch.tensor(positions, dtype=torch.long, device=device)]
    return Predicted(hidden_logprobs(model, h, tsel, chunk), rsel, tsel)


# ---------------------------------------------------------------- distributions and KL to the unedited model

def log_distributions(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(b, t, vocab) float32 log-probabilities of the next token at every position of right-padded `ids`."""
    return torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), dim=-1)


def kl_to_reference(ref: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor,
                    per: str = "token") -> torch.Tensor:
    """KL(p₀ ‖ p_θ) = Σ_v p₀ (log p₀ − log p_θ) at every real position, with p₀'s log-probabilities `ref` taken
    before training. per="token": the mean over real positions (the fine-tuning editors); per="sequence": summed
    over each sequence's real positions, then the mean over sequences (the canonical-examples reference code's
    `kl_div(..., reduction="batchmean")`, which lmedit restricts to real positions)."""
    kl = (ref.exp() * (ref - logp)).sum(-1) * mask  # (b, t)
    if per == "token":
        return kl.sum() / mask.sum()
    return kl.sum() / kl.shape[0]


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
    pad = pad_id(tokenizer)
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
                total -= float(token_logprobs(unembed(model, h[c:c + chunk]), targets[c:c + chunk]).sum())
            count += int(sel.sum().item())
    return total, count


def token_loss(model: nn.Module, tokenizer, texts: Sequence[str], max_tokens: int | None = DEFAULT_MAX_TOKENS,
               batch_size: int = 16) -> float:
    """Per-token loss (mean NLL over every predicted token of `texts`)."""
    total, count = token_nll(model, tokenizer, texts, max_tokens, batch_size)
    return total / count
