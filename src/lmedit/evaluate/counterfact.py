"""CounterFact scoring: efficacy, generalization, specificity and their magnitudes (DESIGN §8).

Every comparison is between the summed, teacher-forced log-probabilities of the two targets given a prompt
(`lmedit.evaluate.scoring`). Per family:
- efficacy: on the request's prompt, P(new) > P(true);
- generalization: on each paraphrase, P(new) > P(true), averaged over the record's paraphrases;
- specificity: on each neighbourhood prompt, P(true) > P(new), where "true" is that pair's own answer and
  "new" is the request's target_new, averaged over the record's neighbourhood prompts.
Magnitudes are mean probability differences (probabilities = exp of the summed log-probs), signed so that
larger is better, as in ROME: P(new) − P(true) for efficacy and generalization, P(true) − P(new) for
specificity.
A record without target_true cannot be scored by comparison; it comes back flagged "skipped" and is counted.
"""

from __future__ import annotations

import math

from torch import nn

from lmedit.evaluate.scoring import sum_logprob
from lmedit.requests import EditRequest

PROTOCOL = "success rate by probability comparison (summed target log-prob, teacher-forced)"
FAMILIES = ("efficacy", "generalization", "specificity")


def harmonic_mean(values) -> float:
    """Harmonic mean of non-negative numbers; 0.0 if any is 0 (or the list is empty)."""
    values = [float(v) for v in values]
    if any(v < 0 or math.isnan(v) for v in values):
        raise ValueError(f"harmonic mean needs non-negative numbers, got {values}")
    if not values or any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _compare(lp_new: float, lp_true: float, keep_true: bool) -> tuple[float, float]:
    """(success 1.0/0.0, signed probability difference) for one prompt; sign so that larger is better."""
    if keep_true:
        return float(lp_true > lp_new), math.exp(lp_true) - math.exp(lp_new)
    return float(lp_new > lp_true), math.exp(lp_new) - math.exp(lp_true)


def score_counterfact(model: nn.Module, tokenizer, requests: list[EditRequest], batch_size: int = 64,
                      progress: bool = False, fluency: bool = False) -> list[dict]:
    """One dict per request (in order) with its log-probs, per-family successes and magnitudes.

    A family with no prompts (e.g. no paraphrases) has None for its success and magnitude. With `fluency`,
    each record also gets the n-gram entropy of the model's greedy continuation of its prompt.
    """
    pairs: list[tuple[str, str]] = []
    for r in requests:
        if r.target_true is None:
            continue
        pairs += [(r.prompt, r.target_new), (r.prompt, r.target_true)]
        for p in r.paraphrases:
            pairs += [(p, r.target_new), (p, r.target_true)]
        for p, answer in r.neighborhood:
            pairs += [(p, r.target_new), (p, answer)]
    logps = iter(sum_logprob(model, tokenizer, pairs, batch_size=batch_size, progress=progress))

    records = []
    for r in requests:
        if r.target_true is None:
            records.append({"case_id": r.case_id, "skipped": True,
                            "reason": "no target_true: P(new) > P(true) cannot be compared"})
            continue
        rec: dict = {"case_id": r.case_id, "skipped": False}
        lp_new, lp_true = next(logps), next(logps)
        rec["prompt"] = {"prompt": r.prompt, "logp_new": lp_new, "logp_true": lp_true}
        rec["efficacy"], rec["efficacy_magnitude"] = _compare(lp_new, lp_true, keep_true=False)
        for key, family, prompts, keep_true in (
                ("paraphrases", "generalization", [(p, r.target_true) for p in r.paraphrases], False),
                ("neighborhood", "specificity", list(r.neighborhood), True)):
            rows, hits, diffs = [], [], []
            for p, answer in prompts:
                lp_new, lp_true = next(logps), next(logps)
                rows.append({"prompt": p, "true": answer, "logp_new": lp_new, "logp_true": lp_true})
                hit, diff = _compare(lp_new, lp_true, keep_true)
                hits.append(hit)
                diffs.append(diff)
            rec[key] = rows
            rec[family], rec[f"{family}_magnitude"] = _mean(hits), _mean(diffs)
        records.append(rec)
    if fluency:
        from lmedit.evaluate.fluency import fluency as entropies

        scored = [(rec, r) for rec, r in zip(records, [r for r in requests]) if not rec.get("skipped")]
        for (rec, _), value in zip(scored, entropies(model, tokenizer, [r.prompt for _, r in scored])):
            rec["fluency"] = value
    return records


def aggregate(records: list[dict]) -> dict:
    """Means over the scored records of each family's success and magnitude, and the edit score.

    A family's mean is taken over the records that have it; it is None if none does, and then so is the
    edit score (the harmonic mean of the three success rates; 0 if any is 0). Skipped records are counted.
    """
    scored = [r for r in records if not r.get("skipped")]
    out: dict = {}
    for family in FAMILIES:
        out[family] = _mean([r[family] for r in scored if r.get(family) is not None])
    rates = [out[f] for f in FAMILIES]
    out["edit_score"] = None if any(v is None for v in rates) else harmonic_mean(rates)
    for family in FAMILIES:
        key = f"{family}_magnitude"
        out[key] = _mean([r[key] for r in scored if r.get(key) is not None])
    if any("fluency" in r for r in scored):
        out["fluency"] = _mean([r["fluency"] for r in scored if "fluency" in r])
    out["n"] = len(scored)
    out["skipped"] = len(records) - len(scored)
    out["protocol"] = PROTOCOL
    return out
