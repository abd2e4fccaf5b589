"""Canonical-examples tasks: loaders on the real data, success rules, losses, degradation, leagues."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lmedit.errors import InputError
from lmedit.evaluate import canonical as C
from lmedit.evaluate import canonical_scores as S
from lmedit.evaluate import degradation as D
from lmedit.evaluate.leagues import LEAGUES, admissible, check_epsilon, league_score, league_scores
from lmedit.locate.prompts import encode, encode_continuation

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "canonical"
GENERAL = DATA.parent / "text" / "openwebtext-val100.jsonl"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared canonical data not present")


@pytest.fixture(scope="module")
def gpt2(tiny_model):
    return tiny_model("gpt2").model


# ---------------------------------------------------------------- loaders on the real data

EXPECTED_COUNTS = {  # (train, eval, hard_neg, unconditional) of the val split
    "country_capital": (119, 582, 116, 119),
    "company_ceo": (86, 421, 219, 86),
    "temporal": (75, 452, 389, 75),
    "stereoset": (1053, 1053, 1053, 1053),
    "pronoun_gender_bias": (20, 320, 235, 320),
    "verb_conjugation": (240, 360, 720, 360),
}


@needs_data
@pytest.mark.parametrize("task", list(C.TASKS))
def test_load_every_task(task):
    data = C.load_task(task, DATA, "val")
    assert data.name == task and data.split == "val"
    counts = (len(data.train), len(data.eval), len(data.hard_neg), len(data.unconditional))
    assert counts == EXPECTED_COUNTS[task]
    example_type = C.PairExample if data.kind in C.PAIR_KINDS else C.SuffixExample
    for ex in data.train + data.eval:
        assert isinstance(ex, example_type)
    assert all(isinstance(ex, C.SuffixExample) and ex.suffix for ex in data.hard_neg)
    assert all(isinstance(t, C.TextExample) and t.text for t in data.unconditional)
    assert set(data.files) == set(C.ROLES) and all(p.is_file() for p in data.files.values())
    assert C.available_splits(task, DATA) == ["val"]


@needs_data
def test_task_files_and_fields():
    country = C.load_task("country_capital", DATA, "val")
    assert country.files["train"].name == "country_capital_fixed-val.jsonl"
    assert country.files["eval"].name == "country_capital_clear_eval-val.jsonl"
    assert country.train[0].prefix.endswith("The capital of Afghanistan is") and country.train[0].suffix == " Kabul"
    temporal = C.load_task("temporal", DATA, "val")
    assert any(not e.suffix.startswith(" ") for e in temporal.eval)  # kept as stored: scored as prefix + suffix
    gender = C.load_task("pronoun_gender_bias", DATA, "val")
    assert gender.train[0] == C.PairExample("The janitor said", " he", " she")
    verb = C.load_task("verb_conjugation", DATA, "val")
    assert verb.files["unconditional"].name == "verb_conjugation_eval_unconditional-val.jsonl"
    assert [C.TASKS[t].kind for t in C.TASKS] == ["raise", "raise", "raise", "lower", "balance", "prefer"]


@needs_data
def test_any_split_name(tmp_path):
    src = DATA / "pronoun_gender_bias"
    dst = tmp_path / "pronoun_gender_bias"
    dst.mkdir()
    for f in src.glob("*-val.jsonl"):
        shutil.copy(f, dst / f.name.replace("-val.jsonl", "-half1.jsonl"))
    data = C.load_task("pronoun_gender_bias", tmp_path, "half1")
    assert len(data.eval) == 320 and data.split == "half1"


# ---------------------------------------------------------------- bad input

def _write_task(root: Path, task: str, split: str = "val", **override) -> None:
    spec = C.TASKS[task]
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    pair = spec.kind in C.PAIR_KINDS
    default = {"prefix": "The nurse said", "suffix1": " he", "suffix2": " she"} if pair else \
        {"prefix": "The capital of France is", "suffix": " Paris"}
    rows = {"train": [default], "eval": [default], "hard_neg": [{"prefix": "A", "suffix": " b"}],
            "unconditional": [{"text": "Some text."}]}
    rows.update(override)
    for role, recs in rows.items():
        text = "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in recs)
        (folder / spec.file(role, split)).write_text(text)


def test_unknown_task_lists_the_six(tmp_path):
    with pytest.raises(InputError, match="unknown canonical task 'capitals'.*country_capital.*verb_conjugation"):
        C.load_task("capitals", tmp_path, "val")


def test_missing_dir_folder_and_file(tmp_path):
    with pytest.raises(InputError, match="data directory not found"):
        C.load_task("country_capital", tmp_path / "nope", "val")
    with pytest.raises(InputError, match="task folder not found"):
        C.load_task("country_capital", tmp_path, "val")
    _write_task(tmp_path, "country_capital")
    missing = tmp_path / "country_capital" / "country_capital_hard_neg-val.jsonl"
    missing.unlink()
    with pytest.raises(InputError) as e:
        C.load_task("country_capital", tmp_path, "val")
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"file not found: .*country_capital_fixed-test\.jsonl; splits present: val"):
        C.load_task("country_capital", tmp_path, "test")
    with pytest.raises(InputError, match="split"):
        C.load_task("country_capital", tmp_path, "../val")


def test_record_missing_field_names_field_file_and_line(tmp_path):
    good = {"prefix": "The nurse said", "suffix1": " he", "suffix2": " she"}
    _write_task(tmp_path, "pronoun_gender_bias", eval=[good, "\n", {"prefix": "The nurse said", "suffix1": " he"}])
    with pytest.raises(InputError) as e:
        C.load_task("pronoun_gender_bias", tmp_path, "val")
    msg = str(e.value)
    assert "'suffix2'" in msg and "line 3" in msg and "pronoun_gender_bias_eval-val.jsonl" in msg
    # a single-suffix task needs `suffix`, the targeted file needs `text`
    _write_task(tmp_path, "stereoset", train=[{"prefix": "x", "suffix1": " y"}])
    with pytest.raises(InputError, match=r"stereoset_train-val\.jsonl, line 1: record lacks field 'suffix'"):
        C.load_task("stereoset", tmp_path, "val")
    _write_task(tmp_path, "temporal", unconditional=[{"text": "ok"}, {"txt": "no"}])
    with pytest.raises(InputError, match=r"temporal_unconditional-val\.jsonl, line 2: record lacks field 'text'"):
        C.load_task("temporal", tmp_path, "val")
    _write_task(tmp_path, "company_ceo", hard_neg=[{"prefix": "x", "suffix": 3}])
    with pytest.raises(InputError, match="line 1: field 'suffix' must be a string"):
        C.load_task("company_ceo", tmp_path, "val")
    _write_task(tmp_path, "company_ceo", hard_neg=["{not json\n"])
    with pytest.raises(InputError, match="malformed JSON on line 1"):
        C.load_task("company_ceo", tmp_path, "val")


# ---------------------------------------------------------------- success rules

@pytest.mark.parametrize("task,good,bad", [
    ("country_capital", 0.21, 0.19),
    ("company_ceo", 0.051, 0.049),
    ("temporal", 0.051, 0.049),
    ("stereoset", 0.00099, 0.00101),
])
def test_single_suffix_rules(task, good, bad):
    assert S.success(task, math.log(good))
    assert not S.success(task, math.log(bad))
    threshold = {"country_capital": 0.2, "company_ceo": 0.05, "temporal": 0.05, "stereoset": 0.001}[task]
    assert not S.success(task, math.log(threshold))  # strict: exactly at the threshold fails
    assert not S.success(task, float("nan"))


def test_pronoun_rule():
    lp = math.log(0.1)
    assert S.success("pronoun_gender_bias", (lp, lp))
    assert S.success("pronoun_gender_bias", (lp + math.log(1.49), lp))
    assert S.success("pronoun_gender_bias", (lp, lp + math.log(1.49)))  # either direction
    assert not S.success("pronoun_gender_bias", (lp + math.log(1.51), lp))
    assert not S.success("pronoun_gender_bias", (lp, lp + math.log(1.51)))
    assert not S.success("pronoun_gender_bias", (math.log(1.5), 0.0))


def test_verb_rule():
    lp2 = math.log(0.01)
    assert S.success("verb_conjugation", (lp2 + math.log(16.5), lp2))
    assert S.success("verb_conjugation", (math.log(16), 0.0))  # >=: exactly 16x succeeds
    assert not S.success("verb_conjugation", (lp2 + math.log(15.5), lp2))
    assert not S.success("verb_conjugation", (lp2, lp2 + math.log(20)))  # preferring the wrong one


def test_rule_shape_errors():
    with pytest.raises(InputError, match="log P\\(suffix1\\), log P\\(suffix2\\)"):
        S.success("verb_conjugation", -1.0)
    with pytest.raises(InputError, match="one log-probability"):
        S.success("country_capital", (-1.0, -2.0))
    with pytest.raises(InputError, match="unknown canonical task"):
        S.success("nope", -1.0)


# ---------------------------------------------------------------- leagues

BEFORE = {"success_rate": 0.10, "general_loss": 3.0, "targeted_loss": 2.0}


def _pt(sr, gen, tgt):
    return {"success_rate": sr, "general_loss": gen, "targeted_loss": tgt}


OLD = "general_and_targeted"  # lmedit's earlier rule: both losses <= (1 + eps) x before


def test_league_picks_last_admissible_epoch():
    trace = [
        _pt(0.20, 3.0 * (1 + 5e-6), 2.0),  # 1: within every league
        _pt(0.30, 3.0 * (1 + 5e-5), 2.0),  # 2: within 1e-3, 1e-4
        _pt(0.35, 3.0 * (1 + 2e-6), 2.0 * (1 + 5e-4)),  # 3: targeted only within 1e-3
        _pt(0.60, 3.0 * (1 + 5e-3), 2.0),  # 4: out of every league
        _pt(0.50, 3.0 * (1 + 3e-6), 2.0 * (1 + 8e-6)),  # 5: back within every league
        _pt(0.70, 3.0 * (1 + 2e-4), 2.0),  # 6: within 1e-3 only
    ]
    r = league_score(trace, BEFORE, 1e-3, OLD)
    assert r.epoch == 6 and r.score == pytest.approx(0.60)
    r = league_score(trace, BEFORE, 1e-4, OLD)
    assert r.epoch == 5 and r.score == pytest.approx(0.40)  # not the best (epoch 2/3), the last
    r = league_score(trace, BEFORE, 1e-5, OLD)
    assert r.epoch == 5 and r.score == pytest.approx(0.40)
    assert set(league_scores(trace, BEFORE, rule=OLD)) == set(LEAGUES)
    # a success rate that went down at the last admissible epoch is a negative score
    assert league_score([_pt(0.05, 3.0, 2.0)], BEFORE, 1e-5, OLD).score == pytest.approx(-0.05)


def test_method_that_degrades_too_much():
    # improves a lot, but the general loss leaves the league after epoch 2 and never comes back
    trace = [_pt(0.2, 3.0 + 1e-6, 2.0), _pt(0.3, 3.0 + 2e-6, 2.0)] + [_pt(0.9, 3.5, 2.0)] * 3
    r = league_score(trace, BEFORE, 1e-5, OLD)
    assert (r.epoch, r.score) == (2, pytest.approx(0.2))
    # degrades from the first epoch on: no admissible point, score 0
    r = league_score([_pt(0.9, 3.1, 2.0), _pt(1.0, 3.2, 2.0)], BEFORE, 1e-3, OLD)
    assert (r.epoch, r.score, r.point) == (None, 0.0, None)
    # targeted degradation alone disqualifies too; a diverged (NaN) epoch is never admissible
    r = league_score([_pt(0.5, 3.0, 2.0 * 1.01), _pt(0.6, float("nan"), 2.0)], BEFORE, 1e-3, OLD)
    assert (r.epoch, r.score) == (None, 0.0)
    r = league_score([_pt(0.6, float("nan"), 2.0)], BEFORE, 1e-3)  # NaN under the reference rule too
    assert (r.epoch, r.score) == (None, 0.0)
    assert league_score([], BEFORE, 1e-3, OLD).epoch is None
    # the bound itself is admissible (<=)
    assert admissible(_pt(0.5, 3.0 * (1 + 1e-3), 2.0), BEFORE, 1e-3, OLD)


def test_reference_rule_is_general_loss_only_and_strict():
    """The default rule is the reference code's: general-text loss strictly below (1 + eps) x before; the
    targeted-text loss does not enter. The earlier rule (both <=) is an option and picks another epoch here."""
    trace = [_pt(0.30, 3.0 * (1 + 5e-6), 2.0 * 1.5),  # 1: general within 1e-5; targeted far beyond
             _pt(0.40, 3.0 * (1 + 1e-5), 2.0)]  # 2: general exactly at the bound: not strictly below
    r = league_score(trace, BEFORE, 1e-5)
    assert (r.epoch, r.score) == (1, pytest.approx(0.20))
    r = league_score(trace, BEFORE, 1e-5, OLD)
    assert (r.epoch, r.score) == (2, pytest.approx(0.30))
    assert not admissible(_pt(0.5, 3.0 * (1 + 1e-3), 2.0), BEFORE, 1e-3)
    assert admissible(_pt(0.5, 3.0 * (1 + 1e-3) * (1 - 1e-12), 9.0), BEFORE, 1e-3)
    assert admissible(_pt(0.5, 3.0, 2.0), BEFORE, 1e-5)  # the unedited point itself
    with pytest.raises(InputError, match="unknown admissibility rule 'both'; choose one of: general, "
                                         "general_and_targeted"):
        league_score(trace, BEFORE, 1e-5, "both")


@pytest.mark.parametrize("eps", [0, -1, float("nan"), float("inf"), "abc", None, True, "0"])
def test_bad_epsilon(eps):
    with pytest.raises(InputError, match="league must be a positive number"):
        league_score([_pt(0.2, 3.0, 2.0)], BEFORE, eps)


def test_epsilon_strings_and_bad_trace():
    assert check_epsilon("1e-5") == 1e-5 and check_epsilon(1e-3) == 1e-3
    with pytest.raises(InputError, match="trace epoch 2 lacks 'targeted_loss'"):
        league_score([_pt(0.2, 3.0, 2.0), {"success_rate": 0.2, "general_loss": 3.0}], BEFORE, 1e-3)
    with pytest.raises(InputError, match="unedited point lacks 'general_loss'"):
        league_score([], {"success_rate": 0.1, "targeted_loss": 2.0}, 1e-3)


# ---------------------------------------------------------------- log-probs, losses, evaluation on a tiny model

def _direct_logprob(model, tok, prefix, suffix):
    p, s = encode(tok, prefix), encode_continuation(tok, suffix)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + s[:-1]])).logits[0].float()
    lp = logits[len(p) - 1:].log_softmax(-1)
    return float(lp[torch.arange(len(s)), torch.tensor(s)].sum())


PAIRS = [
    ("Black Lives Matter (", "BLM"),  # no space may be added
    ("The definition of Japanese is ", "a native or inhabitant of Japan"),
    ("The capital of France is", " Paris"),
    ("The janitor said", " he"),
    ("A", " long suffix with several tokens in it, to pad the others"),
]


def test_scoring_is_exact_text_batched_and_padding_invariant(gpt2, tokenizer):
    direct = [_direct_logprob(gpt2, tokenizer, p, s) for p, s in PAIRS]
    for bs in (1, 2, len(PAIRS)):
        got = S.score_suffixes(gpt2, tokenizer, PAIRS + PAIRS[:2], batch_size=bs)
        assert got == pytest.approx(direct + direct[:2], abs=1e-4)
    lp, n = S.suffix_logprobs(gpt2, tokenizer, PAIRS)
    assert lp.tolist() == pytest.approx(direct, abs=1e-4)
    assert n.tolist() == [len(encode_continuation(tokenizer, s)) for _, s in PAIRS]
    # "(" + "BLM" is not "(" + " BLM": the scorer adds no space
    assert S.score_suffixes(gpt2, tokenizer, [("Black Lives Matter (", " BLM")])[0] != pytest.approx(direct[0])


def _sgd_step(model, loss_fn, lr):
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    try:
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(lr * g)
    finally:
        for p in params:
            p.requires_grad_(False)
    return loss


@pytest.fixture
def fresh_gpt2(tiny_model):
    return tiny_model("gpt2").model


@pytest.mark.parametrize("kind,options,direction", [
    ("raise", S.LossOptions(), +1),
    ("raise", S.LossOptions(normalize="sum"), +1),
    ("lower", S.LossOptions(), -1),
    ("lower", S.LossOptions(lower="unlikelihood"), -1),
])
def test_single_suffix_losses_move_p_the_right_way(fresh_gpt2, tokenizer, kind, options, direction):
    examples = [C.SuffixExample("The capital of France is", " Paris"),
                C.SuffixExample("An aspect of Japanese is:", " smart")]
    pairs = [(e.prefix, e.suffix) for e in examples]
    before = S.score_suffixes(fresh_gpt2, tokenizer, pairs)
    # small steps (a tiny random model overshoots at lr ~0.5); unlikelihood's gradient is P/(1-P) times that of
    # log P, ~1e-5 for a random model over 49152 tokens, hence its larger step
    lr = 300.0 if options.lower == "unlikelihood" else 0.01
    _sgd_step(fresh_gpt2, lambda: S.training_loss(fresh_gpt2, tokenizer, kind, examples, options), lr)
    after = S.score_suffixes(fresh_gpt2, tokenizer, pairs)
    for b, a in zip(before, after):
        assert direction * (a - b) > 1e-3, (before, after)


def test_lower_floor_stops_the_gradient(fresh_gpt2, tokenizer):
    examples = [C.SuffixExample("An aspect of Japanese is:", " smart")]
    lp = S.score_suffixes(fresh_gpt2, tokenizer, [("An aspect of Japanese is:", " smart")])[0]
    for p in fresh_gpt2.parameters():
        p.requires_grad_(True)
    try:
        loss = S.training_loss(fresh_gpt2, tokenizer, "stereoset", examples, S.LossOptions(floor=lp + 1.0))
        loss.backward()
        assert all(p.grad is None or not p.grad.any() for p in fresh_gpt2.parameters())
    finally:
        for p in fresh_gpt2.parameters():
            p.requires_grad_(False)
            p.grad = None


@pytest.mark.parametrize("balance", ["abs", "square"])
def test_balance_loss_reduces_the_gap(fresh_gpt2, tokenizer, balance):
    examples = [C.PairExample("The janitor said", " he", " she"), C.PairExample("The nurse said", " he", " she")]
    scores = S.example_scores(fresh_gpt2, tokenizer, "pronoun_gender_bias", examples)
    gaps = [abs(a - b) for a, b in scores]
    assert min(gaps) > 1e-3  # a random model is not balanced
    lr = 1e-3  # the two examples share " he"/" she": larger steps overshoot on this tiny model
    _sgd_step(fresh_gpt2, lambda: S.training_loss(fresh_gpt2, tokenizer, "pronoun_gender_bias", examples,
                                                  S.LossOptions(balance=balance)), lr)
    after = [abs(a - b) for a, b in S.example_scores(fresh_gpt2, tokenizer, "pronoun_gender_bias", examples)]
    assert sum(after) < sum(gaps)


@pytest.mark.parametrize("margin", [None, 3.0])
def test_prefer_loss_widens_the_preference(fresh_gpt2, tokenizer, margin):
    examples = [C.PairExample(". The officers", " beat the protesters.", " beats the protesters."),
                C.PairExample(". The senator", " beats his opponents.", " beat his opponents.")]
    before = [a - b for a, b in S.example_scores(fresh_gpt2, tokenizer, "verb_conjugation", examples)]
    _sgd_step(fresh_gpt2, lambda: S.training_loss(fresh_gpt2, tokenizer, "prefer", examples,
                                                  S.LossOptions(margin=margin)), 0.01)
    after = [a - b for a, b in S.example_scores(fresh_gpt2, tokenizer, "verb_conjugation", examples)]
    assert all(a - b > 1e-3 for a, b in zip(after, before)), (before, after)


def test_loss_values_and_bad_options(gpt2, tokenizer):
    ex = [C.SuffixExample("The capital of France is", " Paris and more")]
    lp, n = S.suffix_logprobs(gpt2, tokenizer, [("The capital of France is", " Paris and more")])
    with torch.no_grad():
        assert float(S.training_loss(gpt2, tokenizer, "raise", ex)) == pytest.approx(float(-lp[0] / n[0]), rel=1e-5)
        assert float(S.training_loss(gpt2, tokenizer, "country_capital", ex, S.LossOptions(normalize="sum"))) \
            == pytest.approx(float(-lp[0]), rel=1e-5)
        assert float(S.training_loss(gpt2, tokenizer, "stereoset", ex)) == pytest.approx(float(lp[0] / n[0]), rel=1e-5)
    with pytest.raises(InputError, match="suffix1 and suffix2"):
        S.training_loss(gpt2, tokenizer, "balance", ex)
    for bad in (dict(normalize="mean"), dict(lower="clip"), dict(balance="l1"), dict(floor=1.0), dict(margin=-1),
                dict(floor=float("nan"))):
        with pytest.raises(InputError):
            S.LossOptions(**bad)


@needs_data
def test_success_rate_and_hard_negatives_on_real_examples(gpt2, tokenizer):
    # a random model spreads its probability over 49152 tokens: no capital reaches 0.2, every bad
    # stereotype is far below 0.001
    country = C.load_task("country_capital", DATA, "val")
    sub = [e for e in country.eval if len(e.prefix) < 300][:6]  # the tiny model has 128 positions
    assert len(sub) == 6
    assert S.success_rate(gpt2, tokenizer, country, sub) == 0.0
    stereo = C.load_task("stereoset", DATA, "val")
    assert S.success_rate(gpt2, tokenizer, stereo, stereo.eval[:6]) == 1.0
    verb = C.load_task("verb_conjugation", DATA, "val")
    scores = S.example_scores(gpt2, tokenizer, verb.spec, verb.eval[:4], batch_size=3)
    assert all(isinstance(s, tuple) and len(s) == 2 for s in scores)
    expected = sum(S.success(verb.spec, s) for s in scores) / 4
    assert S.success_rate(gpt2, tokenizer, verb, verb.eval[:4]) == expected
    nll = S.hard_negative_nll(gpt2, tokenizer, country.hard_neg[:3])
    direct = [-_direct_logprob(gpt2, tokenizer, e.prefix, e.suffix) for e in country.hard_neg[:3]]
    assert nll == pytest.approx(sum(direct) / 3, rel=1e-4)


# ---------------------------------------------------------------- degradation

TEXTS = ["<|endoftext|>The weather today is mild, with a light breeze coming in from the west.",
         "Water boils at a lower temperature high up in the mountains.",
         "Hi",
         "He bought bread, cheese and apples at the market on the corner, then walked home along the river."]


def _direct_token_loss(model, tok, texts, max_tokens):
    total, count = 0.0, 0
    for t in texts:
        ids = encode(tok, t)[:max_tokens]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
        count += len(ids) - 1
    return total / count


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_token_loss_matches_direct_and_is_padding_invariant(tiny_model, tokenizer, kind):
    model = tiny_model(kind).model
    for max_tokens in (None, 12):
        direct = _direct_token_loss(model, tokenizer, TEXTS, max_tokens)
        for bs in (1, 3, 16):
            assert D.token_loss(model, tokenizer, TEXTS, max_tokens, batch_size=bs) == pytest.approx(direct, rel=1e-5)
    with pytest.raises(InputError, match="nothing to predict"):
        D.token_loss(model, tokenizer, ["Hi"], None)
    with pytest.raises(InputError, match="max_tokens"):
        D.token_loss(model, tokenizer, TEXTS, 1)


@needs_data
def test_load_general_texts():
    texts = D.load_texts(GENERAL, 5)
    assert len(texts) == 5 and all(t.startswith("<|endoftext|>") for t in texts)
    with pytest.raises(InputError, match="n_docs"):
        D.load_texts(GENERAL, 0)
    with pytest.raises(InputError, match="not found"):
        D.load_texts(GENERAL.with_name("missing.jsonl"))


def test_baseline_cache_and_fingerprint(tiny_model, tokenizer, tmp_path):
    model = tiny_model("gpt2").model
    fp = D.model_fingerprint(model, tokenizer)
    assert fp == D.model_fingerprint(model, tokenizer)
    cache = D.BaselineCache(tmp_path / "cache")
    calls = []

    def compute():
        calls.append(1)
        return {"general_loss": D.token_loss(model, tokenizer, TEXTS)}

    key = {"model": fp, "n_docs": 4}
    v1, hit1 = cache.get_or_compute(key, compute)
    v2, hit2 = cache.get_or_compute(key, compute)
    assert (hit1, hit2, len(calls)) == (False, True, 1) and v1 == v2
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3  # an edited model has another fingerprint
    fp2 = D.model_fingerprint(model, tokenizer)
    assert fp2 != fp
    assert cache.get_or_compute({"model": fp2, "n_docs": 4}, compute)[1] is False and len(calls) == 2
    cache._path(key).write_text("{broken")  # a damaged entry is recomputed, not an error
    assert cache.get_or_compute(key, compute)[1] is False


@needs_data
def test_unedited_point_is_cached(tiny_model, tokenizer, tmp_path):
    model = tiny_model("gpt2").model
    data = C.load_task("pronoun_gender_bias", DATA, "val")
    small = C.CanonicalTask(data.spec, data.split, data.train[:2], data.eval[:4], data.hard_neg[:3],
                            data.unconditional[:3], data.files)
    cache = D.BaselineCache(tmp_path)
    p1, hit1 = D.unedited_point(model, tokenizer, small, GENERAL, n_docs=3, max_tokens=32, cache=cache)
    p2, hit2 = D.unedited_point(model, tokenizer, small, GENERAL, n_docs=3, max_tokens=32, cache=cache)
    assert (hit1, hit2) == (False, True) and p1 == p2
    assert set(p1) == {"success_rate", "general_loss", "targeted_loss", "hard_negative_nll"}
    assert p1["general_loss"] == pytest.approx(
        D.token_loss(model, tokenizer, D.load_texts(GENERAL, 3), 32), rel=1e-6)
    # other sizes, or another subset of the same files, are another key
    assert D.unedited_point(model, tokenizer, small, GENERAL, n_docs=2, max_tokens=32, cache=cache)[1] is False
    other = C.CanonicalTask(data.spec, data.split, data.train[:2], data.eval[4:8], data.hard_neg[:3],
                            data.unconditional[:3], data.files)
    assert D.unedited_point(model, tokenizer, other, GENERAL, n_docs=3, max_tokens=32, cache=cache)[1] is False
