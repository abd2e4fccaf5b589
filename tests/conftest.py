"""Shared fixtures: the embedded SmolLM2 model, its tokenizer, and tiny random models of every architecture.

Tiny models use the real SmolLM2 tokenizer (vocab 49152) with hidden size 32, so prompts, subjects and targets
tokenize as they do on the embedded model while every forward pass stays cheap.

The models these fixtures make go where LMEDIT_DEVICE says (the CPU when it is unset), as the CLI's do:
`LMEDIT_DEVICE=cuda pytest ...` runs the model-level tests with the model on a GPU (benchmarks/device.sh).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lmedit.models
from lmedit.models.loading import _finish, cache_dir
from lmedit.models.placement import Placement

# One intra-op thread by default: these models are tiny, and on a busy 2-core machine two OpenMP threads wait on
# each other so long that a 32x64 matmul takes ~15 ms instead of ~4 us (even SmolLM2 runs 5x slower with 2).
torch.set_num_threads(int(os.environ.get("LMEDIT_TEST_THREADS", "1")))

# The user cache as it is when the session starts: tests that point LMEDIT_CACHE elsewhere (monkeypatch)
# must not move the embedded model's cached copy.
USER_CACHE = cache_dir()
SMOL_DIR = USER_CACHE / "models" / "smollm2-135m"

TINY_KINDS = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma3_text"]
# Where the fixtures' models run, read once as the session starts (tests that set LMEDIT_DEVICE themselves, with
# monkeypatch, test the option and do not move the shared models).
TEST_DEVICE = os.environ.get("LMEDIT_DEVICE") or None


@pytest.fixture(scope="session")
def smol():
    """The embedded model (creates the dequantised cached copy on first use)."""
    return lmedit.models.load_model("smollm2-135m", placement=Placement(device=TEST_DEVICE))


def _smol_tokenizer_dir() -> Path:
    if not (SMOL_DIR / "model.safetensors").is_file():
        lmedit.models.load_model("smollm2-135m")  # writes the cached copy
    return SMOL_DIR


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, read from the cached copy (a quarter of a second, no model weights)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_smol_tokenizer_dir(), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(kind: str, vocab_size: int):
    import transformers as tf

    common_ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if kind == "gpt2":
        return tf.GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=128, vocab_size=vocab_size, **common_ids)
    if kind == "gptj":
        return tf.GPTJConfig(n_layer=4, n_embd=32, n_head=4, rotary_dim=4, n_positions=128, vocab_size=vocab_size,
                             **common_ids)
    if kind == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                max_position_embeddings=128, vocab_size=vocab_size, **common_ids)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, vocab_size=vocab_size, **common_ids)
    if kind == "llama":
        return tf.LlamaConfig(**llama_like)
    if kind == "mistral":
        return tf.MistralConfig(**llama_like)
    if kind == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if kind == "backpack-gpt2":  # 4 senses per token over a 2-layer contextualising GPT-2
        from lmedit.models.backpack import BackpackConfig, register

        register()
        return BackpackConfig(n_layer=2, n_embd=32, n_head=4, num_senses=4, n_positions=128, vocab_size=vocab_size,
                              **common_ids)
    if kind == "gemma3_text":
        return tf.Gemma3TextConfig(**llama_like, head_dim=8, sliding_window=16)
    raise ValueError(f"no tiny config for {kind!r}")


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """Factory: tiny_model(kind, vocab_size=None) -> LoadedModel, randomly initialised with seed 0, in eval mode."""
    from transformers import AutoModelForCausalLM

    def make(kind: str, vocab_size: int | None = None):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(kind, vocab_size or len(tokenizer)))
        model = Placement(device=TEST_DEVICE).place(model)  # float32, on the test device
        return _finish(model, tokenizer, f"tiny-{kind}")

    return make


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """Point the lmedit cache (statistics, context templates) at a fresh directory for one test."""
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "lmedit-cache"))
    return tmp_path / "lmedit-cache"
