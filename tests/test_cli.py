"""Bad input through the CLI: one line on stderr, exit code 2, no traceback, no half-written output."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from pathlib import Path

from lmedit import cli
from cli_helpers import assert_one_line_error, run_cli

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

GOOD = {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
        "target_new": "Rome", "target_true": "Paris"}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_subject_not_in_prompt(tmp_path, monkeypatch, capsys):
    reqs = write_jsonl(tmp_path / "r.jsonl", [GOOD, {**GOOD, "subject": "Big Ben"}])
    code, err = run_cli(monkeypatch, capsys, "edit", "--requests", reqs, "--out", str(tmp_path / "p"))
    assert_one_line_error(code, err, "line 2", "Big Ben", "does not occur")
    assert not (tmp_path / "p").exists()


def test_empty_target(tmp_path, monkeypatch, capsys):
    reqs = write_jsonl(tmp_path / "r.jsonl", [{**GOOD, "target_new": "  "}])
    code, err = run_cli(monkeypatch, capsys, "edit", "--requests", reqs, "--out", str(tmp_path / "p"))
    assert_one_line_error(code, err, "target_new")


def test_malformed_jsonl_names_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + "{not json\n")
    code, err = run_cli(monkeypatch, capsys, "edit", "--requests", str(path), "--out", str(tmp_path / "p"))
    assert_one_line_error(code, err, "line 2")


def test_malformed_json_names_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "cf.json"
    path.write_text('[\n {"prompt": "x",\n  oops}\n]')
    code, err = run_cli(monkeypatch, capsys, "eval", "counterfact", "--data", str(path), "--out", str(tmp_path / "o.json"))
    assert_one_line_error(code, err, "line 3")


def test_missing_file(tmp_path, monkeypatch, capsys):
    code, err = run_cli(monkeypatch, capsys, "edit", "--requests", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "p"))
    assert_one_line_error(code, err, "not found", "nope.jsonl")


def test_unknown_model_type(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    reqs = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    code, err = run_cli(monkeypatch, capsys, "edit", "--model", str(model_dir), "--requests", reqs,
                        "--out", str(tmp_path / "p"))
    assert_one_line_error(code, err, "unknown model architecture 'bert'", "llama")


def test_unknown_method(tmp_path, monkeypatch, capsys):
    reqs = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    code, err = run_cli(monkeypatch, capsys, "edit", "--method", "magic", "--requests", reqs, "--out", str(tmp_path / "p"))
    assert_one_line_error(code, err, "unknown method 'magic'", "rome")


def test_output_exists_without_force(tmp_path, monkeypatch, capsys):
    out = tmp_path / "p"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    reqs = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    code, err = run_cli(monkeypatch, capsys, "edit", "--requests", reqs, "--out", str(out))
    assert_one_line_error(code, err, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "user data"


def test_eval_output_exists_without_force(tmp_path, monkeypatch, capsys):
    out = tmp_path / "res.json"
    out.write_text("{}")
    code, err = run_cli(monkeypatch, capsys, "eval", "counterfact", "--data", "x.json", "--out", str(out))
    assert_one_line_error(code, err, "already exists")
    assert out.read_text() == "{}"


@pytest.mark.slow
def test_layer_out_of_range(tmp_path, monkeypatch, capsys):
    reqs = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    code, err = run_cli(monkeypatch, capsys, "edit", "--method", "rome", "--requests", reqs,
                        "--out", str(tmp_path / "p"), "--set", "layers=99")
    assert_one_line_error(code, err, "layer 99 is out of range", "0..29")
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_patch_for_another_model_is_refused(tmp_path, monkeypatch, capsys):
    import torch

    from lmedit.patches import Delta, Patch

    name = "model.layers.4.mlp.down_proj.weight"
    Patch({name: Delta(dense=torch.zeros(576, 1536))}, {"base_fingerprint": "0" * 64, "method": "test"}).save(tmp_path / "p")
    code, err = run_cli(monkeypatch, capsys, "export", "--patch", str(tmp_path / "p"), "--out", str(tmp_path / "m"))
    assert_one_line_error(code, err, "different base model")
    assert not (tmp_path / "m").exists()


def test_bad_set_value(tmp_path, monkeypatch, capsys):
    reqs = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    code, err = run_cli(monkeypatch, capsys, "edit", "--method", "memit", "--requests", reqs,
                        "--out", str(tmp_path / "p"), "--set", "no_such_knob=1")
    assert_one_line_error(code, err, "unknown setting 'no_such_knob'", "mom2_weight")


def test_eval_with_data_of_another_task_names_the_format(tmp_path, monkeypatch, capsys):
    zsre = tmp_path / "z.json"
    zsre.write_text(json.dumps([{"subject": "UniFirst", "src": "What is the product made by UniFirst?", "alt": "cars",
                                 "answers": ["uniform"], "rephrase": "What does UniFirst make?", "loc": "nq question: x",
                                 "loc_ans": "y"}]))
    code, err = run_cli(monkeypatch, capsys, "eval", "counterfact", "--data", str(zsre), "--out", str(tmp_path / "o.json"))
    assert_one_line_error(code, err, "holds zsre records", "expects counterfact")
    cf = tmp_path / "cf.json"
    cf.write_text(json.dumps([{"case_id": 0, "prompt": GOOD["prompt"], "subject": GOOD["subject"], "target_new": "Rome",
                               "ground_truth": "Paris", "rephrase_prompt": "x The Eiffel Tower is in",
                               "locality_prompt": "The Louvre is in", "locality_ground_truth": "Paris"}]))
    code, err = run_cli(monkeypatch, capsys, "eval", "zsre", "--data", str(cf), "--out", str(tmp_path / "o.json"))
    assert_one_line_error(code, err, "expects zsre")


@pytest.mark.parametrize("bad", ["0", "10,0", "x"])
def test_eval_rejects_bad_batch_sizes(tmp_path, monkeypatch, capsys, bad):
    code, err = run_cli(monkeypatch, capsys, "eval", "counterfact", "--data", str(DATA / "counterfact" / "counterfact-edit.json"),
                        "--limit", "5", "--batch-size", bad, "--out", str(tmp_path / "o.json"))
    assert_one_line_error(code, err, "--batch-size")


def test_eval_limit_beyond_the_data(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "zsre" / "zsre-500.json"
    code, err = run_cli(monkeypatch, capsys, "eval", "zsre", "--data", str(data), "--limit", "501",
                        "--out", str(tmp_path / "o.json"))
    assert_one_line_error(code, err, "--limit 501 exceeds the 500 records")


def test_help_lists_every_registered_method():
    from lmedit.editors import editor_names

    from typer.testing import CliRunner

    from lmedit.editors import BUILTIN_METHODS

    assert sorted(BUILTIN_METHODS) == editor_names()  # the start-up list matches what registers itself
    for command in (["edit"], ["eval", "counterfact"], ["eval", "zsre"]):
        shown = CliRunner().invoke(cli.app, [*command, "--help"], env={"COLUMNS": "200"}).output
        for name in editor_names():
            assert f" {name} " in shown.replace("|", " ") or shown.rstrip().endswith(name), (command, name)


@pytest.mark.slow
def test_export_gguf_round_trip(smol, tmp_path, monkeypatch, capsys):
    """A patch on an MLP output and on q/k (whose rows llama.cpp stores in another order) exported as GGUF
    loads back, through transformers' GGUF reader, to the edited weights exactly and the same next-token logits;
    the untouched tensors keep the source's 4-bit type byte for byte."""
    import gguf
    import torch

    from lmedit.models.loading import gguf_source, load_model
    from lmedit.patches import Delta, Patch

    model = smol.model
    names = ["model.layers.4.mlp.down_proj.weight", "model.layers.3.self_attn.q_proj.weight",
             "model.layers.3.self_attn.k_proj.weight"]
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    deltas = {n: Delta(left=0.05 * torch.randn(params[n].shape[0], 2, generator=g),
                       right=torch.randn(2, params[n].shape[1], generator=g)) for n in names}
    Patch.build(model, deltas, method="test").save(tmp_path / "p")
    out = tmp_path / "edited.gguf"
    monkeypatch.setattr(sys, "argv", ["lmedit", "export", "--patch", str(tmp_path / "p"), "--out", str(out)])
    cli.main()  # returns on success
    assert "3 edited tensor(s) in f32" in capsys.readouterr().out
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with Patch.load(tmp_path / "p").apply(model), torch.no_grad():
        edited = {n: params[n].detach().clone() for n in names}
        want = model(input_ids=ids).logits
    loaded = load_model(str(out)).model
    theirs = dict(loaded.named_parameters())
    for n in names:
        assert torch.equal(theirs[n], edited[n]), n
        assert not torch.equal(theirs[n], params[n]), n  # the edit is in the file
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    source = {t.name: t for t in gguf.GGUFReader(gguf_source("smollm2-135m")).tensors}
    written = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert written.keys() == source.keys()
    assert written["blk.4.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert written["blk.5.ffn_down.weight"].tensor_type == source["blk.5.ffn_down.weight"].tensor_type
    assert bytes(written["blk.5.ffn_down.weight"].data) == bytes(source["blk.5.ffn_down.weight"].data)


def test_export_gguf_needs_a_gguf_model(tmp_path, monkeypatch, capsys):
    code, err = run_cli(monkeypatch, capsys, "export", "--patch", str(tmp_path / "p"), "--out",
                        str(tmp_path / "x.gguf"), "--model", str(tmp_path))
    assert_one_line_error(code, err, "GGUF export rewrites the GGUF file", "convert_hf_to_gguf")
    code, err = run_cli(monkeypatch, capsys, "export", "--patch", str(tmp_path / "p"), "--out",
                        str(tmp_path / "x.gguf"), "--gguf-type", "q4")
    assert_one_line_error(code, err, "--gguf-type must be one of f32, f16")
    assert not (tmp_path / "x.gguf").exists()


def test_bench_scoring_part_on_a_tiny_model(tiny_model, tmp_path, monkeypatch, capsys):
    """The scoring part times both ways on the same records and proves they agree; bad parts are one line."""
    from lmedit.bench import run_bench
    from lmedit.requests import load_requests

    records = load_requests(DATA / "counterfact" / "counterfact-edit.json", limit=4)
    result = run_bench(tiny_model("llama"), records, tmp_path / "b", ["scoring"], scoring_n=4)
    assert result["scoring_records"] == 4 and result["scoring_max_metric_diff"] <= 1e-5
    assert result["scoring_speedup"] > 0 and result["scoring_max_logp_diff"] <= 1e-4
    doc = json.loads((tmp_path / "b" / "locate.json").read_text())
    assert doc["scoring_batched_records_per_s"] == result["scoring_batched_records_per_s"]
    assert "| scoring_speedup |" in (tmp_path / "b" / "locate.md").read_text()
    capsys.readouterr()  # the part's progress line
    code, err = run_cli(monkeypatch, capsys, "bench", "--data", str(DATA / "counterfact" / "counterfact-edit.json"),
                        "--out", str(tmp_path / "c"), "--parts", "scoring,warp")
    assert_one_line_error(code, err, "--parts must be a comma list")
    code, err = run_cli(monkeypatch, capsys, "bench", "--data", str(DATA / "counterfact" / "counterfact-edit.json"),
                        "--out", str(tmp_path / "c"), "--scoring-n", "0")
    assert_one_line_error(code, err, "--scoring-n must be at least 1")


def test_edit_with_fine_tuning_checkpoints_beside_the_patch(tiny_model, tmp_path, monkeypatch, capsys):
    """`lmedit edit --method ft-conditional`: killed after epoch 1, the same command resumes from OUT.train and
    writes the patch an uninterrupted run writes; the checkpoint goes once the patch is saved."""
    from safetensors.torch import load_file

    from lmedit.editors import finetune

    lm = tiny_model("llama")
    model_dir = tmp_path / "tiny"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    reqs = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    args = ["edit", "--model", str(model_dir), "--method", "ft-conditional", "--requests", reqs,
            "--set", "layers=1", "--set", "epochs=3", "--set", "stop_prob=1", "--set", "patience=0"]
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    def succeeds(*argv):
        monkeypatch.setattr(sys, "argv", ["lmedit", *argv])
        cli.main()  # returns: no SystemExit on success

    succeeds(*args, "--out", str(tmp_path / "whole"))
    real, calls = finetune.example_loss, {"n": 0}

    def dies_in_epoch_2(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(finetune, "example_loss", dies_in_epoch_2)
    code, err = run_cli(monkeypatch, capsys, *args, "--out", str(tmp_path / "p"))
    assert code == 130 and "lmedit: interrupted" in err  # Ctrl-C: a non-zero exit, not a silent success
    assert not (tmp_path / "p").exists() and (tmp_path / "p.train" / "state.json").is_file()
    monkeypatch.setattr(finetune, "example_loss", real)
    succeeds(*args, "--out", str(tmp_path / "p"))
    assert not (tmp_path / "p.train").exists()
    whole, resumed = load_file(tmp_path / "whole" / "patch.safetensors"), load_file(tmp_path / "p" / "patch.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_eval_names_every_protocol_and_turns_generation_checks_off(tiny_model, tmp_path, monkeypatch, capsys):
    """`eval zsre` writes MEMIT's specificity, EasyEdit's locality and the generation checks, each named;
    `eval counterfact --no-generated` the mean per-token and summed comparisons without them."""
    lm = tiny_model("llama")
    model_dir = tmp_path / "tiny"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    fast = ["--method", "ft", "--set", "layers=1", "--set", "epochs=1", "--limit", "1", "--model", str(model_dir)]

    def succeeds(*argv):
        monkeypatch.setattr(sys, "argv", ["lmedit", *argv])
        cli.main()  # returns: no SystemExit on success

    succeeds("eval", "zsre", "--data", str(DATA / "zsre" / "zsre-500.json"), "--out", str(tmp_path / "z.json"), *fast)
    z = json.loads((tmp_path / "z.json").read_text())
    assert {"specificity", "locality", "edit_score", "edit_score_locality", "efficacy_generated"} <= set(z["metrics"])
    assert z["baseline"]["locality"] == 1.0 and "MEMIT" in z["protocol"]["specificity"]
    succeeds("eval", "counterfact", "--data", str(DATA / "counterfact" / "counterfact-edit.json"), "--no-generated",
             "--out", str(tmp_path / "c.json"), *fast)
    c = json.loads((tmp_path / "c.json").read_text())
    assert {"efficacy", "efficacy_summed", "edit_score_summed"} <= set(c["metrics"])
    assert not any(k.endswith("_generated") for k in c["metrics"]) and set(c["protocol"]) <= set(c["metrics"])


def test_unknown_headline_convention_lists_the_valid_ones(monkeypatch, capsys, tmp_path):
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"task": "counterfact", "method": "rome", "metrics": {}, "baseline": {}, "n": 1}))
    code, err = run_cli(monkeypatch, capsys, "report", str(result), "--out", str(tmp_path / "rep"),
                        "--headline", "per-token-ish")
    assert_one_line_error(code, err, "per-token-ish", "reference", "whole-target")
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("setting, phrases", [
    ("value.site=stream", ("stream", "residual", "mlp_out")),
    ("key_average=median", ("median", "by_kind", "uniform")),
])
def test_unknown_locate_choice_lists_the_valid_ones(monkeypatch, capsys, tmp_path, setting, phrases):
    requests = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    code, err = run_cli(monkeypatch, capsys, "edit", "--model", "smollm2-135m", "--method", "memit",
                        "--requests", requests, "--out", str(tmp_path / "p"), "--set", setting)
    assert_one_line_error(code, err, *phrases)
    assert not (tmp_path / "p").exists()
