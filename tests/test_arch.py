"""The architecture table, hooks and the prefix-cached batch forward, on a tiny random model of every family."""

import pytest
import torch
from conftest import TINY_KINDS

from lmedit.errors import InputError
from lmedit.locate.batching import PrefixCache, SplitBatch, body
from lmedit.models.arch import (ARCHITECTURES, arch_for, check_layer, mlp_out_dims, mlp_out_module, mlp_out_name,
                                num_layers, weight_as_matrix)
from lmedit.models.hooks import StopForward, capture_io, edit_output, run_until_stop


@pytest.fixture(scope="module", params=TINY_KINDS)
def loaded(request, tiny_model):
    return tiny_model(request.param)


def _no_hooks(model):
    return all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_row_resolves(loaded):
    model = loaded.model
    kind = model.config.model_type
    assert loaded.arch is ARCHITECTURES[kind] is arch_for(model)
    assert num_layers(model) == 4
    hidden = 32
    inner = 4 * hidden if kind in ("gpt2", "gptj") else 64
    for layer in range(4):
        W = mlp_out_module(model, layer)
        assert isinstance(W, torch.nn.Module) and hasattr(W, "weight")
        assert mlp_out_dims(model, layer) == (hidden, inner)
        assert tuple(weight_as_matrix(W, loaded.arch.transposed).shape) == (hidden, inner)
        assert mlp_out_name(model, layer) in dict(model.named_modules())
    assert loaded.arch.transposed == (kind == "gpt2")


def test_hooks_capture_input_and_clean_up(loaded, tokenizer):
    model = loaded.model
    W = mlp_out_module(model, 2)
    ids = tokenizer(["The capital of France is", "Hello"], return_tensors="pt", padding=True)
    with capture_io({"w": W}, inputs=True, outputs=True) as store:
        assert len(W._forward_hooks) == 1
        model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    assert _no_hooks(model)
    k, v = store["w"]["input"], store["w"]["output"]
    seq = ids["input_ids"].shape[1]
    assert k.shape == (2, seq, mlp_out_dims(model, 2)[1])
    assert v.shape == (2, seq, 32)
    # what was captured really is W's input: W k (+ bias) gives the captured output
    Wm = weight_as_matrix(W, loaded.arch.transposed)
    bias = W.bias if getattr(W, "bias", None) is not None else 0.0
    torch.testing.assert_close(k @ Wm.T + bias, v, atol=1e-5, rtol=1e-5)


def test_hooks_removed_after_exception(loaded, tokenizer):
    model = loaded.model
    W = mlp_out_module(model, 1)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with pytest.raises(RuntimeError, match="boom"):
        with capture_io({"w": W, "w3": mlp_out_module(model, 3)}, inputs=True, outputs=True):
            model(input_ids=ids)
            raise RuntimeError("boom")
    assert _no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with edit_output(W, lambda out: out * 0):
            assert len(W._forward_hooks) == 1
            raise RuntimeError("boom")
    assert _no_hooks(model)
    # stop_after ends the forward right after the named module, and its hooks go too
    with capture_io({"w": W}, inputs=True, stop_after="w") as store:
        run_until_stop(lambda: model(input_ids=ids))
    assert store["w"]["input"].shape[1] == ids.shape[1]
    assert _no_hooks(model)
    with pytest.raises(StopForward):
        with capture_io({"w": W}, stop_after="w"):
            model(input_ids=ids)
    assert _no_hooks(model)


def test_edit_output_changes_the_forward(loaded, tokenizer):
    model = loaded.model
    W = mlp_out_module(model, 3)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    shift = torch.randn(32, generator=torch.Generator().manual_seed(0))  # not constant: a final LayerNorm removes that
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with edit_output(W, lambda out: out + shift):
            edited = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, edited, atol=1e-4)
    assert torch.equal(before, after)


def _plain_final_hidden(model, ids):
    with torch.no_grad():
        return body(model)(input_ids=torch.tensor([ids])).last_hidden_state[0]


def test_prefix_cache_matches_plain_forward(loaded, tokenizer):
    model = loaded.model
    g = torch.Generator().manual_seed(1)
    # prefix lengths 0 (split at the first token), short, beyond gemma3's sliding window (16), and one longer row
    lengths_splits = [(6, 0), (9, 3), (30, 20), (12, 7), (25, 24)]
    rows = [torch.randint(3, len(tokenizer), (n,), generator=g).tolist() for n, _ in lengths_splits]
    splits = [s for _, s in lengths_splits]
    batch = SplitBatch.build(rows, splits, tokenizer.pad_token_id, "cpu")
    assert batch.prefix_ids.shape == (5, 24) and batch.suffix_ids.shape == (5, 10)
    cache = PrefixCache(model, batch)
    with torch.no_grad():
        got = cache.forward(torch.arange(len(rows)))
        subset = torch.tensor([3, 0, 2])
        got_subset = cache.forward(subset)
        chunked = PrefixCache(model, batch, chunk=2).forward(torch.arange(len(rows)))  # prefixes in 3 chunks
    torch.testing.assert_close(chunked, got, atol=1e-6, rtol=1e-6)
    for i, (ids, s) in enumerate(zip(rows, splits)):
        want = _plain_final_hidden(model, ids)[s:]
        torch.testing.assert_close(got[i, : len(ids) - s], want, atol=1e-5, rtol=1e-5)
    for j, i in enumerate(subset.tolist()):
        want = _plain_final_hidden(model, rows[i])[splits[i]:]
        torch.testing.assert_close(got_subset[j, : len(rows[i]) - splits[i]], want, atol=1e-5, rtol=1e-5)
    # a subset runs only as wide as its own longest suffix: the batch's padding beyond it is never computed
    with torch.no_grad():
        short = cache.forward(torch.tensor([3, 1]))  # suffixes of 5 and 6 tokens
    assert got.shape[1] == 10 and short.shape[1] == 6
    torch.testing.assert_close(short[1], got[1, :6], atol=1e-6, rtol=1e-6)


def test_replayed_rows_recorded_in_narrower_groups(loaded, tokenizer):
    """Rows first run (and their layer-L inputs recorded) in narrow groups, then replayed together in a wider one:
    the columns a row never had are padding, and every real token still equals a plain forward."""
    model = loaded.model
    g = torch.Generator().manual_seed(3)
    lengths_splits = [(8, 6), (12, 3), (9, 2), (5, 4)]  # suffixes of 2, 9, 7 and 1 tokens
    rows = [torch.randint(3, len(tokenizer), (n,), generator=g).tolist() for n, _ in lengths_splits]
    splits = [s for _, s in lengths_splits]
    cache = PrefixCache(model, SplitBatch.build(rows, splits, tokenizer.pad_token_id, "cpu"), frozen_layers=2)
    with torch.no_grad():
        narrow = [cache.forward(torch.tensor(group)) for group in ([0, 3], [2], [1])]  # record: widths 2, 7, 9
        assert [h.shape[1] for h in narrow] == [2, 7, 9] and bool(cache.recorded.all())
        replayed = cache.forward(torch.tensor([3, 0, 2]))  # replay: width 7
    assert replayed.shape[1] == 7
    for j, i in enumerate([3, 0, 2]):
        want = _plain_final_hidden(model, rows[i])[splits[i]:]
        torch.testing.assert_close(replayed[j, : len(rows[i]) - splits[i]], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mistral", "gemma3_text"])
def test_prefix_cache_with_a_short_sliding_window(kind, tokenizer):
    """Prefixes longer than the attention window: the cached keys must still line up with the mask."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from lmedit.models.loading import _finish

    config = tiny_config(kind, len(tokenizer))
    config.sliding_window = 8
    torch.manual_seed(0)
    model = _finish(AutoModelForCausalLM.from_config(config), tokenizer, kind).model
    g = torch.Generator().manual_seed(2)
    lengths_splits = [(14, 12), (6, 2), (20, 0)]
    rows = [torch.randint(3, len(tokenizer), (n,), generator=g).tolist() for n, _ in lengths_splits]
    splits = [s for _, s in lengths_splits]
    with torch.no_grad():
        got = PrefixCache(model, SplitBatch.build(rows, splits, tokenizer.pad_token_id, "cpu")).forward(torch.arange(3))
    for i, (ids, s) in enumerate(zip(rows, splits)):
        torch.testing.assert_close(got[i, : len(ids) - s], _plain_final_hidden(model, ids)[s:], atol=1e-5, rtol=1e-5)


def test_prefix_cache_all_prefixes_empty(loaded, tokenizer):
    model = loaded.model
    rows = [tokenizer("The capital of France is")["input_ids"], tokenizer("Hello there")["input_ids"]]
    batch = SplitBatch.build(rows, [0, 0], tokenizer.pad_token_id, "cpu")
    assert batch.prefix_ids.shape[1] == 0
    with torch.no_grad():
        got = PrefixCache(model, batch).forward(torch.arange(2))
    for i, ids in enumerate(rows):
        torch.testing.assert_close(got[i, : len(ids)], _plain_final_hidden(model, ids), atol=1e-5, rtol=1e-5)


def test_layer_out_of_range(loaded):
    model = loaded.model
    for bad in (4, -1, 100):
        with pytest.raises(InputError, match=r"0\.\.3"):
            mlp_out_module(model, bad)
    with pytest.raises(InputError, match=r"0\.\.3"):
        check_layer(model, 4)
    assert check_layer(model, 3) == 3


def test_unknown_model_type_is_input_error(tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    from lmedit.models.loading import _finish

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))
    with pytest.raises(InputError, match=r"unknown model architecture 'opt'.*llama"):
        _finish(model, tokenizer, "tiny-opt")
    with pytest.raises(InputError, match="unknown model architecture"):
        mlp_out_module(model, 0)


def test_every_role_resolves_and_unembedding_gives_the_logits(loaded, tokenizer):
    """Each path in the row names a real module, and unembed(body(x)) equals the model's own logits."""
    from lmedit.locate.batching import body, unembed
    from lmedit.models.arch import get_module

    arch = loaded.arch
    for path in (arch.layers, arch.final_norm, arch.unembed, arch.embed):
        get_module(loaded.model, path)
    block = get_module(loaded.model, arch.layers)[0]
    for path in (arch.mlp_in, arch.mlp_out, arch.attn_out):
        get_module(block, path)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits
        got = unembed(loaded.model, body(loaded.model)(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_converted_model_cache_keeps_the_first_complete_copy(tiny_model, tmp_path):
    """Two processes converting the embedded model at once: the second keeps the first's copy, leaves no temporary
    directory behind, and an incomplete copy from an interrupted run is replaced."""
    from safetensors.torch import load_file

    from lmedit.models.loading import _cache_converted

    lm = tiny_model("llama")
    cached = tmp_path / "models" / "tiny"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")  # interrupted: no weights
    _cache_converted(lm.model, lm.tokenizer, cached)
    first = load_file(cached / "model.safetensors")
    with torch.no_grad():
        lm.model.model.embed_tokens.weight.add_(1.0)  # a different conversion result
    _cache_converted(lm.model, lm.tokenizer, cached)
    kept = load_file(cached / "model.safetensors")
    assert torch.equal(kept["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    assert sorted(p.name for p in cached.parent.iterdir()) == ["tiny"]
