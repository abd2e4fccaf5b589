"""What each editor setting accepts, declared next to its default; checked whenever a config is made.

A config field declared with one of the helpers below carries a `Setting` in its metadata:

    steps: int = integer(25, ge=2)          # loss evaluations; the last only measures
    lr: float = number(0.5, gt=0)
    stop_prob: float | None = number(0.9, gt=0, le=1, none=True)
    layers: tuple[int, ...] = layer_list((4,))

The config's `__post_init__` calls `check_settings(self)`, so a config built in Python, by
`dataclasses.replace` or from `--set` (editors.apply_overrides, which parses text with `Setting.parse`) is
refused with one line naming the setting, what it accepts and what it got:
`value.steps must be an integer >= 2, got -1`. A subclass that only changes a default keeps the range its base
class declared. No torch here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from lmedit.errors import InputError

NONE_WORDS = ("", "none", "off")  # what --set writes for "no value" where a setting may be None
TRUE_WORDS, FALSE_WORDS = ("true", "1"), ("false", "0")
LAYERS_EXAMPLE = "2,3,4"


class SettingError(InputError):
    """A setting outside what it accepts. `under(group)` names it as the dotted key a user writes (value.steps)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name} {message}")
        self.name, self.message = name, message

    def under(self, group: str) -> "SettingError":
        return SettingError(f"{group}.{self.name}", self.message)


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@dataclass(frozen=True)
class Setting:
    """kind: 'integer', 'number' (finite real), 'layers' (tuple of layer indices), 'choice' or 'flag'.
    ge/gt/le/lt bound numbers and integers (and each layer index); none: None is accepted (written none/off);
    words: for a choice its options, for an integer words accepted besides numbers (stats_n: 'all');
    text: the value may be kept as digits in a string (stats_n), checked as the integer it spells."""

    kind: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    none: bool = False
    words: tuple[str, ...] = ()
    text: bool = False

    # ------------------------------------------------------------------ what it accepts, in words

    def _range(self) -> str:
        low = f"[{_bound(self.ge)}" if self.ge is not None else f"({_bound(self.gt)}" if self.gt is not None else ""
        high = f"{_bound(self.le)}]" if self.le is not None else f"{_bound(self.lt)})" if self.lt is not None else ""
        if low and high:
            return f" in {low}, {high}"
        ops = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        return "".join(f" {op} {_bound(x)}" for op, x in ops if x is not None)

    def expected(self) -> str:
        """E.g. 'an integer >= 1', 'a finite number > 0', 'a number in (0, 1] or none', 'one of a, b'."""
        if self.kind == "choice":
            out = "one of " + ", ".join(self.words)
        elif self.kind == "flag":
            out = "true or false"
        elif self.kind == "layers":
            out = f"a comma list of integers{self._range()} such as {LAYERS_EXAMPLE}"
        elif self.kind == "integer":
            out = "an integer" + self._range() + "".join(f" or {w!r}" for w in self.words)
        else:
            r = self._range()
            out = ("a number" if " in " in r else "a finite number") + r
        return out + (" or none" if self.none else "")

    # ------------------------------------------------------------------ checking a value

    def _in_range(self, x) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def _ok_integer(self, x) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool) and self._in_range(x)

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.none
        if self.kind == "choice":
            return isinstance(value, str) and value in self.words
        if self.kind == "flag":
            return isinstance(value, bool)
        if self.kind == "layers":
            return isinstance(value, (tuple, list)) and all(self._ok_integer(x) for x in value)
        if self.kind == "integer":
            if isinstance(value, str) and self.text:
                text = value.strip().lower()
                if text in self.words:
                    return True
                digits = text.replace("_", "")
                return digits.lstrip("-").isdigit() and self._in_range(int(digits))
            return self._ok_integer(value)
        return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                and self._in_range(value))

    def check(self, name: str, value: Any) -> None:
        if not self.accepts(value):
            raise SettingError(name, f"must be {self.expected()}, got {_show(value)}")

    # ------------------------------------------------------------------ --set text to a value

    def parse(self, name: str, value: Any) -> Any:
        """The value a --set string (or a value from a defaults table) stands for; checked when the config is made.
        Text that is not even of the right kind is refused here, naming what was written."""
        if not isinstance(value, str):
            if self.kind == "number" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                return float(value)
            return value
        text = value.strip()
        if self.none and text.lower() in NONE_WORDS:
            return None
        if self.kind == "choice":
            return text.lower() if text not in self.words and text.lower() in self.words else text
        if self.kind == "integer" and self.text:
            return text
        try:
            if self.kind == "flag":
                if text.lower() not in TRUE_WORDS + FALSE_WORDS:
                    raise ValueError
                return text.lower() in TRUE_WORDS
            if self.kind == "integer":
                return int(text)
            if self.kind == "layers":
                return tuple(int(x) for x in text.replace("[", "").replace("]", "").split(",") if x.strip())
            return float(text)
        except ValueError:
            what = (f"a comma list of integers such as {LAYERS_EXAMPLE}" if self.kind == "layers"
                    else self.expected())
            raise SettingError(name, f"must be {what}, got {value!r}") from None


def _show(value: Any) -> str:
    """A value as a user writes it: layers '2,-1', a number -3 (not -3.0), text quoted."""
    if isinstance(value, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return repr(",".join(map(str, value)))
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value) if isinstance(value, (str, bool)) or value is None else str(value)


# ---------------------------------------------------------------------- declaring a field

def _field(default: Any, setting: Setting, **kwargs) -> Any:
    setting.check("default", default)  # a declaration whose default it refuses is a bug here
    return dataclasses.field(default=default, metadata={"setting": setting}, **kwargs)


def integer(default: int | str | None, *, ge=None, gt=None, le=None, lt=None, none: bool = False,
            words: tuple[str, ...] = (), text: bool = False):
    return _field(default, Setting("integer", ge, gt, le, lt, none, words, text))


def number(default: float | None, *, ge=None, gt=None, le=None, lt=None, none: bool = False):
    return _field(default, Setting("number", ge, gt, le, lt, none))


def layer_list(default: tuple[int, ...]):
    """Layer indices (>= 0; whether the model has them is checked where the model is known: make_config)."""
    return _field(tuple(default), Setting("layers", ge=0))


def choice(default: str, options: tuple[str, ...]):
    return _field(default, Setting("choice", words=tuple(options)))


def flag(default: bool):
    return _field(default, Setting("flag"))


# ---------------------------------------------------------------------- reading the declarations

def setting_of(cls: type, name: str) -> Setting | None:
    """The Setting declared for field `name` of dataclass `cls`, or in the nearest base class that declares it
    (a subclass that writes only a new default keeps the base's range)."""
    for klass in getattr(cls, "__mro__", (type(cls),)):
        f = klass.__dict__.get("__dataclass_fields__", {}).get(name)
        if f is not None and "setting" in f.metadata:
            return f.metadata["setting"]
    return None


def check_settings(config: Any) -> None:
    """Raise SettingError for the first declared field of `config` (or of a group in it, named group.field) whose
    value it does not accept."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        setting = setting_of(type(config), f.name)
        if setting is not None:
            setting.check(f.name, value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            try:
                check_settings(value)
            except SettingError as e:
                raise e.under(f.name) from None
