"""Generation-based checks (DESIGN §8): does the model's greedy continuation of a prompt begin with the answer?

Teacher forcing is known to overstate an edit: the model is handed every earlier target token. Here it is handed
nothing: it continues the prompt greedily for as many tokens as the longest answer needs plus two, and the
continuation must begin with the answer, compared case-insensitively with runs of whitespace made one space,
and ending at a word boundary ("Rome" is not matched by "Romeo").
"""

from __future__ import annotations

from typing import Mapping

from torch import nn

from lmedit.evaluate.generation import greedy_continuations
from lmedit.locate.prompts import encode_continuation
from lmedit.requests import join_prompt_target

EXTRA_TOKENS = 2  # beyond the answer's own: room to see where its last word ends


def normalise(text: str) -> str:
    """Case-folded, with leading/trailing whitespace dropped and inner runs of whitespace made one space."""
    return " ".join(text.casefold().split())


def begins_with(continuation: str, answer: str) -> bool:
    """Whether `continuation` begins with `answer` (both normalised), the answer ending at a word boundary."""
    text, want = normalise(continuation), normalise(answer)
    if not want or not text.startswith(want):
        return False
    return len(text) == len(want) or not (text[len(want)].isalnum() and want[-1].isalnum())


def rules_out(first_text: str, answer: str) -> bool:
    """Whether a continuation whose first token decodes to `first_text` cannot begin with `answer`: their
    normalised forms are neither prefix of the other. Undecided (False) for a whitespace-only token or one that
    is part of a multi-byte character."""
    head, want = normalise(first_text), normalise(answer)
    if not head or "\ufffd" in first_text:
        return False
    return not (want.startswith(head) or head.startswith(want))


def generated_matches(model: nn.Module, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32,
                      first_tokens: Mapping[str, int] | None = None) -> list[bool]:
    """Per (prompt, answer) pair, whether the greedy continuation of the prompt begins with the answer.

    Each distinct prompt is continued once, for its longest answer's token count + EXTRA_TOKENS new tokens; prompts
    with the same budget are generated together, so a pair's result never depends on the other pairs asked.
    `first_tokens` (prompt -> its greedy first token, which the teacher-forced scorer has already computed: the
    argmax at the prompt's last position) settles the pairs that token rules out without generating."""
    first_tokens = first_tokens or {}
    ruled_out = [p in first_tokens and rules_out(tokenizer.decode([first_tokens[p]]), a) for p, a in pairs]
    budget: dict[str, int] = {}
    for (p, a), out in zip(pairs, ruled_out):
        if not out:
            need = len(encode_continuation(tokenizer, join_prompt_target(p, a)[1])) + EXTRA_TOKENS
            budget[p] = max(budget.get(p, 0), need)
    continuations: dict[str, str] = {}
    for n in sorted(set(budget.values())):
        prompts = [p for p, b in budget.items() if b == n]
        continuations.update(zip(prompts, greedy_continuations(model, tokenizer, prompts, n, batch_size)))
    return [not out and begins_with(continuations[p], a) for (p, a), out in zip(pairs, ruled_out)]
