"""The editors' registry: each method module registers its name, config class and edit function here.

Apart from the package's __init__ (which loads the built-in modules on first use), so a method module imports
the registry without importing the package that imports it: no cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Editor:
    name: str
    config_cls: type
    fn: Callable  # fn(model, tokenizer, requests, config, progress=True) -> Patch
    summary: str
    # a lifelong editor: fn also takes `state=` (lmedit.carried.CarriedState), carried from batch to batch of a
    # sequence and updated in place by each edit
    carries_state: bool = False


EDITORS: dict[str, Editor] = {}


def register_editor(name: str, config_cls: type, fn: Callable, summary: str, carries_state: bool = False) -> None:
    EDITORS[name] = Editor(name, config_cls, fn, summary, carries_state)
