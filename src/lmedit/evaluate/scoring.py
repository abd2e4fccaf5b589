"""Teacher-forced scoring of (prompt, target) pairs: per-token log-probabilities and top-1 tokens.

The scorer owns tokenization and padding, so batching never changes a number:
- a target is placed after its prompt by `join_prompt_target` and tokenized with `encode` /
  `encode_continuation`, exactly as the editors do;
- the model input is prompt ids + target ids[:-1]; rows are RIGHT-padded with an attention mask, so each
  real token keeps its position and (causally) never sees a pad;
- the unembedding runs only at the target positions, and log_softmax is taken in float32;
- identical pairs are scored once; pairs are sorted by length before batching (less padding) and the
  results come back in the caller's order.
`batch_size=1` is the one-at-a-time reference path: it gives the same numbers to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lmedit.errors import InputError
from lmedit.locate.batching import body, unembed
from lmedit.locate.prompts import encode, with_target

Pair = tuple[str, str]


@dataclass(frozen=True)
class PairScore:
    """One pair's teacher-forced result: per target token, its log-prob, and the model's argmax there."""

    target_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top1: tuple[int, ...]


def score_pairs(model: nn.Module, tokenizer, pairs: list[Pair], batch_size: int = 64,
                progress: bool = False) -> list[PairScore]:
    """Score every (prompt, target) pair; the result is in the order of `pairs`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    pairs = [(p, t) for p, t in pairs]
    unique = list(dict.fromkeys(pairs))  # dedup, first-seen order
    if not unique:
        return []
    prompt_ids: dict[str, list[int]] = {}
    rows = []
    for prompt, target in unique:
        if not isinstance(prompt, str) or not isinstance(target, str):
            raise InputError(f"a scored pair must be two strings, got ({prompt!r}, {target!r})")
        if prompt not in prompt_ids:
            ids = encode(tokenizer, prompt)
            if not ids:
                raise InputError(f"prompt {prompt!r} tokenizes to nothing: there is no position to predict from")
            prompt_ids[prompt] = ids
        rows.append(with_target(prompt_ids[prompt], tokenizer, prompt, target))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[PairScore | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(rows), desc="scoring", unit="pair", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for lo in range(0, len(order), batch_size):
                chunk = order[lo:lo + batch_size]
                width = max(len(rows[i].ids) for i in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                row_index, pos_index, tgt = [], [], []
                for r, i in enumerate(chunk):
                    s = rows[i]
                    ids[r, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
                    mask[r, : len(s.ids)] = 1
                    row_index += [r] * len(s.target_ids)
                    pos_index += s.target_positions
                    tgt += s.target_ids
                hidden = body(model)(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
                rsel = torch.tensor(row_index, device=device)
                psel = torch.tensor(pos_index, device=device)
                logits = unembed(model, hidden[rsel, psel]).float()
                logp = torch.log_softmax(logits, dim=-1)
                tgt_t = torch.tensor(tgt, device=device)
                tok_logp = logp.gather(1, tgt_t[:, None])[:, 0].cpu().tolist()
                top1 = logits.argmax(dim=-1).cpu().tolist()
                k = 0
                for i in chunk:
                    n = len(rows[i].target_ids)
                    results[i] = PairScore(tuple(rows[i].target_ids), tuple(tok_logp[k:k + n]), tuple(top1[k:k + n]))
                    k += n
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    by_pair = dict(zip(unique, results))
    return [by_pair[p] for p in pairs]


def continuation_logprobs(model: nn.Module, tokenizer, pairs: list[Pair], batch_size: int = 64,
                          progress: bool = False) -> list[list[float]]:
    """Per pair, the log-probability of each target token given the prompt and the target tokens before it."""
    return [list(s.logprobs) for s in score_pairs(model, tokenizer, pairs, batch_size, progress)]


def sum_logprob(model: nn.Module, tokenizer, pairs: list[Pair], batch_size: int = 64,
                progress: bool = False) -> list[float]:
    """Per pair, the log-probability of the whole target (the sum over its tokens)."""
    return [float(sum(s.logprobs)) for s in score_pairs(model, tokenizer, pairs, batch_size, progress)]


def top1_tokens(model: nn.Module, tokenizer, pairs: list[Pair], batch_size: int = 64,
                progress: bool = False) -> list[list[int]]:
    """Per pair, the model's argmax token at each target position (teacher-forced)."""
    return [list(s.top1) for s in score_pairs(model, tokenizer, pairs, batch_size, progress)]


def top1_match(model: nn.Module, tokenizer, pairs: list[Pair], batch_size: int = 64,
               progress: bool = False) -> list[list[bool]]:
    """Per pair, whether the argmax at each target position is the target token (zsRE token accuracy)."""
    return [[a == t for a, t in zip(s.top1, s.target_ids)]
            for s in score_pairs(model, tokenizer, pairs, batch_size, progress)]
