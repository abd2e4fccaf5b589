"""`lmedit ui`: a local page to try an edit by hand (lmedit.ui.server), bound to loopback unless told otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmedit.cli.common import DeviceOpt, ModelOpt, console, err_console, load_lm

PatchesOpt = typer.Option(None, "--patch", "-p", help="a saved patch directory to apply first (repeatable, "
                          "in order)")


def ui(model: str = ModelOpt, device: Optional[str] = DeviceOpt,
       host: str = typer.Option("127.0.0.1", "--host", help="address to listen on; anything but loopback lets "
                                "whoever reaches it edit this model"),
       port: int = typer.Option(7860, "--port", min=0, max=65535, help="port to listen on (0: any free one)"),
       patches: Optional[list[Path]] = PatchesOpt,
       max_new_tokens: int = typer.Option(12, "--max-new-tokens", min=1, help="tokens of each greedy completion "
                                          "shown")) -> None:
    """Serve a page to try edits by hand: type a fact and a new target, pick a method and its settings, press
    Edit, and compare greedy completions and P(new), P(true) before and after, on the prompt and on probe
    prompts you add; revert, save or load patches. Offline: the page is served from the package and fetches
    nothing from elsewhere. Edits run one at a time.

    Examples:

      lmedit ui
      lmedit ui --model my-hf-model-dir --port 8000
      lmedit ui --patch my-patch
    """
    from lmedit.patches import Patch
    from lmedit.ui.server import is_loopback, listen, serve
    from lmedit.ui.session import Session

    loaded = [(Patch.load(p), p) for p in patches or []]  # read (and digest-checked) before the model loads
    sock = listen(host, port)  # a busy port is refused before the model loads, too
    try:
        if not is_loopback(host):
            err_console.print(f"lmedit: warning: listening on {host}: anyone who can reach it can edit and probe "
                              "this model", markup=False, highlight=False)
        lm = load_lm(model, device)
        session = Session(lm, max_new_tokens=max_new_tokens)
        for patch, directory in loaded:
            session.stack.push(patch, f"{patch.meta.get('method', 'patch')}: {directory}")
        shown = f"[{host}]" if ":" in host else host
        console.print(f"lmedit ui: {lm.name} at http://{shown}:{sock.getsockname()[1]}/ (Ctrl-C to stop)",
                      markup=False, highlight=False, soft_wrap=True)
        serve(session, sock, loopback_only=is_loopback(host))
    finally:
        sock.close()
