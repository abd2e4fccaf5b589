"""`make bench`: speed and memory of the locate-then-edit core on the embedded model (lmedit.bench).

Writes benchmarks/results/locate.json and locate.md. Timings are reported as ratios measured in one run
(this machine is noisy); run alone, never beside another torch process. `lmedit bench` runs the same parts on
any model and data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
TRAIN = DATA.with_name("counterfact-train.json")  # the random facts of FT-conditional + augmentation
OUT = ROOT / "benchmarks" / "results"


def main() -> None:
    from lmedit.bench import PARTS

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--values-n", type=int, default=100)
    parser.add_argument("--reference-n", type=int, default=20)
    parser.add_argument("--sizes", default="10,100")
    parser.add_argument("--stats-tokens", type=int, default=20_000)
    parser.add_argument("--scoring-n", type=int, default=200)
    parser.add_argument("--mass-n", type=int, default=1000, help="edits in the FT-vs-MEMIT wall-time part")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: " + ",".join(PARTS))
    args = parser.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    from lmedit.bench import run_bench
    from lmedit.models import load_model
    from lmedit.requests import load_requests

    skip = set(args.skip.split(",")) - {""}
    sizes = [int(s) for s in args.sizes.split(",")]
    lm = load_model("smollm2-135m")
    requests = load_requests(DATA, limit=max(args.values_n, args.mass_n, args.scoring_n, *sizes))
    run_bench(lm, requests, OUT, [p for p in PARTS if p not in skip], facts_file=TRAIN, sizes=sizes,
              values_n=args.values_n, reference_n=args.reference_n, stats_tokens=args.stats_tokens,
              scoring_n=args.scoring_n, mass_n=args.mass_n, keep_previous=bool(skip))
    print((OUT / "locate.md").read_text())


if __name__ == "__main__":
    main()
