"""`lmedit demo`, `edit` and `export`: compute an edit, save it as a patch, write the edited model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmedit.cli.common import (METHODS_HELP, DeviceOpt, ForceOpt, ModelOpt, SetOpt, check_model_for, console, load_lm,
                               parse_sets, quiet_transformers)
from lmedit.errors import InputError


def demo(model: str = ModelOpt, device: Optional[str] = DeviceOpt,
         method: str = typer.Option("rome", help="editing method"),
         out: Path = typer.Option(Path("out/demo-patch"), help="where the demo's patch is saved"),
         force: bool = ForceOpt) -> None:
    """Edit a few facts in the embedded model, show before/after, save the patch, revert.

    Example:

      lmedit demo
    """
    from lmedit.demo import run_demo

    quiet_transformers()
    run_demo(load_lm(model, device), method, out, force, console)


def edit(requests: Path = typer.Option(..., "--requests", "-r", help="requests: JSONL, CounterFact, ROME or zsRE JSON"),
         out: Path = typer.Option(..., "--out", "-o", help="output patch directory"),
         model: str = ModelOpt, device: Optional[str] = DeviceOpt,
         method: str = typer.Option("memit", help=METHODS_HELP),
         limit: Optional[int] = typer.Option(None, help="only the first N requests"),
         sets: Optional[list[str]] = SetOpt,
         after: Optional[list[Path]] = typer.Option(None, "--after", help="patches applied first, in order: this "
                                                    "edit is made on top of them (repeatable)"),
         state: Optional[Path] = typer.Option(None, "--state", help="a lifelong editor's (alphaedit, ultraedit) "
                                              "carried state: read if present, updated after the edit"),
         force: bool = ForceOpt) -> None:
    """Compute an edit and save it as a patch (the model files are not changed). A fine-tuning edit keeps its
    state after every epoch in OUT.train/; the same command run again after an interruption resumes from it.
    Editing over time: each batch on top of the earlier patches (--after), a lifelong editor carrying its state
    from batch to batch (--state).

    Examples:

      lmedit edit --method memit --requests facts.jsonl --out my-patch
      lmedit edit --model gemma3-270m --device cuda -r facts.jsonl -o gpatch
      lmedit edit --method alphaedit -r batch1.jsonl -o p1 --state seq
      lmedit edit --method alphaedit -r batch2.jsonl -o p2 --after p1 --state seq
    """
    import shutil

    from lmedit.checkpoints import train_dir_beside
    from lmedit.editors import apply_overrides, get_editor, make_config
    from lmedit.fileio import check_writable
    from lmedit.patches import Patch
    from lmedit.requests import load_requests

    check_writable(out, force)
    reqs = load_requests(requests, limit=limit, batch=True)  # edited together: checked as a batch
    editor = get_editor(method)
    check_model_for(editor, model)
    apply_overrides(editor.config_cls(), parse_sets(sets))  # a bad --set is refused before the model loads
    if state is not None and not editor.carries_state:
        raise InputError(f"--state is for the lifelong editors (alphaedit, ultraedit); {method} carries no state")
    earlier = [Patch.load(p) for p in after or []]  # read (and digest-checked) before the model loads
    lm = load_lm(model, device)
    config = make_config(method, lm.name, lm.model, parse_sets(sets))
    carried = _carried_state(state, method, lm, config, earlier) if state is not None else None
    for p in earlier:
        p.apply(lm.model)  # refuses a patch made on another model
    train_dir = train_dir_beside(out)  # resumed only by the same requests, settings and model
    patch = editor.edit(lm.model, lm.tokenizer, reqs, config, announce=console.print, state=carried,
                        checkpoint_dir=train_dir)
    patch.meta["model"] = lm.name
    patch.save(out, force=force)
    if carried is not None:
        carried.save(state)
        console.print(f"carried state ({carried.n_edits} edits so far) saved to {state}")
    shutil.rmtree(train_dir, ignore_errors=True)
    console.print(patch.summary())
    console.print(f"saved {method} patch for {len(reqs)} request(s) to {out}")


def _carried_state(directory: Path, method: str, lm, config, earlier):
    """The state in `directory` (made on this model before its first edit), or a fresh one; it must have been
    carried through exactly the edits of the patches applied first."""
    from lmedit.carried import STATE_FILE
    from lmedit.editors import load_state, new_state

    carried = new_state(method, lm.name, lm.model, config)
    if (directory / STATE_FILE).is_file():
        carried = load_state(directory, carried)
    before = sum(len(p.meta.get("requests", [])) for p in earlier)
    if carried.n_edits != before:
        raise InputError(f"the carried state in {directory} has seen {carried.n_edits} edit(s), the patches given "
                         f"with --after hold {before}; give the patches it was carried through, in order")
    return carried


def export(patch: Path = typer.Option(..., "--patch", "-p", help="patch directory"),
           out: Path = typer.Option(..., "--out", "-o", help="output: an HF model directory, or FILE.gguf"),
           model: str = ModelOpt, device: Optional[str] = DeviceOpt,
           gguf_type: str = typer.Option("f32", "--gguf-type", help="type of the edited tensors in a .gguf output: "
                                         "f32 (exact) or f16; the others keep the source's own quantisation"),
           force: bool = typer.Option(False, "--force", help="overwrite an existing output, and apply a delta "
                                      "over 1000 times its weight's norm, which no lmedit edit comes near")) -> None:
    """Apply a patch and write the edited model: as a Hugging Face directory, or (OUT ending in .gguf) as a GGUF
    file for llama.cpp-based tools, copied from the GGUF the model was loaded from with the edited tensors
    replaced, and checked by loading it back.

    Examples:

      lmedit export --patch my-patch --out edited-model
      lmedit export --patch my-patch --out edited.gguf
    """
    from lmedit.fileio import AtomicDirectory, check_writable
    from lmedit.models.gguf_export import GGUF_TYPES, export_gguf
    from lmedit.models.loading import gguf_source
    from lmedit.patches import Patch

    check_writable(out, force)
    to_gguf = out.suffix == ".gguf"
    if to_gguf and gguf_type not in GGUF_TYPES:
        raise InputError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    source = gguf_source(model) if to_gguf else None
    if to_gguf and source is None:
        raise InputError(f"GGUF export rewrites the GGUF file a model was loaded from, and {model} is not one: "
                         "export an HF directory and convert it with llama.cpp's convert_hf_to_gguf.py")
    p = Patch.load(patch)
    lm = load_lm(model, device)
    p.apply(lm.model, force=force)  # refuses a different base model, and (unless --force) an implausible size
    if to_gguf:
        info = export_gguf(lm.model, source, out, sorted(p.deltas), gguf_type)
        console.print(f"wrote {out} ({info['bytes'] / 2**20:.1f} MiB): {len(info['replaced'])} edited tensor(s) "
                      f"in {gguf_type}, the rest as in {source.name}; reloaded, max |Δ| {info['max_abs_diff']:.2g}")
        return
    with AtomicDirectory(out, force=force) as tmp:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
    console.print(f"wrote the edited model to {out}")
