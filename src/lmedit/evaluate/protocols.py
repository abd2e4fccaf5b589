"""The name of every metric's convention, and how result files written before the conventions split read.

A result's `protocol` maps each metric key to the convention it follows. The unsuffixed keys follow the papers'
own tables (ROME/MEMIT's code); lmedit's earlier conventions live on under suffixed keys (`_summed`,
`locality`, `_greedy`), so a key never changes meaning between files.
"""

from __future__ import annotations

VERSION = 2  # of the record fields the scorers write; a journal written under another version is not resumed

_MEAN = "mean per-token target log-prob (ROME/MEMIT `test_batch_prediction`), teacher-forced"
_SUM = "summed target log-prob (the whole target's probability), teacher-forced"
_GEN = ("greedy continuation begins with {what} (case-folded, whitespace collapsed, ending at a word boundary; "
        "answer tokens + 2 new tokens)")

COUNTERFACT = {
    "efficacy": f"share of prompts with P(new) > P(true) by {_MEAN}",
    "generalization": f"the same on each paraphrase, by {_MEAN}",
    "specificity": f"share of neighbourhood prompts with P(true) > P(new) by {_MEAN}",
    "edit_score": "harmonic mean of efficacy, generalization, specificity (ROME/MEMIT score)",
    "efficacy_magnitude": "mean of exp(mean log P(new)) − exp(mean log P(true)) (ROME's efficacy diff)",
    "generalization_magnitude": "the same on paraphrases (ROME's paraphrase diff)",
    "specificity_magnitude": "mean of exp(mean log P(true)) − exp(mean log P(new)) on neighbours (ROME's diff)",
    "efficacy_summed": f"share of prompts with P(new) > P(true) by {_SUM}",
    "generalization_summed": f"the same on each paraphrase, by {_SUM}",
    "specificity_summed": f"share of neighbourhood prompts with P(true) > P(new) by {_SUM}",
    "edit_score_summed": "harmonic mean of the three _summed rates",
    "efficacy_magnitude_summed": "mean of P(new) − P(true), whole-target probabilities",
    "generalization_magnitude_summed": "the same on paraphrases, whole-target probabilities",
    "specificity_magnitude_summed": "mean of P(true) − P(new) on neighbours, whole-target probabilities",
    "efficacy_generated": _GEN.format(what="target_new, on the prompt"),
    "generalization_generated": _GEN.format(what="target_new, on each paraphrase"),
    "specificity_generated": _GEN.format(what="the neighbour's own true answer"),
    "fluency": ("ROME: n-gram entropy (n = 2, 3; weights 2/3, 4/3; NLTK-like words) of prompt + top-5 sampled "
                "tokens, 100 tokens in all, seeded; mean over a record's generation prompts"),
    "fluency_greedy": "n-gram entropy of prompt + 32 greedy tokens, lower-cased words (lmedit's earlier variant)",
}

ZSRE = {
    "efficacy": "token-level top-1 accuracy of target_new given the question, teacher-forced (MEND/MEMIT)",
    "generalization": "the same given the paraphrased question",
    "specificity": ("token-level top-1 accuracy of the unrelated question's own answer loc_ans given loc + '?', "
                    "teacher-forced (MEMIT's neighborhood accuracy)"),
    "edit_score": "harmonic mean of efficacy, generalization, specificity (MEMIT's zsRE score)",
    "locality": "share of loc_ans positions where the top-1 token equals the unedited model's (EasyEdit's locality)",
    "edit_score_locality": "harmonic mean of efficacy, generalization, locality (lmedit's earlier edit score)",
    "efficacy_generated": _GEN.format(what="target_new, on the question"),
    "generalization_generated": _GEN.format(what="target_new, on the paraphrased question"),
    "specificity_generated": _GEN.format(what="loc_ans, on loc + '?'"),
}

BY_TASK = {"counterfact": COUNTERFACT, "zsre": ZSRE}

# Per-record metric keys the runner copies into each record's "baseline" (the unedited model's values).
RECORD_METRICS = tuple(dict.fromkeys(k for table in BY_TASK.values() for k in table
                                     if not k.startswith("edit_score")))

# The protocol strings result files carried before every metric was named, and the keys their numbers belong to.
_LEGACY = {
    "success rate by probability comparison (summed target log-prob, teacher-forced)": {
        **{k: f"{k}_summed" for k in ("efficacy", "generalization", "specificity", "edit_score")},
        **{f"{f}_magnitude": f"{f}_magnitude_summed" for f in ("efficacy", "generalization", "specificity")},
        "fluency": "fluency_greedy"},
    "token-level top-1 accuracy (teacher-forced); locality = top-1 agreement with the unedited model": {
        "edit_score": "edit_score_locality"},
}


def named(task: str, metrics: dict) -> dict:
    """The protocol of the metrics in `metrics`: each key's convention."""
    table = BY_TASK[task]
    return {k: table[k] for k in metrics if k in table}


def is_legacy(result: dict) -> bool:
    return isinstance(result.get("protocol"), str) and result["protocol"] in _LEGACY


def upgrade_legacy(result: dict) -> dict:
    """A result file written before the conventions split, with its numbers under the keys of their convention
    (its `efficacy` was the summed comparison: it becomes `efficacy_summed`); other results are returned as they are."""
    if not is_legacy(result):
        return result
    renames = _LEGACY[result["protocol"]]

    def move(metrics: dict) -> dict:
        return {renames.get(k, k): v for k, v in (metrics or {}).items()}

    upgraded = {**result, "metrics": move(result.get("metrics")), "baseline": move(result.get("baseline"))}
    upgraded["protocol"] = named(result["task"], upgraded["metrics"]) if result.get("task") in BY_TASK else {}
    return upgraded
