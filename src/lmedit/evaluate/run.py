"""Edit-then-score runs in the three modes of DESIGN §8, producing the result JSON.

- batch: the records are split into consecutive batches of B; each batch is edited on the original model,
  scored with its patch applied, and reverted (B = 1 is the classic single-edit setting);
- sequential: each batch is edited on top of the previous ones; every record is scored after all edits.
The unedited model's numbers are always computed on the same records and reported beside (a sweep over
batch sizes computes them once and passes them on), and a ValueStore lets every run on the same model reuse
v* (see locate/value_store.py).

Runs stream their progress to a JSONL journal (a header naming the run, the baseline, then one line per
batch; sequential runs also keep each batch's patch beside it). `resume=True` picks up where an interrupted
run stopped and gives the same result as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from lmedit.checkpoints import train_dir_beside
from lmedit.editors import get_editor, make_config
from lmedit.editors.finetune import checkpoint_training
from lmedit.errors import InputError
from lmedit.evaluate import protocols
from lmedit.evaluate.counterfact import aggregate, score_counterfact
from lmedit.locate.value_store import ValueStore, reusing_values
from lmedit.models.loading import LoadedModel
from lmedit.patches import Patch
from lmedit.requests import EditRequest

Scorer = Callable[..., list[dict]]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def discard_journal(path: Path) -> None:
    """Remove a finished run's journal, the patches a sequential run saved beside it (`Journal.patch_dir`) and
    any training checkpoint (`Journal.train_dir`): the result file now holds everything."""
    path.unlink(missing_ok=True)
    _remove_beside(path)


def _beside(path: Path) -> tuple[Path, Path]:
    """What a run keeps next to its journal: sequential patches, and the training state of the batch in hand."""
    return path.with_name(path.name + ".patches"), train_dir_beside(path)


def _remove_beside(path: Path) -> None:
    for directory in _beside(path):
        if directory.exists():
            shutil.rmtree(directory)


class Journal:
    """Append-only JSONL record of a run; each line is flushed as soon as its work is done."""

    def __init__(self, path: Path | None, header: dict, resume: bool):
        self.path, self.lines = path, []
        header = json.loads(json.dumps(header))  # as it reads back (tuples become lists)
        if path is None:
            return
        if path.exists() and resume:
            lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
            if not lines or lines[0].get("header") != header:
                raise InputError(f"{path} belongs to a different run (method, config, data or batch size differ); "
                                 "use --force to start over")
            self.lines = lines[1:]
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"header": header}) + "\n")
            _remove_beside(path)  # left by an earlier run under this name

    @property
    def patch_dir(self) -> Path:
        return _beside(self.path)[0]

    @property
    def train_dir(self) -> Path:
        return _beside(self.path)[1]

    def find(self, key: str, value=True) -> dict | None:
        return next((l for l in self.lines if l.get(key) == value), None)

    def write(self, line: dict) -> None:
        self.lines.append(line)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(line) + "\n")
                f.flush()


def _signature(lm: LoadedModel, method: str, config, requests, batch_size: int, sequential: bool, task: str) -> dict:
    data = hashlib.sha256(json.dumps([r.to_dict() for r in requests], sort_keys=True).encode()).hexdigest()[:16]
    return {"task": task, "model": lm.name, "method": method, "config": dataclasses.asdict(config),
            "batch_size": batch_size, "sequential": sequential, "n": len(requests), "data": data,
            "scoring": protocols.VERSION}


def run_edit_eval(lm: LoadedModel, method: str, requests: list[EditRequest], batch_size: int | None = None,
                  sequential: bool = False, overrides: dict | None = None, task: str = "counterfact",
                  scorer: Scorer = score_counterfact, aggregator=aggregate, score_batch_size: int = 64,
                  progress: bool = True, announce=print, journal: Path | None = None, resume: bool = False,
                  value_store: ValueStore | None = None, baseline: dict | None = None,
                  keep_baseline_records: bool = False) -> dict:
    """Edit `requests` with `method` and score them; returns the DESIGN §8 result dict (+ per-record list).

    `baseline`: a dict shared by runs on the same model, requests and scorer. An empty one is filled with the
    unedited scores; a filled one is used instead of scoring the unedited model again. `keep_baseline_records`
    adds the unedited per-record scores to the result (a shard's, for the merge step)."""
    if not requests:
        raise InputError("no records to evaluate")
    batch_size = batch_size or len(requests)
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    editor = get_editor(method)
    config = make_config(method, lm.name, lm.model, overrides)
    model, tok = lm.model, lm.tokenizer
    log = Journal(journal, _signature(lm, method, config, requests, batch_size, sequential, task), resume)

    base_line = next((l for l in log.lines if "baseline_records" in l), None)
    if base_line is None and baseline and not hasattr(scorer, "reference"):
        base_line = {"baseline_records": baseline["records"], "seconds": baseline["seconds"], "reused": True}
        log.write(base_line)
    if base_line is None:
        t0 = time.perf_counter()
        records = scorer(model, tok, requests, batch_size=score_batch_size, progress=progress)
        base_line = {"baseline_records": records, "seconds": time.perf_counter() - t0}
        log.write(base_line)
    elif hasattr(scorer, "reference"):  # a stateful scorer (zsRE locality) needs the unedited predictions again
        scorer(model, tok, requests, batch_size=score_batch_size)
    baseline_records = base_line["baseline_records"]
    if baseline is not None and not baseline:
        baseline.update(records=baseline_records, seconds=base_line["seconds"])

    edit_seconds, eval_seconds = 0.0, 0.0
    records: list[dict] = []
    applied = []
    batches = _batches(requests, batch_size)
    reused_before = value_store.hits if value_store is not None else 0
    try:
        for i, batch in enumerate(tqdm(batches, desc=f"{method} {'sequential' if sequential else 'batches'} of "
                                       f"{batch_size}", disable=not progress or len(batches) == 1)):
            line = log.find("batch", i)
            if line is not None:  # finished before an interruption
                edit_seconds += line["edit_seconds"]
                eval_seconds += line.get("eval_seconds", 0.0)
                if sequential:
                    applied.append(Patch.load(log.patch_dir / str(i)).apply(model, force=True))  # digest-checked
                else:
                    records += line["records"]
                continue
            t0 = time.perf_counter()
            with reusing_values(value_store), checkpoint_training(log.train_dir if journal is not None else None):
                patch = editor.fn(model, tok, batch, config, progress=progress, announce=announce)
            if journal is not None and log.train_dir.exists():
                shutil.rmtree(log.train_dir)  # this batch's edit is done; the next one starts afresh
            spent = time.perf_counter() - t0 - patch.meta.get("timing", {}).get("stats_seconds", 0.0)
            edit_seconds += spent
            handle = patch.apply(model, force=True)  # just computed: the size check is for damaged files
            if sequential:
                applied.append(handle)
                if journal is not None:
                    patch.save(log.patch_dir / str(i), force=True)
                log.write({"batch": i, "edit_seconds": spent})
                continue
            try:
                t0 = time.perf_counter()
                scored = scorer(model, tok, batch, batch_size=score_batch_size)
                scored_seconds = time.perf_counter() - t0
            finally:
                handle.revert()
            eval_seconds += scored_seconds
            records += scored
            log.write({"batch": i, "records": scored, "edit_seconds": spent, "eval_seconds": scored_seconds})
        if sequential:
            t0 = time.perf_counter()
            records = scorer(model, tok, requests, batch_size=score_batch_size, progress=progress)
            eval_seconds += time.perf_counter() - t0
    finally:
        for handle in reversed(applied):
            handle.revert()

    metrics, baseline = aggregator(records), aggregator(baseline_records)
    for rec, base in zip(records, baseline_records):
        rec["baseline"] = {k: base.get(k) for k in protocols.RECORD_METRICS if k in base}
    result = {
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
                   "eval_seconds": eval_seconds, "baseline_eval_seconds": base_line["seconds"],
                   "peak_rss_mb": peak_rss_mb(),
                   "values_reused": (value_store.hits - reused_before) if value_store is not None else 0},
        "records": records,
    }
    if keep_baseline_records:
        result["baseline_records"] = baseline_records
    return result
