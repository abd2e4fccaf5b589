"""Reusing v* across evaluations of the same model: the dominant cost of locate-then-edit is computed once.

v*_i depends only on request i, the layer, the value settings, the context templates and the model's
weights — not on which other requests share its batch (values.py: a stacked δ is n independent
optimisations). So a sweep over batch sizes, MEMIT beside EMMET, and ROME at the same layer can all reuse
the same v*. Entries are keyed by the model state as well: the MLP output projections (the only weights a
locate-then-edit patch changes) are hashed on every call, so once the model carries an edit its v* are
computed afresh on the edited model — and kept under that state. A sequential run or ROME's
one-after-another edits made again (a resumed batch, the first 100 of a 1000-edit sequence, another
evaluation of the same sequence) pass through the same states and reuse every v*.

Entries are small safetensors files under `cache_dir()/values/<hash of all weights>/` for the model the store
was opened on, and `.../edited/<hash of its MLP outputs>/` for edited states, written atomically,
so they also survive across runs. Each names its key and model state and carries a digest of its tensors; an
entry that does not verify as it is read is moved aside with a one-line warning and computed again. Batched
and one-by-one optimisation agree exactly in float64 and to float32 rounding otherwise (see the values tests);
a run records how many v* it reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from lmedit.fileio import Damaged, atomic_save_tensors, check_digest, read_verified, tensor_digest
from lmedit.locate.values import ValueConfig, Values, compute_values
from lmedit.models.arch import mlp_out_name, num_layers
from lmedit.patches import fingerprint
from lmedit.requests import EditRequest

def model_state(model) -> str:
    """Hash of every MLP output projection: changes whenever any locate-then-edit patch is in the model."""
    names = [f"{mlp_out_name(model, l)}.weight" for l in range(num_layers(model))]
    return fingerprint(model, names)


class ValueStore:
    """v* per (request, model state) for one checkpoint, in memory and (when `root` is given) on disk."""

    def __init__(self, model, root: Path | None = None, block: int = 128):
        self.state = model_state(model)
        self.block = block  # requests optimised (and saved) together; as fast as larger blocks (values.py chunks)
        # On disk the entries outlive this process, so they are keyed by every weight of the model (hashed once
        # here), not only the MLP outputs checked per call: another checkpoint that shares those never hits.
        whole = fingerprint(model, [n for n, _ in model.named_parameters()])
        self.root = None if root is None else Path(root) / whole[:24]
        self.memory: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (model state, key)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(request: EditRequest, layer: int, templates: list[str], config: ValueConfig) -> str:
        settings = {k: v for k, v in asdict(config).items() if k != "chunk_requests"}  # memory only
        doc = [request.prompt, request.subject, request.target_new, layer, templates, settings]
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]

    def _dir(self, state: str) -> Path | None:
        """Where a state's entries live: the opening state at the root, an edited one in its own folder."""
        if self.root is None:
            return None
        return self.root if state == self.state else self.root / "edited" / state[:24]

    def get(self, state: str, key: str) -> dict[str, torch.Tensor] | None:
        if (state, key) in self.memory:
            return self.memory[state, key]
        folder = self._dir(state)
        path = None if folder is None else folder / f"{key}.safetensors"
        if path is None:
            return None
        entry = read_verified(path, lambda p: _read_entry(p, state, key))  # a damaged one: moved aside, None
        if entry is not None:
            self.memory[state, key] = entry
        return entry

    def put(self, state: str, key: str, entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        entry = {k: v.detach().cpu().contiguous() for k, v in entry.items()}
        self.memory[state, key] = entry
        folder = self._dir(state)
        if folder is not None:
            atomic_save_tensors(folder / f"{key}.safetensors", entry,
                                metadata={"key": key, "state": state, "sha256": tensor_digest(entry)})
        return entry

    def values(self, model, tokenizer, requests: list[EditRequest], layer: int, templates: list[str],
               config: ValueConfig, progress: bool = True) -> Values:
        """compute_values with reuse: only the requests this store has not seen in this model state are optimised."""
        state = model_state(model)
        keys = [self.key(r, layer, templates, config) for r in requests]
        found = {k: e for k in dict.fromkeys(keys) if (e := self.get(state, k)) is not None}
        missing = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(requests) - len(missing)
        self.misses += len(missing)
        for lo in range(0, len(missing), self.block):  # saved block by block: an interrupted run keeps its work
            part = missing[lo:lo + self.block]
            fresh = compute_values(model, tokenizer, [requests[i] for i in part], layer, templates, config,
                                   progress=progress and len(part) > 1)
            for j, i in enumerate(part):
                entry = {"v0": fresh.v0[j], "delta": fresh.delta[j], "target_prob": fresh.target_prob[j],
                         "steps": fresh.steps[j]}
                found[keys[i]] = self.put(state, keys[i], entry)
        device = next(model.parameters()).device
        stack = lambda name: torch.stack([found[k][name] for k in keys]).to(device)  # noqa: E731
        return Values(v0=stack("v0"), delta=stack("delta"), target_prob=stack("target_prob").cpu(),
                      steps=stack("steps").cpu())


ENTRY = ("delta", "steps", "target_prob", "v0")


def _read_entry(path: Path, state: str, key: str) -> dict[str, torch.Tensor]:
    """A stored v*, verified: its four tensors, v0 and δ vectors of one size, all finite, its metadata (entries
    written before metadata was kept have none) naming this key and state, its digest matching (raises Damaged)."""
    with safe_open(str(path), "pt") as f:
        entry, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    if tuple(sorted(entry)) != ENTRY:
        raise Damaged(f"holds {sorted(entry)}, expected {list(ENTRY)}")
    v0, delta = entry["v0"], entry["delta"]
    if v0.dim() != 1 or v0.shape != delta.shape or entry["target_prob"].numel() != 1 or entry["steps"].numel() != 1:
        raise Damaged(f"v0 {tuple(v0.shape)}, delta {tuple(delta.shape)}: expected two vectors of one size")
    if not all(bool(torch.isfinite(t).all()) for t in entry.values()):
        raise Damaged("it has non-finite values")
    for field, want in (("key", key), ("state", state)):
        if field in meta and meta[field] != want:
            raise Damaged(f"its metadata has {field}={meta[field]!r}, expected {want!r}")
    check_digest(entry, meta)
    return entry


def find_values(store: ValueStore | None, model, tokenizer, requests: list[EditRequest], layer: int,
                templates: list[str], config: ValueConfig, progress: bool = True) -> Values:
    """v* from `store` when one is given (computed and kept there when missing), else computed."""
    if store is None:
        return compute_values(model, tokenizer, requests, layer, templates, config, progress=progress)
    return store.values(model, tokenizer, requests, layer, templates, config, progress=progress)
