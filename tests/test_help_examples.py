"""Every command's --help shows at least one example, and each example parses as shown.

An example is a line of the help that starts with `lmedit ` (or `torchrun ... -m lmedit.cli`), continued over
lines that end in a backslash, as a shell would read it. It is parsed with the command's own parser (options
exist, values have the right types, required options are there), without running the command, and it must
appear unbroken in the help rendered for an 80-column terminal, so it can be copied as shown.
"""

from __future__ import annotations

import shlex

import pytest
import typer.main
from typer.testing import CliRunner

try:  # Typer ≥ 0.2x carries its own copy of click; its commands and errors are that copy's classes
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older Typer on the real click
    from click.exceptions import UsageError

from lmedit.cli import app

ROOT = typer.main.get_command(app)


def _leaf_commands(group, path: tuple[str, ...] = ()):
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):
            yield from _leaf_commands(cmd, path + (name,))
        else:
            yield path + (name,), cmd


COMMANDS = list(_leaf_commands(ROOT))


def examples(help_text: str) -> list[str]:
    """The example commands of a help text, continuation lines joined."""
    out, pending = [], None
    for raw in help_text.splitlines():
        line = raw.strip()
        if pending is not None:
            pending += " " + line
        elif line.startswith(("lmedit ", "torchrun ")):
            pending = line
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        else:
            out.append(pending)
            pending = None
    return out


def _lmedit_args(example: str) -> list[str]:
    words = shlex.split(example)
    if words[0] == "torchrun":
        return words[words.index("lmedit.cli") + 1:]
    assert words[0] == "lmedit", example
    return words[1:]


def _parse(args: list[str]):
    """Parse `args` down the command tree as click would, without invoking anything; returns the leaf."""
    cmd, ctx, rest = ROOT, None, list(args)
    while hasattr(cmd, "commands"):
        ctx = cmd.make_context(cmd.name or "lmedit", rest, parent=ctx, resilient_parsing=False)
        rest = [*(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])), *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        assert cmd is not None, f"no command {name!r}"
    cmd.make_context(cmd.name, rest, parent=ctx)  # raises UsageError (or BadParameter) on a bad example
    return cmd


def test_there_are_commands_to_check():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"edit", "export", "stats compute", "eval counterfact", "eval zsre", "trace"} <= names


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_examples_parse_as_shown(path, cmd):
    found = examples(cmd.help or "")
    assert found, f"`lmedit {' '.join(path)} --help` shows no example"
    for example in found:
        leaf = _parse(_lmedit_args(example))
        assert leaf is cmd, f"{example!r} runs `{leaf.name}`, not `{' '.join(path)}`"


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_examples_are_unbroken_in_an_80_column_help(path, cmd):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    shown = [line.strip() for line in result.output.splitlines()]
    for raw in (cmd.help or "").splitlines():
        line = raw.strip()
        if line.startswith(("lmedit ", "torchrun ")) or (line.startswith("--") and raw.startswith(" " * 6)):
            assert len(line) <= 76, f"example line too wide for an 80-column terminal: {line!r}"
            assert line in shown, f"example line {line!r} is wrapped or merged in the rendered help"


def test_a_broken_example_is_caught():
    """The checker itself must fail on the faults it exists for."""
    with pytest.raises(UsageError):
        _parse(_lmedit_args("lmedit export --patch p --out o lmedit export --patch q --out r"))
    with pytest.raises(UsageError):
        _parse(_lmedit_args("lmedit edit --requests r.jsonl"))  # --out is required
    with pytest.raises(UsageError):
        _parse(_lmedit_args("lmedit stats compute --layers 2 --no-such-option 3"))
    assert examples("Examples:\n\n  lmedit a \\\n    --b c\n  lmedit d") == ["lmedit a --b c", "lmedit d"]
