"""Token-level bookkeeping shared by keys, values and scoring: where the subject ends, where targets go."""

from __future__ import annotations

from dataclasses import dataclass

from lmedit.errors import InputError
from lmedit.models.tokens import encode, encode_continuation  # noqa: F401  (also used from here)
from lmedit.requests import join_prompt_target


def subject_tokens(tokenizer, text: str, subject: str) -> tuple[list[int], int, int]:
    """(ids of `text`, index of the first and of the last token of the last occurrence of `subject`)."""
    start = text.rfind(subject)
    if start < 0:
        raise InputError(f"subject {subject!r} does not occur in the prompt {text!r}")
    end = start + len(subject)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s and s < end and e > start]
    if not inside:
        raise InputError(f"cannot find the tokens of subject {subject!r} in {text!r}")
    return list(enc["input_ids"]), inside[0], inside[-1]


def subject_last_token(tokenizer, text: str, subject: str) -> tuple[list[int], int]:
    """(ids of `text`, index of the last token of the last occurrence of `subject`) — the edit point."""
    ids, _, last = subject_tokens(tokenizer, text, subject)
    return ids, last


@dataclass(frozen=True)
class Scored:
    """A prompt followed by a teacher-forced continuation: input ids and which positions predict which ids."""

    ids: list[int]  # prompt ids + continuation ids except the last
    target_ids: list[int]
    first_target_pos: int  # position whose logits predict target_ids[0]

    @property
    def target_positions(self) -> list[int]:
        return list(range(self.first_target_pos, self.first_target_pos + len(self.target_ids)))


def with_target(prompt_ids: list[int], tokenizer, prompt: str, target: str) -> Scored:
    _, cont = join_prompt_target(prompt, target)
    target_ids = encode_continuation(tokenizer, cont)
    if not target_ids:
        raise InputError(f"target {target!r} tokenizes to nothing")
    return Scored(prompt_ids + target_ids[:-1], target_ids, len(prompt_ids) - 1)


def encode_pair(tokenizer, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids) of a canonical example: the suffix is predicted from the prefix."""
    p = encode(tokenizer, prefix)
    if not p:
        raise InputError(f"prefix {prefix!r} tokenizes to nothing: there is no position to predict the suffix from")
    s = encode_continuation(tokenizer, suffix)
    if not s:
        raise InputError(f"suffix {suffix!r} tokenizes to nothing")
    return p, s
