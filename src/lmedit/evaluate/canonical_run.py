"""The canonical-examples protocol for one (task, method, hyperparameters) (Hewitt et al. 2024; DESIGN §8).

1. The unedited point (success rate on the evaluation file, general-text and targeted-text per-token loss,
   hard-negative NLL) comes from the baseline cache, computed once per model, data and sizes.
2. Train on the task's canonical (train) examples with the task-kind loss of `canonical_scores.training_loss`
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


from lmedit.errors import EditFailure, InputError
from lmedit.evaluate import degradation
from lmedit.evaluate.canonical import CanonicalTask
from lmedit.evaluate.canonical_train import TRAINERS, Diverged, edit_trace, memit_requests  # noqa: F401  (API)
from lmedit.evaluate.canonical_config import SETTINGS, base_method, check_method, check_settings, make_settings
from lmedit.evaluate.degradation import DEFAULT_MAX_TOKENS, DEFAULT_N_DOCS, BaselineCache
from lmedit.evaluate.leagues import DEFAULT_RULE, LEAGUES, RULES, admissible, check_epsilon, check_rule, league_score

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
    admissible: str = DEFAULT_RULE  # leagues.RULES: "general" (the reference's) or "general_and_targeted"

    def key(self) -> dict:
        """The parts that change a number (for cache keys and study names)."""
        return {"general": degradation.file_digest(self.general_path), "n_docs": self.n_docs,
                "max_tokens": self.max_tokens, "targeted_max_tokens": self.targeted_max_tokens,
                "patience": self.patience, "stop_league": max(self.leagues) if self.patience else None,
                **({"admissible": self.admissible} if self.admissible != "general_and_targeted" else {}),
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
        check_rule(protocol.admissible)
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

    def evaluate(self, task: CanonicalTask, before: dict | None = None, epsilon: float | None = None) -> dict:
        """One evaluation point. Given the unedited point `before`, a point whose losses are beyond league
        `epsilon` (default: the widest) is not scored further (success rate and hard negatives None): no league
        it is meant for can choose it."""
        p = self.protocol
        eps = max(p.leagues) if epsilon is None else epsilon
        within = None if before is None else (lambda point: admissible(point, before, eps, p.admissible))

        return degradation.evaluate_point(self.model, self.tokenizer, task, self.general_texts,
                                          max_tokens=p.max_tokens, targeted_max_tokens=p.targeted_max_tokens,
                                          batch_size=p.eval_batch_size, within=within)

    def run(self, task: CanonicalTask, method: str, settings=None, *, on_diverge: Literal["raise", "record"] = "raise",
            announce: Callable[[str], None] | None = None) -> dict:
        return run_canonical(self, task, method, settings, on_diverge=on_diverge, announce=announce)


# ---------------------------------------------------------------- the protocol

def _check_type(method: str, settings) -> None:
    from lmedit.locate.core import LocateConfig

    want = SETTINGS.get(base_method(method), LocateConfig)
    if not isinstance(settings, want):
        raise InputError(f"{method} takes a {want.__name__}, got {type(settings).__name__}")


def league_table(trace: list[dict], before: dict, leagues, rule: str = DEFAULT_RULE) -> dict[str, dict]:
    """Per league: score, the chosen epoch and that point's numbers with their change from before."""
    view = [{k: (math.nan if v is None else v) for k, v in p.items()} for p in trace]
    out = {}
    for eps in leagues:
        res = league_score(view, before, eps, rule)
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
                  announce: Callable[[str], None] | None = None, keep: dict | None = None) -> dict:
    """The protocol for one (task, method, settings); the model comes back bit-exactly as it was.

    Returns {task, split, model, method, config, n, unedited, unedited_from_cache, trace, leagues, diverged,
    timing}; `leagues` maps "0.001" / "0.0001" / "1e-05" to {score, epoch, success_rate, general_loss,
    general_change, targeted_loss, targeted_change, hard_negative_nll, hard_negative_change}. `keep` (a dict)
    receives the trained tensors of every epoch (and senses' chosen pairs): canonical_ensemble uses them."""
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
    if base_method(method) in TRAINERS:
        options, layers = check_settings(settings, model)
        try:
            trace = TRAINERS[base_method(method)](runner, task, settings, options, layers, before, announce, keep)
        except Diverged as e:
            if on_diverge == "raise":
                raise EditFailure(f"{task.name} {method}: {e.message}; lower lr; the model is unchanged") from None
            diverged, trace = e.message, e.trace
    else:  # a locate-then-edit method
        settings.validate(model)
        trace = edit_trace(runner, task, method, settings, before, announce)
    result = {
        "task": task.name, "split": task.split, "model": runner.model_name, "method": method,
        "config": asdict(settings), "kind": task.kind, "rule": task.spec.rule,
        "n": {role: len(getattr(task, role)) for role in ("train", "eval", "hard_neg", "unconditional")},
        "protocol": {"general_text": str(runner.protocol.general_path), "n_docs": runner.protocol.n_docs,
                     "max_tokens": runner.protocol.max_tokens, "patience": runner.protocol.patience,
                     "admissible_rule": runner.protocol.admissible, "admissible": RULES[runner.protocol.admissible]},
        "unedited": before, "unedited_from_cache": from_cache, "trace": trace,
        "leagues": league_table(trace, before, runner.protocol.leagues, runner.protocol.admissible),
        "diverged": diverged,
        "timing": {"unedited_seconds": unedited_seconds, "run_seconds": time.perf_counter() - t0,
                   "train_seconds": sum(p["train_seconds"] for p in trace),
                   "eval_seconds": sum(p["eval_seconds"] for p in trace)},
    }
    return _jsonable(result)
