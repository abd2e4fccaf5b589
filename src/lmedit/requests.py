"""Edit requests: one fact to change, read from the common data formats and checked before any model work.

Every editor and scorer takes `EditRequest`s, so the format quirks of CounterFact (flat EasyEdit or nested
ROME) and zsRE (MEND) stop here. Bad input fails early with one line that names the file and the record:
`FILE record I` (0-based index in a JSON list) or `FILE line N` (1-based line of a JSONL file).
No torch here: loading requests must stay cheap.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from lmedit.errors import InputError, warn
from lmedit.fileio import atomic_write_bytes, iter_jsonl, read_json, read_text

FORMATS = ("counterfact", "rome", "zsre", "jsonl", "auto")


@dataclass(frozen=True)
class EditRequest:
    """One edit: after it, `prompt` (subject written out) should be continued by `target_new`.

    `paraphrases` should also give `target_new` (generalisation); each `neighborhood` pair is a prompt
    about something else and the answer it must keep (specificity). `extras` keeps what the source
    record had beyond these, so nothing is lost on a round trip; it does not take part in hashing.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[tuple[str, str], ...] = ()
    case_id: str | int | None = None
    extras: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so requests stay immutable; other wrong types are left for validate().
        if isinstance(self.paraphrases, list):
            object.__setattr__(self, "paraphrases", tuple(self.paraphrases))
        if isinstance(self.neighborhood, (list, tuple)):
            pairs = tuple(tuple(p) if isinstance(p, list) else p for p in self.neighborhood)
            object.__setattr__(self, "neighborhood", pairs)

    @property
    def template(self) -> str:
        """The prompt with the last occurrence of the subject replaced by "{}" (ROME's key position).

        The last occurrence, because the edit reads the key at the subject token nearest the target.
        Fill it with `template.replace("{}", subject)`, not `.format`, as prompts may hold other braces.
        """
        i = self.prompt.rfind(self.subject)
        if i < 0 or not self.subject:
            raise InputError(f"subject {self.subject!r} does not occur in the prompt {self.prompt!r}")
        return self.prompt[:i] + "{}" + self.prompt[i + len(self.subject):]

    def to_dict(self) -> dict:
        """The lmedit JSONL form: exactly the field names, lists for tuples."""
        return {
            "prompt": self.prompt, "subject": self.subject,
            "target_new": self.target_new, "target_true": self.target_true,
            "paraphrases": list(self.paraphrases),
            "neighborhood": [list(p) for p in self.neighborhood],
            "case_id": self.case_id, "extras": dict(self.extras),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> EditRequest:
        """Build and validate a request from the lmedit form; unknown or missing keys are an InputError."""
        pre = f"{where}: " if where else ""
        if not isinstance(d, dict):
            raise InputError(f"{pre}expected a JSON object with the request's fields, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            raise InputError(f"{pre}unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(names)}")
        missing = [k for k in ("prompt", "subject", "target_new") if k not in d]
        if missing:
            raise InputError(f"{pre}missing key(s) {', '.join(map(repr, missing))}")
        request = cls(**{k: ({} if v is None else v) if k == "extras" else v for k, v in d.items()})
        request.validate(where)
        return request

    def validate(self, where: str = "") -> None:
        """Raise InputError (one line, prefixed by `where`) unless this request can be edited and scored."""
        pre = f"{where}: " if where else ""

        def text(name: str, value: Any) -> None:
            if not isinstance(value, str):
                raise InputError(f"{pre}{name} must be a string, got {type(value).__name__} {value!r}")
            if not value.strip():
                raise InputError(f"{pre}{name} is empty")

        for name in ("prompt", "subject", "target_new"):
            text(name, getattr(self, name))
        if self.target_true is not None:
            text("target_true", self.target_true)
            if self.target_true.strip() == self.target_new.strip():
                raise InputError(f"{pre}target_new {self.target_new!r} equals target_true: the edit changes nothing")
        if "{}" in self.prompt:
            raise InputError(f"{pre}prompt {self.prompt!r} still contains '{{}}': write the subject out in it")
        if self.subject not in self.prompt:
            raise InputError(f"{pre}subject {self.subject!r} does not occur in the prompt {self.prompt!r}")
        if not isinstance(self.paraphrases, tuple):
            raise InputError(f"{pre}paraphrases must be a list of strings, got {type(self.paraphrases).__name__}")
        for i, p in enumerate(self.paraphrases):
            text(f"paraphrases[{i}]", p)
        if not isinstance(self.neighborhood, tuple):
            raise InputError(f"{pre}neighborhood must be a list of [prompt, answer] pairs")
        for i, pair in enumerate(self.neighborhood):
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise InputError(f"{pre}neighborhood[{i}] must be a [prompt, answer] pair, got {pair!r}")
            text(f"neighborhood[{i}] prompt", pair[0])
            text(f"neighborhood[{i}] answer", pair[1])
        if self.case_id is not None and (isinstance(self.case_id, bool) or not isinstance(self.case_id, (str, int))):
            raise InputError(f"{pre}case_id must be a string, an integer or null, got {self.case_id!r}")
        if not isinstance(self.extras, Mapping):
            raise InputError(f"{pre}extras must be a JSON object, got {type(self.extras).__name__}")
        try:
            json.dumps(dict(self.extras))
        except (TypeError, ValueError) as e:
            raise InputError(f"{pre}extras are not JSON-serialisable: {e}") from None


def join_prompt_target(prompt: str, target: str) -> tuple[str, str]:
    """Return (prompt, continuation): the target as it follows the prompt in running text.

    Targets are stored bare ("Paris") and prompts without a trailing space ("... is"), so one space goes
    between them: ("... is", " Paris"). BPE tokenizers fold that space into the target's first token, which
    is what the model predicts after the prompt. Nothing is added when the target already starts with
    whitespace or the prompt ends with it. Every scorer and editor uses this one rule so they agree.
    """
    if target[:1].isspace() or prompt[-1:].isspace():
        return prompt, target
    return prompt, " " + target


# ---------------------------------------------------------------- readers, one per record format

def _need(rec: Any, keys: tuple[str, ...], fmt: str, where: str) -> dict:
    """Check that a record has the keys its format needs; the message names format, key and record."""
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object ({fmt} record), got {type(rec).__name__}")
    for k in keys:
        if k not in rec:
            raise InputError(f"{where}: not a {fmt} record: missing key {k!r} (it has {', '.join(rec) or 'no keys'})")
    return rec


def _from_counterfact(rec: Any, index: int, where: str) -> EditRequest:
    """EasyEdit's flat CounterFact record."""
    _need(rec, ("prompt", "subject", "target_new", "ground_truth"), "counterfact", where)
    para = rec.get("rephrase_prompt")
    para = () if para is None else tuple(para) if isinstance(para, list) else (para,)
    hood = ()
    if "locality_prompt" in rec or "locality_ground_truth" in rec:
        _need(rec, ("locality_prompt", "locality_ground_truth"), "counterfact", where)
        hood = ((rec["locality_prompt"], rec["locality_ground_truth"]),)
    used = {"prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "case_id",
            "locality_prompt", "locality_ground_truth"}
    return EditRequest(rec["prompt"], rec["subject"], rec["target_new"], rec["ground_truth"], para, hood,
                       rec.get("case_id"), {k: v for k, v in rec.items() if k not in used})


def _from_rome(rec: Any, index: int, where: str) -> EditRequest:
    """The original nested ROME CounterFact record; its prompt is a template with "{}" for the subject."""
    _need(rec, ("requested_rewrite",), "rome", where)
    rw = _need(rec["requested_rewrite"], ("prompt", "subject", "target_new", "target_true"), "rome",
               f"{where} requested_rewrite")
    template, subject = rw["prompt"], rw["subject"]
    if not isinstance(template, str) or "{}" not in template:
        raise InputError(f"{where}: requested_rewrite prompt {template!r} has no '{{}}' for the subject")
    extras = {k: v for k, v in rw.items() if k not in ("prompt", "subject", "target_new", "target_true")}
    targets = []
    for key in ("target_new", "target_true"):
        t = rw[key]
        if isinstance(t, dict):
            _need(t, ("str",), "rome", f"{where} requested_rewrite {key}")
            extras.update({f"{key}_{k}": v for k, v in t.items() if k != "str"})
            t = t["str"]
        targets.append(t)
    extras.update({k: v for k, v in rec.items() if k not in
                   ("case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts")})
    prompt = template.replace("{}", subject) if isinstance(subject, str) else template
    hood = rec.get("neighborhood_prompts") or []
    hood = [(p, targets[1]) for p in hood] if isinstance(hood, list) else hood
    return EditRequest(prompt, subject, targets[0], targets[1], rec.get("paraphrase_prompts") or [],
                       hood, rec.get("case_id"), extras)


def _from_zsre(rec: Any, index: int, where: str) -> EditRequest:
    """A MEND-format zsRE record. The case id is the record's index, as the format has none.

    Two leniencies for known quirks of the published file: `alt` and answers are stripped (a few alts
    have a leading space), and target_true is the first answer that differs from `alt` (None if all equal it: some
    records ask to "change" a fact to its true value). A subject found only with other casing is
    rewritten as the prompt spells it; the original is kept in extras["subject_original"].
    """
    _need(rec, ("subject", "src", "alt", "answers"), "zsre", where)
    answers = rec["answers"] if isinstance(rec["answers"], list) else [rec["answers"]]
    alt = rec["alt"].strip() if isinstance(rec["alt"], str) else rec["alt"]
    true = next((a.strip() for a in answers if isinstance(a, str) and a.strip() != alt), None)
    subject, src = rec["subject"], rec["src"]
    extras = {k: v for k, v in rec.items() if k not in ("subject", "src", "alt", "rephrase", "loc", "loc_ans")}
    if isinstance(subject, str) and isinstance(src, str) and subject and subject not in src:
        found = list(re.finditer(re.escape(subject), src, flags=re.IGNORECASE))
        if found:
            extras["subject_original"], subject = subject, found[-1].group(0)
    para = (rec["rephrase"],) if rec.get("rephrase") is not None else ()
    hood = ()
    if "loc" in rec or "loc_ans" in rec:
        _need(rec, ("loc", "loc_ans"), "zsre", where)
        hood = ((rec["loc"], rec["loc_ans"]),)
    return EditRequest(src, subject, alt, true, para, hood, index, extras)


def _from_jsonl(rec: Any, index: int, where: str) -> EditRequest:
    return EditRequest.from_dict(rec, where)


_READERS: dict[str, Callable[[Any, int, str], EditRequest]] = {
    "counterfact": _from_counterfact, "rome": _from_rome, "zsre": _from_zsre, "jsonl": _from_jsonl}
_LMEDIT_KEYS = {f.name for f in fields(EditRequest)}


def _read_records(path: Path) -> tuple[list, list[str]]:
    """Records and their labels: a JSONL file (by suffix) gives line numbers, a JSON list gives indices."""
    if path.is_file() and not read_text(path, "edit requests (JSON or JSON lines)").strip():
        raise InputError(f"{path} is empty: expected edit requests")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        numbered = list(iter_jsonl(path))
        return [rec for _, rec in numbered], [f"{path} line {n}" for n, _ in numbered]
    data = read_json(path)
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records, got a {type(data).__name__} "
                         "(for one request per line, name the file .jsonl)")
    return data, [f"{path} record {i}" for i in range(len(data))]


def _detect(path: Path, first: Any) -> str:
    """Tell the format from the file suffix and the first record's keys."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    keys = set(first) if isinstance(first, dict) else set()
    if "requested_rewrite" in keys:
        return "rome"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"prompt", "target_new"} <= keys:
        # A JSON list in lmedit's own form (no EasyEdit-only keys) reads as jsonl records.
        return "jsonl" if keys <= _LMEDIT_KEYS else "counterfact"
    raise InputError(f"cannot tell the format of {path}: expected one of counterfact (prompt, target_new, "
                     "ground_truth), rome (requested_rewrite), zsre (src, alt) or a .jsonl file of lmedit "
                     "requests; pass the format explicitly")


@dataclass(frozen=True)
class Skipped:
    """A record left out by skip_invalid: where it was, its id if it had one, and why."""

    where: str
    case_id: Any
    reason: str

    def to_dict(self) -> dict:
        return {"where": self.where, "case_id": self.case_id, "reason": self.reason}


def load_requests(path: str | os.PathLike, fmt: str = "auto", limit: int | None = None,
                  accept: tuple[str, ...] | None = None, batch: bool = False,
                  skipped: list[Skipped] | None = None) -> list[EditRequest]:
    """Read and validate edit requests; `limit` keeps the first N (and must not exceed what is there).

    Every record is checked; invalid ones are refused together, one InputError naming each (real files have
    bad records, e.g. zsRE rows with an empty new answer). Pass a list as `skipped` to leave them out instead:
    it receives one `Skipped` per record left out, for the caller to report (`eval --skip-invalid`).

    fmt is one of counterfact, rome, zsre, jsonl, auto. The container follows the suffix (.jsonl: one
    object per line, otherwise a JSON list); the record format follows `fmt`, or is detected for "auto".
    batch=True: the requests are edited together (`lmedit edit`), so they are checked as a batch (`check_batch`):
    duplicates are dropped with a warning, contradictions refused. An evaluation file is a set of separate cases
    (CounterFact repeats some prompts with other targets), so it is not checked as one batch.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown requests format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise InputError(f"--limit must be a positive integer, got {limit!r}")
    path = Path(path)
    records, labels = _read_records(path)
    if not records:
        raise InputError(f"{path} holds no records: expected edit requests")
    if limit is not None:
        if limit > len(records):
            raise InputError(f"--limit {limit} exceeds the {len(records)} records in {path}")
        records, labels = records[:limit], labels[:limit]
    if fmt == "auto":
        fmt = _detect(path, records[0])
    if accept is not None and fmt not in accept:
        raise InputError(f"{path} holds {fmt} records, but this command expects {' or '.join(accept)} data")
    reader = _READERS[fmt]
    requests, kept, bad = [], [], []
    for i, (rec, where) in enumerate(zip(records, labels)):
        try:
            request = reader(rec, i, where)
            request.validate(where)
        except InputError as e:
            if not bad:
                first_message = str(e)  # as it was raised: the error when it is the only one
            case_id = rec.get("case_id", i) if isinstance(rec, dict) else i
            bad.append(Skipped(where, case_id, str(e).removeprefix(f"{where}: ")))
            continue
        requests.append(request)
        kept.append(where)
    if bad and skipped is None:
        if len(bad) == 1:
            raise InputError(first_message)
        listed = "; ".join(f"{b.where.removeprefix(str(path) + ' ')}: {b.reason}" for b in bad)
        raise InputError(f"{path}: {len(bad)} invalid records ({listed}); fix them, or pass --skip-invalid "
                         "to leave them out (they are listed in the result)")
    if skipped is not None:
        skipped.extend(bad)
        if not requests:
            raise InputError(f"{path}: every one of its {len(bad)} records is invalid, e.g. {bad[0].where}: "
                             f"{bad[0].reason}")
    return check_batch(requests, kept) if batch else requests


# ---------------------------------------------------------------- requests edited together

SHOWN = 5  # warnings of one kind shown one by one; the rest are counted in one more line


def _warn_each(messages: list[str], rest: str) -> None:
    for message in messages[:SHOWN]:
        warn(message)
    if len(messages) > SHOWN:
        warn(f"{len(messages) - SHOWN} more {rest}")


def occurrences(text: str, part: str) -> int:
    """How many times `part` occurs in `text`, overlapping ones included."""
    return sum(text.startswith(part, i) for i in range(len(text) - len(part) + 1)) if part else 0


def warn_repeated_subjects(requests: list[EditRequest], labels: list[str] | None = None) -> None:
    """A warning for each request whose subject occurs more than once in its prompt: the edit reads its key at
    the last occurrence (EditRequest.template, locate.prompts.subject_tokens), and the user should know."""
    labels = labels or [f"request {i}" for i in range(len(requests))]
    found = [(where, r, occurrences(r.prompt, r.subject)) for where, r in zip(labels, requests)]
    _warn_each([f"{where}: subject {r.subject!r} occurs {n} times in the prompt; editing the last occurrence"
                for where, r, n in found if n > 1], "requests whose subject occurs more than once in the prompt")


def check_batch(requests: list[EditRequest], labels: list[str] | None = None) -> list[EditRequest]:
    """Requests to be edited together, checked as a batch; returns the ones to edit.

    Two requests with the same prompt and subject ask for one fact: with the same target_new (compared without
    surrounding spaces) the later one is a duplicate, dropped with a warning naming both; with different targets
    they contradict each other, and the batch is refused (InputError naming both; one edit cannot make the model
    say two things). A subject that occurs more than once in its prompt is warned about (warn_repeated_subjects).
    `labels` name the requests in messages (`FILE line N`, as load_requests makes them); default `request I`.
    """
    labels = labels or [f"request {i}" for i in range(len(requests))]
    first: dict[tuple[str, str], int] = {}
    kept, duplicates, contradictions = [], [], []
    for i, r in enumerate(requests):
        j = first.setdefault((r.prompt, r.subject), i)
        if j == i:
            kept.append(i)
        elif requests[j].target_new.strip() == r.target_new.strip():
            duplicates.append(f"{labels[i]}: duplicate of {labels[j]} (same prompt, subject and target_new); dropped")
        else:
            contradictions.append((i, j))
    if contradictions:
        i, j = contradictions[0]
        more = f" ({len(contradictions) - 1} more such pairs)" if len(contradictions) > 1 else ""
        raise InputError(f"{labels[i]} contradicts {labels[j]}: the same prompt and subject {requests[i].subject!r} "
                         f"with target_new {requests[i].target_new!r} and {requests[j].target_new!r}; keep one of "
                         f"them{more}")
    _warn_each(duplicates, "duplicate requests dropped")
    kept_requests = [requests[i] for i in kept]
    warn_repeated_subjects(kept_requests, [labels[i] for i in kept])
    return kept_requests


def save_requests(path: str | os.PathLike, requests: list[EditRequest]) -> None:
    """Write requests as lmedit JSONL (atomically; overwriting is the caller's decision)."""
    lines = []
    for i, request in enumerate(requests):
        request.validate(f"request {i}")
        lines.append(json.dumps(request.to_dict(), ensure_ascii=False) + "\n")
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))
