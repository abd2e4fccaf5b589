"""Streaming uncentred second moment C = E[k kᵀ] of the keys at the input of W, for several layers in one pass.

Which tokens C averages over is a `Sample` (sampling.py): documents drawn in a seeded random order, each cut
to a maximum length, n of them counted in documents or tokens, or the whole corpus. With the plan of documents
(index, tokens counted) fixed first, the batches are a pure function of it, and

    C = (1/N) Σ_(d, m) in plan Σ_(t < m) k_(d,t) k_(d,t)ᵀ,   N = Σ m.

Under torch.distributed (e.g. `torchrun --nproc-per-node 4 -m lmedit.cli stats compute ...`) each rank runs every
world-th batch of the same plan and the float64 sums are all-reduced: the same documents, the same C.

Each batch's kᵀk is formed in the model's dtype (float32 at least: a 16-bit product would keep 8-11 bits of
each entry) and added to a float64 running sum, so the hot loop costs one matrix product per layer while the
long sum keeps full precision. The pass stops after the highest requested layer (the layers above do not
change the keys). Sums are checkpointed every few batches, with the index of the next batch of the plan, so an
interrupted pass resumes where it stopped; C itself is cached per (model fingerprint, corpus, layer, sample).

A cache entry or checkpoint is verified as it is read (it parses; C is float64 (d_in, d_in), finite and
symmetric; its metadata names the layer, corpus, sample and model of its path; its content digest matches);
one that does not is moved aside with a one-line warning and recomputed. The pass runs under a lock beside the
entries (fcntl.flock, released even when the process is killed), and a process that waited for it reads what
the other one wrote; every file is written under a temporary name and renamed, so none is ever half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from lmedit.errors import InputError
from lmedit.fileio import Damaged, atomic_save_tensors, check_digest, file_lock, read_verified, tensor_digest
from lmedit.models.forward import right_pad
from lmedit.models.arch import check_layer, mlp_out_dims, mlp_out_module
from lmedit.models.hooks import capture_io, run_until_stop
from lmedit.models.loading import cache_dir
from lmedit.models.logprobs import pad_id
from lmedit.stats.corpora import Corpus
from lmedit.stats.sampling import Sample, batches, draw, model_context, token_ids

BATCH_TOKENS = 4096  # padded tokens per forward: the old 16 documents × 256 tokens, a size that runs well on CPUs


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity for a model's weights: config + shapes + a sample of every tensor.

    The MLP output projections (the matrices editors change) are left out: C belongs to the base model, and
    sequential edits (ROME on top of ROME) reuse it, as the reference implementations do.
    """
    from lmedit.models.arch import arch_for

    edited = f".{arch_for(model).mlp_out}."
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        if edited in name:
            continue
        flat = p.detach().flatten()
        h.update(name.encode() + str(tuple(p.shape)).encode())
        h.update(flat[:256].float().cpu().numpy().tobytes() + flat[-256:].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def add_gram_upper(acc: torch.Tensor, k: torch.Tensor, blocks: int = 4) -> None:
    """acc += kᵀk, computing only the blocks on and above the diagonal (kᵀk is symmetric) and mirroring
    the rest: 10 of 16 block products, so the statistics pass costs little more than the forward itself."""
    if k.dtype in (torch.float16, torch.bfloat16):
        k = k.float()
    d = k.shape[1]
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    for i in range(blocks):
        a = k[:, edges[i]:edges[i + 1]]
        for j in range(i, blocks):
            block = (a.T @ k[:, edges[j]:edges[j + 1]]).double()
            acc[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] += block
            if j != i:
                acc[edges[j]:edges[j + 1], edges[i]:edges[i + 1]] += block.T


def as_sample(sample, model: nn.Module) -> Sample:
    """A Sample, a token count (what older callers pass), or a config with stats_* settings (LocateConfig),
    as it runs on `model` (documents cut to its context)."""
    if isinstance(sample, Sample):
        pass
    elif isinstance(sample, int) and not isinstance(sample, bool):
        sample = Sample("tokens", sample)
    elif hasattr(sample, "stats_seed"):
        sample = Sample.from_config(sample)
    else:
        raise InputError(f"not a statistics sample: {sample!r}")
    return sample.bounded(model_context(model))


def whole_if_larger(sample: Sample, corpus: Corpus) -> Sample:
    """n documents of a corpus that has no more than n: the whole corpus, one cache entry (the reference
    likewise clamps its sample size to the dataset's)."""
    if sample.unit == "documents" and sample.n is not None and sample.n >= len(corpus):
        return replace(sample, n=None).bounded(None)
    return sample


def stats_path(model: nn.Module, layer: int, corpus_id: str, sample) -> Path:
    """…/stats/<model>/<corpus>/layer<l>_<unit><n>_max<len>_seed<s>.safetensors (documents-all for the corpus)."""
    key = as_sample(sample, model).key
    return cache_dir() / "stats" / model_fingerprint(model) / corpus_id / f"layer{layer}_{key}.safetensors"


def plan_batches(tokenizer, corpus: Corpus, sample: Sample, batch_tokens: int = BATCH_TOKENS):
    """The sample's documents as (document index, tokens counted), grouped into the forward passes."""
    return batches(draw(tokenizer, corpus.documents, sample), batch_tokens)


def batch_token_ids(tokenizer, corpus: Corpus, batch: list[tuple[int, int]], max_length: int) -> list[list[int]]:
    """Each planned document's counted tokens (a causal model's keys at t < m do not see the tokens after m)."""
    rows = token_ids(tokenizer, [corpus.documents[i] for i, _ in batch], max_length)
    return [row[:m] for row, (_, m) in zip(rows, batch)]


class SecondMoments(dict):
    """{layer: C}, and what C averages over (recorded in patches)."""

    def __init__(self, by_layer: dict, corpus_id: str, sample: Sample, n_tokens: int, n_documents: int):
        super().__init__(by_layer)
        self.corpus_id, self.sample, self.n_tokens, self.n_documents = corpus_id, sample, n_tokens, n_documents

    @property
    def description(self) -> str:
        return (f"{self.n_tokens} tokens in {self.n_documents} documents of {self.corpus_id}: "
                f"{self.sample.describe()}")


def compute_second_moments(model: nn.Module, tokenizer, layers: list[int], corpus: Corpus, sample,
                           batch_tokens: int = BATCH_TOKENS, checkpoint: Path | None = None,
                           checkpoint_every: int = 20, progress: bool = True) -> SecondMoments:
    """C_l = (1/N) Σ k kᵀ over the tokens `sample` picks from `corpus` (see the module docstring), each l."""
    sample = as_sample(sample, model)
    layers = sorted(set(check_layer(model, l) for l in layers))
    plan = plan_batches(tokenizer, corpus, sample, batch_tokens)
    total = sum(m for batch in plan for _, m in batch)
    modules = {str(l): mlp_out_module(model, l) for l in layers}
    device = next(modules[str(layers[0])].parameters()).device
    d_in = mlp_out_dims(model, layers[0])[1]
    sums = {l: torch.zeros(d_in, d_in, dtype=torch.float64, device=device) for l in layers}
    count, start = 0, 0
    rank, world = shard()
    if checkpoint is not None and world > 1:
        checkpoint = checkpoint.with_name(f"{checkpoint.stem}.rank{rank}-of-{world}{checkpoint.suffix}")
    state = None if checkpoint is None else read_verified(checkpoint, lambda p: _read_checkpoint(p, layers, d_in))
    if state is not None and int(state["plan_batches"].item()) == len(plan) and \
            int(state["plan_tokens"].item()) == total:  # (a checkpoint of another plan is not mixed in)
        count, start = int(state["count"].item()), int(state["next_batch"].item())
        if 0 <= start <= len(plan) and count == sum(m for batch in plan[:start] for _, m in batch):
            sums = {l: state[f"sum.{l}"].to(device) for l in layers}
        else:
            count, start = 0, 0
    bar = tqdm(total=total, initial=count, desc=f"statistics ({corpus.id}, layers {layers})", unit="tok",
               disable=not progress or rank != 0)
    pad = pad_id(tokenizer)
    with torch.no_grad():
        for b in range(start, len(plan)):
            if b % world == rank:  # under torch.distributed each rank runs every world-th batch
                ids, mask = right_pad(batch_token_ids(tokenizer, corpus, plan[b], sample.max_length), pad)
                with capture_io(modules, inputs=True, stop_after=str(layers[-1])) as store:
                    run_until_stop(lambda: model(input_ids=ids.to(device), attention_mask=mask.to(device)))
                keep = mask.bool().to(device)
                for l in layers:
                    add_gram_upper(sums[l], store[str(l)]["input"][keep])  # (tokens, d_in)
            added = sum(m for _, m in plan[b])  # the plan is every rank's: all agree on the count
            count += added
            bar.update(added)
            if checkpoint is not None and (b + 1) % checkpoint_every == 0 and b + 1 < len(plan):
                _save_checkpoint(checkpoint, sums, count, b + 1, plan, total)
    bar.close()
    if world > 1:
        import torch.distributed as dist

        for l in layers:
            dist.all_reduce(sums[l])  # Σ over ranks of their batches' kᵀk = the single-process sum
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    n_docs = sum(len(batch) for batch in plan)
    return SecondMoments({l: sums[l] / total for l in layers}, corpus.id, sample, total, n_docs)


def join_process_group() -> str | None:
    """Under torchrun (WORLD_SIZE > 1 in the environment) join its process group — NCCL on GPUs, gloo on CPUs —
    and return this rank's device; None when not launched that way."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from lmedit.models.placement import rank_device

    backend, device = rank_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return device


def shard() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed process group (torchrun), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _save_checkpoint(path: Path, sums, count: int, next_batch: int, plan, total: int) -> None:
    state = {f"sum.{l}": s.detach().cpu() for l, s in sums.items()}
    state.update({"count": torch.tensor([count]), "next_batch": torch.tensor([next_batch]),
                  "plan_batches": torch.tensor([len(plan)]), "plan_tokens": torch.tensor([total])})
    atomic_save_tensors(path, state, metadata={"sha256": tensor_digest(state)})


def _check_square(name: str, t: torch.Tensor, d: int) -> None:
    """A float64 (d, d) matrix of finite values, symmetric up to rounding (raises Damaged)."""
    if t.dtype != torch.float64 or tuple(t.shape) != (d, d):
        raise Damaged(f"{name} is {t.dtype} {tuple(t.shape)}, expected torch.float64 {(d, d)}")
    if not bool(torch.isfinite(t).all()):
        raise Damaged(f"{name} has non-finite values")
    if float((t - t.T).abs().max()) > 1e-6 * float(t.abs().max()):
        raise Damaged(f"{name} is not symmetric")


def _read_checkpoint(path: Path, layers: list[int], d_in: int) -> dict:
    with safe_open(str(path), "pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    wanted = [f"sum.{l}" for l in layers] + ["count", "next_batch", "plan_batches", "plan_tokens"]
    if sorted(state) != sorted(wanted):
        raise Damaged(f"holds {sorted(state)}, expected {sorted(wanted)}")
    for l in layers:
        _check_square(f"sum.{l}", state[f"sum.{l}"], d_in)
    check_digest(state, meta)
    return state


def _stats_metadata(fingerprint: str, layer: int, corpus_id: str, sample: Sample) -> dict[str, str]:
    """What an entry was computed from, as its metadata records it (and its path names it)."""
    return {"layer": str(layer), "corpus": corpus_id, "unit": sample.unit, "n": str(sample.n or "all"),
            "max_length": str(sample.max_length), "seed": str(sample.seed), "model": fingerprint}


def _read_stats(path: Path, expected: dict[str, str], sample: Sample, d_in: int) -> tuple[torch.Tensor, dict]:
    """(C, metadata) of a cache entry, verified against what its path says it is (raises Damaged)."""
    with safe_open(str(path), "pt") as f:
        names, meta = list(f.keys()), f.metadata() or {}
        if names != ["C"]:
            raise Damaged(f"holds tensors {names}, expected one tensor 'C'")
        C = f.get_tensor("C")
    _check_square("C", C, d_in)
    for field, want in expected.items():
        if meta.get(field) != want:
            raise Damaged(f"its metadata has {field}={meta.get(field)!r}, expected {want!r}")
    for field in ("n_tokens", "n_documents"):
        if not meta.get(field, "").isdigit() or int(meta[field]) < 1:
            raise Damaged(f"its metadata has {field}={meta.get(field)!r}, expected a positive count")
    if sample.unit == "tokens" and sample.n is not None and int(meta["n_tokens"]) != sample.n:
        raise Damaged(f"it counts {meta['n_tokens']} tokens, its name {sample.n}")
    check_digest({"C": C}, meta)
    return C, meta


def cached_stats(model: nn.Module, layer: int, corpus_id: str, sample) -> tuple[torch.Tensor, dict] | None:
    """(C, metadata) of a layer's cache entry, verified; None when there is none, or it was damaged (then moved
    aside with a one-line warning, for the caller to recompute). `sample` as it runs on this corpus."""
    sample = as_sample(sample, model)
    expected = _stats_metadata(model_fingerprint(model), layer, corpus_id, sample)
    d_in = mlp_out_dims(model, check_layer(model, layer))[1]
    return read_verified(stats_path(model, layer, corpus_id, sample),
                         lambda p: _read_stats(p, expected, sample, d_in))


def load_or_compute(model: nn.Module, tokenizer, layers: list[int], corpus_spec: str = "wiki",
                    sample=None, compute: bool = True, progress: bool = True,
                    announce=print) -> SecondMoments:
    """C for each layer from the cache; missing layers are computed (announced, never silently) in one pass.

    `sample`: a Sample (default Sample()), a token count, or a LocateConfig (its stats_* settings).
    """
    from lmedit.stats.corpora import get_corpus

    sample = as_sample(Sample() if sample is None else sample, model)  # a bad setting fails before any reading
    corpus = get_corpus(corpus_spec)
    sample = whole_if_larger(sample, corpus)
    out, counts = {}, None

    def read_cache(wanted: list[int]) -> list[int]:
        """Fill `out` with the layers cached (verified); return the others."""
        nonlocal counts
        missing = []
        for l in wanted:
            got = cached_stats(model, l, corpus.id, sample)
            if got is None:
                missing.append(l)
            else:
                out[l], counts = got[0], (int(got[1]["n_tokens"]), int(got[1]["n_documents"]))
        return missing

    missing = read_cache(sorted(set(layers)))
    if missing and not compute:
        raise InputError(f"no cached statistics for layers {missing} ({corpus.id}, {sample.describe()}); "
                         "run `lmedit stats compute` first")
    if not missing:
        return SecondMoments(out, corpus.id, sample, *counts)
    # One process computes an entry; another one waits, then reads it. (A torchrun job is one computation: its
    # ranks take no lock, or rank 0 would hold it while the others wait to all-reduce with it.)
    world = shard()[1]
    lock_path = stats_path(model, missing[0], corpus.id, sample).with_name(f".{sample.key}.lock")
    lock = file_lock(lock_path, on_wait=lambda: announce(
        f"waiting for another process computing these statistics (lock {lock_path})"))
    with lock if world == 1 else nullcontext():
        missing = read_cache(missing) if world == 1 else missing  # computed by the process we waited for?
        if missing:
            counts = _compute_and_save(model, tokenizer, missing, corpus, sample, out, progress, announce)
    return SecondMoments(out, corpus.id, sample, *counts)


def _compute_and_save(model, tokenizer, missing: list[int], corpus: Corpus, sample: Sample, out: dict,
                      progress: bool, announce) -> tuple[int, int]:
    """One pass for the `missing` layers (resumable), each C put in `out` and written to the cache."""
    announce(f"computing key statistics for layers {missing} over {sample.describe()} of {corpus.id} "
             f"(cached under {cache_dir() / 'stats'})")
    resume = stats_path(model, missing[0], corpus.id, sample).with_name(
        f"partial_{'-'.join(map(str, missing))}_{sample.key}.safetensors")
    computed = compute_second_moments(model, tokenizer, missing, corpus, sample, checkpoint=resume,
                                      progress=progress)
    counts = computed.n_tokens, computed.n_documents
    fingerprint = model_fingerprint(model)
    rank, world = shard()
    for l, C in computed.items():
        out[l] = C
        if rank != 0:
            continue  # every rank holds C; one writes it
        C = C.detach().cpu()
        meta = {**_stats_metadata(fingerprint, l, corpus.id, sample), "n_tokens": str(counts[0]),
                "n_documents": str(counts[1]), "sha256": tensor_digest({"C": C})}
        atomic_save_tensors(stats_path(model, l, corpus.id, sample), {"C": C}, metadata=meta)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the cache is complete before any rank goes on
    return counts
