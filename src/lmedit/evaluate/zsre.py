"""zsRE scoring (MEND/MEMIT protocol): token-level top-1 accuracy, specificity on the unrelated question's own
answer, and locality against the unedited model.

- efficacy: share of target_new's tokens that are the model's argmax given the question and the preceding
  answer tokens (teacher-forced), averaged per record;
- generalization: the same on the paraphrased question;
- specificity (MEMIT's, the headline): the same token accuracy for the unrelated Natural Questions item's own
  answer `loc_ans`, given `loc` + "?" as MEMIT's dataset builds that prompt. The unedited model scores low on
  it (MEMIT reports about 0.27 for GPT-J); an edit should leave it where it was;
- locality (EasyEdit's): share of positions where the edited model's argmax on `loc` + `loc_ans` equals the
  unedited model's argmax there (1.0 for the unedited model);
- edit_score: the harmonic mean of efficacy, generalization and specificity, the score of MEMIT's zsRE table
  (its `summarize.py` takes the same hmean as for CounterFact); edit_score_locality puts locality in its place;
- `_generated` (on by default): the greedy continuation begins with the answer (`generated.py`).
The unedited model's argmax tokens are needed for locality, so a `ZsreScorer` remembers the tokens of the
first model it scores a record with (the runner always scores the unedited model first).
"""

from __future__ import annotations

from torch import nn

from lmedit.evaluate import protocols
from lmedit.evaluate.counterfact import harmonic_mean
from lmedit.evaluate.scoring import score_pairs
from lmedit.requests import EditRequest

FAMILIES = ("efficacy", "generalization", "specificity")
RATES = FAMILIES + ("locality",)
PROTOCOL = protocols.ZSRE


def _accuracy(score) -> float:
    return sum(int(a == b) for a, b in zip(score.top1, score.target_ids)) / len(score.target_ids)


def memit_question(loc: str) -> str:
    """The neighbourhood prompt as MEMIT's `dsets/zsre.py` builds it: the NQ question with a "?" after it."""
    return loc if loc.rstrip().endswith("?") else loc + "?"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class ZsreScorer:
    """Call it on the unedited model first; later calls measure locality against those predictions."""

    def __init__(self, generated: bool = True) -> None:
        self.reference: dict[tuple[str, str], tuple[int, ...]] = {}
        self.generated = generated

    def __call__(self, model: nn.Module, tokenizer, requests: list[EditRequest], batch_size: int = 64,
                 progress: bool = False) -> list[dict]:
        pairs = []
        for r in requests:
            pairs.append((r.prompt, r.target_new))
            pairs += [(p, r.target_new) for p in r.paraphrases]
            pairs += list(r.neighborhood)
            pairs += [(memit_question(loc), answer) for loc, answer in r.neighborhood]
        scores = dict(zip(pairs, score_pairs(model, tokenizer, pairs, batch_size, progress)))
        records = []
        for r in requests:
            rec = {"case_id": r.case_id, "efficacy": _accuracy(scores[(r.prompt, r.target_new)])}
            rec["generalization"] = _mean([_accuracy(scores[(p, r.target_new)]) for p in r.paraphrases])
            rec["specificity"] = _mean([_accuracy(scores[(memit_question(loc), answer)])
                                        for loc, answer in r.neighborhood])
            agree = []
            for pair in r.neighborhood:
                top1 = scores[pair].top1
                ref = self.reference.setdefault(pair, top1)
                agree.append(sum(int(a == b) for a, b in zip(top1, ref)) / len(ref))
            rec["locality"] = _mean(agree)
            records.append(rec)
        if self.generated:  # each prompt's greedy first token is its argmax in the teacher-forced pass
            _add_generated(model, tokenizer, requests, records, {p: s.top1[0] for (p, _), s in scores.items()})
        return records


def _add_generated(model: nn.Module, tokenizer, requests: list[EditRequest], records: list[dict],
                   first_tokens: dict) -> None:
    from lmedit.evaluate.generated import generated_matches

    asked = [[[(r.prompt, r.target_new)], [(p, r.target_new) for p in r.paraphrases],
              [(memit_question(loc), answer) for loc, answer in r.neighborhood]] for r in requests]
    hits = iter(generated_matches(model, tokenizer, [pair for families in asked for f in families for pair in f],
                                  first_tokens=first_tokens))
    for rec, families in zip(records, asked):
        for family, pairs in zip(FAMILIES, families):
            rec[f"{family}_generated"] = _mean([float(next(hits)) for _ in pairs])


def aggregate(records: list[dict]) -> dict:
    """Means over the records of each rate (over those that have it), both edit scores, and each key's protocol."""
    out: dict = {}
    for key in RATES:
        out[key] = _mean([r[key] for r in records if r.get(key) is not None])
    for name, third in (("edit_score", "specificity"), ("edit_score_locality", "locality")):
        rates = [out["efficacy"], out["generalization"], out[third]]
        out[name] = None if any(v is None for v in rates) else harmonic_mean(rates)
    for key in [f"{f}_generated" for f in FAMILIES]:
        if any(key in r for r in records):
            out[key] = _mean([r[key] for r in records if r.get(key) is not None])
    out["n"] = len(records)
    out["protocol"] = protocols.named("zsre", out)
    return out
