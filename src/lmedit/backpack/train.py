"""Train a small Backpack with a large model's tokenizer on the offline corpus (DESIGN §6), so that its sense edits
can steer that model (backpack/ensemble.py). Checkpoints as it goes and resumes exactly.

Data: the corpus's documents, tokenised and joined with EOS into one stream, cut into blocks of `seq_len` tokens;
epoch e visits the blocks in a permutation drawn from seed + e, so step s always sees the same batch and a resumed
run continues the very same sequence. Initialisation: GPT-2's, except that with `embeddings_from` set the token
embedding E (tied to the output) starts as the large model's embedding projected on its top `dim` principal
directions — tokens the large model puts close together start close together, which a short CPU run needs.

On disk (the output directory): config.json + model.safetensors + the tokenizer (a loadable HF directory), and
train_state.json + optimizer.safetensors (Adam's moments by parameter name) to resume. Nothing is pickled.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from lmedit.checkpoints import adam_tensors, restore_adam
from lmedit.errors import InputError
from lmedit.fileio import atomic_save_tensors, atomic_write_json, read_json

STATE_FILE, OPTIM_FILE = "train_state.json", "optimizer.safetensors"


@dataclass
class BackpackTrainConfig:
    layers: int = 2  # of the contextualising GPT-2
    dim: int = 128  # d
    heads: int = 4
    senses: int = 16  # k
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 2000
    lr: float = 1e-3  # Adam, linear warm-up then cosine decay to lr/10
    warmup: int = 100
    seed: int = 0
    checkpoint_every: int = 200

    def validate(self) -> None:
        for name in ("layers", "dim", "heads", "senses", "seq_len", "batch_size", "steps", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.heads or self.dim % self.senses:
            raise InputError(f"dim ({self.dim}) must be divisible by heads ({self.heads}) and senses ({self.senses})")
        if not (math.isfinite(self.lr) and self.lr > 0) or self.warmup < 0:
            raise InputError(f"lr must be positive and finite and warmup >= 0, got lr={self.lr}, warmup={self.warmup}")


def token_blocks(tokenizer, documents, seq_len: int) -> torch.Tensor:
    """(n_blocks, seq_len + 1) LongTensor: the EOS-joined token stream in overlapping-by-one windows
    (inputs = block[:-1], targets = block[1:])."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in documents:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise InputError(f"the corpus holds {len(stream)} tokens: too few for one block of {seq_len}")
    data = torch.tensor(stream[: n * seq_len + 1])
    return torch.stack([data[i * seq_len: (i + 1) * seq_len + 1] for i in range(n)])


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def batch_at(blocks: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch of `step`: a pure function of (step, seed), so a resumed run sees what the first run would have."""
    n = blocks.shape[0]
    rows = [_epoch_order(n, seed + i // n)[i % n] for i in range(step * batch_size, (step + 1) * batch_size)]
    return blocks[torch.stack(rows)]


def new_backpack(cfg: BackpackTrainConfig, tokenizer, embeddings_from: torch.Tensor | None = None):
    from lmedit.models.backpack import BackpackConfig, BackpackForCausalLM

    torch.manual_seed(cfg.seed)
    config = BackpackConfig(vocab_size=len(tokenizer), n_embd=cfg.dim, n_layer=cfg.layers, n_head=cfg.heads,
                            num_senses=cfg.senses, n_positions=max(cfg.seq_len, 512),
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0)  # a short run on little data: no dropout
    model = BackpackForCausalLM(config)
    if embeddings_from is not None:
        E = embeddings_from.detach().float()
        if E.shape[0] != len(tokenizer):
            raise InputError(f"the embedding to start from has {E.shape[0]} rows, the tokenizer {len(tokenizer)} tokens")
        if E.shape[1] < cfg.dim:
            raise InputError(f"dim {cfg.dim} exceeds the large model's embedding width {E.shape[1]}")
        centred = E - E.mean(0)
        _, _, V = torch.pca_lowrank(centred, q=cfg.dim, center=False, niter=4)
        projected = centred @ V[:, : cfg.dim]  # E_small = (E − mean) V_d
        scale = config.initializer_range / float(projected.std())  # GPT-2's scale, so training starts as usual
        with torch.no_grad():
            model.backpack.gpt2_model.wte.weight.copy_(projected * scale)
    return model


def _lr_at(cfg: BackpackTrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save(out: Path, model, tokenizer, optimiser, cfg: BackpackTrainConfig, step: int, losses: list[float],
          corpus_id: str) -> None:
    """A complete checkpoint: weights and tokenizer first, the optimiser next, the state file last (a run resumes
    only from a state file, which names a step whose weights are already on disk)."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    atomic_save_tensors(out / OPTIM_FILE, adam_tensors(optimiser, {id(p): n for n, p in model.named_parameters()}))
    atomic_write_json(out / STATE_FILE, {"step": step, "config": asdict(cfg), "corpus": corpus_id, "losses": losses})


def _restore_optimiser(out: Path, model, optimiser, step: int) -> None:
    restore_adam(optimiser, dict(model.named_parameters()), load_file(str(out / OPTIM_FILE)), step)


def train_backpack(out: Path, tokenizer, corpus, cfg: BackpackTrainConfig, *, embeddings_from=None,
                   resume: bool = False, max_new_steps: int | None = None, progress: bool = True) -> dict:
    """Train (or, with `resume`, continue) a Backpack into `out`; returns the state (step, losses).

    `max_new_steps` stops this call early (after a checkpoint): a long run in time-boxed pieces, each resumed."""
    from transformers import AutoModelForCausalLM

    from lmedit.models.backpack import register

    cfg.validate()
    out = Path(out)
    state = None
    if resume and (out / STATE_FILE).is_file():
        state = read_json(out / STATE_FILE)
        if state["config"] != asdict(cfg) or state["corpus"] != corpus.id:
            raise InputError(f"{out} holds a run with other settings or another corpus; start a new --out")
    blocks = token_blocks(tokenizer, corpus, cfg.seq_len)
    if state is None:
        model = new_backpack(cfg, tokenizer, embeddings_from)
        step, losses = 0, []
    else:
        register()
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True)
        step, losses = state["step"], list(state["losses"])
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    if state is not None and step > 0:
        _restore_optimiser(out, model, optimiser, step)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=cfg.steps, initial=step, desc="training the Backpack", unit="step", disable=not progress)
    t0, window = time.perf_counter(), []
    stop = cfg.steps if max_new_steps is None else min(cfg.steps, step + max_new_steps)
    while step < stop:
        batch = batch_at(blocks, step, cfg.batch_size, cfg.seed)
        for group in optimiser.param_groups:
            group["lr"] = _lr_at(cfg, step)
        logits = model(batch[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise InputError(f"the training loss became non-finite at step {step} (lr {cfg.lr:g}); the last "
                             f"checkpoint in {out} is intact")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        step += 1
        window.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{window[-1]:.3f}")
        if step % cfg.checkpoint_every == 0 or step == stop:
            losses.append(sum(window) / len(window))  # mean training loss since the last checkpoint
            window = []
            _save(out, model, tokenizer, optimiser, cfg, step, losses, corpus.id)
    bar.close()
    return {"step": step, "losses": losses, "seconds": time.perf_counter() - t0, "blocks": int(blocks.shape[0])}
