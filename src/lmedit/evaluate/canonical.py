"""The six tasks of "Model Editing with Canonical Examples" (Hewitt et al. 2024): the task table and its data.

One table, `TASKS`, holds per task its kind, the file of each role and its success rule:

| task                | kind    | success when                              |
|---------------------|---------|-------------------------------------------|
| country_capital     | raise   | log P(suffix) > log 0.2                   |
| company_ceo         | raise   | log P(suffix) > log 0.05                  |
| temporal            | raise   | log P(suffix) > log 0.05                  |
| stereoset           | lower   | log P(suffix) < log 0.001                 |
| pronoun_gender_bias | balance | abs(log P(s1) − log P(s2)) < log 1.5      |
| verb_conjugation    | prefer  | log P(s1) − log P(s2) ≥ log 16            |

log P is summed over the suffix tokens, teacher-forced (the scores, losses and rules are in canonical_scores.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Union

from lmedit.errors import InputError
from lmedit.fileio import iter_jsonl

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
