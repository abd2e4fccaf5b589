"""Edit-then-score runs in the three modes of DESIGN §8, producing the result JSON.

- batch: the records are split into consecutive batches of B; each batch is edited on the original model,
  scored with its patch applied, and reverted (B = 1 is the classic single-edit setting);
- sequential: each batch is edited on top of the previous ones; every record is scored after all edits.
The unedited model's numbers are always computed on the same records and reported beside (a sweep over
batch sizes computes them once and passes them on), and a ValueStore lets every run on the same model reuse
v* (see locate/value_store.py).

Runs stream their progress to a JSONL journal (a header naming the run, the baseline, then one line per
batch; sequential runs also keep each batch's patch beside it, and a lifelong editor's carried state after the
last batch done: lmedit.carried). `resume=True` picks up where an interrupted
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
from lmedit.editors import get_editor, load_state, make_config, new_state
from lmedit.errors import InputError
from lmedit.evaluate import protocols
from lmedit.evaluate.counterfact import aggregate, score_counterfact
from lmedit.locate.value_store import ValueStore
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


def _beside(path: Path) -> tuple[Path, Path, Path]:
    """What a run keeps next to its journal: sequential patches, the training state of the batch in hand, and a
    lifelong editor's carried state after each batch done."""
    return path.with_name(path.name + ".patches"), train_dir_beside(path), path.with_name(path.name + ".state")


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

    @property
    def state_dir(self) -> Path:
        return _beside(self.path)[2]

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


CURVE_SEED = 0


def _curve_point(model, tok, made: list[EditRequest], scorer, aggregator, score_batch_size: int,
                 sample: int | None) -> dict:
    """The metrics of the edits made so far (or of a seeded sample of them), as the model is now."""
    import random

    if sample is not None and sample < len(made):
        made = [made[i] for i in sorted(random.Random(CURVE_SEED).sample(range(len(made)), sample))]
    metrics = aggregator(scorer(model, tok, made, batch_size=score_batch_size))
    return {k: v for k, v in metrics.items() if k != "protocol"}


def run_edit_eval(lm: LoadedModel, method: str, requests: list[EditRequest], batch_size: int | None = None,
                  sequential: bool = False, overrides: dict | None = None, task: str = "counterfact",
                  scorer: Scorer = score_counterfact, aggregator=aggregate, score_batch_size: int = 64,
                  progress: bool = True, announce=print, journal: Path | None = None, resume: bool = False,
                  value_store: ValueStore | None = None, baseline: dict | None = None,
                  keep_baseline_records: bool = False, curve_at: tuple[int, ...] = (),
                  curve_sample: int | None = None) -> dict:
    """Edit `requests` with `method` and score them; returns the DESIGN §8 result dict (+ per-record list).

    `curve_at` (sequential runs): after the batch that brings the edits made so far to each of these counts, score
    those edits (all of them, or a seeded sample of `curve_sample`), giving the forgetting curve in
    result["curve"]; the final scoring of every record is its last point.

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
    header = _signature(lm, method, config, requests, batch_size, sequential, task)
    if curve_at:
        header["curve"] = {"at": sorted(curve_at), "sample": curve_sample}
    log = Journal(journal, header, resume)

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
    # a lifelong editor in a sequence carries its state from batch to batch (fresh: made on the unedited model)
    carried = new_state(method, lm.name, model, config) if sequential and editor.carries_state else None

    def curve_point_after(i: int) -> float:
        """Score the forgetting curve's point if batch i brings the edits made so far to a `curve_at` count (once:
        a resumed run finds it in the journal). Returns the seconds spent."""
        done = sum(len(b) for b in batches[:i + 1])
        due = any(done - len(batches[i]) < n <= done for n in curve_at) and done < len(requests)
        if not due or log.find("curve", done) is not None:
            return 0.0
        t0 = time.perf_counter()
        log.write({"curve": done, "metrics": _curve_point(model, tok, requests[:done], scorer, aggregator,
                                                          score_batch_size, curve_sample)})
        return time.perf_counter() - t0

    state, resumed_state = carried, False
    try:
        for i, batch in enumerate(tqdm(batches, desc=f"{method} {'sequential' if sequential else 'batches'} of "
                                       f"{batch_size}", disable=not progress or len(batches) == 1)):
            line = log.find("batch", i)
            if line is not None:  # finished before an interruption
                edit_seconds += line["edit_seconds"]
                eval_seconds += line.get("eval_seconds", 0.0)
                if sequential:
                    applied.append(Patch.load(log.patch_dir / str(i)).apply(model, force=True))  # digest-checked
                    eval_seconds += curve_point_after(i)  # if the run stopped before scoring it
                else:
                    records += line["records"]
                continue
            if carried is not None and i > 0 and journal is not None and not resumed_state:
                state = load_state(log.state_dir / str(i - 1), carried)  # the state after the last batch done
            resumed_state = True
            t0 = time.perf_counter()
            patch = editor.edit(model, tok, batch, config, progress=progress, announce=announce, state=state,
                                values=value_store, checkpoint_dir=log.train_dir if journal is not None else None)
            if journal is not None and log.train_dir.exists():
                shutil.rmtree(log.train_dir)  # this batch's edit is done; the next one starts afresh
            spent = time.perf_counter() - t0 - patch.meta.get("timing", {}).get("stats_seconds", 0.0)
            edit_seconds += spent
            handle = patch.apply(model, force=True)  # just computed: the size check is for damaged files
            if sequential:
                applied.append(handle)
                if journal is not None:
                    patch.save(log.patch_dir / str(i), force=True)
                    if state is not None:
                        state.save(log.state_dir / str(i))
                log.write({"batch": i, "edit_seconds": spent})
                eval_seconds += curve_point_after(i)
                if journal is not None and state is not None:
                    shutil.rmtree(log.state_dir / str(i - 1), ignore_errors=True)  # batch i's is the one kept
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
    curve = None
    if sequential and curve_at:
        points = [{"edits": l["curve"], "metrics": l["metrics"]} for l in log.lines if "curve" in l]
        points.append({"edits": len(requests), "metrics": {k: v for k, v in metrics.items() if k != "protocol"}})
        curve = {"scored": "every edit made so far" if curve_sample is None else
                 f"a sample of at most {curve_sample} of the edits made so far (seed {CURVE_SEED})",
                 "points": [{"edits": 0, "metrics": {k: v for k, v in baseline.items() if k != "protocol"}}] + points}
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
    if curve is not None:
        result["curve"] = curve
    if keep_baseline_records:
        result["baseline_records"] = baseline_records
    return result
