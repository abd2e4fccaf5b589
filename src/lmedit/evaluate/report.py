"""`lmedit report`: many result files → one markdown page with tables (unedited row included) and PNG plots.

Results of one task on the same records (task, n) go in one table (method × metric) with that data's unedited
row; results of a sweep (same method and settings, several batch sizes) become metric-vs-number-of-edits
curves. Runs of one method with different settings are told apart by the settings that differ (e.g. μ=0.001).
Canonical-examples results (single runs, searches, `--all` tables) are merged into one table in the paper's shape.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from lmedit.errors import InputError
from lmedit.evaluate.canonical_report import kind_of, merge_canonical
from lmedit.evaluate.protocols import upgrade_legacy
from lmedit.fileio import atomic_write_bytes, atomic_write_json, read_json

_GENERATED = ("efficacy_generated", "generalization_generated", "specificity_generated")
# Table columns in order: the papers' convention (headline), then lmedit's earlier one, then generation-based checks.
# A column is shown when some result in the table has it.
METRICS = {"counterfact": ("efficacy", "generalization", "specificity", "edit_score", "efficacy_summed",
                           "generalization_summed", "specificity_summed", "edit_score_summed") + _GENERATED +
                          ("fluency", "fluency_greedy"),
           "zsre": ("efficacy", "generalization", "specificity", "edit_score", "locality", "edit_score_locality")
                   + _GENERATED}
# What the plots show: the first set every metric of which some result has (older files have only the second).
PLOTTED = {"counterfact": (("efficacy", "generalization", "specificity", "edit_score"),
                           ("efficacy_summed", "generalization_summed", "specificity_summed", "edit_score_summed")),
           "zsre": (("efficacy", "generalization", "specificity", "edit_score"),
                    ("efficacy", "generalization", "locality", "edit_score_locality"))}
REQUIRED = ("task", "method", "metrics", "baseline", "n")
# `lmedit report --headline`: which convention leads the tables and fills the plots. "reference" is the
# ROME/MEMIT code's (mean per-token CounterFact comparison, MEMIT's zsRE specificity); "whole-target" is the
# summed CounterFact comparison and zsRE locality against the unedited model (lmedit's first convention).
HEADLINES = {"reference": 0, "whole-target": 1}


def check_headline(headline: str) -> int:
    if headline not in HEADLINES:
        raise InputError(f"unknown headline convention {headline!r}; choose one of: {', '.join(HEADLINES)}")
    return HEADLINES[headline]


def load_result(path: Path, result=None) -> dict:
    """An edit-evaluation result (counterfact or zsre), checked; `result` is the already parsed file."""
    result = read_json(path) if result is None else result
    if not isinstance(result, dict) or any(k not in result for k in REQUIRED):
        raise InputError(f"{path} is not an lmedit evaluation result (expected keys {', '.join(REQUIRED)})")
    if result["task"] not in METRICS:
        raise InputError(f"{path}: task {result['task']!r} has no report yet (known: {', '.join(METRICS)})")
    return upgrade_legacy(result)


def _has(rows: list[dict], metric: str) -> bool:
    return any(isinstance(r[part].get(metric), (int, float)) for r in rows for part in ("metrics", "baseline"))


def unedited(rows: list[dict], metric: str):
    """The unedited model's value of `metric` on the table's data, from the first result that has it (a file
    written before a metric existed has none)."""
    return next((r["baseline"][metric] for r in rows if isinstance(r["baseline"].get(metric), (int, float))), None)


def shown_metrics(task: str, rows: list[dict], headline: str = "reference") -> list[str]:
    """The table's columns: the task's metrics that some result of the table has, the headline's first."""
    lead = PLOTTED[task][check_headline(headline)]
    return [m for m in dict.fromkeys(lead + METRICS[task]) if _has(rows, m)]


def plotted_metrics(task: str, rows: list[dict], headline: str = "reference") -> tuple[str, ...]:
    """The headline's four metrics; older files that have only the other convention's are plotted with those."""
    order = PLOTTED[task][check_headline(headline):] + PLOTTED[task][:check_headline(headline)]
    return next((s for s in order if all(_has(rows, m) for m in s)), order[0])


def protocol_lines(rows: list[dict], metrics: list[str]) -> list[str]:
    """What each shown column measures, from the results' own protocol (the first result that names the key)."""
    named: dict[str, str] = {}
    for r in rows:
        p = r.get("protocol")
        if isinstance(p, dict):
            for k in metrics:
                if p.get(k) and k not in named:
                    named[k] = p[k]
    if not any(named.values()):
        text = next((r["protocol"] for r in rows if isinstance(r.get("protocol"), str)), None)
        return [f"Protocol: {text or 'see DESIGN §8'}"]
    return ["Protocols:"] + [f"- `{k}`: {named[k]}" for k in metrics if named.get(k)]


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (config or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _variants(results: list[dict]) -> dict[int, str]:
    """id(result) -> "k=v ..." for the settings in which runs of the same method differ (layers aside)."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_method[r["method"]].append(r)
    names = {}
    for rs in by_method.values():
        flats = [_flat(r.get("config")) for r in rs]
        shared = set.intersection(*(set(f) for f in flats))  # a field only newer runs have is no setting that differs
        differ = {k for k in shared if len({repr(f[k]) for f in flats}) > 1}
        keys = sorted((differ | set().union(*map(_departures, rs))) - {"layers"})
        for r, f in zip(rs, flats):
            names[id(r)] = " ".join(f"{k.rpartition('.')[2]}={_short(f.get(k))}" for k in keys)
    return names


def _departures(r: dict) -> set[str]:
    """The settings in which a run left lmedit's defaults for its method and model (a curve of EMMET at μ = 0.001
    must say so even when no other EMMET run is in the report). Empty where the model has no defaults row."""
    import dataclasses

    from lmedit.editors import apply_overrides, get_editor
    from lmedit.editors.defaults import DEFAULTS

    row = DEFAULTS.get((r.get("method"), r.get("model")))
    if row is None:
        return set()
    config = dataclasses.asdict(apply_overrides(get_editor(r["method"]).config_cls(), row))
    default = _flat(json.loads(json.dumps(config)))  # as a result file holds it: tuples are lists
    return {k for k, v in _flat(r.get("config")).items() if k in default and repr(default[k]) != repr(v)}


def _short(value) -> str:
    """A setting as a label shows it: a file by its name, not its path."""
    return value.rsplit("/", 1)[-1] if isinstance(value, str) and "/" in value else str(value)


def _name(r: dict, variants: dict[int, str]) -> str:
    """Method, edit layers and the settings that set this run apart from others of its method."""
    layers = (r.get("config") or {}).get("layers")
    where = f" L{'-'.join(map(str, layers))}" if layers else ""
    variant = variants.get(id(r)) or ""
    return f"{r['method']}{where}{' ' + variant if variant else ''}"


def _series(r: dict, variants: dict[int, str]) -> str:
    """The scaling curve a result belongs to."""
    return _name(r, variants) + (" sequential" if r.get("sequential") else "")


def _label(r: dict, variants: dict[int, str] | None = None) -> str:
    mode = "sequential" if r.get("sequential") else "batch"
    return f"{_name(r, variants or {})} ({mode} {r.get('batch_size')}, n={r['n']})"


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "–"


def _bar_plot(task: str, rows: list[dict], path: Path, variants: dict[int, str], headline: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = plotted_metrics(task, rows, headline)
    labels = ["unedited"] + [_label(r, variants) for r in rows]
    values = [[unedited(rows, m) or 0 for m in metrics]] + [[r["metrics"].get(m) or 0 for m in metrics]
                                                                       for r in rows]
    fig, ax = plt.subplots(figsize=(4.5 + 1.9 * len(metrics), 3.6))
    width = 0.8 / len(labels)
    for i, (label, vals) in enumerate(zip(labels, values)):
        ax.bar([j + i * width for j in range(len(metrics))], vals, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{task}: {rows[0]['model']}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight" takes in the legend beside the axes
    plt.close(fig)


def _sweep_plot(task: str, sweeps: dict[str, list[dict]], path: Path, headline: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = plotted_metrics(task, [r for rs in sweeps.values() for r in rs], headline)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), sharey=True)
    for ax, metric in zip(axes, metrics):
        for i, (label, rs) in enumerate(sweeps.items()):  # styles differ so that identical curves stay visible
            rs = sorted(rs, key=lambda r: r["batch_size"])
            ax.plot([r["batch_size"] for r in rs], [r["metrics"].get(metric) or 0 for r in rs], label=label,
                    marker="os^dv"[i % 5], linestyle=("-", "--", ":", "-.")[i % 4], markersize=7 - i % 3)
        ax.set_xscale("log")
        ax.set_title(metric)
        ax.set_xlabel("edits per batch")
    axes[0].set_ylim(0, 1.05)
    handles, labels = axes[0].get_legend_handles_labels()  # one legend under the panels, clear of the curves
    fig.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _curve_plot(task: str, runs: list[dict], path: Path, variants: dict[int, str], headline: str) -> None:
    """Forgetting curves: each plotted metric against the edits made so far, one line per sequential run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = plotted_metrics(task, runs, headline)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, r in enumerate(runs):
            points = r["curve"]["points"]
            ax.plot([q["edits"] for q in points], [q["metrics"].get(metric) or 0 for q in points],
                    label=_label(r, variants), marker="os^dv"[i % 5], linestyle=("-", "--", ":", "-.")[i % 4])
        ax.set_title(metric)
        ax.set_xlabel("edits made so far")
    axes[0][0].set_ylim(0, 1.05)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _sweeps(results: list[dict], variants: dict[int, str]) -> dict[str, list[dict]]:
    """Curves: per series, one result per batch size (the one on most records); only series with 2+ sizes."""
    best: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in results:
        points = best[_series(r, variants)]
        if r["batch_size"] not in points or r["n"] > points[r["batch_size"]]["n"]:
            points[r["batch_size"]] = r
    return {k: list(v.values()) for k, v in best.items() if len(v) > 1}


def build_report(paths: list[Path], out_dir: Path, headline: str = "reference") -> Path:
    """Write out_dir/report.md and its PNGs; return the markdown path."""
    check_headline(headline)
    if not paths:
        raise InputError("give at least one result file")
    parsed = [(Path(p), read_json(p)) for p in paths]
    canonical = [(p, r) for p, r in parsed if kind_of(r)]
    results = [load_result(p, r) for p, r in parsed if not kind_of(r)]
    ctable = merge_canonical(canonical) if canonical else None  # refused before anything is written
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["task"], r["n"])].append(r)
    variants = _variants(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# lmedit report", ""]
    several_n = {task: sum(1 for t, _ in groups if t == task) > 1 for task, _ in groups}
    for (task, n), rows in groups.items():
        rows.sort(key=lambda r: (_series(r, variants), r["batch_size"]))
        metrics = shown_metrics(task, rows, headline)
        stem = f"{task}_n{n}" if several_n[task] else task
        lines += [f"## {task}, {n} records", ""] + protocol_lines(rows, metrics) + ["",
                  "| method | " + " | ".join(metrics) + " | s/edit |", "|---" * (len(metrics) + 2) + "|"]
        lines.append("| unedited | " + " | ".join(_fmt(unedited(rows, m)) for m in metrics) + " | |")
        reused_any = False
        for r in rows:
            spe = r.get("timing", {}).get("seconds_per_edit")
            reused = bool(r.get("timing", {}).get("values_reused"))
            reused_any |= reused
            lines.append(f"| {_label(r, variants)} | " + " | ".join(_fmt(r["metrics"].get(m)) for m in metrics) +
                         f" | {_fmt(spe)}{' †' if reused else ''} |")
        if reused_any:
            lines += ["", "† some v* were reused from an earlier run on the same model (`values_reused` in the result):"
                      " this s/edit leaves out their optimisation."]
        bars = out_dir / f"{stem}_metrics.png"
        _bar_plot(task, rows, bars, variants, headline)
        lines += ["", f"![{task} metrics]({bars.name})", ""]
    for task in dict.fromkeys(t for t, _ in groups):
        sweeps = _sweeps([r for r in results if r["task"] == task], variants)
        if sweeps:
            curve = out_dir / f"{task}_scaling.png"
            _sweep_plot(task, sweeps, curve, headline)
            lines += [f"## {task}: metrics against the number of edits made at once", "",
                      "Each point: B edits applied together, averaged over the batches of its run (runs on "
                      "different numbers of records share a curve; at equal B the run on more records is used).",
                      "", f"![{task} metric vs number of edits]({curve.name})", ""]
    for task in dict.fromkeys(t for t, _ in groups):
        runs = [r for r in results if r["task"] == task and r.get("curve")]
        if runs:
            figure = out_dir / f"{task}_forgetting.png"
            _curve_plot(task, runs, figure, variants, headline)
            scored = "; ".join(sorted({f"{_label(r, variants)}: {r['curve']['scored']}" for r in runs}))
            lines += [f"## {task}: forgetting, metrics against the edits made so far", "",
                      f"Sequential runs, scored as they grew (0: the unedited model). Scored: {scored}.", "",
                      f"![{task} forgetting curves]({figure.name})", ""]
    if ctable:
        from lmedit.evaluate.canonical_table import plot_table, render_markdown

        plot_table(ctable, out_dir / "canonical.png")
        atomic_write_json(out_dir / "canonical.json", ctable)  # the merged table, itself mergeable again
        lines += [("#" + line) if line.startswith("#") else line for line in render_markdown(ctable).splitlines()]
        lines += ["", "![canonical examples: Δ success rate per league](canonical.png)", ""]
    md = out_dir / "report.md"
    stale = _figures(md) - _figures_of("\n".join(lines))
    atomic_write_bytes(md, "\n".join(lines).encode())
    for name in stale:  # a figure the earlier report drew and this one does not: it would mislead beside the new one
        (out_dir / name).unlink(missing_ok=True)
    return md


def _figures_of(markdown: str) -> set[str]:
    return set(re.findall(r"!\[[^\]]*\]\(([^)/]+\.png)\)", markdown))


def _figures(md: Path) -> set[str]:
    """The PNGs an existing report links (only those: other files in the directory are the user's)."""
    return _figures_of(md.read_text(errors="replace")) if md.is_file() else set()
