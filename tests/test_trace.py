"""Causal tracing on tiny random models: the numbers that must hold whatever the weights are."""

import json

import pytest
import torch

from lmedit.errors import InputError
from lmedit.locate.trace import Trace, TraceConfig, suggest_layers, trace_fact

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3_text"])
def test_restoring_the_last_state_brings_back_the_clean_probability(tiny_model, kind):
    """The last block's output at the last token fixes the logits: restoring it gives P_clean exactly, and
    restoring another token's state at the last layer (which the logits never read) changes nothing."""
    lm = tiny_model(kind)
    tr = trace_fact(lm.model, lm.tokenizer, PROMPT, SUBJECT, config=TraceConfig(samples=4))
    n_layers, width = len(tr.effect), len(tr.tokens)
    assert n_layers == lm.model.config.num_hidden_layers and width == len(tr.effect[0])
    assert tr.effect[-1][-1] == pytest.approx(tr.p_clean, rel=1e-5)
    assert abs(tr.p_corrupted / tr.p_clean - 1) > 1e-3  # the noise did something to undo (random P ≈ 1/vocab)
    assert tr.effect[-1][-2] == pytest.approx(tr.p_corrupted, rel=1e-5)  # a last-layer state off the last token
    first, last = tr.subject_range
    assert tr.tokens[first].strip() == "The" and "Tower" in tr.tokens[last]
    # the answer is the clean model's top token
    with torch.no_grad():
        ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        top = int(lm.model(input_ids=ids).logits[0, -1].argmax())
    assert tr.answer == lm.tokenizer.decode([top])


def test_mlp_window_and_tiny_noise(tiny_model):
    """Noise → 0 leaves the corrupted run clean; an MLP window wider than the model restores every layer, so
    all centre layers give the same row; a seed gives the same trace twice."""
    lm = tiny_model("llama")
    quiet = trace_fact(lm.model, lm.tokenizer, PROMPT, SUBJECT, "Paris", TraceConfig(samples=2, noise=1e-7))
    assert quiet.p_corrupted == pytest.approx(quiet.p_clean, rel=1e-4)
    tr = trace_fact(lm.model, lm.tokenizer, PROMPT, SUBJECT, "Paris", TraceConfig(kind="mlp", samples=3, window=99))
    # every window is all layers, so each token's row is the same for every layer
    for row in tr.effect[1:]:
        assert row == pytest.approx(tr.effect[0], abs=1e-6)
    # the same seed gives the same trace
    again = trace_fact(lm.model, lm.tokenizer, PROMPT, SUBJECT, "Paris", TraceConfig(kind="mlp", samples=3, window=99))
    assert again.effect == tr.effect


def test_suggested_layers_follow_the_mlp_peak():
    def fake(peak: int, last: int = 2) -> Trace:
        effect = [[0.1] * 4 for _ in range(12)]
        effect[peak][last] = 0.9
        effect[peak + 1][last - 1] = 0.95  # a larger effect off the last subject token is not the one read
        return Trace("p", "s", " o", ["a", "b", "c", "d"], (0, last), "mlp", 0.9, 0.1, effect)

    sug = suggest_layers([fake(7), fake(7), fake(3)])
    assert sug["rome_layer"] == 7 and sug["memit_layers"] == [3, 4, 5, 6, 7] and sug["n_facts"] == 3
    assert sug["aie_last_subject_token"][7] == pytest.approx(0.8 * 2 / 3)
    assert sug["peak_layer_any_subject_token"] == 8  # the larger effect one token earlier, one layer up
    assert suggest_layers([fake(1)])["memit_layers"] == [0, 1]
    with pytest.raises(InputError, match="MLP traces"):
        suggest_layers([Trace("p", "s", "o", ["a"], (0, 0), "hidden", 1, 0, [[0.0]])])


@pytest.mark.parametrize("bad", [dict(kind="resid"), dict(samples=0), dict(noise=-1.0), dict(noise=float("inf")),
                                 dict(window=0)])
def test_bad_trace_settings(bad):
    with pytest.raises(InputError):
        TraceConfig(**bad)


def test_trace_cli_writes_json_png_and_suggestion(tiny_model, tmp_path, monkeypatch, capsys):
    from lmedit import cli
    from test_cli import run_cli

    lm = tiny_model("llama")
    model_dir = tmp_path / "tiny"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "trace"
    monkeypatch.setattr("sys.argv", ["lmedit", "trace", "--prompt", PROMPT, "--subject", SUBJECT, "--kind",
                                     "hidden,mlp", "--samples", "2", "--model", str(model_dir), "--out", str(out)])
    cli.main()
    doc = json.loads((out / "trace.json").read_text())
    assert [t["kind"] for t in doc["traces"]] == ["hidden", "mlp"]
    assert doc["suggestion"]["rome_layer"] in range(4)
    assert (out / "fact0-hidden.png").stat().st_size > 1000 and (out / "fact0-mlp.png").is_file()
    code, err = run_cli(monkeypatch, capsys, "trace", "--prompt", PROMPT, "--subject", SUBJECT, "--model",
                        str(model_dir), "--out", str(out))
    assert code == 2 and "exists" in err  # never overwritten without --force


def test_known_facts_keeps_those_whose_answer_is_the_top_token(tiny_model):
    """A fact counts as known when its true answer is the model's top next token; the limit stops the scan."""
    from lmedit.locate.trace import known_facts
    from lmedit.requests import EditRequest

    lm = tiny_model("llama")
    tok = lm.tokenizer
    prompts = ["The Eiffel Tower is located in the city of", "The capital of Japan is", "Toyota was founded in"]
    tops = []
    for p in prompts:
        with torch.no_grad():
            tops.append(tok.decode([int(lm.model(**tok(p, return_tensors="pt")).logits[0, -1].argmax())]))
    reqs = [EditRequest(prompts[0], "The Eiffel Tower", "Rome", tops[0].strip() or tops[0]),
            EditRequest(prompts[1], "Japan", "Rome", "Paris" if tops[1].strip() != "Paris" else "London"),
            EditRequest(prompts[2], "Toyota", "Rome", tops[2].strip() or tops[2])]
    found, read = known_facts(lm.model, tok, reqs, limit=5)
    assert [f[0] for f in found] == [prompts[0], prompts[2]] and read == 3
    found, read = known_facts(lm.model, tok, reqs, limit=1)
    assert len(found) == 1 and read == 1
