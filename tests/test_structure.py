"""The package's shape stays as built: imports point only downward, and no import closes a cycle.

Layers, top to bottom (README, "Layout"): the command line and the programs it runs (cli, demo, bench), then
evaluate, then the editors (editors, backpack: sense fine-tuning and the ensemble), then locate (the shared
locate-then-edit machinery), stats, models (loading, architectures, forward passes, the Backpack architecture),
and the shared utilities at the bottom (errors, files, settings, patches, requests, checkpoints). Every import
counts, those inside functions too: a lazy import that points up is still a dependency that points up.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmedit"

LAYERS = {  # higher imports lower, never the reverse
    "cli": 6, "demo": 6, "bench": 6, "ui": 6,
    "evaluate": 5,
    "editors": 4, "backpack": 4,
    "locate": 3,
    "stats": 2,
    "models": 1,
    "errors": 0, "fileio": 0, "settings": 0, "patches": 0, "patch_integrity": 0, "requests": 0, "checkpoints": 0, "carried": 0,
    "degradation_budget": 0, "deltas": 0,
    "__init__": 0,
}
MAX_LINES = 400



def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The lmedit modules `path` imports (a `from lmedit.x import y` counts as lmedit.x.y when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("lmedit"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lmedit")}
    return {m for m in out if m in known}


def layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in LAYERS:
        raise AssertionError(f"{module}: lmedit.{top} has no layer in tests/test_structure.py; give it one")
    return LAYERS[top]


GRAPH = {name: imports(path, set(modules())) - {name} for name, path in modules().items()}


def test_every_module_has_a_layer():
    for name in GRAPH:
        layer(name)


def test_imports_point_only_downward():
    upward = [f"{a} -> {b}" for a, bs in sorted(GRAPH.items()) for b in sorted(bs)
              if layer(b) > layer(a)]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def _cycle_from(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a list of modules, first = last), or None."""
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state[nxt] == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state[nxt] == 0 and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state[node] == 0 and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    # A package's __init__ is imported by each of its modules; only what it imports itself is an edge here.
    cycle = _cycle_from(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_can_fail():
    assert _cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle_from({"a": {"b"}, "b": set()}) is None
    assert layer("lmedit.models.arch") < layer("lmedit.locate.core") < layer("lmedit.cli.edit")


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_modules_stay_small(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (more than {MAX_LINES}): split it by what each part does"


def hidden_state(path: Path) -> list[str]:
    """Context variables and `global` statements in `path`: state that changes behaviour without a call site
    showing it (v* reuse and training checkpoints are arguments: `Editor.edit(values=, checkpoint_dir=)`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] == "contextvars" for n in names):
                found.append(f"line {node.lineno}: imports contextvars")
        elif isinstance(node, ast.Global):
            found.append(f"line {node.lineno}: global {', '.join(node.names)}")
    return found


def test_no_hidden_state():
    found = {name: hits for name, path in modules().items() if (hits := hidden_state(path))}
    assert not found, f"hidden state: {found}"


def test_the_hidden_state_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from contextvars import ContextVar\nX = 0\ndef f():\n    global X\n    X = 1\n")
    assert hidden_state(bad) == ["line 1: imports contextvars", "line 4: global X"]
