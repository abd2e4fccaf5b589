"""The `lmedit` command line (Typer): the app, assembled from one module per command group, and `main`.

Errors are one line on stderr: exit 2 for bad input (usage errors included), 1 for failures, 130 for Ctrl-C.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from lmedit.cli import backpack, bench, canonical, chat, edit, evaluate, stats, trace, ui
from lmedit.cli.common import VERBOSE, err_console
from lmedit.errors import LmeditError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Edit facts in language models with small, reversible, measured weight changes.")
eval_app = typer.Typer(no_args_is_help=True, help="Edit then score on a benchmark.")
stats_app = typer.Typer(no_args_is_help=True, help="Key statistics C = E(k kᵀ): an explicit, cached artifact.")
backpack_app = typer.Typer(no_args_is_help=True, help="Backpack language models: train one to edit by senses.")
app.add_typer(eval_app, name="eval")
app.add_typer(stats_app, name="stats")
app.add_typer(backpack_app, name="backpack")

# The whole command tree, in one place.
app.command()(edit.demo)
app.command()(edit.edit)
app.command()(edit.export)
app.command()(evaluate.report)
app.command()(trace.trace)
app.command()(bench.bench)
app.command()(ui.ui)
app.command()(chat.chat)
eval_app.command("counterfact")(evaluate.eval_counterfact)
eval_app.command("zsre")(evaluate.eval_zsre)
eval_app.command("merge")(evaluate.eval_merge)
eval_app.command("canonical")(canonical.eval_canonical)
stats_app.command("compute")(stats.stats_compute)
stats_app.command("inspect")(stats.stats_inspect)
backpack_app.command("train")(backpack.train)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", help="show tracebacks on error")) -> None:
    VERBOSE["on"] = verbose


def _show_warnings() -> None:
    """lmedit's warnings as one line each on stderr; other libraries' warnings as Python shows them."""
    import warnings

    from lmedit.errors import LmeditWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LmeditWarning):
            err_console.print(f"lmedit: warning: {message}", markup=False, highlight=False)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", LmeditWarning)


def _usage_line(e: Exception) -> str:
    """A usage error (missing or unknown option, bad value) as one line that points at the command's help."""
    message = e.format_message() if hasattr(e, "format_message") else str(e)
    ctx = getattr(e, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return " ".join(message.split()) + where


def main() -> None:
    import click

    _show_warnings()
    try:
        code = app(standalone_mode=False)  # Typer turns Ctrl-C into a returned 130, not an exception
        if isinstance(code, int) and code != 0:
            err_console.print("lmedit: interrupted" if code == 130 else f"lmedit: exit code {code}")
            sys.exit(code)
    except LmeditError as e:
        if VERBOSE["on"]:
            traceback.print_exc()
        err_console.print(f"lmedit: error: {e}", markup=False, highlight=False)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, typer.Abort):
        err_console.print("lmedit: aborted")
        sys.exit(130)
    except (click.exceptions.ClickException, typer.TyperException) as e:  # Typer ≥ 0.2x vendors its own click
        err_console.print(f"lmedit: error: {_usage_line(e)}", markup=False, highlight=False)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        err_console.print("lmedit: interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - an unexpected failure still gets one line unless --verbose
        if VERBOSE["on"] or os.environ.get("LMEDIT_DEBUG"):
            raise
        err_console.print(f"lmedit: failed: {type(e).__name__}: {e} (rerun as `lmedit --verbose ...` for details)",
                          markup=False, highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
