"""zsRE metrics on hand-made cases with known answers."""

from __future__ import annotations

import copy

import torch

from lmedit.evaluate.scoring import score_pairs
from lmedit.evaluate.zsre import ZsreScorer, aggregate
from lmedit.requests import EditRequest

REQ = EditRequest("What is the product made by UniFirst?", "UniFirst", "unmanned aircraft", "uniform",
                  paraphrases=("What will be the product of UniFirst?",),
                  neighborhood=(("nq question: john goodman's character in the big lebowski", "Walter Sobchak"),))


def test_zsre_metrics_match_a_direct_computation(tiny_model, tokenizer):
    lm = tiny_model("llama")
    scorer = ZsreScorer()
    base = scorer(lm.model, tokenizer, [REQ])[0]
    assert base["locality"] == 1.0  # the unedited model agrees with itself
    direct = score_pairs(lm.model, tokenizer, [(REQ.prompt, REQ.target_new)])[0]
    expected = sum(int(a == b) for a, b in zip(direct.top1, direct.target_ids)) / len(direct.target_ids)
    assert base["efficacy"] == expected

    changed = copy.deepcopy(lm.model)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = scorer(changed, tokenizer, [REQ])[0]
    loc = score_pairs(changed, tokenizer, [REQ.neighborhood[0]])[0].top1
    ref = score_pairs(lm.model, tokenizer, [REQ.neighborhood[0]])[0].top1
    assert after["locality"] == sum(int(a == b) for a, b in zip(loc, ref)) / len(ref)
    assert after["locality"] < 1.0


def test_zsre_aggregate_known_answer():
    records = [{"efficacy": 1.0, "generalization": 0.5, "specificity": 0.5, "locality": 1.0},
               {"efficacy": 0.5, "generalization": 0.5, "specificity": 0.0, "locality": 0.5}]
    agg = aggregate(records)
    assert agg["efficacy"] == 0.75 and agg["generalization"] == 0.5 and agg["locality"] == 0.75
    assert agg["specificity"] == 0.25
    # MEMIT's zsRE score takes specificity; the locality one is lmedit's earlier edit score
    assert abs(agg["edit_score"] - 3 / (1 / 0.75 + 1 / 0.5 + 1 / 0.25)) < 1e-12
    assert abs(agg["edit_score_locality"] - 3 / (1 / 0.75 + 1 / 0.5 + 1 / 0.75)) < 1e-12
