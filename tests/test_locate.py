"""Locate-then-edit: the closed-form solvers, v* batching, and ROME/EMMET end to end on tiny random models.

The tiny models get their unembedding scaled up (x30) so a residual at the edit point can actually move the
next-token distribution, and the requests put the subject at the end of the prompt (the edit point is the
predicting position; in a random model attention carries almost nothing from earlier tokens).
"""

import copy
import dataclasses

import pytest
import torch

from lmedit.editors import apply_overrides, get_editor
from lmedit.errors import InputError
from lmedit.locate.context import context_templates
from lmedit.locate.keys import read_at_subject
from lmedit.locate.solvers import equality_constrained, least_squares
from lmedit.locate.values import ValueConfig, compute_values
from lmedit.models.arch import get_module, mlp_out_module, weight_as_matrix
from lmedit.requests import EditRequest

# --------------------------------------------------------------------------------------------- solvers

D_IN, D_OUT, N = 12, 8, 3


@pytest.fixture
def krc():
    g = torch.Generator().manual_seed(0)
    K = torch.randn(D_IN, N, generator=g, dtype=torch.float64)
    R = torch.randn(D_OUT, N, generator=g, dtype=torch.float64)
    A = torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64)
    C = A @ A.T + torch.eye(D_IN, dtype=torch.float64)
    return K, R, C


def _dw(factors):
    left, right = factors
    assert left.dtype == right.dtype == torch.float64
    return left @ right


def test_softened_equality_is_least_squares(krc):
    """Push-through identity: Kᵀ(λC + KKᵀ)⁻¹ = (KᵀC⁻¹K + λI)⁻¹KᵀC⁻¹, so EMMET(λ', μ) ≡ MEMIT(λ = μλ')."""
    K, R, C = krc
    memit = _dw(least_squares(K, R, C, 500.0))
    emmet = _dw(equality_constrained(K, R, C, lam=5000.0, mu=0.1))
    torch.testing.assert_close(emmet, memit, atol=1e-10, rtol=1e-8)
    assert (_dw(equality_constrained(K, R, C, lam=5000.0, mu=0.01)) - memit).abs().max() > 1e-6


def test_equality_constrained_meets_the_constraint(krc):
    K, R, C = krc
    dW = _dw(equality_constrained(K, R, C, lam=1.0, mu=0.0))
    assert dW.shape == (D_OUT, D_IN)
    torch.testing.assert_close(dW @ K, R, atol=1e-8, rtol=0)
    # λ only scales C, which cannot change the constrained solution
    torch.testing.assert_close(_dw(equality_constrained(K, R, C, lam=15000.0, mu=0.0)), dW, atol=1e-10, rtol=1e-8)


def test_equality_constrained_is_the_c_smallest_solution(krc):
    """Among all ΔW with ΔW K = R, the solver's minimises tr(ΔW C ΔWᵀ)."""
    K, R, C = krc
    dW = _dw(equality_constrained(K, R, C, mu=0.0))

    def cost(M):
        return torch.trace(M @ C @ M.T)

    g = torch.Generator().manual_seed(1)
    P_perp = torch.eye(D_IN, dtype=torch.float64) - K @ torch.linalg.solve(K.T @ K, K.T)  # N with N K = 0
    for _ in range(5):
        N_ = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64) @ P_perp * 0.1
        torch.testing.assert_close((dW + N_) @ K, R, atol=1e-8, rtol=0)
        assert cost(dW + N_) > cost(dW)
    # first-order condition: ΔW C lies in the row space of Kᵀ
    torch.testing.assert_close(dW @ C @ P_perp, torch.zeros(D_OUT, D_IN, dtype=torch.float64), atol=1e-8, rtol=0)


def test_equality_constrained_with_mu(krc):
    K, R, C = krc
    mu = 0.3
    dW = _dw(equality_constrained(K, R, C, lam=2.0, mu=mu))
    G = K.T @ torch.linalg.solve(2.0 * C, K)
    # ΔW = R (G + μI)⁻¹ Kᵀ(λC)⁻¹  ⇒  ΔW K (G + μI) = R G
    torch.testing.assert_close(dW @ K @ (G + mu * torch.eye(N, dtype=torch.float64)), R @ G, atol=1e-8, rtol=1e-8)
    assert not torch.allclose(dW @ K, R, atol=1e-3)  # the constraint is softened


def test_least_squares_normal_equations(krc):
    K, R, C = krc
    lam = 0.7
    dW = _dw(least_squares(K, R, C, lam))
    assert dW.shape == (D_OUT, D_IN)
    # argmin λ tr(ΔW C ΔWᵀ) + ‖ΔW K − R‖²  ⇔  ΔW (λC + K Kᵀ) = R Kᵀ
    torch.testing.assert_close(dW @ (lam * C + K @ K.T), R @ K.T, atol=1e-9, rtol=1e-9)
    # and it really is the minimum: any perturbation costs more
    obj = lambda M: lam * torch.trace(M @ C @ M.T) + ((M @ K - R) ** 2).sum()  # noqa: E731
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        assert obj(dW + 1e-3 * torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)) > obj(dW)


def test_least_squares_small_lambda_reaches_the_constraint(krc):
    K, R, C = krc
    errs = [float((_dw(least_squares(K, R, C, lam)) @ K - R).norm() / R.norm()) for lam in (1.0, 1e-3, 1e-8)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-6
    # and for λ → 0 it approaches the equality-constrained solution with the same C
    torch.testing.assert_close(_dw(least_squares(K, R, C, 1e-10)), _dw(equality_constrained(K, R, C, mu=0.0)),
                               atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------- tiny models

REQUESTS = [
    EditRequest("The capital of France", "France", "Rome", "Paris"),
    EditRequest("Danielle Darrieux", "Danielle Darrieux", "English", "French"),
    EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
]
# Editable in a random model: no weight decay (‖v0‖ is tiny there), a wide clamp, a reachable early stop.
VALUE = ValueConfig(weight_decay=0.0, clamp_norm_factor=200.0, early_stop_loss=0.5)
CONTEXT = dict(n_context=3, context_length=8, seed=0)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Context templates and statistics of the tiny models go to a private cache, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("lmedit-cache")
        mp.setenv("LMEDIT_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    words = ("the of and a to in is was for on that by with as at from his her which city river king paris "
             "rome france england music war film team born school world year first new house time").split()
    g = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(40):
        idx = torch.randint(0, len(words), (60,), generator=g).tolist()
        docs.append(" ".join(words[i] for i in idx).capitalize() + ".")
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(docs))
    return path


def _editable(loaded):
    with torch.no_grad():
        get_module(loaded.model, loaded.arch.unembed).weight.mul_(30.0)
    return loaded


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tiny_model):
    return _editable(tiny_model(request.param))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snap):
    params = dict(model.named_parameters())
    return set(params) == set(snap) and all(torch.equal(params[n], t) for n, t in snap.items())


def _next_token_prob(model, tok, prompt, target):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    target_id = tok(" " + target, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, -1].float().softmax(-1)[target_id])


def _check_change_at_keys(model, tok, patch, requests, config, layer):
    """With the patch applied, W′k* − W k* equals v* − z for every request (the edit's equality constraint)."""
    templates = context_templates(model, tok, config.n_context, config.context_length, config.seed)
    keys, outs = read_at_subject(model, tok, requests, templates, [layer], {"z": (layer, config.value.site)},
                                 key_average=config.key_average)
    z = outs["z"]
    values = compute_values(model, tok, requests, layer, templates, config.value, progress=False)
    W = mlp_out_module(model, layer)
    with torch.no_grad():
        before = W(keys[layer])
        with patch.apply(model):
            after = W(keys[layer])
        assert torch.equal(W(keys[layer]), before)  # reverted on leaving the block
    want = values.v_star - z
    assert want.norm(dim=1).min() > 1e-3  # a real edit, not a no-op
    err = (after - before - want).norm(dim=1) / want.norm(dim=1)
    assert err.max() < 1e-4, err
    return values


def test_rome_end_to_end(tiny, tokenizer):
    model, tok = tiny.model, tokenizer
    rome = get_editor("rome")
    config = rome.config_cls(layers=(1,), identity_cov=True, value=VALUE, **CONTEXT)
    snap = _snapshot(model)
    p_before = _next_token_prob(model, tok, REQUESTS[0].prompt, "Rome")

    p1 = rome.fn(model, tok, REQUESTS[:1], config, progress=False, announce=lambda *_: None)
    assert _same(model, snap), "the editor must leave the model as it found it"
    name = "transformer.h.1.mlp.c_proj.weight" if tiny.arch.transposed else "model.layers.1.mlp.down_proj.weight"
    assert list(p1.deltas) == [name]
    assert p1.deltas[name].rank == 1 and p1.deltas[name].shape == tuple(snap[name].shape)
    assert p1.meta["method"] == "rome" and p1.meta["covariance"].startswith("identity")
    _check_change_at_keys(model, tok, p1, REQUESTS[:1], config, 1)

    handle = p1.apply(model)
    assert not torch.equal(dict(model.named_parameters())[name], snap[name])
    p_after = _next_token_prob(model, tok, REQUESTS[0].prompt, "Rome")
    handle.revert()
    assert _same(model, snap), "revert must restore every parameter bit for bit"
    assert p_after > 10 * p_before, (p_before, p_after)

    # two requests: one after the other, the second computed on the model that carries the first
    p12 = rome.fn(model, tok, REQUESTS[:2], config, progress=False, announce=lambda *_: None)
    assert _same(model, snap)
    with p1.apply(model):
        p2 = rome.fn(model, tok, REQUESTS[1:2], config, progress=False, announce=lambda *_: None)
        _check_change_at_keys(model, tok, p2, REQUESTS[1:2], config, 1)
    assert _same(model, snap)
    torch.testing.assert_close(p12.deltas[name].full(), p1.deltas[name].full() + p2.deltas[name].full(),
                               atol=1e-6, rtol=1e-5)
    assert len(p12.meta["requests"]) == 2
    with p12.apply(model):
        assert not _same(model, snap)
    assert _same(model, snap)


def test_rome_needs_one_layer(tiny, tokenizer):
    rome = get_editor("rome")
    config = rome.config_cls(layers=(1, 2), identity_cov=True)
    with pytest.raises(InputError, match="exactly one layer"):
        rome.fn(tiny.model, tokenizer, REQUESTS[:1], config, progress=False)


@pytest.mark.parametrize("covariance", ["identity", "stats"])
def test_emmet_end_to_end(tiny, tokenizer, covariance, corpus_file):
    model, tok = tiny.model, tokenizer
    emmet = get_editor("emmet")
    stats = dict(identity_cov=True) if covariance == "identity" else \
        dict(identity_cov=False, stats_corpus=str(corpus_file), stats_tokens=2000)
    config = emmet.config_cls(layers=(2,), mu=0.0, value=VALUE, **stats, **CONTEXT)
    snap = _snapshot(model)
    announced = []
    patch = emmet.fn(model, tok, REQUESTS[:2], config, progress=False, announce=announced.append)
    assert _same(model, snap)
    name = "transformer.h.2.mlp.c_proj.weight" if tiny.arch.transposed else "model.layers.2.mlp.down_proj.weight"
    delta = patch.deltas[name]
    assert delta.rank == 2
    _check_change_at_keys(model, tok, patch, REQUESTS[:2], config, 2)

    dW = delta.full().double()
    dW = dW.T if tiny.arch.transposed else dW  # (out, in)
    if covariance == "stats":
        assert announced and "2000 tokens" in announced[0]
        from lmedit.stats.moments import load_or_compute

        C = load_or_compute(model, tok, [2], str(corpus_file), 2000, compute=False)[2]
        assert not torch.allclose(C, torch.eye(C.shape[0], dtype=C.dtype) * C.diagonal().mean(), atol=1e-6)
        # ΔW C lies in the span of the keys: ΔW = R (KᵀC⁻¹K)⁻¹ KᵀC⁻¹ used this C
        templates = context_templates(model, tok, config.n_context, config.context_length, config.seed)
        K = read_at_subject(model, tok, REQUESTS[:2], templates, [2], key_average=config.key_average)[0][2].double().T
        P_perp = torch.eye(K.shape[0], dtype=torch.float64) - K @ torch.linalg.solve(K.T @ K, K.T)
        residue = (dW @ C @ P_perp).norm() / (dW @ C).norm()
        # float32 factors times an ill-conditioned C: ~1e-4; had C been ignored it would be of order one
        assert residue < 2e-3, residue
        assert (dW @ P_perp).norm() / dW.norm() > 0.05  # the update is not simply in the span of the keys
    else:
        assert not announced
        # with C = I the update lies in the span of the keys
        templates = context_templates(model, tok, config.n_context, config.context_length, config.seed)
        K = read_at_subject(model, tok, REQUESTS[:2], templates, [2], key_average=config.key_average)[0][2].double().T
        P_perp = torch.eye(K.shape[0], dtype=torch.float64) - K @ torch.linalg.solve(K.T @ K, K.T)
        assert (dW @ P_perp).norm() / dW.norm() < 1e-4

    handle = patch.apply(model)
    assert not _same(model, snap)
    handle.revert()
    assert _same(model, snap)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_values_equal_one_by_one(tiny, tokenizer, dtype):
    """One batched v* optimisation = separate ones. Exact in float64; in float32 the batch's different padding
    changes sums in the last bit, which Adam's first, sign-like steps can blow up to ~1e-3 of ‖δ‖."""
    model, tok = copy.deepcopy(tiny.model).to(dtype), tokenizer
    templates = context_templates(model, tok, CONTEXT["n_context"], CONTEXT["context_length"], CONTEXT["seed"])
    assert len(templates) == 4 and templates[0] == "{}"
    together = compute_values(model, tok, REQUESTS, 2, templates, VALUE, progress=False)
    assert together.delta.dtype == dtype
    steps = together.steps.tolist()
    assert len(set(steps)) > 1, f"requests should stop at different steps to test the batching, got {steps}"
    assert steps[2] == VALUE.steps  # the request whose subject is not at the end cannot reach the early stop
    for i, req in enumerate(REQUESTS):
        alone = compute_values(model, tok, [req], 2, templates, VALUE, progress=False)
        assert alone.steps.tolist() == [steps[i]]
        torch.testing.assert_close(alone.v0[0], together.v0[i], atol=1e-6, rtol=0)
        if dtype == torch.float64:
            torch.testing.assert_close(alone.delta[0], together.delta[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(alone.target_prob[0], together.target_prob[i], atol=1e-6, rtol=1e-5)
        else:
            assert (alone.delta[0] - together.delta[i]).norm() < 2e-3 * together.delta[i].norm()
            torch.testing.assert_close(alone.target_prob[0], together.target_prob[i], atol=1e-3, rtol=1e-2)
    # v0 is the output at the value site (the residual stream after block 2) at the last subject token of the
    # bare prompt
    _, outs = read_at_subject(model, tok, REQUESTS, templates, [2], {"z": (2, VALUE.site)})
    torch.testing.assert_close(together.v0, outs["z"], atol=1e-6, rtol=1e-5)
    # early-stopped requests really reached the target; the clamp holds for every request
    # (the stop is on the mean per-token NLL < 0.5; target_prob is P of the whole, possibly multi-token, target)
    stopped = [i for i, s in enumerate(steps) if s < VALUE.steps]
    assert stopped
    for i in stopped:
        assert together.target_prob[i] > 0.4
    assert (together.delta.norm(dim=1) <= VALUE.clamp_norm_factor * together.v0.norm(dim=1) * (1 + 1e-5)).all()


def test_prefix_cache_gives_the_reference_values(tiny, tokenizer):
    """Running the frozen prefixes once (KV cache) = running every full prompt at every step (float64)."""
    model = copy.deepcopy(tiny.model).to(torch.float64)
    templates = context_templates(model, tokenizer, CONTEXT["n_context"], CONTEXT["context_length"], CONTEXT["seed"])
    cached = compute_values(model, tokenizer, REQUESTS, 2, templates, VALUE, progress=False)
    full = compute_values(model, tokenizer, REQUESTS, 2, templates, VALUE, progress=False, cache_prefix=False)
    assert cached.steps.tolist() == full.steps.tolist()
    torch.testing.assert_close(cached.v0, full.v0, atol=1e-9, rtol=0)
    torch.testing.assert_close(cached.delta, full.delta, atol=1e-6, rtol=0)


def test_chunked_values_equal_one_chunk(tiny, tokenizer):
    """Gradient accumulation over request chunks (the memory knob) gives the same v* (float64)."""
    import dataclasses

    model = copy.deepcopy(tiny.model).to(torch.float64)
    templates = context_templates(model, tokenizer, CONTEXT["n_context"], CONTEXT["context_length"], CONTEXT["seed"])
    whole = compute_values(model, tokenizer, REQUESTS, 2, templates, VALUE, progress=False)
    chunked = compute_values(model, tokenizer, REQUESTS, 2, templates, dataclasses.replace(VALUE, chunk_requests=1),
                             progress=False)
    assert whole.steps.tolist() == chunked.steps.tolist()
    torch.testing.assert_close(whole.delta, chunked.delta, atol=1e-8, rtol=0)
    torch.testing.assert_close(whole.v0, chunked.v0, atol=1e-12, rtol=0)


def test_values_of_a_weight_matrix_view(tiny):
    """weight_as_matrix gives (out, in) for both layouts: W k through the module equals the matrix product."""
    W = mlp_out_module(tiny.model, 1)
    Wm = weight_as_matrix(W, tiny.arch.transposed)
    k = torch.randn(3, Wm.shape[1], generator=torch.Generator().manual_seed(0))
    bias = W.bias if getattr(W, "bias", None) is not None else 0.0
    with torch.no_grad():
        torch.testing.assert_close(W(k), k @ Wm.T + bias, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------- overrides


def test_apply_overrides():
    config = get_editor("rome").config_cls()
    new = apply_overrides(config, {"value.lr": "0.1", "layers": "3,5", "mom2_weight": "2e4", "identity_cov": "true"})
    assert new.value.lr == 0.1 and isinstance(new.value.lr, float)
    assert new.layers == (3, 5) and new.mom2_weight == 20000.0 and new.identity_cov is True
    assert config.value.lr == 0.5 and config.layers == (4,), "the original config must not change"
    assert new.value.steps == config.value.steps  # untouched siblings survive
    assert apply_overrides(config, {"value.steps": 7}).value.steps == 7


def test_apply_overrides_unknown_key_names_valid_ones():
    config = get_editor("emmet").config_cls()
    with pytest.raises(InputError, match=r"unknown setting 'mom2'.*valid:.*mom2_weight"):
        apply_overrides(config, {"mom2": 1.0})
    with pytest.raises(InputError, match=r"unknown setting 'lrr'.*valid:.*clamp_norm_factor.*lr"):
        apply_overrides(config, {"value.lrr": 0.1})
    with pytest.raises(InputError):
        apply_overrides(config, {"value": 1})  # a group, not a value
    with pytest.raises(InputError, match=r"value.steps must be an integer >= 2, got 'many'"):
        apply_overrides(config, {"value.steps": "many"})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_apply_overrides_rejects_non_finite(value):
    config = get_editor("memit").config_cls()
    with pytest.raises(InputError):
        apply_overrides(config, {"mom2_weight": value})


def test_config_validate_rejects_bad_numbers(tiny, tokenizer):
    memit = get_editor("memit")
    for bad in (dict(mom2_weight=float("nan")), dict(mom2_weight=-1.0), dict(mu=float("inf")), dict(layers=(2, 1)),
                dict(layers=(9,)), dict(layers=())):
        with pytest.raises(InputError):  # refused when the config is made, or at the latest by the editor
            config = dataclasses.replace(memit.config_cls(identity_cov=True), **bad)
            memit.fn(tiny.model, tokenizer, REQUESTS[:1], config, progress=False)


# --------------------------------------------------------------------------------------------- v* reuse


def test_value_store_reuses_only_on_the_same_model_state(tiny, tokenizer, tmp_path):
    from lmedit.locate.value_store import ValueStore

    model, tok = tiny.model, tokenizer
    templates = context_templates(model, tok, CONTEXT["n_context"], CONTEXT["context_length"], CONTEXT["seed"])
    store = ValueStore(model, tmp_path / "values")
    first = store.values(model, tok, REQUESTS[:2], 2, templates, VALUE, progress=False)
    assert (store.hits, store.misses) == (0, 2)
    both = store.values(model, tok, REQUESTS, 2, templates, VALUE, progress=False)
    assert (store.hits, store.misses) == (2, 3)  # the first two reused, only the third optimised
    assert torch.equal(both.delta[:2], first.delta) and torch.equal(both.v0[:2], first.v0)
    alone = compute_values(model, tok, REQUESTS[2:], 2, templates, VALUE, progress=False)
    assert torch.equal(both.delta[2:], alone.delta) and both.steps[2] == alone.steps[0]
    # other settings are another key
    other = store.values(model, tok, REQUESTS[:1], 2, templates, dataclasses.replace(VALUE, steps=3), progress=False)
    assert store.misses == 4 and not torch.equal(other.delta[0], first.delta[0])

    # a new store on the same model finds the entries on disk, bit for bit
    again = ValueStore(model, tmp_path / "values")
    assert torch.equal(again.values(model, tok, REQUESTS, 2, templates, VALUE, progress=False).delta, both.delta)
    assert (again.hits, again.misses) == (3, 0)

    # another checkpoint with the same MLP outputs (here: one attention weight changed) never hits the disk entries
    attn = next(p for n, p in model.named_parameters() if "attn" in n and p.dim() == 2)
    saved = attn.detach().clone()
    with torch.no_grad():
        attn.add_(0.05)
    try:
        other_model = ValueStore(model, tmp_path / "values")
        other_model.values(model, tok, REQUESTS[:1], 2, templates, VALUE, progress=False)
        assert (other_model.hits, other_model.misses) == (0, 1)
    finally:
        with torch.no_grad():
            attn.copy_(saved)

    # once an MLP output projection changes, v* is computed on the model as it is now, and kept under that state
    later = ValueStore(model, tmp_path / "values")  # another run on the unedited model, meeting the same edit
    W = mlp_out_module(model, 0)
    saved = W.weight.detach().clone()
    with torch.no_grad():
        W.weight.add_(0.05)
    try:
        edited = again.values(model, tok, REQUESTS[:1], 2, templates, VALUE, progress=False)
        assert (again.hits, again.misses) == (3, 1)
        assert not torch.equal(edited.v0[0], first.v0[0])
        assert len(list((again.root / "edited").glob("*/*.safetensors"))) == 1
        reused = later.values(model, tok, REQUESTS[:1], 2, templates, VALUE, progress=False)
        assert (later.hits, later.misses) == (1, 0) and torch.equal(reused.delta, edited.delta)
    finally:
        with torch.no_grad():
            W.weight.copy_(saved)  # bit-exact: the module-scoped model is shared with later tests


def test_rome_reuses_values_only_in_the_same_model_state(tiny, tokenizer, tmp_path):
    """ROME's second request is edited on top of the first: its v* must not come from the unedited model,
    but the same sequence made again passes through the same states and reuses every v*, bit for bit."""
    from lmedit.locate.value_store import ValueStore, model_state

    model, tok = tiny.model, tokenizer
    rome = get_editor("rome")
    config = rome.config_cls(layers=(1,), identity_cov=True, value=VALUE, **CONTEXT)
    store = ValueStore(model, None)
    patch = rome.edit(model, tok, REQUESTS[:2], config, progress=False, values=store)
    assert (store.hits, store.misses) == (0, 2)
    again = rome.edit(model, tok, REQUESTS[:1], config, progress=False, values=store)
    assert (store.hits, store.misses) == (1, 2)
    replay = rome.edit(model, tok, REQUESTS[:2], config, progress=False, values=store)
    assert (store.hits, store.misses) == (3, 2)
    plain = rome.fn(model, tok, REQUESTS[:1], config, progress=False)
    name = next(iter(plain.deltas))
    assert torch.equal(again.deltas[name].full(), plain.deltas[name].full())
    assert not torch.equal(patch.deltas[name].full(), plain.deltas[name].full())
    assert torch.equal(replay.deltas[name].full(), patch.deltas[name].full())
    # the second edit's v* was optimised on the edited model, not taken from the unedited one
    assert len({state for state, _ in store.memory}) == 2 and model_state(model) == store.state


@pytest.mark.parametrize("kind", ["gpt2", "gptj", "gpt_neox", "llama", "qwen2", "gemma3_text"])
def test_replayed_lower_layers_give_the_reference_values(kind, tiny_model, tokenizer, monkeypatch):
    """v* with the prefixes cached and layers below the edit layer replayed = full prompts through every layer
    at every step (float64), for every layer output form (tensor, GPT-J's tuple)."""
    from lmedit.locate.batching import PrefixCache

    model = copy.deepcopy(_editable(tiny_model(kind)).model).to(torch.float64)
    templates = context_templates(model, tokenizer, CONTEXT["n_context"], CONTEXT["context_length"], CONTEXT["seed"])
    calls = {"replayed": 0}
    original = PrefixCache._replaying

    def counting(self, hidden):
        calls["replayed"] += 1
        return original(self, hidden)

    monkeypatch.setattr(PrefixCache, "_replaying", counting)
    cached = compute_values(model, tokenizer, REQUESTS, 2, templates, VALUE, progress=False)
    monkeypatch.undo()
    full = compute_values(model, tokenizer, REQUESTS, 2, templates, VALUE, progress=False, cache_prefix=False)
    assert calls["replayed"] >= 1  # the optimisation steps did run on replayed layers
    assert cached.steps.tolist() == full.steps.tolist()
    torch.testing.assert_close(cached.v0, full.v0, atol=1e-9, rtol=0)
    torch.testing.assert_close(cached.delta, full.delta, atol=1e-6, rtol=0)
    assert all(type(m).__name__ != "_Replay" for m in model.modules())  # the real layers are back
