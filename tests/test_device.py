"""Where a model runs: `--device` / LMEDIT_DEVICE on every command that loads a model, a device the machine lacks
refused in one line (exit 2) before any weights are read, no device named outside the placement code, and
benchmarks/device.sh refusing, in one line, to run without CUDA.

The model-level tests below run where LMEDIT_DEVICE puts the fixtures' models (the CPU when unset); under
`LMEDIT_DEVICE=cuda` (benchmarks/device.sh) they also compare each result with the same work on a CPU copy.
"""

from __future__ import annotations

import ast
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer.main
from cli_helpers import assert_one_line_error, run_cli
from conftest import TEST_DEVICE
from test_cli import GOOD, write_jsonl
from test_locate import CONTEXT, REQUESTS, VALUE

import lmedit.models.placement as placement
from lmedit import cli
from lmedit.editors import get_editor
from lmedit.errors import InputError
from lmedit.models.arch import get_module, mlp_out_name
from lmedit.models.placement import Placement, check_device

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device(TEST_DEVICE or "cpu")

# ----------------------------------------------------------------------------------------- the option


def test_check_device_names_what_is_wrong(monkeypatch):
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(" cpu ") == torch.device("cpu")
    with pytest.raises(InputError, match="--device expects cpu, cuda or cuda:N, got 'gpu'"):
        check_device("gpu")
    monkeypatch.setattr(placement, "accelerator_available", lambda: False)
    with pytest.raises(InputError, match="this machine has no CUDA device .*use --device cpu"):
        check_device("cuda")
    monkeypatch.setattr(placement, "accelerator_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match=r"has 1 CUDA device\(s\), cuda:0..cuda:0"):
        check_device("cuda:3")


def test_placement_reads_the_environment_unless_given_a_device(monkeypatch):
    monkeypatch.setenv("LMEDIT_DEVICE", "cpu")
    monkeypatch.delenv("LMEDIT_DEVICE_MAP", raising=False)
    assert Placement.from_env().device == "cpu"
    monkeypatch.setattr(placement, "accelerator_available", lambda: False)
    monkeypatch.setenv("LMEDIT_DEVICE", "cuda")
    with pytest.raises(InputError, match="no CUDA device"):
        Placement.from_env()
    assert Placement.from_env("cpu").device == "cpu"  # --device wins over the environment
    monkeypatch.setenv("LMEDIT_DEVICE_MAP", "auto")
    with pytest.raises(InputError, match="not both"):
        Placement.from_env("cpu")
    monkeypatch.delenv("LMEDIT_DEVICE")
    monkeypatch.delenv("LMEDIT_DEVICE_MAP")
    assert Placement.from_env() == Placement()


def _leaf_commands(group, path=()):
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):
            yield from _leaf_commands(cmd, path + (name,))
        else:
            yield " ".join(path + (name,)), cmd


def test_every_command_that_loads_a_model_takes_device():
    commands = dict(_leaf_commands(typer.main.get_command(cli.app)))
    loading = {name: cmd for name, cmd in commands.items()
               if any("--model" in p.opts or "--ensemble-with" in p.opts for p in cmd.params)}
    assert {"demo", "edit", "export", "trace", "bench", "eval counterfact", "eval zsre", "eval canonical",
            "stats compute", "stats inspect"} <= set(loading)
    for name, cmd in loading.items():
        device = [p for p in cmd.params if "--device" in p.opts]
        assert device, f"`lmedit {name}` loads a model but has no --device"
        assert device[0].envvar == "LMEDIT_DEVICE", name


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    lm = tiny_model("llama")
    lm.model.to("cpu")  # saved from the CPU whatever the test device
    with torch.no_grad():
        get_module(lm.model, lm.arch.unembed).weight.mul_(30.0)
    path = tmp_path_factory.mktemp("tiny-llama-dir")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("via", ["option", "environment"])
@pytest.mark.parametrize("command", ["edit", "eval counterfact", "trace", "stats inspect", "export"])
def test_a_device_the_machine_lacks_is_one_line_exit_2_before_loading(command, via, model_dir, tmp_path,
                                                                       monkeypatch, capsys):
    import lmedit.models

    monkeypatch.setattr(placement, "accelerator_available", lambda: False)
    monkeypatch.setattr(lmedit.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    reqs = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    args = {"edit": ["edit", "--requests", reqs, "--out", tmp_path / "p"],
            "eval counterfact": ["eval", "counterfact", "--data", reqs, "--out", tmp_path / "r.json"],
            "trace": ["trace", "--prompt", GOOD["prompt"], "--subject", GOOD["subject"], "--out", tmp_path / "t"],
            "stats inspect": ["stats", "inspect", "--layer", "1"],
            "export": ["export", "--patch", tmp_path / "p", "--out", tmp_path / "e"]}[command]
    if command == "export":
        from lmedit.patches import Patch

        Patch({}, {"method": "none"}).save(tmp_path / "p")
    args = [*args, "--model", str(model_dir)]
    if via == "option":
        args += ["--device", "cuda"]
    else:
        monkeypatch.setenv("LMEDIT_DEVICE", "cuda")
    code, err = run_cli(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, "--device cuda", "no CUDA device", "use --device cpu")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "t").exists() and not (tmp_path / "e").exists()


def _run_ok(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["lmedit", *map(str, args)])
    try:
        cli.main()
    except SystemExit as e:  # main() exits only on an error
        pytest.fail(f"exit {e.code}: {capsys.readouterr().err}")
    return capsys.readouterr().out


def test_device_cpu_edits_and_wins_over_the_environment(model_dir, tmp_path, tmp_cache, monkeypatch, capsys):
    from lmedit.patches import Patch

    monkeypatch.setattr(placement, "accelerator_available", lambda: False)
    monkeypatch.setenv("LMEDIT_DEVICE", "cuda")  # a device this machine lacks, overridden by --device cpu
    reqs = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "The capital of France", "subject": "France",
                                               "target_new": "Rome", "target_true": "Paris"}])
    _run_ok(monkeypatch, capsys, "edit", "--model", model_dir, "--device", "cpu", "--method", "rome",
            "--requests", reqs, "--out", tmp_path / "p", "--set", "layers=1", "--set", "identity_cov=true",
            "--set", "n_context=2", "--set", "context_length=5")
    patch = Patch.load(tmp_path / "p")
    assert list(patch.deltas) == ["model.layers.1.mlp.down_proj.weight"]
    assert patch.deltas["model.layers.1.mlp.down_proj.weight"].rank == 1
    assert patch.meta["v_star"]["z_reached"][0] > 0.9, patch.meta["v_star"]  # W's output moved to v*


# ------------------------------------------------------------------------------ no device outside placement


def _device_literals(path: Path) -> list[str]:
    """String constants (not docstrings) naming CUDA, and `.cuda` attributes, in one module."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and ("cuda" in node.value.lower() or "nccl" in node.value.lower()):
            found.append(f"{path.name}:{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr == "cuda":
            found.append(f"{path.name}:{node.lineno}: .cuda")
    return found


def test_no_device_is_named_outside_the_placement_code():
    src = ROOT / "src" / "lmedit"
    found = [hit for path in sorted(src.rglob("*.py")) if path != src / "models" / "placement.py"
             for hit in _device_literals(path)]
    assert not found, "name devices in lmedit/models/placement.py only:\n" + "\n".join(found)
    assert _device_literals(src / "models" / "placement.py")  # the checker sees what it looks for


# ----------------------------------------------------------------------------------- benchmarks/device.sh


def _device_sh(*args, **env):
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "device.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_device_sh_without_cuda_says_so_in_one_line_and_exits_2(tmp_path):
    out = tmp_path / "out"
    proc = _device_sh(str(out), CUDA_VISIBLE_DEVICES="", PY=sys.executable)  # no GPU visible, even on a GPU box
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "nothing was run" in lines[0], proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_device_sh_plan_lists_commands_the_cli_accepts():
    from test_help_examples import _parse

    proc = _device_sh("--plan", PY=sys.executable)
    assert proc.returncode == 0, proc.stderr
    steps = [line.split(": ", 1) for line in proc.stdout.splitlines() if line.strip()]
    names = [name for name, _ in steps]
    assert names[:2] == ["tests-core", "tests-wide"] and "canonical-cell" in names
    assert {"bench-smollm2-135m", "bench-gemma3-270m"} <= set(names)
    lmedit_steps = [cmd.split() for _, cmd in steps if cmd.split()[0].endswith("lmedit")]
    assert len(lmedit_steps) == 3
    for words in lmedit_steps:
        assert words[words.index("--device") + 1] == "cuda"
        _parse(words[1:])  # options exist, values have their types, required ones are there
    canonical = next(cmd for name, cmd in steps if name == "canonical-cell")
    assert "--eval-limit" not in canonical and "--n-docs 200" in canonical
    bench = next(cmd for name, cmd in steps if name == "bench-smollm2-135m")
    assert "--sizes 100,1000" in bench and all(p in bench for p in ("scoring", "stats", "editors"))


# ------------------------------------------------------------------- model-level work on the test device


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tiny_model):  # (Gemma 3 on the device: tests/test_gemma3.py, on the real model)
    lm = tiny_model(request.param)
    with torch.no_grad():
        get_module(lm.model, lm.arch.unembed).weight.mul_(30.0)  # a residual can move the next token
    return lm


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMEDIT_CACHE", str(tmp_path_factory.mktemp("lmedit-cache")))
        yield


def _p_next(model, tok, prompt, target) -> float:
    device = next(model.parameters()).device
    ids = torch.tensor([tok(prompt)["input_ids"]], device=device)
    target_id = tok(" " + target, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, -1].float().softmax(-1)[target_id])


@pytest.mark.parametrize("method,layers", [("rome", (1,)), ("memit", (1, 2))])
def test_edits_run_where_the_model_is(tiny, method, layers):
    model, tok = tiny.model, tiny.tokenizer
    editor = get_editor(method)
    config = editor.config_cls(layers=layers, identity_cov=True, mom2_weight=1e-3, value=VALUE, **CONTEXT)
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    request = REQUESTS[0]
    before = _p_next(model, tok, request.prompt, request.target_new)
    patch = editor.fn(model, tok, [request], config, progress=False, announce=lambda *_: None)
    assert all(p.device == DEVICE for p in model.parameters())
    with patch.apply(model):
        after = _p_next(model, tok, request.prompt, request.target_new)
        assert all(p.device == DEVICE for p in model.parameters())
    assert after > 0.3 and after > 10 * before, (before, after)
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters()), "revert is not bit-exact"
    if DEVICE.type != "cpu":  # the same edit on a CPU copy: the device changes the arithmetic, not the result
        name = f"{mlp_out_name(model, layers[-1])}.weight"
        cpu_patch = editor.fn(copy.deepcopy(model).to("cpu"), tok, [request], config, progress=False,
                              announce=lambda *_: None)
        got, want = patch.deltas[name].full().cpu().double(), cpu_patch.deltas[name].full().cpu().double()
        assert float((got - want).norm() / want.norm()) < 1e-3


def _numbers(records) -> list[float]:
    """Every number in CounterFact score records, in order (log-probs, successes, magnitudes)."""
    if isinstance(records, dict):
        return [x for k in sorted(records) for x in _numbers(records[k])]
    if isinstance(records, (list, tuple)):
        return [x for r in records for x in _numbers(r)]
    return [float(records)] if isinstance(records, (int, float)) and not isinstance(records, bool) else []


def test_statistics_and_batched_scoring_run_where_the_model_is(tiny, tmp_path):
    from lmedit.evaluate.counterfact import score_counterfact
    from lmedit.requests import load_requests
    from lmedit.stats.corpora import get_corpus
    from lmedit.stats.moments import compute_second_moments

    model, tok = tiny.model, tiny.tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The city of Paris is in France, and document {i} says so {i % 7} times."
                                    for i in range(60)))
    source = get_corpus(str(corpus))
    C = compute_second_moments(model, tok, [1], source, 600, progress=False)[1].double().cpu()
    assert torch.allclose(C, C.T) and float(torch.linalg.eigvalsh(C)[0]) > -1e-6 and float(C.trace()) > 0
    requests = load_requests(ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-train.json", limit=4)
    batched = _numbers(score_counterfact(model, tok, requests, batch_size=8))
    one_by_one = _numbers(score_counterfact(model, tok, requests, batch_size=1))
    assert len(batched) > 40 and batched == pytest.approx(one_by_one, rel=1e-4, abs=1e-5)
    if DEVICE.type != "cpu":  # the same statistics and scores on a CPU copy
        twin = copy.deepcopy(model).to("cpu")
        C_cpu = compute_second_moments(twin, tok, [1], source, 600, progress=False)[1].double().cpu()
        assert float((C - C_cpu).norm() / C_cpu.norm()) < 1e-4
        assert _numbers(score_counterfact(twin, tok, requests, batch_size=8)) == pytest.approx(batched, rel=1e-3,
                                                                                                abs=1e-4)
