"""Splits and per-method settings of the canonical-examples protocol (what `canonical_run` runs).

Splits: "val" reads `*-val.jsonl`; "val:a" / "val:b" are the two halves of every file of "val" (search on one,
report on the other). Settings: one dataclass per method, set with --set key=value; "METHOD:key" targets one
method when several share a command.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from lmedit.editors import editor_names, get_editor, optional_float
from lmedit.errors import InputError
from lmedit.evaluate.canonical import CanonicalTask, get_task, load_task
from lmedit.evaluate.canonical_scores import LossOptions

# The registry's editors that run on a task's loss (capability `canonical`), and the paper's regularised baselines:
# the same trainer with β·KL(p₀ ‖ p_θ) on general text (the reference's regularize.KLRegularization), β searched
# log-uniformly in [0.1, 1] as in the reference sweeps.
SENSES = "senses"
REGULARISED = {"ft+kl": "ft", "lora+kl": "lora", "senses+kl": SENSES}
DEFAULT_KL_WEIGHT = 0.3  # the geometric middle of the reference sweep's 10^U(−1, 0)
METHODS = tuple(n for n in editor_names() if get_editor(n).canonical) + tuple(REGULARISED)


def base_method(method: str) -> str:
    """The trainer a method runs: "ft+kl" runs ft (with the KL term), every other method itself."""
    return REGULARISED.get(method, method)
SUBJECT_FIELDS = {"country_capital": "country", "company_ceo": "company"}  # memit: the field naming the subject
ANSWER_FIELDS = {"country_capital": "capital", "company_ceo": "ceo"}  # and the one naming the answer
HALVES = ("a", "b")


# ---------------------------------------------------------------- splits: "val", "val:a", "val:b"

def parse_split(split: str) -> tuple[str, str | None]:
    """("val", None) for "val"; ("val", "a") for "val:a". The half suffix must be :a or :b."""
    if not isinstance(split, str) or not split:
        raise InputError(f"split must be a non-empty name such as 'val' or 'val:a', got {split!r}")
    base, sep, half = split.rpartition(":")
    if not sep:
        return split, None
    if half not in HALVES or not base:
        raise InputError(f"split {split!r}: a half is written NAME:a or NAME:b (e.g. val:a)")
    return base, half


def halve(task: CanonicalTask, half: str) -> CanonicalTask:
    """Half of every file of `task`, by line order: a = the first ceil(n/2) records, b = the rest.

    Contiguous halves keep an entity's canonical example and its evaluation texts together, as the files are
    grouped by entity in the same order (measured on val: country_capital's and stereoset's halves match
    exactly, pronoun_gender_bias's 10 professions per half too; company_ceo has 1 of 85 companies straddling;
    9 of temporal's 59 evaluation entities in half a have their canonical example in half b). Even/odd halves
    would put most entities' training example and evaluation texts in different halves."""
    if half not in HALVES:
        raise InputError(f"half must be 'a' or 'b', got {half!r}")
    parts = {}
    for role in ("train", "eval", "hard_neg", "unconditional"):
        rows = getattr(task, role)
        k = (len(rows) + 1) // 2
        parts[role] = rows[:k] if half == "a" else rows[k:]
        if not parts[role]:
            raise InputError(f"{task.files.get(role, role)} holds {len(rows)} record(s): too few to halve")
    return CanonicalTask(task.spec, f"{task.split}:{half}", parts["train"], parts["eval"], parts["hard_neg"],
                         parts["unconditional"], dict(task.files))


def limit_evaluation(task: CanonicalTask, n: int) -> CanonicalTask:
    """The first n records of each evaluation file (eval, hard negatives, targeted text); training stays whole.
    For quick runs where every epoch's evaluation dominates the cost (a CPU); the split name records it."""
    if n < 1:
        raise InputError(f"--eval-limit must be at least 1, got {n}")
    return CanonicalTask(task.spec, f"{task.split}[eval:{n}]", task.train, task.eval[:n], task.hard_neg[:n],
                         task.unconditional[:n], dict(task.files))


def load_split(task: str, data_dir, split: str) -> CanonicalTask:
    """`load_task` for a split name, where NAME:a / NAME:b is one half of every file of split NAME."""
    base, half = parse_split(split)
    data = load_task(task, data_dir, base)
    return data if half is None else halve(data, half)


def task_digest(task: CanonicalTask) -> str:
    """sha256 of all four roles' examples (the baseline cache's digest leaves the training examples out)."""
    blob = json.dumps({role: [dataclasses.asdict(e) for e in getattr(task, role)]
                       for role in ("train", "eval", "hard_neg", "unconditional")}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------- configurations

@dataclass
class TrainSettings:
    """ft-conditional (and the base of ft, lora). Every field can be set with --set key=value."""

    lr: float = 1e-5  # Adam step size; the search samples it log-uniformly
    epochs: int = 10  # evaluated after each; the league picks the last admissible one
    batch_size: int = 8  # canonical examples per optimiser step
    seed: int = 0  # shuffling (and LoRA's initialisation)
    modules: tuple[str, ...] = ("mlp_out",)  # roles / block modules at `layers`, or ("all",) = every parameter
    layers: tuple[int, ...] = ()  # () = every layer
    normalize: str = "token"  # LossOptions: per-token mean of each suffix's log-prob (reference) or "sum"
    lower: str = "logp"  # LossOptions (stereoset): "logp" (reference, unbounded) or "unlikelihood"
    floor: float | None = None  # LossOptions: for lower="logp", no gradient below this summed log P
    balance: str = "abs"  # LossOptions (pronouns): "abs" (reference) or "square"
    margin: float | None = None  # LossOptions (verbs): None = unbounded −d (reference) or hinge at this margin
    kl_weight: float = 0.0  # β of β·KL(p₀ ‖ p_θ) on general text, per step (0 = off; the +kl methods: 0.3)
    kl_docs: int = 8  # general-text records after the protocol's n_docs (never the degradation measure's own)
    kl_max_tokens: int = 128  # each cut to this many tokens


@dataclass
class FtSettings(TrainSettings):
    prefix_weight: float = 1.0  # weight of the prefix tokens' NLL beside the suffix loss ("full" likelihood)


@dataclass
class LoraSettings(TrainSettings):
    lr: float = 1e-4  # adapters start at zero: a larger step than full fine-tuning
    rank: int = 8  # r of B A
    alpha: float = 16.0  # ΔW = (alpha / r) B A


@dataclass
class SenseSettings(TrainSettings):
    """Sense fine-tuning of a Backpack (backpack/senses.py); defaults inside the reference sweep's ranges
    (lr 10^-4..10^-1.5, 5..12 senses per example, λ 10^2..10^3.5)."""

    lr: float = 1e-3  # the deltas start at zero and touch a few vectors only: a large step
    senses_per_example: int = 8  # each canonical example's top (token, sense) pairs; the union is trained
    sense_lambda: float = 300.0  # λ: weight of the background's α in the score
    background_docs: int = 64  # background documents (the offline Wikipedia leads), each cut to 128 tokens


SETTINGS = {"ft": FtSettings, "ft-conditional": TrainSettings, "lora": LoraSettings, "senses": SenseSettings}


def methods_for(model, methods) -> tuple[list[str], dict[str, str]]:
    """(the methods this model can run, {method: why not} for the others), from the registry's capabilities: a
    Backpack-only method needs a Backpack, one that needs a KV cache a model that has one (a Backpack has not)."""
    from lmedit.backpack.ensemble import MODEL_TYPE as ENSEMBLE
    from lmedit.models.arch import arch_for
    from lmedit.models.backpack import MODEL_TYPE

    arch = arch_for(model)
    why = {}
    for m in METHODS:
        editor = get_editor(base_method(m))
        if arch.model_type == ENSEMBLE and (not editor.backpack_only or m in REGULARISED):  # the Backpack alone
            why[m] = f"{m} cannot edit an ensemble (only senses can)"
        elif editor.backpack_only and arch.model_type not in (MODEL_TYPE, ENSEMBLE):
            why[m] = f"{m} needs a Backpack model, not {arch.model_type}"
        elif editor.needs_kv_cache and not arch.kv_cache:
            why[m] = f"{m} needs a model with a KV cache, which {arch.model_type} has not"
    cannot = {m: why[m] for m in methods if why.get(m)}
    return [m for m in methods if m not in cannot], cannot


def needs_subject(method: str) -> bool:
    """A locate-then-edit method (registry capability `needs_subject`): it runs only on tasks naming a subject."""
    return base_method(method) not in SETTINGS and get_editor(method).needs_subject


def memit_not_applicable(task: str, method: str = "memit") -> str:
    """Why a locate-then-edit method has no cell for a task without a subject field (the table's n/a and the
    error say the same)."""
    return f"{method} needs a subject to locate; task {task} has none"


def check_method(method: str, task: str | None = None) -> str:
    if method not in METHODS:
        raise InputError(f"unknown method {method!r} for canonical tasks; choose one of: {', '.join(METHODS)}")
    if needs_subject(method) and task is not None and get_task(task).name not in SUBJECT_FIELDS:
        raise InputError(f"{memit_not_applicable(get_task(task).name, method)} ({method} runs on: "
                         f"{', '.join(SUBJECT_FIELDS)})")
    return method


def make_settings(method: str, model, model_name: str = "", overrides: dict[str, Any] | None = None):
    """The method's configuration: dataclass defaults (a registry editor's config: its per-model defaults
    table), then `overrides`
    (--set k=v strings or values; unknown keys are an InputError listing the valid ones)."""
    from lmedit.editors import apply_overrides, make_config

    check_method(method)
    overrides = dict(overrides or {})
    if base_method(method) not in SETTINGS:  # not trained by this protocol: the registry editor's own config
        return make_config(method, model_name, model, overrides)
    if isinstance(overrides.get("modules"), str):
        overrides["modules"] = tuple(m.strip() for m in overrides["modules"].split(",") if m.strip())
    defaults = SETTINGS[base_method(method)]()
    if method in REGULARISED:
        defaults = dataclasses.replace(defaults, kl_weight=DEFAULT_KL_WEIGHT)
    settings = apply_overrides(defaults, overrides)
    return dataclasses.replace(settings, floor=optional_float(settings.floor, "floor"),
                               margin=optional_float(settings.margin, "margin"))


def _setting_names(method: str) -> set[str]:
    if base_method(method) not in SETTINGS:
        return {f.name for f in dataclasses.fields(get_editor(method).config_cls)}
    return {f.name for f in dataclasses.fields(SETTINGS[base_method(method)])}


def overrides_for(method: str, overrides: dict[str, Any] | None, strict: bool = True) -> dict[str, Any]:
    """The overrides that concern `method`: "METHOD:key" ones for it, and plain keys — all of them when `strict`
    (an unknown one then fails in make_settings), else only those the method has (one --set for several methods).
    """
    out = {}
    for key, value in (overrides or {}).items():
        head, sep, rest = key.partition(":")
        if sep:
            check_method(head)
            if head == method:
                out[rest] = value
        elif strict or key.partition(".")[0] in _setting_names(method):
            out[key] = value
    return out


def check_overrides(methods, overrides: dict[str, Any] | None) -> None:
    """With several methods, every plain key must belong to at least one of them."""
    for key in overrides or {}:
        head, sep, _ = key.partition(":")
        if sep:
            check_method(head)
        elif not any(key.partition(".")[0] in _setting_names(m) for m in methods):
            valid = sorted(set().union(*(_setting_names(m) for m in methods)))
            raise InputError(f"unknown setting {key!r} for {', '.join(methods)}; valid: {', '.join(valid)}")


def check_settings(settings: TrainSettings, model) -> tuple[LossOptions, tuple[int, ...]]:
    from lmedit.editors.finetune import trainable_parameters
    from lmedit.models.arch import check_layer, num_layers

    if not (isinstance(settings.lr, (int, float)) and math.isfinite(settings.lr) and settings.lr > 0):
        raise InputError(f"lr must be a positive finite number, got {settings.lr}")
    for name in ("epochs", "batch_size"):
        if isinstance(getattr(settings, name), bool) or getattr(settings, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(settings, name)}")
    if isinstance(settings, LoraSettings) and (settings.rank < 1 or not settings.alpha > 0):
        raise InputError(f"LoRA needs rank >= 1 and alpha > 0, got rank={settings.rank}, alpha={settings.alpha}")
    if isinstance(settings, FtSettings) and not settings.prefix_weight >= 0:
        raise InputError(f"prefix_weight must be >= 0, got {settings.prefix_weight}")
    if not (isinstance(settings.kl_weight, (int, float)) and math.isfinite(settings.kl_weight)
            and settings.kl_weight >= 0):
        raise InputError(f"kl_weight must be a finite number >= 0, got {settings.kl_weight}")
    if settings.kl_docs < 1 or settings.kl_max_tokens < 2:
        raise InputError("kl_docs must be at least 1 and kl_max_tokens at least 2")
    options = LossOptions(settings.normalize, settings.lower, settings.floor, settings.balance, settings.margin)
    if isinstance(settings, SenseSettings):  # trains sense deltas only: modules and layers do not apply
        from lmedit.backpack.senses import check_backpack

        check_backpack(model)
        if settings.senses_per_example < 1 or settings.background_docs < 1:
            raise InputError("senses_per_example and background_docs must be at least 1")
        if not (math.isfinite(settings.sense_lambda) and settings.sense_lambda >= 0):
            raise InputError(f"sense_lambda must be a finite number >= 0, got {settings.sense_lambda}")
        return options, ()
    if not settings.modules:
        raise InputError("modules must name at least one module, role or 'all'")
    layers = tuple(settings.layers) or tuple(range(num_layers(model)))
    for layer in layers:
        check_layer(model, layer)
    trainable_parameters(model, layers, tuple(settings.modules))  # unknown names fail here, before any work
    return options, layers
