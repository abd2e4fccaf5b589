"""zsRE scoring (MEND protocol): token-level top-1 accuracy, and locality against the unedited model.

- efficacy: share of target_new's tokens that are the model's argmax given the question and the preceding
  answer tokens (teacher-forced), averaged per record;
- generalization: the same on the paraphrased question;
- locality: share of positions where the edited model's argmax on the unrelated question + its answer
  equals the unedited model's argmax there.
The unedited model's argmax tokens are needed for locality, so a `ZsreScorer` remembers the tokens of the
first model it scores a record with (the runner always scores the unedited model first).
"""

from __future__ import annotations

from torch import nn

from lmedit.evaluate.counterfact import harmonic_mean
from lmedit.evaluate.scoring import score_pairs
from lmedit.requests import EditRequest

PROTOCOL = "token-level top-1 accuracy (teacher-forced); locality = top-1 agreement with the unedited model"
FAMILIES = ("efficacy", "generalization", "locality")


def _accuracy(score) -> float:
    return sum(int(a == b) for a, b in zip(score.top1, score.target_ids)) / len(score.target_ids)


class ZsreScorer:
    """Call it on the unedited model first; later calls measure locality against those predictions."""

    def __init__(self) -> None:
        self.reference: dict[tuple[str, str], tuple[int, ...]] = {}

    def __call__(self, model: nn.Module, tokenizer, requests: list[EditRequest], batch_size: int = 64,
                 progress: bool = False) -> list[dict]:
        pairs = []
        for r in requests:
            pairs.append((r.prompt, r.target_new))
            pairs += [(p, r.target_new) for p in r.paraphrases]
            pairs += list(r.neighborhood)
        scores = dict(zip(pairs, score_pairs(model, tokenizer, pairs, batch_size, progress)))
        records = []
        for r in requests:
            rec = {"case_id": r.case_id, "efficacy": _accuracy(scores[(r.prompt, r.target_new)])}
            para = [_accuracy(scores[(p, r.target_new)]) for p in r.paraphrases]
            rec["generalization"] = sum(para) / len(para) if para else None
            agree = []
            for pair in r.neighborhood:
                top1 = scores[pair].top1
                ref = self.reference.setdefault(pair, top1)
                agree.append(sum(int(a == b) for a, b in zip(top1, ref)) / len(ref))
            rec["locality"] = sum(agree) / len(agree) if agree else None
            records.append(rec)
        return records


def aggregate(records: list[dict]) -> dict:
    out: dict = {}
    for family in FAMILIES:
        values = [r[family] for r in records if r.get(family) is not None]
        out[family] = sum(values) / len(values) if values else None
    rates = [out[f] for f in FAMILIES]
    out["edit_score"] = None if any(v is None for v in rates) else harmonic_mean(rates)
    out["n"] = len(records)
    out["protocol"] = PROTOCOL
    return out
