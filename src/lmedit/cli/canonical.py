"""`lmedit eval canonical`: the canonical-examples protocol, its hyperparameter search and the results table.

Every check of the
input (task, method, league, splits, data files, output paths) runs before the model is loaded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from lmedit.cli.common import DeviceOpt
from lmedit.errors import InputError

_SPLIT_HELP = ("split of the reported numbers: NAME reads *-NAME.jsonl; NAME:a / NAME:b is the first / second half "
               "of every file. With --trials and a split without a half, the search selects on NAME:a and reports "
               "on NAME:b")


def _leagues(text: Optional[str]) -> list[float]:
    from lmedit.evaluate.leagues import LEAGUES, check_epsilon

    if text is None:
        return list(LEAGUES)
    parts = [p for p in text.split(",")]
    if not parts or any(not p.strip() for p in parts):
        raise InputError(f"league must be a positive number such as 1e-5 (or a comma list), got {text!r}")
    return [check_epsilon(p) for p in parts]


# The canonical-examples methods, known without importing torch (the help is built at start-up); a test checks
# this against evaluate.canonical_config.METHODS, which the registry's capabilities make.
CANONICAL_METHODS = ("ft", "ft-conditional", "lora", "memit", "senses", "ft+kl", "lora+kl", "senses+kl")


def _splits(split: str, select_split: Optional[str], trials: int) -> tuple[Optional[str], str]:
    """(selection split, report split)."""
    from lmedit.evaluate.canonical_config import parse_split

    base, half = parse_split(split)
    if select_split is not None:
        parse_split(select_split)
        if trials == 0:
            raise InputError("--select-split needs --trials (without a search nothing is selected)")
        if select_split == split:
            raise InputError(f"--select-split and --split are both {split!r}: select and report on different data")
        return select_split, split
    if trials == 0:
        return None, split
    if half is None:
        return f"{split}:a", f"{split}:b"
    return f"{base}:{'a' if half == 'b' else 'b'}", split


def _positive(value: Optional[int], name: str) -> None:
    if value is not None and value < 1:
        raise InputError(f"{name} must be at least 1, got {value}")


def eval_canonical(
        task: Optional[str] = typer.Option(None, "--task", "-t", help="country_capital, company_ceo, temporal, "
                                           "stereoset, pronoun_gender_bias or verb_conjugation (or --all)"),
        data_dir: Path = typer.Option(..., "--data-dir", help="folder with one sub-folder per task"),
        split: str = typer.Option("val", "--split", help=_SPLIT_HELP),
        select_split: Optional[str] = typer.Option(None, "--select-split", help="split the search selects on "
                                                   "(default: see --split), e.g. val when reporting on test"),
        method: Optional[str] = typer.Option(
            None, "--method", help=" | ".join(CANONICAL_METHODS) + " (senses: Backpack; +kl: KL-regularised), or a "
                                   "comma list (default with --all: every method the model can run)"),
        league: Optional[str] = typer.Option(None, "--league", help="ε of the league, e.g. 1e-5, or a comma list "
                                             "(default: 1e-3,1e-4,1e-5)"),
        out: Path = typer.Option(..., "--out", "-o", help="result JSON (with --all also OUT.md and OUT.png)"),
        model: str = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m, an HF directory or a .gguf"),
        device: Optional[str] = DeviceOpt,
        trials: int = typer.Option(0, "--trials", help="Optuna trials per (task, method, league); 0 = one run "
                                   "with the given settings"),
        storage: Optional[str] = typer.Option(None, "--storage", help="Optuna RDB URL shared by several machines "
                                              "(default sqlite:///<cache>/canonical/optuna.db)"),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="epochs of a run; with --trials the most a "
                                             "trial may use (default 10)"),
        sets: Optional[list[str]] = typer.Option(None, "--set", help="fix a setting, e.g. --set lr=1e-5 --set "
                                                 "modules=all or, for one method, --set lora:rank=4 (a fixed "
                                                 "setting is not searched)"),
        all_: bool = typer.Option(False, "--all", help="every task, method and league: one JSON, a markdown "
                                  "table and a PNG"),
        general_text: Optional[Path] = typer.Option(None, "--general-text", help="general-text JSONL (default: "
                                                    "DATA_DIR/../text/openwebtext-val100.jsonl)"),
        n_docs: int = typer.Option(200, "--n-docs", help="general-text records measured (the fixed subset)"),
        max_tokens: int = typer.Option(256, "--max-tokens", help="each general-text record is cut to this many "
                                       "tokens"),
        eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="score only the first N records of "
                                                 "each evaluation file (eval, hard negatives, targeted text): quick "
                                                 "runs on a CPU; the split name records it"),
        report_seeds: int = typer.Option(3, "--report-seeds", help="with --trials: seeds the selected configuration "
                                         "is re-run with on the report split (mean ± standard error; the paper "
                                         "uses 10)"),
        admissible: str = typer.Option("general", "--admissible", help="which epochs a league may score: general "
                                       "(general-text loss < (1 + eps) x before, the reference's) or "
                                       "general_and_targeted (both losses <= (1 + eps) x before)"),
        patience: Optional[int] = typer.Option(None, "--patience", help="stop a run after this many epochs in a "
                                               "row over every league's budget (default: train all epochs)"),
        seed: int = typer.Option(0, "--seed", help="the TPE sampler's seed"),
        ensemble_with: Optional[str] = typer.Option(None, "--ensemble-with", help="a large model (same tokenizer) "
                                                    "that --model, a Backpack, steers: logits_big + w x the "
                                                    "Backpack's log-prob change, w halved until the budget holds"),
        force: bool = typer.Option(False, "--force", help="overwrite an existing output")) -> None:
    """Edit with canonical examples; score success change per degradation league (Hewitt et al. 2024).

    Example (a 20-trial search for LoRA in the 1e-5 league):

      lmedit eval canonical --data-dir canonical --task country_capital \\
        --method lora --league 1e-5 --trials 20 --out cc-lora.json
    """
    from lmedit.cli.common import console, load_lm, parse_sets
    from lmedit.evaluate import canonical_config as cc
    from lmedit.evaluate import canonical_run as cr
    from lmedit.evaluate import search as se
    from lmedit.evaluate.canonical_table import render_markdown, write_table
    from lmedit.evaluate.leagues import check_rule
    from lmedit.evaluate.canonical import TASKS, get_task
    from lmedit.evaluate.degradation import BaselineCache
    from lmedit.fileio import atomic_write_json, check_writable

    # ---- everything about the input, before the model is loaded
    leagues = _leagues(league)
    if all_ and task is not None:
        raise InputError("give --task or --all, not both")
    if not all_ and task is None:
        raise InputError("give --task T (one of: " + ", ".join(TASKS) + ") or --all")
    tasks = list(TASKS) if all_ else [get_task(task).name]
    methods = [m.strip() for m in (method or ("" if not all_ else ",".join(cc.METHODS))).split(",") if m.strip()]
    if not methods:
        raise InputError("give --method (" + " | ".join(cc.METHODS) + ")")
    for m in methods:
        cc.check_method(m, None if (all_ or len(methods) > 1) else tasks[0])
    if trials < 0:
        raise InputError(f"--trials must be 0 or more, got {trials}")
    _positive(epochs, "--epochs")
    _positive(n_docs, "--n-docs")
    if max_tokens < 2:
        raise InputError(f"--max-tokens must be at least 2, got {max_tokens}")
    _positive(patience, "--patience")
    check_rule(admissible)
    _positive(report_seeds, "--report-seeds")
    select_name, report_name = _splits(split, select_split, trials)
    fixed = parse_sets(sets)
    if epochs is not None and not trials:
        fixed["epochs"] = str(epochs)
    table_mode = all_ or len(methods) > 1
    if ensemble_with and (trials or table_mode or methods != ["senses"]):
        raise InputError("--ensemble-with runs one senses run (the Backpack trained alone, then w chosen per league "
                         "on the large model): give --method senses without --trials or --all")
    if table_mode:
        cc.check_overrides(methods, fixed)
    space = se.SearchSpace(max_epochs=epochs or 10)
    _positive(eval_limit, "--eval-limit")
    report = {t: cc.load_split(t, data_dir, report_name) for t in tasks}
    select = {t: cc.load_split(t, data_dir, select_name) for t in tasks} if select_name else None
    if eval_limit:
        report = {t: cc.limit_evaluation(d, eval_limit) for t, d in report.items()}
        select = {t: cc.limit_evaluation(d, eval_limit) for t, d in select.items()} if select else None
    for t in tasks:
        if any(cc.needs_subject(m) for m in methods) and t in cc.SUBJECT_FIELDS:
            for data in (report[t], *((select[t],) if select else ())):
                cr.memit_requests(data)  # a record without its subject field fails here
    general = general_text or Path(data_dir).parent / "text" / "openwebtext-val100.jsonl"
    if not Path(general).is_file():
        raise InputError(f"general-text file not found: {general} (pass --general-text)")
    outputs = [out] + ([out.with_suffix(".md"), out.with_suffix(".png")] if table_mode else [])
    for path in outputs:
        check_writable(path, force)
    if trials and storage:
        se.check_storage(storage)

    # ---- the work
    lm = load_lm(model, device)
    protocol = cr.Protocol(str(general), n_docs=n_docs, max_tokens=max_tokens, leagues=tuple(leagues),
                           patience=patience, admissible=admissible)
    ensemble_runner = None
    if ensemble_with:
        from lmedit.backpack.ensemble import EnsembleLM

        big = load_lm(ensemble_with, device)
        ensemble_runner = cr.Runner(EnsembleLM(big.model, lm.model), big.tokenizer, protocol,
                                    f"{big.name}+backpack({lm.name})", cache=BaselineCache())
    runner = cr.Runner(lm.model, lm.tokenizer, protocol, lm.name, cache=BaselineCache())
    methods, cannot = cc.methods_for(lm.model, methods)
    if cannot and not all_:
        raise InputError(next(iter(cannot.values())))
    if cannot:
        console.print(f"--all on {lm.name}: skipping " + "; ".join(cannot.values()))
    for m in methods:
        if not cc.needs_subject(m) or any(t in cc.SUBJECT_FIELDS for t in tasks):  # bad --set, before any run
            cc.make_settings(m, lm.model, lm.name, cc.overrides_for(m, fixed, strict=not table_mode))

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)

    if select_name:
        say(f"selecting on {select_name}, reporting on {report_name}")
    if table_mode:
        table = se.canonical_table(runner, select, report, methods, leagues, n_trials=trials, storage=storage,
                                   seed=seed, fixed=fixed, space=space, seeds=report_seeds, announce=say)
        atomic_write_json(out, table)
        write_table(table, outputs[1], outputs[2])
        say(render_markdown(table))
        console.print(f"→ {out}, {outputs[1]}, {outputs[2]}")
        return
    data, m = report[tasks[0]], methods[0]
    fixed = cc.overrides_for(m, fixed)
    if not trials:
        settings = cc.make_settings(m, lm.model, lm.name, fixed)
        if ensemble_runner is not None:
            from lmedit.evaluate.canonical_ensemble import run_ensemble

            result = run_ensemble(runner, ensemble_runner, data, settings, announce=say)
        else:
            result = runner.run(data, m, settings, announce=say)
        atomic_write_json(out, result)
        _print_result(console, result)
    else:
        result = {"kind": "canonical-search", "task": data.name, "method": m, "model": lm.name,
                  "select_split": select_name, "report_split": report_name, "n_trials": trials, "leagues": {}}
        cost, t_start = se.RunCost(), time.perf_counter()
        for eps in leagues:
            say(f"{data.name} · {m} · ε={cr.league_key(eps)}: searching on {select_name}")
            study = se.search(runner, select[tasks[0]], m, eps, n_trials=trials, storage=storage, seed=seed,
                              fixed=fixed, space=space, announce=say)
            res = se.run_selected(runner, study, data, m, eps, fixed=fixed, seeds=report_seeds, announce=say)
            result["leagues"][cr.league_key(eps)] = res
            cost.add_study(study)
            cost.add_selected(res)
            _print_result(console, res, only=cr.league_key(eps))
        result["timing"] = {"total": time.perf_counter() - t_start, "breakdown": cost.breakdown()}
        atomic_write_json(out, result)
    console.print(f"→ {out}")


def _print_result(console, result: dict, only: str | None = None) -> None:
    from rich.table import Table

    before = result["unedited"]
    title = f"{result['task']} ({result['split']}): {result['method']} on {result['model']}"
    if result.get("selection"):
        title += f", selected on {result['selection']['selected_on']} with {result['selection']['params']}"
    table = Table(title=title)
    for col in ("league ε", "score", "epoch", "success", "general ×", "targeted ×", "hard-neg NLL Δ"):
        table.add_column(col, justify="right")
    table.add_row("unedited", "", "", f"{before['success_rate']:.3f}", "1", "1", "0")
    for key, c in result["leagues"].items():
        if only is not None and key != only:
            continue
        table.add_row(key, f"{c['score']:+.4f}", str(c["epoch"] or "–"), f"{c['success_rate']:.3f}",
                      f"{1 + c['general_change']:.7f}", f"{1 + c['targeted_change']:.7f}",
                      f"{c['hard_negative_change']:+.4f}")
    console.print(table)
    if result.get("diverged"):
        console.print(f"diverged: {result['diverged']}")
