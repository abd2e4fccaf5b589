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
from transformers import DynamicCache

from lmedit.errors import InputError
from lmedit.locate.batching import SplitBatch, body, inference, right_pad, unembed
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
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[PairScore | None] = [None] * len(rows)
    # Rows of one prompt sit together, so a batch runs each prompt once (its KV cache shared by its targets).
    order = sorted(range(len(rows)), key=lambda i: (len(unique[i][0]), unique[i][0], len(rows[i].ids)))
    with inference(model), tqdm(total=len(rows), desc="scoring", unit="pair", disable=not progress,
                                leave=False) as bar:
        for lo in range(0, len(order), batch_size):
            chunk = order[lo:lo + batch_size]
            logp_rows, top1_rows = _score_chunk(model, [rows[i] for i in chunk],
                                                [unique[i][0] for i in chunk], pad_id, device)
            for i, lp, t1 in zip(chunk, logp_rows, top1_rows):
                results[i] = PairScore(tuple(rows[i].target_ids), tuple(lp), tuple(t1))
            bar.update(len(chunk))
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


def _score_chunk(model: nn.Module, chunk: list, prompts: list[str], pad_id: int, device):
    """Per-token log-probs and argmaxes of the targets of `chunk` (Scored rows).

    Each distinct prompt (all but its last token) runs once, left-padded, into a KV cache; every row then runs
    only [last prompt token] + target[:-1], right-padded, on its prompt's cache. Position ids follow the real
    tokens, so the numbers equal a plain forward of prompt + target.
    """
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) == len(chunk):  # nothing shared: one plain right-padded pass is cheaper
        ids, mask = right_pad([s.ids for s in chunk], pad_id, device)
        hidden = body(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        return _gather(model, chunk, hidden, [s.first_target_pos for s in chunk], device)
    which = torch.tensor([distinct.index(p) for p in prompts], device=device)
    heads = {}
    for s, p in zip(chunk, prompts):
        heads.setdefault(p, s.ids[: s.first_target_pos])  # the prompt without its last token
    prefix = SplitBatch.build([heads[p] for p in distinct], [len(heads[p]) for p in distinct], pad_id, device)
    suffix = SplitBatch.build([s.ids[s.first_target_pos:] for s in chunk], [0] * len(chunk), pad_id, device)
    kv = None
    if prefix.prefix_ids.shape[1] > 0:
        out = body(model)(input_ids=prefix.prefix_ids, attention_mask=prefix.prefix_mask,
                          position_ids=(prefix.prefix_mask.cumsum(1) - 1).clamp(min=0),
                          past_key_values=DynamicCache(), use_cache=True)
        kv = DynamicCache(ddp_cache_data=[(layer.keys[which], layer.values[which]) for layer in out.past_key_values.layers])
    prefix_mask = prefix.prefix_mask[which]
    positions = prefix_mask.sum(1, keepdim=True) + torch.arange(suffix.suffix_ids.shape[1], device=device)
    hidden = body(model)(input_ids=suffix.suffix_ids, attention_mask=torch.cat([prefix_mask, suffix.suffix_mask], 1),
                         position_ids=positions, past_key_values=kv, use_cache=kv is not None).last_hidden_state
    return _gather(model, chunk, hidden, [0] * len(chunk), device)


def _gather(model: nn.Module, chunk: list, hidden: torch.Tensor, first: list[int], device):
    """Log-probs and argmaxes at the target positions; row r's first target is predicted at column first[r]."""
    row_index = [r for r, s in enumerate(chunk) for _ in s.target_ids]
    pos_index = [f + j for f, s in zip(first, chunk) for j in range(len(s.target_ids))]
    logits = unembed(model, hidden[torch.tensor(row_index, device=device), torch.tensor(pos_index, device=device)])
    logits = logits.float()
    targets = torch.tensor([t for s in chunk for t in s.target_ids], device=device)
    tok_logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0].cpu().tolist()
    top1 = logits.argmax(dim=-1).cpu().tolist()
    out_lp, out_top, k = [], [], 0
    for s in chunk:
        n = len(s.target_ids)
        out_lp.append(tok_logp[k:k + n])
        out_top.append(top1[k:k + n])
        k += n
    return out_lp, out_top
