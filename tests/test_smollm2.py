"""On the embedded SmolLM2-135M: the tokenizer survives the cache round trip, and ROME moves the Eiffel Tower.

Uses the user cache (LMEDIT_CACHE or ~/.cache/lmedit) on purpose, so the dequantised model, the context
templates and the 20k-token statistics are computed once and reused by later runs.
"""

import pytest
import torch
from conftest import SMOL_DIR

from lmedit.editors import apply_overrides, get_editor, make_config
from lmedit.editors.defaults import defaults_for
from lmedit.models.arch import mlp_out_name
from lmedit.models.loading import check_tokenizer
from lmedit.requests import EditRequest

pytestmark = pytest.mark.slow

EXPECTED_IDS = [504, 3575, 282, 4649, 314, 7042]


def test_tokenizer_from_the_cache(smol, tokenizer):
    from transformers import AutoTokenizer

    assert (SMOL_DIR / "model.safetensors").is_file()
    for tok in (smol.tokenizer, tokenizer, AutoTokenizer.from_pretrained(SMOL_DIR, local_files_only=True)):
        assert tok("The capital of France is Paris")["input_ids"] == EXPECTED_IDS
        assert tok("The capital of France is Paris", add_special_tokens=False)["input_ids"] == EXPECTED_IDS
        assert tok.decode(EXPECTED_IDS) == "The capital of France is Paris"
        check_tokenizer(tok, "smollm2-135m")
    assert smol.arch.model_type == "llama" and smol.model.config.num_hidden_layers == 30
    assert smol.model.config.hidden_size == 576
    assert next(smol.model.parameters()).dtype == torch.float32


def _next_token_probs(model, tok, prompt, words):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    word_ids = [tok(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    assert all(len(w) == 1 for w in word_ids), word_ids  # " Paris", " Rome" are single tokens
    with torch.no_grad():
        probs = model(input_ids=ids).logits[0, -1].float().softmax(-1)
    return [float(probs[w[0]]) for w in word_ids]


def test_rome_edits_and_reverts(smol):
    model, tok = smol.model, smol.tokenizer
    prompt = "The Eiffel Tower is located in the city of"
    request = EditRequest(prompt, "The Eiffel Tower", "Rome", "Paris")
    rome = get_editor("rome")
    config = apply_overrides(rome.config_cls(), {**defaults_for("rome", "smollm2-135m", model), "stats_tokens": 20000})
    assert config.layers == (6,) and config.stats_tokens == 20000 and not config.identity_cov
    assert make_config("rome", "smollm2-135m", model, {"stats_tokens": 20000}) == config

    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    paris0, rome0 = _next_token_probs(model, tok, prompt, ["Paris", "Rome"])
    assert paris0 > rome0

    patch = rome.fn(model, tok, [request], config, progress=False, announce=lambda *_: None)
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters()), "the editor changed the model"
    name = f"{mlp_out_name(model, config.layers[0])}.weight"
    assert list(patch.deltas) == [name] and patch.deltas[name].rank == 1
    assert patch.meta["v_star"]["target_prob"][0] > 0.5

    handle = patch.apply(model)
    try:
        paris1, rome1 = _next_token_probs(model, tok, prompt, ["Paris", "Rome"])
    finally:
        handle.revert()
    assert rome1 > 0.5 and rome1 > paris1, (paris0, rome0, paris1, rome1)

    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters()), "revert is not bit-exact"
    paris2, rome2 = _next_token_probs(model, tok, prompt, ["Paris", "Rome"])
    assert paris2 == paris0 and rome2 == rome0
