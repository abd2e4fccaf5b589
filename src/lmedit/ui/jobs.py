"""Edits as jobs on one worker thread: two tabs pressing Edit at once queue, in order, and each sees the model
only as the one before left it. A job's progress is what it announces plus the editor's live progress bars.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from lmedit.errors import InputError, LmeditError

MAX_LOG = 200  # announced lines kept per job
MAX_JOBS = 100  # finished jobs kept for the page to read back


@dataclass
class Job:
    """One edit asked for: queued → running → done (result) or failed (error: field and message)."""

    id: int
    order: Any
    state: str = "queued"
    log: list[str] = field(default_factory=list)
    result: dict | None = None
    error: dict | None = None
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    # optimiser steps taken so far (v* for the locate-then-edit methods, which open no bar for one request)
    steps: dict = field(default_factory=lambda: {"desc": "optimiser steps", "n": 0, "total": None, "unit": "step"})

    def count_steps(self, desc: str, total: int | None):
        """Count every optimiser step taken until the returned hook handle is removed (torch's global step hook:
        edits run one at a time, so the steps taken are this job's)."""
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.steps.update(desc=desc, total=total)

        def step(optimizer, args, kwargs) -> None:
            self.steps["n"] += 1

        return register_optimizer_step_post_hook(step)

    def say(self, *parts) -> None:
        """The editors' `announce`: one line of what is happening (statistics computed, v* found, ...)."""
        self.log.append(" ".join(str(p) for p in parts))
        del self.log[:-MAX_LOG]


def live_bars() -> list[dict]:
    """The progress bars open in this process (the editors' tqdm bars: statistics, v*, training epochs).
    Edits run one at a time, so the open bars are the running edit's."""
    from tqdm.std import tqdm

    with tqdm.get_lock():
        bars = list(getattr(tqdm, "_instances", ()))
    return [{"desc": str(b.desc).rstrip(": "), "n": b.n, "total": b.total, "unit": b.unit}
            for b in bars if not getattr(b, "disable", False)]


class JobQueue:
    """Runs `work(job) -> result` for each submitted job, one at a time, on a single daemon thread.

    `describe(error) -> {"field", "message"}` turns what `work` raised into what the page shows: lmedit's errors
    as their own one-line message, anything else as one line naming its type, the traceback going only to the
    server's log (stderr)."""

    def __init__(self, work: Callable[[Job], dict], describe: Callable[[LmeditError], dict]):
        self._work, self._describe = work, describe
        self._queue: queue.Queue[Job] = queue.Queue()
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._mutex = threading.Lock()
        self._worker: threading.Thread | None = None

    def submit(self, order) -> Job:
        with self._mutex:
            job = Job(next(self._ids), order)
            self._jobs[job.id] = job
            done = [j for j in self._jobs.values() if j.finished.is_set()]
            for old in done[:max(0, len(self._jobs) - MAX_JOBS)]:
                del self._jobs[old.id]
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="lmedit-edits", daemon=True)
                self._worker.start()
        self._queue.put(job)
        return job

    def get(self, job_id: int) -> Job:
        with self._mutex:
            if job_id not in self._jobs:
                raise InputError(f"no edit job {job_id} (the server keeps the last {MAX_JOBS})")
            return self._jobs[job_id]

    def position(self, job: Job) -> int:
        """How many edits run or wait before this one (0 once it runs)."""
        if job.state != "queued":
            return 0
        with self._mutex:
            return sum(1 for j in self._jobs.values() if j.id < job.id and not j.finished.is_set())

    def status(self, job: Job) -> dict:
        out = {"id": job.id, "state": job.state, "position": self.position(job), "log": list(job.log),
               "progress": self.progress(job),
               "elapsed": round(time.time() - (job.started or job.submitted), 1)}
        if job.result is not None:
            out["result"] = job.result
        if job.error is not None:
            out["error"] = job.error
        return out

    @staticmethod
    def progress(job: Job) -> list[dict]:
        if job.state != "running":
            return []
        return live_bars() + ([dict(job.steps)] if job.steps["n"] else [])

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            job.state, job.started = "running", time.time()
            try:
                job.result = self._work(job)
                job.state = "done"
            except LmeditError as e:
                job.error, job.state = self._describe(e), "failed"
            except Exception as e:  # noqa: BLE001 - the worker must outlive any one edit; the page gets one line
                traceback.print_exc()
                first = (str(e).splitlines() or [""])[0]
                job.error = {"field": "form", "message": f"the edit failed: {type(e).__name__}: {first} "
                                                         "(details in the server's log)"}
                job.state = "failed"
            finally:
                job.finished.set()
