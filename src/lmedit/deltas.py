"""What a patch changes: `Delta`, the change to one weight (dense or low-rank ΔW), and `SenseDelta`, additive
changes to chosen sense vectors of a Backpack, which are not stored weights (a sense network computes C(x)) and so
are attached to the model rather than added to a parameter. `lmedit.patches` applies, saves and composes both."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_HALF = (torch.float16, torch.bfloat16)
_PARTS = {"dense": ("dense",), "lowrank": ("left", "right")}  # stored tensors per kind


@dataclass
class Delta:
    """Change to one parameter, in the parameter's own storage layout (so apply is W += ΔW).

    Dense (`dense` set) or low-rank ΔW = left @ right (left: (rows, r), right: (r, cols)). Storage layout
    means e.g. GPT-2's Conv1D weights, stored (in, out), get a (in, out) delta: nothing is transposed here.
    """

    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.dense is not None:
            if self.left is not None or self.right is not None:
                raise ValueError("a Delta is either dense or low-rank (left @ right), not both")
        elif self.left is None or self.right is None:
            raise ValueError("a Delta needs `dense`, or both `left` and `right`")
        elif self.left.dim() != 2 or self.right.dim() != 2 or self.left.shape[1] != self.right.shape[0]:
            raise ValueError(
                f"low-rank factors must be (rows, r) and (r, cols); got {tuple(self.left.shape)} "
                f"and {tuple(self.right.shape)}"
            )

    @property
    def kind(self) -> str:
        return "dense" if self.dense is not None else "lowrank"

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (self.left.shape[0], self.right.shape[1])

    @property
    def rank(self) -> int | None:
        """Inner dimension of the factors; None for a dense delta (it is not factored)."""
        return None if self.dense is not None else self.left.shape[1]

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored tensors by role: {"dense": ...} or {"left": ..., "right": ...}."""
        return {part: getattr(self, part) for part in _PARTS[self.kind]}

    @property
    def numel(self) -> int:
        """Numbers stored: what the patch costs on disk, not how many weights it touches."""
        return sum(t.numel() for t in self.parts().values())

    def full(self, device: torch.device | None = None) -> torch.Tensor:
        """ΔW materialised (on `device` if given). Dense: as stored. Low-rank: the product in the factors'
        dtype, or float32 for half-precision factors, whose matmul would round each sum of r products."""
        if self.dense is not None:
            return self.dense if device is None else self.dense.to(device)
        left, right = self.left, self.right
        if device is not None:
            left, right = left.to(device), right.to(device)
        dtype = torch.promote_types(left.dtype, right.dtype)
        dtype = torch.float32 if dtype in _HALF else dtype
        return left.to(dtype) @ right.to(dtype)

    def norm(self) -> float:
        """Frobenius norm. Low-rank uses ‖LR‖² = Σ (LᵀL) ⊙ (RRᵀ): (r, r) work, no (rows, cols) matrix."""
        if self.dense is not None:
            return float(torch.linalg.vector_norm(self.dense.double()))
        left, right = self.left.double(), self.right.double()
        return float(((left.T @ left) * (right @ right.T)).sum().clamp_min(0).sqrt())

    @staticmethod
    def from_matrix(dW: torch.Tensor, max_rank: int | None = None) -> Delta:
        """Wrap a computed ΔW, dense by default. Editors that have factors (ROME's u vᵀ) build
        Delta(left=, right=) directly. With `max_rank`, an SVD checks whether ΔW is, to its dtype's precision
        (σ < σ₁·max(rows, cols)·eps counts as zero, as in matrix_rank), of rank 1 <= r <= max_rank, and
        stores (U_r S_r, V_rᵀ) only then and only when that is smaller than the dense matrix."""
        dW = dW.detach()
        if max_rank is None or dW.dim() != 2 or not dW.is_floating_point() or dW.numel() == 0:
            return Delta(dense=dW)
        rows, cols = dW.shape
        U, S, Vh = torch.linalg.svd(dW.double(), full_matrices=False)  # S descending
        r = int((S > S[0] * max(rows, cols) * torch.finfo(dW.dtype).eps).sum())
        if not 1 <= r <= max_rank or r * (rows + cols) >= rows * cols:
            return Delta(dense=dW)
        return Delta(left=(U[:, :r] * S[:r]).to(dW.dtype), right=Vh[:r].to(dW.dtype).contiguous())


def sum_deltas(parts: list[Delta]) -> Delta:
    """ΔW₁ + ΔW₂ + …: still low-rank when every part is (L = [L₁ L₂ …], R = [R₁; R₂; …]), else dense."""
    if len(parts) == 1:
        return parts[0]
    device = (parts[0].dense if parts[0].dense is not None else parts[0].left).device
    if all(d.dense is None for d in parts):
        dtype = parts[0].left.dtype
        for d in parts:
            dtype = torch.promote_types(dtype, torch.promote_types(d.left.dtype, d.right.dtype))
        return Delta(left=torch.cat([d.left.to(device, dtype) for d in parts], dim=1),
                     right=torch.cat([d.right.to(device, dtype) for d in parts], dim=0))
    dtype = torch.float32  # accumulate at least in float32: half-precision sums lose the small deltas
    for t in (t for d in parts for t in d.parts().values()):
        dtype = torch.promote_types(dtype, t.dtype)
    return Delta(dense=sum(d.full(device=device).to(dtype) for d in parts))


@dataclass
class SenseDelta:
    """C'(t)_ℓ = C(t)_ℓ + Δ(t, ℓ) for n (token, sense) pairs of the Backpack body at `module` (e.g. "backpack").

    Applying attaches the deltas to that module (models.backpack.BackpackModel.attach_sense_vectors) and reverting
    restores the edits it carried before; no weight is ever touched, so revert is bit-exact by construction. A pair
    may occur more than once (a composition): its deltas add up, as applying the parts in order would."""

    module: str
    tokens: torch.Tensor  # (n,) long
    senses: torch.Tensor  # (n,) long
    vectors: torch.Tensor  # (n, d)

    def __post_init__(self) -> None:
        n = self.tokens.shape[0] if self.tokens.dim() == 1 else -1
        if (n < 1 or self.senses.shape != self.tokens.shape or self.vectors.dim() != 2 or self.vectors.shape[0] != n
                or self.tokens.is_floating_point() or self.senses.is_floating_point()):
            raise ValueError(f"sense deltas need n >= 1 integer tokens and senses and (n, d) vectors; got "
                             f"{tuple(self.tokens.shape)}, {tuple(self.senses.shape)}, {tuple(self.vectors.shape)}")
        if int(self.tokens.min()) < 0 or int(self.senses.min()) < 0:
            raise ValueError("sense deltas name a negative token or sense index")

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def numel(self) -> int:
        return self.vectors.numel()

    def norm(self) -> float:
        return float(torch.linalg.vector_norm(self.vectors.double()))

    def parts(self) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens, "senses": self.senses, "vectors": self.vectors}

    @staticmethod
    def cat(parts: list[SenseDelta]) -> SenseDelta:
        """All parts' pairs in one (they must edit the same module)."""
        modules = sorted({p.module for p in parts})
        if len(modules) != 1:
            raise ValueError(f"sense deltas of different modules {modules} cannot be joined")
        return SenseDelta(modules[0], torch.cat([p.tokens for p in parts]), torch.cat([p.senses for p in parts]),
                          torch.cat([p.vectors.float() for p in parts]))
