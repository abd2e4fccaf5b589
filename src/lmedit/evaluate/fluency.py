"""Generation fluency (ROME §4): weighted n-gram entropy of generated text. A model that repeats itself after an
edit ("Rome Rome Rome ...") scores low.

entropy = mean_n( w_n · H(n-gram frequencies) ), n ∈ {2, 3}, w = (2/3, 4/3), H in bits over word n-grams.

Two protocols, both named in the result:
- `fluency` (ROME's, the headline): per prompt, prompt + top-5 sampled tokens up to 100 tokens in all (seeded,
  `generation.sampled_texts`), words as NLTK's `word_tokenize` splits them, case kept; a record's value is the
  mean over its generation prompts (CounterFact's `generation_prompts` where the data has them, else its prompt);
- `fluency_greedy` (lmedit's earlier one): prompt + a 32-token greedy continuation, lower-cased words.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from torch import nn

from lmedit.evaluate.generation import greedy_continuations, sampled_texts

_WORDS = re.compile(r"\w+|[^\w\s]")
_LEADING = set('"([{<`$#')
_TRAILING = set('.,;:!?)]}>"\'%')
_CONTRACTION = re.compile(r"(?i)^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def word_tokens(text: str) -> list[str]:
    """Words and punctuation much as NLTK's `word_tokenize` (Treebank rules) gives them, without NLTK or its
    punkt data: quotes, brackets, $ and # split off the front of a word; . , ; : ! ? ' % and brackets off its end
    (a run of dots stays one token); clitics split off ("don't" → "do", "n't"; "it's" → "it", "'s")."""
    out: list[str] = []
    for chunk in text.split():
        lead, trail = [], []
        while chunk and chunk[0] in _LEADING:
            lead.append(chunk[0])
            chunk = chunk[1:]
        while chunk and chunk[-1] in _TRAILING:
            dots = len(chunk) - len(chunk.rstrip("."))
            n = dots if dots > 1 else 1
            trail.insert(0, chunk[-n:])
            chunk = chunk[:-n]
        core = []
        if chunk:
            m = _CONTRACTION.match(chunk)
            core = [m.group(1), m.group(2)] if m else [chunk]
        out += lead + core + trail
    return out


def _entropy(words: list[str], ns: tuple[int, ...], weights: tuple[float, ...]) -> float:
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """lmedit's earlier variant: lower-cased \\w+ words and single punctuation marks."""
    return _entropy(_WORDS.findall(text.lower()), ns, weights)


def rome_ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3),
                       weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """ROME's `compute_n_gram_entropy`: the same formula on NLTK-like word tokens, case kept."""
    return _entropy(word_tokens(text), ns, weights)


def fluency(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[float]:
    """`fluency_greedy`: per prompt, the entropy of prompt + its greedy continuation."""
    texts = greedy_continuations(model, tokenizer, prompts, max_new_tokens)
    return [ngram_entropy(p + t) for p, t in zip(prompts, texts)]


def rome_fluency(model: nn.Module, tokenizer, prompt_lists: list[list[str]], seed: int = 0,
                 max_length: int = 100, top_k: int = 5) -> list[float | None]:
    """`fluency`: per record, the mean entropy of its prompts' sampled texts (None for a record with no prompts)."""
    flat = [p for prompts in prompt_lists for p in prompts]
    values = iter(rome_ngram_entropy(t) for t in sampled_texts(model, tokenizer, flat, max_length, top_k, seed))
    out = []
    for prompts in prompt_lists:
        scores = [next(values) for _ in prompts]
        out.append(sum(scores) / len(scores) if scores else None)
    return out
