"""How UltraEdit's SmolLM2 defaults were chosen: sequential CounterFact runs on counterfact-train.json (never the
edit split), one line of JSON per (layers, η), then the unedited model's numbers.

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep_ultraedit.py N BATCH LAYERS@LR ...
e.g.   ... sweep_ultraedit.py 300 100 20,21,22,23,24@3e-4 25,26,27,28@5e-4
(benchmarks/results/lifelong/sweep-ultraedit-train.jsonl holds the two sweeps behind the defaults)
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-train.json"


def main(n: int, batch: int, specs: list[str]) -> None:
    from lmedit.evaluate.counterfact import score_counterfact
    from lmedit.evaluate.run import run_edit_eval
    from lmedit.models import load_model
    from lmedit.requests import load_requests

    torch.set_num_threads(1)
    lm = load_model("smollm2-135m")
    requests = load_requests(DATA, limit=n)
    scorer = functools.partial(score_counterfact, generated=False)
    baseline: dict = {}
    result = None
    for spec in specs:
        layers, lr = spec.split("@")
        t0 = time.time()
        result = run_edit_eval(lm, "ultraedit", requests, batch_size=batch, sequential=True,
                               overrides={"layers": layers, "lr": lr}, scorer=scorer, progress=False,
                               announce=lambda *_: None, baseline=baseline)
        print(json.dumps({"layers": layers, "lr": lr, "s": round(time.time() - t0, 1),
                          **{k: round(v, 3) for k, v in result["metrics"].items() if isinstance(v, float)}}), flush=True)
    if result is not None:
        print(json.dumps({"unedited": {k: round(v, 3) for k, v in result["baseline"].items() if isinstance(v, float)}}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
