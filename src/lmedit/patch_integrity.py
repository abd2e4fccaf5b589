"""Why a saved patch can be trusted: digests of its tensors and metadata, finite deltas, plausible sizes.

A patch on disk is two files a user can open, copy and edit. `patch.json` records a sha256 of the stored
tensors and one of its own content (everything but the digest entry), so a flipped float in
`patch.safetensors` or a hand-edited method or target in `patch.json` is caught at load, before the patch
can touch a model. This detects damage and careless edits, not a forger who recomputes both digests (that
would take a signature key, which lmedit does not manage).

A delta must also be finite, and is refused when it is far larger than the weight it changes (over a
thousand times its norm): a corrupted exponent gives 1e20 and more, while lmedit's edits stay far below
the bound (a ROME edit of a tiny random test model, whose weights are small, reaches about 200).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from lmedit.errors import InputError, warn
from lmedit.fileio import tensor_digest  # one digest of tensors for patches and caches

INTEGRITY_KEY = "integrity"
ALGORITHM = "sha256"
# ‖ΔW‖_F / ‖W‖_F above which `apply` refuses without force (see the module docstring for the margin).
MAX_RELATIVE_NORM = 1000.0


def meta_digest(doc: dict) -> str:
    """sha256 of patch.json's content without its own digest entry, in canonical JSON (sorted keys)."""
    body = {k: v for k, v in doc.items() if k != INTEGRITY_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(doc: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The document to write: `doc` plus the digests of itself and of the tensors written beside it."""
    return {**doc, INTEGRITY_KEY: {"algorithm": ALGORITHM, "tensors": tensor_digest(tensors),
                                   "meta": meta_digest(doc)}}


def verify(doc: dict, tensors: dict[str, torch.Tensor], meta_file: Path, tensors_file: Path) -> None:
    """Refuse a patch whose files no longer match the digests it was saved with; warn when it has none."""
    seal_ = doc.get(INTEGRITY_KEY)
    if seal_ is None:
        warn(f"{meta_file.parent}: this patch has no digest (saved before lmedit recorded one), so damage to "
             "its files cannot be detected; save it again to add one")
        return
    if not isinstance(seal_, dict) or seal_.get("algorithm") != ALGORITHM:
        raise InputError(f"{meta_file}: the '{INTEGRITY_KEY}' entry is not an lmedit {ALGORITHM} digest")
    if seal_.get("meta") != meta_digest(doc):
        raise InputError(f"{meta_file} was changed after the patch was saved (its digest does not match its "
                         "content); refusing to trust it: recompute the edit, or restore the original file")
    if seal_.get("tensors") != tensor_digest(tensors):
        raise InputError(f"{tensors_file} does not match the digest in {meta_file.name} (damaged or changed "
                         "after saving); refusing to load it: recompute the edit, or restore the original file")


def check_finite(name: str, parts: dict[str, torch.Tensor], where: str) -> None:
    """A delta with NaN or ±inf would destroy the weight it is added to."""
    for part, t in parts.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise InputError(f"{where}: delta {name!r} ({part}) holds {bad} non-finite value(s); refusing it")


def check_plausible(name: str, delta_norm: float, weight: torch.Tensor, force: bool) -> None:
    """Refuse ‖ΔW‖ > MAX_RELATIVE_NORM · ‖W‖ unless forced (a zero W, e.g. a fresh bias, is not checked)."""
    w_norm = float(torch.linalg.vector_norm(weight.detach().double()))
    if force or w_norm == 0.0 or delta_norm <= MAX_RELATIVE_NORM * w_norm:
        return
    raise InputError(f"delta for {name} has norm {delta_norm:.3g}, {delta_norm / w_norm:.3g} times the weight's own "
                     f"({w_norm:.3g}), over the {MAX_RELATIVE_NORM:g} no lmedit edit comes near, so the patch is probably "
                     "damaged. "
                     "Pass --force (or force=True) to apply it anyway")
