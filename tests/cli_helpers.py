"""Running the real CLI in process, and what every bad-input case asserts (exit 2, one line, no traceback)."""

from __future__ import annotations

import sys

import pytest

from lmedit import cli


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`lmedit ARGS...` through cli.main(), as the shell runs it; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lmedit", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *phrases: str, exit_code: int = 2) -> None:
    assert code == exit_code, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in {err!r}"
