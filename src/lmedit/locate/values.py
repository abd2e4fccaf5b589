"""v*: the value that makes the model say target_new, found by optimising a residual δ (ROME §3.1, MEMIT §4.2).

For request i, δ_i is added at the edit point of layer L — the output of block L, i.e. the residual stream
(MEMIT, EMMET: site "residual"), or the output of W, the MLP output projection (ROME: site "mlp_out"; see
sites.py) — at the last subject token, for the bare prompt and each random-prefixed variant. We minimise

    L(δ_i) = mean_prompts −log P(target_new | prompt; δ_i) / |target|
             + kl_factor · KL(P(· | "{subject} is a") ‖ P(· | "{subject} is a"; δ_i))
             + weight_decay · ‖δ_i‖² / ‖v0_i‖²

with Adam, clamping ‖δ_i‖ ≤ clamp_norm_factor · ‖v0_i‖ (v0_i: the original output at the site, bare prompt),
and v*_i = v0_i + δ_i.

All requests share one optimisation: rows of every request go through the model together, the frozen
prefixes once (see batching.py). Adam is element-wise, so a stacked δ is exactly n separate optimisations;
a request that reaches the early-stop loss leaves the batch, as it would stop alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lmedit.errors import EditFailure
from lmedit.locate.batching import PrefixCache, SplitBatch, unembed
from lmedit.locate.keys import working_dtype
from lmedit.locate.prompts import subject_last_token, with_target
from lmedit.locate.sites import SITES, check_site, site_module
from lmedit.models.arch import mlp_out_dims, mlp_out_module
from lmedit.models.forward import frozen_weights
from lmedit.models.logprobs import token_logprobs
from lmedit.models.hooks import edit_output
from lmedit.requests import EditRequest
from lmedit.settings import check_settings, choice, integer, number


@dataclass(frozen=True)
class ValueConfig:
    """The v* optimisation's knobs; each field declares what it accepts (lmedit.settings), checked on creation."""

    lr: float = number(0.5, gt=0)  # Adam step size on δ (ROME/MEMIT use 0.5)
    # at most this many loss evaluations; the last only measures, so at most steps − 1 Adam updates (ROME's
    # v_num_grad_steps): below 2, δ stays 0 and the edit does nothing
    steps: int = integer(25, ge=2)
    kl_factor: float = number(0.0625, ge=0)  # keeps "{subject} is a" close to the original: its essence survives
    weight_decay: float = number(1e-3, ge=0)  # on ‖δ‖²/‖v0‖²
    clamp_norm_factor: float = number(4.0, gt=0)  # ‖δ‖ ≤ factor · ‖v0‖ (0 would clamp δ to nothing)
    early_stop_loss: float = number(5e-2, ge=0)  # a request stops once its loss is below this (P(target) ≈ 0.95)
    chunk_requests: int = integer(32, ge=1)  # requests per forward/backward (gradients accumulate): memory only
    site: str = choice("residual", SITES)  # where δ is added: the residual stream after block L (MEMIT) or W's output

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass
class Values:
    v0: torch.Tensor  # (n, d) original output at the edit point (the site), bare prompt
    delta: torch.Tensor  # (n, d) optimised δ
    target_prob: torch.Tensor  # (n,) mean P(target_new) over prompts at the end
    steps: torch.Tensor  # (n,) steps each request took

    @property
    def v_star(self) -> torch.Tensor:
        return self.v0 + self.delta


def _rows(tokenizer, requests: list[EditRequest], templates: list[str]):
    """One row per (request, template) to rewrite, plus one KL row per request."""
    rows, splits, owner, kinds, targets = [], [], [], [], []
    for i, req in enumerate(requests):
        for t in templates:
            text = t.replace("{}", req.prompt)
            ids, last = subject_last_token(tokenizer, text, req.subject)
            scored = with_target(ids, tokenizer, text, req.target_new)
            rows.append(scored.ids), splits.append(last), owner.append(i), kinds.append("rewrite")
            targets.append((scored.target_positions, scored.target_ids))
        text = f"{req.subject} is a"
        ids, last = subject_last_token(tokenizer, text, req.subject)
        rows.append(ids), splits.append(last), owner.append(i), kinds.append("kl")
        targets.append(([len(ids) - 1], []))
    return rows, splits, owner, kinds, targets


def compute_values(model: nn.Module, tokenizer, requests: list[EditRequest], layer: int,
                   templates: list[str], config: ValueConfig = ValueConfig(), progress: bool = True,
                   cache_prefix: bool = True, replay_layers: bool = True) -> Values:
    """Batched v* for all requests at `layer` (δ added to the output of the site's module there), with every weight
    frozen for the duration (only δ needs a gradient).

    cache_prefix=False runs every full prompt through every layer at every step, as the reference
    implementations do (kept for the benchmark and the equivalence test); True runs the frozen prefixes once
    and, at each step, only the suffixes from `layer` up (batching.PrefixCache); replay_layers=False runs the
    suffixes through every layer (for the benchmark)."""
    with frozen_weights(model):
        return _compute_values(model, tokenizer, requests, layer, templates, config, progress, cache_prefix,
                               replay_layers)


def _compute_values(model, tokenizer, requests, layer, templates, config, progress, cache_prefix,
                    replay_layers) -> Values:
    W = mlp_out_module(model, layer)
    edit_point = site_module(model, layer, check_site(config.site))  # δ is added to this module's output
    device = next(W.parameters()).device
    dtype = W.weight.dtype
    work = working_dtype(dtype)
    rows, subject_last, owner, kinds, targets = _rows(tokenizer, requests, templates)
    splits = subject_last if cache_prefix else [0] * len(rows)
    # column of the suffix where δ is added: the last subject token
    delta_col = torch.tensor([last - split for last, split in zip(subject_last, splits)], device=device)
    batch = SplitBatch.build(rows, splits, tokenizer.pad_token_id, device)
    cache = PrefixCache(model, batch, frozen_layers=layer if cache_prefix and replay_layers else 0)  # δ enters at L
    n, n_rows = len(requests), len(rows)
    owner_t = torch.tensor(owner, device=device)
    is_kl = torch.tensor([k == "kl" for k in kinds], device=device)
    is_bare = torch.tensor([k == "rewrite" and templates[r % (len(templates) + 1)] == "{}" for r, k in enumerate(kinds)],
                           device=device)
    n_rewrite = torch.zeros(n, device=device, dtype=work).index_add_(0, owner_t[~is_kl], torch.ones(int((~is_kl).sum()), device=device, dtype=work))

    # Gather indices for the target tokens of rewrite rows: (row, suffix position, token id).
    tgt_row, tgt_pos, tgt_tok = [], [], []
    for r, (positions, ids) in enumerate(targets):
        for p, t in zip(positions, ids):
            tgt_row.append(r), tgt_pos.append(p - splits[r]), tgt_tok.append(t)
    tgt_row = torch.tensor(tgt_row, device=device)
    tgt_pos = torch.tensor(tgt_pos, device=device)
    tgt_tok = torch.tensor(tgt_tok, device=device)
    tgt_len = torch.zeros(n_rows, device=device, dtype=work).index_add_(0, tgt_row, torch.ones(len(tgt_row), device=device, dtype=work))
    kl_rows = torch.nonzero(is_kl).flatten()
    kl_pos = torch.tensor([targets[r][0][0] - splits[r] for r in kl_rows.tolist()], device=device)

    d = mlp_out_dims(model, layer)[0]  # W's output and the residual stream have the same width
    delta = torch.zeros(n, d, device=device, dtype=work, requires_grad=True)
    active = torch.ones(n, dtype=torch.bool, device=device)
    v0 = torch.zeros(n, d, device=device, dtype=work)
    steps_taken = torch.zeros(n, dtype=torch.long)
    target_prob = torch.zeros(n, dtype=work)
    row_delta = {"rows": None}

    def add_delta(out):  # out: (rows, S, d); δ goes to each row's last subject token
        rows_now = row_delta["rows"]
        if rows_now is None:
            return out
        out = out.clone()
        at = torch.arange(len(rows_now), device=device), delta_col[rows_now]
        out[at] = out[at] + delta[owner_t[rows_now]].to(out.dtype)
        return out

    def capture_v0(out):  # the initial pass: v0 of the bare-prompt rows among the rows being run
        rows_now = row_delta["rows_v0"]
        bare = torch.nonzero(is_bare[rows_now]).flatten()
        v0[owner_t[rows_now[bare]]] = out[bare, delta_col[rows_now[bare]]].to(work)
        return out

    def loss_terms(rows_now: torch.Tensor, kl_init: torch.Tensor | None):
        hidden = cache.forward(rows_now)  # (rows, S, d)
        local = torch.full((n_rows,), -1, dtype=torch.long, device=device)
        local[rows_now] = torch.arange(len(rows_now), device=device)
        keep = local[tgt_row] >= 0
        tok_logp = token_logprobs(unembed(model, hidden[local[tgt_row[keep]], tgt_pos[keep]]), tgt_tok[keep], work)
        # per-row mean NLL of the target tokens, then mean over each request's rewrite rows
        row_nll = torch.zeros(n_rows, device=device, dtype=work).index_add_(0, tgt_row[keep], -tok_logp) / tgt_len.clamp(min=1)
        nll = torch.zeros(n, device=device, dtype=work).index_add_(0, owner_t[~is_kl], row_nll[~is_kl]) / n_rewrite
        prob = torch.zeros(n, device=device, dtype=work).index_add_(0, owner_t[~is_kl], torch.zeros(n_rows, device=device, dtype=work)
                                                        .index_add_(0, tgt_row[keep], tok_logp)[~is_kl].exp()) / n_rewrite
        kl_active = kl_rows[local[kl_rows] >= 0]
        kl_logp = unembed(model, hidden[local[kl_active], kl_pos[local[kl_rows] >= 0]]).to(work).log_softmax(-1)
        kl = torch.zeros(n, device=device, dtype=work)
        if kl_init is not None:
            init = kl_init[owner_t[kl_active]]
            kl = kl.index_add(0, owner_t[kl_active], (init.exp() * (init - kl_logp)).sum(-1))
        return nll, kl, prob, kl_logp

    all_rows = torch.arange(n_rows, device=device)
    # Requests go into chunks in order of their longest suffix, so a chunk runs only as wide as its own rows
    # (PrefixCache.forward): about a third fewer token columns per step on CounterFact, almost half on zsRE.
    suffix_len = batch.suffix_mask.sum(1)
    longest = torch.zeros(n, dtype=torch.long, device=device).scatter_reduce_(0, owner_t, suffix_len, "amax")
    by_length = torch.sort(longest, stable=True).indices

    def chunks(requests_mask: torch.Tensor):
        """Row sets of at most `chunk_requests` requests: memory stays flat however many edits are batched."""
        ids = by_length[requests_mask[by_length]]
        for lo in range(0, len(ids), config.chunk_requests):
            part = torch.zeros(n, dtype=torch.bool, device=device)
            part[ids[lo:lo + config.chunk_requests]] = True
            yield part, all_rows[part[owner_t]]

    kl_init = None
    with torch.no_grad(), edit_output(edit_point, capture_v0):
        for _, rows_now in chunks(torch.ones(n, dtype=torch.bool, device=device)):
            row_delta["rows_v0"] = rows_now
            _, _, _, kl_logp = loss_terms(rows_now, None)
            if kl_init is None:
                kl_init = torch.zeros(n, kl_logp.shape[-1], device=device, dtype=work)
            kl_rows_now = rows_now[is_kl[rows_now]]
            kl_init[owner_t[kl_rows_now]] = kl_logp
    max_norm = config.clamp_norm_factor * v0.norm(dim=1)

    opt = torch.optim.Adam([delta], lr=config.lr)
    bar = tqdm(range(config.steps), desc=f"v* ({n} requests, layer {layer})", disable=not progress, leave=False)
    for step in bar:
        opt.zero_grad()
        still = torch.zeros_like(active)
        losses = []
        for part, rows_now in chunks(active):
            row_delta["rows"] = rows_now
            with edit_output(edit_point, add_delta):
                nll, kl, prob, _ = loss_terms(rows_now, kl_init)
            wd = config.weight_decay * delta.norm(dim=1) ** 2 / v0.norm(dim=1).clamp(min=1e-8) ** 2
            loss = nll + config.kl_factor * kl + wd  # (n,); only this chunk's entries are used
            if not torch.isfinite(loss[part]).all():
                raise EditFailure("v* optimisation produced a non-finite loss; try a smaller value.lr")
            target_prob[part.cpu()] = prob.detach().cpu()[part.cpu()]
            steps_taken[part.cpu()] = step
            losses.append(loss.detach()[part])
            go_on = part & (loss.detach() >= config.early_stop_loss) if step < config.steps - 1 else part & False
            if go_on.any():
                loss[go_on].sum().backward()  # each δ_i depends only on its own rows: chunked = whole
            still |= go_on
        bar.set_postfix(active=int(still.sum()), loss=f"{torch.cat(losses).mean().item():.3f}")
        active = still
        if not still.any():
            break
        frozen = delta.detach()[~still].clone()
        opt.step()
        with torch.no_grad():
            delta[~still] = frozen
            norms = delta.norm(dim=1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
            delta.mul_(scale[:, None])
    row_delta["rows"] = None
    return Values(v0=v0.to(dtype), delta=delta.detach().to(dtype), target_prob=target_prob, steps=steps_taken + 1)
