"""Backpack models (backpack/model.py), sense fine-tuning (backpack/senses.py) and the ensemble (backpack/ensemble.py),
on a tiny random Backpack with SmolLM2's tokenizer and the hand-made country_capital files of test_canonical_run."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lmedit import cli
from lmedit.backpack import senses as se
from lmedit.errors import InputError
from lmedit.evaluate import canonical_config as cc
from lmedit.evaluate import canonical_run as cr
from lmedit.evaluate.degradation import BaselineCache
from lmedit.evaluate.scoring import continuation_logprobs
from lmedit.models.backpack import SenseEdits
from lmedit.backpack.ensemble import EnsembleLM
from lmedit.models.loading import load_model
from test_canonical_run import GENERAL, SPLIT, _assert_unchanged, _snapshot, data_dir  # noqa: F401 (fixture)

PUBLIC_NAMES = {  # parameter names of stanfordnlp/backpack-gpt2 beyond its GPT-2 (`backpack.gpt2_model.*`)
    "backpack.sense_network.block.ln_1.weight", "backpack.sense_network.block.ln_1.bias",
    "backpack.sense_network.block.ln_2.weight", "backpack.sense_network.block.ln_2.bias",
    "backpack.sense_network.block.mlp.c_fc.weight", "backpack.sense_network.block.mlp.c_fc.bias",
    "backpack.sense_network.block.mlp.c_proj.weight", "backpack.sense_network.block.mlp.c_proj.bias",
    "backpack.sense_network.ln.weight", "backpack.sense_network.ln.bias",
    "backpack.sense_network.final_mlp.c_fc.weight", "backpack.sense_network.final_mlp.c_fc.bias",
    "backpack.sense_network.final_mlp.c_proj.weight", "backpack.sense_network.final_mlp.c_proj.bias",
    "backpack.sense_weight_net.c_attn.weight", "backpack.sense_weight_net.c_attn.bias",
}


@pytest.fixture(scope="module")
def bp(tiny_model):
    return tiny_model("backpack-gpt2")


def _ids(tok, text):
    return torch.tensor([tok(text)["input_ids"]])


def test_layout_matches_the_public_checkpoint(bp):
    m = bp.model
    names = set(m.state_dict())
    assert PUBLIC_NAMES <= names
    assert {n for n in names if not n.startswith("backpack.gpt2_model.")} - {"lm_head.weight"} == PUBLIC_NAMES
    d, k = m.config.n_embd, m.config.num_senses
    assert m.state_dict()["backpack.sense_network.final_mlp.c_proj.weight"].shape == (4 * d, k * d)  # Conv1D (in, out)
    assert m.state_dict()["backpack.sense_weight_net.c_attn.weight"].shape == (2 * d, d)  # Linear (out, in)
    assert m.lm_head.weight is m.backpack.gpt2_model.wte.weight  # tied


def test_output_is_the_alpha_weighted_sum_of_senses(bp, tokenizer):
    m, ids = bp.model, _ids(tokenizer, "The capital of France is Paris")
    with torch.no_grad():
        out = m.backpack(ids)
        alpha = out.contextualization[0]  # (k, s, s)
        senses = m.backpack.sense_network(m.backpack.gpt2_model.wte(ids))[0]  # (k, s, d)
        s = ids.shape[1]
        by_hand = torch.stack([sum(alpha[l, i, j] * senses[l, j] for l in range(alpha.shape[0]) for j in range(s))
                               for i in range(s)])
        assert torch.allclose(out.last_hidden_state[0], by_hand, atol=1e-5)
        assert torch.allclose(alpha.sum(-1), torch.ones(alpha.shape[:2]), atol=1e-6)  # a softmax per sense
        assert float(alpha.triu(1).abs().max()) == 0.0  # causal
        assert torch.allclose(m(ids).logits[0], by_hand @ m.backpack.gpt2_model.wte.weight.T, atol=1e-4)


def test_left_padding_equals_no_padding_and_scoring_needs_no_cache(bp, tokenizer):
    m, ids = bp.model, _ids(tokenizer, "The capital of France is")
    pad = torch.full((1, 3), tokenizer.pad_token_id)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        plain = m(ids).logits
        padded = m(torch.cat([pad, ids], 1), attention_mask=mask).logits[:, 3:]
    assert torch.allclose(plain, padded, atol=1e-5)
    pairs = [("The capital of France is", " Paris"), ("The capital of France is", " Rome is big"),
             ("Berlin is in", " Germany")]
    got = continuation_logprobs(m, tokenizer, pairs, batch_size=8)
    for (prompt, target), lps in zip(pairs, got):
        p, t = tokenizer(prompt)["input_ids"], tokenizer(target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = m(torch.tensor([p + t])).logits[0].log_softmax(-1)
        want = [float(logp[len(p) - 1 + i, tok]) for i, tok in enumerate(t)]
        assert lps == pytest.approx(want, abs=1e-4)


def test_loads_a_local_directory_without_remote_code(bp, tokenizer, tmp_path):
    d = tmp_path / "backpack"
    bp.model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    ids = _ids(tokenizer, "Hello there")
    config = json.loads((d / "config.json").read_text())
    # as a remote-code checkpoint may write it: its own class names, code announced, even GPT-2's model_type
    for model_type in ("backpack-gpt2", "gpt2"):
        (d / "config.json").write_text(json.dumps({
            **config, "model_type": model_type, "architectures": ["BackpackGPT2LMHeadModel"],
            "auto_map": {"AutoModelForCausalLM": "modeling_backpack_gpt2.BackpackGPT2LMHeadModel"}}))
        lm = load_model(str(d))
        assert lm.arch.model_type == "backpack-gpt2"
        with torch.no_grad():
            assert torch.equal(lm.model(ids).logits, bp.model(ids).logits)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(InputError, match="never unpickles"):
        load_model(str(d))


def test_locate_methods_refuse_a_model_without_kv_cache(bp):
    from lmedit.editors import make_config

    config = make_config("rome", "tiny", bp.model, {"layers": "1"})
    with pytest.raises(InputError, match="KV cache"):
        config.validate(bp.model)


def test_zero_sense_edits_change_nothing_and_an_edit_only_reaches_its_token(bp, tokenizer):
    m = bp.model
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    with_paris, without = _ids(tokenizer, "I love Paris in spring"), _ids(tokenizer, "I love Rome in spring")
    with torch.no_grad():
        base = [m(x).logits for x in (with_paris, without)]
        edits = SenseEdits([paris], [2], m.config.n_embd)
        previous = m.backpack.attach_sense_edits(edits)
        try:
            assert all(torch.equal(m(x).logits, b) for x, b in zip((with_paris, without), base))  # Δ = 0
            edits.vectors.normal_()
            assert torch.equal(m(without).logits, base[1])  # no Paris, no change
            moved = (m(with_paris).logits - base[0]).abs().amax(-1)[0]
            at = with_paris[0].tolist().index(paris)
            assert float(moved[:at].max()) == 0.0 and float(moved[at:].min()) > 0  # from Paris onwards only
        finally:
            m.backpack.restore_sense_edits(previous)
    assert len(m.backpack.sense_edits) == 0


def test_sense_selection_scores(bp, tokenizer, tiny_model):
    m = bp.model
    pairs = [[("The capital of Albania is", " Tirana")], [("The capital of Andorra is", " Andorra la Vella")]]
    background = se.background_mass(m, tokenizer, ["The city is large.", "The capital of the world."])
    chosen = se.select_senses(m, tokenizer, "raise", pairs, background, per_example=3, lam=0.0)
    assert 3 <= len(chosen) <= 6
    example_tokens = {t for (p, s), in pairs for t in tokenizer(p + s)["input_ids"]}
    assert {c.token for c in chosen} <= example_tokens  # only senses the example's predictions read
    # the best pair's score, recomputed by hand: α over the rows predicting " Tirana"'s tokens, summed per source
    p, s = tokenizer("The capital of Albania is")["input_ids"], tokenizer(" Tirana", add_special_tokens=False)["input_ids"]
    ids = p + s[:-1]
    with torch.no_grad():
        alpha = m.backpack(torch.tensor([ids])).contextualization[0]
    rows = alpha[:, len(p) - 1:].sum(1)  # (k, source)
    mass = {}
    for j, tok in enumerate(ids):
        for l in range(rows.shape[0]):
            mass[(tok, l)] = mass.get((tok, l), 0.0) + float(rows[l, j])
    best = max(mass, key=mass.get)
    assert any((c.token, c.sense) == best and c.score == pytest.approx(mass[best], rel=1e-5) for c in chosen)
    # a large λ pushes out senses that the background uses
    heavy = se.select_senses(m, tokenizer, "raise", pairs, background, per_example=3, lam=1e6)
    bg = {(c.token, c.sense): float(background[c.token, c.sense]) for c in heavy}
    assert max(bg.values()) <= max(float(background[c.token, c.sense]) for c in chosen)
    with pytest.raises(InputError, match="Backpack"):
        se.select_senses(tiny_model("llama").model, tokenizer, "raise", pairs, background)


def test_canonical_senses_run_trains_only_deltas_and_restores_the_model(bp, data_dir, tmp_path,  # noqa: F811
                                                                       tiny_model):
    task = cc.load_split("country_capital", data_dir, SPLIT)
    protocol = cr.Protocol(str(GENERAL), n_docs=4, max_tokens=48, leagues=(1e-3, 10.0))
    runner = cr.Runner(bp.model, bp.tokenizer, protocol, "tiny-backpack", cache=BaselineCache(tmp_path / "c"))
    settings = cc.make_settings("senses", bp.model, "tiny-backpack",
                                {"lr": "0.3", "epochs": "3", "batch_size": "4", "background_docs": "4"})
    snap = _snapshot(bp.model)
    result = runner.run(task, "senses", settings)
    _assert_unchanged(bp.model, snap)
    assert len(bp.model.backpack.sense_edits) == 0
    trace = result["trace"]
    assert [p["epoch"] for p in trace] == [1, 2, 3]
    assert trace[0]["senses"]["n"] >= 8  # 4 examples x 8 senses, overlapping
    assert trace[-1]["train_loss"] < trace[0]["train_loss"]  # the deltas learn
    assert trace[-1]["targeted_loss"] != result["unedited"]["targeted_loss"]  # and they act on the evaluation
    with pytest.raises(InputError, match="Backpack"):
        cc.check_settings(cc.make_settings("senses", None, ""), tiny_model("llama").model)


def test_methods_for_each_kind_of_model(bp, tiny_model):
    llama = tiny_model("llama").model
    runs, why = cc.methods_for(llama, cc.METHODS)
    assert runs == ["ft", "ft-conditional", "lora", "memit", "ft+kl", "lora+kl"]
    assert "Backpack" in why["senses"] and "Backpack" in why["senses+kl"]
    runs, why = cc.methods_for(bp.model, cc.METHODS)
    assert runs == ["ft", "ft-conditional", "lora", "senses", "ft+kl", "lora+kl", "senses+kl"]
    assert "KV cache" in why["memit"]
    assert cc.methods_for(EnsembleLM(llama, bp.model), cc.METHODS)[0] == ["senses"]


def test_ensemble_is_the_big_model_until_the_backpack_is_edited(bp, tiny_model, tokenizer):
    big = tiny_model("llama").model
    ens = EnsembleLM(big, bp.model, weight=0.5)
    ids = _ids(tokenizer, "The capital of France is Paris")
    with torch.no_grad():
        assert torch.equal(ens(ids).logits, big(ids).logits.float())
        original = bp.model(ids).logits.log_softmax(-1)
        edits = SenseEdits([ids[0, 2].item()], [1], bp.model.config.n_embd)
        previous = bp.model.backpack.attach_sense_edits(edits)
        try:
            edits.vectors.normal_()
            edited = bp.model(ids).logits.log_softmax(-1)
            want = big(ids).logits + 0.5 * (edited - original)
            assert torch.allclose(ens(ids).logits, want, atol=1e-5)
            assert not torch.allclose(ens(ids).logits, big(ids).logits, atol=1e-3)
        finally:
            bp.model.backpack.restore_sense_edits(previous)
    small_vocab = tiny_model("backpack-gpt2", vocab_size=1000).model
    with pytest.raises(InputError, match="vocabulary"):
        EnsembleLM(big, small_vocab)


def test_ensemble_weight_schedule_on_a_synthetic_loss_curve():
    """w is lowered from 1.0 in steps of 0.1 until the large model's general loss is admissible in the league
    (the paper's schedule); w = 0 (the large model alone, its unedited point) when no step is."""
    from lmedit.evaluate.canonical_ensemble import W_STEPS, weight_schedule

    assert W_STEPS == (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    before = {"success_rate": 0.2, "general_loss": 3.0, "targeted_loss": 2.0}
    seen = []

    def evaluate_at(w):  # general loss grows with w: 3 (1 + w 1e-4); the targeted loss jumps at every w
        seen.append(w)
        return {"success_rate": 0.2 + w, "general_loss": 3.0 * (1 + w * 1e-4), "targeted_loss": 9.0,
                "hard_negative_nll": 1.0}

    w, point, tried = weight_schedule(evaluate_at, before, 5e-5, "general")
    assert seen == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4] and w == 0.4  # 0.5 gives exactly 1 + 5e-5: not below
    assert point["success_rate"] == pytest.approx(0.6) and [t["w"] for t in tried] == seen
    seen.clear()
    w, point, _ = weight_schedule(evaluate_at, before, 1e-3, "general")
    assert (w, seen) == (1.0, [1.0])  # the widest league keeps the full weight
    seen.clear()
    w, point, tried = weight_schedule(evaluate_at, before, 1e-3, "general_and_targeted")
    assert w == 0.0 and point == before and len(tried) == 10  # the targeted loss never fits: the large model alone


# ---------------------------------------------------------------- training a small Backpack

def test_training_resumes_exactly_and_learns(tokenizer, tiny_model, tmp_path):
    from lmedit.backpack.train import BackpackTrainConfig, train_backpack
    from lmedit.stats.corpora import Corpus

    corpus = Corpus("test", tuple(f"The capital of country {i} is city {i}. It lies by the sea." for i in range(60)))
    cfg = BackpackTrainConfig(layers=1, dim=16, heads=2, senses=4, seq_len=16, batch_size=4, steps=6, lr=3e-3,
                              warmup=1, checkpoint_every=2)
    big_embedding = tiny_model("llama").model.get_input_embeddings().weight
    whole = train_backpack(tmp_path / "whole", tokenizer, corpus, cfg, embeddings_from=big_embedding, progress=False)
    first = train_backpack(tmp_path / "parts", tokenizer, corpus, cfg, embeddings_from=big_embedding,
                           max_new_steps=4, progress=False)
    assert first["step"] == 4
    rest = train_backpack(tmp_path / "parts", tokenizer, corpus, cfg, resume=True, progress=False)
    assert rest["step"] == 6 and rest["losses"] == whole["losses"]  # same batches, same moments, same numbers
    a, b = load_model(str(tmp_path / "whole")).model, load_model(str(tmp_path / "parts")).model
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name  # bit-exact
    assert whole["losses"][-1] < whole["losses"][0]  # it learns
    with pytest.raises(InputError, match="other settings"):
        train_backpack(tmp_path / "parts", tokenizer, corpus, BackpackTrainConfig(**{**cfg.__dict__, "dim": 32}),
                       resume=True, progress=False)


def test_cli_backpack_train_refuses_bad_input(tmp_path, monkeypatch, capsys):
    from test_cli import assert_one_line_error, run_cli

    out = str(tmp_path / "b")
    assert_one_line_error(*run_cli(monkeypatch, capsys, "backpack", "train", "--out", out, "--dim", "30"), "divisible")
    (tmp_path / "b").mkdir()
    assert_one_line_error(*run_cli(monkeypatch, capsys, "backpack", "train", "--out", out), "--resume")
    assert_one_line_error(*run_cli(monkeypatch, capsys, "backpack", "train", "--out", out, "--resume"),
                          "nothing to resume")


def test_cli_canonical_senses_on_an_ensemble(bp, tiny_model, data_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    from test_cli import assert_one_line_error, run_cli

    small, big = tmp_path / "backpack", tmp_path / "llama"
    for lm, d in ((bp, small), (tiny_model("llama"), big)):
        lm.model.save_pretrained(d)
        lm.tokenizer.save_pretrained(d)
    capsys.readouterr()  # the save's progress bars
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    common = ["eval", "canonical", "--task", "country_capital", "--data-dir", str(data_dir), "--split", SPLIT,
              "--general-text", str(GENERAL), "--n-docs", "2", "--max-tokens", "32", "--epochs", "2",
              "--league", "1e-3,10"]
    assert_one_line_error(*run_cli(monkeypatch, capsys, *common, "--method", "senses", "--model", str(big),
                                   "--out", str(tmp_path / "x.json")), "senses needs a Backpack")
    out = tmp_path / "ens.json"
    monkeypatch.setattr(sys, "argv", ["lmedit", *common, "--method", "senses", "--model", str(small), "--ensemble-with",
                                      str(big), "--set", "lr=0.3", "--set", "background_docs=2", "--out", str(out)])
    cli.main()  # returns on success
    result = json.loads(out.read_text())
    assert result["method"] == "senses" and result["model"].startswith(str(big))
    assert [p["epoch"] for p in result["trace"]] == [1, 2]  # the Backpack's own epochs, trained alone
    backpack = result["backpack_run"]
    assert backpack["model"] == str(small) and backpack["unedited"] != result["unedited"]
    for key, cell in result["leagues"].items():
        assert cell["epoch"] == backpack["leagues"][key]["epoch"]
        assert cell["ensemble_weight"] in (0.0, *[round(1 - 0.1 * i, 1) for i in range(10)])
        assert cell["score"] == pytest.approx(cell["success_rate"] - result["unedited"]["success_rate"])
    assert result["leagues"]["10"]["ensemble_weight"] == 1.0  # a budget of 11 x the loss holds at full weight
    for flags in (["--method", "senses", "--trials", "2"], ["--method", "senses,ft"]):
        assert_one_line_error(*run_cli(monkeypatch, capsys, *common, *flags, "--model", str(small),
                                       "--ensemble-with", str(big), "--out", str(tmp_path / "y.json")),
                              "--ensemble-with runs one senses run")


@pytest.mark.parametrize("method", ["ft-conditional", "lora"])
def test_weight_methods_train_a_backpacks_contextualisation(bp, data_dir, tmp_path, method):  # noqa: F811
    """ft / lora reach the Backpack through its GPT-2's roles (α changes, the senses do not)."""
    task = cc.load_split("country_capital", data_dir, SPLIT)
    protocol = cr.Protocol(str(GENERAL), n_docs=2, max_tokens=32, leagues=(10.0,))
    runner = cr.Runner(bp.model, bp.tokenizer, protocol, "tiny-backpack", cache=BaselineCache(tmp_path / "c"))
    settings = cc.make_settings(method, bp.model, "tiny-backpack", {"lr": "1e-2", "epochs": "2", "batch_size": "4"})
    snap = _snapshot(bp.model)
    result = runner.run(task, method, settings)
    _assert_unchanged(bp.model, snap)
    assert result["trace"][-1]["train_loss"] < result["trace"][0]["train_loss"]
