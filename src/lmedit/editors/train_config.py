"""What the fine-tuning editors train and how: their settings (ft, ft-conditional; lora extends TrainConfig),
checked and resolved against a model, and which parameters a selection of modules means."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from torch import nn

from lmedit.errors import InputError
from lmedit.models.arch import arch_for, block, check_layer, num_layers
from lmedit.settings import check_settings, choice, flag, integer, layer_list, number

KL_TEXT = (  # generic sentences about nothing an edit should touch
    "The weather today is mild, with a light breeze coming in from the west.",
    "She opened the book and began to read the first chapter aloud.",
    "Water boils at a lower temperature high up in the mountains.",
    "The meeting was moved to Thursday afternoon because of the holiday.",
    "He bought bread, cheese and apples at the market on the corner.",
)
MODES = ("mass", "single")
ROLES = ("mlp_out", "mlp_in", "attn_out")  # module roles of the architecture table, at each of `layers`


@dataclass
class TrainConfig:
    """Knobs of the shared training loop (ft, ft-conditional, lora). Per-model defaults: `editors.defaults`. Each
    numeric field declares what it accepts (lmedit.settings), checked whenever a config is made."""

    layers: tuple[int, ...] = layer_list(())  # layers whose modules train; () = the locate defaults (MEMIT's layers)
    modules: tuple[str, ...] | None = None  # None = MLP output projections of `layers`; roles, module names, ("all",)
    lr: float = number(5e-4, gt=0)  # Adam: each step moves a weight by at most about lr
    epochs: int = integer(10, ge=1)  # passes over the augmented training set (early stopping usually ends sooner)
    batch_size: int = integer(16, ge=1)  # examples per optimiser step
    seed: int = integer(0, ge=0)  # shuffling, prefix generation and the augmentation draws
    mode: Literal["mass", "single"] = choice("mass", MODES)  # mass: edits together in shuffled batches; single: alone
    n_paraphrases: int = integer(0, ge=0)  # m: random prefix + prompt → target_new, per edit (generalisation)
    prefix_pool: int = integer(20, ge=1)  # prefixes generated once per call; each edit draws its m from them
    prefix_length: int = integer(10, ge=1)  # tokens per generated prefix
    n_random_facts: int = integer(0, ge=0)  # r: unrelated prompt → true answer, per edit (locality)
    facts_file: str | None = None  # the fact pool: None = built-in (editors.fact_pool); a requests file (target_true
    # used); "requests" = the other requests' true facts (single mode only). Never a fact about an edited subject
    augment: bool = flag(True)  # False: no paraphrases nor facts, whatever n_paraphrases / n_random_facts say
    kl_factor: float = number(0.0, ge=0)  # β on KL(p₀ ‖ p_θ) over kl_text; 0 = off
    kl_text: tuple[str, ...] = KL_TEXT  # unrelated text the KL term keeps as it was
    # stop once every edit's P(target_new | prompt) exceeds this; None or 1 = off
    stop_prob: float | None = number(0.9, gt=0, le=1, none=True)
    patience: int = integer(3, ge=0)  # stop after this many epochs without `min_improvement` of the epoch loss; 0 = off
    min_improvement: float = number(0.01, ge=0)  # relative drop of the epoch loss that counts as progress
    # ε: stop once general-text loss > (1 + ε) × before; keep the last epoch within it; None = off
    budget: float | None = number(None, ge=0, none=True)
    budget_corpus: str = "wiki"  # the general text of the budget: 'wiki' (offline default) or a text/JSONL file
    budget_docs: int = integer(32, ge=1)  # its first N documents are measured after every epoch
    budget_tokens: int = integer(128, ge=2)  # each cut to this many tokens (a loss needs two)

    trains_weights: ClassVar[bool] = True  # the weights of `modules` at `layers`; False: what the editor chooses

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass
class FinetuneConfig(TrainConfig):
    # ε: after every step clamp W to W₀ ± ε elementwise; None = off
    norm_constraint: float | None = number(None, gt=0, none=True)


@dataclass
class ConditionalConfig(FinetuneConfig):
    """ft-conditional is the paper's method by default: m = r = 2, the amounts README measured (augment=false: plain)."""

    n_paraphrases: int = 2
    n_random_facts: int = 2


# ------------------------------------------------------------------------------------------------ configuration

def prepare(config: TrainConfig, model) -> TrainConfig:
    """A checked copy with `layers` resolved and `modules` parsed; bad values are an InputError (the ranges declared
    above are checked again by `replace`, so a config changed since it was made is caught too)."""
    from lmedit.editors.defaults import defaults_for

    if config.trains_weights:
        layers = tuple(config.layers) or tuple(defaults_for("memit", model.config.model_type, model)["layers"])
        for layer in layers:
            check_layer(model, layer)
        if list(layers) != sorted(set(layers)):
            raise InputError(f"layers must be distinct and increasing, got {list(layers)}")
        modules = config.modules
        if isinstance(modules, str):
            modules = tuple(m.strip() for m in modules.split(",") if m.strip())
        config = replace(config, layers=layers, modules=tuple(modules) if modules else None)
        trainable_parameters(model, config.layers, config.modules)  # an unknown module name fails here, before work
    elif config.layers or config.modules:  # sense deltas (editors/senses.py)
        raise InputError(f"{type(config).__name__} trains sense deltas, not weights: layers and modules do not "
                         "apply (leave them unset)")
    if not config.augment:
        config = replace(config, n_paraphrases=0, n_random_facts=0)
    if config.kl_factor > 0 and not config.kl_text:
        raise InputError("kl_factor > 0 needs some kl_text")
    return config


def _projections(module: nn.Module) -> list[str]:
    """Names (relative to `module`) of its sub-modules holding a 2-D weight: the linear projections."""
    return [n for n, m in module.named_modules()
            if n and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]


def resolve_modules(model, layers: tuple[int, ...], modules: tuple[str, ...] | None) -> list[str]:
    """Module paths for a selection: a role (mlp_out, mlp_in, attn_out) or a module of a block (e.g. mlp.up_proj)
    at each of `layers`; "all" = every projection of every block; or a full module path."""
    arch = arch_for(model)
    in_block = _projections(block(model, 0))
    everywhere = set(_projections(model))
    paths = []
    for name in modules or ("mlp_out",):
        if name == "all":
            paths += [f"{arch.layers}.{l}.{n}" for l in range(num_layers(model)) for n in in_block]
        elif name in ROLES:
            paths += [f"{arch.layers}.{l}.{getattr(arch, name)}" for l in layers]
        elif name in in_block:
            paths += [f"{arch.layers}.{l}.{name}" for l in layers]
        elif name in everywhere:
            paths.append(name)
        else:
            raise InputError(f"unknown module {name!r}; valid: a role ({', '.join(ROLES)}), a module of each block "
                             f"({', '.join(in_block)}), 'all', or a full module path such as "
                             f"{arch.layers}.{layers[0]}.{arch.mlp_out}")
    return list(dict.fromkeys(paths))


def trainable_parameters(model, layers: tuple[int, ...], modules: tuple[str, ...] | None) -> list[str]:
    """Parameter names to train: the weights of the selected modules; ("all",) = every parameter; full
    parameter names are taken as they are."""
    params = dict(model.named_parameters())  # tied weights once
    if modules == ("all",):
        return list(params)
    names = []
    for name in modules or ("mlp_out",):
        names += [name] if name in params else [f"{m}.weight" for m in resolve_modules(model, layers, (name,))]
    return list(dict.fromkeys(names))
