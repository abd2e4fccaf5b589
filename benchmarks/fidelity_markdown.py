"""Issue 16's README tables, printed from the result files (no number typed by hand).

    .venv/bin/python benchmarks/fidelity_markdown.py > benchmarks/results/fidelity/tables.md

"After" cells are benchmarks/results/fidelity/*.json (benchmarks/fidelity.sh); "before" cells are the pre-fix
files of benchmarks/tables.sh, moved to benchmarks/results/tables-prefix/, read in the convention they were measured in
(summed CounterFact comparison, zsRE locality against the unedited model).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmedit.evaluate.report import load_result

ROOT = Path(__file__).resolve().parent / "results"
AFTER, BEFORE = ROOT / "fidelity", ROOT / "tables-prefix"

# (label, after-file, before-file); the before-files are the pre-fix runs with the pre-fix defaults
CF_ROWS = [("MEMIT (λ = 2000), batch 100", "cf100-memit.b100", None),
           ("EMMET (μ = 0.001, λ = 15000), batch 100", "cf100-emmet.b100", None),
           ("MEMIT λ = 500, batch 100", "cf100-memit-lambda500.b100", "cf100-memit.b100"),
           ("EMMET μ = 0.001, λ = 5000, batch 100", "cf100-emmet-mu0.001-lambda5000.b100", "cf100-emmet-mu0.001.b100"),
           ("MEMIT, sequential batches of 10 (λ 500 before, 2000 after)", "cf100-memit-seq10", "cf100-memit-seq10"),
           ("EMMET μ = 0.001, sequential batches of 10 (λ 5000 before, 15000 after)", "cf100-emmet-seq10",
            "cf100-emmet-mu0.001-seq10")]
ZSRE_ROWS = [("MEMIT (λ = 2000), batch 100", "zsre100-memit.b100", None),
             ("EMMET (μ = 0.001, λ = 15000), batch 100", "zsre100-emmet.b100", None),
             ("MEMIT λ = 500, batch 100", "zsre100-memit-lambda500.b100", "zsre100-memit.b100"),
             ("EMMET μ = 0.001, λ = 5000, batch 100", "zsre100-emmet-mu0.001-lambda5000.b100", "zsre100-emmet-mu0.001"),
             ("MEMIT, sequential batches of 10 (λ 500 before, 2000 after)", "zsre100-memit-seq10",
              "zsre100-memit-seq10"),
             ("EMMET μ = 0.001, sequential batches of 10 (λ 5000 before, 15000 after)", "zsre100-emmet-seq10",
              "zsre100-emmet-mu0.001-seq10")]
ZSRE500_ROWS = [("MEMIT (λ = 2000), batch 500", "zsre500-memit.b500", None),
                ("MEMIT (λ = 2000), five batches of 100", "zsre500-memit.b100", None),
                ("EMMET (μ = 0.001, λ = 15000), batch 500", "zsre500-emmet.b500", None),
                ("EMMET (μ = 0.001, λ = 15000), five batches of 100", "zsre500-emmet.b100", None),
                ("MEMIT λ = 500, batch 500", "zsre500-memit-lambda500.b500", "zsre500-memit.b500"),
                ("EMMET μ = 0.001, λ = 5000, batch 500", "zsre500-emmet-mu0.001-lambda5000.b500",
                 "zsre500-emmet-mu0.001.b500")]
NOT_YET = [("CounterFact 1000", "MEMIT, batch 1000", "cf1000-memit.b1000"),
           ("CounterFact 1000", "MEMIT, ten batches of 100", "cf1000-memit.b100"),
           ("CounterFact 1000", "MEMIT, sequential batches of 100", "cf1000-memit-seq100"),
           ("CounterFact 1000", "EMMET μ = 0.001, batch 1000", "cf1000-emmet-mu0.001.b1000"),
           ("CounterFact 1000", "EMMET μ = 0.001, sequential batches of 100", "cf1000-emmet-mu0.001-seq100"),
           ("zsRE 500", "MEMIT, sequential batches of 100", "zsre500-memit-seq100"),
           ("zsRE 500", "EMMET μ = 0.001, sequential batches of 100", "zsre500-emmet-mu0.001-seq100")]


def load(folder: Path, stem: str) -> dict | None:
    path = folder / f"{stem}.json"
    return load_result(path) if path.is_file() else None


def f(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def after_table(task: str, rows, extra: list[tuple[str, str]]) -> list[str]:
    keys = (["efficacy", "generalization", "specificity", "edit_score", "edit_score_summed"] if task == "cf" else
            ["efficacy", "generalization", "specificity", "edit_score", "locality", "edit_score_locality"])
    keys += ["efficacy_generated", "generalization_generated"]
    out = ["| | " + " | ".join(keys) + " | s/edit |", "|---" * (len(keys) + 2) + "|"]
    results = [(label, load(AFTER, stem)) for label, stem, _ in rows]
    results += [(label, r) for label, stem in extra if (r := load(AFTER, stem))]  # other methods: only if run
    first = next((r for _, r in results if r), None)
    if first:
        out.append("| unedited | " + " | ".join(f(first["baseline"].get(k)) for k in keys) + " | |")
    for label, r in results:
        if r:
            spe = r.get("timing", {}).get("seconds_per_edit")
            reused = " †" if r.get("timing", {}).get("values_reused") else ""
            out.append(f"| {label} | " + " | ".join(f(r["metrics"].get(k)) for k in keys) + f" | {f(spe)}{reused} |")
        else:
            out.append(f"| {label} | " + " | ".join("not run" for _ in keys) + " | |")
    return out


def before_after(task: str, rows) -> list[str]:
    keys = (["efficacy_summed", "generalization_summed", "specificity_summed", "edit_score_summed"] if task == "cf" else
            ["efficacy", "generalization", "locality", "edit_score_locality"])
    out = ["| | " + " | ".join(f"{k} before → after" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, stem_after, stem_before in rows:
        if stem_before is None:
            continue
        a, b = load(AFTER, stem_after), load(BEFORE, stem_before)
        if b is None and a is None:
            continue
        cells = [f"{f(b['metrics'].get(k) if b else None)} → {f(a['metrics'].get(k) if a else None)}" for k in keys]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def main() -> None:
    lines = ["#### CounterFact, first 100 records, after the fix", ""]
    lines += after_table("cf", CF_ROWS, [("ROME, each edit alone", "cf100-rome.b1"),
                                         ("FT-conditional + augmentation (default), mass 100", "cf100-ftc-default")])
    lines += ["", "† v* reused from an earlier cell on the same model state: s/edit leaves out their optimisation.",
              "", "#### zsRE, first 100 records, after the fix", ""]
    lines += after_table("zsre", ZSRE_ROWS, [("ROME, each edit alone", "zsre100-rome.b1"),
                                             ("FT-conditional + augmentation (default), mass 100", "zsre100-ftc-default")])
    lines += ["", "#### Before → after the fix, same records (the convention the before-files were measured in)", "",
              "CounterFact, first 100 (summed comparison):", ""]
    lines += before_after("cf", CF_ROWS)
    lines += ["", "zsRE, first 100 (locality against the unedited model):", ""]
    lines += before_after("zsre", ZSRE_ROWS)
    if any(load(AFTER, stem) for _, stem, _ in ZSRE500_ROWS):
        lines += ["", "#### zsRE, all 500 records, after the fix", ""]
        lines += after_table("zsre", ZSRE500_ROWS, [])
        lines += ["", "zsRE 500, before → after (locality against the unedited model):", ""]
        lines += before_after("zsre", ZSRE500_ROWS)
    lines += ["", "Not yet re-measured after the fix (the before-numbers are withdrawn from the tables above):", ""]
    for data, label, stem in NOT_YET:
        b = load(BEFORE, stem)
        score = b["metrics"].get("edit_score_summed") or b["metrics"].get("edit_score_locality") if b else None
        lines.append(f"- {data}, {label}: before {f(score)} (edit score), after: not yet measured")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
