"""Teacher-forced scoring and CounterFact metrics, on a tiny random Llama with the real SmolLM2 tokenizer."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmedit.errors import InputError
from lmedit.evaluate import counterfact
from lmedit.evaluate.counterfact import aggregate, harmonic_mean, score_counterfact
from lmedit.evaluate.scoring import PairScore, continuation_logprobs, sum_logprob, top1_match, top1_tokens
from lmedit.locate.batching import body
from lmedit.locate.prompts import encode, encode_continuation
from lmedit.requests import EditRequest, join_prompt_target


@pytest.fixture(scope="module")
def tokenizer():
    from lmedit.models import load_model

    return load_model("smollm2-135m").tokenizer  # creates the cached copy when it is missing


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    m = LlamaForCausalLM(config).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


PAIRS = [
    ("The capital of France is", "Paris"),  # one token
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),  # several tokens
    ("Where Danielle Darrieux is from, people speak the language of", "English"),
    ("Michel Rocard is a native speaker of", "French"),
    ("A", "the Eiffel Tower in the middle of the city"),
    ("The capital of France is ", "Paris"),  # the prompt already ends with a space
]


def direct(model, tokenizer, prompt, target):
    """Reference: one unpadded row through the whole model, log_softmax over the full logits."""
    p, cont = join_prompt_target(prompt, target)
    pid, tid = encode(tokenizer, p), encode_continuation(tokenizer, cont)
    ids = torch.tensor([pid + tid[:-1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    pos = torch.arange(len(pid) - 1, len(pid) - 1 + len(tid))
    logp = logits[pos].log_softmax(-1)
    return logp[torch.arange(len(tid)), torch.tensor(tid)].tolist(), logits[pos].argmax(-1).tolist(), tid


def test_matches_direct_full_model_computation(model, tokenizer):
    got = continuation_logprobs(model, tokenizer, PAIRS, batch_size=64)
    lengths = [len(encode_continuation(tokenizer, join_prompt_target(p, t)[1])) for p, t in PAIRS]
    assert lengths[0] == 1 and lengths[1] > 1 and lengths[4] > 3  # single- and multi-token targets covered
    for (prompt, target), row, n in zip(PAIRS, got, lengths):
        ref, _, _ = direct(model, tokenizer, prompt, target)
        assert len(row) == n
        assert row == pytest.approx(ref, abs=1e-5)
        assert all(v < 0 for v in row)


def test_batch_size_does_not_change_numbers(model, tokenizer):
    pairs = PAIRS * 2 + [(p, "Rome") for p, _ in PAIRS]
    results = {bs: continuation_logprobs(model, tokenizer, pairs, batch_size=bs) for bs in (1, 3, 64)}
    for bs in (3, 64):
        for a, b in zip(results[1], results[bs]):
            assert len(a) == len(b)
            assert a == pytest.approx(b, abs=1e-5)
    sums = sum_logprob(model, tokenizer, pairs, batch_size=3)
    assert sums == pytest.approx([sum(r) for r in results[1]], abs=1e-5)


def test_top1_tokens_and_match(model, tokenizer):
    tokens = top1_tokens(model, tokenizer, PAIRS, batch_size=2)
    matches = top1_match(model, tokenizer, PAIRS, batch_size=5)
    for (prompt, target), tok, match in zip(PAIRS, tokens, matches):
        _, ref_top1, tid = direct(model, tokenizer, prompt, target)
        assert tok == ref_top1
        assert match == [a == b for a, b in zip(ref_top1, tid)]
    # A target made of the model's own argmax tokens matches everywhere it is teacher-forced.
    prompt = "The capital of France is"
    first = top1_tokens(model, tokenizer, [(prompt, "Paris")])[0][0]
    own = tokenizer.decode([first])
    p, cont = join_prompt_target(prompt, own)
    if encode_continuation(tokenizer, cont) == [first]:  # the decoded token re-encodes to itself
        assert top1_match(model, tokenizer, [(prompt, own)]) == [[True]]


def test_repeated_pairs_are_scored_once_with_the_right_values(model, tokenizer):
    rows_seen = []
    handle = body(model).register_forward_hook(lambda mod, args, kwargs, out: rows_seen.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        a, b = PAIRS[0], PAIRS[1]
        pairs = [a, b, a, a, b, a]
        got = continuation_logprobs(model, tokenizer, pairs, batch_size=64)
    finally:
        handle.remove()
    # one pass over the distinct prompts' prefixes, one over the two distinct pairs' continuations
    assert rows_seen[-1] == 2 and sum(rows_seen) <= 4
    ref_a, ref_b = direct(model, tokenizer, *a)[0], direct(model, tokenizer, *b)[0]
    for pair, row in zip(pairs, got):
        assert row == pytest.approx(ref_a if pair == a else ref_b, abs=1e-5)
    assert continuation_logprobs(model, tokenizer, []) == []


def test_scoring_leaves_the_model_mode_and_rejects_bad_batch_size(model, tokenizer):
    model.train()
    try:
        continuation_logprobs(model, tokenizer, PAIRS[:1])
        assert model.training
    finally:
        model.eval()
    with pytest.raises(InputError):
        continuation_logprobs(model, tokenizer, PAIRS, batch_size=0)


# ---------------------------------------------------------------- CounterFact metrics


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5, 0.5]) == pytest.approx(0.6)
    assert harmonic_mean([0.8, 0.8]) == pytest.approx(0.8)
    assert harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    assert harmonic_mean([]) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean([1.0, -0.5])


def test_aggregate_hand_made_records():
    records = [
        {"case_id": 0, "skipped": False, "efficacy": 1.0, "generalization": 1.0, "specificity": 0.0,
         "efficacy_magnitude": 0.2, "generalization_magnitude": 0.1, "specificity_magnitude": -0.1},
        {"case_id": 1, "skipped": False, "efficacy": 1.0, "generalization": 0.0, "specificity": 1.0,
         "efficacy_magnitude": 0.4, "generalization_magnitude": -0.3, "specificity_magnitude": 0.3},
        {"case_id": 2, "skipped": True, "reason": "no target_true"},
    ]
    out = aggregate(records)
    assert out["efficacy"] == 1.0 and out["generalization"] == 0.5 and out["specificity"] == 0.5
    assert out["edit_score"] == pytest.approx(0.6)
    assert out["efficacy_magnitude"] == pytest.approx(0.3)
    assert out["generalization_magnitude"] == pytest.approx(-0.1)
    assert out["specificity_magnitude"] == pytest.approx(0.1)
    assert out["n"] == 2 and out["skipped"] == 1
    assert "mean per-token target log-prob" in out["protocol"]["efficacy"]  # ROME/MEMIT's convention
    assert out["efficacy_summed"] is None and out["edit_score_summed"] is None  # these records have no summed rates
    zero = aggregate([{**records[0], "generalization": 0.0}])
    assert zero["edit_score"] == 0.0


REQ = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French",
                  ("Where Danielle Darrieux is from, people speak the language of",
                   "Danielle Darrieux spoke the language"),
                  (("Michel Rocard is a native speaker of", "French"),
                   ("Jacques Chirac, speaker of", "German")), case_id=7)


def test_success_follows_the_probability_comparison(monkeypatch):
    # Fake log-probs by (prompt, target): the edit wins on the prompt and one paraphrase, loses on the other;
    # one neighbour keeps its answer, the other is taken over by the new target. Every target is one token here,
    # so the mean per-token (headline) and summed conventions agree (tests/test_protocols.py has them disagree).
    table = {
        (REQ.prompt, "English"): math.log(0.6), (REQ.prompt, "French"): math.log(0.1),
        (REQ.paraphrases[0], "English"): math.log(0.3), (REQ.paraphrases[0], "French"): math.log(0.2),
        (REQ.paraphrases[1], "English"): math.log(0.1), (REQ.paraphrases[1], "French"): math.log(0.5),
        ("Michel Rocard is a native speaker of", "English"): math.log(0.05),
        ("Michel Rocard is a native speaker of", "French"): math.log(0.7),
        ("Jacques Chirac, speaker of", "English"): math.log(0.4),
        ("Jacques Chirac, speaker of", "German"): math.log(0.2),
    }
    monkeypatch.setattr(counterfact, "score_pairs", lambda m, t, pairs, **kw: [
        PairScore((0,), (table[p],), (0,)) for p in pairs])
    reversed_req = EditRequest(REQ.prompt, REQ.subject, "French", "English", case_id=8)
    no_true = EditRequest(REQ.prompt, REQ.subject, "English", None, case_id=9)
    rec, rev, skipped = score_counterfact(None, None, [REQ, reversed_req, no_true], generated=False)
    for suffix in ("", "_summed"):
        for key in ("efficacy", "generalization", "specificity"):
            assert rec[f"{key}{suffix}"] == rec[key] and rec[f"{key}_magnitude{suffix}"] == rec[f"{key}_magnitude"]
    assert rec["case_id"] == 7 and not rec["skipped"]
    assert rec["efficacy"] == 1.0 and rec["efficacy_magnitude"] == pytest.approx(0.5)
    assert rec["generalization"] == 0.5
    assert rec["generalization_magnitude"] == pytest.approx(((0.3 - 0.2) + (0.1 - 0.5)) / 2)
    assert rec["specificity"] == 0.5
    assert rec["specificity_magnitude"] == pytest.approx(((0.7 - 0.05) + (0.2 - 0.4)) / 2)
    assert rec["prompt"]["logp_new"] == pytest.approx(math.log(0.6))
    assert rec["neighborhood"][1]["logp_true"] == pytest.approx(math.log(0.2))
    # The same prompt with new and true swapped: P(new) < P(true) is a failure.
    assert rev["efficacy"] == 0.0 and rev["efficacy_magnitude"] == pytest.approx(-0.5)
    assert rev["generalization"] is None and rev["specificity"] is None
    assert skipped == {"case_id": 9, "skipped": True,
                       "reason": "no target_true: P(new) > P(true) cannot be compared"}
    out = aggregate([rec, rev, skipped])
    assert out["n"] == 2 and out["skipped"] == 1
    assert out["efficacy"] == 0.5 and out["generalization"] == 0.5 and out["specificity"] == 0.5
    assert out["edit_score"] == pytest.approx(0.5)


def test_score_counterfact_on_a_model(model, tokenizer):
    records = score_counterfact(model, tokenizer, [REQ, REQ], batch_size=3)
    assert records[0] == records[1]
    rec = records[0]
    ref = sum_logprob(model, tokenizer, [(REQ.prompt, "English"), (REQ.prompt, "French"),
                                         (REQ.neighborhood[1][0], "English"), (REQ.neighborhood[1][0], "German")],
                      batch_size=1)
    assert rec["prompt"]["logp_new"] == pytest.approx(ref[0], abs=1e-5)
    assert rec["prompt"]["logp_true"] == pytest.approx(ref[1], abs=1e-5)
    assert rec["efficacy_summed"] == float(ref[0] > ref[1])
    per_token = continuation_logprobs(model, tokenizer, [(REQ.prompt, "English"), (REQ.prompt, "French")],
                                      batch_size=1)
    means = [sum(lp) / len(lp) for lp in per_token]
    assert rec["prompt"]["mean_logp_new"] == pytest.approx(means[0], abs=1e-5)
    assert rec["efficacy"] == float(means[0] > means[1])
    assert rec["neighborhood"][1]["logp_new"] == pytest.approx(ref[2], abs=1e-5)
    assert rec["neighborhood"][1]["logp_true"] == pytest.approx(ref[3], abs=1e-5)
    assert len(rec["paraphrases"]) == 2 and len(rec["neighborhood"]) == 2
    out = aggregate(records)
    assert out["n"] == 2 and set(out) >= {"efficacy", "generalization", "specificity", "edit_score"}


def test_ngram_entropy_known_values():
    from lmedit.evaluate.fluency import ngram_entropy

    # "a b a b a b": bigrams {ab: 3, ba: 2} and trigrams {aba: 2, bab: 2}
    h2 = -(3 / 5) * math.log2(3 / 5) - (2 / 5) * math.log2(2 / 5)
    h3 = 1.0
    assert abs(ngram_entropy("a b a b a b") - (2 / 3 * h2 + 4 / 3 * h3) / 2) < 1e-12
    assert ngram_entropy("rome rome rome rome rome") == 0.0  # a model that repeats itself scores 0
    assert ngram_entropy("the cat sat on the mat and looked at the dog") > ngram_entropy("a b a b a b")


def test_greedy_continuations_are_padding_invariant(model, tokenizer):
    from lmedit.evaluate.fluency import greedy_continuations

    prompts = ["The capital of France is", "Danielle Darrieux's mother tongue is"]
    together = greedy_continuations(model, tokenizer, prompts, max_new_tokens=5)
    alone = [greedy_continuations(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone


def test_targets_of_one_prompt_share_its_forward(model, tokenizer):
    """Three targets of one prompt: the whole prompt runs once (1 row) and predicts every target's first token;
    only the targets of two tokens or more run again, on its cache."""
    from lmedit.locate.prompts import encode_continuation, join_prompt_target

    rows_seen = []
    handle = body(model).register_forward_hook(lambda mod, args, kwargs, out: rows_seen.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    prompt = "The capital of France is"
    pairs = [(prompt, "Paris"), (prompt, "Rome"), (prompt, "the city of Rome and Milan")]
    lengths = [len(encode_continuation(tokenizer, join_prompt_target(prompt, t)[1])) for _, t in pairs]
    assert lengths[2] > 1  # the suffix pass is exercised
    try:
        got = continuation_logprobs(model, tokenizer, pairs)
    finally:
        handle.remove()
    assert rows_seen == [1, sum(n > 1 for n in lengths)]
    for pair, row in zip(pairs, got):
        assert row == pytest.approx(direct(model, tokenizer, *pair)[0], abs=1e-5)
