"""An edit as data: per-parameter weight changes (and a Backpack's sense deltas) that can be saved, checked,
applied, reverted and composed.

Editors return a `Patch` and leave the model as they found it (ROME's `execute_rome`, PEFT's merge/unmerge);
applying is a separate, explicit step. Revert restores saved copies of the touched tensors rather than
subtracting ΔW again, because W + ΔW - ΔW is not W in floating point. DESIGN.md §7. On disk: a directory of
`patch.safetensors` ("<param>::dense" or "::left"/"::right"; a sense entry "<module>::sense_tokens",
"::sense_senses", "::sense_vectors") and `patch.json`; nothing is ever unpickled.
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
from lmedit.deltas import _PARTS, Delta, SenseDelta, sum_deltas
from lmedit.errors import EditFailure, InputError, LmeditError
from lmedit.fileio import AtomicDirectory, atomic_write_json, current_umask, read_json
from lmedit.patch_integrity import INTEGRITY_KEY, check_finite, check_plausible, seal, verify

FORMAT = "lmedit-patch/1"
TENSORS_FILE = "patch.safetensors"
META_FILE = "patch.json"
_RESERVED_META = ("format", "deltas", "senses", INTEGRITY_KEY)  # keys patch.json uses for itself
__all__ = ["Delta", "SenseDelta", "Patch", "AppliedPatch", "compose", "fingerprint"]


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

    def __init__(self, params: dict[str, nn.Parameter], originals: dict[str, torch.Tensor], sense_owner=None,
                 sense_edits_before: list | None = None):
        self._params = params
        self._originals: dict[str, torch.Tensor] | None = originals
        self._sense_owner, self._sense_edits_before = sense_owner, sense_edits_before  # a sense entry's module

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
        if self._sense_owner is not None:
            self._sense_owner.restore_sense_edits(self._sense_edits_before)
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
    senses: SenseDelta | None = None  # a Backpack's sense deltas (sense fine-tuning), beside or instead of weights

    @classmethod
    def build(cls, model: nn.Module, deltas: dict[str, Delta], *, method: str, config: dict | None = None,
              requests: list[dict] | None = None, metrics: dict | None = None,
              model_name: str | None = None, senses: SenseDelta | None = None) -> Patch:
        """What an editor returns: the deltas plus metadata, fingerprinting the base it was computed on.
        A non-finite delta is an EditFailure here, where it was made, not a surprise when it is applied."""
        checked = {name: delta.parts() for name, delta in deltas.items()}
        if senses is not None:
            checked[f"{senses.module} senses"] = senses.parts()
        for name, parts in checked.items():
            try:
                check_finite(name, parts, method)
            except InputError as e:
                raise EditFailure(f"{e}; the edit diverged: try a smaller learning rate") from None
        meta = {"method": method, "model": model_name, "config": dict(config or {}),
                "requests": list(requests or []), "metrics": dict(metrics or {}), "lmedit_version": __version__}
        patch = cls(dict(deltas), meta, senses)
        meta.update(patch.base_identity(model))
        return patch

    def base_identity(self, model: nn.Module) -> dict:
        """The meta entries that tie the patch to its base: the fingerprint of the tensors it reads or changes (for
        sense deltas: what the sense vectors are computed from), and those names when they are not the deltas'."""
        names = list(self.deltas)
        if self.senses is not None:
            owner = _sense_owner(model, self.senses.module)
            names += [f"{self.senses.module}.{n}" for n in owner.sense_inputs()]
        out = {"base_fingerprint": fingerprint(model, names)}
        if names != list(self.deltas):
            out["fingerprint_names"] = names
        return out

    @property
    def num_params(self) -> int:
        """Numbers stored in the patch (a rank-1 edit of a 576x1536 matrix stores 2112)."""
        return sum(d.numel for d in self.deltas.values()) + (self.senses.numel if self.senses is not None else 0)

    def norms(self) -> dict[str, float]:
        out = {name: d.norm() for name, d in self.deltas.items()}
        if self.senses is not None:
            out[f"{self.senses.module}::senses"] = self.senses.norm()
        return out

    def summary(self) -> str:
        """One line per delta: name, kind, shape, rank, Frobenius norm (and one for the sense deltas)."""
        rank = {name: "full" if d.rank is None else d.rank for name, d in self.deltas.items()}
        lines = [f"{name}  {d.kind}  {'x'.join(map(str, d.shape))}  rank={rank[name]}  |dW|_F={d.norm():.4g}"
                 for name, d in self.deltas.items()]
        if self.senses is not None:
            sd = self.senses
            lines.append(f"{sd.module}  senses  {sd.n} (token, sense) pairs x {sd.vectors.shape[1]}  "
                         f"|Δ|_F={sd.norm():.4g}")
        return "\n".join(lines)

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
        owner = _sense_owner(model, self.senses.module) if self.senses is not None else None
        self.check_base(model)
        originals = {name: params[name].detach().clone() for name in self.deltas}
        before = None
        if owner is not None:  # first: a misfit is refused before any weight moves
            sd = self.senses
            try:
                before = owner.attach_sense_vectors(sd.tokens, sd.senses, sd.vectors)
            except ValueError as e:
                raise InputError(f"the patch's sense deltas do not fit this model: {e}") from None
        applied = AppliedPatch(params, originals, owner, before)
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
        if self.senses is not None:
            sd = self.senses
            doc["senses"] = {"module": sd.module, "pairs": sd.n, "dim": int(sd.vectors.shape[1])}
            for part, t in sd.parts().items():
                tensors[f"{sd.module}::sense_{part}"] = t.detach().cpu().contiguous().clone()
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
        senses = _load_senses(doc.get("senses"), tensors, used, meta_file, tensors_file)
        extra = sorted(set(tensors) - used)
        if extra:
            raise InputError(f"{tensors_file} holds tensors that {META_FILE} does not list: {extra[:5]}")
        return cls(deltas, {k: v for k, v in doc.items() if k not in _RESERVED_META}, senses)


def _load_senses(entry, tensors: dict, used: set, meta_file: Path, tensors_file: Path) -> SenseDelta | None:
    """The sense entry patch.json lists (None when it lists none), checked against the tensors it names."""
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("module"), str):
        raise InputError(f"{meta_file}: the 'senses' entry must be an object naming its module")
    keys = {part: f"{entry['module']}::sense_{part}" for part in ("tokens", "senses", "vectors")}
    missing = [k for k in keys.values() if k not in tensors]
    if missing:
        raise InputError(f"{tensors_file} lacks {missing}, which {META_FILE} lists")
    used.update(keys.values())
    check_finite(f"{entry['module']} senses", {"vectors": tensors[keys["vectors"]]}, str(tensors_file))
    try:
        senses = SenseDelta(entry["module"], **{part: tensors[k] for part, k in keys.items()})
    except ValueError as e:
        raise InputError(f"{tensors_file}: {e}") from None
    if senses.n != entry.get("pairs") or senses.vectors.shape[1] != entry.get("dim"):
        raise InputError(f"{tensors_file}: {senses.n} sense pairs of width {senses.vectors.shape[1]}, but "
                         f"{META_FILE} lists {entry.get('pairs')} of width {entry.get('dim')}")
    return senses


def _sense_owner(model: nn.Module, module: str):
    """The module a sense entry edits; an InputError when the model has no Backpack there."""
    try:
        owner = model.get_submodule(module)
    except AttributeError:
        owner = None
    if owner is None or not hasattr(owner, "attach_sense_vectors"):
        raise InputError(f"this patch changes the sense vectors of a Backpack at {module!r}, and this model "
                         f"({type(model).__name__}) has no Backpack there")
    return owner


def compose(*patches: Patch) -> Patch:
    """One patch equal to applying `patches` in order (to float rounding): deltas summed per name, sense deltas
    joined (a pair edited twice carries both deltas, which add up as they would applied one after the other).

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
        deltas[name] = sum_deltas(parts)
    first = patches[0].meta
    meta = {"method": "compose", "model": first.get("model"), "lmedit_version": __version__,
            "requests": [r for p in patches for r in p.meta.get("requests", [])],
            "composed_of": [{"method": p.meta.get("method"), "n_requests": len(p.meta.get("requests", []))}
                            for p in patches]}
    if first.get("base_fingerprint") is not None:
        meta["base_fingerprint"] = first["base_fingerprint"]
        meta["fingerprint_names"] = list(first.get("fingerprint_names") or patches[0].deltas)
    senses = [p.senses for p in patches if p.senses is not None]
    try:
        joined = SenseDelta.cat(senses) if senses else None
    except ValueError as e:
        raise InputError(f"cannot compose: {e}") from None
    return Patch(deltas, meta, joined)
