"""One canonical-examples table from results made separately: single runs, searches and `--all` tables, from one
machine or several (each cell group run where there was room). The merged table has the shape of `--all`'s, so
the same markdown and PNG renderers draw it.

Cells are only put side by side when they are comparable: the same model, the same reported split and the same
general-text protocol; a (task, method, league) given twice is refused rather than silently overwritten.
"""

from __future__ import annotations

from pathlib import Path

from lmedit.errors import InputError

KINDS = ("canonical-table", "canonical-search", "canonical-run")
TIME_FIELDS = ("train_seconds", "eval_seconds", "unedited_seconds")


def add_breakdowns(parts) -> dict:
    """The sum of several run-cost breakdowns (search.RunCost.breakdown(): distinct runs, seconds by phase)."""
    out = {"runs": 0, "runs_reused": 0, **{f: 0.0 for f in TIME_FIELDS}}
    for part in parts:
        for k in out:
            out[k] += part.get(k, 0)
    return out


def _time_groups(result: dict) -> dict[str, dict]:
    """{"task/method": cost breakdown} of one file (empty where the file predates the breakdown)."""
    kind, timing = kind_of(result), result.get("timing") or {}
    if kind == "canonical-search":
        return {f"{result['task']}/{result['method']}": timing["breakdown"]} if "breakdown" in timing else {}
    if kind == "canonical-run":
        return {f"{result['task']}/{result['method']}": {"runs": 1, "runs_reused": 0,
                                                          **{f: timing.get(f, 0.0) for f in TIME_FIELDS}}}
    return dict(timing.get("groups") or {})


def kind_of(result: dict) -> str | None:
    """The canonical result kind of a parsed file, or None for any other file."""
    if not isinstance(result, dict):
        return None
    if result.get("kind") in ("canonical-table", "canonical-search"):
        return result["kind"]
    if "leagues" in result and "trace" in result and "unedited" in result:
        return "canonical-run"  # one run_canonical result: its `kind` field is the task kind (raise, lower, ...)
    return None


def _protocol_key(protocol: dict | None) -> tuple:
    p = protocol or {}
    return (str(p.get("general_text")), p.get("n_docs"), p.get("max_tokens"))


def _cells_of_run(run: dict) -> dict[str, dict]:
    return {eps: {**cell, "config": run["config"], "diverged": run.get("diverged")}
            for eps, cell in run["leagues"].items()}


def _cells_of_search(search: dict) -> dict[str, dict]:
    cells = {}
    for eps, run in search["leagues"].items():
        sel = run["selection"]
        cells[eps] = {**run["leagues"][eps], "params": sel["params"], "select_score": sel["best_value"],
                      "study": sel["study"], "diverged": run.get("diverged"), "epochs_run": len(run["trace"])}
    return cells


def _entries(path: Path, result: dict):
    """(task, method, split, unedited, protocol, cells, searched) for every cell group in one file."""
    kind = kind_of(result)
    if kind == "canonical-run":
        yield (result["task"], result["method"], result["split"], result["unedited"], result.get("protocol"),
               _cells_of_run(result), False)
    elif kind == "canonical-search":
        first = next(iter(result["leagues"].values()))
        yield (result["task"], result["method"], result["report_split"], first["unedited"], first.get("protocol"),
               _cells_of_search(result), True)
    else:
        for task, row in result["tasks"].items():
            for method, entry in row["methods"].items():
                cells = {"skipped": entry} if "skipped" in entry else entry["leagues"]
                yield (task, method, result["report_split"], row["unedited"], result.get("protocol"), cells,
                       bool(result.get("n_trials")))


def _order_as_in_the_paper(table: dict) -> None:
    """Tasks and methods in their canonical order (the order of `--all`), whatever order the files came in."""
    from lmedit.evaluate.canonical import TASKS
    from lmedit.evaluate.canonical_config import METHODS

    def rank(order):
        return lambda name: (order.index(name) if name in order else len(order), name)

    table["tasks"] = {t: table["tasks"][t] for t in sorted(table["tasks"], key=rank(list(TASKS)))}
    table["methods"].sort(key=rank(list(METHODS)))


def _mark_not_applicable(table: dict) -> None:
    """A locate-then-edit method (memit) on a task without a subject to locate is "n/a" (as in `--all`), not a
    missing cell."""
    from lmedit.evaluate.canonical_config import SUBJECT_FIELDS, memit_not_applicable, needs_subject

    for method in [m for m in table["methods"] if needs_subject(m)]:
        for task, row in table["tasks"].items():
            if task not in SUBJECT_FIELDS and method not in row["methods"]:
                row["methods"][method] = {"skipped": memit_not_applicable(task, method)}


def merge_canonical(files: list[tuple[Path, dict]]) -> dict:
    """Merge canonical results into one `canonical-table` (tasks × methods × leagues)."""
    table = {"kind": "canonical-table", "model": None, "methods": [], "leagues": [], "n_trials": 0,
             "select_split": None, "report_split": None, "fixed": {}, "protocol": None, "tasks": {}, "timing": {},
             "sources": [str(p) for p, _ in files]}
    first: dict[str, Path] = {}
    searched = fixed = 0
    groups: dict[str, dict] = {}
    trial_counts: set[int] = set()
    for path, result in files:
        model = result.get("model")
        if table["model"] is None:
            table["model"], first["model"] = model, path
        elif model != table["model"]:
            raise InputError(f"{path} is for model {model!r}, {first['model']} for {table['model']!r}: "
                             "one table compares one model")
        if kind_of(result) == "canonical-search" or (kind_of(result) == "canonical-table" and result.get("n_trials")):
            table["n_trials"] = max(table["n_trials"], int(result["n_trials"]))
            trial_counts.update(int(n) for n in result.get("n_trials_range") or [result["n_trials"]])
            table["select_split"] = table["select_split"] or result.get("select_split")
        for task, method, split, unedited, protocol, cells, was_searched in _entries(path, result):
            if table["report_split"] is None:
                table["report_split"], first["split"] = split, path
                table["protocol"], first["protocol"] = protocol, path
            elif split != table["report_split"]:
                raise InputError(f"{path} reports on {split!r}, {first['split']} on {table['report_split']!r}: "
                                 "cells on different data are not comparable")
            elif _protocol_key(protocol) != _protocol_key(table["protocol"]):
                raise InputError(f"{path} measures general text differently from {first['protocol']} "
                                 f"({_protocol_key(protocol)} vs {_protocol_key(table['protocol'])})")
            row = table["tasks"].setdefault(task, {"unedited": unedited, "methods": {}})
            if abs(row["unedited"]["success_rate"] - unedited["success_rate"]) > 1e-9:
                raise InputError(f"{path}: unedited success rate of {task} differs from an earlier file's "
                                 "(another model state or data)")
            if method not in table["methods"]:
                table["methods"].append(method)
            entry = row["methods"].setdefault(method, {"leagues": {}})
            if "skipped" in cells:
                row["methods"][method] = cells["skipped"]
                continue
            for eps, cell in cells.items():
                if eps in entry["leagues"]:
                    raise InputError(f"{path}: {task} · {method} · ε={eps} is given twice")
                entry["leagues"][eps] = cell
                if eps not in table["leagues"]:
                    table["leagues"].append(eps)
            searched += was_searched
            fixed += not was_searched
        groups.update(_time_groups(result))
    table["leagues"].sort(key=float, reverse=True)
    _order_as_in_the_paper(table)
    _mark_not_applicable(table)
    if len(trial_counts) > 1:
        table["n_trials_range"] = [min(trial_counts), max(trial_counts)]
    if groups:
        table["timing"] = {"groups": groups, "breakdown": add_breakdowns(groups.values())}
        untimed = sum(1 for t, row in table["tasks"].items() for m, e in row["methods"].items()
                      if "skipped" not in e and f"{t}/{m}" not in groups)
        if untimed:
            table["timing"]["untimed_groups"] = untimed
    if searched and fixed:
        table["note"] = (f"(task, method) groups: {searched} chosen by search, {fixed} run with fixed settings; "
                         "the JSON records each cell's settings.")
    return table
