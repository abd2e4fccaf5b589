"""Fine-tuning editors: `ft` (loss on prompt + target, the naive baseline) and `ft-conditional` (loss on the
target only: Gangadhar & Stratos 2024, "Model Editing by Standard Fine-Tuning"), sharing the one training loop
that `lora` reuses. DESIGN.md §5.

Conditional likelihood, over the examples e = (x_e, y_e) of a mini-batch B:

    L(θ) = −(1/|B|) Σ_e (1/|y_e|) Σ_t log p_θ(y_e,t | x_e, y_e,<t)        (the prompt x_e adds no term)

`ft` averages −log p_θ over every token of x_e y_e instead. The training set holds, per edit, the edit
(prompt → target_new), m random paraphrases (a model-written random prefix + the prompt → target_new) and r random
facts (another prompt → its true answer, from a pool: by default `fact_pool`'s) that anchor locality; ft-conditional
draws m = r = 2 by default, ft none. Regularisers: the projection W ← clamp(W, W₀ − ε, W₀ + ε) after every step
(‖W − W₀‖∞ ≤ ε) and β·KL(p₀ ‖ p_θ) on unrelated text.
Training runs on the model in place; the trained tensors are restored bit-for-bit in a `finally` and the result is
a Patch of ΔW = W − W₀, so the model leaves as it came.

Mass editing (mode="mass") trains all edits of a call together in shuffled mini-batches; mode="single" trains each
edit alone from W₀ and sums the deltas into one patch. The evaluation runner's `--batch-size 1` makes one call
per edit instead (each scored alone), which is single editing with either mode.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lmedit import __version__
from lmedit.editors.registry import register_editor
from lmedit.editors.augment import Example, build_examples
from lmedit.editors.budget import Budget
from lmedit.editors.training import Checkpoint, NonFiniteLoss, diverged_weights, fit, initial_norms
from lmedit.editors.train_config import (  # noqa: F401  (the configs are part of this module's API)
    KL_TEXT, MODES, ROLES, ConditionalConfig, FinetuneConfig, TrainConfig, prepare, resolve_modules,
    trainable_parameters)
from lmedit.errors import EditFailure, InputError
from lmedit.locate.batching import body, unembed
from lmedit.locate.prompts import encode, with_target
from lmedit.models.arch import arch_for, get_module
from lmedit.models.logprobs import kl_to_reference, log_distributions, pad_id, token_logprobs
from lmedit.patches import Delta, Patch, compose
from lmedit.requests import EditRequest

# ------------------------------------------------------------------------------------------------ the loss

@dataclass
class Batch:
    input_ids: torch.Tensor  # (b, t)
    attention_mask: torch.Tensor  # (b, t)
    labels: torch.Tensor  # (b, t): the token each position predicts
    loss_mask: torch.Tensor  # (b, t) float: positions in the loss (targets only, or every real token)
    target_mask: torch.Tensor  # (b, t) float: positions predicting target tokens


def tokenize(tokenizer, ex: Example) -> tuple[list[int], list[int], int]:
    """(input ids, labels, first target position) of prompt + target, by the one rule in locate.prompts."""
    scored = with_target(encode(tokenizer, ex.prompt), tokenizer, ex.prompt, ex.target)
    return scored.ids, scored.ids[1:] + [scored.target_ids[-1]], scored.first_target_pos


def collate(encoded: list[tuple[list[int], list[int], int]], conditional: bool, pad_id: int, device) -> Batch:
    """Right-padded batch; the conditional loss masks every position before the first target position."""
    t = max(len(ids) for ids, _, _ in encoded)
    ids, labels, loss, target = (torch.zeros(len(encoded), t, dtype=d) for d in (torch.long,) * 2 + (torch.float,) * 2)
    ids.fill_(pad_id), labels.fill_(pad_id)
    for row, (x, y, first) in enumerate(encoded):
        ids[row, :len(x)], labels[row, :len(y)] = torch.tensor(x), torch.tensor(y)
        loss[row, first if conditional else 0:len(x)] = 1.0
        target[row, first:len(x)] = 1.0
    mask = (torch.arange(t) < torch.tensor([len(x) for x, _, _ in encoded])[:, None]).long()
    return Batch(*(v.to(device) for v in (ids, mask, labels, loss, target)))


def example_loss(logits: torch.Tensor, batch: Batch, at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example mean NLL over loss_mask, per-example log P(target | prompt), detached). Masked positions get
    an exactly zero gradient: their log-probabilities are multiplied by 0 and nothing else reads them.

    `logits` is (b, t, vocab), or (n, vocab) at the n positions of the (b, t) mask `at` only (`read_positions`):
    the conditional loss reads a few target positions of each row, so the training loop unembeds only those."""
    if at is None:
        at = torch.ones(batch.labels.shape, dtype=torch.bool, device=logits.device)
        logits = logits.reshape(-1, logits.shape[-1])
    picked = token_logprobs(logits, batch.labels[at])  # (n,)
    token = torch.zeros(batch.labels.shape, dtype=picked.dtype, device=picked.device).masked_scatter(at, picked)
    loss = -(token * batch.loss_mask).sum(1) / batch.loss_mask.sum(1)
    return loss, (token.detach() * batch.target_mask).sum(1)


def read_positions(batch: Batch) -> torch.Tensor:
    """(b, t) mask of the positions whose logits the loss or the target probability reads."""
    return (batch.loss_mask + batch.target_mask) > 0


def _kl(model, ref: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean over real tokens of KL(p₀ ‖ p_θ), with p₀'s log-probabilities `ref` taken before training."""
    return kl_to_reference(ref, log_distributions(model, batch.input_ids, batch.attention_mask),
                           batch.attention_mask)


def _run_key(examples: list[Example], params: dict[str, nn.Parameter], config: TrainConfig, conditional: bool,
             desc: str) -> str:
    """What a saved state must match to be resumed: the training set, the settings and the starting weights."""
    h = hashlib.sha256(json.dumps({"desc": desc, "conditional": conditional, "config": asdict(config),
                                   "examples": [asdict(e) for e in examples]}, sort_keys=True, default=str).encode())
    for name, p in params.items():  # a strided sample and two float64 sums: cheap on a GPU, and any other base
        flat = p.detach().flatten()  # (another checkpoint, an earlier edit) differs in them
        sample = flat[:: max(1, flat.numel() // 65536)].float().cpu()
        h.update(name.encode() + sample.numpy().tobytes())
        h.update(f"{float(flat.double().sum())!r}/{float(flat.double().abs().sum())!r}".encode())
    return h.hexdigest()[:24]


def train(model, tokenizer, examples: list[Example], params: dict[str, nn.Parameter], config: TrainConfig,
          conditional: bool, progress: bool = True, project: Callable[[], None] | None = None,
          desc: str = "ft", checkpoint_dir: Path | None = None) -> dict:
    """Adam on `params` over shuffled mini-batches of `examples` (the one loop, `training.fit`); `project` runs
    after every step. Returns a summary of the training curve. A non-finite loss or diverging weights raise
    EditFailure (the caller restores W₀). Early stopping reads each edit's P(target_new | prompt) from its last
    forward pass (before that step); with a degradation budget the epoch that breaks it is undone and training
    stops.

    `checkpoint_dir`: the state is saved there after every epoch, and a call with the same examples, settings and
    starting weights resumes from it, so an interrupted 1000-edit mass edit (hours on a CPU) loses at most one
    epoch. The evaluation runner passes one per batch, beside its journal."""
    device = get_module(model, arch_for(model).embed).weight.device
    pad = pad_id(tokenizer)
    encoded = [tokenize(tokenizer, ex) for ex in examples]
    ref = kl_batch = None
    if config.kl_factor > 0:
        kl_ids = [encode(tokenizer, t) for t in config.kl_text]
        kl_batch = collate([(ids, ids, 0) for ids in kl_ids], False, pad, device)  # labels unused
        with torch.no_grad():
            ref = log_distributions(model, kl_batch.input_ids, kl_batch.attention_mask)
    budget = Budget(model, tokenizer, config, params) if config.budget is not None else None
    norms0 = initial_norms(params)
    run = {"epoch_loss": [], "best": math.inf, "stale": 0,
           "edit_lp": {ex.edit: -math.inf for ex in examples if ex.kind == "edit"}}

    def batch_loss(idx: list[int]) -> torch.Tensor:
        batch = collate([encoded[k] for k in idx], conditional, pad, device)
        at = read_positions(batch)
        hidden = body(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             use_cache=False).last_hidden_state
        per_example, target_lp = example_loss(unembed(model, hidden[at]), batch, at)
        for k, lp in zip(idx, target_lp.tolist()):
            if examples[k].kind == "edit":
                run["edit_lp"][examples[k].edit] = lp
        loss = per_example.mean()
        return loss + config.kl_factor * _kl(model, ref, kl_batch) if ref is not None else loss

    def after_step(step: int) -> None:
        if project is not None:
            project()
        bad = diverged_weights(params, norms0)
        if bad is not None:
            raise EditFailure(f"{desc}: training diverged at step {step}: the weights of {bad[0]} {bad[1]}; "
                              f"lower lr (now {config.lr:g}); the model is unchanged")

    def after_epoch(epoch: int, loss: float) -> str | None:
        run["epoch_loss"].append(loss)
        if budget is not None and not budget.within_after_epoch():
            return "budget"
        if config.stop_prob is not None and min(math.exp(lp) for lp in run["edit_lp"].values()) > config.stop_prob:
            return "target_prob"
        run["stale"] = 0 if loss < run["best"] * (1 - config.min_improvement) else run["stale"] + 1
        run["best"] = min(run["best"], loss)
        if config.patience and run["stale"] >= config.patience:
            return "plateau"
        return None

    def restore(meta: dict) -> None:
        run.update(epoch_loss=meta["epoch_loss"], best=meta["best"], stale=meta["stale"],
                   edit_lp={int(k): v for k, v in meta["edit_lp"].items()})
        if budget is not None:
            budget.losses, budget.kept = meta["budget_losses"], budget.snapshot()

    checkpoint = None if checkpoint_dir is None else Checkpoint(
        Path(checkpoint_dir), _run_key(examples, params, config, conditional, desc),
        save=lambda: {**run, "budget_losses": budget.losses if budget is not None else None}, restore=restore)
    try:
        fitted = fit(params, len(examples), batch_loss, lr=config.lr, epochs=config.epochs,
                     batch_size=config.batch_size, seed=config.seed, after_step=after_step, after_epoch=after_epoch,
                     checkpoint=checkpoint, progress=progress, desc=desc)
    except NonFiniteLoss as e:
        raise EditFailure(f"{desc}: the loss became non-finite at step {e.step} ({e.value}); "
                          f"lower lr (now {config.lr:g}); the model is unchanged") from None
    probs = [math.exp(lp) for lp in run["edit_lp"].values()]
    curve = {"steps": fitted.steps, "epochs": len(run["epoch_loss"]), "stopped": fitted.stopped or "epochs",
             "examples": len(examples), "epoch_loss": run["epoch_loss"], "edit_prob_mean": sum(probs) / len(probs),
             "edit_prob_min": min(probs)}
    if budget is not None:  # edit_prob_* are from the last forward pass, before an undone epoch
        curve.update(budget_loss=budget.losses, budget_limit=budget.limit)
    return curve


# ------------------------------------------------------------------------------------------------ editors

# (model, tok, examples, config, conditional, progress, desc, checkpoint_dir) -> (what it changed, as a Patch without
# meta, and its training curve): weight deltas (ft, lora) or sense deltas (senses)
Trainer = Callable[..., tuple[Patch, dict]]


@contextmanager
def trained_in_place(model, names: list[str]):
    """Make the named parameters trainable for the block; afterwards put back W₀ bit-for-bit and the
    requires_grad flags, whatever happened. Yields (chosen parameters, their originals)."""
    params = dict(model.named_parameters())
    chosen = {n: params[n] for n in names}
    originals = {n: p.detach().clone() for n, p in chosen.items()}
    flags = {n: p.requires_grad for n, p in chosen.items()}
    try:
        for p in chosen.values():
            p.requires_grad_(True)
        yield chosen, originals
    finally:
        with torch.no_grad():
            for n, p in chosen.items():
                p.copy_(originals[n])
                p.requires_grad_(flags[n])
                p.grad = None


def _train_weights(model, tokenizer, examples, config: FinetuneConfig, conditional: bool, progress: bool, desc: str,
                   checkpoint_dir: Path | None = None):
    """Train the chosen weights in place; return ΔW = W − W₀ (float32) and restore W₀ bit-for-bit, always."""
    names = trainable_parameters(model, config.layers, config.modules)
    with trained_in_place(model, names) as (chosen, originals):
        project = None
        if config.norm_constraint is not None:
            eps = config.norm_constraint

            def project():  # ‖W − W₀‖∞ ≤ ε
                with torch.no_grad():
                    for n, p in chosen.items():
                        p.copy_(torch.minimum(torch.maximum(p, originals[n] - eps), originals[n] + eps))

        curve = train(model, tokenizer, examples, chosen, config, conditional, progress, project, desc, checkpoint_dir)
        deltas = {n: Delta(dense=p.detach().float() - originals[n].float()) for n, p in chosen.items()}
    return Patch(deltas), curve


def run_editor(model, tokenizer, requests: list[EditRequest], config: TrainConfig, method: str, conditional: bool,
               trainer: Trainer, progress: bool = True, checkpoint_dir: Path | None = None) -> Patch:
    """Prepare, augment, train (all edits together, or each alone from W₀ with the deltas summed) into a Patch."""
    if not requests:
        raise InputError("no edit requests given")
    for i, r in enumerate(requests):
        r.validate(f"request {i}")
    config = prepare(config, model)
    t0 = time.perf_counter()
    examples, augmentation = build_examples(model, tokenizer, requests, config)
    timing = {"augment_seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    groups = [range(len(requests))] if config.mode == "mass" else [range(i, i + 1) for i in range(len(requests))]
    parts, curves = [], []
    for group in tqdm(groups, desc=f"{method} single edits", disable=not progress or len(groups) == 1):
        mine = [ex for ex in examples if ex.edit in group]
        part, curve = trainer(model, tokenizer, mine, config, conditional, progress, method, checkpoint_dir)
        parts.append(part)
        curves.append(curve)
    timing["train_seconds"] = time.perf_counter() - t0
    patch = parts[0] if len(parts) == 1 else compose(*parts)
    patch.meta = {  # the parts carry no meta of their own (a composition's is replaced whole)
        "method": method,
        "config": asdict(config),
        "requests": [r.to_dict() for r in requests],
        **patch.base_identity(model),
        "lmedit_version": __version__,
        "model_type": model.config.model_type,
        "loss": "conditional (target tokens only)" if conditional else "full (prompt and target tokens)",
        "augmentation": augmentation,
        "timing": timing,
        "training": curves,
    }
    return patch


def edit_ft(model, tokenizer, requests, config: FinetuneConfig, progress: bool = True, announce=print,
            checkpoint_dir: Path | None = None) -> Patch:
    return run_editor(model, tokenizer, requests, config, "ft", False, _train_weights, progress, checkpoint_dir)


def edit_ft_conditional(model, tokenizer, requests, config: ConditionalConfig, progress: bool = True,
                        announce=print, checkpoint_dir: Path | None = None) -> Patch:
    return run_editor(model, tokenizer, requests, config, "ft-conditional", True, _train_weights, progress,
                      checkpoint_dir)


TRAINER = dict(checkpoints=True, needs_subject=False, canonical=True)
register_editor("ft", FinetuneConfig, edit_ft, "fine-tuning on prompt + target tokens (naive baseline)", **TRAINER)
register_editor("ft-conditional", ConditionalConfig, edit_ft_conditional,
                "fine-tuning on the target tokens only, with paraphrase and random-fact augmentation", **TRAINER)
