"""Loading in another precision or spread by a device map (LMEDIT_DTYPE, LMEDIT_DEVICE_MAP): a bfloat16 model
edits, its patch reverts bit for bit, and bad settings are one-line errors."""

from __future__ import annotations

import pytest
import torch
from test_cli import GOOD, assert_one_line_error, run_cli, write_jsonl
from test_locate import CONTEXT, VALUE, _next_token_prob

from lmedit.editors import get_editor
from lmedit.errors import InputError
from lmedit.models.arch import get_module
from lmedit.models.loading import Placement, load_model
from lmedit.requests import EditRequest


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    lm = tiny_model("llama")
    with torch.no_grad():
        get_module(lm.model, lm.arch.unembed).weight.mul_(30.0)  # lets a residual move the next token (test_locate)
    path = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def test_bfloat16_model_edits_and_reverts_bit_for_bit(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    lm = load_model(str(model_dir), placement=Placement("bfloat16"))
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    request = EditRequest("The capital of France", "France", "Rome", "Paris")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    p0 = _next_token_prob(lm.model, lm.tokenizer, request.prompt, "Rome")
    rome = get_editor("rome")
    patch = rome.fn(lm.model, lm.tokenizer, [request], rome.config_cls(layers=(1,), identity_cov=True, value=VALUE,
                                                                       **CONTEXT), progress=False,
                    announce=lambda *_: None)
    with patch.apply(lm.model):
        p1 = _next_token_prob(lm.model, lm.tokenizer, request.prompt, "Rome")
        assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert p1 > 0.3 and p1 > 100 * p0, (p0, p1)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_device_map_loads_the_same_model(model_dir):
    plain = load_model(str(model_dir))
    mapped = load_model(str(model_dir), placement=Placement(device_map="cpu"))
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert torch.equal(plain.model(input_ids=ids).logits, mapped.model(input_ids=ids).logits)


def test_bad_placements_are_one_line_errors(model_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(InputError, match="float64"):
        Placement("float64")
    reqs = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    monkeypatch.setenv("LMEDIT_DTYPE", "fp8")
    code, err = run_cli(monkeypatch, capsys, "edit", "--model", str(model_dir), "--requests", reqs,
                        "--out", str(tmp_path / "p"))
    assert_one_line_error(code, err, "'fp8' is not one of float32, bfloat16, float16")
    monkeypatch.setenv("LMEDIT_DTYPE", "bfloat16")
    monkeypatch.setenv("LMEDIT_DEVICE_MAP", "auto")
    monkeypatch.setenv("LMEDIT_DEVICE", "cpu")
    code, err = run_cli(monkeypatch, capsys, "edit", "--model", str(model_dir), "--requests", reqs,
                        "--out", str(tmp_path / "p"))
    assert_one_line_error(code, err, "not both")
    monkeypatch.delenv("LMEDIT_DEVICE")
    code, err = run_cli(monkeypatch, capsys, "edit", "--requests", reqs, "--out", str(tmp_path / "p"))
    assert_one_line_error(code, err, "a device map applies to Hugging Face models")
    assert not (tmp_path / "p").exists()
