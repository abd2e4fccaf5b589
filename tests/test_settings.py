"""Every editor setting says what it accepts where it is declared, and refuses anything else in one line.

The walk covers every registered editor's config, nested groups (`value.*`) included, so a setting added later
without a declared range fails `test_every_numeric_setting_declares_a_range`.
"""

import dataclasses
import math
import numbers
import typing

import pytest

from lmedit.editors import apply_overrides, editor_names, get_editor, make_config
from lmedit.errors import InputError
from lmedit.locate.values import ValueConfig
from lmedit.settings import Setting, setting_of


def _walk(config, prefix=""):
    """(dotted key, owning dataclass, field, value, type hint) for every leaf field, groups entered."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", type(config), f, value, hints[f.name]


def _is_numeric(hint, value) -> bool:
    """An int or float setting (bool is not one), or a tuple of ints (layers), by its type or its default."""
    def numeric(t):
        return t in (int, float)

    args = typing.get_args(hint)
    if numeric(hint) or any(numeric(a) for a in args if typing.get_origin(hint) is not tuple):
        return True
    if typing.get_origin(hint) is tuple and any(numeric(a) for a in args):
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _declared():
    """(method, key, setting) for every field of every editor's config that declares a Setting."""
    out = []
    for method in editor_names():
        for key, owner, f, _, _ in _walk(get_editor(method).config_cls()):
            setting = setting_of(owner, f.name)
            if setting is not None:
                out.append((method, key, setting))
    return out


DECLARED = _declared()


def _outside(s: Setting) -> list:
    """Values just outside what `s` accepts, of the right type and of wrong types, as values and as --set text."""
    if s.kind == "choice":
        return ["no-such-choice", 3]
    if s.kind == "flag":
        return ["maybe", 2]
    if s.kind == "layers":
        return ["abc", "-1", "1,-2", (-1,), (1.5,), (True,), "1.5"]
    step = 1 if s.kind == "integer" else 0.5
    bad = []
    if s.ge is not None:
        bad.append(s.ge - step)
    if s.gt is not None:
        bad += [s.gt, s.gt - step]
    if s.le is not None:
        bad.append(s.le + step)
    if s.lt is not None:
        bad.append(s.lt)
    if s.kind == "integer":
        bad = [int(b) for b in bad] + [2.5, True, "abc", "2.5"]
    else:
        bad += [math.nan, math.inf, -math.inf, "nan", "inf", "abc", True]
    if not s.none:
        bad.append(None)
    return bad + [str(b) for b in bad if isinstance(b, (int, float)) and not isinstance(b, bool)]


def test_every_editor_is_walked():
    assert {"rome", "memit", "emmet", "ft", "ft-conditional", "lora"} <= set(editor_names())
    keys = {key for _, key, _ in DECLARED}
    assert {"value.steps", "value.lr", "mom2_weight", "layers", "rank", "stop_prob", "stats_n"} <= keys


def test_every_numeric_setting_declares_a_range():
    missing = []
    for method in editor_names():
        for key, owner, f, value, hint in _walk(get_editor(method).config_cls()):
            if _is_numeric(hint, value) and setting_of(owner, f.name) is None:
                missing.append(f"{method}: {key}")
    assert not missing, f"numeric settings without a declared range (lmedit.settings): {missing}"


@pytest.mark.parametrize("method, key, setting", DECLARED, ids=[f"{m}:{k}" for m, k, _ in DECLARED])
def test_a_value_outside_the_range_is_refused_naming_setting_and_range(method, key, setting):
    config = get_editor(method).config_cls()
    for bad in _outside(setting):
        with pytest.raises(InputError) as info:
            apply_overrides(config, {key: bad})
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"{key} must be "), (bad, message)
        if not (setting.kind == "layers" and bad in ("abc", "1.5")):  # text that is no list at all: see below
            assert setting.expected() in message, (bad, message)


@pytest.mark.parametrize("method, key, setting", DECLARED, ids=[f"{m}:{k}" for m, k, _ in DECLARED])
def test_valid_values_are_kept_exactly(method, key, setting):
    """Each default, written as --set text, gives back the very same config (no result may change)."""
    config = get_editor(method).config_cls()
    head, _, rest = key.partition(".")
    value = getattr(getattr(config, head), rest) if rest else getattr(config, head)
    text = ("none" if value is None else str(value).lower() if isinstance(value, bool)
            else ",".join(map(str, value)) if isinstance(value, tuple) else repr(value) if isinstance(value, float)
            else str(value))
    assert apply_overrides(config, {key: text}) == config
    assert apply_overrides(config, {key: value}) == config


@pytest.mark.parametrize("key, value, message", [
    ("value.steps", "-1", "value.steps must be an integer >= 2, got -1"),
    ("value.steps", "1", "value.steps must be an integer >= 2, got 1"),  # one step only measures: δ stays 0
    ("value.steps", True, "value.steps must be an integer >= 2, got True"),
    ("value.steps", "true", "value.steps must be an integer >= 2, got 'true'"),
    ("value.steps", "2.5", "value.steps must be an integer >= 2, got '2.5'"),
    ("mom2_weight", "-3", "mom2_weight must be a finite number >= 0, got -3"),
    ("mom2_weight", "nan", "mom2_weight must be a finite number >= 0, got nan"),
    ("value.lr", "inf", "value.lr must be a finite number > 0, got inf"),
    ("value.lr", float("-inf"), "value.lr must be a finite number > 0, got -inf"),
    ("value.lr", "0", "value.lr must be a finite number > 0, got 0"),
    ("value.clamp_norm_factor", "0", "value.clamp_norm_factor must be a finite number > 0, got 0"),
    ("layers", "abc", "layers must be a comma list of integers such as 2,3,4, got 'abc'"),
    ("layers", "2,-1", "layers must be a comma list of integers >= 0 such as 2,3,4, got '2,-1'"),
    ("stats_n", "0", "stats_n must be an integer >= 1 or 'all', got '0'"),
    ("solver", "magic", "solver must be one of least_squares, equality, null_space, got 'magic'"),
    ("value.site", "stream", "value.site must be one of residual, mlp_out, got 'stream'"),
])
def test_messages(key, value, message):
    with pytest.raises(InputError) as info:
        apply_overrides(get_editor("memit").config_cls(), {key: value})
    assert str(info.value) == message


@pytest.mark.parametrize("method, key, value, message", [
    ("ft", "stop_prob", "1.5", "stop_prob must be a number in (0, 1] or none, got 1.5"),
    ("ft", "budget", "-0.1", "budget must be a finite number >= 0 or none, got -0.1"),
    ("ft", "n_random_facts", "-1", "n_random_facts must be an integer >= 0, got -1"),
    ("ft", "augment", "maybe", "augment must be true or false, got 'maybe'"),
    ("lora", "rank", "0", "rank must be an integer >= 1, got 0"),
    ("lora", "alpha", "-16", "alpha must be a finite number > 0, got -16"),
])
def test_training_messages(method, key, value, message):
    with pytest.raises(InputError) as info:
        apply_overrides(get_editor(method).config_cls(), {key: value})
    assert str(info.value) == message


def test_none_and_words_are_read_where_a_setting_allows_them():
    ft = get_editor("ft").config_cls()
    assert apply_overrides(ft, {"stop_prob": "none"}).stop_prob is None
    assert apply_overrides(ft, {"budget": "0.25"}).budget == 0.25  # a default of None no longer means "any text"
    assert apply_overrides(ft, {"norm_constraint": "off"}).norm_constraint is None
    memit = get_editor("memit").config_cls()
    assert apply_overrides(memit, {"stats_n": "all"}).stats_n == "all"
    assert apply_overrides(memit, {"stats_n": "5000"}).stats_n == "5000"  # kept as written, as before
    assert apply_overrides(memit, {"layers": "[2, 3]"}).layers == (2, 3)
    with pytest.raises(InputError, match="mom2_weight must be"):
        apply_overrides(memit, {"mom2_weight": None})


def test_configs_made_in_python_are_checked_too():
    with pytest.raises(InputError, match=r"^steps must be an integer >= 2, got -1$"):
        ValueConfig(steps=-1)
    with pytest.raises(InputError, match="mu must be a finite number >= 0"):
        get_editor("emmet").config_cls(mu=-0.1)
    with pytest.raises(InputError, match="lr must be a finite number > 0"):
        get_editor("ft").config_cls(lr=0.0)
    forced = ValueConfig()
    object.__setattr__(forced, "lr", -1.0)  # a group changed past its checks is caught by the config holding it
    with pytest.raises(InputError, match=r"^value\.lr must be a finite number > 0, got -1$"):
        get_editor("rome").config_cls(value=forced)
    assert ValueConfig(lr=1) == ValueConfig(lr=1)  # an int where a float is expected is a number


def test_subclasses_that_change_a_default_keep_the_range():
    rome = get_editor("rome").config_cls
    assert rome().mu == 0.0 and setting_of(rome, "mu") == setting_of(get_editor("memit").config_cls, "mu")
    with pytest.raises(InputError, match="mu must be a finite number >= 0, got -1"):
        rome(mu=-1.0)
    conditional = get_editor("ft-conditional").config_cls
    with pytest.raises(InputError, match="n_paraphrases must be an integer >= 0, got -2"):
        apply_overrides(conditional(), {"n_paraphrases": "-2"})


def test_a_changed_config_is_caught_before_any_work():
    """LocateConfig is mutable: validate() checks the ranges again where the model is known."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=64, vocab_size=64))
    config = get_editor("memit").config_cls(layers=(1, 2))
    config.mom2_weight = -1.0
    with pytest.raises(InputError, match="mom2_weight must be a finite number >= 0, got -1"):
        config.validate(model)


def test_layers_beyond_the_model_are_refused_by_make_config_naming_its_layers():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=64, vocab_size=64))
    for method in editor_names():
        with pytest.raises(InputError, match=r"layer 4 is out of range: this model has layers 0\.\.3"):
            make_config(method, "tiny", model, {"layers": "4"})
        assert make_config(method, "tiny", model, {"layers": "3"}).layers == (3,)


def test_cli_refuses_a_bad_setting_with_exit_2_and_no_patch(tiny_model, tmp_path, monkeypatch, capsys):
    import json
    import sys

    from lmedit import cli

    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "The Eiffel Tower is located in the city of",
                                    "subject": "The Eiffel Tower", "target_new": "Rome"}) + "\n")
    monkeypatch.setenv("LMEDIT_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    for setting, phrase in [("value.steps=-1", "value.steps must be an integer >= 2, got -1"),
                            ("layers=abc", "layers must be a comma list of integers such as 2,3,4, got 'abc'"),
                            ("layers=7", "layer 7 is out of range: this model has layers 0..3")]:
        monkeypatch.setattr(sys, "argv", ["lmedit", "edit", "--model", str(tmp_path / "tiny"), "--method", "memit",
                                          "--requests", str(requests), "--out", str(tmp_path / "p"),
                                          "--set", setting])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exc.value.code == 2 and len(err) == 1 and phrase in err[0], err
        assert not (tmp_path / "p").exists()
