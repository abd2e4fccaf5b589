"""Edit-then-score runs in the three modes of DESIGN §8, producing the result JSON.

- batch: the records are split into consecutive batches of B; each batch is edited on the original model,
  scored with its patch applied, and reverted (B = 1 is the classic single-edit setting);
- sequential: each batch is edited on top of the previous ones; every record is scored after all edits.
The unedited model's numbers are always computed on the same records and reported beside.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from typing import Callable

from tqdm.auto import tqdm

from lmedit.editors import get_editor, make_config
from lmedit.errors import InputError
from lmedit.evaluate.counterfact import aggregate, score_counterfact
from lmedit.models.loading import LoadedModel
from lmedit.requests import EditRequest

Scorer = Callable[..., list[dict]]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_edit_eval(lm: LoadedModel, method: str, requests: list[EditRequest], batch_size: int | None = None,
                  sequential: bool = False, overrides: dict | None = None, task: str = "counterfact",
                  scorer: Scorer = score_counterfact, aggregator=aggregate, score_batch_size: int = 64,
                  progress: bool = True, announce=print) -> dict:
    """Edit `requests` with `method` and score them; returns the DESIGN §8 result dict (+ per-record list)."""
    if not requests:
        raise InputError("no records to evaluate")
    batch_size = batch_size or len(requests)
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    editor = get_editor(method)
    config = make_config(method, lm.name, lm.model, overrides)
    model, tok = lm.model, lm.tokenizer

    t0 = time.perf_counter()
    baseline_records = scorer(model, tok, requests, batch_size=score_batch_size, progress=progress)
    baseline_seconds = time.perf_counter() - t0

    edit_seconds, eval_seconds = 0.0, 0.0
    records: list[dict] = []
    applied = []
    batches = _batches(requests, batch_size)
    try:
        for batch in tqdm(batches, desc=f"{method} {'sequential' if sequential else 'batches'} of {batch_size}",
                          disable=not progress or len(batches) == 1):
            t0 = time.perf_counter()
            patch = editor.fn(model, tok, batch, config, progress=progress, announce=announce)
            edit_seconds += time.perf_counter() - t0 - patch.meta.get("timing", {}).get("stats_seconds", 0.0)
            handle = patch.apply(model)
            if sequential:
                applied.append(handle)
                continue
            try:
                t0 = time.perf_counter()
                records += scorer(model, tok, batch, batch_size=score_batch_size)
                eval_seconds += time.perf_counter() - t0
            finally:
                handle.revert()
        if sequential:
            t0 = time.perf_counter()
            records = scorer(model, tok, requests, batch_size=score_batch_size, progress=progress)
            eval_seconds += time.perf_counter() - t0
    finally:
        for handle in reversed(applied):
            handle.revert()

    metrics, baseline = aggregator(records), aggregator(baseline_records)
    for rec, base in zip(records, baseline_records):
        rec["baseline"] = {k: base.get(k) for k in ("efficacy", "generalization", "specificity", "locality")
                           if k in base}
    return {
        "task": task,
        "model": lm.name,
        "method": method,
        "config": dataclasses.asdict(config),
        "n": len(requests),
        "batch_size": batch_size,
        "sequential": sequential,
        "protocol": metrics.pop("protocol", None),
        "metrics": metrics,
        "baseline": {k: v for k, v in baseline.items() if k != "protocol"},
        "timing": {"edit_seconds": edit_seconds, "seconds_per_edit": edit_seconds / len(requests),
                   "eval_seconds": eval_seconds, "baseline_eval_seconds": baseline_seconds,
                   "peak_rss_mb": peak_rss_mb()},
        "records": records,
    }
