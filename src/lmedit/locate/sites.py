"""Where v* lives, and how a change of the residual stream becomes a change of W's output.

Two sites (DESIGN §3):
- "mlp_out": δ is added to the output of W at the edit layer L (ROME): v* is a value of W itself, and the
  residual a solver meets is v* − W k.
- "residual": δ is added to the hidden state at the output of block L (MEMIT, EMMET): the residual stream,
  which also carries what the earlier edited layers wrote, so layer spreading can measure what is left.

In most families W_l writes into the residual directly, so a residual change r IS the change of W_l's output.
Gemma-2/3 put an RMSNorm N after the MLP: the block adds N(W k) = g ⊙ W k / rms(W k). Whatever W's output m,
the block adds a point of the ellipsoid {s g ⊙ x : ‖x‖ = 1} (s = ‖m‖ / rms(m), which is √d up to the norm's ε):
editing W can turn that output but not lengthen it. A share r is therefore mapped to the W output m′ of
unchanged length whose normed output is the point of that ellipsoid nearest to the target t = N(m) + r:

    x = argmin over ‖x‖ = 1 of ‖s g ⊙ x − t‖,    m′ = ‖m‖ · x,    target change of W's output = m′ − m

(a trust-region problem with a diagonal matrix: x_i = G_i t_i / (G_i² + ν) with G = s g and the ν ≥ −min G_i²
that makes ‖x‖ = 1, found by bisection). N(m′) = t exactly when t is reachable. Gains of exactly zero (Gemma 3
270M, dequantised, has them at layers 1, 3 and 4) are coordinates the output cannot show: they take whatever
length x needs and nothing else, where dividing by g would give NaN. What a layer cannot reach is still in the
residual when the next layer re-measures it; the patch records how much of z* − z was reached.
"""

from __future__ import annotations

import torch
from torch import nn

from lmedit.errors import InputError
from lmedit.models.arch import block, mlp_out_module, mlp_out_norm_module

SITES = ("residual", "mlp_out")


def check_site(site: str) -> str:
    if site not in SITES:
        raise InputError(f"unknown value site {site!r}; choose one of: {', '.join(SITES)}")
    return site


def site_module(model: nn.Module, layer: int, site: str) -> nn.Module:
    """The module whose output δ is added to at `layer`: the whole block (residual) or W (mlp_out)."""
    return block(model, layer) if check_site(site) == "residual" else mlp_out_module(model, layer)


def norm_gain(norm: nn.Module) -> torch.Tensor:
    """The elementwise gain g of an RMSNorm, whatever its convention (Llama's w, Gemma's 1 + w).

    Read from the module on a constant vector (rms 1e4, so ε does not matter) only to tell which convention
    it follows; g itself is then taken exactly from the weight in float64."""
    w = norm.weight.detach().double()
    probe = torch.full((1, w.numel()), 1e4, dtype=norm.weight.dtype, device=norm.weight.device)
    with torch.no_grad():
        seen = norm(probe).double().flatten()
    for offset in (0.0, 1.0):
        if torch.allclose(seen, w + offset, rtol=1e-3, atol=1e-3):
            return w + offset
    raise InputError(f"the norm after the MLP ({type(norm).__name__}) is not an RMSNorm lmedit can invert")


def residual_to_weight_space(model: nn.Module, layer: int, m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The change of W_l's output (n, d) that moves the residual stream by `r` (n, d), given W_l's output `m`.

    Identity where W writes into the residual directly; through a post-MLP norm, as in the module docstring."""
    norm = mlp_out_norm_module(model, layer)
    if norm is None:
        return r
    g = norm_gain(norm).to(m.device)
    m = m.double()
    with torch.no_grad():
        normed = norm(m.to(norm.weight.dtype)).double()  # N(m): what the block adds today
    length = m.norm(dim=-1, keepdim=True)
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)))
    G = g * length / torch.sqrt(length ** 2 / m.shape[-1] + eps)  # N(‖m‖ x) = G ⊙ x for every unit x
    x = nearest_on_ellipsoid(G, normed + r.double(), m)
    return (length * x - m).to(r.dtype)


def nearest_on_ellipsoid(G: torch.Tensor, t: torch.Tensor, prefer: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """Per row, the unit x minimising ‖G ⊙ x − t‖ (G, t, prefer: (n, d) float64). x_i = G_i t_i / (G_i² + ν) with
    ν ≥ −min G² chosen by bisection so that ‖x‖ = 1; when even ν → −min G² leaves ‖x‖ < 1 (the "hard case": t has
    nothing along the least-gain coordinates, e.g. gains of zero), those coordinates take the rest of the length,
    signed as in `prefer` (W's output today: the smallest change)."""
    G2, b = G ** 2, G * t
    low = G2.min(dim=-1, keepdim=True).values
    least = G2 <= low * (1 + 1e-12) + 1e-300  # the coordinates of least gain

    def length(nu):  # ‖x(ν)‖² outside the least-gain coordinates, decreasing in ν
        return ((b / (G2 + nu)).masked_fill(least, 0.0) ** 2).sum(-1, keepdim=True)

    on_least = (b.abs() * least).amax(dim=-1, keepdim=True) > 0
    lo, hi = -low, b.norm(dim=-1, keepdim=True).clamp(min=1e-300)  # G² + hi ≥ ‖b‖, so ‖x(hi)‖ ≤ 1
    hard = ~on_least & (length(lo) <= 1.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        x_mid = ((b / (G2 + mid)) ** 2).sum(-1, keepdim=True)
        lo, hi = torch.where(x_mid > 1.0, mid, lo), torch.where(x_mid > 1.0, hi, mid)
    x = b / (G2 + (lo + hi) / 2)
    if bool(hard.any()):
        rest = b / (G2 - low).masked_fill(least, 1.0)
        rest = rest.masked_fill(least, 0.0)
        fill = torch.sqrt((1.0 - (rest ** 2).sum(-1, keepdim=True)).clamp(min=0.0))
        direction = (prefer * least).double()
        direction = torch.where(direction.norm(dim=-1, keepdim=True) > 0, direction, least.double())
        rest = rest + fill * direction / direction.norm(dim=-1, keepdim=True)
        x = torch.where(hard, rest, x)
    return x / x.norm(dim=-1, keepdim=True)
