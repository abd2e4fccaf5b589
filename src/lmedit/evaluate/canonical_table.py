"""The canonical-examples table as people read it: markdown (score, chosen epoch and degradation per cell, with
the timing lines) and a PNG of the scores, tasks × methods per league (`search.canonical_table` and
`canonical_report.merge_canonical` build the table these draw)."""

from __future__ import annotations

import math
from pathlib import Path

from lmedit.fileio import atomic_write_bytes


def _signed(x, digits=3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def _cell_text(cell: dict | None) -> str:
    if not cell:
        return "–"
    if "skipped" in cell:
        return "n/a"
    if cell.get("seeds", 1) > 1:  # mean over seeds ± standard error; the chosen epoch of each seed
        epochs = ",".join("–" if e is None else str(e) for e in cell["seed_epochs"])
        return (f"{_signed(cell['score'])} ± {cell['score_se']:.3f} ({cell['seeds']} seeds, ep {epochs}; "
                f"gen {cell['general_change']:+.1e}, tgt {cell['targeted_change']:+.1e}, "
                f"hn {cell['hard_negative_change']:+.3f})")
    ep = "unedited" if cell["epoch"] is None else f"ep {cell['epoch']}"
    return (f"{_signed(cell['score'])} ({ep}; gen {cell['general_change']:+.1e}, tgt {cell['targeted_change']:+.1e}, "
            f"hn {cell['hard_negative_change']:+.3f})")


def render_markdown(table: dict) -> str:
    """One table per league in the paper's shape: rows = the unedited success rate and each method, columns =
    tasks; a cell is Δ success rate at the last admissible epoch, with that epoch's general-loss and targeted-
    loss relative change and the hard-negative NLL change (nats; + is worse)."""
    tasks = list(table["tasks"])
    lines = [f"# Canonical-examples editing: {table['model']}", ""]
    if table.get("n_trials"):
        lo, hi = table.get("n_trials_range") or (table["n_trials"],) * 2
        trials = f"{lo}" if lo == hi else f"{lo}–{hi}"
        lines.append(f"Hyperparameters: {trials} Optuna trials per cell on `{table['select_split']}`; "
                     f"numbers from the best configuration on `{table['report_split']}`, re-run with "
                     f"{table.get('report_seeds') or 1} seed(s): mean ± standard error.")
    else:
        lines.append(f"One run per cell with fixed settings {table.get('fixed') or '(defaults)'} on "
                     f"`{table['report_split']}`.")
    if table.get("note"):
        lines += ["", table["note"]]
    lines += ["", "Cell: Δ success rate (epoch; general-loss change, targeted-loss change relative to unedited; "
                  "hard-negative NLL change in nats). n/a: the method does not apply.", ""]
    header = "| method | " + " | ".join(tasks) + " |"
    rule = "|---" * (len(tasks) + 1) + "|"
    for eps in table["leagues"]:
        lines += [f"## League ε = {eps}", "", header, rule,
                  "| unedited success rate | " + " | ".join(f"{table['tasks'][t]['unedited']['success_rate']:.3f}"
                                                         for t in tasks) + " |"]
        for method in table["methods"]:
            cells = []
            for t in tasks:
                m = table["tasks"][t]["methods"].get(method)
                cells.append(_cell_text(m if m and "skipped" in m else (m or {}).get("leagues", {}).get(eps)))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _timing_lines(table.get("timing") or {}, merged=bool(table.get("sources")))
    return "\n".join(lines)


def _timing_lines(timing: dict, merged: bool) -> list[str]:
    """Where the time goes: each distinct run once (from scratch, one process), by task · method and in total."""
    b = timing.get("breakdown")
    if not b:
        return []

    def spent(x):
        return x["train_seconds"] + x["eval_seconds"] + x["unedited_seconds"]

    wall = "" if merged or "total" not in timing else f"; this command took {timing['total']:.0f} s wall"
    lines = [f"Time: {b['runs']} distinct runs, {spent(b):.0f} s from scratch in one process "
             f"({b['train_seconds']:.0f} s training or editing, {b['eval_seconds']:.0f} s evaluating after epochs, "
             f"{b['unedited_seconds']:.0f} s unedited evaluations); {b['runs_reused']} run lookups answered by the "
             f"run cache{wall}."]
    if timing.get("untimed_groups"):
        lines[-1] += f" {timing['untimed_groups']} task · method groups came from files without timing."
    lines.append("")
    groups = timing.get("groups") or {}
    if groups:
        lines += ["| task · method | runs | seconds | training | evaluating | unedited |", "|---|---|---|---|---|---|"]
        for name, g in sorted(groups.items(), key=lambda kv: -spent(kv[1])):
            lines.append(f"| {name.replace('/', ' · ')} | {g['runs']} | {spent(g):.0f} | {g['train_seconds']:.0f} | "
                         f"{g['eval_seconds']:.0f} | {g['unedited_seconds']:.0f} |")
        lines.append("")
    return lines


def plot_table(table: dict, path: str | Path) -> None:
    """Grouped bars: one panel per league (stacked), tasks on the x axis, one bar per method (Δ success rate); a dot
    marks every measured cell, so a score of 0 is told apart from a cell not run or not applicable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, methods, leagues = list(table["tasks"]), table["methods"], table["leagues"]
    fig, axes = plt.subplots(len(leagues), 1, figsize=(max(5.0, 1.2 * len(tasks)) + 1.8, 2.4 * len(leagues) + 0.8),
                             sharey=True, squeeze=False)
    width = 0.8 / max(1, len(methods))
    labels = [t.replace("_", "\n", 1).replace("_", " ") + f"\nunedited {table['tasks'][t]['unedited']['success_rate']:.2f}"
              for t in tasks]
    everything = [0.0]
    for ax, eps in zip(axes[:, 0], leagues):
        for i, method in enumerate(methods):
            xs, vals, errs = [], [], []
            for j, t in enumerate(tasks):
                cell = ((table["tasks"][t]["methods"].get(method) or {}).get("leagues") or {}).get(eps)
                if cell is not None:
                    xs.append(j + i * width)
                    vals.append(cell.get("score") or 0.0)
                    errs.append(cell.get("score_se") or 0.0)  # standard error over seeds (0: one run)
            everything += [v - e for v, e in zip(vals, errs)] + [v + e for v, e in zip(vals, errs)]
            bars = ax.bar(xs, vals, width, label=method, yerr=errs if any(errs) else None, capsize=2,
                          error_kw={"linewidth": 0.8})
            ax.plot(xs, vals, "o", markersize=2.5, color=bars.patches[0].get_facecolor() if bars.patches else None)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], labels, fontsize=7)
        ax.set_title(f"league ε = {eps}", fontsize=9)
        ax.set_ylabel("Δ success rate", fontsize=8)
    axes[0][0].set_ylim(min(everything) - 0.05, max(everything) + 0.05)  # shared y; zero bars stay readable
    axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"canonical examples: {table['model']}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table(table: dict, md_path: str | Path, png_path: str | Path) -> None:
    plot_table(table, png_path)
    text = render_markdown(table) + f"\n![canonical table]({Path(png_path).name})\n"
    atomic_write_bytes(md_path, text.encode())
