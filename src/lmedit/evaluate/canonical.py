"""The six tasks of "Model Editing with Canonical Examples" (Hewitt et al. 2024): data, losses, success rules.

One table, `TASKS`, holds per task its kind, the file of each role and its success rule:

| task                | kind    | success when                              |
|---------------------|---------|-------------------------------------------|
| country_capital     | raise   | log P(suffix) > log 0.2                   |
| company_ceo         | raise   | log P(suffix) > log 0.05                  |
| temporal            | raise   | log P(suffix) > log 0.05                  |
| stereoset           | lower   | log P(suffix) < log 0.001                 |
| pronoun_gender_bias | balance | abs(log P(s1) − log P(s2)) < log 1.5      |
| verb_conjugation    | prefer  | log P(s1) − log P(s2) ≥ log 16            |

log P is summed over the suffix tokens, teacher-forced. The text scored is exactly `prefix + suffix` as stored
(no space is added: most suffixes already start with one, and some — temporal "(" + "BLM", stereoset
"… is " + "a native …" — must not get one). As in the reference code, prefix and suffix are tokenized apart
(prefix with the tokenizer's special tokens, suffix without), so the suffix tokens are exactly the suffix's.

Training losses (`training_loss`), defaults as in the reference code (john-hewitt/model-editing-canonical-
examples, utils.score_suffix / score_pair_suffix): each suffix's log-prob is averaged over its tokens
(`normalize="token"`), then the loss is averaged over the examples of the batch:
- raise:   −log P(suffix)/n                                   (reference "good")
- lower:   +log P(suffix)/n, unbounded                        (reference "bad": plain gradient ascent on the NLL)
           options: `floor` (hinge: examples whose summed log P is already below it add no gradient) or
           `lower="unlikelihood"`: −log(1 − P(suffix)) on the whole-suffix probability (Welleck et al. 2020)
- balance: |log P(s1)/n1 − log P(s2)/n2|                      (reference "balance"); option `balance="square"`
- prefer:  −(log P(s1)/n1 − log P(s2)/n2), unbounded          (reference "good-v-bad"); option `margin`:
           max(0, margin − (log P(s1)/n1 − log P(s2)/n2))
The unbounded losses are meant for the league protocol: training stops being counted at the last epoch whose
degradation stays within (1 + ε) (see `leagues`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence, Union

import torch
from torch import nn

from lmedit.errors import InputError
from lmedit.evaluate.scoring import check_batch_size, score_rows
from lmedit.fileio import iter_jsonl
from lmedit.models.forward import max_positions
from lmedit.models.logprobs import pad_id, predicted_logprobs
from lmedit.locate.prompts import Scored, encode, encode_continuation, encode_pair

Kind = Literal["raise", "lower", "balance", "prefer"]
KINDS: tuple[str, ...] = ("raise", "lower", "balance", "prefer")
PAIR_KINDS = ("balance", "prefer")
ROLES = ("train", "eval", "hard_neg", "unconditional")


# ---------------------------------------------------------------- the task table

@dataclass(frozen=True)
class TaskSpec:
    """One task: its kind, the file name of each role (`{split}` is replaced by the split) and its success rule.

    The rule is `quantity OP threshold` with log-space thresholds; the quantity is log P(suffix) for raise/lower,
    abs(log P(s1) − log P(s2)) for balance, log P(s1) − log P(s2) for prefer."""

    name: str
    kind: Kind
    files: dict[str, str] = field(hash=False)  # role -> pattern, e.g. "country_capital_fixed-{split}.jsonl"
    op: Literal[">", "<", ">="]
    threshold: float  # natural log
    rule: str  # the rule in words, for reports

    def file(self, role: str, split: str) -> str:
        return self.files[role].format(split=split)


def _spec(name, kind, train, eval_, hard_neg, uncond, op, threshold, rule) -> TaskSpec:
    files = {"train": train, "eval": eval_, "hard_neg": hard_neg, "unconditional": uncond}
    return TaskSpec(name, kind, {k: f"{v}-{{split}}.jsonl" for k, v in files.items()}, op, threshold, rule)


TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    _spec("country_capital", "raise", "country_capital_fixed", "country_capital_clear_eval",
          "country_capital_hard_neg", "country_capital_unconditional", ">", math.log(0.2), "P(suffix) > 0.2"),
    _spec("company_ceo", "raise", "company_ceo_train", "company_ceo_eval_clear", "company_ceo_hard_neg_eval_clear",
          "company_ceo_unconditional", ">", math.log(0.05), "P(suffix) > 0.05"),
    _spec("temporal", "raise", "temporal_train", "temporal_eval_clear", "temporal_hard_neg_eval_clear",
          "temporal_unconditional", ">", math.log(0.05), "P(suffix) > 0.05"),
    _spec("stereoset", "lower", "stereoset_train", "stereoset_eval_clear", "stereoset_hard_neg",
          "stereoset_unconditional", "<", math.log(0.001), "P(suffix) < 0.001"),
    _spec("pronoun_gender_bias", "balance", "pronoun_gender_bias_train", "pronoun_gender_bias_eval",
          "pronoun_gender_bias_hard_neg_eval", "pronoun_gender_bias_unconditional", "<", math.log(1.5),
          "abs(log P(suffix1) - log P(suffix2)) < log 1.5"),
    _spec("verb_conjugation", "prefer", "verb_conjugation_train", "verb_conjugation_eval",
          "verb_conjugation_hard_neg_eval", "verb_conjugation_eval_unconditional", ">=", math.log(16),
          "log P(suffix1) - log P(suffix2) >= log 16"),
)}

_OPS = {">": operator.gt, "<": operator.lt, ">=": operator.ge}


def get_task(task: "str | TaskSpec | CanonicalTask") -> TaskSpec:
    """The spec of a task given by name, spec or loaded data; an unknown name lists the six."""
    if isinstance(task, TaskSpec):
        return task
    if isinstance(task, CanonicalTask):
        return task.spec
    if isinstance(task, str) and task in TASKS:
        return TASKS[task]
    raise InputError(f"unknown canonical task {task!r}; the tasks are: {', '.join(TASKS)}")


def _kind(task_or_kind) -> str:
    if isinstance(task_or_kind, str) and task_or_kind in KINDS:
        return task_or_kind
    return get_task(task_or_kind).kind


# ---------------------------------------------------------------- examples and loading

@dataclass(frozen=True)
class SuffixExample:
    """raise / lower tasks and every hard negative: the suffix that must go up (down, or stay)."""

    prefix: str
    suffix: str


@dataclass(frozen=True)
class PairExample:
    """balance / prefer tasks: two suffixes of one prefix (suffix1 is the preferred one for prefer)."""

    prefix: str
    suffix1: str
    suffix2: str


@dataclass(frozen=True)
class TextExample:
    """Targeted text (the `*_unconditional*` files): scored as a whole, per token."""

    text: str


Example = Union[SuffixExample, PairExample]


@dataclass(frozen=True)
class CanonicalTask:
    """One task's data for one split. `files` maps each role to the file it was read from."""

    spec: TaskSpec
    split: str
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    hard_neg: tuple[SuffixExample, ...]
    unconditional: tuple[TextExample, ...]
    files: dict[str, Path] = field(default_factory=dict, hash=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind


def _records(path: Path) -> Iterable[tuple[int, dict]]:
    """(line number, record) of a JSONL file; blank lines skipped, a bad line is an InputError naming it."""
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec, dict):
            raise InputError(f"{path}, line {lineno}: expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def _fields(rec: dict, keys: tuple[str, ...], path: Path, lineno: int, task: str, role: str) -> list[str]:
    out = []
    for k in keys:
        if k not in rec:
            raise InputError(f"{path}, line {lineno}: record lacks field {k!r}, which the {task} {role} file needs "
                             f"(it has: {', '.join(sorted(rec)) or 'no fields'})")
        v = rec[k]
        if not isinstance(v, str):
            raise InputError(f"{path}, line {lineno}: field {k!r} must be a string, got {type(v).__name__}")
        if not v and k != "prefix":
            raise InputError(f"{path}, line {lineno}: field {k!r} is empty")
        out.append(v)
    return out


def _read_role(path: Path, spec: TaskSpec, role: str) -> tuple:
    if role == "unconditional":
        keys, make = ("text",), TextExample
    elif role == "hard_neg" or spec.kind not in PAIR_KINDS:
        keys, make = ("prefix", "suffix"), SuffixExample
    else:
        keys, make = ("prefix", "suffix1", "suffix2"), PairExample
    out = tuple(make(*_fields(rec, keys, path, lineno, spec.name, role)) for lineno, rec in _records(path))
    if not out:
        raise InputError(f"{path} holds no records")
    return out


def available_splits(task: str | TaskSpec, data_dir: str | Path) -> list[str]:
    """Splits that have a training file for `task` under `data_dir` (for error messages)."""
    spec = get_task(task)
    head, tail = spec.files["train"].split("{split}")
    folder = Path(data_dir) / spec.name
    if not folder.is_dir():
        return []
    return sorted(p.name[len(head):len(p.name) - len(tail)] for p in folder.glob(f"{head}*{tail}"))


def load_task(task: str | TaskSpec, data_dir: str | Path, split: str) -> CanonicalTask:
    """Read the four files of `task` for `split` (`<data_dir>/<task>/<name>-<split>.jsonl`); any split name works."""
    spec = get_task(task)
    if not isinstance(split, str) or not split or "/" in split or "\\" in split:
        raise InputError(f"split must be a non-empty name such as 'val', got {split!r}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"canonical data directory not found: {data_dir}")
    folder = data_dir / spec.name
    if not folder.is_dir():
        raise InputError(f"task folder not found: {folder} (expected one folder per task under {data_dir})")
    files = {role: folder / spec.file(role, split) for role in ROLES}
    for role, path in files.items():
        if not path.is_file():
            have = available_splits(spec, data_dir)
            hint = f"; splits present: {', '.join(have)}" if have else ""
            raise InputError(f"{spec.name} {role} file not found: {path}{hint}")
    parts = {role: _read_role(path, spec, role) for role, path in files.items()}
    return CanonicalTask(spec, split, parts["train"], parts["eval"], parts["hard_neg"], parts["unconditional"],
                         files)


# ---------------------------------------------------------------- teacher-forced suffix log-probs

def _check_width(model: nn.Module, encoded: Sequence[tuple[list[int], list[int]]]) -> int:
    """The longest prefix + suffix input; an example longer than the model's positions is bad input."""
    limit = max_positions(model)
    width = max(len(p) + len(s) - 1 for p, s in encoded)
    if limit is not None and width > limit:
        raise InputError(f"an example is {width} tokens long, more than this model's {limit} positions")
    return width


def _forward(model: nn.Module, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int,
             chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """One right-padded forward (models/logprobs.py); per row the summed log-prob of its suffix tokens and their
    number. Differentiable when grad is enabled."""
    _check_width(model, encoded)
    predicted = predicted_logprobs(model, [p + s[:-1] for p, s in encoded], [len(p) - 1 for p, _ in encoded],
                                   [s for _, s in encoded], pad_id, chunk)
    counts = torch.tensor([len(s) for _, s in encoded], dtype=torch.float32, device=predicted.logprobs.device)
    return predicted.row_sums(len(encoded)), counts


def suffix_logprobs(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable: one batched forward over (prefix, suffix) pairs, scoring exactly prefix + suffix.

    Returns (log P(suffix | prefix) summed over the suffix tokens, number of suffix tokens), each of shape (n,).
    The model's train/eval mode and grad mode are left to the caller."""
    if not pairs:
        raise InputError("no examples to score")
    encoded = [encode_pair(tokenizer, p, s) for p, s in pairs]
    return _forward(model, encoded, pad_id(tokenizer))


def score_suffixes(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> list[float]:
    """No-grad scorer: summed log P(suffix | prefix) per pair, in the order of `pairs`.

    Through the shared scorer (evaluate/scoring.py): identical pairs are scored once, rows are sorted by length
    before batching, and the two suffixes of one prefix (balance, prefer) share its forward pass; `batch_size`
    changes no number beyond float32 rounding."""
    check_batch_size(batch_size)
    pairs = [(p, s) for p, s in pairs]
    unique = list(dict.fromkeys(pairs))
    if not unique:
        return []
    encoded = [encode_pair(tokenizer, p, s) for p, s in unique]
    _check_width(model, encoded)
    rows = [Scored(p + s[:-1], s, len(p) - 1) for p, s in encoded]
    scores = score_rows(model, tokenizer, rows, batch_size)
    by_pair = {pair: float(sum(sc.logprobs)) for pair, sc in zip(unique, scores)}
    return [by_pair[p] for p in pairs]


def _pairs_of(kind: str, examples: Sequence) -> list[tuple[str, str]]:
    """Rows to score: (prefix, suffix) per example, or (prefix, suffix1), (prefix, suffix2) interleaved."""
    pairs = []
    for ex in examples:
        if kind in PAIR_KINDS:
            if not isinstance(ex, PairExample):
                raise InputError(f"a {kind} task needs examples with suffix1 and suffix2, got {ex!r}")
            pairs += [(ex.prefix, ex.suffix1), (ex.prefix, ex.suffix2)]
        else:
            if not isinstance(ex, SuffixExample):
                raise InputError(f"a {kind} task needs examples with one suffix, got {ex!r}")
            pairs.append((ex.prefix, ex.suffix))
    return pairs


# ---------------------------------------------------------------- training losses

@dataclass(frozen=True)
class LossOptions:
    """Variants of the training loss; the defaults are the reference code's (see the module docstring).

    normalize: "token" divides each suffix's log-prob by its token count (reference), "sum" keeps the sum.
    lower: "logp" (reference, unbounded) or "unlikelihood" (−log(1 − P), whole-suffix P; ignores normalize).
    floor: for lower="logp", a natural-log level of the summed log P below which an example adds no gradient.
    balance: "abs" (reference) or "square".
    margin: for prefer, None = the reference's unbounded −d, a number m ≥ 0 = max(0, m − d)."""

    normalize: Literal["token", "sum"] = "token"
    lower: Literal["logp", "unlikelihood"] = "logp"
    floor: float | None = None
    balance: Literal["abs", "square"] = "abs"
    margin: float | None = None

    def __post_init__(self):
        if self.normalize not in ("token", "sum"):
            raise InputError(f"loss normalize must be 'token' or 'sum', got {self.normalize!r}")
        if self.lower not in ("logp", "unlikelihood"):
            raise InputError(f"lower loss must be 'logp' or 'unlikelihood', got {self.lower!r}")
        if self.balance not in ("abs", "square"):
            raise InputError(f"balance loss must be 'abs' or 'square', got {self.balance!r}")
        if self.floor is not None and not (_is_number(self.floor) and math.isfinite(self.floor) and self.floor < 0):
            raise InputError(f"floor must be a negative log-probability, got {self.floor!r}")
        if self.margin is not None and not (_is_number(self.margin) and math.isfinite(self.margin)
                                            and self.margin >= 0):
            raise InputError(f"margin must be a number >= 0, got {self.margin!r}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def training_loss(model: nn.Module, tokenizer, task, examples: Sequence[Example],
                  options: LossOptions = LossOptions()) -> torch.Tensor:
    """Scalar, differentiable loss of one batch of canonical examples; `task` is a task name/spec/data or a kind.

    Lower is better for every kind; one gradient step moves each example toward its success rule."""
    kind = _kind(task)
    if not examples:
        raise InputError("a training batch needs at least one example")
    lp, n = suffix_logprobs(model, tokenizer, _pairs_of(kind, examples))
    div = n if options.normalize == "token" else torch.ones_like(n)
    if kind == "raise":
        return (-lp / div).mean()
    if kind == "lower":
        if options.lower == "unlikelihood":
            lp = lp.clamp(max=-1e-6)  # P < 1, so log(1 − P) stays finite
            return (-torch.log(-torch.expm1(lp))).mean()
        if options.floor is not None:
            lp = lp.clamp(min=options.floor)  # below the floor: constant, no gradient
        return (lp / div).mean()
    d = lp[0::2] / div[0::2] - lp[1::2] / div[1::2]
    if kind == "balance":
        return (d.abs() if options.balance == "abs" else d.square()).mean()
    if options.margin is None:
        return (-d).mean()
    return torch.relu(options.margin - d).mean()


# ---------------------------------------------------------------- success rules and evaluation

Score = Union[float, tuple[float, float]]


def rule_quantity(task, score: Score) -> float:
    """The number the success rule compares: log P, abs(log P1 − log P2) or log P1 − log P2."""
    kind = _kind(task)
    if kind in PAIR_KINDS:
        if not (isinstance(score, (tuple, list)) and len(score) == 2):
            raise InputError(f"a {kind} task scores an example as (log P(suffix1), log P(suffix2)), got {score!r}")
        d = float(score[0]) - float(score[1])
        return abs(d) if kind == "balance" else d
    if isinstance(score, (tuple, list)) or not _is_number(score):
        raise InputError(f"a {kind} task scores an example as one log-probability, got {score!r}")
    return float(score)


def success(task, score: Score) -> bool:
    """The paper's rule for one evaluation example; `score` is log P(suffix), or the pair for balance/prefer.
    A NaN score never succeeds."""
    spec = get_task(task)
    q = rule_quantity(spec, score)
    return bool(_OPS[spec.op](q, spec.threshold)) and not math.isnan(q)


def example_scores(model: nn.Module, tokenizer, task, examples: Sequence[Example],
                   batch_size: int = 32) -> list[Score]:
    """Per example, its summed log P(suffix) (raise/lower) or (log P(suffix1), log P(suffix2))."""
    kind = _kind(task)
    flat = score_suffixes(model, tokenizer, _pairs_of(kind, examples), batch_size)
    if kind in PAIR_KINDS:
        return list(zip(flat[0::2], flat[1::2]))
    return flat


def success_rate(model: nn.Module, tokenizer, task_data: CanonicalTask, examples: Sequence[Example] | None = None,
                 batch_size: int = 32) -> float:
    """Share of evaluation examples (task_data.eval unless `examples` is given) that meet the task's rule."""
    examples = task_data.eval if examples is None else examples
    if not examples:
        raise InputError(f"{task_data.name}: no evaluation examples")
    scores = example_scores(model, tokenizer, task_data.spec, examples, batch_size)
    return sum(success(task_data.spec, s) for s in scores) / len(scores)


def hard_negative_nll(model: nn.Module, tokenizer, examples: Sequence[SuffixExample], batch_size: int = 32) -> float:
    """Mean over hard negatives of −log P(suffix | prefix) summed over the suffix (lower is better; compare
    with the unedited model: an edit must not make it worse)."""
    if not examples:
        raise InputError("no hard negatives to score")
    lps = score_suffixes(model, tokenizer, _pairs_of("raise", examples), batch_size)
    return -sum(lps) / len(lps)
