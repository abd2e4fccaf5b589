"""What the page sends, checked before any model work, with each error tied to the field it belongs to.

The checks are the library's own (EditRequest.validate, make_config, each config's validate); this module only
reads the form and says which field a message is about, so the page can show it beside that field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from lmedit.editors import editor_names, get_editor, make_config
from lmedit.errors import InputError
from lmedit.requests import EditRequest
from lmedit.settings import SettingError

REQUEST_FIELDS = ("prompt", "subject", "target_new", "target_true")
# The settings the page shows for a method that has them; any other goes in "other settings" (key=value lines).
MAIN_SETTINGS = ("layers", "stats_n", "value.steps", "value.lr", "epochs", "lr", "rank")
MAX_PROBES = 50  # each probe costs a greedy generation before and after the edit


class FieldError(InputError):
    """Bad input that belongs to one field of the page's form; `field` names it, the message is shown beside it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Method:
    """A registry editor as the page offers it: whether it fits the loaded model (and why not) and its main
    settings with this model's defaults, as text the way --set takes them."""

    name: str
    summary: str
    fits: bool
    reason: str
    settings: dict[str, str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EditOrder:
    """One checked edit: the request, the method, its full config, and the probe prompts scored around it."""

    request: EditRequest
    method: str
    config: Any
    probes: tuple[str, ...]

    @property
    def prompts(self) -> list[str]:
        return list(dict.fromkeys([self.request.prompt, *self.probes]))  # a probe repeating the prompt: once

    @property
    def label(self) -> str:
        r = self.request
        return f"{self.method}: {r.subject}: {r.target_true or '?'} → {r.target_new}"


def _lookup(config, key: str):
    """The value of a dotted setting (value.steps), or a KeyError."""
    for part in key.split("."):
        if not dataclasses.is_dataclass(config) or part not in {f.name for f in dataclasses.fields(config)}:
            raise KeyError(key)
        config = getattr(config, part)
    return config


def setting_text(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _checked_config(method: str, lm, overrides: dict[str, str]):
    config = make_config(method, lm.name, lm.model, overrides)
    if hasattr(config, "validate"):  # what the editor itself checks first (a KV cache, the layers)
        config.validate(lm.model)
    return config


def methods_for(lm) -> dict[str, Method]:
    """Every registry editor, with whether its defaults fit this model: a method that does not is shown disabled
    with the library's reason (e.g. ROME on a model without a KV cache)."""
    out = {}
    for name in editor_names():
        summary = get_editor(name).summary
        try:
            config = _checked_config(name, lm, {})
        except InputError as e:
            out[name] = Method(name, summary, False, str(e), {})
            continue
        shown = {}
        for key in MAIN_SETTINGS:
            try:
                shown[key] = setting_text(_lookup(config, key))
            except KeyError:
                pass
        out[name] = Method(name, summary, True, "", shown)
    return out


def field_of(error: InputError, settings: Iterable[str] = ()) -> str:
    """The form field an InputError is about: a request field (the library's messages start with its name), a
    shown setting (`setting:NAME`), the "other settings" box, or "form" when it is about none in particular."""
    settings = set(settings)
    if isinstance(error, FieldError):
        return error.field
    if isinstance(error, SettingError):
        return f"setting:{error.name}" if error.name in settings else "other_settings"
    text = str(error)
    if text.split(" ", 1)[0] in REQUEST_FIELDS:
        return text.split(" ", 1)[0]
    if text.startswith("--set "):  # a value of the wrong type: "--set value.steps=x: expected a int"
        key = text[len("--set "):].split("=", 1)[0].split(":", 1)[0]
        return f"setting:{key}" if key in settings else "other_settings"
    if text.startswith(("unknown setting", "setting ")) or " is a group of settings" in text:
        return "other_settings"
    if "layer" in text.split(":", 1)[0] and "layers" in settings:
        return "setting:layers"
    return "form"


def _text(form: dict, key: str, optional: bool = False) -> str | None:
    value = form.get(key)
    if value is None or (optional and isinstance(value, str) and not value.strip()):
        return None if optional else ""
    if not isinstance(value, str):
        raise FieldError(key, f"{key} must be text, got {type(value).__name__}")
    return value


def parse_settings(form: dict) -> dict[str, str]:
    """The shown settings (blank ones left at their defaults) and the other-settings lines, as --set pairs."""
    settings = form.get("settings") or {}
    if not isinstance(settings, dict) or not all(isinstance(v, str) for v in settings.values()):
        raise FieldError("other_settings", "settings must be an object of text values")
    out = {k: v for k, v in settings.items() if v.strip()}
    for line in (_text(form, "other_settings") or "").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if not eq or not key.strip():
            raise FieldError("other_settings", f"expected key=value, e.g. value.steps=10; got {line.strip()!r}")
        out[key.strip()] = value.strip()
    return out


def parse_probes(form: dict) -> tuple[str, ...]:
    probes = form.get("probes") or []
    if isinstance(probes, str):
        probes = probes.splitlines()
    if not isinstance(probes, list) or not all(isinstance(p, str) for p in probes):
        raise FieldError("probes", "probes must be a list of prompts")
    probes = tuple(dict.fromkeys(p.strip() for p in probes if p.strip()))
    if len(probes) > MAX_PROBES:
        raise FieldError("probes", f"at most {MAX_PROBES} probe prompts, got {len(probes)}")
    return probes


def read_order(form: Any, lm, methods: dict[str, Method]) -> EditOrder:
    """Check an edit form: the request (a prompt may hold "{}" for the subject), a method that fits, its settings,
    the probes. Raises FieldError naming the field of the first problem."""
    if not isinstance(form, dict):
        raise FieldError("form", "expected a JSON object with the edit's fields")
    prompt, subject, target_new = (_text(form, k) for k in ("prompt", "subject", "target_new"))
    target_true = _text(form, "target_true", optional=True)
    if "{}" in prompt and subject.strip():
        prompt = prompt.replace("{}", subject)  # the template form, as ROME's data writes it
    request = EditRequest(prompt, subject, target_new, target_true)
    try:
        request.validate()
    except InputError as e:
        raise FieldError(field_of(e), str(e)) from None
    method = _text(form, "method")
    if method not in methods:
        raise FieldError("method", f"unknown method {method!r}; choose one of: {', '.join(sorted(methods))}")
    if not methods[method].fits:
        raise FieldError("method", f"{method} does not fit {lm.name}: {methods[method].reason}")
    overrides = parse_settings(form)
    try:
        config = _checked_config(method, lm, overrides)
    except InputError as e:
        raise FieldError(field_of(e, methods[method].settings), str(e)) from None
    return EditOrder(request, method, config, parse_probes(form))
