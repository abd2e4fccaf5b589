"""State a lifelong editor carries from one batch of edits to the next, saved and loaded so a sequence can stop
and continue (AlphaEdit's keys of the edits made so far, UltraEdit's running normalisation).

A carried state belongs to one sequence on one model: it records the model's name, its type and the fingerprint
of the edited weights before the first edit, and loading it for another model is refused naming both. On disk it
is one safetensors file whose metadata holds those facts and the digest of its tensors (fileio.tensor_digest),
written atomically; nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from lmedit.errors import InputError
from lmedit.fileio import Damaged, atomic_save_tensors, check_digest, tensor_digest

STATE_FILE = "state.safetensors"


@dataclass
class CarriedState:
    """Tensors by name plus who they belong to. `kind` names the editor's state ('alphaedit', 'ultraedit')."""

    kind: str
    model: str  # the model's name as lmedit loaded it
    model_type: str
    base_fingerprint: str  # patches.fingerprint of the edited weights before the first edit of the sequence
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    n_edits: int = 0  # edits made so far in the sequence
    # what an editor derives once per sequence from fixed inputs (AlphaEdit's projections): never saved
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def owner(self) -> str:
        return f"{self.model} ({self.model_type}, weights {self.base_fingerprint[:12]})"

    def check_belongs(self, kind: str, model: str, model_type: str, base_fingerprint: str) -> None:
        """Refuse a state of another editor or another model, naming both."""
        if kind != self.kind:
            raise InputError(f"the carried state is {self.kind}'s, not {kind}'s")
        here = CarriedState(kind, model, model_type, base_fingerprint)
        if (model_type, base_fingerprint) != (self.model_type, self.base_fingerprint):
            raise InputError(f"the carried state was made on {self.owner()}, not on {here.owner()}; "
                             "start a new sequence for this model")

    def save(self, directory: str | Path) -> Path:
        Path(directory).mkdir(parents=True, exist_ok=True)
        path = Path(directory) / STATE_FILE
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        meta = {"kind": self.kind, "model": self.model, "model_type": self.model_type,
                "base_fingerprint": self.base_fingerprint, "n_edits": str(self.n_edits),
                "sha256": tensor_digest(tensors)}
        atomic_save_tensors(path, tensors, meta)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "CarriedState":
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise InputError(f"no carried state at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            check_digest(tensors, meta)
            missing = {"kind", "model", "model_type", "base_fingerprint", "n_edits", "sha256"} - set(meta)
            if missing:
                raise Damaged(f"its metadata lacks {', '.join(sorted(missing))}")
        except (SafetensorError, OSError, json.JSONDecodeError, Damaged) as e:
            raise InputError(f"{path} is not a readable carried state ({e})") from None
        return cls(meta["kind"], meta["model"], meta["model_type"], meta["base_fingerprint"], tensors,
                   int(meta["n_edits"]))
