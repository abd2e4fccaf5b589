"""`senses` as a registry editor (editors/senses.py): its result is a patch of sense deltas that applies, reverts
bit-exactly, saves, loads, composes and exports like any other; on a model that is not a Backpack it is one clear
error before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lmedit import cli
from lmedit.editors import get_editor, make_config
from lmedit.errors import InputError
from lmedit.patches import Patch, compose
from lmedit.requests import EditRequest
from cli_helpers import assert_one_line_error, run_cli

REQUESTS = [EditRequest(prompt="The capital of France is", subject="France", target_new=" Rome"),
            EditRequest(prompt="The Eiffel Tower stands in", subject="Eiffel Tower", target_new=" London")]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact"
SETS = {"lr": "0.5", "epochs": "12", "batch_size": "2", "background_docs": "4", "senses_per_example": "3",
        "stop_prob": "none"}


@pytest.fixture(scope="module")
def bp(tiny_model):
    return tiny_model("backpack-gpt2")


def _target_lp(lm, request) -> float:
    from lmedit.evaluate.scoring import continuation_logprobs

    return float(sum(continuation_logprobs(lm.model, lm.tokenizer, [(request.prompt, request.target_new)])[0]))


def _state(model) -> dict:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_senses_patch_applies_and_reverts_bit_exactly(bp, tmp_path, tmp_cache):
    editor = get_editor("senses")
    assert editor.backpack_only and not editor.needs_subject
    config = make_config("senses", bp.name, bp.model, SETS)
    before = _state(bp.model)
    ids = torch.tensor([bp.tokenizer("The capital of France is Rome")["input_ids"]])
    with torch.no_grad():
        logits0 = bp.model(ids).logits.clone()
    lp0 = [_target_lp(bp, r) for r in REQUESTS]
    patch = editor.edit(bp.model, bp.tokenizer, REQUESTS, config, progress=False)
    assert patch.deltas == {} and patch.senses is not None and patch.senses.module == "backpack"
    assert 3 <= patch.senses.n <= 6 and patch.senses.norm() > 0
    assert len(bp.model.backpack.sense_edits) == 0  # the editor leaves the model as it found it
    assert all(torch.equal(t, before[n]) for n, t in bp.model.state_dict().items())
    assert patch.meta["training"][0]["senses"]["n"] == patch.senses.n
    assert any(n.startswith("backpack.sense_network.") for n in patch.meta["fingerprint_names"])

    patch.save(tmp_path / "p")
    loaded = Patch.load(tmp_path / "p")
    assert torch.equal(loaded.senses.vectors, patch.senses.vectors) and torch.equal(loaded.senses.tokens,
                                                                                  patch.senses.tokens)
    applied = loaded.apply(bp.model)
    lp1 = [_target_lp(bp, r) for r in REQUESTS]
    assert all(b > a + 0.5 for a, b in zip(lp0, lp1)), (lp0, lp1)  # the edit took
    applied.revert()
    with torch.no_grad():
        assert torch.equal(bp.model(ids).logits, logits0)  # bit-exact
    assert len(bp.model.backpack.sense_edits) == 0
    assert all(torch.equal(t, before[n]) for n, t in bp.model.state_dict().items())

    # two patches compose into one equal to applying them in order
    with loaded.apply(bp.model), loaded.apply(bp.model):
        with torch.no_grad():
            twice = bp.model(ids).logits.clone()
    both = compose(loaded, loaded)
    assert both.senses.n == 2 * loaded.senses.n
    with both.apply(bp.model):
        with torch.no_grad():
            assert torch.allclose(bp.model(ids).logits, twice, atol=1e-5)


def test_exported_backpack_keeps_its_sense_edits(bp, tmp_path, tmp_cache):
    from lmedit.models.loading import load_model

    patch = get_editor("senses").edit(bp.model, bp.tokenizer, REQUESTS[:1],
                                      make_config("senses", bp.name, bp.model, SETS), progress=False)
    ids = torch.tensor([bp.tokenizer("The capital of France is Rome")["input_ids"]])
    with patch.apply(bp.model), torch.no_grad():
        edited = bp.model(ids).logits.clone()
        bp.model.save_pretrained(tmp_path / "edited")
        bp.tokenizer.save_pretrained(tmp_path / "edited")
    assert json.loads((tmp_path / "edited" / "config.json").read_text())["sense_edit_sizes"] == [patch.senses.n]
    reloaded = load_model(str(tmp_path / "edited"))
    with torch.no_grad():
        assert torch.allclose(reloaded.model(ids).logits, edited, atol=1e-6)


def test_a_senses_patch_on_another_architecture_is_one_clear_error(bp, tiny_model, tmp_cache):
    llama = tiny_model("llama")
    with pytest.raises(InputError, match="Backpack"):
        get_editor("senses").edit(llama.model, llama.tokenizer, REQUESTS, get_editor("senses").config_cls(),
                                  progress=False)
    patch = get_editor("senses").edit(bp.model, bp.tokenizer, REQUESTS[:1],
                                      make_config("senses", bp.name, bp.model, SETS), progress=False)
    with pytest.raises(InputError, match="no Backpack"):
        patch.apply(llama.model)
    with pytest.raises(InputError, match="layers and modules do not apply"):
        get_editor("senses").edit(bp.model, bp.tokenizer, REQUESTS,
                                  make_config("senses", bp.name, bp.model, {"layers": "1"}), progress=False)


def test_cli_edit_senses_then_apply_and_revert_is_bit_exact(bp, tmp_path, monkeypatch, capsys, tmp_cache):
    """`lmedit edit --method senses` on a Backpack directory; on the embedded model, one line and exit code 2."""
    from lmedit.models.loading import load_model

    d = tmp_path / "backpack"
    bp.model.save_pretrained(d)
    bp.tokenizer.save_pretrained(d)
    reqs = tmp_path / "r.jsonl"
    reqs.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in REQUESTS))
    capsys.readouterr()
    code, err = run_cli(monkeypatch, capsys, "edit", "--method", "senses", "-r", reqs, "-o", tmp_path / "x")
    assert_one_line_error(code, err, "not a Backpack", "smollm2-135m")
    assert not (tmp_path / "x").exists()
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]
    monkeypatch.setattr(sys, "argv", ["lmedit", "edit", "--method", "senses", "--model", str(d), "-r", str(reqs),
                                      "-o", str(tmp_path / "p"), *sets])
    cli.main()
    lm = load_model(str(d))
    ids = torch.tensor([lm.tokenizer("The capital of France is Rome")["input_ids"]])
    with torch.no_grad():
        logits0 = lm.model(ids).logits.clone()
        applied = Patch.load(tmp_path / "p").apply(lm.model)
        assert not torch.equal(lm.model(ids).logits, logits0)
        applied.revert()
        assert torch.equal(lm.model(ids).logits, logits0)


def test_counterfact_evaluation_runs_the_senses_editor(bp, tmp_cache):
    """The evaluation runner takes `senses` like any editor (a Backpack has no KV cache: scoring runs whole
    sequences); the edits it scores are the sense deltas of the patch, and the model comes back unedited."""
    from lmedit.evaluate.run import run_edit_eval
    from lmedit.requests import load_requests

    reqs = load_requests(DATA / "counterfact-edit.json", limit=4)
    before = _state(bp.model)
    result = run_edit_eval(bp, "senses", reqs, 4, overrides={**SETS, "epochs": "5"}, progress=False,
                           announce=lambda *_: None)
    assert result["method"] == "senses" and result["metrics"]["n"] == 4
    assert result["metrics"]["efficacy"] > result["baseline"]["efficacy"]
    assert len(bp.model.backpack.sense_edits) == 0
    assert all(torch.equal(t, before[n]) for n, t in bp.model.state_dict().items())
