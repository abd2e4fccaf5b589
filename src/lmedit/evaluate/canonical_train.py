"""Training and editing inside the canonical-examples protocol: what produces a run's trace (canonical_run.py).

Trainers (`TRAINERS`) run the one training loop (`editors.training.fit`) on the task's loss and evaluate after
each epoch; a locate-then-edit method makes one edit of all canonical examples (`edit_trace`). The model comes
back bit-exactly as it was: trained tensors are restored from copies, LoRA wrappers removed, patches reverted.
`runner` is canonical_run.Runner (its model, tokenizer, protocol and `evaluate`).
"""

from __future__ import annotations

import time

import torch

from lmedit.errors import InputError
from lmedit.evaluate.canonical import CanonicalTask, _records
from lmedit.evaluate.canonical_config import ANSWER_FIELDS, SUBJECT_FIELDS, LoraSettings, TrainSettings, check_method
from lmedit.evaluate.canonical_scores import LossOptions, training_loss
from lmedit.evaluate.leagues import admissible


# ---------------------------------------------------------------- training

class Diverged(Exception):
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


def _kl_regulariser(runner, settings: TrainSettings):
    """KL(p₀ ‖ p_θ) on one general-text batch drawn at random per step (the reference's KLRegularization: summed
    over each sequence's tokens, averaged over the batch), as a function of no arguments.

    The texts are the `kl_docs` general-text records after the protocol's first n_docs, so training never sees
    the texts the degradation budget is measured on; p₀ is computed once, before any weight moves (a LoRA
    adapter or a sense delta starts at zero, so the model is then the unedited one). A generator of its own
    (seed + 1) draws the batches: with kl_weight = 0 nothing else changes."""
    from lmedit.evaluate.degradation import load_texts
    from lmedit.locate.prompts import encode
    from lmedit.models.forward import inference, right_pad
    from lmedit.models.logprobs import kl_to_reference, log_distributions, pad_id

    model, tokenizer, protocol = runner.model, runner.tokenizer, runner.protocol
    texts = load_texts(protocol.general_path, protocol.n_docs + settings.kl_docs)[protocol.n_docs:]
    if len(texts) < settings.kl_docs:
        raise InputError(f"{protocol.general_path} has {protocol.n_docs + len(texts)} records: too few for "
                         f"kl_docs={settings.kl_docs} beyond the {protocol.n_docs} the degradation measure reads")
    rows = [ids for ids in (encode(tokenizer, t)[:settings.kl_max_tokens] for t in texts) if len(ids) >= 2]
    device = next(model.parameters()).device
    batches = [right_pad(rows[lo:lo + settings.batch_size], pad_id(tokenizer), device)
               for lo in range(0, len(rows), settings.batch_size)]
    with inference(model):
        refs = [log_distributions(model, ids, mask) for ids, mask in batches]
    generator = torch.Generator().manual_seed(settings.seed + 1)

    def term() -> torch.Tensor:
        k = int(torch.randint(len(batches), (1,), generator=generator))
        ids, mask = batches[k]
        return kl_to_reference(refs[k], log_distributions(model, ids, mask), mask, per="sequence")

    return term


def _train_epochs(runner, task: CanonicalTask, params: dict[str, torch.nn.Parameter], settings: TrainSettings,
                  options: LossOptions, prefix_weight: float, before: dict, announce,
                  keep: dict | None = None) -> list[dict]:
    """The one training loop (`training.fit`) on the task's loss; evaluate after each epoch. Raises Diverged with
    the trace so far. `keep`: a dict that receives a copy of the trained tensors after every epoch
    (keep["epochs"][e - 1]), for the ensemble, which carries the Backpack's chosen epoch to the large model."""
    from lmedit.editors.training import NonFiniteLoss, diverged_weights, fit, initial_norms

    model, tokenizer = runner.model, runner.tokenizer
    norms0 = initial_norms(params)
    examples = list(task.train)
    trace, widest = [], max(runner.protocol.leagues)
    run = {"stale": 0, "t0": time.perf_counter()}

    kl = _kl_regulariser(runner, settings) if settings.kl_weight > 0 else None

    def batch_loss(idx: list[int]) -> torch.Tensor:
        batch = [examples[i] for i in idx]
        loss = training_loss(model, tokenizer, task.spec, batch, options)
        if prefix_weight:
            loss = loss + prefix_weight * _prefix_nll(model, tokenizer, [ex.prefix for ex in batch])
        if kl is not None:
            loss = loss + settings.kl_weight * kl()
        return loss

    def after_epoch(epoch: int, loss: float) -> str | None:
        bad = diverged_weights(params, norms0)  # exploding weights: the step size is wrong
        if bad is not None:
            what = "became non-finite" if bad[1] == "became non-finite" else "exploded"
            raise Diverged(f"training diverged in epoch {epoch}: the weights of {bad[0]} {what} "
                            f"(lr {settings.lr:g})", trace)
        if keep is not None:
            keep.setdefault("epochs", []).append({n: p.detach().clone() for n, p in params.items()})
        train_seconds = time.perf_counter() - run["t0"]
        t0 = time.perf_counter()
        point = runner.evaluate(task, before)
        trace.append({"epoch": epoch, "train_loss": loss, **point,
                      "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t0})
        if announce:
            announce(_epoch_line(trace[-1], before))
        ok = admissible(point, before, widest, runner.protocol.admissible)
        run["stale"] = 0 if ok else run["stale"] + 1
        run["t0"] = time.perf_counter()
        if runner.protocol.patience and run["stale"] >= runner.protocol.patience:
            return "patience"
        return None

    try:
        fit(params, len(examples), batch_loss, lr=settings.lr, epochs=settings.epochs,
            batch_size=settings.batch_size, seed=settings.seed, after_epoch=after_epoch)
    except NonFiniteLoss as e:
        raise Diverged(f"the training loss became non-finite in epoch {e.epoch} (lr {settings.lr:g})", trace) from None
    return trace


def _epoch_line(p: dict, before: dict) -> str:
    general, targeted = (p[k] / before[k] for k in ("general_loss", "targeted_loss"))
    losses = f"general ×{general:.6f}, targeted ×{targeted:.6f}"
    if p["success_rate"] is None:
        return f"epoch {p['epoch']}: {losses}: beyond every league, not scored further"
    return (f"epoch {p['epoch']}: success {p['success_rate']:.3f} (before {before['success_rate']:.3f}), {losses}, "
            f"hard-neg NLL {p['hard_negative_nll'] - before['hard_negative_nll']:+.4f}")


def _train_weights(runner, task, settings: TrainSettings, options, layers, before, announce, keep=None):
    """ft and ft-conditional: the chosen weights in place; ft adds the prefix term (FtSettings.prefix_weight)."""
    from lmedit.editors.finetune import trainable_parameters, trained_in_place

    names = trainable_parameters(runner.model, layers, tuple(settings.modules))
    prefix_weight = getattr(settings, "prefix_weight", 0.0)
    with trained_in_place(runner.model, names) as (chosen, _):
        return _train_epochs(runner, task, chosen, settings, options, prefix_weight, before, announce, keep)


def _train_lora(runner, task, settings: LoraSettings, options, layers, before, announce, keep=None):
    from lmedit.editors.finetune import resolve_modules
    from lmedit.editors.lora import lora_adapters

    targets = resolve_modules(runner.model, layers, tuple(settings.modules))
    with lora_adapters(runner.model, targets, settings.rank, settings.alpha, settings.seed):
        params = {n: p for n, p in runner.model.named_parameters() if p.requires_grad}  # A and B only
        return _train_epochs(runner, task, params, settings, options, 0.0, before, announce, keep)


def _train_senses(runner, task, settings, options, layers, before, announce, keep=None):
    """Backpack sense fine-tuning: choose senses (backpack/senses.py), train only their deltas; the choice is
    recorded in the first epoch's point."""
    from lmedit.backpack import senses as se
    from lmedit.evaluate.canonical_scores import pairs_of

    model, tokenizer = runner.model, runner.tokenizer
    chosen, choice = se.choose_senses(model, tokenizer, task.kind, [pairs_of(task.kind, [ex]) for ex in task.train],
                                      settings.senses_per_example, settings.sense_lambda, settings.background_docs)
    with se.attached_senses(model, chosen) as edits:
        trace = _train_epochs(runner, task, {"backpack.sense_edits.vectors": edits.vectors}, settings, options, 0.0,
                              before, announce, keep)
    if keep is not None:
        keep["chosen"] = chosen
    if trace:
        trace[0]["senses"] = choice
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


# every trainer by method: (runner, task, settings, loss options, layers, unedited point, announce) -> trace
TRAINERS = {"ft": _train_weights, "ft-conditional": _train_weights, "lora": _train_lora, "senses": _train_senses}


def edit_trace(runner, task: CanonicalTask, method: str, config, before, announce) -> list[dict]:
    """A locate-then-edit method (memit): one edit of every canonical example, one evaluation point."""
    from lmedit.editors import get_editor

    t0 = time.perf_counter()
    requests, notes = memit_requests(task)
    patch = get_editor(method).edit(runner.model, runner.tokenizer, requests, config, progress=False,
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
