"""The editors' registry: each method module registers its name, config class, edit function and capabilities.

Apart from the package's __init__ (which loads the built-in modules on first use), so a method module imports
the registry without importing the package that imports it: no cycle.

Capabilities replace lists of method names elsewhere: the CLI, the evaluation runner and the canonical-examples
protocol ask the registry what a method needs (a subject to locate, a KV cache, a Backpack) and what it can take
(v* already optimised, a training checkpoint directory, a carried lifelong state). What changes an edit's
behaviour is passed to `Editor.edit` explicitly; nothing reaches an editor through a global or a context variable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Editor:
    name: str
    config_cls: type
    fn: Callable  # fn(model, tokenizer, requests, config, progress=True, announce=print, **what it takes) -> Patch
    summary: str
    # what fn takes beyond the requests (keyword arguments of the same name):
    carries_state: bool = False  # state= (lmedit.carried.CarriedState): a lifelong editor's state, updated in place
    reuses_values: bool = False  # values= (locate.value_store.ValueStore): v* reused for the same request and model
    checkpoints: bool = False  # checkpoint_dir= (Path): training saves each epoch there and resumes from it
    # what it needs:
    needs_subject: bool = True  # each request's subject is located in its prompt (locate-then-edit)
    needs_kv_cache: bool = False  # the locate core replays prompts from a KV cache (a Backpack has none)
    backpack_only: bool = False  # it edits a Backpack's sense vectors, which other architectures have not
    # the canonical-examples protocol can run it with a task's loss (canonical_run)
    canonical: bool = False

    def edit(self, model, tokenizer, requests, config, *, progress: bool = True, announce=print, state=None,
             values=None, checkpoint_dir: Path | None = None):
        """`fn` with the resources this editor takes. v* and checkpoints are offered by callers that have them and
        are passed only to editors that use them; a carried state given to an editor that carries none is a bug."""
        extra: dict[str, Any] = {}
        if state is not None:
            if not self.carries_state:
                raise TypeError(f"{self.name} carries no state between edits")
            extra["state"] = state
        if values is not None and self.reuses_values:
            extra["values"] = values
        if checkpoint_dir is not None and self.checkpoints:
            extra["checkpoint_dir"] = Path(checkpoint_dir)
        return self.fn(model, tokenizer, requests, config, progress=progress, announce=announce, **extra)


EDITORS: dict[str, Editor] = {}


def register_editor(name: str, config_cls: type, fn: Callable, summary: str, **capabilities) -> None:
    EDITORS[name] = Editor(name, config_cls, fn, summary, **capabilities)
