"""The closed-form updates of the preservation–memorisation objective, in float64 (MEMIT, ROME/EMMET, AlphaEdit).

Notation (columns are requests): K (d_in × n) keys, R (d_out × n) residuals R = V* − W K, C (d_in × d_in) the
uncentred second moment of keys over general text, scaled by λ. Both return ΔW as a low-rank product
ΔW = R · A with A (n × d_in), so patches store it as two thin factors.

The two are one family: by the push-through identity Kᵀ(λC + KKᵀ)⁻¹ = (KᵀC⁻¹K + λI)⁻¹KᵀC⁻¹, the softened
equality solver with (λ', μ) IS least squares with λ = μλ'. EMMET differs from MEMIT only as μλ' → 0.
"""

from __future__ import annotations

import torch


def least_squares(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT: argmin_ΔW  λ‖ΔW C^{1/2}‖² + ‖(W+ΔW)K − V*‖²  ⇒  ΔW = R Kᵀ (λC + K Kᵀ)⁻¹."""
    K, R, C = K.double(), R.double(), C.double()
    A = torch.linalg.solve(lam * C + K @ K.T, K).T  # (n, d_in) = Kᵀ (λC + KKᵀ)⁻¹  (the matrix is symmetric)
    return R, A


def equality_constrained(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float = 1.0,
                         mu: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME (n = 1) / EMMET: argmin_ΔW ‖ΔW (λC)^{1/2}‖² s.t. (W+ΔW)K = V*  ⇒
    ΔW = R (Kᵀ C⁻¹ K + μ I)⁻¹ Kᵀ C⁻¹   (μ > 0 softens the constraint when keys are nearly dependent)."""
    K, R, C = K.double(), R.double(), (lam * C).double()
    Cinv_K = torch.linalg.solve(C, K)  # (d_in, n) = C⁻¹ K
    gram = K.T @ Cinv_K + mu * torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
    A = torch.linalg.solve(gram, Cinv_K.T)  # (n, d_in) = (KᵀC⁻¹K + μI)⁻¹ KᵀC⁻¹
    return R, A


def null_space_projection(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """AlphaEdit's P: the projection onto the eigenvectors of C whose eigenvalue is below `threshold` (absolute,
    as the reference code's `S < nullspace_threshold`), P = U₀ U₀ᵀ. Keys of general text lie (almost) in the
    other directions, so an update ΔW = Δ P leaves their outputs (almost) unchanged: ΔW k ≈ 0."""
    eigenvalues, U = torch.linalg.eigh(C.double())
    kept = U[:, eigenvalues < threshold]
    return kept @ kept.T


def null_space_constrained(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, K_edited_gram: torch.Tensor | None,
                           alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit (Fang et al. 2025, eq. 14): argmin_Δ ‖(W + ΔP)K − V*‖² + ‖ΔP K_p‖² + α‖ΔP‖²  ⇒
    ΔW = ΔP = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + α I)⁻¹, with K_p K_pᵀ the keys of the edits made before (carried from
    batch to batch so that later batches do not overwrite them) and α the reference code's L2."""
    K, R, P = K.double(), R.double(), P.double()
    gram = K @ K.T
    if K_edited_gram is not None:
        gram = gram + K_edited_gram.to(K.device, torch.float64)
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    # X = (P (KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K, so Xᵀ = Kᵀ P ((KKᵀ + K_pK_pᵀ) P + αI)⁻¹ (P and the gram are symmetric)
    X = torch.linalg.solve(P @ gram + alpha * eye, P @ K)
    return R, X.T
