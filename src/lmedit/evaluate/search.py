"""Hyperparameter search for the canonical-examples protocol (Optuna), the re-run on the report split, the table.

Per (task, method, league) one Optuna study maximises the league score on the SELECTION split (e.g. `val:a`,
the first half of every val file; see `canonical_config.halve`); `run_selected` then runs the best configuration
once on the REPORT split (`val:b`, or a split of its own such as `test`). Search space (`SearchSpace`):
- ft, ft-conditional: lr log-uniform, epochs 1..max_epochs, modules ∈ {mlp_out, attn_out+mlp_out, all}
  (at every layer);
- lora: lr log-uniform, epochs, rank ∈ {1, 2, 4, 8, 16, 32};
- senses (Backpack): lr log-uniform, epochs, senses_per_example 5..12, sense_lambda log-uniform 10²..10^3.5
  (the reference sweep's ranges);
- memit (no lr, no epochs): λ = mom2_weight log-uniform and the v* clamp `value.clamp_norm_factor` log-uniform.
A setting given with --set is fixed and not sampled.

Storage: `sqlite:///<cache>/canonical/optuna.db` by default; any RDB URL (e.g. postgresql://…) lets several
machines work on one study (each runs trials until the study holds n_trials complete ones). The study name holds
task, method, league and split plus a digest of the model, the data, the protocol, the fixed settings and the
space, so a change starts a new study. The TPE sampler is seeded with seed + the number of trials the study
already holds (a resumed or second worker does not replay the first one's draws).

Reuse: the unedited point comes from the Runner (once per model and data, from the baseline cache); and each
run's result is cached by (model, data, method, full configuration, protocol), so a configuration drawn in
several studies runs once. With the same seed, the three league studies of a (task, method) draw the same
random start-up configurations (TPE's first 10), so those trials run once for all three leagues.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from lmedit.errors import EditFailure, InputError
from lmedit.evaluate.canonical import CanonicalTask
from lmedit.evaluate.canonical_config import (REGULARISED, SUBJECT_FIELDS, base_method, check_method, check_overrides,
                                              make_settings, memit_not_applicable, needs_subject, overrides_for,
                                              task_digest)
from lmedit.evaluate.canonical_report import TIME_FIELDS, add_breakdowns
from lmedit.evaluate.canonical_run import Runner, league_key, league_table, run_canonical
from lmedit.evaluate.leagues import LEAGUES, check_epsilon

RUN_CACHE_VERSION = 1


@dataclass(frozen=True)
class SearchSpace:
    max_epochs: int = 10
    ft_lr: tuple[float, float] = (1e-7, 1e-3)
    lora_lr: tuple[float, float] = (1e-6, 1e-1)
    ft_modules: tuple[str, ...] = ("mlp_out", "attn_out,mlp_out", "all")
    lora_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    sense_lr: tuple[float, float] = (1e-4, 3e-2)
    senses_per_example: tuple[int, int] = (5, 12)
    sense_lambda: tuple[float, float] = (1e2, 10 ** 3.5)
    memit_mom2_weight: tuple[float, float] = (1.0, 1e6)
    memit_clamp: tuple[float, float] = (0.05, 4.0)
    kl_weight: tuple[float, float] = (0.1, 1.0)  # the +kl methods' β (the reference sweep's 10^U(−1, 0))

    def __post_init__(self):
        if isinstance(self.max_epochs, bool) or not isinstance(self.max_epochs, int) or self.max_epochs < 1:
            raise InputError(f"the most epochs a trial may train must be a positive integer, got {self.max_epochs!r}")


def suggest(trial, method: str, space: SearchSpace, fixed: dict) -> dict:
    """The sampled settings of one trial (names as --set takes them); names in `fixed` are not sampled."""
    out = {}

    def want(name):
        return name not in fixed

    regularised, method = method in REGULARISED, base_method(method)
    if regularised and want("kl_weight"):
        out["kl_weight"] = trial.suggest_float("kl_weight", *space.kl_weight, log=True)
    if method in ("ft", "ft-conditional", "lora", "senses"):
        lo, hi = {"lora": space.lora_lr, "senses": space.sense_lr}.get(method, space.ft_lr)
        if want("lr"):
            out["lr"] = trial.suggest_float("lr", lo, hi, log=True)
        if want("epochs"):
            out["epochs"] = trial.suggest_int("epochs", 1, space.max_epochs)
        if method == "lora" and want("rank"):
            out["rank"] = trial.suggest_categorical("rank", list(space.lora_ranks))
        if method == "senses":
            if want("senses_per_example"):
                out["senses_per_example"] = trial.suggest_int("senses_per_example", *space.senses_per_example)
            if want("sense_lambda"):
                out["sense_lambda"] = trial.suggest_float("sense_lambda", *space.sense_lambda, log=True)
        elif method != "lora" and want("modules"):
            out["modules"] = trial.suggest_categorical("modules", list(space.ft_modules))
    else:
        if want("mom2_weight"):
            out["mom2_weight"] = trial.suggest_float("mom2_weight", *space.memit_mom2_weight, log=True)
        if want("value.clamp_norm_factor"):
            out["value.clamp_norm_factor"] = trial.suggest_float("value.clamp_norm_factor", *space.memit_clamp,
                                                                 log=True)
    return out


def default_storage(runner: Runner) -> str:
    path = Path(runner.cache.root) / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def study_name(runner: Runner, task: CanonicalTask, method: str, league: float, fixed: dict,
               space: SearchSpace) -> str:
    d = _digest({"model": runner.fingerprint, "data": task_digest(task), "protocol": runner.protocol_key,
                 "fixed": fixed, "space": dataclasses.asdict(space)})
    return f"canonical:{task.name}:{method}:eps={league_key(league)}:{task.split}:{d[:12]}"


def cached_run(runner: Runner, task: CanonicalTask, method: str, settings,
               announce: Callable[[str], None] | None = None) -> tuple[dict, bool]:
    """(result, whether it was reused): a run of this exact configuration on this data, model and protocol is
    read from the cache; divergence is recorded, not raised (its epochs before the divergence still count)."""
    key = {"what": "canonical-run", "version": RUN_CACHE_VERSION, "model": runner.fingerprint,
           "data": task_digest(task), "task": task.name, "split": task.split, "method": method,
           "config": json.loads(json.dumps(dataclasses.asdict(settings), default=str)),
           "protocol": runner.protocol_key}
    hit = runner.cache.get(key)
    if hit is not None:
        return hit, True
    result = run_canonical(runner, task, method, settings, on_diverge="record", announce=announce)
    runner.cache.put(key, result)
    return result, False


def check_storage(storage: str) -> None:
    """Open an Optuna storage URL once (creating its tables), so a bad URL fails before any model work."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        optuna.storages.get_storage(storage)
    except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, an unreachable server
        raise InputError(f"cannot open the Optuna storage {storage!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _open_study(name: str, storage: str, seed: int):
    import optuna

    check_storage(storage)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def search(runner: Runner, task: CanonicalTask, method: str, league: float, *, n_trials: int,
           storage: str | None = None, seed: int = 0, fixed: dict | None = None,
           space: SearchSpace = SearchSpace(), announce: Callable[[str], None] | None = None):
    """Run trials until the study holds `n_trials` complete ones; returns the optuna Study. Each trial stores
    its league entry, trace length, reuse flag and timing as user attributes."""
    import optuna

    check_method(method, task.spec)
    eps = check_epsilon(league)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise InputError(f"--trials must be a positive integer, got {n_trials!r}")
    fixed = dict(fixed or {})
    make_settings(method, runner.model, runner.model_name, fixed)  # bad --set keys fail before any trial
    storage = storage or default_storage(runner)
    name = study_name(runner, task, method, eps, fixed, space)
    study = _open_study(name, storage, seed)
    study.set_user_attr("split", task.split)
    study.set_user_attr("task", task.name)
    runner.unedited(task)  # once, before any trial edits the model

    def objective(trial):
        overrides = {**fixed, **suggest(trial, method, space, fixed)}
        settings = make_settings(method, runner.model, runner.model_name, overrides)
        result, reused = cached_run(runner, task, method, settings)
        entry = league_table(result["trace"], result["unedited"], [eps],
                             runner.protocol.admissible)[league_key(eps)]
        trial.set_user_attr("league", entry)
        trial.set_user_attr("reused", reused)
        trial.set_user_attr("epochs_run", len(result["trace"]))
        trial.set_user_attr("diverged", result["diverged"])
        trial.set_user_attr("timing", result["timing"])  # also when reused: RunCost counts each run once
        trial.set_user_attr("success_trace", [p["success_rate"] for p in result["trace"]])
        if announce:
            shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in trial.params.items()}
            announce(f"  trial {trial.number}: {shown} → score {entry['score']:+.4f} (epoch {entry['epoch']})"
                     f"{' [reused]' if reused else ''}{' [diverged]' if result['diverged'] else ''}")
        return entry["score"]

    complete = optuna.trial.TrialState.COMPLETE
    done = sum(t.state == complete for t in study.trials)
    if done < n_trials:
        study.optimize(objective, n_trials=n_trials - done,
                       callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=(complete,))])
    return study


REPORT_SEEDS = 3  # the selected configuration is re-run with this many seeds on the report split (the paper: 10)
NUMERIC = ("score", "success_rate", "general_loss", "general_change", "targeted_loss", "targeted_change",
           "hard_negative_nll", "hard_negative_change")


def seed_mean(entries: list[dict]) -> dict:
    """One league cell from the same configuration run with several seeds: every number the mean over the seeds,
    with the score's standard error (sample std / √n; 0 for one seed), the per-seed scores and epochs."""
    n = len(entries)
    out = dict(entries[0])
    for key in NUMERIC:
        vals = [e[key] for e in entries]
        out[key] = sum(vals) / n
    scores = [e["score"] for e in entries]
    var = sum((x - out["score"]) ** 2 for x in scores) / (n - 1) if n > 1 else 0.0
    out.update(score_se=math.sqrt(var / n), seed_scores=scores, seed_epochs=[e["epoch"] for e in entries],
               epoch=entries[0]["epoch"] if len({e["epoch"] for e in entries}) == 1 else None, seeds=n)
    return out


def run_selected(runner: Runner, study, task: CanonicalTask, method: str, league: float, *,
                 fixed: dict | None = None, seeds: int = REPORT_SEEDS,
                 announce: Callable[[str], None] | None = None) -> dict:
    """Re-run the study's best configuration on `task` (the report split) with `seeds` seeds (its `seed` setting
    and the next ones), as the paper reports: every league cell is the mean over the seeds ± the standard error.
    The result is the first seed's run (its trace) carrying the selection and the seed-averaged leagues."""
    import optuna

    eps = check_epsilon(league)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise InputError(f"the number of report seeds must be a positive integer, got {seeds!r}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise EditFailure(f"study {study.study_name} has no complete trial to select from")
    best = study.best_trial
    overrides = {**(fixed or {}), **best.params}
    settings = make_settings(method, runner.model, runner.model_name, overrides)
    t0 = time.perf_counter()
    leagues = sorted({*runner.protocol.leagues, eps}, reverse=True)
    runs = []
    for k in range(seeds):
        seeded = dataclasses.replace(settings, seed=settings.seed + k)
        result, reused = cached_run(runner, task, method, seeded, announce=announce)
        runs.append((result, reused, league_table(result["trace"], result["unedited"], leagues,
                                                  runner.protocol.admissible)))
    result = dict(runs[0][0])
    result["leagues"] = {key: seed_mean([lt[key] for _, _, lt in runs]) for key in runs[0][2]}
    result["seed_runs"] = [{"seed": settings.seed + k, "diverged": r["diverged"], "reused": reused,
                            "timing": r["timing"]} for k, (r, reused, _) in enumerate(runs)]
    result["selection"] = {"league": eps, "study": study.study_name, "selected_on": study.user_attrs.get("split"),
                           "n_trials": len(complete), "best_trial": best.number, "best_value": best.value,
                           "params": best.params, "fixed": fixed or {}, "reused": runs[0][1], "seeds": seeds,
                           "seconds": time.perf_counter() - t0}
    return result


# ---------------------------------------------------------------- the whole table

def _cell(entry: dict, extra: dict) -> dict:
    return {**entry, **extra}


class RunCost:
    """What a group of runs costs on this machine, each distinct run counted once, whether it ran in this
    invocation or was read from the run cache (a trial shared by the three league studies, a configuration already
    run): the seconds the cells would take from scratch, split into training, per-epoch evaluation and the
    unedited evaluation."""

    def __init__(self):
        self._runs: dict[str, dict] = {}
        self.lookups_reused = 0

    def add(self, key: str, timing: dict | None, reused: bool) -> None:
        """One run lookup; `key` names the run (split and configuration), `timing` is its result's timing (empty
        for a trial recorded as reused by an older version, which did not keep it)."""
        self.lookups_reused += bool(reused)
        if not self._runs.get(key):  # first sight, or only seen without its timing
            self._runs[key] = dict(timing or {})

    def add_study(self, study) -> None:
        import optuna

        split = study.user_attrs.get("split")
        for t in study.trials:
            if t.state == optuna.trial.TrialState.COMPLETE:
                self.add(run_key(split, t.params), t.user_attrs.get("timing"), t.user_attrs.get("reused", True))

    def add_selected(self, result: dict) -> None:
        """The run of a study's best configuration on the report split (`run_selected`'s result)."""
        sel = result["selection"]
        for run in result.get("seed_runs") or [{"seed": None, "timing": result["timing"], "reused": sel["reused"]}]:
            config = sel["params"] if run["seed"] is None else {**sel["params"], "seed": run["seed"]}
            self.add(run_key(result["split"], config), run["timing"], run["reused"])

    def breakdown(self) -> dict:
        runs = list(self._runs.values())
        out = {"runs": len(runs), "runs_reused": self.lookups_reused}
        for field in TIME_FIELDS:
            out[field] = sum(t.get(field, 0.0) for t in runs)
        return out


def run_key(split: str | None, config: dict) -> str:
    return f"{split}|{json.dumps(config, sort_keys=True, default=str)}"


def canonical_table(runner: Runner, select: dict[str, CanonicalTask] | None, report: dict[str, CanonicalTask],
                    methods: Sequence[str], leagues: Sequence[float] = LEAGUES, *, n_trials: int = 0,
                    storage: str | None = None, seed: int = 0, fixed: dict | None = None,
                    space: SearchSpace = SearchSpace(), seeds: int = REPORT_SEEDS,
                    announce: Callable[[str], None] | None = None) -> dict:
    """Methods × tasks × leagues. With n_trials > 0: a study per cell on `select[task]`, its best configuration
    reported on `report[task]` (mean ± s.e. over `seeds` seeds); with n_trials = 0: one run per (task, method)
    with the fixed settings, scored in every league. memit on a task without a subject is a cell
    {"skipped": reason}."""
    say = announce or (lambda *_: None)
    leagues = [check_epsilon(e) for e in leagues]
    check_overrides(methods, fixed)
    t_all = time.perf_counter()
    table = {"kind": "canonical-table", "model": runner.model_name, "methods": list(methods),
             "leagues": [league_key(e) for e in leagues], "n_trials": n_trials,
             "select_split": next(iter(select.values())).split if (select and n_trials) else None,
             "report_split": next(iter(report.values())).split,
             "storage": (storage or default_storage(runner)) if n_trials else None, "seed": seed,
             "fixed": dict(fixed or {}), "space": dataclasses.asdict(space) if n_trials else None,
             "report_seeds": seeds if n_trials else None,
             "protocol": None, "tasks": {}, "timing": {}}
    groups: dict[str, RunCost] = {}
    for name, rep in report.items():
        unedited, _ = runner.unedited(rep)
        row = {"rule": rep.spec.rule, "kind": rep.kind, "n": {r: len(getattr(rep, r)) for r in
                                                               ("train", "eval", "hard_neg", "unconditional")},
               "unedited": unedited, "methods": {}}
        table["tasks"][name] = row
        for method in methods:
            t0 = time.perf_counter()
            if needs_subject(method) and name not in SUBJECT_FIELDS:
                row["methods"][method] = {"skipped": memit_not_applicable(name, method)}
                continue
            say(f"{name} · {method}")
            cost = groups[f"{name}/{method}"] = RunCost()
            mine = overrides_for(method, fixed, strict=False)
            cells = {}
            if not n_trials:
                settings = make_settings(method, runner.model, runner.model_name, mine)
                result, reused = cached_run(runner, rep, method, settings, announce=announce)
                cost.add(run_key(rep.split, result["config"]), result["timing"], reused)
                lt = league_table(result["trace"], result["unedited"], leagues, runner.protocol.admissible)
                for eps in leagues:
                    cells[league_key(eps)] = _cell(lt[league_key(eps)], {"config": result["config"], "reused": reused,
                                                                         "diverged": result["diverged"]})
            else:
                for eps in leagues:
                    study = search(runner, select[name], method, eps, n_trials=n_trials, storage=storage, seed=seed,
                                   fixed=mine, space=space, announce=announce)
                    cost.add_study(study)
                    res = run_selected(runner, study, rep, method, eps, fixed=mine, seeds=seeds)
                    cost.add_selected(res)
                    sel = res["selection"]
                    cells[league_key(eps)] = _cell(res["leagues"][league_key(eps)], {
                        "params": sel["params"], "select_score": sel["best_value"], "study": sel["study"],
                        "diverged": res["diverged"], "epochs_run": len(res["trace"])})
                    say(f"  ε={league_key(eps)}: select {sel['best_value']:+.4f} → report "
                        f"{cells[league_key(eps)]['score']:+.4f} with {sel['params']}")
            row["methods"][method] = {"leagues": cells}
            table["timing"].setdefault("wall", {})[f"{name}/{method}"] = time.perf_counter() - t0
    table["timing"]["total"] = time.perf_counter() - t_all
    table["timing"]["groups"] = {k: c.breakdown() for k, c in groups.items()}
    table["timing"]["breakdown"] = add_breakdowns(list(table["timing"]["groups"].values()))
    p = runner.protocol
    table["protocol"] = {"general_text": str(p.general_path), "n_docs": p.n_docs, "max_tokens": p.max_tokens,
                         "patience": p.patience}
    return table
