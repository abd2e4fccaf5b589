"""The canonical-examples protocol for one (task, method, hyperparameters) (Hewitt et al. 2024; DESIGN §8).

1. The unedited point (success rate on the evaluation file, general-text and targeted-text per-token loss,
   hard-negative NLL) comes from the baseline cache, computed once per model, data and sizes.
2. Train on the task's canonical (train) examples with the task-kind loss of `canonical.training_loss`
   (lower is better for every kind), Adam, shuffled mini-batches, for `epochs` epochs; after each epoch the
   same four numbers are measured (`degradation.evaluate_point`). MEMIT has no epochs: one edit of all
   canonical examples, one evaluation point (a trace of length 1).
3. League ε: the change in success rate at the last epoch whose general and targeted loss are both ≤ (1 + ε) ×
   before (`leagues.league_score`); 0 when none is.

Methods (`METHODS`):
- `ft`: fine-tuning of chosen modules with the "full" likelihood: the task loss on the suffix plus
  `prefix_weight` × the per-token NLL of the prefix tokens (as the `ft` editor trains on prompt and target).
- `ft-conditional`: the same modules with the loss on the suffix only. For canonical examples the conditional
  loss IS the task loss (raise: −log P(suffix | prefix) per token; lower/balance/prefer: their suffix losses),
  so ft-conditional is exactly the paper's fine-tuning baseline.
- `lora`: LoRA adapters (`lora.lora_adapters`) on the chosen modules, trained with the task loss.
- `senses`: Backpack sense fine-tuning (backpack/senses.py): zero-initialised deltas on the (token, sense) pairs
  that carry the canonical examples' predictions, chosen once before training; no weight moves.
- `memit`: the locate-then-edit core on requests (prompt = prefix, subject, target_new = suffix) built from
  the canonical examples. Only country_capital (subject = the record's `country`) and company_ceo (`company`)
  name a subject; the other four tasks have none to locate (a temporal entity, a stereotype target, a
  profession or a verb is not a fact's subject in the ROME sense), so memit raises InputError there.

Trainable modules: `modules` as in `finetune.resolve_modules` (roles mlp_out / mlp_in / attn_out, a module of
each block, or "all" = every parameter) at `layers`, where () means EVERY layer. Default: the MLP output
projections of every layer (26.5M of SmolLM2's 135M parameters, none of them the tied 49k × 576 embedding
that "all" adds to every Adam step); the paper fine-tunes every parameter, and the search space includes "all".

The model is left bit-exactly as it came: trained tensors are restored from copies in a `finally`, LoRA
wrappers are removed, MEMIT's patch is reverted. A non-finite training loss or exploding weights is a
divergence: EditFailure (model unchanged), or with on_diverge="record" the trace stops at the last finished
epoch and the result says where it diverged (a diverged epoch is never admissible). The edited weights of
each league's epoch are not kept (for "all" that is a copy of the model per league).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Literal

import torch

from lmedit.errors import EditFailure, InputError
from lmedit.evaluate import degradation
from lmedit.evaluate.canonical import CanonicalTask, LossOptions, _records, training_loss
from lmedit.evaluate.canonical_config import (ANSWER_FIELDS, SETTINGS, SUBJECT_FIELDS, LoraSettings, TrainSettings,
                                              check_method, check_settings, make_settings)
from lmedit.evaluate.degradation import DEFAULT_MAX_TOKENS, DEFAULT_N_DOCS, BaselineCache
from lmedit.evaluate.leagues import LEAGUES, admissible, check_epsilon, league_score

# ---------------------------------------------------------------- the runner

@dataclass(frozen=True)
class Protocol:
    """What every evaluation point measures: the general-text subset, sizes, and the leagues reported."""

    general_path: str
    n_docs: int = DEFAULT_N_DOCS
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    targeted_max_tokens: int | None = None
    eval_batch_size: int = 16
    leagues: tuple[float, ...] = LEAGUES
    patience: int | None = None  # stop after this many epochs in a row inadmissible in every league; None = never

    def key(self) -> dict:
        """The parts that change a number (for cache keys and study names)."""
        return {"general": degradation.file_digest(self.general_path), "n_docs": self.n_docs,
                "max_tokens": self.max_tokens, "targeted_max_tokens": self.targeted_max_tokens,
                "patience": self.patience, "stop_league": max(self.leagues) if self.patience else None,
                # epochs beyond the widest league are not scored (Runner.evaluate): a run serves only leagues
                # within it
                "scored_within": max(self.leagues)}


def league_key(epsilon: float) -> str:
    return f"{float(epsilon):g}"


class Runner:
    """One model under the protocol: loads the general texts once, fingerprints the unedited model once, and
    keeps each task's unedited point (from the baseline cache) in memory, so trials never recompute it."""

    def __init__(self, model, tokenizer, protocol: Protocol, model_name: str = "model",
                 cache: BaselineCache | None = None, fingerprint: str | None = None):
        if protocol.patience is not None and (isinstance(protocol.patience, bool) or protocol.patience < 1):
            raise InputError(f"patience must be a positive integer or none, got {protocol.patience!r}")
        self.protocol = dataclasses.replace(protocol, leagues=tuple(check_epsilon(e) for e in protocol.leagues))
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.cache = cache or BaselineCache()
        self.general_texts = degradation.load_texts(protocol.general_path, protocol.n_docs)
        self._fingerprint = fingerprint
        self._protocol_key: dict | None = None
        self._unedited: dict[str, tuple[dict, bool]] = {}
        self._values = None

    @property
    def value_store(self):
        """v* of MEMIT runs, reused across trials and leagues that differ only in settings v* does not depend on
        (λ, the layers below the last): one per Runner, on disk beside the evaluations' (locate/value_store.py)."""
        if self._values is None:
            from lmedit.locate.value_store import ValueStore
            from lmedit.models.loading import cache_dir

            self._values = ValueStore(self.model, cache_dir() / "values")
        return self._values

    @property
    def protocol_key(self) -> dict:
        if self._protocol_key is None:
            self._protocol_key = self.protocol.key()
        return self._protocol_key

    @property
    def fingerprint(self) -> str:
        """model_fingerprint of the unedited model (first asked for before any edit, when the model is unedited)."""
        if self._fingerprint is None:
            self._fingerprint = degradation.model_fingerprint(self.model, self.tokenizer)
        return self._fingerprint

    def unedited(self, task: CanonicalTask) -> tuple[dict[str, float], bool]:
        """(unedited point, whether it came from a cache); call only while the model is unedited."""
        key = degradation.examples_digest(task)
        if key not in self._unedited:
            p = self.protocol
            self._unedited[key] = degradation.unedited_point(
                self.model, self.tokenizer, task, p.general_path, n_docs=p.n_docs, max_tokens=p.max_tokens,
                targeted_max_tokens=p.targeted_max_tokens, batch_size=p.eval_batch_size, cache=self.cache,
                fingerprint=self.fingerprint)
            return self._unedited[key]
        return self._unedited[key][0], True

    def evaluate(self, task: CanonicalTask, before: dict | None = None) -> dict:
        """One evaluation point. Given the unedited point `before`, an epoch whose losses are beyond the widest
        league is not scored further (success rate and hard negatives None): no league can choose it."""
        p = self.protocol
        widest = max(p.leagues)
        within = None if before is None else (lambda point: admissible(point, before, widest))

        def point():
            return degradation.evaluate_point(self.model, self.tokenizer, task, self.general_texts,
                                              max_tokens=p.max_tokens, targeted_max_tokens=p.targeted_max_tokens,
                                              batch_size=p.eval_batch_size, within=within)

        if not hasattr(self.model, "fit_weight"):
            return point()
        return self.model.fit_weight(point, within)

    def run(self, task: CanonicalTask, method: str, settings=None, *, on_diverge: Literal["raise", "record"] = "raise",
            announce: Callable[[str], None] | None = None) -> dict:
        return run_canonical(self, task, method, settings, on_diverge=on_diverge, announce=announce)


# ---------------------------------------------------------------- training

class _Diverged(Exception):
    def __init__(self, message: str, trace: list[dict]):
        super().__init__(message)
        self.message, self.trace = message, trace  # the epochs finished before the divergence


def _prefix_nll(model, tokenizer, prefixes: list[str]) -> torch.Tensor:
    """Token-weighted mean NLL of each prefix's tokens 2..n given the ones before (differentiable)."""
    from lmedit.locate.prompts import encode
    from lmedit.models.logprobs import pad_id, predicted_logprobs

    rows = [ids for ids in (encode(tokenizer, p) for p in dict.fromkeys(prefixes)) if len(ids) >= 2]
    if not rows:
        return torch.zeros((), device=next(model.parameters()).device)
    predicted = predicted_logprobs(model, rows, [0] * len(rows), [r[1:] for r in rows], pad_id(tokenizer))
    return -predicted.logprobs.mean()


def _train_epochs(runner: Runner, task: CanonicalTask, params: dict[str, torch.nn.Parameter], settings: TrainSettings,
                  options: LossOptions, prefix_weight: float, before: dict, announce) -> list[dict]:
    """The one training loop (`training.fit`) on the task's loss; evaluate after each epoch. Raises _Diverged with
    the trace so far."""
    from lmedit.editors.training import NonFiniteLoss, diverged_weights, fit, initial_norms

    model, tokenizer = runner.model, runner.tokenizer
    norms0 = initial_norms(params)
    examples = list(task.train)
    trace, widest = [], max(runner.protocol.leagues)
    run = {"stale": 0, "t0": time.perf_counter()}

    def batch_loss(idx: list[int]) -> torch.Tensor:
        batch = [examples[i] for i in idx]
        loss = training_loss(model, tokenizer, task.spec, batch, options)
        if prefix_weight:
            loss = loss + prefix_weight * _prefix_nll(model, tokenizer, [ex.prefix for ex in batch])
        return loss

    def after_epoch(epoch: int, loss: float) -> str | None:
        bad = diverged_weights(params, norms0)  # exploding weights: the step size is wrong
        if bad is not None:
            what = "became non-finite" if bad[1] == "became non-finite" else "exploded"
            raise _Diverged(f"training diverged in epoch {epoch}: the weights of {bad[0]} {what} "
                            f"(lr {settings.lr:g})", trace)
        train_seconds = time.perf_counter() - run["t0"]
        t0 = time.perf_counter()
        point = runner.evaluate(task, before)
        trace.append({"epoch": epoch, "train_loss": loss, **point,
                      "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t0})
        if announce:
            announce(_epoch_line(trace[-1], before))
        ok = all(point[k] <= (1 + widest) * before[k] for k in ("general_loss", "targeted_loss"))
        run["stale"] = 0 if ok else run["stale"] + 1
        run["t0"] = time.perf_counter()
        if runner.protocol.patience and run["stale"] >= runner.protocol.patience:
            return "patience"
        return None

    try:
        fit(params, len(examples), batch_loss, lr=settings.lr, epochs=settings.epochs,
            batch_size=settings.batch_size, seed=settings.seed, after_epoch=after_epoch)
    except NonFiniteLoss as e:
        raise _Diverged(f"the training loss became non-finite in epoch {e.epoch} (lr {settings.lr:g})", trace) from None
    return trace


def _epoch_line(p: dict, before: dict) -> str:
    general, targeted = (p[k] / before[k] for k in ("general_loss", "targeted_loss"))
    losses = f"general ×{general:.6f}, targeted ×{targeted:.6f}"
    if p["success_rate"] is None:
        return f"epoch {p['epoch']}: {losses}: beyond every league, not scored further"
    return (f"epoch {p['epoch']}: success {p['success_rate']:.3f} (before {before['success_rate']:.3f}), {losses}, "
            f"hard-neg NLL {p['hard_negative_nll'] - before['hard_negative_nll']:+.4f}")


def _train_weights(runner, task, settings: TrainSettings, options, layers, prefix_weight, before, announce):
    from lmedit.editors.finetune import trainable_parameters, trained_in_place

    names = trainable_parameters(runner.model, layers, tuple(settings.modules))
    with trained_in_place(runner.model, names) as (chosen, _):
        return _train_epochs(runner, task, chosen, settings, options, prefix_weight, before, announce)


def _train_lora(runner, task, settings: LoraSettings, options, layers, before, announce):
    from lmedit.editors.finetune import resolve_modules
    from lmedit.editors.lora import lora_adapters

    targets = resolve_modules(runner.model, layers, tuple(settings.modules))
    with lora_adapters(runner.model, targets, settings.rank, settings.alpha, settings.seed):
        params = {n: p for n, p in runner.model.named_parameters() if p.requires_grad}  # A and B only
        return _train_epochs(runner, task, params, settings, options, 0.0, before, announce)


def _train_senses(runner, task, settings, options, before, announce):
    """Backpack sense fine-tuning: choose senses (backpack/senses.py), train only their deltas; the choice is
    recorded in the first epoch's point."""
    from lmedit.backpack import senses as se
    from lmedit.evaluate.canonical import _pairs_of
    from lmedit.stats.corpora import wiki_corpus

    model, tokenizer = runner.model, runner.tokenizer
    t0 = time.perf_counter()
    background = se.background_mass(model, tokenizer, wiki_corpus().documents[:settings.background_docs])
    chosen = se.select_senses(model, tokenizer, task.kind, [_pairs_of(task.kind, [ex]) for ex in task.train],
                              background, settings.senses_per_example, settings.sense_lambda)
    select_seconds = time.perf_counter() - t0
    with se.attached_senses(model, chosen) as edits:
        trace = _train_epochs(runner, task, {"backpack.sense_edits.vectors": edits.vectors}, settings, options, 0.0,
                              before, announce)
    if trace:
        trace[0]["senses"] = {"n": len(chosen), "select_seconds": select_seconds,
                              "top": [{"token": tokenizer.decode([c.token]), "sense": c.sense, "score": c.score}
                                      for c in chosen[:20]]}
    return trace


# ---------------------------------------------------------------- memit

def memit_requests(task: CanonicalTask) -> tuple[list, dict]:
    """(one EditRequest per canonical example, notes). prompt = prefix, target_new = suffix, subject = the record's
    subject field (`SUBJECT_FIELDS`), matched in the prompt without regard to case and taken as written there.

    A few val records split the sentence before the subject (prefix "The capital of", suffix " Algeria is
    Alger"; 5 of 119 in country_capital). For those the split moves to just before the record's answer field
    (`ANSWER_FIELDS`): prompt "The capital of Algeria is", target " Alger" — the same sentence, with a subject
    to locate. Anything else without the subject in it is an InputError naming the line."""
    from lmedit.requests import EditRequest

    check_method("memit", task.spec)
    name, answer_name = SUBJECT_FIELDS[task.name], ANSWER_FIELDS[task.name]
    path = task.files.get("train")
    if path is None:
        raise InputError(f"{task.name}: memit needs the training file to read each example's {name!r}")
    subjects: dict[tuple, tuple[str, str | None, int]] = {}
    for lineno, rec in _records(path):
        if name not in rec:
            raise InputError(f"{path}, line {lineno}: record lacks field {name!r}, which memit needs to locate the "
                             f"subject (it has: {', '.join(sorted(rec))})")
        if not isinstance(rec[name], str) or not rec[name].strip():
            raise InputError(f"{path}, line {lineno}: field {name!r} must be a non-empty string")
        answer = rec.get(answer_name) if isinstance(rec.get(answer_name), str) else None
        subjects.setdefault((rec.get("prefix"), rec.get("suffix")), (rec[name], answer, lineno))
    requests, notes = [], {"requests": 0, "split_moved": [], "subject_case": []}
    for ex in task.train:
        subject, answer, lineno = subjects[(ex.prefix, ex.suffix)]
        prompt, target = ex.prefix, ex.suffix
        if subject.lower() not in prompt.lower():
            text = (prompt + target).rstrip().rstrip(".").rstrip()
            cut = len(text) - len(answer or "")
            if not (answer and text.endswith(answer) and subject.lower() in text[:cut].lower() and text[:cut].strip()):
                raise InputError(f"{path}, line {lineno}: subject {subject!r} (field {name!r}) does not occur in the "
                                 f"prefix {ex.prefix!r}, and the text does not end with its {answer_name!r}")
            prompt, target = text[:cut].rstrip(), " " + answer
            notes["split_moved"].append(lineno)
        i = prompt.lower().rfind(subject.lower())
        if prompt[i:i + len(subject)] != subject:
            notes["subject_case"].append(lineno)
        requests.append(EditRequest(prompt=prompt, subject=prompt[i:i + len(subject)], target_new=target))
    notes["requests"] = len(requests)
    return requests, notes


def _memit_trace(runner: Runner, task: CanonicalTask, config, before, announce) -> list[dict]:
    from lmedit.editors import get_editor

    t0 = time.perf_counter()
    requests, notes = memit_requests(task)
    patch = get_editor("memit").edit(runner.model, runner.tokenizer, requests, config, progress=False,
                                     announce=lambda *_: None, values=runner.value_store)
    edit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    with patch.apply(runner.model):
        point = runner.evaluate(task, before)
    trace = [{"epoch": 1, **point, "train_seconds": edit_seconds, "eval_seconds": time.perf_counter() - t0,
              "memit_requests": notes}]
    if announce:
        announce(_epoch_line(trace[0], before))
    return trace


# ---------------------------------------------------------------- the protocol

def _check_type(method: str, settings) -> None:
    from lmedit.locate.core import LocateConfig

    want = LocateConfig if method == "memit" else SETTINGS[method]
    if not isinstance(settings, want):
        raise InputError(f"{method} takes a {want.__name__}, got {type(settings).__name__}")


def league_table(trace: list[dict], before: dict, leagues) -> dict[str, dict]:
    """Per league: score, the chosen epoch and that point's numbers with their change from before."""
    view = [{k: (math.nan if v is None else v) for k, v in p.items()} for p in trace]
    out = {}
    for eps in leagues:
        res = league_score(view, before, eps)
        p = res.point or before
        out[league_key(eps)] = {
            "epsilon": res.epsilon, "score": res.score, "epoch": res.epoch,
            "success_rate": p["success_rate"],
            "general_loss": p["general_loss"], "general_change": p["general_loss"] / before["general_loss"] - 1,
            "targeted_loss": p["targeted_loss"],
            "targeted_change": p["targeted_loss"] / before["targeted_loss"] - 1,
            "hard_negative_nll": p["hard_negative_nll"],
            "hard_negative_change": p["hard_negative_nll"] - before["hard_negative_nll"],
        }
    return out


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def run_canonical(runner: Runner, task: CanonicalTask, method: str, settings=None, *,
                  on_diverge: Literal["raise", "record"] = "raise",
                  announce: Callable[[str], None] | None = None) -> dict:
    """The protocol for one (task, method, settings); the model comes back bit-exactly as it was.

    Returns {task, split, model, method, config, n, unedited, unedited_from_cache, trace, leagues, diverged,
    timing}; `leagues` maps "0.001" / "0.0001" / "1e-05" to {score, epoch, success_rate, general_loss,
    general_change, targeted_loss, targeted_change, hard_negative_nll, hard_negative_change}."""
    check_method(method, task.spec)
    if on_diverge not in ("raise", "record"):
        raise InputError(f"on_diverge must be 'raise' or 'record', got {on_diverge!r}")
    model = runner.model
    if settings is None:
        settings = make_settings(method, model, runner.model_name)
    t_start = time.perf_counter()
    before, from_cache = runner.unedited(task)  # before any weight moves
    unedited_seconds = time.perf_counter() - t_start
    diverged = None
    t0 = time.perf_counter()
    _check_type(method, settings)
    if method == "memit":
        settings.validate(model)
        trace = _memit_trace(runner, task, settings, before, announce)
    else:
        options, layers = check_settings(settings, model)
        try:
            if method == "lora":
                trace = _train_lora(runner, task, settings, options, layers, before, announce)
            elif method == "senses":
                trace = _train_senses(runner, task, settings, options, before, announce)
            else:
                weight = settings.prefix_weight if method == "ft" else 0.0
                trace = _train_weights(runner, task, settings, options, layers, weight, before, announce)
        except _Diverged as e:
            if on_diverge == "raise":
                raise EditFailure(f"{task.name} {method}: {e.message}; lower lr; the model is unchanged") from None
            diverged, trace = e.message, e.trace
    result = {
        "task": task.name, "split": task.split, "model": runner.model_name, "method": method,
        "config": asdict(settings), "kind": task.kind, "rule": task.spec.rule,
        "n": {role: len(getattr(task, role)) for role in ("train", "eval", "hard_neg", "unconditional")},
        "protocol": {"general_text": str(runner.protocol.general_path), "n_docs": runner.protocol.n_docs,
                     "max_tokens": runner.protocol.max_tokens, "patience": runner.protocol.patience,
                     "admissible": "general and targeted per-token loss <= (1 + eps) x unedited; score = change "
                                   "in success rate at the last admissible epoch, 0 if none"},
        "unedited": before, "unedited_from_cache": from_cache, "trace": trace,
        "leagues": league_table(trace, before, runner.protocol.leagues), "diverged": diverged,
        "timing": {"unedited_seconds": unedited_seconds, "run_seconds": time.perf_counter() - t0,
                   "train_seconds": sum(p["train_seconds"] for p in trace),
                   "eval_seconds": sum(p["eval_seconds"] for p in trace)},
    }
    return _jsonable(result)
