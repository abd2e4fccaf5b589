"""An edit as data: per-parameter weight changes that can be saved, checked, applied, reverted and composed.

Editors return a `Patch` and leave the model as they found it (ROME's `execute_rome`, PEFT's merge/unmerge);
applying is a separate, explicit step. Revert restores saved copies of the touched tensors rather than
subtracting ΔW again, because W + ΔW - ΔW is not W in floating point. DESIGN.md §7. On disk: a directory of
`patch.safetensors` ("<param>::dense" or "::left"/"::right") and `patch.json`; nothing is ever unpickled.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmedit import __version__
from lmedit.errors import EditFailure, InputError, LmeditError
from lmedit.fileio import AtomicDirectory, atomic_write_json, current_umask, read_json
from lmedit.patch_integrity import INTEGRITY_KEY, check_finite, check_plausible, seal, verify

FORMAT = "lmedit-patch/1"
TENSORS_FILE = "patch.safetensors"
META_FILE = "patch.json"
_RESERVED_META = ("format", "deltas", INTEGRITY_KEY)  # keys patch.json uses for itself
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


def _resolve(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Parameter]:
    """Parameters by name; an unknown name is an InputError that suggests the closest valid ones.

    Tied aliases (GPT-2's lm_head.weight = wte.weight) resolve too, to the shared tensor."""
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in params]
    if missing:
        close = difflib.get_close_matches(missing[0], list(params), n=5, cutoff=0.5) or list(params)[:5]
        more = f" ({len(missing)} names missing in all)" if len(missing) > 1 else ""
        raise InputError(f"parameter {missing[0]!r} is not in the model{more}; closest valid: {', '.join(close)}")
    return {n: params[n] for n in names}


def fingerprint(model: nn.Module, names: Iterable[str]) -> str:
    """sha256 over (name, shape, dtype, bytes) of the named parameters, sorted by name.
    Only the tensors a patch touches are hashed: a few MB, milliseconds, yet enough to tell another
    checkpoint, another dtype, or a model that already carries an edit on those tensors."""
    params = _resolve(model, sorted(set(names)))
    h = hashlib.sha256()
    for name, p in params.items():
        t = p.detach().contiguous()
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


class AppliedPatch:
    """A patch in a model, holding exact copies of the tensors it changed so revert is bit-exact.
    Also a context manager: `with patch.apply(model): ...` reverts on exit, even on error."""

    def __init__(self, params: dict[str, nn.Parameter], originals: dict[str, torch.Tensor]):
        self._params = params
        self._originals: dict[str, torch.Tensor] | None = originals

    @property
    def active(self) -> bool:
        return self._originals is not None

    def revert(self) -> None:
        """Copy the saved originals back; a second revert is an error (it would undo later changes)."""
        if self._originals is None:
            raise LmeditError("this patch has already been reverted")
        with torch.no_grad():
            for name, original in self._originals.items():
                self._params[name].copy_(original)
        self._originals = None

    def __enter__(self) -> AppliedPatch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.active:
            self.revert()


@dataclass
class Patch:
    """An edit: `deltas` keyed by parameter name as in model.named_parameters(), e.g.
    "model.layers.4.mlp.down_proj.weight"; `meta` with method, config, requests (list of dicts),
    base_fingerprint, lmedit_version, metrics, model (name). Must stay JSON-serialisable to be saved."""

    deltas: dict[str, Delta]
    meta: dict = field(default_factory=dict)

    @classmethod
    def build(cls, model: nn.Module, deltas: dict[str, Delta], *, method: str, config: dict | None = None,
              requests: list[dict] | None = None, metrics: dict | None = None,
              model_name: str | None = None) -> Patch:
        """What an editor returns: the deltas plus metadata, fingerprinting the base it was computed on.
        A non-finite delta is an EditFailure here, where it was made, not a surprise when it is applied."""
        for name, delta in deltas.items():
            try:
                check_finite(name, delta.parts(), method)
            except InputError as e:
                raise EditFailure(f"{e}; the edit diverged: try a smaller learning rate") from None
        meta = {"method": method, "model": model_name, "config": dict(config or {}),
                "requests": list(requests or []), "metrics": dict(metrics or {}),
                "base_fingerprint": fingerprint(model, deltas), "lmedit_version": __version__}
        return cls(dict(deltas), meta)

    @property
    def num_params(self) -> int:
        """Numbers stored in the patch (a rank-1 edit of a 576x1536 matrix stores 2112)."""
        return sum(d.numel for d in self.deltas.values())

    def norms(self) -> dict[str, float]:
        return {name: d.norm() for name, d in self.deltas.items()}

    def summary(self) -> str:
        """One line per delta: name, kind, shape, rank, Frobenius norm."""
        rank = {name: "full" if d.rank is None else d.rank for name, d in self.deltas.items()}
        return "\n".join(f"{name}  {d.kind}  {'x'.join(map(str, d.shape))}  rank={rank[name]}  |dW|_F={d.norm():.4g}"
                         for name, d in self.deltas.items())

    def check_base(self, model: nn.Module) -> None:
        """Refuse a model whose touched tensors differ from those the patch was made on."""
        expected = self.meta.get("base_fingerprint")
        if expected is None:
            return
        # A composition was made on the first part's base, which fingerprinted only the first part's names.
        names = self.meta.get("fingerprint_names") or list(self.deltas)
        actual = fingerprint(model, names)
        if actual != expected:
            raise InputError(f"patch was made for a different base model (fingerprint {expected[:12]}, this model "
                             f"has {actual[:12]}), refusing to apply; load the checkpoint it was made on, in the "
                             "same dtype, and revert any patch already applied to it")

    def apply(self, model: nn.Module, force: bool = False) -> AppliedPatch:
        """Check names, shapes, base and size, then W += ΔW in place; returns the handle that reverts it.
        ΔW is cast to each parameter's own device and dtype, so this works under device_map="auto".
        A delta far larger than its weight (patch_integrity.MAX_RELATIVE_NORM) is refused unless `force`."""
        params = _resolve(model, self.deltas)
        for name, delta in self.deltas.items():
            shape = tuple(params[name].shape)
            if shape != delta.shape:
                hint = " (it looks transposed: deltas are in the parameter's storage layout)" \
                    if shape == delta.shape[::-1] else ""
                raise InputError(f"delta for {name} has shape {delta.shape} but the parameter is {shape}{hint}")
            check_plausible(name, delta.norm(), params[name], force)
        self.check_base(model)
        applied = AppliedPatch(params, {name: params[name].detach().clone() for name in self.deltas})
        try:
            with torch.no_grad():
                for name, delta in self.deltas.items():  # device and dtype from the parameter, never a literal
                    params[name].add_(delta.full(device=params[name].device).to(dtype=params[name].dtype))
        except BaseException:
            applied.revert()  # never leave a half-applied patch behind
            raise
        return applied

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write patch.safetensors + patch.json (with the digests of both) into a new directory, atomically."""
        clash = [k for k in _RESERVED_META if k in self.meta]
        if clash:
            raise LmeditError(f"patch meta may not use the keys {clash}: patch.json uses them itself")
        index, tensors = {}, {}
        for name, d in self.deltas.items():
            index[name] = {"kind": d.kind, "shape": list(d.shape), "rank": d.rank}
            for part, t in d.parts().items():
                tensors[f"{name}::{part}"] = t.detach().cpu().contiguous().clone()  # clone: no shared storage
        doc = {"format": FORMAT, **self.meta, "deltas": index}
        try:
            doc = seal(doc, tensors)
        except (TypeError, ValueError) as e:
            raise LmeditError(f"patch meta is not JSON-serialisable: {e}") from None
        with AtomicDirectory(path, force=force) as tmp:
            save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
            os.chmod(tmp / TENSORS_FILE, 0o666 & ~current_umask())  # safetensors writes 0600
            atomic_write_json(tmp / META_FILE, doc)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Patch:
        """Read a patch directory (safetensors + JSON only); anything missing, inconsistent, non-finite or not
        matching the digests it was saved with is an InputError naming the file."""
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"patch directory not found: {path}")
        meta_file, tensors_file = path / META_FILE, path / TENSORS_FILE
        doc = read_json(meta_file)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise InputError(f"{meta_file}: not an lmedit patch (format {found!r}, expected {FORMAT!r})")
        index = doc.get("deltas")
        if not isinstance(index, dict):
            raise InputError(f"{meta_file}: the 'deltas' index is missing or not an object")
        if not tensors_file.is_file():
            raise InputError(f"file not found: {tensors_file}")
        try:
            tensors = load_file(str(tensors_file))
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{tensors_file}: not a readable safetensors file: {e}") from None
        verify(doc, tensors, meta_file, tensors_file)
        deltas, used = {}, set()
        for name, entry in index.items():
            kind = entry.get("kind") if isinstance(entry, dict) else None
            parts = _PARTS.get(kind)
            if parts is None:
                raise InputError(f"{meta_file}: delta {name!r} has kind {kind!r}, expected 'dense' or 'lowrank'")
            keys = {part: f"{name}::{part}" for part in parts}
            missing = [k for k in keys.values() if k not in tensors]
            if missing:
                raise InputError(f"{tensors_file} lacks {missing}, which {META_FILE} lists")
            used.update(keys.values())
            check_finite(name, {part: tensors[k] for part, k in keys.items()}, str(tensors_file))
            try:
                delta = Delta(**{part: tensors[k] for part, k in keys.items()})
            except ValueError as e:
                raise InputError(f"{tensors_file}: delta {name!r}: {e}") from None
            if list(delta.shape) != entry.get("shape") or delta.rank != entry.get("rank"):
                raise InputError(
                    f"{path}: delta {name!r} has shape {list(delta.shape)}, rank {delta.rank} in {TENSORS_FILE} "
                    f"but shape {entry.get('shape')}, rank {entry.get('rank')} in {META_FILE}"
                )
            deltas[name] = delta
        extra = sorted(set(tensors) - used)
        if extra:
            raise InputError(f"{tensors_file} holds tensors that {META_FILE} does not list: {extra[:5]}")
        return cls(deltas, {k: v for k, v in doc.items() if k not in _RESERVED_META})


def _sum(parts: list[Delta]) -> Delta:
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


def compose(*patches: Patch) -> Patch:
    """One patch equal to applying `patches` in order (to float rounding): deltas summed per name.

    The result checks the first part's base; each later part was made on the model with the earlier ones
    applied, which is exactly what the composition reproduces."""
    if not patches:
        raise InputError("compose needs at least one patch")
    names = list(dict.fromkeys(name for p in patches for name in p.deltas))
    deltas = {}
    for name in names:
        parts = [p.deltas[name] for p in patches if name in p.deltas]
        shapes = sorted({d.shape for d in parts})
        if len(shapes) > 1:
            raise InputError(f"cannot compose: the deltas for {name} have different shapes {shapes}")
        deltas[name] = _sum(parts)
    first = patches[0].meta
    meta = {"method": "compose", "model": first.get("model"), "lmedit_version": __version__,
            "requests": [r for p in patches for r in p.meta.get("requests", [])],
            "composed_of": [{"method": p.meta.get("method"), "n_requests": len(p.meta.get("requests", []))}
                            for p in patches]}
    if first.get("base_fingerprint") is not None:
        meta["base_fingerprint"] = first["base_fingerprint"]
        meta["fingerprint_names"] = list(first.get("fingerprint_names") or patches[0].deltas)
    return Patch(deltas, meta)
