"""Patch invariants on tiny random GPT-2 (Conv1D, transposed storage) and Llama models."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmedit.errors import InputError, LmeditError
from lmedit.patches import Delta, Patch, compose, fingerprint


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=32,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


# Targets: an MLP output weight (GPT-2's Conv1D is stored (in, out) = (64, 16)), plus a second matrix.
TARGETS = {
    "gpt2": (tiny_gpt2, ["transformer.h.1.mlp.c_proj.weight", "transformer.h.0.mlp.c_fc.weight"]),
    "llama": (tiny_llama, ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]),
}


def make_delta(shape, kind, rank=2, scale=0.1):
    if kind == "dense":
        return Delta(dense=scale * torch.randn(shape))
    return Delta(left=scale * torch.randn(shape[0], rank), right=scale * torch.randn(rank, shape[1]))


def make_patch(model, names, kind, **kw):
    params = dict(model.named_parameters())
    deltas = {n: make_delta(tuple(params[n].shape), kind, **kw) for n in names}
    return Patch.build(model, deltas, method="test", requests=[{"prompt": "p", "target": "t"}])


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), n


@pytest.mark.parametrize("arch", TARGETS)
@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_apply_adds_exactly_delta_and_revert_is_bit_exact(arch, kind):
    build, names = TARGETS[arch]
    model = build()
    before = snapshot(model)
    patch = make_patch(model, names, kind)
    handle = patch.apply(model)
    for n, p in model.named_parameters():
        expected = before[n] + patch.deltas[n].full() if n in names else before[n]
        assert torch.equal(p, expected), n
    handle.revert()
    assert_same(model, before)
    with pytest.raises(LmeditError):
        handle.revert()


def test_gpt2_conv1d_delta_is_in_storage_layout():
    model = tiny_gpt2()
    name = "transformer.h.0.mlp.c_fc.weight"
    assert tuple(model.get_parameter(name).shape) == (16, 64)  # Conv1D: (in, out)
    with pytest.raises(InputError, match="transposed"):
        Patch({name: Delta(dense=torch.ones(64, 16))}).apply(model)
    # Storage layout: row i of a Conv1D weight belongs to input feature i, so ΔW[3] = 1 adds x[3] to every output.
    dW = torch.zeros(16, 64)
    dW[3] = 1.0
    fc = model.transformer.h[0].mlp.c_fc
    x = torch.randn(5, 16)
    with torch.no_grad():
        y0 = fc(x)
        with Patch({name: Delta(dense=dW)}).apply(model):
            y1 = fc(x)
    torch.testing.assert_close(y1 - y0, x[:, 3:4].expand(5, 64), atol=1e-5, rtol=0)


def test_revert_is_bit_exact_in_bfloat16():
    model = tiny_llama().to(torch.bfloat16)
    before = snapshot(model)
    patch = make_patch(model, TARGETS["llama"][1], "lowrank", scale=1e-3)
    handle = patch.apply(model)
    assert not torch.equal(model.get_parameter(TARGETS["llama"][1][0]), before[TARGETS["llama"][1][0]])
    handle.revert()
    assert_same(model, before)


def test_context_manager_reverts_on_exception():
    model = tiny_llama()
    before = snapshot(model)
    patch = make_patch(model, TARGETS["llama"][1], "dense")
    with pytest.raises(RuntimeError, match="boom"):
        with patch.apply(model):
            assert not torch.equal(model.get_parameter(TARGETS["llama"][1][0]), before[TARGETS["llama"][1][0]])
            raise RuntimeError("boom")
    assert_same(model, before)


def test_apply_refuses_a_different_base():
    patch = make_patch(tiny_gpt2(seed=0), TARGETS["gpt2"][1], "lowrank")
    other = tiny_gpt2(seed=1)
    before = snapshot(other)
    with pytest.raises(InputError, match="different base model"):
        patch.apply(other)
    assert_same(other, before)
    # The same model already carrying the edit is a different base too.
    model = tiny_gpt2(seed=0)
    with patch.apply(model):
        with pytest.raises(InputError, match="different base model"):
            patch.apply(model)


def test_fingerprint_sees_dtype_and_values():
    model = tiny_llama()
    names = TARGETS["llama"][1]
    fp = fingerprint(model, names)
    assert fp == fingerprint(model, list(reversed(names)))  # order-free
    assert fp != fingerprint(tiny_llama().to(torch.bfloat16), names)
    with torch.no_grad():
        model.get_parameter(names[0])[0, 0] += 1e-3
    assert fp != fingerprint(model, names)


def test_unknown_name_suggests_close_valid_names():
    model = tiny_gpt2()
    patch = Patch({"transformer.h.0.mlp.c_fc.weights": Delta(dense=torch.zeros(16, 64))})
    with pytest.raises(InputError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight\b"):
        patch.apply(model)


def test_save_load_round_trip(tmp_path):
    model = tiny_llama()
    names = TARGETS["llama"][1]
    dense, low = make_patch(model, names[:1], "dense"), make_patch(model, names[1:], "lowrank")
    patch = Patch.build(model, {**dense.deltas, **low.deltas}, method="test", config={"layers": [1]},
                        requests=[{"prompt": "p", "target": "t"}], metrics={"efficacy": 1.0}, model_name="tiny")
    patch.save(tmp_path / "p")
    loaded = Patch.load(tmp_path / "p")
    assert loaded.meta == patch.meta
    assert set(loaded.deltas) == set(patch.deltas)
    for n, d in patch.deltas.items():
        e = loaded.deltas[n]
        assert e.kind == d.kind
        for part in ("dense", "left", "right"):
            a, b = getattr(d, part), getattr(e, part)
            assert (a is None and b is None) or (torch.equal(a, b) and a.dtype == b.dtype)
    doc = json.loads((tmp_path / "p" / "patch.json").read_text())
    assert doc["format"] == "lmedit-patch/1"
    assert doc["deltas"][names[1]] == {"kind": "lowrank", "shape": [16, 16], "rank": 2}
    # The loaded patch still knows its base.
    before = snapshot(model)
    loaded.apply(model).revert()
    assert_same(model, before)


def test_save_refuses_existing_dir_unless_forced(tmp_path):
    model = tiny_gpt2()
    a, b = make_patch(model, TARGETS["gpt2"][1], "dense"), make_patch(model, TARGETS["gpt2"][1][:1], "lowrank")
    a.save(tmp_path / "p")
    with pytest.raises(InputError, match="already exists"):
        b.save(tmp_path / "p")
    b.save(tmp_path / "p", force=True)
    assert set(Patch.load(tmp_path / "p").deltas) == set(b.deltas)


@pytest.mark.parametrize("damage", ["bad_json", "no_tensors", "renamed_delta", "wrong_shape", "wrong_format"])
def test_load_rejects_damaged_patch(tmp_path, damage):
    model = tiny_gpt2()
    make_patch(model, TARGETS["gpt2"][1], "lowrank").save(tmp_path / "p")
    meta_file = tmp_path / "p" / "patch.json"
    doc = json.loads(meta_file.read_text())
    if damage == "bad_json":
        meta_file.write_text(meta_file.read_text()[:-20])
    elif damage == "no_tensors":
        (tmp_path / "p" / "patch.safetensors").unlink()
    else:
        if damage == "renamed_delta":
            doc["deltas"]["x.weight"] = doc["deltas"].pop(TARGETS["gpt2"][1][0])
        elif damage == "wrong_shape":
            doc["deltas"][TARGETS["gpt2"][1][0]]["shape"] = [1, 2]
        else:
            doc["format"] = "something-else/9"
        meta_file.write_text(json.dumps(doc))
    with pytest.raises(InputError):
        Patch.load(tmp_path / "p")


def test_compose_equals_sequential_application():
    model = tiny_llama()
    base = snapshot(model)
    w1, w2 = TARGETS["llama"][1]
    # Each part is made on the model with the earlier parts applied, as an editing session would.
    p1 = make_patch(model, [w1], "lowrank")
    h1 = p1.apply(model)
    p2 = make_patch(model, [w1], "lowrank", rank=3)
    h2 = p2.apply(model)
    p3 = make_patch(model, [w1, w2], "dense")
    h3 = p3.apply(model)
    sequential = snapshot(model)
    for h in (h3, h2, h1):
        h.revert()
    assert_same(model, base)

    both_lowrank = compose(p1, p2)
    assert both_lowrank.deltas[w1].kind == "lowrank" and both_lowrank.deltas[w1].rank == 5
    composed = compose(p1, p2, p3)
    assert composed.deltas[w1].kind == "dense"
    assert [m["method"] for m in composed.meta["composed_of"]] == ["test"] * 3
    with composed.apply(model):  # checks the first part's base fingerprint
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, sequential[n], atol=1e-6, rtol=0)
    assert_same(model, base)


def test_from_matrix_norms_and_summary():
    torch.manual_seed(0)
    low = torch.randn(40, 2) @ torch.randn(2, 30)
    d = Delta.from_matrix(low, max_rank=4)
    assert d.kind == "lowrank" and d.rank == 2 and d.numel == 2 * 70
    torch.testing.assert_close(d.full(), low, atol=1e-5, rtol=1e-5)
    assert Delta.from_matrix(torch.randn(40, 30), max_rank=4).kind == "dense"
    assert Delta.from_matrix(low).kind == "dense"
    assert d.norm() == pytest.approx(float(torch.linalg.norm(low)), rel=1e-5)
    patch = Patch({"a.weight": d, "b.weight": Delta(dense=low)})
    assert patch.num_params == 140 + 1200
    assert patch.norms()["a.weight"] == pytest.approx(patch.norms()["b.weight"], rel=1e-5)
    lines = patch.summary().splitlines()
    assert len(lines) == 2 and "lowrank" in lines[0] and "40x30" in lines[0] and "rank=2" in lines[0]


def test_saved_patch_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    import torch

    from lmedit.patches import Delta, Patch

    mask = os.umask(0o022)
    try:
        Patch({"w": Delta(dense=torch.zeros(2, 2))}, {"method": "test"}).save(tmp_path / "p")
    finally:
        os.umask(mask)
    for name in ("patch.json", "patch.safetensors"):
        assert stat.S_IMODE((tmp_path / "p" / name).stat().st_mode) == 0o644
