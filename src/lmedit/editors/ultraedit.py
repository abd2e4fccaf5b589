"""UltraEdit (Gu et al. 2025): training-free lifelong editing, one forward and backward pass per batch.

No v* optimisation and no statistics of general text. For each edit layer l, one pass over the batch's prompts
with their targets gives, at every position that predicts a target token, the key k (the input of W_l) and the
gradient g of the target loss at W_l's output. A lifelong normalisation (running mean and standard deviation of
[k, g], carried over the whole sequence, one per weight shape as in the reference code) standardises them:
k̂, ĝ. The wanted change of W_l's output at each position is v = −η ‖k̂‖² ĝ (the output change a gradient step on
W_l would make, in normalised units), and ΔW_l is the ridge regression of those changes on the raw keys:

    ΔW_l = Vᵀ K (KᵀK + I)⁻¹        (K: tokens × d_in, V: tokens × d_out)

computed with the same least-squares solver as MEMIT (C = I, λ = ridge). All layers' updates come from the one
pass on the model as it is before the batch.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from lmedit import __version__
from lmedit.carried import CarriedState
from lmedit.editors.registry import register_editor
from lmedit.errors import EditFailure, InputError
from lmedit.locate.prompts import encode, with_target
from lmedit.locate.solvers import least_squares
from lmedit.models.arch import arch_for, check_edit_layers, mlp_out_dims, mlp_out_module, mlp_out_name
from lmedit.models.forward import body, frozen_weights, right_pad, unembed
from lmedit.models.logprobs import token_logprobs
from lmedit.patches import Delta, Patch, fingerprint
from lmedit.settings import check_settings, integer, layer_list, number

EPS = float(torch.finfo(torch.float32).eps)  # the reference normaliser's ε (it works in float32)


@dataclass
class UltraEditConfig:
    """Knobs of UltraEdit; per-model layers come from `editors.defaults`."""

    layers: tuple[int, ...] = layer_list((4,))  # the MLP output projections W_l to edit
    lr: float = number(3e-4, gt=0)  # η: the step the pseudo-values take, v = −η ‖k̂‖² ĝ (SmolLM2: measured)
    ridge: float = number(1.0, gt=0)  # the I in (KᵀK + I)⁻¹ (the reference code's identity)
    chunk_requests: int = integer(32, ge=1)  # requests per forward/backward: memory only

    def __post_init__(self) -> None:
        check_settings(self)

    def validate(self, model) -> None:
        check_settings(self)
        check_edit_layers(model, self.layers)


class RunningMoments:
    """Running mean and variance of feature rows (Chan et al.'s parallel update), as the reference's normaliser:
    std = sqrt(M2 / (n − 1)), x̂ = (x − mean) / (std + ε)."""

    def __init__(self, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
        self.n, self.mean, self.m2 = n, mean, m2

    @classmethod
    def empty(cls, width: int) -> "RunningMoments":
        z = torch.zeros(width, dtype=torch.float64)
        return cls(torch.zeros((), dtype=torch.float64), z, z.clone())

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        m = x.shape[0]
        n = self.n + m
        delta = x.mean(0) - self.mean
        self.m2 = self.m2 + ((x - x.mean(0)) ** 2).sum(0) + delta ** 2 * self.n * m / n
        self.mean = self.mean + delta * m / n
        self.n = n

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        std = (self.m2 / (self.n - 1 + EPS)).sqrt()
        return (x.double() - self.mean) / (std + EPS)


def _shape_key(model, l: int) -> str:
    d_out, d_in = mlp_out_dims(model, l)
    return f"{d_out}x{d_in}"


def _normalisers(state: CarriedState | None, model, layers) -> dict[str, RunningMoments]:
    out = {}
    for l in layers:
        key = _shape_key(model, l)
        if key in out:
            continue
        d_out, d_in = mlp_out_dims(model, l)
        if state is not None and f"normaliser.{key}.mean" in state.tensors:
            t = state.tensors
            out[key] = RunningMoments(t[f"normaliser.{key}.n"].double(), t[f"normaliser.{key}.mean"].double(),
                                      t[f"normaliser.{key}.m2"].double())
        else:
            out[key] = RunningMoments.empty(d_in + d_out)
    return out


def keys_and_gradients(model, tokenizer, requests, layers, chunk_requests: int = 32):
    """Per edit layer: K (tokens × d_in), the inputs of W_l, and G (tokens × d_out), the gradient of the batch's
    mean target NLL at W_l's output, at every position that predicts a target token (the reference's 'ans')."""
    rows = [with_target(encode(tokenizer, r.prompt), tokenizer, r.prompt, r.target_new) for r in requests]
    n_targets = sum(len(s.target_ids) for s in rows)
    modules = {l: mlp_out_module(model, l) for l in layers}
    device = next(modules[layers[0]].parameters()).device
    keys = {l: [] for l in layers}
    grads = {l: [] for l in layers}
    for lo in range(0, len(rows), chunk_requests):
        part = rows[lo:lo + chunk_requests]
        ids, mask = right_pad([s.ids for s in part], tokenizer.pad_token_id, device)
        row = torch.tensor([i for i, s in enumerate(part) for _ in s.target_ids], device=device)
        pos = torch.tensor([p for s in part for p in s.target_positions], device=device)
        tok = torch.tensor([t for s in part for t in s.target_ids], device=device)
        outputs, handles = {}, []

        def grad_from(module, args):  # nothing below the lowest edit layer needs a gradient
            return (args[0].detach().requires_grad_(True),) + tuple(args[1:])

        def record(l):
            def hook(module, args, output):
                keys[l].append(args[0][row, pos].detach().double())
                output.retain_grad()
                outputs[l] = output
            return hook

        handles.append(modules[layers[0]].register_forward_pre_hook(grad_from))
        handles += [modules[l].register_forward_hook(record(l)) for l in layers]
        try:
            with torch.enable_grad():
                hidden = body(model)(input_ids=ids, attention_mask=mask).last_hidden_state
                logp = token_logprobs(unembed(model, hidden[row, pos]), tok, torch.float64)
                nll = -logp.sum() / n_targets  # the batch's mean, over every chunk
                nll.backward()
        finally:
            for h in handles:
                h.remove()
        for l in layers:
            grads[l].append(outputs[l].grad[row, pos].double())
    return {l: torch.cat(keys[l]) for l in layers}, {l: torch.cat(grads[l]) for l in layers}


def edit(model, tokenizer, requests, config: UltraEditConfig, progress: bool = True, announce=print,
         state: CarriedState | None = None) -> Patch:
    """The batch's ΔW for every edit layer as a Patch (the model is left as it was). `state`, when given, carries
    the lifelong normalisation: it is updated in place, so pass it only when the patch returned is kept."""
    config.validate(model)
    if not requests:
        raise InputError("no edit requests given")
    for i, r in enumerate(requests):
        r.validate(f"request {i}")
    t0 = time.perf_counter()
    layers = list(config.layers)
    names = [f"{mlp_out_name(model, l)}.weight" for l in layers]
    base = fingerprint(model, names)
    with frozen_weights(model):  # only the activations at W_l's outputs need gradients
        K, G = keys_and_gradients(model, tokenizer, requests, layers, config.chunk_requests)
    normalisers = _normalisers(state, model, layers)
    for l in layers:  # the batch joins the running statistics before it is normalised (the reference's order)
        normalisers[_shape_key(model, l)].update(torch.cat([K[l], G[l]], 1))
    transposed = arch_for(model).transposed
    deltas = {}
    for l, name in zip(layers, names):
        d_out, d_in = mlp_out_dims(model, l)
        z = normalisers[_shape_key(model, l)].normalise(torch.cat([K[l], G[l]], 1))
        k_hat, g_hat = z[:, :d_in], z[:, d_in:]
        V = -config.lr * (k_hat ** 2).sum(1, keepdim=True) * g_hat  # (tokens, d_out): wanted output changes
        left, right = least_squares(K[l].T, V.T, torch.eye(d_in, dtype=torch.float64, device=K[l].device),
                                    config.ridge)  # ΔW = Vᵀ K (KᵀK + ridge·I)⁻¹ = left @ right, (out, in)
        if not (torch.isfinite(left).all() and torch.isfinite(right).all()):
            raise EditFailure(f"UltraEdit's update at layer {l} is not finite")
        dtype = mlp_out_module(model, l).weight.dtype
        left, right = left.to(dtype), right.to(dtype)
        deltas[name] = Delta(left=right.T.contiguous(), right=left.T.contiguous()) if transposed else \
            Delta(left=left.contiguous(), right=right.contiguous())
    if state is not None:
        for key, moments in normalisers.items():
            state.tensors.update({f"normaliser.{key}.n": moments.n, f"normaliser.{key}.mean": moments.mean,
                                  f"normaliser.{key}.m2": moments.m2})
        state.n_edits += len(requests)
    meta = {"method": "ultraedit", "config": asdict(config), "requests": [r.to_dict() for r in requests],
            "base_fingerprint": base, "lmedit_version": __version__, "model_type": model.config.model_type,
            "timing": {"stats_seconds": 0.0, "edit_seconds": time.perf_counter() - t0},
            "ultraedit": {"target_tokens": int(K[layers[0]].shape[0]),
                          "edits_normalised_before": (state.n_edits - len(requests)) if state is not None else 0}}
    return Patch(deltas, meta)


register_editor("ultraedit", UltraEditConfig, edit, "lifelong, training-free: one pass per batch, ridge update",
                carries_state=True, needs_subject=False)
