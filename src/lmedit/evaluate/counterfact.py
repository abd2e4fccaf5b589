"""CounterFact scoring: efficacy, generalization, specificity and their magnitudes (DESIGN §8), in two conventions.

Every target is scored once, teacher-forced (`lmedit.evaluate.scoring`), and compared two ways:
- the headline keys (`efficacy`, ...) compare the MEAN per-token log-probabilities of the two targets, as the
  ROME/MEMIT code does (`test_batch_prediction` averages the NLL over the target's tokens); magnitudes are
  differences of exp(mean log-prob), ROME's `*_diff`;
- the `_summed` keys compare the SUMMED log-probabilities (the whole target's probability), lmedit's earlier
  headline; magnitudes are differences of whole-target probabilities.
The two differ only when the targets have different token counts. Per family:
- efficacy: on the request's prompt, P(new) > P(true);
- generalization: on each paraphrase, P(new) > P(true), averaged over the record's paraphrases;
- specificity: on each neighbourhood prompt, P(true) > P(new), where "true" is that pair's own answer and
  "new" is the request's target_new, averaged over the record's neighbourhood prompts.
Magnitudes are signed so that larger is better. `_generated` keys (on by default) ask whether the greedy
continuation begins with the answer (`generated.py`); with `fluency`, ROME's sampled fluency and the greedy one.
A record without target_true cannot be scored by comparison; it comes back flagged "skipped" and is counted.
"""

from __future__ import annotations

import math

from torch import nn

from lmedit.evaluate import protocols
from lmedit.evaluate.scoring import PairScore, score_pairs
from lmedit.requests import EditRequest

FAMILIES = ("efficacy", "generalization", "specificity")
CONVENTIONS = ("", "_summed")  # key suffixes: mean per-token (headline), summed
PROTOCOL = protocols.COUNTERFACT


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


def _logps(new: PairScore, true: PairScore) -> dict:
    """One prompt's two targets, both conventions: summed (logp_*) and mean per token (mean_logp_*)."""
    return {"logp_new": float(sum(new.logprobs)), "logp_true": float(sum(true.logprobs)),
            "mean_logp_new": float(sum(new.logprobs)) / len(new.logprobs),
            "mean_logp_true": float(sum(true.logprobs)) / len(true.logprobs)}


def _compare(row: dict, keep_true: bool, suffix: str) -> tuple[float, float]:
    """(success 1.0/0.0, signed probability difference) for one prompt in one convention; larger is better."""
    key = "mean_logp" if suffix == "" else "logp"
    new, true = row[f"{key}_new"], row[f"{key}_true"]
    if keep_true:
        return float(true > new), math.exp(true) - math.exp(new)
    return float(new > true), math.exp(new) - math.exp(true)


def _family(rec: dict, family: str, rows: list[dict], keep_true: bool) -> None:
    """The family's success and magnitude in both conventions, averaged over its prompts (None if it has none)."""
    for suffix in CONVENTIONS:
        hits, diffs = zip(*(_compare(r, keep_true, suffix) for r in rows)) if rows else ((), ())
        rec[f"{family}{suffix}"], rec[f"{family}_magnitude{suffix}"] = _mean(list(hits)), _mean(list(diffs))


def generation_prompts(request: EditRequest) -> list[str]:
    """The prompts ROME's fluency is measured on: the record's `generation_prompts` (ROME's nested CounterFact)
    where it has them, else its prompt (EasyEdit's flat CounterFact has none; EasyEdit uses the prompt too)."""
    given = request.extras.get("generation_prompts")
    given = [p for p in given if isinstance(p, str) and p.strip()] if isinstance(given, list) else []
    return given or [request.prompt]


def score_counterfact(model: nn.Module, tokenizer, requests: list[EditRequest], batch_size: int = 64,
                      progress: bool = False, fluency: bool = False, generated: bool = True,
                      fluency_seed: int = 0) -> list[dict]:
    """One dict per request (in order) with its log-probs, per-family successes and magnitudes.

    A family with no prompts (e.g. no paraphrases) has None for its success and magnitude."""
    pairs: list[tuple[str, str]] = []
    for r in requests:
        if r.target_true is None:
            continue
        pairs += [(r.prompt, r.target_new), (r.prompt, r.target_true)]
        for p in r.paraphrases:
            pairs += [(p, r.target_new), (p, r.target_true)]
        for p, answer in r.neighborhood:
            pairs += [(p, r.target_new), (p, answer)]
    results = score_pairs(model, tokenizer, pairs, batch_size=batch_size, progress=progress)
    scores = iter(results)

    records, scored = [], []
    for r in requests:
        if r.target_true is None:
            records.append({"case_id": r.case_id, "skipped": True,
                            "reason": "no target_true: P(new) > P(true) cannot be compared"})
            continue
        rec: dict = {"case_id": r.case_id, "skipped": False}
        rec["prompt"] = {"prompt": r.prompt, **_logps(next(scores), next(scores))}
        _family(rec, "efficacy", [rec["prompt"]], keep_true=False)
        for key, family, prompts, keep_true in (
                ("paraphrases", "generalization", [(p, r.target_true) for p in r.paraphrases], False),
                ("neighborhood", "specificity", list(r.neighborhood), True)):
            rec[key] = [{"prompt": p, "true": answer, **_logps(next(scores), next(scores))} for p, answer in prompts]
            _family(rec, family, rec[key], keep_true)
        records.append(rec)
        scored.append((rec, r))
    if generated:  # each prompt's greedy first token is its argmax in the teacher-forced pass
        _add_generated(model, tokenizer, scored, {p: s.top1[0] for (p, _), s in zip(pairs, results)})
    if fluency:
        from lmedit.evaluate.fluency import fluency as greedy_entropies
        from lmedit.evaluate.fluency import rome_fluency

        for (rec, _), value in zip(scored, greedy_entropies(model, tokenizer, [r.prompt for _, r in scored])):
            rec["fluency_greedy"] = value
        sampled = rome_fluency(model, tokenizer, [generation_prompts(r) for _, r in scored], seed=fluency_seed)
        for (rec, _), value in zip(scored, sampled):
            rec["fluency"] = value
    return records


def _add_generated(model: nn.Module, tokenizer, scored: list[tuple[dict, EditRequest]], first_tokens: dict) -> None:
    """`<family>_generated`: the share of the family's prompts whose greedy continuation begins with the answer
    (target_new on the prompt and paraphrases, the neighbour's own answer on neighbourhood prompts)."""
    from lmedit.evaluate.generated import generated_matches

    asked = [[[(r.prompt, r.target_new)], [(p, r.target_new) for p in r.paraphrases], list(r.neighborhood)]
             for _, r in scored]
    hits = iter(generated_matches(model, tokenizer, [pair for families in asked for f in families for pair in f],
                                  first_tokens=first_tokens))
    for (rec, _), families in zip(scored, asked):
        for family, pairs in zip(FAMILIES, families):
            rec[f"{family}_generated"] = _mean([float(next(hits)) for _ in pairs])


def aggregate(records: list[dict]) -> dict:
    """Means over the scored records of every per-record metric, and the edit score of each convention.

    A family's mean is taken over the records that have it; it is None if none does, and then so is that edit
    score (the harmonic mean of the three success rates; 0 if any is 0). Skipped records are counted. Optional
    metrics (generated, fluency) appear only when the records have them. `protocol` names each key's convention.
    """
    scored = [r for r in records if not r.get("skipped")]
    out: dict = {}
    for suffix in CONVENTIONS:
        for family in FAMILIES:
            key = f"{family}{suffix}"
            out[key] = _mean([r[key] for r in scored if r.get(key) is not None])
        rates = [out[f"{f}{suffix}"] for f in FAMILIES]
        out[f"edit_score{suffix}"] = None if any(v is None for v in rates) else harmonic_mean(rates)
    for suffix in CONVENTIONS:
        for family in FAMILIES:
            key = f"{family}_magnitude{suffix}"
            out[key] = _mean([r[key] for r in scored if r.get(key) is not None])
    for key in [f"{f}_generated" for f in FAMILIES] + ["fluency", "fluency_greedy"]:
        if any(key in r for r in scored):
            out[key] = _mean([r[key] for r in scored if r.get(key) is not None])
    out["n"] = len(scored)
    out["skipped"] = len(records) - len(scored)
    out["protocol"] = protocols.named("counterfact", out)
    return out
