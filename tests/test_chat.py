"""`lmedit chat`: the loop driven from a stream, on a tiny random Llama with SmolLM2's tokenizer (and its chat
template): replies through the template, /apply, /probe and /revert change what the model says, exactly."""

from __future__ import annotations

import io
import math
import re
import sys

import pytest
import torch
from rich.console import Console

from cli_helpers import assert_one_line_error, run_cli
from lmedit import cli
from lmedit.editors import get_editor, make_config
from lmedit.evaluate.generation import greedy_continuations
from lmedit.evaluate.scoring import sum_logprob
from lmedit.models.arch import get_module
from lmedit.requests import EditRequest
from lmedit.ui.chat import ChatLoop

PROMPT = "The Eiffel Tower is located in the city of"
SETTINGS = {"layers": "1", "value.steps": "5", "value.lr": "1", "identity_cov": "true", "n_context": "1",
            "value.clamp_norm_factor": "200", "value.weight_decay": "0", "value.kl_factor": "0"}


@pytest.fixture
def lm(tiny_model, tmp_cache):
    lm = tiny_model("llama")
    with torch.no_grad():  # so an edit can move the random model (as tests/test_locate.py does)
        get_module(lm.model, lm.arch.unembed).weight.mul_(30.0)
    return lm


@pytest.fixture
def patch_dir(lm, tmp_path):
    config = make_config("rome", lm.name, lm.model, SETTINGS)
    request = EditRequest(PROMPT, "The Eiffel Tower", "Rome", "Paris")
    patch = get_editor("rome").fn(lm.model, lm.tokenizer, [request], config, progress=False, announce=lambda *_: None)
    return patch.save(tmp_path / "eiffel-rome")


def _chat(lm, lines: str, **kwargs) -> tuple[ChatLoop, list[str]]:
    out = io.StringIO()
    loop = ChatLoop(lm, Console(file=out, width=200), max_new_tokens=8, **kwargs)
    loop.run(io.StringIO(lines))
    return loop, out.getvalue().splitlines()


def _probabilities(lines: list[str], target: str) -> list[float]:
    return [float(m.group(1)) for line in lines for m in [re.search(rf"P\({target}\) = (\S+)", line)] if m]


def test_a_reply_goes_through_the_chat_template(lm):
    assert lm.tokenizer.chat_template
    loop, lines = _chat(lm, "Where is the Eiffel Tower?\n/quit\nnot read after quit\n")
    assert "through its chat template" in lines[0]
    [reply] = [line for line in lines if line.startswith("model> ")]
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Where is the Eiffel Tower?"}],
                                            tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=[lm.tokenizer.eos_token_id])
    want = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert reply == "model> " + want
    assert loop.history == [{"role": "user", "content": "Where is the Eiffel Tower?"},
                            {"role": "assistant", "content": want}]
    assert not any("not read after quit" in line for line in lines)


def test_without_a_chat_template_a_line_is_continued_as_text(lm, monkeypatch):
    monkeypatch.setattr(lm.tokenizer, "chat_template", None)
    loop, lines = _chat(lm, PROMPT + "\n")
    assert "plain continuation" in lines[0]
    want = greedy_continuations(lm.model, lm.tokenizer, [PROMPT], max_new_tokens=8)[0].strip()
    assert lines[-1] == "model> " + want and loop.history == []


def test_apply_probe_revert_change_the_model_and_revert_is_exact(lm, patch_dir):
    weights = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    p_before = math.exp(sum_logprob(lm.model, lm.tokenizer, [(PROMPT, "Rome")])[0])
    loop, lines = _chat(lm, f"hello\n/apply {patch_dir}\n/probe {PROMPT}\n/patches\n/revert\n/probe {PROMPT}\n")
    applied = next(line for line in lines if line.startswith("applied rome patch"))
    assert "the conversation starts afresh" in applied and "1 applied" in applied
    assert any("eiffel-rome" in line and "1 request(s)" in line for line in lines)  # /patches
    assert any(line.startswith("reverted ") and "0 still applied" in line for line in lines)
    p_edited, p_reverted = _probabilities(lines, "Rome")
    assert p_edited > 5 * p_before, (p_before, p_edited)
    assert p_reverted == pytest.approx(p_before, rel=1e-3)  # printed to 4 significant digits
    assert len(_probabilities(lines, "Paris")) == 2  # the edit's true target is shown too
    assert sum(line.startswith("  greedy: " + PROMPT) for line in lines) == 2
    assert all(torch.equal(p, weights[n]) for n, p in lm.model.named_parameters())
    assert loop.history == []  # the model changed: the conversation started afresh


def test_a_patch_given_up_front_is_applied_and_reverted(lm, patch_dir):
    from lmedit.patches import Patch
    from lmedit.ui.session import PatchStack

    stack = PatchStack(lm.model)
    stack.push(Patch.load(patch_dir), str(patch_dir))
    edited = math.exp(sum_logprob(lm.model, lm.tokenizer, [(PROMPT, "Rome")])[0])
    loop, lines = _chat(lm, f"/probe {PROMPT}\n/revert\n", stack=stack)
    assert _probabilities(lines, "Rome")[0] == pytest.approx(edited, rel=1e-3)
    assert stack.entries == []


@pytest.mark.parametrize("line,phrase", [
    ("/revert", "no patch is applied"),
    ("/apply", "/apply needs a patch directory"),
    ("/apply /no/such/patch", "patch directory not found"),
    ("/probe", "/probe needs a prompt"),
    ("/frobnicate", "unknown command /frobnicate"),
])
def test_a_bad_command_is_one_error_line_and_the_loop_goes_on(lm, line, phrase):
    loop, lines = _chat(lm, f"{line}\n/help\n")
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and phrase in errors[0] and "Traceback" not in "\n".join(lines)
    assert any("/probe PROMPT" in l for l in lines)  # /help still ran after the error


def test_the_command_reads_stdin_and_applies_patches_given(lm, patch_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "tiny-llama"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/patches\n/probe {PROMPT}\n/quit\n"))
    monkeypatch.setattr(sys, "argv", ["lmedit", "chat", "--model", str(folder), "--patch", str(patch_dir),
                                      "--max-new-tokens", "4"])
    cli.main()
    out = capsys.readouterr().out
    assert "eiffel-rome" in out and "P(Rome) = " in out


def test_the_command_refuses_a_missing_patch_in_one_line(monkeypatch, capsys, tmp_path):
    code, err = run_cli(monkeypatch, capsys, "chat", "--patch", tmp_path / "nope")
    assert_one_line_error(code, err, "patch directory not found")
