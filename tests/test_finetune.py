"""Fine-tuning editors (ft, ft-conditional, lora) on tiny random models: the loss, the augmentation draws and the
built-in fact pool (ft-conditional's default), the norm constraint, LoRA export, the model left as it came, and
bad input.

As in test_locate.py the tiny models get their unembedding scaled up (x30) so a few steps can move the
next-token distribution.
"""

import dataclasses
import math

import pytest
import torch

from lmedit.editors import get_editor, make_config
from lmedit.editors import fact_pool, finetune
from lmedit.editors.augment import Example, augment, build_examples, fact_pools
from lmedit.editors.finetune import (ConditionalConfig, FinetuneConfig, collate, example_loss, prepare, read_positions,
                                     tokenize, train)
from lmedit.editors.lora import LoraEditConfig, lora_adapters, lora_deltas
from lmedit.errors import EditFailure, InputError
from lmedit.models.arch import get_module
from lmedit.patches import Patch
from lmedit.requests import EditRequest

REQUESTS = [
    EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris"),
    EditRequest("Barack Obama was born in", "Barack Obama", "Tokyo", "Hawaii"),
    EditRequest("The capital of Germany is", "Germany", "Madrid", "Berlin"),
]
FAST = dict(layers=(1, 2), lr=1e-2, epochs=20, batch_size=4)  # tiny models: a large step, few of them


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tiny_model):
    loaded = tiny_model(request.param)
    with torch.no_grad():
        get_module(loaded.model, loaded.arch.unembed).weight.mul_(30.0)
    return loaded


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, snap):
    params = dict(model.named_parameters())
    return (set(params) == set(snap) and all(torch.equal(params[n], t) for n, t in snap.items())
            and not any(p.requires_grad for p in params.values()) and not hasattr(model, "peft_config")
            and not any("lora" in n.lower() for n, _ in model.named_modules()))


def _target_logprob(model, tok, prompt, target):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    target_id = tok(" " + target, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, -1].float().log_softmax(-1)[target_id])


# ------------------------------------------------------------------------------------------------ the loss

def test_conditional_loss_ignores_prompt_tokens(tokenizer):
    ex = Example("The Eiffel Tower is located in the city of", "Rome", "edit", 0)
    encoded = tokenize(tokenizer, ex)
    first = encoded[2]
    assert first >= 3  # several positions predict prompt tokens
    grads = {}
    for conditional in (True, False):
        batch = collate([encoded], conditional, tokenizer.pad_token_id, "cpu")
        logits = torch.randn(1, batch.input_ids.shape[1], 50, generator=torch.Generator().manual_seed(0))
        batch.labels.clamp_(max=49)  # a small vocabulary keeps this test about positions, not sizes
        logits.requires_grad_(True)
        loss, _ = example_loss(logits, batch)
        loss.sum().backward()
        grads[conditional] = logits.grad[0]
    assert torch.equal(grads[True][:first], torch.zeros_like(grads[True][:first]))  # exactly zero, not small
    assert grads[False][:first].abs().sum(-1).min() > 0  # ft's loss reads every prompt position
    for g in grads.values():
        assert g[first:].abs().sum(-1).min() > 0  # both read every target position


def test_conditional_loss_is_the_target_nll(tokenizer):
    encoded = [tokenize(tokenizer, Example(p, t, "edit", 0)) for p, t in
               [("The capital of France is", "Paris"), ("Water is made of", "hydrogen and oxygen")]]
    batch = collate(encoded, True, tokenizer.pad_token_id, "cpu")
    logits = torch.randn(*batch.input_ids.shape, len(tokenizer), generator=torch.Generator().manual_seed(1))
    loss, target_lp = example_loss(logits, batch)
    logp = logits.log_softmax(-1)
    for row, (ids, labels, first) in enumerate(encoded):
        lp = [float(logp[row, pos, labels[pos]]) for pos in range(first, len(ids))]
        assert math.isclose(float(loss[row]), -sum(lp) / len(lp), rel_tol=1e-5)
        assert math.isclose(float(target_lp[row]), sum(lp), rel_tol=1e-5)
    # the training loop's path: logits only at the positions the loss reads, same numbers
    at = read_positions(batch)
    assert int(at.sum()) == sum(len(ids) - first for ids, _, first in encoded)  # the targets, nothing else
    sparse_loss, sparse_lp = example_loss(logits[at], batch, at)
    torch.testing.assert_close(sparse_loss, loss)
    torch.testing.assert_close(sparse_lp, target_lp)


# ------------------------------------------------------------------------------------------------ augmentation

def _requests(n):
    return [EditRequest(f"Person {i} works as a", f"Person {i}", f"pilot{i}", f"doctor{i}") for i in range(n)]


def test_augmentation_draws_exact_counts_deterministically():
    reqs = _requests(8)
    prefixes = [f"prefix number {k}. {{}}" for k in range(10)]
    pools = fact_pools(reqs, None, "single")

    def draw(seed, m=3, r=2):
        return augment(reqs, prefixes, pools, m, r, seed)

    a = draw(0)
    assert a == draw(0)  # same seed, same draws
    assert a != draw(1)  # another seed, other draws
    for i, req in enumerate(reqs):
        mine = [ex for ex in a if ex.edit == i]
        kinds = [ex.kind for ex in mine]
        assert kinds.count("edit") == 1 and kinds.count("paraphrase") == 3 and kinds.count("fact") == 2
        paraphrases = [ex.prompt for ex in mine if ex.kind == "paraphrase"]
        assert len(set(paraphrases)) == 3 and all(p.endswith(". " + req.prompt) for p in paraphrases)
        assert all(ex.target == req.target_new for ex in mine if ex.kind != "fact")
        facts = [(ex.prompt, ex.target) for ex in mine if ex.kind == "fact"]
        assert len(set(facts)) == 2 and req.prompt not in [p for p, _ in facts]  # other edits' true facts
        assert all((p, t) in [(r.prompt, r.target_true) for r in reqs] for p, t in facts)
    # more facts than the pool holds: still exactly r (drawn with replacement)
    many = augment(reqs[:2], prefixes, fact_pools(reqs[:2], None, "single"), 0, 5, 0)
    assert [ex.kind for ex in many].count("fact") == 10
    assert augment(reqs, prefixes, pools, 0, 0, 0) == [Example(r.prompt, r.target_new, "edit", i)
                                                       for i, r in enumerate(reqs)]


def test_paraphrase_prefixes_are_generated_from_the_seed(tiny, tmp_cache):
    model, tok = tiny.model, tiny.tokenizer
    cfg = prepare(FinetuneConfig(n_paraphrases=2, prefix_pool=3, prefix_length=4), model)
    a, _ = build_examples(model, tok, REQUESTS, cfg)
    assert a == build_examples(model, tok, REQUESTS, cfg)[0]
    assert a != build_examples(model, tok, REQUESTS, dataclasses.replace(cfg, seed=1))[0]
    assert len(a) == 3 * len(REQUESTS) and sum(ex.kind == "paraphrase" for ex in a) == 2 * len(REQUESTS)


def test_facts_file_pool(tiny, tmp_path):
    model, tok = tiny.model, tiny.tokenizer
    path = tmp_path / "facts.jsonl"
    path.write_text('{"prompt": "Tokyo is in", "subject": "Tokyo", "target_new": "Peru", "target_true": "Japan"}\n')
    cfg = prepare(FinetuneConfig(n_random_facts=3, facts_file=str(path)), model)
    examples, about = build_examples(model, tok, REQUESTS[:1], cfg)
    facts = [ex for ex in examples if ex.kind == "fact"]
    assert [(ex.prompt, ex.target) for ex in facts] == [("Tokyo is in", "Japan")] * 3
    assert about["fact_pool"] == {"source": f"facts_file {path}", "facts": 1}


@pytest.mark.parametrize("content, expected", [
    ("", "empty"),
    ("[]", "no records"),
    ("{not json", "malformed"),
    ('[{"prompt": "Tokyo is in", "subject": "Tokyo", "target_new": "Peru"}]', "target_true"),
    (None, "facts_file: file not found"),  # no such file
    ("directory", "facts_file: file not found"),  # a directory, not a file
])
def test_bad_facts_pool_is_an_input_error(tiny, tmp_path, content, expected):
    path = tmp_path / "facts.json"
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    snap = _snapshot(tiny.model)
    config = FinetuneConfig(layers=(1,), n_random_facts=2, facts_file=str(path))
    with pytest.raises(InputError, match=expected):
        get_editor("ft-conditional").fn(tiny.model, tiny.tokenizer, REQUESTS, config, progress=False)
    assert _unchanged(tiny.model, snap)


def test_no_facts_to_draw_is_an_input_error(tiny):
    config = FinetuneConfig(layers=(1,), n_random_facts=2, facts_file="requests")  # one request: no other facts
    with pytest.raises(InputError, match="facts_file"):
        get_editor("ft-conditional").fn(tiny.model, tiny.tokenizer, REQUESTS[:1], config, progress=False)
    with pytest.raises(InputError, match="mass editing"):  # the others' true facts are being edited too
        get_editor("ft-conditional").fn(tiny.model, tiny.tokenizer, REQUESTS, config, progress=False)


def test_facts_never_contradict_an_edit_of_the_same_run():
    """Mass editing trains every request together, so no request's true fact (nor any fact about an edited
    subject) may anchor it; single editing trains each alone, so the others' facts are fair."""
    reqs = _requests(4)
    outside = [("Paris is the capital of", "France"), (reqs[0].subject + " was born in", "Lyon")]
    mass = fact_pools(reqs, [(r.prompt, r.target_true) for r in reqs] + outside, "mass")
    assert all(pool == [outside[0]] for pool in mass)
    single = fact_pools(reqs, None, "single")
    for r, pool in zip(reqs, single):
        assert len(pool) == 3 and all(r.subject not in p for p, _ in pool)
    assert fact_pools(reqs, None, "mass") == [[]] * 4


# ------------------------------------------------------------------------------------------------ the default

def test_ft_conditional_augments_by_default_from_the_builtin_pool(tiny, tmp_cache):
    """The paper's method without any setting: per edit the edit, 2 random paraphrases and 2 random facts drawn
    from the built-in pool; `ft` stays the naive baseline without augmentation."""
    model, tok = tiny.model, tiny.tokenizer
    cfg = make_config("ft-conditional", "tiny", model, {"layers": "1", "epochs": "1"})
    assert (cfg.n_paraphrases, cfg.n_random_facts, cfg.facts_file, cfg.augment) == (2, 2, None, True)
    examples, about = build_examples(model, tok, REQUESTS, prepare(cfg, model))
    assert len(examples) == 5 * len(REQUESTS)
    for i in range(len(REQUESTS)):
        assert [ex.kind for ex in examples if ex.edit == i] == ["edit", "paraphrase", "paraphrase", "fact", "fact"]
    pool, _ = fact_pool.builtin_pool(model, tok)
    assert len(pool) == fact_pool.POOL_SIZE
    known = {(f.prompt, f.target) for f in pool}
    assert all((ex.prompt, ex.target) in known for ex in examples if ex.kind == "fact")
    assert about["fact_pool"]["source"].startswith("built-in") and about["fact_pool"]["facts"] == fact_pool.POOL_SIZE
    patch = get_editor("ft-conditional").fn(model, tok, REQUESTS, cfg, progress=False)
    assert patch.meta["augmentation"]["examples"] == 15 and patch.meta["training"][0]["examples"] == 15
    assert patch.meta["augmentation"]["fact_pool"]["cache"] == about["fact_pool"]["cache"]
    ft = make_config("ft", "tiny", model, {"layers": "1"})
    assert (ft.n_paraphrases, ft.n_random_facts) == (0, 0)


@pytest.mark.parametrize("overrides", [{"augment": "false"}, {"n_paraphrases": "0", "n_random_facts": "0"}])
def test_plain_conditional_fine_tuning_builds_no_augmentation(tiny, tmp_cache, overrides):
    model, tok = tiny.model, tiny.tokenizer
    cfg = prepare(make_config("ft-conditional", "tiny", model, {"layers": "1", **overrides}), model)
    assert (cfg.n_paraphrases, cfg.n_random_facts) == (0, 0)
    examples, about = build_examples(model, tok, REQUESTS, cfg)
    assert examples == [Example(r.prompt, r.target_new, "edit", i) for i, r in enumerate(REQUESTS)]
    assert about == {"examples": 3, "paraphrases_per_edit": 0, "facts_per_edit": 0, "fact_pool": None}
    assert not tmp_cache.exists()  # neither prefixes nor a fact pool were made


def test_facts_are_cut_from_a_lead_before_a_name():
    lead = ("Albert Einstein (14 March 1879 – 18 April 1955) was a German-born theoretical physicist who worked "
            "in Switzerland during World War One. He is best known for relativity.")
    sentence = fact_pool.first_sentence(lead)
    assert sentence == ("Albert Einstein was a German-born theoretical physicist who worked in Switzerland during "
                        "World War One.")  # parentheses gone, cut at the end of the sentence
    subject, spans = fact_pool.cuts(sentence)
    assert subject == "Albert Einstein"
    assert [sentence[a:b] for a, b in spans] == ["German", "Switzerland", "World"]  # "War" is inside a name
    assert fact_pool.cuts("a lowercase start is no subject for Paris") == ("", [])


def test_builtin_pool_is_deterministic_cached_and_keeps_edited_subjects_out(tiny, tmp_cache, monkeypatch):
    model, tok = tiny.model, tiny.tokenizer
    first = fact_pool.build_pool(model, tok, seed=0)
    assert first == fact_pool.build_pool(model, tok, seed=0)
    assert first != fact_pool.build_pool(model, tok, seed=1)  # another seed reads other leads
    assert len(first) == fact_pool.POOL_SIZE == len({f.prompt for f in first})
    assert all(f.prompt.startswith(f.subject) and f.target[0].isupper() for f in first)
    ranked = [(not f.greedy, -f.logprob) for f in first]
    assert ranked == sorted(ranked)
    built, about = fact_pool.builtin_pool(model, tok)
    assert built == first and about["build_seconds"] > 0
    monkeypatch.setattr(fact_pool, "build_pool", lambda *a, **k: pytest.fail("the cached pool was rebuilt"))
    assert fact_pool.builtin_pool(model, tok)[0] == first
    # an edit of a pool fact's subject (or of a longer name holding it) never draws a fact about it
    about_a, about_b = first[0], first[1]
    reqs = [EditRequest(about_a.prompt, about_a.subject, "Nowhere", about_a.target),
            EditRequest(f"{about_b.subject} Junior plays", f"{about_b.subject} Junior", "chess", "golf")]
    usable = fact_pool.about_nothing_edited(first, [r.subject for r in reqs])
    assert len(usable) <= len(first) - 2
    assert (about_a.prompt, about_a.target) not in usable and (about_b.prompt, about_b.target) not in usable
    cfg = prepare(ConditionalConfig(layers=(1,), n_paraphrases=0, n_random_facts=50), model)
    examples, _ = build_examples(model, tok, reqs, cfg)
    facts = [ex for ex in examples if ex.kind == "fact"]
    assert len(facts) == 100
    assert not any(fact_pool.mentions(ex.prompt, s) for ex in facts for s in (about_a.subject, about_b.subject))
    assert fact_pool.mentions("Tours is in France", "tours") and not fact_pool.mentions("Bratislava is", "Ra")


# ------------------------------------------------------------------------------------------------ training

@pytest.mark.parametrize("method", ["ft", "ft-conditional", "lora"])
def test_training_raises_the_target_and_leaves_the_model_unchanged(tiny, tmp_cache, method):  # ftc: augmented
    model, tok = tiny.model, tiny.tokenizer
    editor = get_editor(method)
    config = editor.config_cls(**FAST)
    snap = _snapshot(model)
    before = [_target_logprob(model, tok, r.prompt, r.target_new) for r in REQUESTS]
    patch = editor.fn(model, tok, REQUESTS, config, progress=False)
    assert _unchanged(model, snap)
    assert patch.meta["method"] == method and patch.meta["training"][0]["steps"] > 0
    with patch.apply(model):
        after = [_target_logprob(model, tok, r.prompt, r.target_new) for r in REQUESTS]
    assert all(a > b + 3.0 for a, b in zip(after, before)), (before, after)  # each P(target_new) x20 or more
    assert _unchanged(model, snap)
    kinds = {d.kind for d in patch.deltas.values()}
    assert kinds == ({"lowrank"} if method == "lora" else {"dense"})
    assert sorted(patch.deltas) == sorted(f"{tiny.arch.layers}.{l}.{tiny.arch.mlp_out}.weight" for l in (1, 2))


def test_norm_constraint_holds_and_is_active(tiny):
    model, tok = tiny.model, tiny.tokenizer
    eps = 1e-3
    base = dict(FAST, epochs=5, stop_prob=None)
    free = get_editor("ft-conditional").fn(model, tok, REQUESTS, FinetuneConfig(**base), progress=False)
    held = get_editor("ft-conditional").fn(model, tok, REQUESTS, FinetuneConfig(**base, norm_constraint=eps),
                                           progress=False)
    assert max(float(d.dense.abs().max()) for d in free.deltas.values()) > 2 * eps  # it would have gone further
    assert max(float(d.dense.abs().max()) for d in held.deltas.values()) <= eps + 1e-7
    params, snap = dict(model.named_parameters()), _snapshot(model)
    with held.apply(model):
        for name in held.deltas:
            assert float((params[name] - snap[name]).abs().max()) <= eps + 1e-7


@pytest.mark.parametrize("method", ["ft-conditional", "lora"])
def test_degradation_budget_keeps_the_last_epoch_within_it(tiny, tmp_path, method):
    """With budget ε, training stops at the first epoch whose general-text loss exceeds (1 + ε) × before and
    keeps the weights of the epoch before it (an unconstrained run of the same seed gives the trajectory)."""
    from lmedit.evaluate.degradation import token_loss

    model, tok = tiny.model, tiny.tokenizer
    texts = []  # each prompt followed by the unedited model's own top token there: editing must cost those
    for r in REQUESTS:
        ids = tok(r.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = int(model(input_ids=ids).logits[0, -1].argmax())
        texts.append(r.prompt + tok.decode([top]))
    corpus = tmp_path / "general.txt"
    corpus.write_text("\n\n".join(texts))
    editor = get_editor(method)
    base = dict(FAST, lr=5e-2, epochs=6, stop_prob=None, patience=0, budget_corpus=str(corpus), budget_docs=3,
                augment=False)  # the edits alone: every fact the training moves is in the general text
    free = editor.fn(model, tok, REQUESTS, editor.config_cls(**base, budget=1e6), progress=False)
    losses = free.meta["training"][0]["budget_loss"]
    assert free.meta["training"][0]["stopped"] == "epochs" and len(losses) == 7
    rise = [x / losses[0] - 1 for x in losses[1:]]
    assert max(rise) > 0, losses  # training degrades this text, so some budget must bite
    eps = max(rise) / 2
    broken = next(e for e, r in enumerate(rise) if r > eps)  # 0-based epoch that breaks the budget
    held = editor.fn(model, tok, REQUESTS, editor.config_cls(**base, budget=eps), progress=False)
    curve = held.meta["training"][0]
    assert curve["stopped"] == "budget" and curve["epochs"] == broken + 1
    torch.testing.assert_close(torch.tensor(curve["budget_loss"]), torch.tensor(losses[:broken + 2]))
    with held.apply(model):
        kept = token_loss(model, tok, texts, 128)
    assert kept <= (1 + eps) * losses[0] * (1 + 1e-6)
    assert abs(kept - losses[broken]) < 1e-4  # the weights after the last epoch within the budget (or W₀)


def test_budget_measures_the_loss_before_training_once_per_model_state(tiny, tmp_path, monkeypatch):
    """Single editing restores W₀ before every edit: the general-text loss before training is measured once,
    and measured again as soon as any weight differs."""
    from lmedit.editors import budget, finetune

    model, tok = tiny.model, tiny.tokenizer
    corpus = tmp_path / "general.txt"
    corpus.write_text("\n\n".join(r.prompt for r in REQUESTS))
    config = FinetuneConfig(**dict(FAST, budget=0.5, budget_corpus=str(corpus), budget_docs=2))
    budget._LOSS_BEFORE.clear()
    calls = []
    measure = finetune.Budget.measure
    monkeypatch.setattr(finetune.Budget, "measure", lambda self: calls.append(1) or measure(self))
    params = {"w": next(p for n, p in model.named_parameters() if "mlp" in n and p.dim() == 2)}
    bump = 0.1 * torch.randn(params["w"].shape, generator=torch.Generator().manual_seed(0))
    first = finetune.Budget(model, tok, config, params)
    second = finetune.Budget(model, tok, config, params)
    assert len(calls) == 1 and first.losses == second.losses
    original = params["w"].detach().clone()
    with torch.no_grad():
        params["w"].add_(bump)
    try:
        third = finetune.Budget(model, tok, config, params)
    finally:
        with torch.no_grad():
            params["w"].copy_(original)  # the shared tiny model goes back bit for bit
    assert len(calls) == 2 and third.losses[0] != first.losses[0]


def test_single_mode_sums_independent_edits(tiny):
    model, tok = tiny.model, tiny.tokenizer
    fn = get_editor("ft-conditional").fn
    config = FinetuneConfig(**dict(FAST, epochs=3))
    both = fn(model, tok, REQUESTS[:2], dataclasses.replace(config, mode="single"), progress=False)
    alone = [fn(model, tok, [r], config, progress=False) for r in REQUESTS[:2]]
    assert len(both.meta["training"]) == 2
    for name, d in both.deltas.items():
        torch.testing.assert_close(d.dense, alone[0].deltas[name].dense + alone[1].deltas[name].dense)


def test_kl_and_augmentation_run_and_the_patch_saves(tiny, tmp_cache, tmp_path):
    model, tok = tiny.model, tiny.tokenizer
    config = make_config("ft-conditional", "tiny", model, {
        "layers": "1", "modules": "mlp_out,attn_out", "norm_constraint": "0.01", "epochs": 2, "lr": 1e-3,
        "n_paraphrases": 1, "prefix_pool": 2, "prefix_length": 3, "n_random_facts": 1, "kl_factor": 0.5,
        "kl_text": ("A short sentence about nothing.",), "facts_file": str(tmp_path / "facts.jsonl")})
    (tmp_path / "facts.jsonl").write_text('{"prompt": "Tokyo is in", "subject": "Tokyo", "target_new": "Peru", '
                                          '"target_true": "Japan"}\n')
    snap = _snapshot(model)
    patch = get_editor("ft-conditional").fn(model, tok, REQUESTS, config, progress=False)
    assert _unchanged(model, snap)
    assert patch.meta["config"]["norm_constraint"] == 0.01
    assert patch.meta["config"]["modules"] == ("mlp_out", "attn_out")
    assert len(patch.deltas) == 2 and patch.meta["augmentation"]["examples"] == 3 * len(REQUESTS)
    loaded = Patch.load(patch.save(tmp_path / "patch"))
    assert loaded.meta["method"] == "ft-conditional" and set(loaded.deltas) == set(patch.deltas)


# ------------------------------------------------------------------------------------------------ LoRA

def test_lora_patch_matches_the_adapted_model_and_reverts_exactly(tiny):
    model, tok = tiny.model, tiny.tokenizer
    config = prepare(LoraEditConfig(**dict(FAST, epochs=5)), model)
    examples, _ = build_examples(model, tok, REQUESTS, config)
    ids = tok(["The Eiffel Tower is in the heart of"], return_tensors="pt")["input_ids"]
    snap = _snapshot(model)
    targets = [f"{tiny.arch.layers}.{l}.{tiny.arch.mlp_out}" for l in config.layers]
    with lora_adapters(model, targets, config.rank, config.alpha, config.seed) as adapted:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert params and all("lora_" in n for n in params)
        train(model, tok, examples, params, config, True, progress=False)
        with torch.no_grad():
            adapted_logits = model(input_ids=ids).logits
        deltas = lora_deltas(adapted)
    assert _unchanged(model, snap)
    patch = Patch.build(model, deltas, method="lora")
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    handle = patch.apply(model)
    with torch.no_grad():
        patched = model(input_ids=ids).logits
    torch.testing.assert_close(patched, adapted_logits, atol=1e-4, rtol=0)
    assert not torch.allclose(patched, plain, atol=1e-3)  # the adapters did learn something
    handle.revert()
    assert _unchanged(model, snap)  # bit-exact


# ------------------------------------------------------------------------------------------------ bad input

def test_unknown_module_names_the_valid_ones(tiny):
    config = FinetuneConfig(layers=(1,), modules=("mlp.nonexistent",))
    for method in ("ft", "lora"):
        cfg = config if method == "ft" else LoraEditConfig(layers=(1,), modules=("mlp.nonexistent",))
        with pytest.raises(InputError, match="unknown module 'mlp.nonexistent'") as err:
            get_editor(method).fn(tiny.model, tiny.tokenizer, REQUESTS, cfg, progress=False)
        assert "mlp_out" in str(err.value) and tiny.arch.mlp_out in str(err.value)


def test_diverging_learning_rate_fails_and_keeps_the_model(tiny, tmp_cache):
    snap = _snapshot(tiny.model)
    for method in ("ft-conditional", "lora"):
        config = get_editor(method).config_cls(**dict(FAST, lr=1e6))
        with pytest.raises(EditFailure, match="lower lr"):
            get_editor(method).fn(tiny.model, tiny.tokenizer, REQUESTS, config, progress=False)
        assert _unchanged(tiny.model, snap)


def test_non_finite_loss_fails_and_keeps_the_model(tiny, monkeypatch):
    def nan_loss(logits, batch, at=None):
        loss, lp = example_loss(logits, batch, at)
        return loss * float("nan"), lp

    monkeypatch.setattr(finetune, "example_loss", nan_loss)
    snap = _snapshot(tiny.model)
    with pytest.raises(EditFailure, match="non-finite at step 1"):
        get_editor("ft").fn(tiny.model, tiny.tokenizer, REQUESTS, FinetuneConfig(**FAST), progress=False)
    assert _unchanged(tiny.model, snap)


def test_bad_settings_are_input_errors(tiny):
    model = tiny.model
    for bad in (dict(lr=0.0), dict(lr=float("inf")), dict(epochs=0), dict(mode="both"), dict(layers=(2, 1)),
                dict(norm_constraint=-1.0), dict(stop_prob=1.5), dict(layers=(99,)), dict(budget=-0.1),
                dict(budget=float("nan")), dict(budget_docs=0), dict(budget_tokens=1), dict(n_paraphrases=-1),
                dict(n_random_facts=-2)):
        with pytest.raises(InputError):
            prepare(ConditionalConfig(**bad), model)
    with pytest.raises(InputError, match="rank"):
        get_editor("lora").fn(model, tiny.tokenizer, REQUESTS, LoraEditConfig(layers=(1,), rank=0), progress=False)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["ft-conditional", "lora"])
def test_interrupted_training_resumes_from_its_epoch_checkpoint(tiny, tmp_path, tmp_cache, monkeypatch, method):
    """Killed in epoch 4 of 6, the same edit again in the same checkpoint directory resumes after epoch 3 and ends
    with exactly the deltas of an uninterrupted run (Adam moments and the shuffling generator come back too).
    ft-conditional trains its default augmented set: the same draws again, so the state is picked up."""
    from lmedit.checkpoints import load_state

    model, tok = tiny.model, tiny.tokenizer
    editor = get_editor(method)
    config = editor.config_cls(**dict(FAST, epochs=6, stop_prob=None, patience=0))
    whole = editor.fn(model, tok, REQUESTS, config, progress=False)
    examples = whole.meta["augmentation"]["examples"]
    assert examples == (5 if method == "ft-conditional" else 1) * len(REQUESTS)
    per_epoch = -(-examples // config.batch_size)

    calls = {"n": 0}

    def dies_in_epoch_4(logits, batch, at=None):
        calls["n"] += 1
        if calls["n"] > 3 * per_epoch:
            raise _Killed
        return example_loss(logits, batch, at)

    snap = _snapshot(model)
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        m.setattr(finetune, "example_loss", dies_in_epoch_4)
        with pytest.raises(_Killed):
            editor.edit(model, tok, REQUESTS, config, progress=False, checkpoint_dir=ckpt)
    assert _unchanged(model, snap)
    assert load_state(ckpt)[1]["epoch"] == 3
    calls["n"] = 0
    monkeypatch.setattr(finetune, "example_loss", lambda *a, **k: calls.__setitem__("n", calls["n"] + 1)
                        or example_loss(*a, **k))
    resumed = editor.edit(model, tok, REQUESTS, config, progress=False, checkpoint_dir=ckpt)
    assert calls["n"] == 3 * per_epoch  # only epochs 4-6 ran
    assert resumed.meta["training"][0]["epoch_loss"] == whole.meta["training"][0]["epoch_loss"]
    for name, delta in whole.deltas.items():
        assert torch.equal(resumed.deltas[name].full(), delta.full()), name
    # another run (other settings) in the same directory does not pick the state up
    other = editor.config_cls(**dict(FAST, epochs=6, stop_prob=None, patience=0, lr=2e-2))
    calls["n"] = 0
    editor.edit(model, tok, REQUESTS, other, progress=False, checkpoint_dir=ckpt)
    assert calls["n"] == 6 * per_epoch


@pytest.mark.parametrize("setting, phrase", [("n_random_facts=-1", "n_random_facts must be an integer >= 0, got -1"),
                                             ("n_paraphrases=-2", "n_paraphrases must be an integer >= 0, got -2"),
                                             ("facts_file=/no/such/facts.json", "facts_file: file not found")])
def test_bad_augmentation_settings_exit_2_with_one_line(tiny_model, tmp_path, monkeypatch, capsys, setting, phrase):
    import json
    import sys

    from lmedit import cli

    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps(REQUESTS[0].to_dict()) + "\n")
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["lmedit", "edit", "--model", str(tmp_path / "tiny"), "--method", "ft-conditional",
                                      "--requests", str(requests), "--out", str(tmp_path / "p"), "--set", "layers=1",
                                      "--set", setting])
    capsys.readouterr()  # what saving the model printed
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(err) == 1 and phrase in err[0], err
    assert not (tmp_path / "p").exists()
