"""A saved patch that was damaged or edited is refused at load, before it can touch a model (issue 18)."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmedit.errors import EditFailure, InputError, LmeditWarning
from lmedit.patch_integrity import INTEGRITY_KEY, MAX_RELATIVE_NORM
from lmedit.patches import Delta, Patch
from test_patches import TARGETS, assert_same, make_patch, snapshot, tiny_llama

NAMES = TARGETS["llama"][1]


def saved(tmp_path, kind="dense"):
    model = tiny_llama()
    patch = Patch.build(model, make_patch(model, NAMES, kind).deltas, method="rome", config={"layers": [1]},
                        requests=[{"prompt": "The Eiffel Tower is in", "target_new": "Rome"}], model_name="tiny")
    patch.save(tmp_path / "p")
    return model, tmp_path / "p"


def rewrite_tensor(folder, change):
    """Change the stored tensors in place, keeping a valid safetensors header (as a flipped float would)."""
    path = folder / "patch.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "lmedit-patch/1"})


def edit_json(folder, change):
    path = folder / "patch.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2))


def test_saved_patch_records_both_digests_and_loads_clean(tmp_path):
    model, folder = saved(tmp_path)
    seal = json.loads((folder / "patch.json").read_text())[INTEGRITY_KEY]
    assert seal["algorithm"] == "sha256" and len(seal["tensors"]) == 64 and len(seal["meta"]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sealed patch loads without a warning
        loaded = Patch.load(folder)
    assert INTEGRITY_KEY not in loaded.meta
    loaded.save(tmp_path / "again")  # a loaded patch saves again with the same digests
    again = json.loads((tmp_path / "again" / "patch.json").read_text())[INTEGRITY_KEY]
    assert again == seal


def test_one_float_changed_to_1e30_is_refused_at_load(tmp_path):
    _, folder = saved(tmp_path)
    rewrite_tensor(folder, lambda t: t[f"{NAMES[0]}::dense"].view(-1).__setitem__(7, 1e30))
    with pytest.raises(InputError, match=r"patch\.safetensors does not match the digest"):
        Patch.load(folder)


def test_a_tiny_change_to_one_float_is_refused_too(tmp_path):
    _, folder = saved(tmp_path, "lowrank")
    key = f"{NAMES[1]}::left"

    def nudge(t):
        t[key].view(-1)[0] = torch.nextafter(t[key].view(-1)[0], torch.tensor(1.0))

    rewrite_tensor(folder, nudge)
    with pytest.raises(InputError, match="does not match the digest"):
        Patch.load(folder)


@pytest.mark.parametrize("field,value", [("method", "memit"), ("requests", [{"prompt": "x", "target_new": "Berlin"}]),
                                         ("base_fingerprint", "0" * 64), ("config", {"layers": [0]})])
def test_edited_metadata_is_refused(tmp_path, field, value):
    _, folder = saved(tmp_path)
    edit_json(folder, lambda d: d.__setitem__(field, value))
    with pytest.raises(InputError, match=r"patch\.json was changed after the patch was saved"):
        Patch.load(folder)


def test_reformatting_patch_json_is_not_a_change(tmp_path):
    _, folder = saved(tmp_path)
    edit_json(folder, lambda d: None)  # same content, other whitespace
    Patch.load(folder)


def test_a_patch_without_digest_loads_with_one_warning(tmp_path):
    _, folder = saved(tmp_path)
    edit_json(folder, lambda d: d.pop(INTEGRITY_KEY))
    with pytest.warns(LmeditWarning, match="has no digest") as caught:
        Patch.load(folder)
    assert len([w for w in caught if issubclass(w.category, LmeditWarning)]) == 1
    assert "\n" not in str(caught[0].message)


def test_non_finite_delta_is_refused_even_without_digest(tmp_path):
    _, folder = saved(tmp_path)
    rewrite_tensor(folder, lambda t: t[f"{NAMES[0]}::dense"].view(-1).__setitem__(3, float("inf")))
    edit_json(folder, lambda d: d.pop(INTEGRITY_KEY))
    with pytest.warns(LmeditWarning), pytest.raises(InputError, match="1 non-finite value"):
        Patch.load(folder)


def test_implausibly_large_delta_needs_force(tmp_path):
    model, folder = saved(tmp_path)
    rewrite_tensor(folder, lambda t: t[f"{NAMES[0]}::dense"].view(-1).__setitem__(7, 1e30))
    edit_json(folder, lambda d: d.pop(INTEGRITY_KEY))  # an old patch: only the size check is left to catch it
    with pytest.warns(LmeditWarning):
        patch = Patch.load(folder)
    before = snapshot(model)
    with pytest.raises(InputError, match=r"times the weight's own .* --force"):
        patch.apply(model)
    assert_same(model, before)  # refused before anything was added
    patch.apply(model, force=True).revert()
    assert_same(model, before)


def test_size_check_threshold_is_relative_to_the_weight():
    model = tiny_llama()
    w = model.get_parameter(NAMES[0])
    direction = torch.randn_like(w)
    direction /= direction.norm()
    just_under = Delta(dense=direction * (MAX_RELATIVE_NORM * 0.99) * w.norm().detach())
    just_over = Delta(dense=direction * (MAX_RELATIVE_NORM * 1.01) * w.norm().detach())
    Patch({NAMES[0]: just_under}).apply(model).revert()
    with pytest.raises(InputError, match="times the weight's own"):
        Patch({NAMES[0]: just_over}).apply(model)


def test_an_editor_that_produces_nan_fails_where_it_is_made():
    model = tiny_llama()
    bad = torch.zeros(tuple(model.get_parameter(NAMES[0]).shape))
    bad[0, 0] = float("nan")
    with pytest.raises(EditFailure, match="non-finite"):
        Patch.build(model, {NAMES[0]: Delta(dense=bad)}, method="ft")
