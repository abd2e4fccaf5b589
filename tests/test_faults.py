"""The bad-input and fault suite (issue 18): what a hostile or careless user does, through the real CLI.

Every case asserts the exit code (2 for bad input), exactly one line on stderr, no traceback, the words that
say what was wrong with what, and that no output a later run would trust was left behind. Cases run in
process on a tiny random Llama saved as an HF directory (the real SmolLM2 tokenizer), so the suite is quick.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import assert_one_line_error, run_cli
from lmedit import cli

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CF = DATA / "counterfact" / "counterfact-edit.json"
GOOD = {"prompt": "The Eiffel Tower is located in the city of", "subject": "The Eiffel Tower",
        "target_new": "Rome", "target_true": "Paris"}
DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    lm = tiny_model("llama")
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def patch_dir(model_dir, tmp_path_factory) -> Path:
    """A genuine patch for the tiny model: a small dense delta on one MLP output weight."""
    from lmedit.models import load_model
    from lmedit.patches import Delta, Patch

    model = load_model(str(model_dir)).model
    W = model.get_parameter(DOWN)
    torch.manual_seed(0)
    patch = Patch.build(model, {DOWN: Delta(dense=0.01 * torch.randn_like(W).detach())}, method="rome",
                        config={"layers": [1]}, requests=[GOOD], model_name="tiny")
    folder = tmp_path_factory.mktemp("patches") / "good"
    patch.save(folder)
    return folder


assert_refused = assert_one_line_error


def assert_nothing_left(*paths: Path) -> None:
    """Neither the output nor a temporary file or folder beside it (atomic writes use '.NAME.*')."""
    for path in paths:
        assert not path.exists(), f"{path} was left behind"
        if path.parent.is_dir():
            assert not list(path.parent.glob(f".{path.name}.*")), f"a temporary {path.name} was left behind"


def jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def copy_patch(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def damage_tensor(folder: Path, value: float, drop_digest: bool = False) -> None:
    tensors = load_file(str(folder / "patch.safetensors"))
    tensors[f"{DOWN}::dense"].view(-1)[5] = value
    save_file(tensors, str(folder / "patch.safetensors"), metadata={"format": "lmedit-patch/1"})
    if drop_digest:
        doc = json.loads((folder / "patch.json").read_text())
        doc.pop("integrity")
        (folder / "patch.json").write_text(json.dumps(doc))


# ---- usage errors: the parser's own (Typer vendors click; they must still be one line, exit 2)

@pytest.mark.parametrize("args,phrases", [
    (["edit", "--requests", "r.jsonl"], ["Missing option '--out'", "lmedit edit --help"]),
    (["edit", "--requests", "r.jsonl", "--out", "p", "--bogus", "1"], ["No such option: --bogus"]),
    (["edit", "--requests", "r.jsonl", "--out", "p", "--limit", "abc"], ["--limit"]),
    (["frobnicate"], ["No such command 'frobnicate'"]),
    (["stats", "compute", "--layers", "2", "--max-length", "x"], ["--max-length"]),
    (["eval", "counterfact", "--data", "x.json"], ["Missing option '--out'"]),
], ids=["missing-option", "unknown-option", "bad-int", "unknown-command", "bad-int-stats", "eval-missing-out"])
def test_usage_errors(monkeypatch, capsys, tmp_path, args, phrases):
    monkeypatch.chdir(tmp_path)
    assert_refused(*run_cli(monkeypatch, capsys, *args), *phrases)


# ---- request files

def test_binary_requests_file(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "r.json"
    bad.write_bytes(bytes(range(256)) * 4)
    assert_refused(*run_cli(monkeypatch, capsys, "edit", "--requests", bad, "--out", tmp_path / "p"),
                   str(bad), "not UTF-8 text")
    assert_nothing_left(tmp_path / "p")


def test_binary_line_in_a_jsonl_file(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "r.jsonl"
    bad.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\x00garbage\n")
    assert_refused(*run_cli(monkeypatch, capsys, "edit", "--requests", bad, "--out", tmp_path / "p"),
                   "not UTF-8 text", "line 2")


def test_requests_path_is_a_directory(monkeypatch, capsys, tmp_path):
    assert_refused(*run_cli(monkeypatch, capsys, "edit", "--requests", tmp_path, "--out", tmp_path / "p"),
                   "not found", str(tmp_path))


def test_empty_requests_file(monkeypatch, capsys, tmp_path):
    (tmp_path / "r.jsonl").write_text("\n\n")
    assert_refused(*run_cli(monkeypatch, capsys, "edit", "--requests", tmp_path / "r.jsonl", "--out", tmp_path / "p"),
                   "empty")


def test_requests_json_is_an_object(monkeypatch, capsys, tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(GOOD))
    assert_refused(*run_cli(monkeypatch, capsys, "edit", "--requests", tmp_path / "r.json", "--out", tmp_path / "p"),
                   "expected a JSON list")


def test_limit_zero(monkeypatch, capsys, tmp_path):
    reqs = jsonl(tmp_path / "r.jsonl", [GOOD])
    assert_refused(*run_cli(monkeypatch, capsys, "edit", "--requests", reqs, "--out", tmp_path / "p", "--limit", "0"),
                   "--limit must be a positive integer")


# ---- outputs that cannot be written: refused before any model work

def test_edit_output_under_a_file(monkeypatch, capsys, tmp_path):
    (tmp_path / "existing.txt").write_text("keep me")
    reqs = jsonl(tmp_path / "r.jsonl", [GOOD])
    out = tmp_path / "existing.txt" / "sub"
    assert_refused(*run_cli(monkeypatch, capsys, "edit", "--requests", reqs, "--out", out),
                   "existing.txt is a file, not a directory")
    assert (tmp_path / "existing.txt").read_text() == "keep me"


def test_export_output_under_a_file(monkeypatch, capsys, tmp_path, patch_dir, model_dir):
    (tmp_path / "existing.txt").write_text("keep me")
    assert_refused(*run_cli(monkeypatch, capsys, "export", "--patch", patch_dir, "--model", model_dir,
                            "--out", tmp_path / "existing.txt" / "sub"), "is a file, not a directory")


def test_eval_output_under_a_file(monkeypatch, capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    assert_refused(*run_cli(monkeypatch, capsys, "eval", "counterfact", "--data", CF, "--limit", "2",
                            "--out", tmp_path / "f" / "o.json"), "is a file, not a directory")


def test_export_refuses_to_overwrite_without_force(monkeypatch, capsys, tmp_path, patch_dir, model_dir):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "mine.txt").write_text("keep")
    assert_refused(*run_cli(monkeypatch, capsys, "export", "--patch", patch_dir, "--model", model_dir,
                            "--out", tmp_path / "m"), "already exists", "--force")
    assert (tmp_path / "m" / "mine.txt").read_text() == "keep"


# ---- damaged or edited patches (the two worst findings of issue 18)

def test_export_of_a_good_patch_works(monkeypatch, capsys, tmp_path, patch_dir, model_dir):
    """The control: the same command on an undamaged copy succeeds, so the refusals below are the damage's."""
    monkeypatch.setattr(sys, "argv", ["lmedit", "export", "--patch", str(patch_dir), "--model", str(model_dir),
                                      "--out", str(tmp_path / "m")])
    cli.main()  # returns normally
    assert (tmp_path / "m" / "config.json").is_file()


def test_one_float_set_to_1e30(monkeypatch, capsys, tmp_path, patch_dir, model_dir):
    p = copy_patch(patch_dir, tmp_path / "p")
    damage_tensor(p, 1e30)
    assert_refused(*run_cli(monkeypatch, capsys, "export", "--patch", p, "--model", model_dir, "--out", tmp_path / "m"),
                   "patch.safetensors does not match the digest")
    assert_nothing_left(tmp_path / "m")


def test_1e30_in_an_old_patch_without_digest_hits_the_size_check(monkeypatch, capsys, tmp_path, patch_dir, model_dir):
    p = copy_patch(patch_dir, tmp_path / "p")
    damage_tensor(p, 1e30, drop_digest=True)
    code, err = run_cli(monkeypatch, capsys, "export", "--patch", p, "--model", model_dir, "--out", tmp_path / "m")
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "warning" in lines[0] and "no digest" in lines[0], err  # the old-patch warning
    assert "times the weight's own" in lines[1] and "--force" in lines[1]
    assert_nothing_left(tmp_path / "m")


def test_inf_in_a_patch(monkeypatch, capsys, tmp_path, patch_dir, model_dir):
    p = copy_patch(patch_dir, tmp_path / "p")
    damage_tensor(p, float("inf"), drop_digest=True)
    code, err = run_cli(monkeypatch, capsys, "export", "--patch", p, "--model", model_dir, "--out", tmp_path / "m")
    assert code == 2 and "non-finite" in err.strip().splitlines()[-1]
    assert_nothing_left(tmp_path / "m")


@pytest.mark.parametrize("field,value", [("method", "memit"), ("requests", [{**GOOD, "target_new": "Berlin"}])])
def test_hand_edited_patch_json(monkeypatch, capsys, tmp_path, patch_dir, model_dir, field, value):
    p = copy_patch(patch_dir, tmp_path / "p")
    doc = json.loads((p / "patch.json").read_text())
    doc[field] = value
    (p / "patch.json").write_text(json.dumps(doc, indent=2))
    assert_refused(*run_cli(monkeypatch, capsys, "export", "--patch", p, "--model", model_dir, "--out", tmp_path / "m"),
                   "patch.json was changed after the patch was saved")
    assert_nothing_left(tmp_path / "m")


def test_truncated_patch_tensors(monkeypatch, capsys, tmp_path, patch_dir, model_dir):
    p = copy_patch(patch_dir, tmp_path / "p")
    data = (p / "patch.safetensors").read_bytes()
    (p / "patch.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(*run_cli(monkeypatch, capsys, "export", "--patch", p, "--model", model_dir, "--out", tmp_path / "m"),
                   "patch.safetensors")
    assert_nothing_left(tmp_path / "m")


def test_missing_patch_directory(monkeypatch, capsys, tmp_path, model_dir):
    assert_refused(*run_cli(monkeypatch, capsys, "export", "--patch", tmp_path / "nope", "--model", model_dir,
                            "--out", tmp_path / "m"), "patch directory not found")


def test_patch_json_is_not_json(monkeypatch, capsys, tmp_path, patch_dir, model_dir):
    p = copy_patch(patch_dir, tmp_path / "p")
    (p / "patch.json").write_text("{ not json")
    assert_refused(*run_cli(monkeypatch, capsys, "export", "--patch", p, "--model", model_dir, "--out", tmp_path / "m"),
                   "malformed JSON")


def test_export_gguf_type_unknown(monkeypatch, capsys, tmp_path, patch_dir, model_dir):
    assert_refused(*run_cli(monkeypatch, capsys, "export", "--patch", patch_dir, "--model", model_dir,
                            "--out", tmp_path / "m.gguf", "--gguf-type", "q9"), "--gguf-type must be one of")


def test_export_gguf_from_an_hf_model(monkeypatch, capsys, tmp_path, patch_dir, model_dir):
    assert_refused(*run_cli(monkeypatch, capsys, "export", "--patch", patch_dir, "--model", model_dir,
                            "--out", tmp_path / "m.gguf"), "is not one")


# ---- models

def test_model_path_does_not_exist(monkeypatch, capsys, tmp_path):
    reqs = jsonl(tmp_path / "r.jsonl", [GOOD])
    code, err = run_cli(monkeypatch, capsys, "edit", "--requests", reqs, "--out", tmp_path / "p",
                        "--model", tmp_path / "no-model")
    assert_refused(code, err, "no-model")
    assert_nothing_left(tmp_path / "p")


def test_device_and_device_map_together(monkeypatch, capsys, tmp_path, model_dir):
    monkeypatch.setenv("LMEDIT_DEVICE", "cpu")
    monkeypatch.setenv("LMEDIT_DEVICE_MAP", "auto")
    reqs = jsonl(tmp_path / "r.jsonl", [GOOD])
    assert_refused(*run_cli(monkeypatch, capsys, "edit", "--requests", reqs, "--out", tmp_path / "p",
                            "--model", model_dir), "--device (LMEDIT_DEVICE) or LMEDIT_DEVICE_MAP, not both")


# ---- settings

@pytest.mark.parametrize("setting,phrase", [("no_such_knob=1", "unknown setting 'no_such_knob'"),
                                            ("value=3", "is a group of settings"),
                                            ("mom2_weight=nan", "finite")])
def test_bad_settings(monkeypatch, capsys, tmp_path, model_dir, setting, phrase):
    reqs = jsonl(tmp_path / "r.jsonl", [GOOD])
    assert_refused(*run_cli(monkeypatch, capsys, "edit", "--method", "memit", "--requests", reqs, "--out", tmp_path / "p",
                            "--model", model_dir, "--set", setting), phrase)
    assert_nothing_left(tmp_path / "p")


# ---- trace

@pytest.mark.parametrize("extra,phrase", [(["--answer", "   "], "--answer is blank"),
                                          (["--kind", "mlp,brain"], "--kind must be a comma list"),
                                          (["--subject", "Big Ben"], "does not occur in the prompt")])
def test_trace_bad_input(monkeypatch, capsys, tmp_path, extra, phrase):
    args = ["trace", "--prompt", GOOD["prompt"], "--out", tmp_path / "t"]
    if "--subject" not in extra:
        args += ["--subject", GOOD["subject"]]
    assert_refused(*run_cli(monkeypatch, capsys, *args, *extra), phrase)
    assert_nothing_left(tmp_path / "t")


def test_trace_prompt_without_subject(monkeypatch, capsys, tmp_path):
    assert_refused(*run_cli(monkeypatch, capsys, "trace", "--prompt", GOOD["prompt"], "--out", tmp_path / "t"),
                   "--prompt needs --subject")


# ---- eval

def test_eval_unfinished_journal_needs_resume_or_force(monkeypatch, capsys, tmp_path):
    (tmp_path / "o.json.journal.jsonl").write_text("{}\n")
    assert_refused(*run_cli(monkeypatch, capsys, "eval", "counterfact", "--data", CF, "--limit", "2",
                            "--out", tmp_path / "o.json"), "unfinished run", "--resume")


@pytest.mark.parametrize("extra,phrase", [(["--shard", "3/2"], "shard"),
                                          (["--shard", "1/2", "--sequential"], "cannot be sharded")])
def test_eval_bad_shards(monkeypatch, capsys, tmp_path, extra, phrase):
    assert_refused(*run_cli(monkeypatch, capsys, "eval", "counterfact", "--data", CF, "--limit", "4",
                            "--batch-size", "2", "--out", tmp_path / "o.json", *extra), phrase)


def test_eval_merge_of_files_that_are_not_results(monkeypatch, capsys, tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "b.json").write_text(json.dumps([1, 2]))
    code, err = run_cli(monkeypatch, capsys, "eval", "merge", tmp_path / "a.json", tmp_path / "b.json",
                        "--out", tmp_path / "m.json")
    assert_refused(code, err)
    assert_nothing_left(tmp_path / "m.json")


# ---- statistics and reports

@pytest.mark.parametrize("extra,phrase", [(["--unit", "bytes"], "documents"), (["--n", "-5"], "--n"),
                                          (["--n", "lots"], "lots")])
def test_stats_bad_sample(monkeypatch, capsys, tmp_path, extra, phrase):
    assert_refused(*run_cli(monkeypatch, capsys, "stats", "compute", "--layers", "1", *extra), phrase)


def test_stats_inspect_without_a_cache(monkeypatch, capsys, tmp_path, model_dir, tmp_cache):
    assert_refused(*run_cli(monkeypatch, capsys, "stats", "inspect", "--layer", "1", "--model", model_dir),
                   "no statistics for layer 1", "lmedit stats compute")


def test_report_of_a_missing_file(monkeypatch, capsys, tmp_path):
    assert_refused(*run_cli(monkeypatch, capsys, "report", tmp_path / "nope.json", "--out", tmp_path / "r"),
                   "nope.json")
    assert_nothing_left(tmp_path / "r")


def test_report_of_a_file_that_is_not_a_result(monkeypatch, capsys, tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"a": 1}))
    assert_refused(*run_cli(monkeypatch, capsys, "report", tmp_path / "x.json", "--out", tmp_path / "r"), "x.json")


# ---- kill tests: a process killed while it writes leaves nothing a later run trusts

KILLED_WRITER = r"""
import sys, time
from pathlib import Path
import torch
import lmedit.patches as patches

ready = Path(sys.argv[2])
def stall(path, obj):  # patch.safetensors is written; patch.json is next: die here
    ready.write_text("1")
    time.sleep(120)
patches.atomic_write_json = stall
patch = patches.Patch({"w": patches.Delta(dense=torch.ones(4, 4))}, {"method": "test"})
patch.save(sys.argv[1])
"""


def test_sigkill_while_a_patch_is_written(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from lmedit.errors import InputError
    from lmedit.patches import Delta, Patch

    out, ready = tmp_path / "patch", tmp_path / "ready"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out), str(ready)], env=env)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None, "the writer exited before it reached the point to kill it at"
            assert time.time() < deadline, "the writer never got to write its patch"
            time.sleep(0.05)
        half = [p for p in tmp_path.glob(".patch.*") if (p / "patch.safetensors").is_file()]
        assert half, "the tensors should be half-way written in a temporary directory"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()  # the patch never appeared under its name
    with pytest.raises(InputError, match="patch directory not found"):
        Patch.load(out)
    Patch({"w": Delta(dense=torch.ones(4, 4))}, {"method": "test"}).save(out)  # the next run is not blocked
    assert torch.equal(Patch.load(out).deltas["w"].dense, torch.ones(4, 4))


# ---- real data files have bad records: refused together by default, or left out and listed

def _zsre_with_bad_records(tmp_path) -> Path:
    records = json.loads((DATA / "zsre" / "zsre-500.json").read_text())[:4]
    records[1] = {**records[1], "alt": ""}
    records[3] = {**records[3], "alt": "   "}
    path = tmp_path / "zsre-bad.json"
    path.write_text(json.dumps(records))
    return path


def test_every_bad_record_is_named(monkeypatch, capsys, tmp_path):
    data = _zsre_with_bad_records(tmp_path)
    assert_refused(*run_cli(monkeypatch, capsys, "eval", "zsre", "--data", data, "--out", tmp_path / "o.json"),
                   "2 invalid records", "record 1", "record 3", "--skip-invalid")
    assert_nothing_left(tmp_path / "o.json")


def test_skip_invalid_leaves_them_out_and_lists_them(monkeypatch, capsys, tmp_path, model_dir, tmp_cache):
    data = _zsre_with_bad_records(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lmedit", "eval", "zsre", "--data", str(data), "--out", str(tmp_path / "o.json"),
                                      "--model", str(model_dir), "--method", "ft", "--set", "epochs=1",
                                      "--skip-invalid", "--no-generated", "--no-reuse-values"])
    cli.main()
    result = json.loads((tmp_path / "o.json").read_text())
    assert result["n"] == 2
    skipped = result["skipped_invalid"]
    assert skipped["n"] == 2 and [r["where"].rsplit(" ", 1)[-1] for r in skipped["records"]] == ["1", "3"]
    assert all("alt" in r["reason"] or "target" in r["reason"] for r in skipped["records"]), skipped
    assert "left out 2 invalid record(s)" in capsys.readouterr().out
