"""The canonical-examples protocol, its search and its CLI, on a tiny random Llama and hand-made task files.

The task files copy the country_capital format (fields country, capital, prefix, suffix; canonical examples
"The capital of X is" + " Y") with short texts, as the tiny model has 128 positions; the general text is the
first few OpenWebText chunks cut to 48 tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lmedit import cli
from lmedit.errors import EditFailure, InputError
from lmedit.evaluate import canonical_config as cc
from lmedit.evaluate import canonical_run as cr
from lmedit.evaluate import degradation
from lmedit.evaluate import search as se
from lmedit.evaluate.canonical import TASKS, CanonicalTask, PairExample, SuffixExample, TextExample
from lmedit.evaluate.degradation import BaselineCache
from cli_helpers import assert_one_line_error, run_cli

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GENERAL = DATA / "text" / "openwebtext-val100.jsonl"
COUNTRIES = [("Afghanistan", "Kabul"), ("Albania", "Tirana"), ("Algeria", "Algiers"), ("Andorra", "Andorra la Vella")]
SPLIT = "tiny"
MEMIT_FAST = {"identity_cov": "true", "layers": "1,2", "value.steps": "5", "n_context": "1", "mom2_weight": "0.01"}


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """country_capital files for split "tiny", grouped by country in the same order in every file (as the real
    files are), so the halves tiny:a / tiny:b hold the same two countries in every role."""
    root = tmp_path / "canonical"
    d = root / "country_capital"
    d.mkdir(parents=True)
    _write(d / f"country_capital_fixed-{SPLIT}.jsonl",
           [{"statement": f"The capital of {c} is {k}.", "country": c, "capital": k,
             "prefix": f"The capital of {c} is", "suffix": f" {k}"} for c, k in COUNTRIES])
    _write(d / f"country_capital_clear_eval-{SPLIT}.jsonl",
           [r for c, k in COUNTRIES for r in (
               {"country": c, "capital": k, "prefix": f"Travellers to {c} arrive in its capital,", "suffix": f" {k}"},
               {"country": c, "capital": k, "prefix": f"The capital of {c} is", "suffix": f" {k}"})])
    _write(d / f"country_capital_hard_neg-{SPLIT}.jsonl",
           [{"country": c, "prefix": f"The largest river of {c} flows past the city of", "suffix": " Herat"}
            for c, _ in COUNTRIES])
    _write(d / f"country_capital_unconditional-{SPLIT}.jsonl",
           [{"text": f"The capital of {c} is {k}."} for c, k in COUNTRIES])
    return root


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model("llama")


def _runner(tiny, tmp_path, leagues=(1e-3, 0.5, 0.7, 10.0), **kwargs) -> cr.Runner:
    protocol = cr.Protocol(str(GENERAL), n_docs=4, max_tokens=48, leagues=leagues, **kwargs)
    return cr.Runner(tiny.model, tiny.tokenizer, protocol, "tiny-llama", cache=BaselineCache(tmp_path / "cache"))


def _ftc_on_country_capital(tiny, data_dir, tmp_path, lr: str, epochs: str):
    """country_capital, a runner and full-model ft-conditional settings at this lr and number of epochs."""
    task = cc.load_split("country_capital", data_dir, SPLIT)
    settings = cc.make_settings("ft-conditional", tiny.model, "tiny-llama",
                                {"lr": lr, "epochs": epochs, "modules": "all", "batch_size": "1"})
    return task, _runner(tiny, tmp_path), settings


def _snapshot(model) -> dict:
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _assert_unchanged(model, snap: dict) -> None:
    now = dict(model.named_parameters())
    assert set(now) == set(snap)
    for n, (t, flag) in snap.items():
        assert torch.equal(now[n].detach(), t), n  # bit-exact
        assert now[n].requires_grad == flag, n
        assert now[n].grad is None, n
    assert not hasattr(model, "peft_config")


# ---------------------------------------------------------------- splits

def test_halves_are_contiguous_and_cover_the_file(data_dir):
    whole = cc.load_split("country_capital", data_dir, SPLIT)
    a = cc.load_split("country_capital", data_dir, f"{SPLIT}:a")
    b = cc.load_split("country_capital", data_dir, f"{SPLIT}:b")
    assert (a.split, b.split) == ("tiny:a", "tiny:b")
    for role in ("train", "eval", "hard_neg", "unconditional"):
        assert getattr(a, role) + getattr(b, role) == getattr(whole, role)
    assert [e.prefix for e in a.train] == ["The capital of Afghanistan is", "The capital of Albania is"]
    assert {e.suffix for e in a.eval} == {" Kabul", " Tirana"}  # the same two countries in every role
    assert cc.task_digest(a) != cc.task_digest(b)
    for bad in ("tiny:c", ":a", ""):
        with pytest.raises(InputError):
            cc.load_split("country_capital", data_dir, bad)


def test_eval_limit_keeps_training_and_cuts_each_evaluation_file(data_dir):
    whole = cc.load_split("country_capital", data_dir, SPLIT)
    cut = cc.limit_evaluation(whole, 1)
    assert cut.train == whole.train and cut.split == "tiny[eval:1]"
    for role in ("eval", "hard_neg", "unconditional"):
        assert getattr(cut, role) == getattr(whole, role)[:1] and len(getattr(whole, role)) > 1
    assert cc.task_digest(cut) != cc.task_digest(whole)
    with pytest.raises(InputError, match="eval-limit"):
        cc.limit_evaluation(whole, 0)


# ---------------------------------------------------------------- the protocol

def test_trace_league_logic_and_bit_exact_restore(tiny, data_dir, tmp_path):
    task, runner, settings = _ftc_on_country_capital(tiny, data_dir, tmp_path, lr="3e-2", epochs="8")
    snap = _snapshot(tiny.model)
    result = runner.run(task, "ft-conditional", settings)
    _assert_unchanged(tiny.model, snap)

    trace, before = result["trace"], result["unedited"]
    assert [p["epoch"] for p in trace] == list(range(1, 9))
    for p in trace:
        assert {"success_rate", "general_loss", "targeted_loss", "hard_negative_nll", "train_loss"} <= set(p)
    assert any(p["success_rate"] > before["success_rate"] for p in trace)  # the edit does something
    assert result["config"]["modules"] == ["all"] or result["config"]["modules"] == ("all",)

    def by_hand(eps):  # the reference's rule: the last epoch whose general loss is below (1 + eps) x before
        last = None
        for p in trace:
            if p["general_loss"] < (1 + eps) * before["general_loss"]:
                last = p
        return (0.0, None) if last is None else (last["success_rate"] - before["success_rate"], last["epoch"])

    assert result["protocol"]["admissible_rule"] == "general"

    chosen = set()
    for key, entry in result["leagues"].items():
        score, epoch = by_hand(float(key))
        assert (entry["score"], entry["epoch"]) == (pytest.approx(score), epoch), key
        point = trace[epoch - 1] if epoch else before
        assert entry["general_change"] == pytest.approx(point["general_loss"] / before["general_loss"] - 1)
        assert entry["hard_negative_change"] == pytest.approx(point["hard_negative_nll"] - before["hard_negative_nll"])
        chosen.add(epoch)
    assert len(chosen) >= 2  # the leagues pick different epochs on this trace: the test can tell them apart


@pytest.mark.parametrize("method,overrides", [
    ("ft", {"lr": "1e-2", "epochs": "2", "batch_size": "2"}),
    ("lora", {"lr": "5e-2", "epochs": "2", "rank": "4", "modules": "mlp_out,attn_out"}),
    ("memit", MEMIT_FAST),
])
def test_each_method_runs_and_restores(tiny, data_dir, tmp_path, method, overrides):
    task = cc.load_split("country_capital", data_dir, f"{SPLIT}:a")
    runner = _runner(tiny, tmp_path)
    snap = _snapshot(tiny.model)
    result = runner.run(task, method, cc.make_settings(method, tiny.model, "tiny-llama", overrides))
    _assert_unchanged(tiny.model, snap)
    assert len(result["trace"]) == (1 if method == "memit" else 2)
    assert set(result["leagues"]) == {"0.001", "0.5", "0.7", "10"}
    assert result["split"] == "tiny:a" and result["n"]["train"] == 2
    json.dumps(result, allow_nan=False)  # strict JSON


def test_memit_trials_reuse_values_across_lambda(tiny, data_dir, tmp_path, tmp_cache, monkeypatch):
    """v* does not depend on λ: a second MEMIT trial with another mom2_weight takes every v* from the runner's
    store, and its result equals a run that computes every v* afresh."""
    task = cc.load_split("country_capital", data_dir, f"{SPLIT}:a")
    runner = _runner(tiny, tmp_path)
    runner.run(task, "memit", cc.make_settings("memit", tiny.model, "tiny-llama", MEMIT_FAST))
    n = runner.value_store.misses
    assert n == len(task.train) and runner.value_store.hits == 0
    other = cc.make_settings("memit", tiny.model, "tiny-llama", {**MEMIT_FAST, "mom2_weight": "0.1"})
    reused = runner.run(task, "memit", other)["trace"][0]
    assert runner.value_store.hits == n and runner.value_store.misses == n
    monkeypatch.setattr(cr.Runner, "value_store", property(lambda self: None))  # no store: v* computed
    fresh = _runner(tiny, tmp_path / "fresh").run(task, "memit", other)["trace"][0]
    for key in ("success_rate", "general_loss", "targeted_loss", "hard_negative_nll"):
        assert reused[key] == pytest.approx(fresh[key], rel=1e-5, abs=1e-6), key


def test_epochs_beyond_every_league_are_not_scored_further(tiny, data_dir, tmp_path, monkeypatch):
    """An epoch whose losses break the widest league can never be chosen: its success rate and hard negatives are
    not measured (None), its losses are, and its league entry is the unedited point's."""
    from lmedit.evaluate import degradation

    task = cc.load_split("country_capital", data_dir, f"{SPLIT}:a")
    settings = cc.make_settings("ft", tiny.model, "tiny-llama", {"lr": "1e-2", "epochs": "2", "batch_size": "2"})
    full = _runner(tiny, tmp_path / "full", leagues=(0.01,)).run(task, "ft", settings)
    strict = _runner(tiny, tmp_path / "strict", leagues=(0.01,))
    before, cached = strict.unedited(task)
    # a baseline 2 % below the real one: every epoch (whose losses this lr barely moves) now breaks the league
    lowered = {**before, "general_loss": before["general_loss"] * 0.98}
    strict._unedited[degradation.examples_digest(task)] = (lowered, True)
    calls = []
    scorer = degradation.success_rate
    monkeypatch.setattr(degradation, "success_rate", lambda *a, **k: calls.append(1) or scorer(*a, **k))
    result = strict.run(task, "ft", settings)
    for f, s in zip(full["trace"], result["trace"], strict=True):
        assert s["general_loss"] == pytest.approx(f["general_loss"], rel=1e-6)
        assert s["general_loss"] > 1.01 * lowered["general_loss"]
        assert s["success_rate"] is None and s["hard_negative_nll"] is None
        assert f["success_rate"] is not None and f["hard_negative_nll"] is not None
    assert calls == []  # no epoch was scored
    assert result["leagues"]["0.01"]["score"] == 0.0 and result["leagues"]["0.01"]["epoch"] is None
    json.dumps(result, allow_nan=False)
    # so a cached run never serves a league wider than the one it was scored within
    assert cr.Protocol(str(GENERAL), leagues=(0.01,)).key() != cr.Protocol(str(GENERAL), leagues=(0.1, 0.01)).key()
    assert cr.Protocol(str(GENERAL), leagues=(0.01,)).key() == cr.Protocol(str(GENERAL), leagues=(1e-3, 0.01)).key()


def test_divergence_is_an_edit_failure_and_leaves_the_model(tiny, data_dir, tmp_path):
    task, runner, settings = _ftc_on_country_capital(tiny, data_dir, tmp_path, lr="1e6", epochs="3")
    snap = _snapshot(tiny.model)
    with pytest.raises(EditFailure, match="lower lr; the model is unchanged"):
        runner.run(task, "ft-conditional", settings)
    _assert_unchanged(tiny.model, snap)
    recorded = runner.run(task, "ft-conditional", settings, on_diverge="record")
    _assert_unchanged(tiny.model, snap)
    assert recorded["diverged"] and len(recorded["trace"]) < 3
    for entry in recorded["leagues"].values():  # a diverged epoch is never admissible
        assert entry["epoch"] is None or entry["epoch"] <= len(recorded["trace"])


def test_memit_needs_a_subject(tiny, data_dir, tmp_path):
    pronouns = CanonicalTask(TASKS["pronoun_gender_bias"], SPLIT, (PairExample("The nurse said", " he", " she"),),
                             (PairExample("The nurse came in. Then", " he", " she"),),
                             (SuffixExample("She is a nurse and", " she"),), (TextExample("The nurse said she"),))
    with pytest.raises(InputError, match="memit needs a subject to locate; task pronoun_gender_bias has none"):
        _runner(tiny, tmp_path).run(pronouns, "memit", cc.make_settings("memit", tiny.model, "tiny-llama", MEMIT_FAST))
    for task in ("temporal", "stereoset", "verb_conjugation"):
        with pytest.raises(InputError, match=f"task {task} has none"):
            cc.check_method("memit", task)
    # as in some val records, a canonical example split before its subject: the split moves before the answer
    path = data_dir / "country_capital" / f"country_capital_fixed-{SPLIT}.jsonl"
    records = [json.loads(l) for l in path.read_text().splitlines()]
    records[1].update(prefix="The capital of", suffix=" Albania is Tirana")
    records[3].update(prefix="The capital of andorra is")
    _write(path, records)
    requests, notes = cr.memit_requests(cc.load_split("country_capital", data_dir, SPLIT))
    assert (requests[1].prompt, requests[1].subject, requests[1].target_new) == \
        ("The capital of Albania is", "Albania", " Tirana")
    assert requests[3].subject == "andorra" and notes == {"requests": 4, "split_moved": [2], "subject_case": [4]}
    # a country_capital record without its subject field: named with file and line
    del records[2]["country"]
    _write(path, records)
    with pytest.raises(InputError, match=r"line 3: record lacks field 'country'"):
        cr.memit_requests(cc.load_split("country_capital", data_dir, SPLIT))


def test_bad_settings(tiny):
    with pytest.raises(InputError, match="unknown setting 'rnak'"):
        cc.make_settings("lora", tiny.model, "tiny-llama", {"rnak": "4"})
    with pytest.raises(InputError, match="unknown method"):
        cc.make_settings("rome", tiny.model, "tiny-llama")
    assert cc.overrides_for("lora", {"lora:rank": "4", "ft:lr": "1", "identity_cov": "true"}, strict=False) == \
        {"rank": "4"}
    with pytest.raises(InputError, match="unknown setting 'nope'"):
        cc.check_overrides(["ft", "memit"], {"nope": "1"})


# ---------------------------------------------------------------- the search

def test_search_stores_trials_and_computes_the_unedited_point_once(tiny, data_dir, tmp_path, monkeypatch):
    import optuna

    calls = []
    real = degradation.evaluate_point
    monkeypatch.setattr(degradation, "evaluate_point", lambda *a, **k: calls.append(1) or real(*a, **k))
    select = cc.load_split("country_capital", data_dir, f"{SPLIT}:a")
    report = cc.load_split("country_capital", data_dir, f"{SPLIT}:b")
    runner = _runner(tiny, tmp_path)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = se.SearchSpace(max_epochs=2, ft_lr=(1e-3, 1e-1))
    fixed = {"batch_size": "1"}  # one example per step: the seed (the shuffle) changes the run
    study = se.search(runner, select, "ft", 0.5, n_trials=3, storage=storage, seed=0, fixed=fixed, space=space)

    stored = optuna.load_study(study_name=study.study_name, storage=storage)
    trials = [t for t in stored.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3 and stored.user_attrs["split"] == "tiny:a"
    assert {"lr", "epochs", "modules"} == set(trials[0].params)
    assert all(t.user_attrs["league"]["score"] == t.value for t in trials)
    fresh = [t for t in trials if not t.user_attrs["reused"]]
    # one unedited evaluation for all trials, then one evaluation per epoch trained
    assert len(calls) == 1 + sum(t.user_attrs["epochs_run"] for t in fresh)

    n = len(calls)
    again = se.search(runner, select, "ft", 0.5, n_trials=3, storage=storage, fixed=fixed, space=space)
    assert len(again.trials) == 3 and len(calls) == n  # resumed: the study is complete, nothing reruns

    result = se.run_selected(runner, study, report, "ft", 0.5, fixed=fixed, seeds=1)
    assert result["split"] == "tiny:b" and result["selection"]["selected_on"] == "tiny:a"
    assert result["selection"]["params"] == study.best_params
    assert len(result["trace"]) == study.best_params["epochs"]
    assert len(calls) == n + 1 + len(result["trace"])  # the report split's own unedited point, once

    # the paper's reporting: the selected configuration re-run with seeds 0, 1, 2; each cell the mean ± s.e.
    three = se.run_selected(runner, study, report, "ft", 0.5, fixed=fixed, seeds=3)
    assert [r["seed"] for r in three["seed_runs"]] == [0, 1, 2] and three["seed_runs"][0]["reused"]
    by_seed = []
    for k in range(3):  # each seed's run on its own (from the run cache), scored by hand
        settings = cc.make_settings("ft", tiny.model, "tiny-llama", {**fixed, **study.best_params, "seed": str(k)})
        one, _ = se.cached_run(runner, report, "ft", settings)
        by_seed.append(cr.league_table(one["trace"], one["unedited"], [0.5])["0.5"]["score"])
    cell = three["leagues"]["0.5"]
    mean = sum(by_seed) / 3
    se_hand = (sum((x - mean) ** 2 for x in by_seed) / 2 / 3) ** 0.5
    assert cell["seed_scores"] == pytest.approx(by_seed) and cell["score"] == pytest.approx(mean)
    assert cell["score_se"] == pytest.approx(se_hand) and cell["seeds"] == 3
    assert len({tuple(p["general_loss"] for p in se.cached_run(runner, report, "ft", cc.make_settings(
        "ft", tiny.model, "tiny-llama", {**fixed, **study.best_params, "seed": str(k)}))[0]["trace"])
        for k in range(3)}) == 2  # two training examples have two orders: the three seeds give two runs
    with pytest.raises(InputError, match="report seeds must be a positive integer"):
        se.run_selected(runner, study, report, "ft", 0.5, fixed=fixed, seeds=0)


# ---------------------------------------------------------------- CLI


@pytest.mark.parametrize("args,phrases", [
    (["--task", "capitals"], ["unknown canonical task 'capitals'", "country_capital"]),
    (["--league", "0"], ["league must be a positive number", "'0'"]),
    (["--league", "-1"], ["league must be a positive number", "'-1'"]),
    (["--league", "abc"], ["league must be a positive number", "'abc'"]),
    (["--league", "1e-5,"], ["league must be a positive number"]),
    (["--split", "nope"], ["country_capital train file not found", "fixed-nope.jsonl", "splits present: tiny"]),
    (["--method", "memit", "--task", "stereoset"], ["memit needs a subject to locate; task stereoset has none"]),
    (["--method", "rome"], ["unknown method 'rome'"]),
    (["--split", "tiny:c"], ["NAME:a or NAME:b"]),
    (["--trials", "2", "--select-split", "tiny"], ["select and report on different data"]),
    (["--trials", "2", "--storage", "nosuchdb://x"], ["cannot open the Optuna storage 'nosuchdb://x'"]),
    (["--general-text", "/no/such/owt.jsonl"], ["general-text file not found", "owt.jsonl"]),
    (["--admissible", "both"], ["unknown admissibility rule 'both'", "general, general_and_targeted"]),
])
def test_cli_bad_input(data_dir, tmp_path, monkeypatch, capsys, args, phrases):
    base = {"--task": "country_capital", "--data-dir": str(data_dir), "--split": SPLIT, "--method": "ft",
            "--general-text": str(GENERAL), "--out": str(tmp_path / "out.json")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    code, err = run_cli(monkeypatch, capsys, "eval", "canonical", *[x for kv in base.items() for x in kv])
    assert_one_line_error(code, err, *phrases)
    assert not (tmp_path / "out.json").exists()


def test_cli_missing_data_dir_and_field(data_dir, tmp_path, monkeypatch, capsys):
    code, err = run_cli(monkeypatch, capsys, "eval", "canonical", "--task", "country_capital", "--method", "ft",
                        "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.json"))
    assert_one_line_error(code, err, "canonical data directory not found", "nowhere")
    path = data_dir / "country_capital" / f"country_capital_clear_eval-{SPLIT}.jsonl"
    records = [json.loads(l) for l in path.read_text().splitlines()]
    del records[4]["suffix"]
    _write(path, records)
    code, err = run_cli(monkeypatch, capsys, "eval", "canonical", "--task", "country_capital", "--method", "ft",
                        "--data-dir", str(data_dir), "--split", SPLIT, "--out", str(tmp_path / "o.json"))
    assert_one_line_error(code, err, "line 5", "lacks field 'suffix'")


def test_cli_search_table_markdown_and_png(tiny, data_dir, tmp_path, tmp_cache, monkeypatch, capsys):
    model_dir = tmp_path / "tiny-llama"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    common = ["eval", "canonical", "--task", "country_capital", "--data-dir", str(data_dir), "--model", str(model_dir),
              "--general-text", str(GENERAL), "--n-docs", "3", "--max-tokens", "40"]
    out = tmp_path / "table.json"
    monkeypatch.setattr(sys, "argv", ["lmedit", *common, "--split", SPLIT, "--method", "ft,memit", "--trials", "2",
                                      "--epochs", "2", "--league", "0.5,10", "--set", "batch_size=2",
                                      *[x for k, v in MEMIT_FAST.items() for x in ("--set", f"memit:{k}={v}")],
                                      "--out", str(out)])
    cli.main()
    table = json.loads(out.read_text())
    assert (table["select_split"], table["report_split"]) == ("tiny:a", "tiny:b")
    cell = table["tasks"]["country_capital"]["methods"]["ft"]["leagues"]["0.5"]
    assert {"score", "epoch", "general_change", "targeted_change", "hard_negative_change", "params"} <= set(cell)
    assert set(table["tasks"]["country_capital"]["methods"]["memit"]["leagues"]) == {"0.5", "10"}
    md = out.with_suffix(".md").read_text()
    assert "| unedited success rate |" in md and "## League ε = 10" in md and "| memit |" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_cache / "canonical" / "optuna.db").is_file()  # the default storage
    # where the time goes: each distinct run once (the two league studies share their start-up trials)
    ft = table["tasks"]["country_capital"]["methods"]["ft"]["leagues"]
    chosen = {json.dumps(c["params"], sort_keys=True) for c in ft.values()}
    cost = table["timing"]["groups"]["country_capital/ft"]
    assert cost["runs"] == 2 + 3 * len(chosen) and cost["runs_reused"] >= 2  # the choice re-run with 3 seeds
    assert cell["seeds"] == 3 and len(cell["seed_scores"]) == 3 and "± " in md and "3 seeds" in md
    assert cost["train_seconds"] > 0 and cost["eval_seconds"] > 0
    assert table["timing"]["breakdown"]["runs"] == cost["runs"] + table["timing"]["groups"]["country_capital/memit"]["runs"]
    assert "| country_capital · ft | " in md

    capsys.readouterr()  # what saving the model and the run printed
    code, err = run_cli(monkeypatch, capsys, *common, "--split", SPLIT, "--method", "ft", "--out", str(out))
    assert_one_line_error(code, err, "already exists", "--force")
    single = tmp_path / "single.json"
    monkeypatch.setattr(sys, "argv", ["lmedit", *common, "--split", f"{SPLIT}:b", "--method", "lora", "--epochs", "2",
                                      "--league", "1e-5", "--out", str(single)])
    cli.main()
    result = json.loads(single.read_text())
    assert result["method"] == "lora" and len(result["trace"]) == 2 and list(result["leagues"]) == ["1e-05"]


# ---------------------------------------------------------------- regularised baselines (KL to the unedited model)

def test_kl_to_reference_by_hand():
    from lmedit.models.logprobs import kl_to_reference

    torch.manual_seed(0)
    ref, logp = (torch.randn(2, 3, 5).log_softmax(-1) for _ in range(2))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    by_pos = [[sum(ref[b, t].exp()[v] * (ref[b, t, v] - logp[b, t, v]) for v in range(5)) for t in range(3)]
              for b in range(2)]
    real = [(b, t) for b in range(2) for t in range(3) if mask[b, t]]
    per_token = sum(by_pos[b][t] for b, t in real) / len(real)
    per_sequence = sum(by_pos[b][t] for b, t in real) / 2
    assert float(kl_to_reference(ref, logp, mask)) == pytest.approx(float(per_token), rel=1e-6)
    assert float(kl_to_reference(ref, logp, mask, per="sequence")) == pytest.approx(float(per_sequence), rel=1e-6)
    assert float(kl_to_reference(ref, ref, mask)) == pytest.approx(0.0, abs=1e-7)


def test_kl_regularised_ft_degrades_general_text_less(tiny, data_dir, tmp_path):
    """ft+kl is ft plus β·KL(p₀ ‖ p_θ) on general-text records the degradation measure never reads: with the same
    step size it moves the general-text loss less than ft, and with β = 0 it is ft exactly."""
    task = cc.load_split("country_capital", data_dir, SPLIT)
    runner = _runner(tiny, tmp_path)
    common = {"lr": "3e-2", "epochs": "3", "batch_size": "2", "modules": "all"}
    snap = _snapshot(tiny.model)
    plain = runner.run(task, "ft", cc.make_settings("ft", tiny.model, "tiny-llama", common))
    held = runner.run(task, "ft+kl", cc.make_settings("ft+kl", tiny.model, "tiny-llama", {**common, "kl_weight": "5"}))
    zero = runner.run(task, "ft+kl", cc.make_settings("ft+kl", tiny.model, "tiny-llama", {**common, "kl_weight": "0"}))
    _assert_unchanged(tiny.model, snap)
    assert held["method"] == "ft+kl" and held["config"]["kl_weight"] == 5.0
    assert cc.make_settings("ft+kl", tiny.model, "tiny-llama").kl_weight == cc.DEFAULT_KL_WEIGHT
    assert cc.make_settings("ft", tiny.model, "tiny-llama").kl_weight == 0.0
    change = [abs(r["trace"][-1]["general_loss"] / r["unedited"]["general_loss"] - 1) for r in (plain, held)]
    assert change[1] < 0.5 * change[0], change
    assert [p["general_loss"] for p in zero["trace"]] == [p["general_loss"] for p in plain["trace"]]


def test_kl_texts_follow_the_degradation_texts_and_bad_settings(tiny, data_dir, tmp_path, monkeypatch):
    from lmedit.evaluate import canonical_train as ct

    runner = _runner(tiny, tmp_path)  # n_docs = 4
    seen = []
    real = degradation.load_texts
    monkeypatch.setattr(degradation, "load_texts", lambda path, n=None: seen.append(n) or real(path, n))
    settings = cc.make_settings("ft+kl", tiny.model, "tiny-llama", {"kl_docs": "3", "batch_size": "2"})
    term = ct._kl_regulariser(runner, settings)
    assert seen == [4 + 3] and float(term()) == pytest.approx(0.0, abs=1e-6)  # p_θ = p₀ before training
    for bad, phrase in (({"kl_weight": "-1"}, "kl_weight must be a finite number >= 0"),
                        ({"kl_docs": "0"}, "kl_docs must be at least 1")):
        with pytest.raises(InputError, match=phrase):
            cc.check_settings(cc.make_settings("ft+kl", tiny.model, "tiny-llama", bad), tiny.model)
    too_many = cc.make_settings("ft+kl", tiny.model, "tiny-llama", {"kl_docs": "100000"})
    with pytest.raises(InputError, match="too few for kl_docs=100000"):
        ct._kl_regulariser(runner, too_many)


def test_search_samples_the_kl_weight_of_the_regularised_methods_only():
    import optuna

    space = se.SearchSpace()
    for method, sampled in (("ft+kl", True), ("lora+kl", True), ("senses+kl", True), ("ft", False), ("lora", False)):
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        params = se.suggest(trial, method, space, {})
        assert ("kl_weight" in params) == sampled, method
        if sampled:
            assert 0.1 <= params["kl_weight"] <= 1.0
    assert cc.base_method("senses+kl") == "senses" and cc.base_method("memit") == "memit"
    assert {"ft+kl", "lora+kl", "senses+kl"} <= set(cc.METHODS)
