"""Where v* lives, and how a change of the residual stream becomes a change of W's output.

Two sites (DESIGN §3):
- "mlp_out": δ is added to the output of W at the edit layer L (ROME): v* is a value of W itself, and the
  residual a solver meets is v* − W k.
- "residual": δ is added to the hidden state at the output of block L (MEMIT, EMMET): the residual stream,
  which also carries what the earlier edited layers wrote, so layer spreading can measure what is left.

In most families W_l writes into the residual directly, so a residual change r IS the change of W_l's output.
Gemma-2/3 put an RMSNorm N after the MLP: the block adds N(W k) = g ⊙ W k / rms(W k). That output has a fixed
gain-weighted length, so editing W can turn it but not lengthen it. A share r is therefore mapped to the W
output of unchanged length whose normed output points at N(m) + r:

    u = (N(m) + r) / g,    m′ = ‖m‖ · u / ‖u‖,    target change of W's output = m′ − m

(N(m′) = (N(m) + r) / rms(u): exactly N(m) + r when that is reachable). What a layer cannot reach is still
in the residual when the next layer re-measures it; the patch records how much of z* − z was reached.
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
    u = (normed + r.double()) / g
    m_new = m.norm(dim=-1, keepdim=True) * u / u.norm(dim=-1, keepdim=True)
    return (m_new - m).to(r.dtype)
