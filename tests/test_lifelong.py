"""Lifelong editing: AlphaEdit (null-space projection, carried edit keys) and UltraEdit (training-free, running
normalisation) against the plain oracle (tests/oracle.py), in float64, over sequences of batches; the projected
update leaves the preserved keys' outputs unchanged; a carried state saved and loaded gives the same next ΔW, a
state of another model is refused, a threshold that keeps nothing edits nothing, and an interrupted sequence
resumes to the same result."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import oracle
from lmedit.carried import CarriedState
from lmedit.editors import get_editor, load_state, new_state
from lmedit.errors import InputError
from lmedit.stats.moments import load_or_compute
from test_oracle import CONTEXT, EARLY_STOP, REQUESTS, VALUE, _six_layers, _templates, gemma_norm_in_float64, \
    private_cache  # noqa: F401  (the two fixtures apply here too)

TOL = 1e-6
TEXT = "../shared/data/text/openwebtext-val100.jsonl"
STATS = dict(stats_corpus=TEXT, stats_unit="tokens", stats_n="3000")
LAYERS = (1, 2, 3)


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3_text"])
def model(request, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(_six_layers(request.param, len(tokenizer))).to(torch.float64).eval()
    with torch.no_grad():
        if request.param == "gemma3_text":
            for block in oracle.blocks(m):
                block.post_feedforward_layernorm.weight.normal_(0.0, 0.3)
        m.get_output_embeddings().weight.mul_(30.0)
    for p in m.parameters():
        p.requires_grad_(False)
    m.oracle_value = dataclasses.replace(VALUE, early_stop_loss=EARLY_STOP[request.param])
    return m


def _covariances(model, tok):
    config = get_editor("alphaedit").config_cls(layers=LAYERS, **STATS)
    return config, load_or_compute(model, tok, list(LAYERS), TEXT, config, progress=False)


def _threshold(covs) -> float:
    """Between the eigenvalues, so that every layer keeps some directions and drops others."""
    eigenvalues = torch.cat([torch.linalg.eigvalsh(covs[l].double()) for l in LAYERS])
    return float(eigenvalues.quantile(0.4))


def _alphaedit_config(model, tok):
    config, covs = _covariances(model, tok)
    return dataclasses.replace(config, null_space_threshold=_threshold(covs), **CONTEXT,
                               value=model.oracle_value), covs


def _W(model):
    return {l: oracle.W_matrix(model, l).detach().clone() for l in LAYERS}


def _run_fast(model, tok, method, config, batches, state=None):
    """ΔW per layer after the batches, made one after another with a carried state; the model is restored."""
    editor = get_editor(method)
    state = state or new_state(method, "tiny", model, config)
    before, handles = _W(model), []
    try:
        for batch in batches:
            handles.append(editor.fn(model, tok, batch, config, progress=False, state=state).apply(model))
        return {l: oracle.W_matrix(model, l).detach() - before[l] for l in LAYERS}, state
    finally:
        for h in reversed(handles):
            h.revert()


def _compare(fast, plain):
    for l in plain:
        assert plain[l].norm() > 1e-8, f"layer {l}: the oracle's edit is a no-op; the test would prove nothing"
        err = float((fast[l] - plain[l]).norm() / plain[l].norm())
        assert err <= TOL, f"layer {l}: relative error of ΔW {err:.2e}"


BATCHES = [REQUESTS[:4], REQUESTS[4:8]]


def test_alphaedit_matches_oracle_over_a_sequence(model, tokenizer):
    config, covs = _alphaedit_config(model, tokenizer)
    fast, state = _run_fast(model, tokenizer, "alphaedit", config, BATCHES)
    plain_model = copy.deepcopy(model)
    before, grams = _W(plain_model), {l: torch.zeros_like(covs[l], dtype=torch.float64) for l in LAYERS}
    for batch in BATCHES:
        oracle.alphaedit_batch(plain_model, tokenizer, batch, _templates(model, tokenizer), LAYERS, covs,
                               config.null_space_threshold, config.l2, grams, config.value)
    _compare(fast, {l: oracle.W_matrix(plain_model, l).detach() - before[l] for l in LAYERS})
    for l in LAYERS:  # the carried keys are the oracle's
        assert torch.allclose(state.tensors[f"edited_keys.{l}"], grams[l], rtol=1e-8, atol=1e-10)
    assert state.n_edits == 8


def test_projected_update_leaves_preserved_keys_unchanged(model, tokenizer):
    """ΔW k = 0 for k in the directions of C the projection removes (those general-text keys use)."""
    config, covs = _alphaedit_config(model, tokenizer)
    patch = get_editor("alphaedit").fn(model, tokenizer, REQUESTS[:4], config, progress=False)
    with patch.apply(model):
        dW = {l: oracle.W_matrix(model, l).detach().clone() for l in LAYERS}
    before = _W(model)
    for l in LAYERS:
        dW[l] = dW[l] - before[l]
        S, U = torch.linalg.eigh(covs[l].double())
        preserved = U[:, S >= config.null_space_threshold]  # (d_in, m) the directions not edited
        assert preserved.shape[1] > 0 and dW[l].norm() > 1e-6
        assert float((dW[l] @ preserved).norm() / dW[l].norm()) < 1e-9
        # MEMIT's update (no projection) moves those keys' outputs: the property is the solver's, not chance
    memit = get_editor("memit")
    mconf = memit.config_cls(layers=LAYERS, **STATS, **CONTEXT, value=model.oracle_value)
    with memit.fn(model, tokenizer, REQUESTS[:4], mconf, progress=False).apply(model):
        l = LAYERS[0]
        moved = oracle.W_matrix(model, l).detach() - before[l]
    S, U = torch.linalg.eigh(covs[l].double())
    assert float((moved @ U[:, S >= config.null_space_threshold]).norm() / moved.norm()) > 1e-2


def test_a_threshold_that_keeps_nothing_edits_nothing(model, tokenizer):
    config, covs = _alphaedit_config(model, tokenizer)
    smallest = min(float(torch.linalg.eigvalsh(covs[l].double())[0]) for l in LAYERS)
    config = dataclasses.replace(config, null_space_threshold=smallest / 2)
    before = _W(model)
    with pytest.raises(InputError, match="keeps no direction of C at layer .*nothing was edited"):
        get_editor("alphaedit").fn(model, tokenizer, REQUESTS[:2], config, progress=False)
    assert all(torch.equal(before[l], oracle.W_matrix(model, l)) for l in LAYERS)


def _ultraedit_config(lr=0.5):
    return get_editor("ultraedit").config_cls(layers=LAYERS, lr=lr)


def test_ultraedit_matches_oracle_over_a_sequence(model, tokenizer):
    config = _ultraedit_config()
    batches = BATCHES + [REQUESTS[8:9]]
    fast, state = _run_fast(model, tokenizer, "ultraedit", dataclasses.replace(config, chunk_requests=3), batches)
    plain_model = copy.deepcopy(model)
    before, seen = _W(plain_model), {}
    for batch in batches:
        oracle.ultraedit_batch(plain_model, tokenizer, batch, LAYERS, config.lr, seen)
    _compare(fast, {l: oracle.W_matrix(plain_model, l).detach() - before[l] for l in LAYERS})
    assert state.n_edits == 9


def test_ultraedit_makes_the_target_likelier(tokenizer, tiny_model):
    from lmedit.evaluate.scoring import sum_logprob

    lm = tiny_model("llama")
    with torch.no_grad():
        lm.model.get_output_embeddings().weight.mul_(30.0)
    request = REQUESTS[0]
    before = sum_logprob(lm.model, tokenizer, [(request.prompt, request.target_new)])[0]
    patch = get_editor("ultraedit").fn(lm.model, tokenizer, REQUESTS[:8], _ultraedit_config(lr=0.05), progress=False)
    with patch.apply(lm.model):
        after = sum_logprob(lm.model, tokenizer, [(request.prompt, request.target_new)])[0]
    assert after > before + 0.5, (before, after)


@pytest.mark.parametrize("method", ["alphaedit", "ultraedit"])
def test_saved_state_gives_the_same_next_update(model, tokenizer, tmp_path, method):
    config = _alphaedit_config(model, tokenizer)[0] if method == "alphaedit" else _ultraedit_config()
    editor = get_editor(method)
    state = new_state(method, "tiny", model, config)
    first = editor.fn(model, tokenizer, BATCHES[0], config, progress=False, state=state)
    state.save(tmp_path)
    loaded = load_state(tmp_path, new_state(method, "tiny", model, config))  # checked against the model before any edit
    with first.apply(model):
        a = editor.fn(model, tokenizer, BATCHES[1], config, progress=False, state=state)
        b = editor.fn(model, tokenizer, BATCHES[1], config, progress=False, state=loaded)
    for name in a.deltas:
        assert torch.equal(a.deltas[name].left, b.deltas[name].left)
        assert torch.equal(a.deltas[name].right, b.deltas[name].right)
    assert state.n_edits == loaded.n_edits == 8
    for key in state.tensors:
        assert torch.equal(state.tensors[key], loaded.tensors[key])


def test_state_of_another_model_is_refused(tokenizer, tiny_model, tmp_path):
    lm_a, lm_b = tiny_model("llama"), tiny_model("qwen2")
    config = _ultraedit_config()
    state = new_state("ultraedit", lm_a.name, lm_a.model, config)
    state.save(tmp_path)
    with pytest.raises(InputError, match=r"made on tiny-llama \(llama, weights .*\), not on tiny-qwen2 \(qwen2"):
        load_state(tmp_path, new_state("ultraedit", lm_b.name, lm_b.model, config))
    with pytest.raises(InputError, match="ultraedit's, not alphaedit's"):
        load_state(tmp_path, new_state("alphaedit", lm_a.name, lm_a.model, config))
    load_state(tmp_path, new_state("ultraedit", lm_a.name, lm_a.model, config))  # its own model: accepted


def test_a_damaged_state_is_refused(tmp_path):
    state = CarriedState("ultraedit", "m", "llama", "ab" * 32, {"x": torch.ones(3, dtype=torch.float64)}, 4)
    path = state.save(tmp_path)
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x00" * 8  # the last float's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="not a readable carried state"):
        CarriedState.load(tmp_path)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["alphaedit", "ultraedit"])
def test_an_interrupted_sequence_resumes_bit_identical(tiny_model, tmp_path, monkeypatch, method):
    """Sequential batches of 1 with a journal; killed while editing the third batch; resumed: the same result as
    an uninterrupted run, and the carried state is the one after the second batch (its file is beside the journal)."""
    import test_run
    from lmedit.editors import EDITORS
    from lmedit.evaluate.run import run_edit_eval

    lm = test_run._editable(tiny_model("llama"))
    requests = test_run.REQUESTS + [dataclasses.replace(test_run.REQUESTS[0], target_new="Berlin")]
    overrides = {"layers": "1,2"} if method == "ultraedit" else \
        {**test_run.FAST, "identity_cov": "false", **STATS, "null_space_threshold": "1e9"}
    kwargs = dict(batch_size=1, sequential=True, overrides=overrides, progress=False, announce=lambda *_: None)
    whole = run_edit_eval(lm, method, requests, **kwargs)
    editor, calls = EDITORS[method], {"n": 0}

    def dies_on_the_third(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Killed
        return editor.fn(*args, **kw)

    journal = tmp_path / "run.journal.jsonl"
    monkeypatch.setitem(EDITORS, method, dataclasses.replace(editor, fn=dies_on_the_third))
    with pytest.raises(_Killed):
        run_edit_eval(lm, method, requests, journal=journal, **kwargs)
    monkeypatch.setitem(EDITORS, method, editor)
    kept = sorted(p.name for p in journal.with_name(journal.name + ".state").iterdir())
    assert kept == ["1"] and CarriedState.load(journal.with_name(journal.name + ".state") / "1").n_edits == 2
    resumed = run_edit_eval(lm, method, requests, journal=journal, resume=True, **kwargs)
    assert test_run._strip_timing(resumed) == test_run._strip_timing(whole)
    if method == "alphaedit":  # the carried keys matter: without them the same sequence ends elsewhere
        alone = run_edit_eval(lm, method, requests, **{**kwargs, "overrides": {**overrides, "carry_edited_keys": "false"}})
        assert _logps(alone) != _logps(whole)


def _logps(result):
    return [r["prompt"]["logp_new"] for r in result["records"]]


def test_cli_sequence_with_carried_state(tiny_model, tmp_path, monkeypatch, capsys):
    """`lmedit edit --state S` then `--after P1 --state S`: the second patch is the one the sequential runner
    makes for the same two batches; a state given with the wrong earlier patches, or to a stateless method, is
    one line and exit 2."""
    import sys

    from cli_helpers import assert_one_line_error, run_cli
    from lmedit import cli
    from lmedit.patches import Patch

    lm = tiny_model("llama")
    model_dir = tmp_path / "tiny"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    files = []
    for i, batch in enumerate(BATCHES):
        path = tmp_path / f"b{i}.jsonl"
        path.write_text("".join(
            f'{{"prompt": "{r.prompt}", "subject": "{r.subject}", "target_new": "{r.target_new}"}}\n' for r in batch))
        files.append(path)
    base = ["edit", "--model", str(model_dir), "--method", "ultraedit", "--set", "layers=1,2", "--state",
            str(tmp_path / "seq")]

    def succeeds(*argv):
        monkeypatch.setattr(sys, "argv", ["lmedit", *map(str, argv)])
        cli.main()

    succeeds(*base, "-r", files[0], "-o", tmp_path / "p1")
    succeeds(*base, "-r", files[1], "-o", tmp_path / "p2", "--after", tmp_path / "p1")
    assert CarriedState.load(tmp_path / "seq").n_edits == 8
    from lmedit.models.loading import load_model

    here = load_model(str(model_dir))
    config = get_editor("ultraedit").config_cls(layers=(1, 2))
    _, patches = _run_fast_any(here, BATCHES, config)
    second = Patch.load(tmp_path / "p2")
    for name, delta in second.deltas.items():
        assert torch.allclose(delta.full(), patches["p2"].deltas[name].full(), rtol=1e-5, atol=1e-7)
    capsys.readouterr()
    code, err = run_cli(monkeypatch, capsys, *base, "-r", files[1], "-o", tmp_path / "p3")
    assert_one_line_error(code, err, "has seen 8 edit(s), the patches given with --after hold 0")
    code, err = run_cli(monkeypatch, capsys, "edit", "--model", model_dir, "--method", "memit", "-r", files[0],
                        "-o", tmp_path / "p4", "--state", tmp_path / "seq")
    assert_one_line_error(code, err, "--state is for the lifelong editors")


def _run_fast_any(lm, batches, config):
    editor = get_editor("ultraedit")
    state = new_state("ultraedit", lm.name, lm.model, config)
    patches, handles = {}, []
    try:
        for i, batch in enumerate(batches):
            patches[f"p{i + 1}"] = editor.fn(lm.model, lm.tokenizer, batch, config, progress=False, state=state)
            handles.append(patches[f"p{i + 1}"].apply(lm.model))
    finally:
        for h in reversed(handles):
            h.revert()
    return state, patches


def test_forgetting_curve_scores_the_edits_made_so_far(tiny_model, tmp_path):
    """Points after 1 and 2 edits (and the final one after all 4): each scores exactly the edits made so far, as the
    model then was; the report draws the curve."""
    import test_run
    from lmedit.evaluate.counterfact import aggregate, score_counterfact
    from lmedit.evaluate.report import build_report
    from lmedit.evaluate.run import run_edit_eval

    lm = test_run._editable(tiny_model("llama"))
    requests = test_run.REQUESTS + [dataclasses.replace(test_run.REQUESTS[0], target_new="Berlin")]
    kwargs = dict(batch_size=1, sequential=True, overrides={"layers": "1,2", "lr": "0.5"}, progress=False,
                  announce=lambda *_: None)
    result = run_edit_eval(lm, "ultraedit", requests, curve_at=(1, 2), **kwargs)
    points = result["curve"]["points"]
    assert [p["edits"] for p in points] == [0, 1, 2, 4]
    assert points[0]["metrics"]["efficacy"] == result["baseline"]["efficacy"]
    assert points[-1]["metrics"]["edit_score"] == result["metrics"]["edit_score"]
    # the point after 2 edits is the 2 first records scored with the first two patches in place
    editor, config = get_editor("ultraedit"), get_editor("ultraedit").config_cls(layers=(1, 2), lr=0.5)
    state = new_state("ultraedit", lm.name, lm.model, config)
    handles = [editor.fn(lm.model, lm.tokenizer, [r], config, progress=False, state=state).apply(lm.model)
               for r in requests[:2]]
    try:
        expected = aggregate(score_counterfact(lm.model, lm.tokenizer, requests[:2]))
    finally:
        for h in reversed(handles):
            h.revert()
    assert abs(points[2]["metrics"]["efficacy_magnitude"] - expected["efficacy_magnitude"]) < 1e-9
    sampled = run_edit_eval(lm, "ultraedit", requests, curve_at=(3,), curve_sample=2, **kwargs)
    assert "a sample of at most 2" in sampled["curve"]["scored"]
    (tmp_path / "r.json").write_text(__import__("json").dumps(result))
    md = build_report([tmp_path / "r.json"], tmp_path / "report")
    assert "forgetting" in md.read_text() and (tmp_path / "report" / "counterfact_forgetting.png").stat().st_size > 5000


def test_curve_options_are_checked(tmp_path, monkeypatch, capsys):
    from cli_helpers import assert_one_line_error, run_cli

    data = "../shared/data/counterfact/counterfact-edit.json"
    code, err = run_cli(monkeypatch, capsys, "eval", "counterfact", "--data", data, "--out", tmp_path / "o.json",
                        "--curve-at", "10")
    assert_one_line_error(code, err, "--curve-at scores a sequence as it grows: it needs --sequential")
    code, err = run_cli(monkeypatch, capsys, "eval", "counterfact", "--data", data, "--out", tmp_path / "o.json",
                        "--sequential", "--curve-at", "ten")
    assert_one_line_error(code, err, "--curve-at must be a comma list")


def test_edits_compute_no_weight_gradients(tiny_model):
    """A model whose parameters are trainable (built outside lmedit): v* and UltraEdit's pass leave every weight
    without a .grad and with its requires_grad flag as it was."""
    from lmedit.locate.context import context_templates
    from lmedit.locate.values import ValueConfig, compute_values

    lm = tiny_model("llama")
    for p in lm.model.parameters():
        p.requires_grad_(True)
    compute_values(lm.model, lm.tokenizer, REQUESTS[:2], 2, context_templates(lm.model, lm.tokenizer, 1, 4, 0),
                   ValueConfig(steps=3), progress=False)
    get_editor("ultraedit").fn(lm.model, lm.tokenizer, REQUESTS[:2], _ultraedit_config(), progress=False)
    assert all(p.grad is None and p.requires_grad for p in lm.model.parameters())
