"""Locate-then-edit: one core for ROME, MEMIT and EMMET (the methods differ only in configuration).

1. v* at the last edit layer L (batched over requests, values.py; reused when a ValueStore is passed), at
   the site the config names: the residual stream after block L (MEMIT, EMMET) or W_L's output (ROME).
2. For each edit layer l in order: keys K at l and z = the hidden state h_L at the last subject token of the
   bare prompt, both re-read with the earlier layers' updates in place (so z contains what they wrote into
   the residual), share R = (Z* − Z) / (layers left) mapped to W_l's output space (sites.py), ΔW_l from the
   solver, applied.
3. Everything applied is reverted before returning: the model leaves as it came; the result is a Patch.

AlphaEdit is the same loop with the null-space solver: each ΔW_l is projected onto the directions general-text
keys do not use (P_l, from C_l), and a carried state (lmedit.carried) holds the keys of the edits made so far in a
sequence, so a later batch does not overwrite them; the state is updated with this batch's keys, read with every
layer's update in place, as the reference code does after each batch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from lmedit import __version__
from lmedit.carried import CarriedState
from lmedit.errors import InputError
from lmedit.locate.context import context_templates
from lmedit.locate.keys import KEY_AVERAGES, read_at_subject, working_precision
from lmedit.locate.solvers import equality_constrained, least_squares, null_space_constrained, \
    null_space_projection
from lmedit.locate.value_store import ValueStore, find_values
from lmedit.locate.values import ValueConfig
from lmedit.locate.sites import residual_to_weight_space
from lmedit.models.arch import arch_for, check_edit_layers, mlp_out_module, mlp_out_name, mlp_out_norm_module
from lmedit.patches import Delta, Patch, fingerprint
from lmedit.requests import EditRequest
from lmedit.settings import check_settings, choice, flag, integer, layer_list, number
from lmedit.stats.moments import load_or_compute
from lmedit.stats.sampling import ALL, Sample

SOLVERS = ("least_squares", "equality", "null_space")


@dataclass
class LocateConfig:
    """Knobs shared by ROME, MEMIT and EMMET. Per-model defaults come from `editors.defaults`."""

    layers: tuple[int, ...] = layer_list((4,))  # the MLP output projections to edit; v* is found at the last
    solver: Literal["least_squares", "equality", "null_space"] = choice("least_squares", SOLVERS)
    mom2_weight: float = number(15000.0, ge=0)  # λ: how strongly C (general-text keys) is preserved
    mu: float = number(0.0, ge=0)  # equality solver: ridge on KᵀC⁻¹K (EMMET needs > 0 for large batches)
    # null-space solver (AlphaEdit): eigen-directions of C below this (absolute) eigenvalue are the ones edited
    null_space_threshold: float = number(2e-2, gt=0)
    l2: float = number(10.0, gt=0)  # null-space solver: α, the ridge on ΔW (the reference code's L2)
    carry_edited_keys: bool = flag(True)  # null-space solver in a sequence: protect the keys of earlier edits
    identity_cov: bool = flag(False)  # use C = I instead of statistics (must be asked for; recorded in the patch)
    stats_corpus: str = "wiki"  # corpus for C: 'wiki', a text/JSONL file, or hf:NAME
    stats_unit: str = "tokens"  # what stats_n counts: 'documents' or 'tokens' (checked by stats.sampling.Sample)
    # how many, or 'all' (the whole corpus); text so that --set stats_n=all works
    stats_n: int | str = integer("100000", ge=1, words=(ALL,), text=True)
    stats_max_length: int = integer(1024, ge=1)  # tokens kept at the start of each document (bounded by the context)
    stats_seed: int = integer(1, ge=0)  # the shuffle the documents are drawn in (1: the reference code's)
    stats_tokens: int | None = integer(None, ge=1, none=True)  # old spelling of stats_unit=tokens, stats_n=N; wins
    n_context: int = integer(5, ge=0)  # random model-written prefixes for k* and v* (plus the bare prompt)
    key_average: str = choice("by_kind", KEY_AVERAGES)  # k*: bare prompt ½, prefixed ones ½ (MEMIT); "uniform" (ROME)
    context_length: int = integer(10, ge=1)  # tokens per prefix
    seed: int = integer(0, ge=0)
    value: ValueConfig = field(default_factory=ValueConfig)

    def __post_init__(self) -> None:
        check_settings(self)  # each field's range, as declared above (lmedit.settings)
        Sample.from_config(self)  # stats_unit, and the stats_* settings together, as the statistics read them

    def validate(self, model) -> None:
        check_settings(self)  # again: the config may have been changed since it was made
        if not arch_for(model).kv_cache:  # v* runs its suffixes on the context prefixes' cached keys/values
            raise InputError(f"ROME, MEMIT and EMMET need a model with a KV cache; {arch_for(model).model_type} "
                             "has none (edit it with ft, ft-conditional, lora or, for a Backpack, senses)")
        check_edit_layers(model, self.layers)
        if self.value.site == "mlp_out" and len(self.layers) > 1:
            raise InputError("value.site=mlp_out reads z at W's output, which misses what earlier edit layers write "
                             "into the residual stream; spread over several layers with value.site=residual")
        if self.solver == "null_space" and self.identity_cov:
            raise InputError("the null-space solver projects onto the directions C does not use; with C = I "
                             "(identity_cov) there are none; drop identity_cov")
        if self.solver == "least_squares" and self.mom2_weight == 0:
            raise InputError("mom2_weight (λ) must be positive for the least-squares solver")


def _weight_dtype(model, layer: int) -> torch.dtype:
    return mlp_out_module(model, layer).weight.dtype


def _reached(v0: torch.Tensor, z_star: torch.Tensor, z_after: torch.Tensor) -> list[float]:
    """Per request, how much of the way from z to z* the whole edit went: 1 − ‖z* − z_after‖ / ‖z* − z‖."""
    want = (z_star - working_precision(v0)).norm(dim=1)
    left = (z_star - z_after).norm(dim=1)
    return [round(float(x), 6) for x in 1 - left / want.clamp(min=1e-12)]


def _projections(covs, layers: list[int], threshold: float, derived: dict | None) -> dict[int, torch.Tensor]:
    """P_l for each edit layer (an eigendecomposition of C_l: computed once per sequence, in `derived`); a
    threshold that keeps no direction is refused before any work is done."""
    out = {}
    for l in layers:
        key = ("null_space_projection", l, threshold, covs.description)
        P = derived[key] if derived is not None and key in derived else null_space_projection(covs[l], threshold)
        if derived is not None:
            derived[key] = P
        if float(P.trace()) < 0.5:  # rank 0
            smallest = float(torch.linalg.eigvalsh(covs[l].double())[0])
            raise InputError(f"null_space_threshold={threshold:g} keeps no direction of C at layer {l} (its smallest "
                             f"eigenvalue is {smallest:.3g}); nothing was edited; raise the threshold")
        out[l] = P
    return out


def _edited_gram(state: CarriedState | None, l: int, d_in: int) -> torch.Tensor | None:
    if state is None:
        return None
    return state.tensors.get(f"edited_keys.{l}", torch.zeros(d_in, d_in, dtype=torch.float64))


def locate_then_edit(model, tokenizer, requests: list[EditRequest], config: LocateConfig, method: str,
                     progress: bool = True, announce=print, state: CarriedState | None = None,
                     values: ValueStore | None = None) -> Patch:
    """Compute the edit for `requests` as a Patch; the model is left exactly as it was.

    `state`: the carried state of a sequence of null-space edits (AlphaEdit). Its edited keys enter the solve and
    are updated in place with this batch's, so pass it only when the patch returned is kept (applied for good).
    `values`: a store of v* already optimised for these requests on this model state (None: compute them)."""
    config.validate(model)
    if not requests:
        raise InputError("no edit requests given")
    for i, r in enumerate(requests):
        r.validate(f"request {i}")
    timing = {}
    t0 = time.perf_counter()
    layers = list(config.layers)
    if config.identity_cov:
        covs = None
    else:
        covs = load_or_compute(model, tokenizer, layers, config.stats_corpus, config,
                               progress=progress, announce=announce)
    timing["stats_seconds"] = time.perf_counter() - t0
    projections = _projections(covs, layers, config.null_space_threshold, state.derived if state is not None else None) \
        if config.solver == "null_space" else {}
    if not config.carry_edited_keys:
        state = None

    t0 = time.perf_counter()
    templates = context_templates(model, tokenizer, config.n_context, config.context_length, config.seed)
    L = layers[-1]
    found = find_values(values, model, tokenizer, requests, L, templates, config.value,
                        progress=progress and len(requests) > 1)
    timing["values_seconds"] = time.perf_counter() - t0
    z_star = working_precision(found.v_star)  # (n, d): z* at the site of layer L, bare prompt
    site = config.value.site

    t0 = time.perf_counter()
    names = [f"{mlp_out_name(model, l)}.weight" for l in layers]
    base = fingerprint(model, names)
    transposed = arch_for(model).transposed
    deltas: dict[str, Delta] = {}
    applied = []
    try:
        for i, l in enumerate(layers):
            # Keys at l and z at L, re-read with the earlier layers' updates in place: z then contains what
            # they wrote into the residual stream, so the share below is of what is really left.
            reads = {"z": (L, site)}
            if site == "residual" and mlp_out_norm_module(model, l) is not None:
                reads["m"] = (l, "mlp_out")  # W_l's own output, to map the share through the post-MLP norm
            keys, outs = read_at_subject(model, tokenizer, requests, templates, [l], reads,
                                         key_average=config.key_average)
            K = keys[l].T  # (d_in, n)
            r = (z_star - outs["z"]) / (len(layers) - i)  # (n, d): this layer's share of z* − z
            if "m" in outs:
                r = residual_to_weight_space(model, l, outs["m"], r)
            R = r.T  # (d_out, n): the change of W_l's output the solver aims at
            C = covs[l] if covs is not None else torch.eye(K.shape[0], dtype=torch.float64, device=K.device)
            C = C.to(K.device)
            if config.solver == "least_squares":
                left, right = least_squares(K, R, C, config.mom2_weight)
            elif config.solver == "null_space":
                left, right = null_space_constrained(K, R, projections[l].to(K.device),
                                                     _edited_gram(state, l, K.shape[0]), config.l2)
            else:
                left, right = equality_constrained(K, R, C, config.mom2_weight, config.mu)
            left, right = left.to(_weight_dtype(model, l)), right.to(_weight_dtype(model, l))  # ΔW = left @ right, (out, in)
            delta = Delta(left=right.T.contiguous(), right=left.T.contiguous()) if transposed else \
                Delta(left=left.contiguous(), right=right.contiguous())
            deltas[names[i]] = delta
            applied.append(Patch({names[i]: delta}, {}).apply(model, force=True))  # being computed: not a file
        keys_after, outs = read_at_subject(model, tokenizer, requests, templates, layers if state is not None else [],
                                           {"z": (L, site)}, key_average=config.key_average)
        reached = _reached(found.v0, z_star, outs["z"])
        if state is not None:  # the keys of this batch, every layer edited, join those the next batch protects
            for l in layers:
                K = keys_after[l].T.double().cpu()
                state.tensors[f"edited_keys.{l}"] = _edited_gram(state, l, K.shape[0]) + K @ K.T
            state.n_edits += len(requests)
    finally:
        for handle in reversed(applied):
            handle.revert()
    timing["solve_seconds"] = time.perf_counter() - t0

    meta = {
        "method": method,
        "config": asdict(config),
        "requests": [r.to_dict() for r in requests],
        "base_fingerprint": base,
        "lmedit_version": __version__,
        "model_type": model.config.model_type,
        "covariance": "identity (asked for)" if config.identity_cov else
                      f"second moment over {covs.description}",
        "timing": timing,
        **({"null_space": {"threshold": config.null_space_threshold, "directions_kept":
                           {str(l): round(float(P.trace())) for l, P in projections.items()},
                           "edits_protected_before": (state.n_edits - len(requests)) if state is not None else 0}}
           if projections else {}),
        "v_star": {"target_prob": found.target_prob.tolist(), "steps": found.steps.tolist(), "site": site,
                   "z_reached": reached},
    }
    return Patch(deltas, meta)
