"""The README's measured tables, printed from the result files of benchmarks/tables.sh (no number typed by hand).

    .venv/bin/python benchmarks/tables_markdown.py > benchmarks/results/tables/tables.md

A row whose result file is missing is left out (the run has not been made). MEMIT and EMMET are not here:
their pre-fix cells are in results/tables-prefix/, the re-measured ones in results/fidelity/
(benchmarks/fidelity.sh, printed by benchmarks/fidelity_markdown.py).
"""

from __future__ import annotations

import json
from pathlib import Path

TABLES = Path(__file__).resolve().parent / "results" / "tables"

COUNTERFACT = [  # (label, result file stem)
    ("ROME, each edit alone", "cf100-rome"),
    ("ROME, 10 edits one after another per batch", "cf100-rome-b10"),
    ("ROME, all 100 one after another", "cf100-rome-b100"),
    ("FT (prompt + target), mass 100", "cf100-ft"),
    ("FT-conditional, mass 100", "cf100-ftc"),
    ("FT-conditional + augmentation (m = r = 2), mass 100", "cf100-ftc-aug"),
    ("LoRA, mass 100", "cf100-lora"),
    ("LoRA at lr 1e-3 (before the sweep), mass 100", "cf100-lora-lr1e-3"),
    ("FT, each edit alone", "cf100-ft-single"),
    ("FT-conditional, each edit alone", "cf100-ftc-single"),
    ("FT-conditional + augmentation, each edit alone", "cf100-ftc-aug-single"),
    ("LoRA, each edit alone", "cf100-lora-single"),
]
COUNTERFACT_1000 = [
    ("ROME, each edit alone", "cf1000-rome"),
    ("ROME, all 1000 one after another", "cf1000-rome-seq100"),
    ("FT (prompt + target), mass 1000", "cf1000-ft"),
    ("FT-conditional, mass 1000", "cf1000-ftc"),
    ("FT-conditional + augmentation (m = r = 2), mass 1000", "cf1000-ftc-aug"),
    ("LoRA, mass 1000", "cf1000-lora"),
]
ZSRE_500 = [
    ("ROME, each edit alone", "zsre500-rome"),
    ("ROME, all 500 one after another", "zsre500-rome-seq100"),
    ("FT (prompt + target), mass 500", "zsre500-ft"),
    ("FT-conditional, mass 500", "zsre500-ftc"),
    ("FT-conditional + augmentation (m = r = 2), mass 500", "zsre500-ftc-aug"),
    ("LoRA, mass 500", "zsre500-lora"),
]
ZSRE = [
    ("ROME, each edit alone", "zsre100-rome"),
    ("ROME, 10 edits one after another per batch", "zsre100-rome-b10"),
    ("ROME, all 100 one after another", "zsre100-rome-b100"),
    ("FT (prompt + target), mass 100", "zsre100-ft"),
    ("FT-conditional, mass 100", "zsre100-ftc"),
    ("FT-conditional + augmentation (m = r = 2), mass 100", "zsre100-ftc-aug"),
    ("LoRA, mass 100", "zsre100-lora"),
]
# Columns, each shown when some file of the table has it: the papers' convention first (ROME/MEMIT's mean
# per-token comparison; MEMIT's zsRE specificity), then lmedit's earlier one (summed; locality), then the
# generation-based checks. Files written before the split carry only the earlier convention (`upgrade_legacy`).
CF_METRICS = ("efficacy", "generalization", "specificity", "edit_score", "efficacy_summed", "generalization_summed",
              "specificity_summed", "edit_score_summed", "efficacy_generated", "generalization_generated")
ZSRE_METRICS = ("efficacy", "generalization", "specificity", "edit_score", "locality", "efficacy_generated",
                "generalization_generated")


def _load(stem: str) -> dict | None:
    from lmedit.evaluate.protocols import upgrade_legacy

    path = TABLES / f"{stem}.json"
    return upgrade_legacy(json.loads(path.read_text())) if path.is_file() else None


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def table(rows, metrics) -> list[str]:
    found = [(label, r) for label, stem in rows if (r := _load(stem)) is not None]
    if not found:
        return []
    metrics = [m for m in metrics if any(isinstance(r[part].get(m), (int, float))
                                         for _, r in found for part in ("metrics", "baseline"))]
    head = ["| | " + " | ".join(metrics) + " | s/edit |", "|---" * (len(metrics) + 2) + "|"]
    base = {m: next((r["baseline"][m] for _, r in found if isinstance(r["baseline"].get(m), (int, float))), None)
            for m in metrics}
    lines = head + ["| unedited | " + " | ".join(_fmt(base[m]) for m in metrics) + " | |"]
    for label, r in found:
        t = r["timing"]
        reused, n = t.get("values_reused") or 0, r["n"]
        mark = " †" if reused >= n else (f" ({reused} of {n} v* reused)" if reused else "")
        lines.append(f"| {label} | " + " | ".join(_fmt(r["metrics"].get(m)) for m in metrics) +
                     f" | {t['seconds_per_edit']:.2f}{mark} |")
    return lines


def main() -> None:
    out = ["### CounterFact, first 100 records of counterfact-edit.json", ""] + table(COUNTERFACT, CF_METRICS)
    thousand = table(COUNTERFACT_1000, CF_METRICS)
    if thousand:
        out += ["", "### CounterFact, first 1000 records", ""] + thousand
    zsre = table(ZSRE, ZSRE_METRICS)
    if zsre:
        out += ["", "### zsRE, first 100 records of zsre-500.json", ""] + zsre
    zsre500 = table(ZSRE_500, ZSRE_METRICS)
    if zsre500:
        out += ["", "### zsRE, all 500 records", ""] + zsre500
    out += ["", "† v* taken from an earlier run on the same model state (identical optimisation); s/edit leaves it out."]
    print("\n".join(out))


if __name__ == "__main__":
    main()
