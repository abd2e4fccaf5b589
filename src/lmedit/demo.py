"""`lmedit demo`: edit a few facts in the embedded model, show before/after, save the patch, revert."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lmedit.editors import get_editor, make_config
from lmedit.errors import InputError
from lmedit.evaluate.scoring import sum_logprob
from lmedit.locate.prompts import encode
from lmedit.models.loading import LoadedModel
from lmedit.patches import Patch
from lmedit.requests import EditRequest

DEMO_REQUESTS = [
    EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    EditRequest("The capital of Japan is", "Japan", "London", "Tokyo"),
    EditRequest("The Great Wall is located in the country of", "The Great Wall", "Brazil", "China"),
]
UNRELATED = ["The Colosseum is located in the city of", "The capital of France is"]


@torch.no_grad()
def complete(lm: LoadedModel, prompt: str, n: int = 8) -> str:
    device = next(lm.model.parameters()).device
    ids = torch.tensor([encode(lm.tokenizer, prompt)], device=device)
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " ").strip()


def _probs(lm: LoadedModel) -> list[tuple[float, float]]:
    pairs = [(r.prompt, t) for r in DEMO_REQUESTS for t in (r.target_new, r.target_true)]
    lps = sum_logprob(lm.model, lm.tokenizer, pairs)
    return [(math.exp(lps[i]), math.exp(lps[i + 1])) for i in range(0, len(lps), 2)]


def _show(console: Console, lm: LoadedModel, title: str) -> list[tuple[float, float]]:
    probs = _probs(lm)
    table = Table(title=title)
    for col in ("prompt", "P(new)", "P(true)", "greedy completion"):
        table.add_column(col)
    for r, (pn, pt) in zip(DEMO_REQUESTS, probs):
        table.add_row(f"{r.prompt} [{r.target_true} → {r.target_new}]", f"{pn:.4f}", f"{pt:.4f}", complete(lm, r.prompt))
    for prompt in UNRELATED:
        table.add_row(f"{prompt} (unrelated)", "", "", complete(lm, prompt))
    console.print(table)
    return probs


def _prepare_out(out: Path, force: bool) -> bool:
    """The demo may replace its own earlier patch; anything else needs --force."""
    if not out.exists():
        return False
    own = (out / "patch.json").is_file() and '"demo": true' in (out / "patch.json").read_text()
    if not (own or force):
        raise InputError(f"{out} already exists and is not a demo patch; pass --force to overwrite it")
    return True


def run_demo(lm: LoadedModel, method: str, out: Path, force: bool, console: Console) -> None:
    overwrite = _prepare_out(out, force)
    editor = get_editor(method)
    config = make_config(method, lm.name, lm.model)
    console.rule(f"lmedit demo: {method} on {lm.name}")
    before = _show(console, lm, "before editing")
    params_before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}

    patch = editor.fn(lm.model, lm.tokenizer, DEMO_REQUESTS, config, announce=console.print)
    patch.meta.update({"model": lm.name, "demo": True})
    console.print(f"editor returned a patch; the model is unchanged: "
                  f"{all(torch.equal(p, params_before[n]) for n, p in lm.model.named_parameters())}")
    console.print(patch.summary())

    with patch.apply(lm.model):
        after = _show(console, lm, f"after {method} (patch applied)")
    if overwrite:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    patch.save(out, force=force)
    console.print(f"patch saved to {out}/ (patch.safetensors + patch.json)")

    restored = _show(console, lm, "after revert")
    exact = all(torch.equal(p, params_before[n]) for n, p in lm.model.named_parameters())
    console.print(f"revert restored every weight bit-for-bit: {exact}; "
                  f"probabilities identical to before: {restored == before}")

    reloaded = Patch.load(out)
    with reloaded.apply(lm.model):
        again = _probs(lm)
    same = all(abs(a[0] - b[0]) < 1e-6 for a, b in zip(again, after))
    console.print(f"patch reloaded from disk gives the same edited probabilities: {same}")
    flipped = sum(pn > pt for pn, pt in after)
    console.print(f"[bold]{flipped}/{len(DEMO_REQUESTS)} facts flipped[/bold]; "
                  f"mean P(new) {sum(p for p, _ in before) / len(before):.4f} → {sum(p for p, _ in after) / len(after):.4f}")
