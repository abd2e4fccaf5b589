"""Writing an edited model back to GGUF, the format llama.cpp-based tools ship models in.

An edit changes a few tensors (ROME: one MLP output projection). So the export copies the GGUF the model was
loaded from — every metadata field, the tokenizer, every untouched tensor byte for byte in its own quantisation —
and writes only the edited tensors anew, in float32 (exact) or float16. Re-quantising an edited tensor to the
source's 4-bit type would round away an edit of small norm; the few edited tensors in float are a small cost
(3.5 MB per 576x1536 matrix). HF parameter names map to GGUF tensor names through gguf-py's own tensor map, and
llama-family q/k projections get llama.cpp's rotary row order back (transformers undoes it on load). The written
file is then loaded again through transformers and compared with the edited model, tensor by tensor: an export
that would not load back to the same weights is deleted, never left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmedit.errors import EditFailure, InputError
from lmedit.models.loading import read_gguf

GGUF_TYPES = ("f32", "f16")
_ROPE_PERMUTED = ("llama", "mistral", "granite")  # archs whose q/k rows llama.cpp's converter reorders


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF → llama.cpp row order of a q/k projection (the inverse of transformers' reverse_permute on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _gguf_names(reader, names: list[str]) -> dict[str, str]:
    """HF parameter name → GGUF tensor name, for every edited parameter (an unmapped one is an error)."""
    import gguf

    arch_name = _field(reader, "general.architecture")
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        raise InputError(f"GGUF architecture {arch_name!r} is unknown to gguf-py {gguf.__version__}")
    table = gguf.get_tensor_name_map(arch, int(_field(reader, f"{arch_name}.block_count")))
    present = {t.name for t in reader.tensors}
    mapped = {}
    for name in names:
        target = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None or target not in present:
            raise InputError(f"parameter {name} has no tensor in the GGUF file (mapped to {target!r}); "
                             "export this edit as an HF directory instead")
        mapped[name] = target
    return mapped


def _gguf_array(reader, gguf_name: str, value: torch.Tensor, dtype: str) -> np.ndarray:
    arch_name = _field(reader, "general.architecture")
    array = value.detach().to(torch.float32).cpu().numpy()
    if arch_name in _ROPE_PERMUTED and gguf_name.endswith((".attn_q.weight", ".attn_k.weight")):
        heads = _field(reader, f"{arch_name}.attention.head_count")
        if gguf_name.endswith(".attn_k.weight"):
            heads = _field(reader, f"{arch_name}.attention.head_count_kv") or heads
        array = _permute_rows(array, int(heads))
    return np.ascontiguousarray(array.astype(np.float16 if dtype == "f16" else np.float32))


def export_gguf(model: nn.Module, source: Path, out: Path, names: list[str], dtype: str = "f32") -> dict:
    """Write `out`: the GGUF file `source` with the tensors of the HF parameters `names` taken from `model`,
    verified by loading it back before it takes its name (atomic: `out` is the verified file or untouched).

    Returns {"replaced": {hf name: gguf name}, "bytes": size, "max_abs_diff": largest difference on reload}."""
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.partial.gguf")  # a .gguf name, so the loader reads it for the check
    try:
        mapped = _write(model, Path(source), tmp, names, dtype)
        worst = verify_gguf(model, tmp, names, dtype)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"replaced": mapped, "bytes": out.stat().st_size, "max_abs_diff": worst}


def _write(model: nn.Module, source: Path, path: Path, names: list[str], dtype: str) -> dict[str, str]:
    """Copy `source` to `path`, every metadata field and untouched tensor as it is, the edited ones anew."""
    import gguf

    if dtype not in GGUF_TYPES:
        raise InputError(f"GGUF tensor type must be one of {', '.join(GGUF_TYPES)}, got {dtype!r}")
    reader = read_gguf(source)  # the source checked: a file cut short stops here, named
    mapped = _gguf_names(reader, names)
    params = dict(model.named_parameters(remove_duplicate=False))
    arrays = {mapped[n]: _gguf_array(reader, mapped[n], params[n], dtype) for n in names}
    new_type = gguf.GGMLQuantizationType.F16 if dtype == "f16" else gguf.GGMLQuantizationType.F32
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch=_field(reader, "general.architecture"), endianess=reader.endianess)
    for field in reader.fields.values():  # every metadata field but those the writer adds itself
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        if t.name in arrays:
            a = arrays[t.name]
            if tuple(a.shape) != tuple(int(x) for x in reversed(t.shape)):
                raise EditFailure(f"tensor {t.name}: the model's shape {tuple(a.shape)} is not the GGUF's "
                                  f"{tuple(reversed(t.shape.tolist()))}")
            writer.add_tensor_info(t.name, a.shape, a.dtype, a.nbytes, new_type)
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(arrays.get(t.name, t.data), tensor_endianess=reader.endianess)
    writer.close()
    return mapped


def verify_gguf(model: nn.Module, path: Path, names: list[str], dtype: str = "f32") -> float:
    """Load `path` through transformers and compare every parameter with `model`: the edited ones to float16
    rounding (exactly for f32), all others exactly. Returns the largest difference; raises EditFailure."""
    from lmedit.models.loading import load_model

    loaded = load_model(str(path)).model
    theirs = dict(loaded.named_parameters())
    worst = 0.0
    for name, mine in model.named_parameters():
        other = theirs.get(name)
        if other is None or other.shape != mine.shape:
            raise EditFailure(f"the written GGUF loads without parameter {name} (or with another shape)")
        diff = float((other.detach() - mine.detach()).abs().max())
        edited = name in names
        tolerance = 1e-3 * float(mine.detach().abs().max()) if edited and dtype == "f16" else 0.0
        if diff > tolerance:
            raise EditFailure(f"the written GGUF loads {name} differently from the edited model (max |Δ| {diff:.3g})")
        worst = max(worst, diff)
    return worst
