"""`senses`: Backpack sense fine-tuning as an editor of requests (Hewitt et al. 2024; DESIGN §6).

The method of `backpack/senses.py` run on edit requests instead of a canonical-examples task: each request is one
example (prompt → target_new), its top `senses_per_example` (token, sense) pairs by the α-mass score are chosen
(against the background's), and zero-initialised deltas on the union are trained with the fine-tuning editors'
loop and loss (`finetune.run_editor`: conditional likelihood of the target tokens, optional paraphrase and
random-fact augmentation, early stopping, KL term, degradation budget, checkpoints). The result is a patch whose
entry is the sense deltas (`patches.SenseDelta`), so `apply`, `revert`, `save`, `compose` and `export` treat it as
they treat a weight edit; the model's weights are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lmedit.backpack import senses as se
from lmedit.editors.finetune import TRAINER, run_editor, train
from lmedit.editors.registry import register_editor
from lmedit.editors.train_config import TrainConfig
from lmedit.patches import Patch, SenseDelta
from lmedit.settings import integer, number


@dataclass
class SensesConfig(TrainConfig):
    """The training loop's settings (no augmentation by default: the paper trains the canonical examples alone) plus
    the selection's. Defaults inside the reference sweep's ranges (lr 10^-4..10^-1.5, 5..12 senses per example,
    λ 10^2..10^3.5), as the canonical protocol's `senses`. `layers` and `modules` do not apply."""

    trains_weights: ClassVar[bool] = False
    lr: float = number(1e-3, gt=0)  # the deltas start at zero and touch a few vectors only: a large step
    senses_per_example: int = integer(8, ge=1)  # each request's top (token, sense) pairs; the union is trained
    sense_lambda: float = number(300.0, ge=0)  # λ: weight of the background's α in the score
    background_docs: int = integer(64, ge=1)  # background documents (the offline Wikipedia leads), 128 tokens each


def module_path(model, target) -> str:
    """The dotted path of `target` inside `model` (a patch names the module its sense deltas edit)."""
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError("the Backpack body is not a module of this model")


def _train_senses(model, tokenizer, examples, config: SensesConfig, conditional: bool, progress: bool, desc: str,
                  checkpoint_dir: Path | None = None):
    """Choose senses from the requests' own examples (not their augmentations), train their deltas, detach them."""
    lm = se.backpack_of(model)
    pairs = [[(ex.prompt, ex.target)] for ex in examples if ex.kind == "edit"]
    chosen, choice = se.choose_senses(model, tokenizer, "gen", pairs, config.senses_per_example, config.sense_lambda,
                                      config.background_docs)
    path = module_path(model, lm.backpack)
    with se.attached_senses(model, chosen) as edits:
        name = f"{path}.sense_edits.{len(lm.backpack.sense_edits) - 1}.vectors"
        curve = train(model, tokenizer, examples, {name: edits.vectors}, config, conditional, progress, None, desc,
                      checkpoint_dir)
        delta = SenseDelta(path, edits.tokens.detach().cpu().clone(), edits.senses.detach().cpu().clone(),
                           edits.vectors.detach().float().cpu().clone())
    return Patch({}, {}, delta), {**curve, "senses": choice}


def edit(model, tokenizer, requests, config: SensesConfig, progress: bool = True, announce=print,
         checkpoint_dir: Path | None = None) -> Patch:
    se.check_backpack(model)  # one clear line before any work on another architecture
    return run_editor(model, tokenizer, requests, config, "senses", True, _train_senses, progress, checkpoint_dir)


register_editor("senses", SensesConfig, edit,
                "Backpack sense fine-tuning: deltas on the few sense vectors most responsible for the targets",
                **TRAINER, backpack_only=True)
