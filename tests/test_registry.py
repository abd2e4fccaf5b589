"""The editors' registry: capabilities instead of method lists, and resources passed explicitly to an edit."""

from __future__ import annotations

import pytest

from lmedit.editors import EDITORS, editor_names
from lmedit.editors.registry import Editor


def _recording(**capabilities) -> tuple[Editor, list[dict]]:
    seen = []

    def fn(model, tokenizer, requests, config, progress=True, announce=print, **extra):
        seen.append(extra)
        return "patch"

    return Editor("fake", object, fn, "records what it is given", **capabilities), seen


def test_edit_passes_only_what_the_editor_takes(tmp_path):
    store, state = object(), object()
    plain, seen = _recording()
    assert plain.edit(None, None, [], None, values=store, checkpoint_dir=tmp_path) == "patch"
    assert seen == [{}]
    locate, seen = _recording(reuses_values=True)
    locate.edit(None, None, [], None, values=store, checkpoint_dir=tmp_path)
    assert seen == [{"values": store}]
    trainer, seen = _recording(checkpoints=True)
    trainer.edit(None, None, [], None, values=store, checkpoint_dir=str(tmp_path))
    assert seen == [{"checkpoint_dir": tmp_path}]
    lifelong, seen = _recording(carries_state=True, reuses_values=True)
    lifelong.edit(None, None, [], None, values=store, state=state)
    assert seen == [{"state": state, "values": store}]
    with pytest.raises(TypeError, match="fake carries no state"):
        plain.edit(None, None, [], None, state=state)


def test_capabilities_of_the_builtin_editors():
    names = editor_names()
    by = {flag: {n for n in names if getattr(EDITORS[n], flag)} for flag in
          ("carries_state", "reuses_values", "checkpoints", "needs_subject", "needs_kv_cache", "canonical",
           "backpack_only")}
    assert by["carries_state"] == {"alphaedit", "ultraedit"}
    assert by["reuses_values"] == by["needs_kv_cache"] == {"rome", "memit", "emmet", "alphaedit"}
    assert by["needs_subject"] == {"rome", "memit", "emmet", "alphaedit"}
    assert by["checkpoints"] == {"ft", "ft-conditional", "lora", "senses"}
    assert by["canonical"] == {"ft", "ft-conditional", "lora", "memit", "senses"}
    assert by["backpack_only"] == {"senses"}


def test_the_canonical_help_lists_the_canonical_methods():
    from lmedit.cli.canonical import CANONICAL_METHODS
    from lmedit.evaluate import canonical_config as cc

    assert CANONICAL_METHODS == cc.METHODS
