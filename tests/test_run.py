"""Edit-then-score modes: batch vs sequential, the model left untouched, the result JSON's shape."""

from __future__ import annotations

import torch

from lmedit.evaluate.run import run_edit_eval
from lmedit.models.arch import get_module
from lmedit.requests import EditRequest

REQUESTS = [
    EditRequest("The capital of France is", "France", "Rome", "Paris", paraphrases=("France's capital city is",),
                neighborhood=(("The capital of Spain is", "Madrid"),)),
    EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French",
                neighborhood=(("Michel Rocard is a native speaker of", "French"),)),
    EditRequest("Toyota was founded in the country of", "Toyota", "Germany", "Japan"),
]
FAST = {"identity_cov": "true", "mom2_weight": "0.01", "layers": "1,2", "value.steps": "5", "n_context": "1"}


def _editable(lm):
    """Scale the random unembedding so a residual at the edit point can move the tiny model's predictions."""
    with torch.no_grad():
        get_module(lm.model, lm.arch.unembed).weight.mul_(30.0)
    return lm


def _logps(result):
    return [r["prompt"]["logp_new"] for r in result["records"]]


def test_sequential_differs_from_batch_and_model_is_untouched(tiny_model):
    lm = _editable(tiny_model("llama"))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    batch = run_edit_eval(lm, "memit", REQUESTS, batch_size=1, overrides=FAST, progress=False, announce=lambda *_: None)
    seq = run_edit_eval(lm, "memit", REQUESTS, batch_size=1, sequential=True, overrides=FAST, progress=False,
                        announce=lambda *_: None)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    # The first record: batch mode scores it with only its own edit, sequential mode with all three.
    assert abs(_logps(batch)[0] - _logps(seq)[0]) > 1e-6
    # The unedited numbers do not depend on the mode.
    assert batch["baseline"] == seq["baseline"]
    for key in ("task", "model", "method", "config", "n", "batch_size", "sequential", "metrics", "baseline", "timing"):
        assert key in batch
    assert batch["n"] == 3 and batch["sequential"] is False and seq["sequential"] is True
    assert set(batch["metrics"]) >= {"efficacy", "generalization", "specificity", "edit_score"}
    # every metric names its convention; the summed and generation-based ones sit beside the headline
    assert set(batch["protocol"]) == {k for k in batch["metrics"] if k not in ("n", "skipped")}
    assert {"edit_score_summed", "efficacy_generated", "generalization_generated"} <= set(batch["baseline"])


def test_generated_efficacy_of_the_unedited_model(tiny_model):
    """The runner scores the unedited model with the same scorer: its generated efficacy is the share of prompts
    whose greedy continuation begins with target_new, computed here on its own."""
    from lmedit.evaluate.generated import generated_matches

    lm = _editable(tiny_model("llama"))
    result = run_edit_eval(lm, "memit", REQUESTS, batch_size=3, overrides=FAST, progress=False,
                           announce=lambda *_: None)
    hits = generated_matches(lm.model, lm.tokenizer, [(r.prompt, r.target_new) for r in REQUESTS])
    assert result["baseline"]["efficacy_generated"] == sum(hits) / len(hits)
    assert [r["baseline"]["efficacy_generated"] for r in result["records"]] == [float(h) for h in hits]


def test_one_batch_equals_editing_all_at_once(tiny_model):
    lm = _editable(tiny_model("llama"))
    whole = run_edit_eval(lm, "emmet", REQUESTS, batch_size=None, overrides=FAST, progress=False, announce=lambda *_: None)
    explicit = run_edit_eval(lm, "emmet", REQUESTS, batch_size=3, overrides=FAST, progress=False, announce=lambda *_: None)
    assert whole["batch_size"] == 3
    assert _logps(whole) == _logps(explicit)


def test_sweep_reuses_values_and_baseline(tiny_model):
    """A batch-size sweep optimises each v* once and scores the unedited model once, with unchanged results."""
    from lmedit.locate.value_store import ValueStore

    lm = _editable(tiny_model("llama"))
    store, baseline = ValueStore(lm.model), {}
    quiet = dict(overrides=FAST, progress=False, announce=lambda *_: None)
    first = run_edit_eval(lm, "memit", REQUESTS, batch_size=3, value_store=store, baseline=baseline, **quiet)
    assert first["timing"]["values_reused"] == 0 and len(baseline["records"]) == 3
    second = run_edit_eval(lm, "memit", REQUESTS, batch_size=1, value_store=store, baseline=baseline, **quiet)
    assert second["timing"]["values_reused"] == 3 and (store.hits, store.misses) == (3, 3)
    assert second["baseline"] == first["baseline"]
    fresh = run_edit_eval(lm, "memit", REQUESTS, batch_size=1, **quiet)
    assert fresh["timing"]["values_reused"] == 0
    assert fresh["baseline"] == first["baseline"]
    # batch-of-one v* computed alone vs taken from the batch of three: equal up to float32 rounding
    for a, b in zip(_logps(fresh), _logps(second)):
        assert abs(a - b) < 1e-2
    # sequential runs edit on top of earlier edits: only the first batch may reuse
    seq = run_edit_eval(lm, "memit", REQUESTS, batch_size=1, sequential=True, value_store=store, **quiet)
    assert seq["timing"]["values_reused"] == 1


def test_report_tables_and_plots(tiny_model, tmp_path):
    import json

    from lmedit.evaluate.report import build_report

    lm = _editable(tiny_model("llama"))
    paths = []
    for bs in (1, 3):
        result = run_edit_eval(lm, "memit", REQUESTS, batch_size=bs, overrides=FAST, progress=False,
                               announce=lambda *_: None)
        paths.append(tmp_path / f"memit{bs}.json")
        paths[-1].write_text(json.dumps(result))
    md = build_report(paths, tmp_path / "rep").read_text()
    assert "| unedited |" in md and md.count("| memit L1-2 (batch") == 2
    assert f"{result['baseline']['efficacy']:.3f}" in md
    assert (tmp_path / "rep" / "counterfact_metrics.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "counterfact_scaling.png").stat().st_size > 1000


def test_report_rejects_other_files(tmp_path):
    import pytest

    from lmedit.errors import InputError
    from lmedit.evaluate.report import build_report

    bad = tmp_path / "x.json"
    bad.write_text('{"task": "counterfact"}')
    with pytest.raises(InputError, match="not an lmedit evaluation result"):
        build_report([bad], tmp_path / "rep")


class _Interrupt(Exception):
    pass


def _failing_scorer(after_calls: int):
    from lmedit.evaluate.counterfact import score_counterfact

    calls = {"n": 0}

    def scorer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise _Interrupt
        return score_counterfact(*args, **kwargs)

    return scorer


def _strip_timing(result):
    return {k: v for k, v in result.items() if k != "timing"}


import pytest  # noqa: E402


@pytest.mark.parametrize("sequential", [False, True])
def test_resume_equals_an_uninterrupted_run(tiny_model, tmp_path, sequential):
    lm = _editable(tiny_model("llama"))
    kwargs = dict(batch_size=1, sequential=sequential, overrides=FAST, progress=False, announce=lambda *_: None)
    whole = run_edit_eval(lm, "memit", REQUESTS, **kwargs)
    journal = tmp_path / "run.journal.jsonl"
    # baseline + first batch scored, then the run dies (batch mode); sequential dies at the final scoring
    with pytest.raises(_Interrupt):
        run_edit_eval(lm, "memit", REQUESTS, scorer=_failing_scorer(2 if not sequential else 1), journal=journal,
                      **kwargs)
    lines = journal.read_text().splitlines()
    assert len(lines) >= 3  # header, baseline, at least one finished batch
    resumed = run_edit_eval(lm, "memit", REQUESTS, journal=journal, resume=True, **kwargs)
    assert _strip_timing(resumed) == _strip_timing(whole)


def test_resume_refuses_another_run(tiny_model, tmp_path):
    from lmedit.errors import InputError

    lm = _editable(tiny_model("llama"))
    journal = tmp_path / "run.journal.jsonl"
    run_edit_eval(lm, "memit", REQUESTS[:2], batch_size=1, overrides=FAST, progress=False, announce=lambda *_: None,
                  journal=journal)
    with pytest.raises(InputError, match="different run"):
        run_edit_eval(lm, "memit", REQUESTS, batch_size=1, overrides=FAST, progress=False, announce=lambda *_: None,
                      journal=journal, resume=True)


def test_report_separates_settings_and_data_sizes(tmp_path):
    """Runs of one method with another μ form their own curve; each data size gets its own unedited row."""
    import json

    from lmedit.evaluate.report import build_report

    def result(n, b, mu, eff, base_eff):
        m = {"efficacy": eff, "generalization": 0.5, "specificity": 0.5, "edit_score": 0.5}
        return {"task": "counterfact", "model": "m", "method": "emmet", "n": n, "batch_size": b, "sequential": False,
                "config": {"layers": [2, 3], "mu": mu, "value": {"steps": 25}},
                "metrics": m, "baseline": {**m, "efficacy": base_eff}, "timing": {"seconds_per_edit": 1.0}}

    runs = [result(100, 10, 0.1, 0.91, 0.40), result(100, 100, 0.1, 0.92, 0.40), result(100, 10, 0.001, 0.81, 0.40),
            result(100, 100, 0.001, 0.82, 0.40), result(1000, 1000, 0.1, 0.71, 0.33)]
    paths = []
    for i, r in enumerate(runs):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    md = build_report(paths, tmp_path / "rep").read_text()
    assert "## counterfact, 100 records" in md and "## counterfact, 1000 records" in md
    assert "| unedited | 0.400 |" in md and "| unedited | 0.330 |" in md
    assert "| emmet L2-3 mu=0.001 (batch 10, n=100) | 0.810 |" in md
    assert "| emmet L2-3 mu=0.1 (batch 100, n=100) | 0.920 |" in md
    assert (tmp_path / "rep" / "counterfact_scaling.png").is_file()  # one curve figure across data sizes
    assert (tmp_path / "rep" / "counterfact_n1000_metrics.png").is_file()
    # a later report into the same directory on one data size: the earlier per-size figures go, the user's files stay
    (tmp_path / "rep" / "notes.png").write_bytes(b"mine")
    md = build_report(paths[:2], tmp_path / "rep").read_text()
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "counterfact_metrics.png", "counterfact_scaling.png", "notes.png", "report.md"]
    from lmedit.evaluate.report import _sweeps, _variants

    results = [json.loads(p.read_text()) for p in paths]
    curves = _sweeps(results, _variants(results))
    assert sorted(curves) == ["emmet L2-3 mu=0.001", "emmet L2-3 mu=0.1"]
    assert sorted(r["batch_size"] for r in curves["emmet L2-3 mu=0.1"]) == [10, 100, 1000]


def test_shards_merge_to_the_unsharded_run(tiny_model, tmp_path, monkeypatch, capsys):
    """Three shards of a batch-2 run on 6 records (whole batches each) merge to the metrics of one process; the
    merge refuses a missing shard, a shard of another run, and a file that is no shard."""
    import json
    import sys
    from pathlib import Path

    import pytest

    from lmedit import cli
    from lmedit.errors import InputError
    from lmedit.evaluate.shards import merge_shards, shard_range

    assert [shard_range(7, 2, k, 3) for k in (1, 2, 3)] == [(0, 2), (2, 4), (4, 7)]
    with pytest.raises(InputError, match="a shard needs a whole batch"):
        shard_range(4, 2, 1, 3)
    lm = _editable(tiny_model("llama"))
    model_dir = tmp_path / "tiny"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-edit.json"
    sets = [x for k, v in FAST.items() for x in ("--set", f"{k}={v}")]

    def run(out, *extra):
        monkeypatch.setattr(sys, "argv", ["lmedit", "eval", "counterfact", "--model", str(model_dir), "--data",
                                          str(data), "--limit", "6", "--batch-size", "2", "--no-reuse-values",
                                          "--out", str(out), *sets, *extra])
        try:
            cli.main()
        except SystemExit as e:
            return e.code, capsys.readouterr().err
        return 0, ""

    assert run(tmp_path / "whole.json")[0] == 0
    for k in (1, 2, 3):
        assert run(tmp_path / f"s{k}.json", "--shard", f"{k}/3")[0] == 0
    shards = [json.loads((tmp_path / f"s{k}.json").read_text()) for k in (3, 1, 2)]  # any order
    assert [s["shard"]["start"] for s in shards] == [4, 0, 2] and all(s["n"] == 2 for s in shards)
    merged = merge_shards(shards, ["s3", "s1", "s2"])
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert merged["n"] == 6 and [r["case_id"] for r in merged["records"]] == [r["case_id"] for r in whole["records"]]
    for part in ("metrics", "baseline"):
        for key, value in whole[part].items():
            if isinstance(value, float):
                assert merged[part][key] == pytest.approx(value, abs=1e-6), (part, key)
    assert merged["metrics"] != merged["baseline"]  # the edits moved something
    with pytest.raises(InputError, match="missing: 2"):
        merge_shards([shards[0], shards[1]], ["s3", "s1"])
    other = {**shards[2], "batch_size": 3}
    with pytest.raises(InputError, match="shards of different runs"):
        merge_shards([shards[1], other, shards[0]], ["s1", "s2", "s3"])
    with pytest.raises(InputError, match="is not a shard result"):
        merge_shards([whole], ["whole"])
    code, err = run(tmp_path / "seq.json", "--shard", "1/2", "--sequential")
    assert code == 2 and "cannot be sharded" in err
    code, err = run(tmp_path / "bad.json", "--shard", "3/2")
    assert code == 2 and "between 1 and N" in err
    monkeypatch.setattr(sys, "argv", ["lmedit", "eval", "merge", str(tmp_path / "s1.json"), str(tmp_path / "s2.json"),
                                      str(tmp_path / "s3.json"), "--out", str(tmp_path / "merged.json")])
    cli.main()
    assert json.loads((tmp_path / "merged.json").read_text())["metrics"] == merged["metrics"]


def test_a_finished_sequential_run_leaves_no_journal_behind(tiny_model, tmp_path):
    from lmedit.evaluate.run import discard_journal

    lm = _editable(tiny_model("llama"))
    journal = tmp_path / "run.json.journal.jsonl"
    run_edit_eval(lm, "memit", REQUESTS, batch_size=1, sequential=True, overrides=FAST, progress=False,
                  announce=lambda *_: None, journal=journal)
    patches = journal.with_name(journal.name + ".patches")
    assert journal.is_file() and len(list(patches.iterdir())) == len(REQUESTS)  # what a resume would need
    discard_journal(journal)
    assert not journal.exists() and not patches.exists()


def test_report_names_a_departure_from_the_defaults(tmp_path):
    """A lone EMMET run at μ = 0.1 (not its default) on the embedded model is labelled with μ; a run at the
    defaults is not."""
    import dataclasses
    import json

    from lmedit.editors import apply_overrides, get_editor
    from lmedit.editors.defaults import DEFAULTS
    from lmedit.evaluate.report import build_report

    default = dataclasses.asdict(apply_overrides(get_editor("emmet").config_cls(), DEFAULTS[("emmet", "smollm2-135m")]))
    m = {"efficacy": 0.9, "generalization": 0.5, "specificity": 0.5, "edit_score": 0.5}
    paths = []
    for i, (method, config) in enumerate([("emmet", {**default, "mu": 0.1}), ("memit", None)]):
        if config is None:
            config = dataclasses.asdict(apply_overrides(get_editor("memit").config_cls(),
                                                        DEFAULTS[("memit", "smollm2-135m")]))
        r = {"task": "counterfact", "model": "smollm2-135m", "method": method, "n": 10, "batch_size": 10,
             "sequential": False, "config": config, "metrics": m, "baseline": m, "timing": {"seconds_per_edit": 1.0}}
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    md = build_report(paths, tmp_path / "rep").read_text()
    assert " mu=0.1 (batch 10, n=10) |" in md
    assert "| memit L2-3-4-5-6 (batch 10, n=10) |" in md


def test_an_eval_killed_during_fine_tuning_resumes_mid_training(tiny_model, tmp_path, monkeypatch):
    """Sequential ft-conditional, batches of 2: killed in the 4th epoch of the second batch's training, the resumed
    run starts that training from its epoch-3 checkpoint and gives the uninterrupted result; the finished run
    leaves no checkpoint behind."""
    import json

    from lmedit.editors import finetune

    lm = _editable(tiny_model("llama"))
    overrides = {"layers": "1,2", "lr": "1e-2", "epochs": "5", "stop_prob": "1", "patience": "0"}
    kwargs = dict(batch_size=2, sequential=True, overrides=overrides, progress=False, announce=lambda *_: None)
    whole = run_edit_eval(lm, "ft-conditional", REQUESTS, **kwargs)
    calls = {"n": 0, "die_at": 5 + 3 + 1}  # batch 1: 5 epochs of one step; batch 2 dies in its 4th epoch
    real = finetune.example_loss

    def counting(*args, **kw):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise _Interrupt
        return real(*args, **kw)

    monkeypatch.setattr(finetune, "example_loss", counting)
    journal = tmp_path / "run.journal.jsonl"
    with pytest.raises(_Interrupt):
        run_edit_eval(lm, "ft-conditional", REQUESTS, journal=journal, **kwargs)
    train_dir = tmp_path / "run.journal.jsonl.train"
    assert json.loads((train_dir / "state.json").read_text())["epoch"] == 3
    calls.update(n=0, die_at=-1)
    resumed = run_edit_eval(lm, "ft-conditional", REQUESTS, journal=journal, resume=True, **kwargs)
    assert calls["n"] == 2  # epochs 4 and 5 of the second batch only
    assert _strip_timing(resumed) == _strip_timing(whole)
    from lmedit.evaluate.run import discard_journal

    discard_journal(journal)
    assert not train_dir.exists() and not (tmp_path / "run.journal.jsonl.patches").exists()


def test_report_headline_puts_its_convention_first(tmp_path):
    import json

    from lmedit.evaluate.report import build_report

    metrics = {"efficacy": 0.9, "generalization": 0.8, "specificity": 0.7, "edit_score": 0.79,
               "efficacy_summed": 0.6, "generalization_summed": 0.5, "specificity_summed": 0.4,
               "edit_score_summed": 0.49}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"task": "counterfact", "method": "memit", "metrics": metrics, "baseline": metrics,
                                "n": 3, "batch_size": 3, "config": {}, "model": "tiny", "sequential": False}))
    for headline, first in (("reference", "efficacy"), ("whole-target", "efficacy_summed")):
        md = build_report([path], tmp_path / headline, headline).read_text()
        header = next(l for l in md.splitlines() if l.startswith("| method |"))
        assert header.split("|")[2].strip() == first, header
