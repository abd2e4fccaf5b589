"""Streaming uncentred second moment C = E[k kᵀ] of the keys at the input of W, for several layers in one pass.

Under torch.distributed (e.g. `torchrun --nproc-per-node 4 -m lmedit.cli stats compute ...`) each rank runs every
world-th batch of the same token stream and the float64 sums are all-reduced: the same tokens, the same C.

Each batch's kᵀk is formed in the model's dtype (float32 at least: a 16-bit product would keep 8-11 bits of
each entry) and added to a float64 running sum, so the hot loop costs
one matrix product per layer while the long sum keeps full precision. The pass stops after the highest
requested layer (the layers above do not change the keys). Sums are checkpointed so an interrupted pass
resumes where it stopped; C itself is cached per (model fingerprint, layer, corpus, n tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from lmedit.errors import InputError
from lmedit.fileio import atomic_save_tensors
from lmedit.locate.batching import right_pad
from lmedit.models.arch import check_layer, mlp_out_dims, mlp_out_module
from lmedit.models.hooks import capture_io, run_until_stop
from lmedit.models.loading import cache_dir
from lmedit.stats.corpora import Corpus


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


def stats_path(model: nn.Module, layer: int, corpus_id: str, n_tokens: int) -> Path:
    return cache_dir() / "stats" / model_fingerprint(model) / corpus_id / f"layer{layer}_n{n_tokens}.safetensors"


def _batches(tokenizer, corpus: Corpus, start_doc: int, seq_len: int, batch_size: int):
    batch = []
    for i in range(start_doc, len(corpus)):
        ids = tokenizer(corpus.documents[i], add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
        if ids:
            batch.append(ids)
        if len(batch) == batch_size or i == len(corpus) - 1:
            if batch:
                yield i + 1, batch
            batch = []


def compute_second_moments(model: nn.Module, tokenizer, layers: list[int], corpus: Corpus, n_tokens: int,
                           seq_len: int = 256, batch_size: int = 16, checkpoint: Path | None = None,
                           checkpoint_every: int = 20, progress: bool = True) -> dict[int, torch.Tensor]:
    """C_l = (1/N) Σ_t k_t k_tᵀ over the first N = n_tokens non-pad tokens of `corpus`, for each l in `layers`."""
    if n_tokens <= 0:
        raise InputError(f"the number of statistics tokens must be positive, got {n_tokens}")
    layers = sorted(set(check_layer(model, l) for l in layers))
    modules = {str(l): mlp_out_module(model, l) for l in layers}
    device = next(modules[str(layers[0])].parameters()).device
    d_in = mlp_out_dims(model, layers[0])[1]
    sums = {l: torch.zeros(d_in, d_in, dtype=torch.float64, device=device) for l in layers}
    count, start_doc = 0, 0
    rank, world = shard()
    if checkpoint is not None and world > 1:
        checkpoint = checkpoint.with_name(f"{checkpoint.stem}.rank{rank}-of-{world}{checkpoint.suffix}")
    if checkpoint is not None and checkpoint.is_file():
        state = load_file(checkpoint)
        sums = {l: state[f"sum.{l}"].to(device) for l in layers}
        count, start_doc = int(state["count"].item()), int(state["next_doc"].item())
    bar = tqdm(total=n_tokens, initial=min(count, n_tokens), desc=f"statistics ({corpus.id}, layers {layers})",
               unit="tok", disable=not progress or rank != 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for b, (next_doc, batch) in enumerate(_batches(tokenizer, corpus, start_doc, seq_len, batch_size)):
            if count >= n_tokens:
                break
            ids, mask = right_pad(batch, pad)
            # Count exactly n_tokens: drop tokens past the budget (in reading order).
            flat_keep = mask.flatten().cumsum(0) <= (n_tokens - count)
            keep = (mask.flatten().bool() & flat_keep).view_as(mask).to(device)
            if b % world == rank:  # under torch.distributed each rank runs every world-th batch
                with capture_io(modules, inputs=True, stop_after=str(layers[-1])) as store:
                    run_until_stop(lambda: model(input_ids=ids.to(device), attention_mask=mask.to(device)))
                for l in layers:
                    k = store[str(l)]["input"][keep]  # (tokens, d_in)
                    add_gram_upper(sums[l], k)
            added = int(keep.sum())  # every rank tokenizes every batch, so all agree on the count and the cut
            count += added
            bar.update(added)
            if checkpoint is not None and (b + 1) % checkpoint_every == 0:
                _save_checkpoint(checkpoint, sums, count, next_doc)
    bar.close()
    if count < n_tokens:
        raise InputError(f"corpus {corpus.id} has only {count} tokens, fewer than the {n_tokens} asked for")
    if world > 1:
        import torch.distributed as dist

        for l in layers:
            dist.all_reduce(sums[l])  # Σ over ranks of their batches' kᵀk = the single-process sum
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return {l: sums[l] / count for l in layers}


def join_process_group() -> str | None:
    """Under torchrun (WORLD_SIZE > 1 in the environment) join its process group — NCCL on GPUs, gloo on CPUs —
    and return this rank's device; None when not launched that way."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def shard() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed process group (torchrun), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _save_checkpoint(path: Path, sums, count: int, next_doc: int) -> None:
    state = {f"sum.{l}": s for l, s in sums.items()}
    state["count"] = torch.tensor([count])
    state["next_doc"] = torch.tensor([next_doc])
    atomic_save_tensors(path, state)


def load_or_compute(model: nn.Module, tokenizer, layers: list[int], corpus_spec: str = "wiki",
                    n_tokens: int = 100_000, compute: bool = True, progress: bool = True,
                    announce=print) -> dict[int, torch.Tensor]:
    """C for each layer from the cache; missing layers are computed (announced, never silently) in one pass."""
    from lmedit.stats.corpora import WIKI_ID, get_corpus

    corpus = None if corpus_spec == "wiki" else get_corpus(corpus_spec)  # read a file corpus once
    corpus_id = WIKI_ID if corpus is None else corpus.id
    out, missing = {}, []
    for l in sorted(set(layers)):
        path = stats_path(model, l, corpus_id, n_tokens)
        if path.is_file():
            out[l] = load_file(path)["C"]
        else:
            missing.append(l)
    if missing:
        if not compute:
            raise InputError(f"no cached statistics for layers {missing} ({corpus_id}, n={n_tokens}); "
                             "run `lmedit stats compute` first")
        corpus = corpus or get_corpus(corpus_spec)
        announce(f"computing key statistics for layers {missing} over {n_tokens} tokens of {corpus_id} "
                 f"(cached under {cache_dir() / 'stats'})")
        resume = stats_path(model, missing[0], corpus_id, n_tokens).with_name(
            f"partial_{'-'.join(map(str, missing))}_n{n_tokens}.safetensors")
        computed = compute_second_moments(model, tokenizer, missing, corpus, n_tokens, checkpoint=resume,
                                          progress=progress)
        rank, world = shard()
        for l, C in computed.items():
            out[l] = C
            if rank != 0:
                continue  # every rank holds C; one writes it
            atomic_save_tensors(stats_path(model, l, corpus_id, n_tokens), {"C": C}, metadata={
                "layer": str(l), "corpus": corpus_id, "n_tokens": str(n_tokens), "model": model_fingerprint(model)})
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # the cache is complete before any rank goes on
    return out
