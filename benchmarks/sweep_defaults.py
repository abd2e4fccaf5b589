"""How SmolLM2's locate-then-edit defaults were chosen: a small grid on counterfact-train.json.

    .venv/bin/python benchmarks/sweep_defaults.py --limit 100 --grid memit
    .venv/bin/python benchmarks/sweep_defaults.py --limit 30 --grid rome
    .venv/bin/python benchmarks/sweep_defaults.py --limit 50 --grid ft
    .venv/bin/python benchmarks/sweep_defaults.py --limit 50 --grid lora

v* depends only on the requests, the last edit layer and the value settings, so configurations that differ
only in solver knobs (λ, μ, earlier layers) reuse it (lmedit's ValueStore), and the unedited model is scored
once. Writes benchmarks/results/sweep-<grid>.json + .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"

GRIDS = {
    "rome": [(f"rome L{l}", "rome", 1, {"layers": str(l)}) for l in (1, 2, 4, 6)]
    + [("rome L4 clamp 2", "rome", 1, {"layers": "4", "value.clamp_norm_factor": "2"}),
       ("rome L4 kl 0.5", "rome", 1, {"layers": "4", "value.kl_factor": "0.5"})],
    # after the residual-stream fix (issue 16): windows ending at layer 6 share v* (same L, same site)
    "memit": [(f"memit {name} λ={lam}", "memit", None, {"layers": layers, "mom2_weight": str(lam)})
              for name, layers in (("L6", "6"), ("L4-6", "4,5,6"), ("L2-6", "2,3,4,5,6"))
              for lam in (100, 500, 2000)]
    + [("memit L2-6 λ=15000 (published)", "memit", None, {"layers": "2,3,4,5,6", "mom2_weight": "15000"})]
    + [(f"emmet L2-6 λ={lam} μ={mu}", "emmet", None, {"layers": "2,3,4,5,6", "mom2_weight": str(lam), "mu": str(mu)})
       for lam, mu in ((5000, 0.001), (15000, 0.001), (5000, 0.1))],
    # fine-tuning editors, all edits trained together (mass); augmentation m paraphrases + r random facts per edit
    # (facts: counterfact-train's true facts, never one about a subject being edited)
    "ft": [(f"ft-conditional lr={lr}", "ft-conditional", None, {"lr": lr, "augment": "false"})
           for lr in ("1e-4", "5e-4", "2e-3")]
    + [(f"ft-conditional lr={lr} m=2 r=2", "ft-conditional", None,
        {"lr": lr, "n_paraphrases": "2", "n_random_facts": "2", "facts_file": str(TRAIN)}) for lr in ("5e-4", "2e-3")]
    + [("lora lr=2e-3", "lora", None, {"lr": "2e-3"})],
    "lora": [(f"lora lr={lr}", "lora", None, {"lr": lr}) for lr in ("5e-3", "1e-2", "3e-2")],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grid", choices=sorted(GRIDS), required=True)
    parser.add_argument("--limit", type=int, default=30)
    args = parser.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    from lmedit.evaluate.run import run_edit_eval
    from lmedit.locate.value_store import ValueStore
    from lmedit.models import load_model
    from lmedit.models.loading import cache_dir
    from lmedit.requests import load_requests

    lm = load_model("smollm2-135m")
    store, baseline = ValueStore(lm.model, cache_dir() / "values"), {}
    requests = load_requests(TRAIN, limit=args.limit)
    rows = []
    for name, method, batch, overrides in GRIDS[args.grid]:
        t0 = time.perf_counter()
        r = run_edit_eval(lm, method, requests, batch, overrides=overrides, progress=False, announce=lambda *_: None,
                          value_store=store, baseline=baseline)
        rows.append({"name": name, "overrides": overrides, "metrics": r["metrics"], "baseline": r["baseline"],
                     "seconds": time.perf_counter() - t0})
        print(name, {k: round(r["metrics"][k], 3) for k in ("efficacy", "generalization", "specificity", "edit_score")},
              flush=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sweep-{args.grid}.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [f"counterfact-train.json, first {args.limit} records", "",
             "| config | efficacy | generalization | specificity | edit score |", "|---|---|---|---|---|"]
    base = rows[0]["baseline"]
    lines.append(f"| unedited | {base['efficacy']:.3f} | {base['generalization']:.3f} | {base['specificity']:.3f} | "
                 f"{base['edit_score']:.3f} |")
    for row in rows:
        m = row["metrics"]
        lines.append(f"| {row['name']} | {m['efficacy']:.3f} | {m['generalization']:.3f} | {m['specificity']:.3f} | "
                     f"{m['edit_score']:.3f} |")
    (out / f"sweep-{args.grid}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
