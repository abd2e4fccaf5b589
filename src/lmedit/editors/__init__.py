"""Editors: each method registers a config dataclass and a function `edit(model, tokenizer, requests, config)`.

The CLI's --method choices come from this registry; `make_config` fills per-model defaults and applies
--set overrides, rejecting unknown keys with the list of valid ones, values outside the range a setting declares
(lmedit.settings) with that range, and layers the model does not have with the ones it has.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmedit.editors.registry import EDITORS, Editor, register_editor  # noqa: F401  (the registry's API)
from lmedit.errors import InputError
from lmedit.settings import SettingError, setting_of


# The built-in methods by name, known without importing them (the CLI's help is built from this at start-up, before
# torch loads); tests check that it matches what the modules register.
BUILTIN_METHODS = ("rome", "memit", "emmet", "alphaedit", "ultraedit", "ft", "ft-conditional", "lora", "senses")


def get_editor(name: str) -> Editor:
    _load_builtin()
    if name not in EDITORS:
        raise InputError(f"unknown method {name!r}; choose one of: {', '.join(sorted(EDITORS))}")
    return EDITORS[name]


def editor_names() -> list[str]:
    _load_builtin()
    return sorted(EDITORS)


def _load_builtin() -> None:
    # each registers itself
    from lmedit.editors import alphaedit, emmet, finetune, lora, memit, rome, senses, ultraedit  # noqa: F401


def optional_float(value, name: str) -> float | None:
    """A number, or None for off; --set gives strings for fields whose default is None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number or none, got {value!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise InputError(f"{name} must be finite, got {value}")
    return value


def _coerce(value: Any, current: Any, key: str, setting=None):
    """A --set string (or a defaults-table value) as the field's type. A declared setting parses it (and the config
    checks its range); an undeclared field (e.g. the canonical settings) is parsed by the type of its current value."""
    if setting is not None:
        return setting.parse(key, value)
    if isinstance(value, str) and not isinstance(current, str):
        text = value.strip()
        try:
            if isinstance(current, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            if isinstance(current, int):
                return int(text)
            if isinstance(current, float):
                value = float(text)
                if value != value or value in (float("inf"), float("-inf")):
                    raise InputError(f"--set {key}: value must be finite, got {value}")
                return value
            if isinstance(current, tuple):
                return tuple(int(x) for x in text.replace("[", "").replace("]", "").split(",") if x.strip())
        except ValueError:
            raise InputError(f"--set {key}={value}: expected a {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise InputError(f"--set {key}: value must be finite, got {value}")
    return value


def apply_overrides(config, overrides: dict[str, Any]):
    """Return a copy of `config` with dotted keys set (e.g. 'value.lr'); unknown keys are an InputError, and so is
    a value outside what the setting accepts (lmedit.settings), named by its dotted key: `value.steps must be ...`."""
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        fields = {f.name for f in dataclasses.fields(config)}
        if head not in fields:
            raise InputError(f"unknown setting {key!r} for {type(config).__name__}; valid: {', '.join(sorted(fields))}")
        current = getattr(config, head)
        if rest:
            if not dataclasses.is_dataclass(current):
                raise InputError(f"setting {head!r} has no sub-settings")
            try:
                inner = apply_overrides(current, {rest: value})
            except SettingError as e:
                raise e.under(head) from None
            config = dataclasses.replace(config, **{head: inner})
        else:
            if dataclasses.is_dataclass(current):
                raise InputError(f"{head!r} is a group of settings; set one of them, e.g. {head}.<name>")
            config = dataclasses.replace(config, **{head: _coerce(value, current, key, setting_of(type(config), head))})
    return config


def make_config(method: str, model_name: str, model, overrides: dict[str, Any] | None = None):
    """The method's config: dataclass defaults, then the per-model defaults table, then the user's --set."""
    from lmedit.editors.defaults import defaults_for
    from lmedit.models.arch import check_layer

    editor = get_editor(method)
    # the table's rows choose layers; an editor that trains no layer's weights (senses) has none
    table = defaults_for(method, model_name, model) if getattr(editor.config_cls, "trains_weights", True) else {}
    config = apply_overrides(editor.config_cls(), table)
    config = apply_overrides(config, overrides or {})
    for layer in getattr(config, "layers", ()):  # the declaration checks the type; the model knows its depth
        check_layer(model, layer)
    return config


def new_state(method: str, model_name: str, model, config):
    """A fresh carried state for a sequence of `method`'s edits on `model` as it is now (before the first edit)."""
    from lmedit.carried import CarriedState
    from lmedit.models.arch import mlp_out_name
    from lmedit.patches import fingerprint

    names = [f"{mlp_out_name(model, l)}.weight" for l in config.layers]
    return CarriedState(method, model_name, model.config.model_type, fingerprint(model, names))


def load_state(directory, fresh):
    """The carried state saved in `directory`, refused unless it is the one `fresh` (new_state on the model before
    its first edit) would have started."""
    from lmedit.carried import CarriedState

    state = CarriedState.load(directory)
    state.check_belongs(fresh.kind, fresh.model, fresh.model_type, fresh.base_fingerprint)
    return state
