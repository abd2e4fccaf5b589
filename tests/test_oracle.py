"""lmedit's fast locate-then-edit path against the plain oracle (tests/oracle.py), in float64.

ROME, MEMIT and EMMET on tiny random gpt2, llama, qwen2 and gemma3_text models (six layers), for 1, 2 and 5
edit layers, batches of 1, 4 and 16 requests, one batch (batch mode) or two batches one after another
(sequential): the same ΔW to a relative error of 1e-6, the same δ and the same keys. Before the residual-
stream fix (z, v0 and δ at W_L's output, uniform k*) every MEMIT case failed against this oracle, with relative
ΔW errors of 0.97 to 18 (measured once by reverting the fix locally).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import oracle
from lmedit.editors import get_editor
from lmedit.locate.context import context_templates
from lmedit.locate.keys import read_at_subject
from lmedit.locate.values import ValueConfig, compute_values
from lmedit.models.arch import mlp_out_name
from lmedit.requests import EditRequest

ARCHS = ["gpt2", "llama", "qwen2", "gemma3_text"]
TOL = 1e-6

_SUBJECTS = ["Danielle Darrieux", "The Eiffel Tower", "Toyota", "Paris", "Miles Davis", "the Nile", "Apple",
             "Leonardo da Vinci", "Mount Fuji", "BBC", "Johann Sebastian Bach", "Lake Geneva", "Nokia",
             "Marie Curie", "the Amazon", "Tokyo", "Pablo Picasso", "Harvard University", "Sony", "Vienna",
             "Ludwig van Beethoven", "the Danube", "Boeing", "Oslo", "Frida Kahlo", "Stanford", "Siemens",
             "the Thames", "Rome", "Louis Armstrong", "Microsoft", "the Alps"]
_PROMPTS = ["{} is located in", "The home of {} is", "{} was founded in the city of", "People say {} speaks"]
_TARGETS = ["Rome", "English", "Berlin", "Tokyo", "French", "London", "Madrid", "Paris"]
REQUESTS = [EditRequest(_PROMPTS[i % 4].format(s), s, _TARGETS[i % 8], None) for i, s in enumerate(_SUBJECTS)]
REQUESTS = REQUESTS[3:] + REQUESTS[:3]  # the first (the batch of one) is far from every model's early stop

# A random model barely learns a target in a few steps, so the early stop is set inside each model's spread of
# losses: some requests stop (and leave the batch) at once or part-way, the others run every step. The clamp
# and the weight decay act; few steps keep the pure oracle quick.
VALUE = ValueConfig(steps=4, lr=0.5, weight_decay=1e-3, clamp_norm_factor=20.0)
EARLY_STOP = {"gpt2": 18.0, "llama": 14.5, "qwen2": 14.0, "gemma3_text": 14.1}
CONTEXT = dict(n_context=2, context_length=5, seed=0)  # two prefixes: the kinds' weights (½, ¼, ¼) matter
LAYERS = {1: (3,), 2: (2, 3), 5: (0, 1, 2, 3, 4)}


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMEDIT_CACHE", str(tmp_path_factory.mktemp("lmedit-cache")))
        yield


@pytest.fixture(scope="module", autouse=True)
def gemma_norm_in_float64():
    """Gemma's RMSNorm computes in float32 whatever the model's dtype; the comparison needs float64 throughout,
    so for these tests it computes in its input's dtype (the same function, without the cast)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    def forward(self, x):
        return self._norm(x) * (1.0 + self.weight)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Gemma3RMSNorm, "forward", forward)
        yield


def _six_layers(kind, vocab):
    import transformers as tf

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if kind == "gpt2":
        return tf.GPT2Config(n_layer=6, n_embd=32, n_head=4, n_positions=128, vocab_size=vocab, **ids)
    like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, vocab_size=vocab, **ids)
    if kind == "llama":
        return tf.LlamaConfig(**like)
    if kind == "qwen2":
        return tf.Qwen2Config(**like)
    return tf.Gemma3TextConfig(**like, head_dim=8, sliding_window=16)


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(_six_layers(request.param, len(tokenizer))).to(torch.float64).eval()
    with torch.no_grad():
        if request.param == "gemma3_text":  # a post-MLP norm with a non-trivial gain
            for block in oracle.blocks(m):
                block.post_feedforward_layernorm.weight.normal_(0.0, 0.3)
        m.get_output_embeddings().weight.mul_(30.0)  # sharper logits: δ moves the loss
    m.oracle_value = dataclasses.replace(VALUE, early_stop_loss=EARLY_STOP[request.param])
    return m


def _templates(model, tok):
    return context_templates(model, tok, CONTEXT["n_context"], CONTEXT["context_length"], CONTEXT["seed"])


def _fast(model, tok, method, batches, layers, **solver):
    """ΔW per edit layer from lmedit's editor, batches made one after another (the sequential runner's way)."""
    editor = get_editor(method)
    config = editor.config_cls(layers=layers, identity_cov=True, **CONTEXT, **solver)
    config = dataclasses.replace(config, value=dataclasses.replace(model.oracle_value, site=config.value.site))
    before = {l: oracle.W_matrix(model, l).detach().clone() for l in layers}
    handles = []
    try:
        for batch in batches:
            handles.append(editor.fn(model, tok, batch, config, progress=False).apply(model))
        return {l: oracle.W_matrix(model, l).detach() - before[l] for l in layers}
    finally:
        for h in reversed(handles):
            h.revert()


def _oracle(model, tok, method, batches, layers, lam=1.0, mu=0.0):
    value = model.oracle_value
    model = copy.deepcopy(model)
    before = {l: oracle.W_matrix(model, l).detach().clone() for l in layers}
    templates = _templates(model, tok)
    for batch in batches:
        if method == "rome":
            oracle.rome(model, tok, batch, templates, layers[0], dataclasses.replace(value, site="mlp_out"))
        else:
            solver = "least_squares" if method == "memit" else "equality"
            oracle.edit_batch(model, tok, batch, templates, layers, solver, lam, mu, value)
    return {l: oracle.W_matrix(model, l).detach() - before[l] for l in layers}


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _compare(fast, plain):
    for l in plain:
        assert plain[l].norm() > 1e-6, f"layer {l}: the oracle's edit is a no-op; the test would prove nothing"
        err = float((fast[l] - plain[l]).norm() / plain[l].norm())
        assert err <= TOL, f"layer {l}: relative error of ΔW {err:.2e}"


def _batches(size, mode):
    if mode == "batch":
        return [REQUESTS[:size]]
    return [REQUESTS[:size], REQUESTS[size:2 * size]]


@pytest.mark.parametrize("mode", ["batch", "sequential"])
@pytest.mark.parametrize("size", [1, 4, 16])
@pytest.mark.parametrize("n_layers", [1, 2, 5])
def test_memit_matches_oracle(model, tokenizer, n_layers, size, mode):
    batches, layers = _batches(size, mode), LAYERS[n_layers]
    fast = _fast(model, tokenizer, "memit", batches, layers, mom2_weight=0.5)
    _compare(fast, _oracle(model, tokenizer, "memit", batches, layers, lam=0.5))


@pytest.mark.parametrize("mode", ["batch", "sequential"])
@pytest.mark.parametrize("size", [1, 4, 16])
@pytest.mark.parametrize("n_layers", [1, 2, 5])
def test_emmet_matches_oracle(model, tokenizer, n_layers, size, mode):
    batches, layers = _batches(size, mode), LAYERS[n_layers]
    fast = _fast(model, tokenizer, "emmet", batches, layers, mom2_weight=1.0, mu=0.05)
    _compare(fast, _oracle(model, tokenizer, "emmet", batches, layers, lam=1.0, mu=0.05))


@pytest.mark.parametrize("mode", ["batch", "sequential"])
@pytest.mark.parametrize("size", [1, 4, 16])
def test_rome_matches_oracle(model, tokenizer, size, mode):
    batches = _batches(size, mode)
    fast = _fast(model, tokenizer, "rome", batches, (3,))
    _compare(fast, _oracle(model, tokenizer, "rome", batches, (3,)))


@pytest.mark.parametrize("site", ["residual", "mlp_out"])
def test_values_match_oracle(model, tokenizer, site):
    """The same v0 and δ as the oracle's one-request, whole-prompt optimisation, for a batch of 16."""
    templates, cfg = _templates(model, tokenizer), dataclasses.replace(model.oracle_value, site=site)
    fast = compute_values(model, tokenizer, REQUESTS[:16], 3, templates, cfg, progress=False)
    assert len(set(fast.steps.tolist())) > 1, "some requests should stop early, others not"
    for i, req in enumerate(REQUESTS[:16]):
        v0, delta = oracle.v_star(model, tokenizer, req, templates, 3, cfg)
        assert _rel(fast.v0[i], v0) <= TOL
        assert _rel(fast.delta[i], delta) <= TOL  # δ = 0 on both sides for a request that stopped at once


@pytest.mark.parametrize("average", ["by_kind", "uniform"])
def test_keys_match_oracle(model, tokenizer, average):
    templates = _templates(model, tokenizer)
    keys, outs = read_at_subject(model, tokenizer, REQUESTS, templates, [1, 4], {"z": (4, "residual")},
                                 key_average=average)
    for i, req in enumerate(REQUESTS):
        for l in (1, 4):
            want = oracle.k_star(model, tokenizer, req, templates, l, average)
            assert _rel(keys[l][i], want) <= TOL
        assert _rel(outs["z"][i], oracle.site_value(model, tokenizer, req, 4, "residual")) <= TOL


def test_oracle_sees_the_old_spreading_bug(model, tokenizer):
    """z read at W_L's output (the old code) gives a different multi-layer edit than the oracle: the check
    above can fail. The one-layer edit is the same either way (z at W_L's output and h_L differ by a constant
    that cancels in z* − z) — except through Gemma's post-MLP norm."""
    layers, batches = LAYERS[5], _batches(4, "batch")
    plain = _oracle(model, tokenizer, "memit", batches, layers, lam=0.5)
    templates = _templates(model, tokenizer)
    old = copy.deepcopy(model)
    before = {l: oracle.W_matrix(old, l).detach().clone() for l in layers}
    cfg = dataclasses.replace(model.oracle_value, site="mlp_out")
    found = [oracle.v_star(old, tokenizer, r, templates, layers[-1], cfg) for r in batches[0]]
    z_star = torch.stack([v0 + d for v0, d in found])
    for i, l in enumerate(layers):
        K = torch.stack([oracle.k_star(old, tokenizer, r, templates, l) for r in batches[0]]).T
        z = torch.stack([oracle.W_output(old, tokenizer, r, layers[-1]) for r in batches[0]])
        R = ((z_star - z) / (len(layers) - i)).T
        oracle.add_to_W(old, l, R @ K.T @ torch.linalg.inv(0.5 * torch.eye(K.shape[0], dtype=torch.float64) + K @ K.T))
    worst = max(float(((oracle.W_matrix(old, l) - before[l]) - plain[l]).norm() / plain[l].norm()) for l in layers)
    assert worst > 1e-2, worst


def test_edit_patch_names_every_layer(model, tokenizer):
    config = get_editor("memit").config_cls(layers=LAYERS[2], identity_cov=True, mom2_weight=0.5, value=model.oracle_value,
                                            **CONTEXT)
    patch = get_editor("memit").fn(model, tokenizer, REQUESTS[:4], config, progress=False)
    assert sorted(patch.deltas) == sorted(f"{mlp_out_name(model, l)}.weight" for l in LAYERS[2])
    assert patch.meta["v_star"]["site"] == "residual"
    assert len(patch.meta["v_star"]["z_reached"]) == 4
