"""Hooks as context managers that always remove themselves, even when the body raises.

`capture_io` records a module's input/output; `add_to_output` edits its output (a function of it).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


class StopForward(Exception):
    """Raised from a hook to end a forward pass early once the needed activations are read."""


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def capture_io(modules: dict[str, nn.Module], inputs: bool = True, outputs: bool = False,
               stop_after: str | None = None) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Record the first positional input and/or the output of each named module.

    If `stop_after` names one of them, the forward pass stops (StopForward) right after it runs;
    callers wrap the forward in `run_until_stop`.
    """
    store: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    handles = []

    def make_hook(name):
        def hook(module, args, output):
            if inputs and args:  # a block may be called with hidden_states as a keyword: only outputs then
                store[name]["input"] = args[0]
            if outputs:
                store[name]["output"] = _first(output)
            if name == stop_after:
                raise StopForward

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


def run_until_stop(fn: Callable[[], object]) -> None:
    try:
        fn()
    except StopForward:
        pass


@contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's output by fn(output) for the duration of the block."""

    def hook(mod, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
