"""`lmedit chat`: talk to the (edited) model in the terminal (lmedit.ui.chat), reading lines from stdin."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from lmedit.cli.common import DeviceOpt, ModelOpt, console, load_lm


def chat(model: str = ModelOpt, device: Optional[str] = DeviceOpt,
         patches: Optional[list[Path]] = typer.Option(None, "--patch", "-p", help="a saved patch directory to "
                                                      "apply first (repeatable, in order)"),
         max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="tokens per reply, at most")) -> None:
    """Talk to the model with patches applied, through its chat template when the tokenizer has one. In the
    loop: /apply DIR, /revert (the last patch), /probe PROMPT (plain continuation and the edits' target
    probabilities), /patches, /reset, /help, /quit.

    Examples:

      lmedit chat
      lmedit chat --patch my-patch
    """
    from lmedit.patches import Patch
    from lmedit.ui.chat import ChatLoop

    loaded = [(Patch.load(p), p) for p in patches or []]  # read (and digest-checked) before the model loads
    loop = ChatLoop(load_lm(model, device), console, max_new_tokens=max_new_tokens)
    for patch, directory in loaded:
        loop.apply(patch, str(directory))  # refuses a patch made on another model
    loop.run(sys.stdin)
