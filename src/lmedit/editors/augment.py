"""The fine-tuning editors' training set (Gangadhar & Stratos 2024): per edit, the edit itself, m random paraphrases
(a model-written random prefix + the prompt → target_new) and r random facts (another prompt → its true answer)
that anchor locality. Every draw is deterministic in (seed, edit index).

Where the random facts come from (`facts_file`): by default the built-in pool (`editors.fact_pool`, read off
Wikipedia leads by the model itself), a requests file with true answers, or "requests": the other requests' own
true facts, which only single editing can use."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lmedit.errors import InputError
from lmedit.locate.context import context_templates
from lmedit.requests import EditRequest, load_requests

if TYPE_CHECKING:
    from lmedit.editors.train_config import TrainConfig


@dataclass(frozen=True)
class Example:
    prompt: str
    target: str
    kind: Literal["edit", "paraphrase", "fact"]
    edit: int  # index of the request it belongs to


def load_fact_pool(path: str) -> list[tuple[str, str]]:
    """(prompt, true answer) pairs from a requests file; a record without target_true is an InputError."""
    try:
        records = load_requests(path)
    except InputError as e:
        raise InputError(f"facts_file: {e}") from None
    missing = [i for i, r in enumerate(records) if r.target_true is None]
    if missing:
        raise InputError(f"facts_file {path}: record {missing[0]} has no target_true (a random fact needs its true "
                         f"answer; {len(missing)} of {len(records)} records lack one)")
    return [(r.prompt, r.target_true) for r in records]


def fact_pools(requests: list[EditRequest], facts: list[tuple[str, str]] | None,
               mode: str = "mass") -> list[list[tuple[str, str]]]:
    """Per edit, the facts it may draw: never one about a subject trained in the same run, whose true answer
    would pull against that edit (in mass editing every request is trained together; in single editing only
    the edit itself). `facts` None: the requests' own true facts, which only single editing can use."""
    if facts is None:
        facts = [(r.prompt, r.target_true) for r in requests if r.target_true is not None]
    together = [[r] for r in requests] if mode == "single" else [requests] * len(requests)
    return [[f for f in facts if not any(t.subject in f[0] or t.prompt == f[0] for t in group)]
            for group in together]


def augment(requests: list[EditRequest], prefixes: list[str], pools: list[list[tuple[str, str]]],
            n_paraphrases: int, n_random_facts: int, seed: int) -> list[Example]:
    """Per edit: the edit, `n_paraphrases` prefixes ("<text>. {}") drawn without replacement, `n_random_facts` facts
    (without replacement while the pool allows). Each edit draws from its own generator, seeded by (seed, index)."""
    if n_paraphrases > len(prefixes):
        raise InputError(f"n_paraphrases={n_paraphrases} exceeds the {len(prefixes)} prefixes generated (prefix_pool)")
    examples = []
    for i, (req, pool) in enumerate(zip(requests, pools)):
        rng = random.Random(f"lmedit-ft/{seed}/{i}")
        examples.append(Example(req.prompt, req.target_new, "edit", i))
        examples += [Example(t.replace("{}", req.prompt), req.target_new, "paraphrase", i)
                     for t in rng.sample(prefixes, n_paraphrases)]
        if n_random_facts:
            if not pool:
                raise InputError(f"no random facts to draw for request {i}: the pool is the other requests' true "
                                 "facts (facts_file=requests), which mass editing is changing (and a batch of one has "
                                 "none); leave facts_file unset for the built-in pool, name a file, or set "
                                 "n_random_facts=0")
            draw = rng.sample(pool, n_random_facts) if n_random_facts <= len(pool) else \
                rng.choices(pool, k=n_random_facts)
            examples += [Example(p, t, "fact", i) for p, t in draw]
    return examples


OTHER_REQUESTS = "requests"  # facts_file value: the other requests' true facts (single editing)


def random_facts(model, tokenizer, requests: list[EditRequest], config: "TrainConfig"
                 ) -> tuple[list[tuple[str, str]] | None, dict]:
    """The fact pool `facts_file` names (None: the other requests' true facts) and a description of it."""
    if config.facts_file == OTHER_REQUESTS:
        return None, {"source": "the other requests' true facts"}
    if config.facts_file:
        facts = load_fact_pool(config.facts_file)
        return facts, {"source": f"facts_file {config.facts_file}", "facts": len(facts)}
    from lmedit.editors.fact_pool import about_nothing_edited, builtin_pool

    facts, about = builtin_pool(model, tokenizer)
    usable = about_nothing_edited(facts, [r.subject for r in requests])
    return usable, {**about, "left_out_as_about_an_edited_subject": len(facts) - len(usable)}


def build_examples(model, tokenizer, requests: list[EditRequest], config: "TrainConfig"
                   ) -> tuple[list[Example], dict]:
    """The training set, and what went into it (for the patch metadata). No fact pool is read or built when
    n_random_facts is 0."""
    facts, about = random_facts(model, tokenizer, requests, config) if config.n_random_facts else (None, None)
    pools = fact_pools(requests, facts, config.mode)
    if facts is not None and config.n_random_facts and not any(pools):
        raise InputError(f"{about['source']}: no usable facts (all are about a subject being edited)")
    prefixes = []
    if config.n_paraphrases:
        n = max(config.prefix_pool, config.n_paraphrases)
        prefixes = context_templates(model, tokenizer, n, config.prefix_length, config.seed)[1:]
    examples = augment(requests, prefixes, pools, config.n_paraphrases, config.n_random_facts, config.seed)
    return examples, {"examples": len(examples), "paraphrases_per_edit": config.n_paraphrases,
                      "facts_per_edit": config.n_random_facts, "fact_pool": about}
