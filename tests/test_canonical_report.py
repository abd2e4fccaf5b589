"""`lmedit report` on canonical-examples results made separately: one table, and refusals of cells that are not
comparable."""

from __future__ import annotations

import json

import pytest

from lmedit.errors import InputError
from lmedit.evaluate.canonical_report import merge_canonical
from lmedit.evaluate.search import RunCost, run_key
from lmedit.evaluate.report import build_report

PROTOCOL = {"general_text": "owt.jsonl", "n_docs": 20, "max_tokens": 128, "patience": None}


def _cell(score, epoch=2):
    return {"epsilon": 1e-3, "score": score, "epoch": epoch, "success_rate": 0.1 + score, "general_loss": 3.6,
            "general_change": 5e-4, "targeted_loss": 3.0, "targeted_change": -0.1, "hard_negative_nll": 10.0,
            "hard_negative_change": -0.2}


def _run(task, method, score, model="m", split="val:b", unedited=0.1):
    return {"task": task, "split": split, "model": model, "method": method, "config": {"lr": 1e-4}, "kind": "raise",
            "protocol": PROTOCOL, "unedited": {"success_rate": unedited, "general_loss": 3.6},
            "trace": [{"epoch": 1}], "leagues": {"0.001": _cell(score), "0.0001": _cell(0.0, None)},
            "diverged": None, "timing": {}}


def _search(task, method, score, timing=None):
    run = {**_run(task, method, score), "selection": {"params": {"lr": 3e-4}, "best_value": score + 0.1,
                                                      "study": "s", "n_trials": 8}}
    return {"kind": "canonical-search", "task": task, "method": method, "model": "m", "select_split": "val:a",
            "report_split": "val:b", "n_trials": 8, "leagues": {"0.001": run}, **({"timing": timing} if timing else {})}


def _write(tmp_path, name, obj):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(obj))
    return path


def test_separate_runs_and_searches_make_one_table(tmp_path):
    files = [_write(tmp_path, "c", _run("temporal", "ft", -0.1)),  # in the table: the paper's order of tasks
             _write(tmp_path, "b", _search("country_capital", "lora", 0.05)),  # and of methods
             _write(tmp_path, "a", _run("country_capital", "ft", 0.25))]
    md = build_report(files, tmp_path / "rep").read_text()
    assert "| method | country_capital | temporal |" in md
    assert md.index("| ft |") < md.index("| lora |")
    assert "| ft | +0.250 (ep 2;" in md and "-0.100 (ep 2;" in md
    assert "| lora | +0.050 (ep 2;" in md and "| lora | +0.050 (ep 2; gen +5.0e-04, tgt -1.0e-01, hn -0.200) | – |" in md
    assert "(task, method) groups: 1 chosen by search, 2 run with fixed settings" in md
    table = json.loads((tmp_path / "rep" / "canonical.json").read_text())
    assert table["leagues"] == ["0.001", "0.0001"]
    assert table["tasks"]["country_capital"]["methods"]["lora"]["leagues"]["0.001"]["params"] == {"lr": 3e-4}
    assert (tmp_path / "rep" / "canonical.png").stat().st_size > 1000
    # the merged table merges again with a further cell
    again = merge_canonical([(tmp_path / "rep" / "canonical.json", table),
                             (tmp_path / "d.json", _run("temporal", "lora", 0.2))])
    assert again["tasks"]["temporal"]["methods"]["lora"]["leagues"]["0.001"]["score"] == 0.2


@pytest.mark.parametrize("second, phrase", [
    (_run("country_capital", "lora", 0.1, model="other"), "one table compares one model"),
    (_run("country_capital", "lora", 0.1, split="val:a"), "cells on different data are not comparable"),
    (_run("country_capital", "ft", 0.1), "country_capital · ft · ε=0.001 is given twice"),
    (_run("country_capital", "lora", 0.1, unedited=0.3), "unedited success rate of country_capital differs"),
    ({**_run("country_capital", "lora", 0.1), "protocol": {**PROTOCOL, "n_docs": 200}}, "measures general text"),
])
def test_cells_that_are_not_comparable_are_refused(tmp_path, second, phrase):
    files = [_write(tmp_path, "a", _run("country_capital", "ft", 0.25)), _write(tmp_path, "b", second)]
    with pytest.raises(InputError, match=phrase):
        build_report(files, tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_run_cost_counts_each_distinct_run_once():
    cost = RunCost()
    a = {"train_seconds": 10.0, "eval_seconds": 30.0, "unedited_seconds": 2.0}
    cost.add(run_key("val:a", {"lr": 1e-4}), a, reused=False)
    cost.add(run_key("val:a", {"lr": 1e-4}), {}, reused=True)  # the same trial in another league's study
    cost.add(run_key("val:a", {"lr": 1e-4}), a, reused=True)
    cost.add(run_key("val:b", {"lr": 1e-4}), {"train_seconds": 1.0, "eval_seconds": 3.0}, reused=True)
    b = cost.breakdown()
    assert (b["runs"], b["runs_reused"]) == (2, 3)
    assert (b["train_seconds"], b["eval_seconds"], b["unedited_seconds"]) == (11.0, 33.0, 2.0)


def test_merged_table_adds_up_where_the_time_goes(tmp_path):
    t1 = {"total": 50.0, "breakdown": {"runs": 3, "runs_reused": 2, "train_seconds": 10.0, "eval_seconds": 40.0,
                                       "unedited_seconds": 5.0}}
    files = [_write(tmp_path, "a", _search("country_capital", "lora", 0.05, timing=t1)),
             _write(tmp_path, "b", {**_run("temporal", "ft", 0.1), "timing": {"train_seconds": 7.0,
                                                                              "eval_seconds": 3.0}}),
             _write(tmp_path, "c", _search("temporal", "lora", 0.0))]  # an older file: no timing
    table = merge_canonical([(p, json.loads(p.read_text())) for p in files])
    b = table["timing"]["breakdown"]
    assert (b["runs"], b["train_seconds"], b["eval_seconds"], b["unedited_seconds"]) == (4, 17.0, 43.0, 5.0)
    assert table["timing"]["untimed_groups"] == 1
    md = build_report(files, tmp_path / "rep").read_text()
    assert "4 distinct runs, 65 s from scratch" in md and "| country_capital · lora | 3 | 55 | 10 | 40 | 5 |" in md
    assert "1 task · method groups came from files without timing" in md
    assert "| memit |" not in md
    files.append(_write(tmp_path, "e", _run("country_capital", "memit", 0.05)))
    md = build_report(files, tmp_path / "rep3").read_text()
    assert "| memit | +0.050 (ep 2; gen +5.0e-04, tgt -1.0e-01, hn -0.200) | n/a |" in md  # temporal has no subject
    assert "Hyperparameters: 8 Optuna trials per cell" in md
    files.append(_write(tmp_path, "d", {**_search("company_ceo", "lora", 0.1), "n_trials": 4}))
    md = build_report(files, tmp_path / "rep2").read_text()
    assert "Hyperparameters: 4–8 Optuna trials per cell" in md
    merged = tmp_path / "rep2" / "canonical.json"
    assert merge_canonical([(merged, json.loads(merged.read_text()))])["n_trials_range"] == [4, 8]  # merged again
