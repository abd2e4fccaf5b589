"""The model behind the page: the stack of patches applied to it, the lock every use of it takes, and the edits.

Every access to the model (an edit, a probe, a revert, a load) holds `Session.lock`, so nothing ever runs on a
model halfway through an edit; edits also queue on one worker (jobs.py). An edit applies its patch only once the
editor has returned it (editors leave the model as they found it), and takes it off again if scoring after it
fails, so a failed edit leaves the model as it was.
"""

from __future__ import annotations

import math
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lmedit.editors import get_editor
from lmedit.errors import InputError, LmeditError
from lmedit.evaluate.generation import greedy_continuations
from lmedit.evaluate.scoring import sum_logprob
from lmedit.models.arch import num_layers
from lmedit.patches import AppliedPatch, Patch
from lmedit.ui import archive
from lmedit.ui.forms import MAX_PROBES, EditOrder, FieldError, field_of, methods_for, read_order
from lmedit.ui.jobs import Job, JobQueue


@dataclass
class Entry:
    """A patch applied to the model, with the handle that reverts it bit-for-bit."""

    id: int
    patch: Patch
    handle: AppliedPatch
    label: str

    def describe(self, top: bool) -> dict:
        meta = self.patch.meta
        return {"id": self.id, "label": self.label, "method": meta.get("method"), "top": top,
                "requests": meta.get("requests", []), "num_params": self.patch.num_params,
                "norms": {name: round(n, 6) for name, n in self.patch.norms().items()},
                "summary": self.patch.summary(), "meta": meta}


class PatchStack:
    """Patches applied to one model, in order. Only the top one is reverted: each later patch was computed (and
    fingerprinted) on the model with the earlier ones in place, so taking one out from under it would leave the
    later ones on a base they were not made for."""

    def __init__(self, model):
        self.model = model
        self.entries: list[Entry] = []
        self._next = 1

    def push(self, patch: Patch, label: str) -> Entry:
        """Apply `patch` (refused, model untouched, when it was made on another base) and put it on top."""
        entry = Entry(self._next, patch, patch.apply(self.model), label)
        self._next += 1
        self.entries.append(entry)
        return entry

    def get(self, entry_id: int) -> Entry:
        for entry in self.entries:
            if entry.id == entry_id:
                return entry
        raise InputError(f"no applied patch {entry_id}; applied: {[e.id for e in self.entries] or 'none'}")

    def pop(self, entry_id: int | None = None) -> Entry:
        """Revert the top patch (which must be `entry_id` when given) and return it."""
        if not self.entries:
            raise InputError("no patch is applied")
        top = self.entries[-1]
        if entry_id is not None and self.get(entry_id) is not top:
            raise InputError(f"patch {entry_id} has patches on top of it (made with it in place): revert those first")
        top.handle.revert()
        self.entries.pop()
        return top

    def describe(self) -> list[dict]:
        """The patches as the page lists them; reads no weight, so it needs no lock (a copy of the list)."""
        entries = list(self.entries)
        return [e.describe(top=i == len(entries) - 1) for i, e in enumerate(entries)]


def probability_rows(lm, prompts: list[str], target_new: str, target_true: str | None,
                     max_new_tokens: int) -> list[dict]:
    """Per prompt: its greedy completion and P(target | prompt) of each target (the whole target, teacher-forced,
    as the demo and the scorers measure it)."""
    targets = [t for t in (target_new, target_true) if t]
    pairs = [(p, t) for p in prompts for t in targets]
    probs = dict(zip(pairs, (math.exp(lp) for lp in sum_logprob(lm.model, lm.tokenizer, pairs))))
    completions = greedy_continuations(lm.model, lm.tokenizer, prompts, max_new_tokens=max_new_tokens)
    return [{"prompt": p, "completion": c, "p_new": probs[(p, target_new)],
             "p_true": probs[(p, target_true)] if target_true else None} for p, c in zip(prompts, completions)]


class Session:
    """One loaded model as the page sees it."""

    def __init__(self, lm, max_new_tokens: int = 12):
        self.lm, self.max_new_tokens = lm, max_new_tokens
        self.lock = threading.Lock()
        self.stack = PatchStack(lm.model)
        self.methods = methods_for(lm)
        self.jobs = JobQueue(self._edit, self._describe_error)

    def info(self) -> dict:
        return {"model": self.lm.name, "model_type": self.lm.model.config.model_type,
                "layers": num_layers(self.lm.model),
                "methods": [m.to_dict() for m in self.methods.values()], "stack": self.stack_state()}

    def stack_state(self) -> list[dict]:
        return self.stack.describe()  # lock-free: a tab opened during an edit loads at once

    # ------------------------------------------------------------------ edits

    def submit(self, form) -> Job:
        """Check the form now (a FieldError for the page), then queue the edit."""
        return self.jobs.submit(read_order(form, self.lm, self.methods))

    def _describe_error(self, error: LmeditError) -> dict:
        return {"field": field_of(error) if isinstance(error, InputError) else "form", "message": str(error)}

    def _edit(self, job: Job) -> dict:
        """On the worker: score, edit, apply, score again, all under the lock."""
        order: EditOrder = job.order
        request = order.request
        with self.lock:
            t0 = time.perf_counter()
            job.say("scoring the unedited prompts")
            before = probability_rows(self.lm, order.prompts, request.target_new, request.target_true,
                                      self.max_new_tokens)
            job.say(f"editing with {order.method}")
            value = getattr(order.config, "value", None)  # the locate-then-edit methods: v* is what takes the time
            hook = job.count_steps("v* optimisation" if value else "training steps", getattr(value, "steps", None))
            try:
                patch = get_editor(order.method).fn(self.lm.model, self.lm.tokenizer, [request], order.config,
                                                    progress=True, announce=job.say)
            except InputError as e:  # e.g. ROME's one-layer rule: checked by the editor, shown beside the field
                raise FieldError(field_of(e, self.methods[order.method].settings), str(e)) from None
            finally:
                hook.remove()
            patch.meta["model"] = self.lm.name
            entry = self.stack.push(patch, order.label)
            try:
                job.say("scoring the edited prompts")
                after = probability_rows(self.lm, order.prompts, request.target_new, request.target_true,
                                         self.max_new_tokens)
            except BaseException:
                self.stack.pop(entry.id)  # never keep an edit the page was not shown
                raise
            stack = self.stack.describe()
        return {"entry": entry.describe(top=True), "request": request.to_dict(), "before": before, "after": after,
                "stack": stack, "seconds": round(time.perf_counter() - t0, 2)}

    # ------------------------------------------------------------------ the current model

    def probe(self, form) -> list[dict]:
        """Score prompts on the model as it is now (with the applied patches)."""
        if not isinstance(form, dict):
            raise FieldError("form", "expected a JSON object with prompts and targets")
        prompts = form.get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts) \
                or not 1 <= len(prompts) <= MAX_PROBES + 1:
            raise FieldError("probes", f"give 1 to {MAX_PROBES + 1} non-empty prompts to probe")
        target_new, target_true = form.get("target_new"), form.get("target_true") or None
        for name, value in (("target_new", target_new), ("target_true", target_true)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise FieldError(name, f"{name} is empty")
        if target_new is None:
            raise FieldError("target_new", "target_new is empty")
        with self.lock:
            return probability_rows(self.lm, prompts, target_new, target_true, self.max_new_tokens)

    def revert(self, entry_id: int) -> list[dict]:
        with self.lock:
            self.stack.pop(entry_id)
            return self.stack.describe()

    def archive(self, entry_id: int) -> tuple[str, bytes]:
        """The applied patch as a .zip of its directory, and a file name for it (the patch's own tensors, not the
        model's: no lock, so a save does not wait for a running edit)."""
        entry = self.stack.get(entry_id)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", entry.label).strip("-")[:60].lower()
        name = f"patch-{entry.id}-{slug}"
        return f"{name}.zip", archive.pack(entry.patch, name)

    def load(self, data: bytes, filename: str = "upload") -> list[dict]:
        """Apply an uploaded patch archive on top of the stack; anything wrong is an error for the upload field."""
        try:
            with tempfile.TemporaryDirectory(prefix="lmedit-upload-") as tmp:
                patch = archive.unpack(data, Path(tmp))
            with self.lock:
                self.stack.push(patch, f"{patch.meta.get('method', 'patch')}: loaded from {filename}")
                return self.stack.describe()
        except InputError as e:
            raise FieldError("upload", str(e)) from None
