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
from lmedit.locate.prompts import Scored, encode, with_target
from lmedit.models.arch import arch_for
from lmedit.models.logprobs import pad_id, token_logprobs

Pair = tuple[str, str]


@dataclass(frozen=True)
class PairScore:
    """One pair's teacher-forced result: per target token, its log-prob, and the model's argmax there."""

    target_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top1: tuple[int, ...]


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")


def score_pairs(model: nn.Module, tokenizer, pairs: list[Pair], batch_size: int = 64,
                progress: bool = False) -> list[PairScore]:
    """Score every (prompt, target) pair; the result is in the order of `pairs`."""
    check_batch_size(batch_size)
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
    results = score_rows(model, tokenizer, rows, batch_size, progress)
    by_pair = dict(zip(unique, results))
    return [by_pair[p] for p in pairs]


def score_rows(model: nn.Module, tokenizer, rows: list[Scored], batch_size: int = 64,
               progress: bool = False) -> list[PairScore]:
    """Score encoded rows (prompt ids + target ids[:-1]); rows with the same prompt ids share its forward pass."""
    check_batch_size(batch_size)
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    heads = [tuple(r.ids[: r.first_target_pos + 1]) for r in rows]
    results: list[PairScore | None] = [None] * len(rows)
    # Rows of one prompt sit together, so a batch runs each prompt once (its KV cache shared by its targets).
    order = sorted(range(len(rows)), key=lambda i: (len(heads[i]), heads[i], len(rows[i].ids)))
    with inference(model), tqdm(total=len(rows), desc="scoring", unit="pair", disable=not progress,
                                leave=False) as bar:
        for lo in range(0, len(order), batch_size):
            chunk = order[lo:lo + batch_size]
            logp_rows, top1_rows = _score_chunk(model, [rows[i] for i in chunk], [heads[i] for i in chunk],
                                                pad, device)
            for i, lp, t1 in zip(chunk, logp_rows, top1_rows):
                results[i] = PairScore(tuple(rows[i].target_ids), tuple(lp), tuple(t1))
            bar.update(len(chunk))
    return results


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


def _score_chunk(model: nn.Module, chunk: list, prompts: list[tuple[int, ...]], pad: int, device):
    """Per-token log-probs and argmaxes of the targets of `chunk` (Scored rows); `prompts` holds each row's
    whole prompt ids (`score_rows`), so equal tuples are one prompt.

    Each distinct prompt runs once, whole and left-padded, into a KV cache; its last position predicts the first
    token of every target of that prompt. Only targets of two tokens or more run again: target[:-1], right-padded,
    on their prompt's cache. Position ids follow the real tokens, so the numbers equal a plain forward of
    prompt + target, and a prompt with k one-token targets costs one pass of its own tokens instead of k.
    """
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) == len(chunk) or not arch_for(model).kv_cache:  # nothing shared (or no cache): one plain
        # right-padded pass
        ids, mask = right_pad([s.ids for s in chunk], pad, device)
        hidden = body(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        at = [(r, s.first_target_pos + j) for r, s in enumerate(chunk) for j in range(len(s.target_ids))]
        return _gather(model, chunk, hidden[tuple(torch.tensor(c, device=device) for c in zip(*at))], device)
    slot = {p: i for i, p in enumerate(distinct)}
    which = [slot[p] for p in prompts]
    longer = [r for r, s in enumerate(chunk) if len(s.target_ids) > 1]
    prefix = SplitBatch.build([list(p) for p in distinct], [len(p) for p in distinct], pad, device)
    out = body(model)(input_ids=prefix.prefix_ids, attention_mask=prefix.prefix_mask,
                      position_ids=(prefix.prefix_mask.cumsum(1) - 1).clamp(min=0),
                      past_key_values=DynamicCache() if longer else None, use_cache=bool(longer))
    flat = [out.last_hidden_state[:, -1]]  # (distinct, d): left-padded, so the last column is each prompt's end
    rest_at: dict[int, int] = {}
    if longer:
        take = torch.tensor([which[r] for r in longer], device=device)
        kv = DynamicCache(ddp_cache_data=[(layer.keys[take], layer.values[take])
                                          for layer in out.past_key_values.layers])
        suffix = SplitBatch.build([chunk[r].ids[chunk[r].first_target_pos + 1:] for r in longer], [0] * len(longer),
                                  pad, device)
        prefix_mask = prefix.prefix_mask[take]
        width = suffix.suffix_ids.shape[1]
        positions = prefix_mask.sum(1, keepdim=True) + torch.arange(width, device=device)
        rest = body(model)(input_ids=suffix.suffix_ids, attention_mask=torch.cat([prefix_mask, suffix.suffix_mask], 1),
                           position_ids=positions, past_key_values=kv, use_cache=True).last_hidden_state
        flat.append(rest.reshape(-1, rest.shape[-1]))
        rest_at = {r: len(distinct) + k * width for k, r in enumerate(longer)}
    # target token j of row r: j = 0 from its prompt's last position, j ≥ 1 from column j − 1 of its suffix row
    index = [which[r] if j == 0 else rest_at[r] + j - 1 for r, s in enumerate(chunk) for j in range(len(s.target_ids))]
    return _gather(model, chunk, torch.cat(flat)[torch.tensor(index, device=device)], device)


def _gather(model: nn.Module, chunk: list, hidden: torch.Tensor, device):
    """Log-probs and argmaxes of the targets of `chunk` from `hidden`: one row per target token, in chunk order."""
    logits = unembed(model, hidden)
    logits = logits.float()
    targets = torch.tensor([t for s in chunk for t in s.target_ids], device=device)
    tok_logp = token_logprobs(logits, targets).cpu().tolist()
    top1 = logits.argmax(dim=-1).cpu().tolist()
    out_lp, out_top, k = [], [], 0
    for s in chunk:
        n = len(s.target_ids)
        out_lp.append(tok_logp[k:k + n])
        out_top.append(top1[k:k + n])
        k += n
    return out_lp, out_top
