"""Protocols comparable with published tables: mean per-token vs summed CounterFact comparison, MEMIT's zsRE
specificity, ROME's sampled fluency, generation-based efficacy, and how older result files read."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmedit.evaluate import counterfact, zsre
from lmedit.evaluate.counterfact import aggregate, score_counterfact
from lmedit.evaluate.fluency import ngram_entropy, rome_ngram_entropy, word_tokens
from lmedit.evaluate.generated import begins_with, generated_matches
from lmedit.evaluate.generation import _TopKSampler, greedy_continuations, prompt_uniforms, sampled_texts
from lmedit.evaluate.protocols import upgrade_legacy
from lmedit.evaluate.scoring import PairScore
from lmedit.locate.prompts import encode
from lmedit.requests import EditRequest

LOG = math.log


def _fake_scores(table: dict):
    """score_pairs stand-in: (prompt, target) -> per-token log-probs (target ids/top1 are placeholders)."""
    def fake(model, tok, pairs, batch_size=64, progress=False):
        return [PairScore(tuple(range(len(table[p]))), tuple(table[p]), tuple(range(len(table[p])))) for p in pairs]
    return fake


# ---------------------------------------------------------------- CounterFact: mean per token vs summed

REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "Old English", "French",
                  ("Danielle Darrieux spoke",), (("Michel Rocard is a native speaker of", "French"),), case_id=3)


def test_mean_per_token_and_summed_conventions_disagree_on_unequal_lengths(monkeypatch):
    # target_new has two tokens of p = 0.5 each: mean log-prob log 0.5, summed log 0.25; target_true one token of
    # p = 0.3. Per token the new target wins (0.5 > 0.3); as whole targets it loses (0.25 < 0.3).
    hood = REQ.neighborhood[0][0]
    table = {(REQ.prompt, "Old English"): [LOG(0.5), LOG(0.5)], (REQ.prompt, "French"): [LOG(0.3)],
             # paraphrase: new 0.2·0.2 (mean 0.2, sum 0.04) vs true 0.1: per token wins, summed loses
             (REQ.paraphrases[0], "Old English"): [LOG(0.2), LOG(0.2)], (REQ.paraphrases[0], "French"): [LOG(0.1)],
             # neighbour: its answer 0.4 vs new 0.6·0.6 (mean 0.6, sum 0.36): per token lost, summed kept
             (hood, "Old English"): [LOG(0.6), LOG(0.6)], (hood, "French"): [LOG(0.4)]}
    monkeypatch.setattr(counterfact, "score_pairs", _fake_scores(table))
    rec = score_counterfact(None, None, [REQ], generated=False)[0]
    assert rec["efficacy"] == 1.0 and rec["efficacy_summed"] == 0.0
    assert rec["efficacy_magnitude"] == pytest.approx(0.5 - 0.3)  # ROME: exp(-mean NLL) differences
    assert rec["efficacy_magnitude_summed"] == pytest.approx(0.25 - 0.3)
    assert rec["generalization"] == 1.0 and rec["generalization_summed"] == 0.0
    assert rec["generalization_magnitude"] == pytest.approx(0.1)
    assert rec["specificity"] == 0.0 and rec["specificity_summed"] == 1.0
    assert rec["specificity_magnitude"] == pytest.approx(0.4 - 0.6)
    assert rec["specificity_magnitude_summed"] == pytest.approx(0.4 - 0.36)
    assert rec["prompt"]["logp_new"] == pytest.approx(LOG(0.25))
    assert rec["prompt"]["mean_logp_new"] == pytest.approx(LOG(0.5))
    out = aggregate([rec])
    assert out["edit_score"] == 0.0 and out["edit_score_summed"] == 0.0  # each has a zero rate
    assert "generated" not in " ".join(out) and "fluency" not in out  # off: absent, not None
    # every metric names its convention; the headline is ROME/MEMIT's
    assert set(out["protocol"]) == {k for k in out if k not in ("n", "skipped", "protocol")}
    assert "mean per-token" in out["protocol"]["efficacy"] and "summed" in out["protocol"]["efficacy_summed"]


def test_edit_scores_of_both_conventions():
    records = [{"skipped": False, "efficacy": 1.0, "generalization": 0.5, "specificity": 0.5,
                "efficacy_summed": 1.0, "generalization_summed": 1.0, "specificity_summed": 0.25}]
    out = aggregate(records)
    assert out["edit_score"] == pytest.approx(3 / (1 + 2 + 2))
    assert out["edit_score_summed"] == pytest.approx(3 / (1 + 1 + 4))


def test_mean_logp_on_a_model_is_the_per_token_average(tiny_model, tokenizer):
    from lmedit.evaluate.scoring import continuation_logprobs

    lm = tiny_model("llama")
    rec = score_counterfact(lm.model, tokenizer, [REQ])[0]
    per_token = continuation_logprobs(lm.model, tokenizer, [(REQ.prompt, "Old English"), (REQ.prompt, "French")],
                                      batch_size=1)
    assert len(per_token[0]) != len(per_token[1])  # the case where the conventions can differ
    assert rec["prompt"]["mean_logp_new"] == pytest.approx(sum(per_token[0]) / len(per_token[0]), abs=1e-5)
    assert rec["prompt"]["mean_logp_true"] == pytest.approx(sum(per_token[1]) / len(per_token[1]), abs=1e-5)
    assert rec["efficacy"] == float(sum(per_token[0]) / len(per_token[0]) > sum(per_token[1]) / len(per_token[1]))
    assert rec["efficacy_summed"] == float(sum(per_token[0]) > sum(per_token[1]))
    for family in ("efficacy", "generalization", "specificity"):
        assert rec[f"{family}_generated"] in (0.0, 1.0)  # on by default


# ---------------------------------------------------------------- zsRE: MEMIT's specificity vs locality

ZREQ = EditRequest("What is the product made by UniFirst?", "UniFirst", "cars", "uniform",
                   paraphrases=("What will be the product of UniFirst?",),
                   neighborhood=(("nq question: who voiced gaston", "Richard White"),))


def _zsre_fake(top1_by_prompt: dict, targets: dict):
    def fake(model, tok, pairs, batch_size=64, progress=False):
        return [PairScore(targets[p], top1_by_prompt[p[0]], top1_by_prompt[p[0]]) for p in pairs]
    return fake


def test_zsre_specificity_is_accuracy_on_the_neighbours_own_answer(monkeypatch):
    loc, ans = ZREQ.neighborhood[0]
    targets = {(ZREQ.prompt, "cars"): (5, 6), (ZREQ.paraphrases[0], "cars"): (5, 6),
               (loc, ans): (7, 8, 9), (loc + "?", ans): (7, 8, 9)}
    scorer = zsre.ZsreScorer(generated=False)
    # unedited: 1 of 2 answer tokens right, on the paraphrase 0; loc_ans after "loc?": 1 of 3 right
    monkeypatch.setattr(zsre, "score_pairs", _zsre_fake(
        {ZREQ.prompt: (5, 1), ZREQ.paraphrases[0]: (1, 1), loc: (7, 1, 2), loc + "?": (7, 0, 0)}, targets))
    base = scorer(None, None, [ZREQ])[0]
    assert base["efficacy"] == 0.5 and base["generalization"] == 0.0
    assert base["specificity"] == pytest.approx(1 / 3)  # low for the unedited model, as MEMIT reports
    assert base["locality"] == 1.0  # agrees with itself
    # edited: both answer tokens right; loc? now predicts 7, 8, 0 (2 of 3); on loc the argmax (7, 8, 2) keeps 2 of 3
    monkeypatch.setattr(zsre, "score_pairs", _zsre_fake(
        {ZREQ.prompt: (5, 6), ZREQ.paraphrases[0]: (5, 1), loc: (7, 8, 2), loc + "?": (7, 8, 0)}, targets))
    after = scorer(None, None, [ZREQ])[0]
    assert after["specificity"] == pytest.approx(2 / 3) and after["locality"] == pytest.approx(2 / 3)
    out = zsre.aggregate([after])
    assert out["edit_score"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.5 + 1 / (2 / 3)))
    assert out["edit_score_locality"] == pytest.approx(out["edit_score"])  # equal rates here
    assert "MEMIT" in out["protocol"]["specificity"] and "EasyEdit" in out["protocol"]["locality"]


def test_zsre_specificity_on_a_model(tiny_model, tokenizer):
    from lmedit.evaluate.scoring import score_pairs

    lm = tiny_model("llama")
    rec = zsre.ZsreScorer()(lm.model, tokenizer, [ZREQ])[0]
    loc, ans = ZREQ.neighborhood[0]
    s = score_pairs(lm.model, tokenizer, [(loc + "?", ans)], batch_size=1)[0]
    assert rec["specificity"] == sum(a == b for a, b in zip(s.top1, s.target_ids)) / len(s.target_ids)
    assert rec["locality"] == 1.0
    assert {"efficacy_generated", "generalization_generated", "specificity_generated"} <= set(rec)
    assert zsre.memit_question("who is it?") == "who is it?"


# ---------------------------------------------------------------- generation-based efficacy


@pytest.mark.parametrize("continuation, answer, expected", [
    ("  PARIS, France", "Paris", True),
    (" paris", "Paris", True),
    ("New \n  York City", "new york", True),
    (" Parisian food", "Paris", False),  # not a word boundary
    (" Rome", "Paris", False),
    ("", "Paris", False),
    (" Inc.and more", "Inc.", True),  # an answer ending in punctuation ends its own word
])
def test_begins_with_normalisation(continuation, answer, expected):
    assert begins_with(continuation, answer) is expected


def test_generated_matches_on_a_model(tiny_model, tokenizer, monkeypatch):
    from lmedit.evaluate import generated

    lm = tiny_model("llama")
    prompt = "The capital of France is"
    words = greedy_continuations(lm.model, tokenizer, [prompt], max_new_tokens=6)[0].split()
    assert len(words) >= 2  # so the first word is followed by whitespace: the model's own answer, whole
    budgets = []
    real = generated.greedy_continuations

    def spy(model, tok, prompts, max_new_tokens, batch_size):
        budgets.append(max_new_tokens)
        return real(model, tok, prompts, max_new_tokens, batch_size)

    monkeypatch.setattr(generated, "greedy_continuations", spy)
    hits = generated_matches(lm.model, tokenizer, [(prompt, words[0].upper()), (prompt, words[0] + "zz"),
                                                   (prompt, "Paris")])
    assert hits == [True, False, " ".join(words).startswith("Paris")]
    lengths = [len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in (words[0].upper(),
                                                                                       words[0] + "zz", "Paris")]
    assert budgets == [max(lengths) + 2]  # one batched call for the one prompt: the longest answer + 2 tokens
    # another prompt with a long answer gets its own budget and leaves this prompt's result as it was
    long_answer = "the river that runs through the middle of the old town"
    again = generated_matches(lm.model, tokenizer, [(prompt, words[0] + "zz"), ("Where is it?", long_answer)])
    long_tokens = len(tokenizer(" " + long_answer, add_special_tokens=False)["input_ids"])
    assert again[0] is False and budgets[1:] == [lengths[1] + 2, long_tokens + 2]


def test_first_token_shortcut_changes_no_answer(tiny_model, tokenizer, monkeypatch):
    """A pair its prompt's greedy first token rules out is not generated, and every answer equals full generation."""
    from lmedit.evaluate import generated
    from lmedit.evaluate.generated import rules_out
    from lmedit.evaluate.scoring import score_pairs

    assert rules_out(" the", "Paris") and not rules_out(" Par", "Paris") and not rules_out(" Paris", "Paris")
    assert not rules_out(" Parisian", "Paris")  # left to generation (which then says no)
    assert not rules_out(" ", "Paris") and not rules_out("\ufffd", "Paris")  # undecided
    lm = tiny_model("llama")
    prompts = ["The capital of France is", "Danielle Darrieux's mother tongue is", "Toyota was founded in"]
    own = greedy_continuations(lm.model, tokenizer, prompts[:1], max_new_tokens=6)[0].split()[0]
    pairs = [(prompts[0], own)] + [(p, "Paris") for p in prompts]
    first = {p: s.top1[0] for (p, _), s in zip(pairs, score_pairs(lm.model, tokenizer, pairs))}
    out = [p for p in prompts[1:] if rules_out(tokenizer.decode([first[p]]), "Paris")]
    assert out  # the random model's first tokens are not "Paris": the shortcut is exercised
    asked = []
    real = generated.greedy_continuations
    monkeypatch.setattr(generated, "greedy_continuations",
                        lambda m, t, ps, n, b: asked.append(list(ps)) or real(m, t, ps, n, b))
    fast = generated_matches(lm.model, tokenizer, pairs, first_tokens=first)
    assert sorted(p for ps in asked for p in ps) == sorted(p for p in prompts if p not in out)
    assert fast == generated_matches(lm.model, tokenizer, pairs) and fast[0] is True


# ---------------------------------------------------------------- fluency: ROME's sampled, and the greedy one


def test_word_tokens_are_nltk_like():
    assert word_tokens('He said "don\'t" (twice)... It\'s 5%.') == [
        "He", "said", '"', "do", "n't", '"', "(", "twice", ")", "...", "It", "'s", "5", "%", "."]


def test_rome_entropy_keeps_case():
    # "The the The the": bigrams {(The, the): 2, (the, The): 1}, trigrams {(The, the, The): 1, (the, The, the): 1}
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert rome_ngram_entropy("The the The the") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2, abs=1e-12)
    assert ngram_entropy("The the The the") == 0.0  # the greedy variant lower-cases


def test_top_k_sampler_draws_by_inverse_cdf():
    scores = torch.log(torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05], [0.05, 0.5, 0.1, 0.3, 0.05]]))
    # top 2: token 1 (0.5 → 0.625 renormalised) then token 3 (0.3 → 0.375): u < 0.625 picks 1, else 3
    sampler = _TopKSampler(torch.tensor([[0.6], [0.7]], dtype=torch.float64), top_k=2, start=4)
    out = sampler(torch.zeros((2, 4), dtype=torch.long), scores)
    assert out.argmax(-1).tolist() == [1, 3]
    assert torch.isinf(out).sum().item() == 2 * 4  # only the chosen token is left


def test_sampled_fluency_is_reproducible_and_batch_invariant(tiny_model, tokenizer):
    lm = tiny_model("llama")
    prompts = ["The capital of France is", "Danielle Darrieux's mother tongue is"]
    lengths = [len(encode(tokenizer, p)) for p in prompts]
    max_length = max(lengths) + 6
    first = sampled_texts(lm.model, tokenizer, prompts, max_length=max_length, seed=1)
    assert first == sampled_texts(lm.model, tokenizer, prompts, max_length=max_length, seed=1)
    assert first == [sampled_texts(lm.model, tokenizer, [p], max_length=max_length, seed=1)[0] for p in prompts]
    assert first != sampled_texts(lm.model, tokenizer, prompts, max_length=max_length, seed=2)
    assert all(t.startswith(p) for t, p in zip(first, prompts))  # the text is prompt + generation, as in ROME
    # the length counts the prompt (ROME's max_out_len): no room, no new token
    assert sampled_texts(lm.model, tokenizer, prompts[:1], max_length=lengths[0]) == [prompts[0]]
    assert torch.equal(prompt_uniforms("a", 0, 5), prompt_uniforms("a", 0, 5))
    assert not torch.equal(prompt_uniforms("a", 0, 5), prompt_uniforms("b", 0, 5))


def test_fluency_names_both_protocols(tiny_model, tokenizer):
    lm = tiny_model("llama")
    rec = score_counterfact(lm.model, tokenizer, [REQ], fluency=True, generated=False, fluency_seed=3)[0]
    again = score_counterfact(lm.model, tokenizer, [REQ], fluency=True, generated=False, fluency_seed=3)[0]
    assert rec["fluency"] == again["fluency"] and rec["fluency"] > 0 and rec["fluency_greedy"] >= 0
    out = aggregate([rec])
    assert "ROME" in out["protocol"]["fluency"] and "greedy" in out["protocol"]["fluency_greedy"]
    nested = EditRequest(REQ.prompt, REQ.subject, REQ.target_new, REQ.target_true,
                         extras={"generation_prompts": ["Danielle Darrieux's", "Darrieux was"]})
    assert counterfact.generation_prompts(nested) == ["Danielle Darrieux's", "Darrieux was"]
    assert counterfact.generation_prompts(REQ) == [REQ.prompt]


# ---------------------------------------------------------------- result files written before the split

OLD_CF = {"task": "counterfact", "model": "m", "method": "memit", "n": 10, "batch_size": 10, "sequential": False,
          "config": {}, "protocol": "success rate by probability comparison (summed target log-prob, teacher-forced)",
          "metrics": {"efficacy": 0.9, "generalization": 0.8, "specificity": 0.6, "edit_score": 0.75,
                      "efficacy_magnitude": 0.3, "fluency": 4.5, "n": 10},
          "baseline": {"efficacy": 0.4, "generalization": 0.4, "specificity": 0.6, "edit_score": 0.45},
          "timing": {"seconds_per_edit": 1.0}}


def test_old_results_read_under_the_summed_keys():
    new = upgrade_legacy(OLD_CF)
    assert new["metrics"] == {"efficacy_summed": 0.9, "generalization_summed": 0.8, "specificity_summed": 0.6,
                              "edit_score_summed": 0.75, "efficacy_magnitude_summed": 0.3, "fluency_greedy": 4.5,
                              "n": 10}
    assert new["baseline"]["efficacy_summed"] == 0.4 and "efficacy" not in new["baseline"]
    assert set(new["protocol"]) == {k for k in new["metrics"] if k != "n"}
    old_zsre = {"task": "zsre", "protocol": "token-level top-1 accuracy (teacher-forced); locality = top-1 agreement "
                "with the unedited model", "metrics": {"efficacy": 0.5, "locality": 0.9, "edit_score": 0.6},
                "baseline": {}}
    assert upgrade_legacy(old_zsre)["metrics"] == {"efficacy": 0.5, "locality": 0.9, "edit_score_locality": 0.6}
    assert upgrade_legacy(new) is new  # today's results are left as they are


def test_report_puts_old_numbers_in_the_summed_columns(tmp_path):
    from lmedit.evaluate.report import build_report

    current = {**OLD_CF, "method": "rome", "protocol": {"efficacy": "per token", "efficacy_summed": "summed"},
               "metrics": {"efficacy": 0.95, "generalization": 0.9, "specificity": 0.5, "edit_score": 0.7,
                           "efficacy_summed": 0.91, "generalization_summed": 0.81, "specificity_summed": 0.61,
                           "edit_score_summed": 0.76},
               "baseline": {"efficacy": 0.3, "generalization": 0.3, "specificity": 0.7, "edit_score": 0.4,
                            "efficacy_summed": 0.4, "generalization_summed": 0.4, "specificity_summed": 0.6,
                            "edit_score_summed": 0.45}}
    paths = [tmp_path / "old.json", tmp_path / "new.json"]
    paths[0].write_text(json.dumps(OLD_CF))
    paths[1].write_text(json.dumps(current))
    md = build_report(paths, tmp_path / "rep").read_text()
    header = next(l for l in md.splitlines() if l.startswith("| method |"))
    assert header.split(" | ")[1:5] == ["efficacy", "generalization", "specificity", "edit_score"]
    assert "efficacy_summed" in header and "fluency_greedy" in header
    old_row = next(l for l in md.splitlines() if l.startswith("| memit"))
    assert old_row.split(" | ")[1:6] == ["–", "–", "–", "–", "0.900"]  # never shown as the per-token efficacy
    assert "- `efficacy`: per token" in md  # each column's convention, from the results' own protocol
    assert "- `efficacy_summed`: share of prompts with P(new) > P(true) by summed target log-prob" in md


def test_merge_refuses_old_shards():
    from lmedit.errors import InputError
    from lmedit.evaluate.shards import merge_shards

    old = {**OLD_CF, "shard": {"index": 1, "of": 1}, "baseline_records": [], "records": []}
    with pytest.raises(InputError, match="before every metric named its protocol"):
        merge_shards([old], ["old.json"])
