"""Bad model files are input errors (exit 2) naming the file and what was expected, before any weights are read:
an HF directory whose weights are cut short, a .gguf that is not GGUF, a GGUF file cut short."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli
from lmedit.errors import InputError
from lmedit.models.loading import EMBEDDED, load_model, read_gguf


@pytest.fixture(scope="module")
def tiny_dir(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    lm = tiny_model("llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def _tiny_gguf(path) -> None:
    import gguf

    w = gguf.GGUFWriter(path, arch="llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.random.default_rng(0).random((64, 32), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("keep", [0.5, 0.999, 100, 0])
def test_hf_weights_cut_short(tiny_dir, tmp_path, monkeypatch, capsys, keep):
    bad = tmp_path / "cut"
    shutil.copytree(tiny_dir, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(InputError, match="truncated or damaged safetensors file") as e:
        load_model(str(bad))
    assert str(weights) in str(e.value) and "expected complete model weights" in str(e.value)
    code, err = run_cli(monkeypatch, capsys, "stats", "inspect", "--model", str(bad), "--layer", "1")
    assert_one_line_error(code, err, str(weights), "truncated")


def test_hf_shard_named_by_the_index_missing(tiny_dir, tmp_path):
    import json

    bad = tmp_path / "sharded"
    shutil.copytree(tiny_dir, bad)
    (bad / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(InputError, match="model-00002-of-00002.safetensors is missing"):
        load_model(str(bad))


@pytest.mark.parametrize("content", [b"", b"GGU", b"not a model at all\n" * 20, bytes(range(256)) * 8])
def test_a_file_that_is_not_gguf(tmp_path, monkeypatch, capsys, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(InputError, match="is not a GGUF file") as e:
        load_model(str(path))
    assert str(path) in str(e.value)
    code, err = run_cli(monkeypatch, capsys, "stats", "inspect", "--model", str(path), "--layer", "1")
    assert_one_line_error(code, err, str(path), "not a GGUF file", "expected a .gguf model file")


def test_a_tiny_gguf_cut_short(tmp_path):
    path = tmp_path / "tiny.gguf"
    _tiny_gguf(path)
    assert {t.name for t in read_gguf(path).tensors} == {"token_embd.weight", "output_norm.weight"}
    data = path.read_bytes()
    for keep in (len(data) - 3, len(data) // 2, 40, 5):
        path.write_bytes(data[:keep])
        with pytest.raises(InputError, match="truncated") as e:
            read_gguf(path)
        assert str(path) in str(e.value) and "expected a complete .gguf model file" in str(e.value)


def test_the_embedded_gguf_cut_short_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    """The issue's case: a real GGUF file (the embedded model's) cut to 60 %: 'cannot reshape array ...', exit 1."""
    import importlib.metadata

    dist, rel, _ = EMBEDDED["smollm2-135m"]
    source = importlib.metadata.distribution(dist).locate_file(rel)
    path = tmp_path / "cut.gguf"
    with open(source, "rb") as f:
        path.write_bytes(f.read(int(0.6 * source.stat().st_size)))
    code, err = run_cli(monkeypatch, capsys, "stats", "inspect", "--model", str(path), "--layer", "1")
    assert_one_line_error(code, err, str(path), "truncated or damaged GGUF file")
