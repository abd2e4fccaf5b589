"""What every command shares: the consoles, the common options, loading a model, parsing --set and layers.

Commands live one group per module (edit, evaluate, stats, trace, canonical, bench, backpack) and import only this
module from the CLI package; `lmedit.cli` assembles them into the app, so no command module imports the app.
"""

from __future__ import annotations

import os
from typing import Optional

import typer
from rich.console import Console

from lmedit.editors import BUILTIN_METHODS
from lmedit.errors import InputError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)
VERBOSE = {"on": False}  # set by the root --verbose option; read by main() when it reports an error

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m, an HF directory, or a .gguf file")
SetOpt = typer.Option(None, "--set", help="override a setting, e.g. --set layers=3,4 --set value.lr=0.2")
ForceOpt = typer.Option(False, "--force", help="overwrite an existing output")
METHODS_HELP = "editing method: " + " | ".join(BUILTIN_METHODS)


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_lm(spec: str):
    from lmedit.models import load_model
    from lmedit.models.loading import Placement

    quiet_transformers()
    placement = Placement.from_env()  # LMEDIT_DTYPE=bfloat16, LMEDIT_DEVICE_MAP=auto for models too large for one device
    device = os.environ.get("LMEDIT_DEVICE")  # e.g. cuda, cuda:1 (every step follows the model's device)
    if device and placement.device_map:
        raise InputError("set LMEDIT_DEVICE or LMEDIT_DEVICE_MAP, not both")
    with console.status(f"loading {spec}"):
        lm = load_model(spec, placement=placement)
    if device:
        try:
            lm.model.to(device)
        except (RuntimeError, AssertionError) as e:
            raise InputError(f"LMEDIT_DEVICE={device!r}: {str(e).splitlines()[0]}") from None
    return lm


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
