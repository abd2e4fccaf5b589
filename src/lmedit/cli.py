"""The `lmedit` command line (Typer). Errors are one line on stderr: exit 2 for bad input, 1 for failures."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from lmedit.errors import InputError, LmeditError
from lmedit.stats.sampling import Sample

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Edit facts in language models with small, reversible, measured weight changes.")
eval_app = typer.Typer(no_args_is_help=True, help="Edit then score on a benchmark.")
stats_app = typer.Typer(no_args_is_help=True, help="Key statistics C = E(k kᵀ): an explicit, cached artifact.")
app.add_typer(eval_app, name="eval")
app.add_typer(stats_app, name="stats")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)
_VERBOSE = {"on": False}

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m, an HF directory, or a .gguf file")
SetOpt = typer.Option(None, "--set", help="override a setting, e.g. --set layers=3,4 --set value.lr=0.2")
ForceOpt = typer.Option(False, "--force", help="overwrite an existing output")


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", help="show tracebacks on error")) -> None:
    _VERBOSE["on"] = verbose


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(spec: str):
    from lmedit.models import load_model
    from lmedit.models.loading import Placement

    _quiet_transformers()
    placement = Placement.from_env()  # LMEDIT_DTYPE=bfloat16, LMEDIT_DEVICE_MAP=auto for models too large for one device
    device = os.environ.get("LMEDIT_DEVICE")  # e.g. cuda, cuda:1 (every step follows the model's device)
    if device and placement.device_map:
        raise InputError("set LMEDIT_DEVICE or LMEDIT_DEVICE_MAP, not both")
    with console.status(f"loading {spec}"):
        lm = load_model(spec, placement=placement)
    if device:
        try:
            lm.model.to(device)
        except (RuntimeError, AssertionError) as e:
            raise InputError(f"LMEDIT_DEVICE={device!r}: {str(e).splitlines()[0]}") from None
    return lm


def _parse_sets(sets: Optional[list[str]]) -> dict:
    out = {}
    for item in sets or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise InputError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value
    return out


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--layers expects comma-separated integers, got {text!r}") from None


def _metrics_table(result: dict) -> Table:
    table = Table(title=f"{result['task']}: {result['method']} on {result['model']} "
                        f"(n={result['n']}, batch {result['batch_size']}{', sequential' if result['sequential'] else ''}"
                        + (f", {skip['n']} invalid record(s) left out" if (skip := result.get("skipped_invalid")) else "")
                        + ")")
    table.add_column("metric")
    table.add_column("edited", justify="right")
    table.add_column("unedited", justify="right")
    for key, value in result["metrics"].items():
        if isinstance(value, (int, float)) and key != "n":
            base = result["baseline"].get(key)
            table.add_row(key, f"{value:.4f}", f"{base:.4f}" if isinstance(base, (int, float)) else "-")
    return table


@app.command()
def demo(model: str = ModelOpt,
         method: str = typer.Option("rome", help="editing method"),
         out: Path = typer.Option(Path("out/demo-patch"), help="where the demo's patch is saved"),
         force: bool = ForceOpt) -> None:
    """Edit a few facts in the embedded model, show before/after, save the patch, revert.

    Example:

      lmedit demo
    """
    from lmedit.demo import run_demo

    _quiet_transformers()
    run_demo(_load(model), method, out, force, console)


@app.command()
def edit(requests: Path = typer.Option(..., "--requests", "-r", help="requests: JSONL, CounterFact, ROME or zsRE JSON"),
         out: Path = typer.Option(..., "--out", "-o", help="output patch directory"),
         model: str = ModelOpt,
         method: str = typer.Option("memit", help="rome | memit | emmet | ft | ft-conditional | lora"),
         limit: Optional[int] = typer.Option(None, help="only the first N requests"),
         sets: Optional[list[str]] = SetOpt,
         force: bool = ForceOpt) -> None:
    """Compute an edit and save it as a patch (the model files are not changed). A fine-tuning edit keeps its
    state after every epoch in OUT.train/; the same command run again after an interruption resumes from it.

    Example:

      lmedit edit --method memit --requests facts.jsonl --out my-patch
    """
    import shutil

    from lmedit.checkpoints import train_dir_beside
    from lmedit.editors import apply_overrides, get_editor, make_config
    from lmedit.editors.finetune import checkpoint_training
    from lmedit.fileio import check_writable
    from lmedit.requests import load_requests

    check_writable(out, force)
    reqs = load_requests(requests, limit=limit, batch=True)  # edited together: checked as a batch
    editor = get_editor(method)
    apply_overrides(editor.config_cls(), _parse_sets(sets))  # a bad --set is refused before the model loads
    lm = _load(model)
    config = make_config(method, lm.name, lm.model, _parse_sets(sets))
    train_dir = train_dir_beside(out)  # resumed only by the same requests, settings and model
    with checkpoint_training(train_dir):
        patch = editor.fn(lm.model, lm.tokenizer, reqs, config, announce=console.print)
    patch.meta["model"] = lm.name
    patch.save(out, force=force)
    shutil.rmtree(train_dir, ignore_errors=True)
    console.print(patch.summary())
    console.print(f"saved {method} patch for {len(reqs)} request(s) to {out}")


def _batch_sizes(text: Optional[str]) -> list[Optional[int]]:
    if text is None:
        return [None]
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--batch-size expects an integer or a comma-separated list, got {text!r}") from None
    if not sizes or any(b < 1 for b in sizes):
        raise InputError(f"--batch-size must be at least 1, got {text!r}")
    return sizes


def _run_eval(task: str, data: Path, out: Path, model: str, method: str, limit: Optional[int],
              batch_size: Optional[str], sequential: bool, sets: Optional[list[str]], force: bool,
              resume: bool, fluency: bool = False, reuse_values: bool = True, shard: Optional[str] = None,
              generated: bool = True, fluency_seed: int = 0, skip_invalid: bool = False) -> None:
    from lmedit.editors import apply_overrides, get_editor
    from lmedit.evaluate.run import discard_journal, run_edit_eval
    from lmedit.fileio import atomic_write_json, check_writable
    from lmedit.requests import load_requests

    sizes = _batch_sizes(batch_size)
    if None not in sizes:
        sizes = sorted(sizes, reverse=True)  # largest first: its batched v* optimisation serves the smaller sizes
    outs = [out] if len(sizes) == 1 else [out.with_name(f"{out.stem}.b{b}{out.suffix or '.json'}") for b in sizes]
    journals = [o.with_name(o.name + ".journal.jsonl") for o in outs]
    for o, j in zip(outs, journals):
        check_writable(o, force or resume)
        if j.exists() and not (force or resume):
            raise InputError(f"{j} holds an unfinished run; pass --resume to continue it or --force to start over")
    apply_overrides(get_editor(method).config_cls(), _parse_sets(sets))  # bad --set: refused before any work
    accept = ("zsre",) if task == "zsre" else ("counterfact", "rome", "jsonl")
    skipped = [] if skip_invalid else None
    reqs = load_requests(data, limit=limit, accept=accept, skipped=skipped)
    if skipped:
        console.print(f"left out {len(skipped)} invalid record(s) (--skip-invalid), e.g. {skipped[0].where}: "
                      f"{skipped[0].reason}; all are listed in the result", markup=False, highlight=False)
    for b in sizes:
        if b is not None and b > len(reqs):
            raise InputError(f"--batch-size {b} exceeds the {len(reqs)} records")
    part = None
    if shard is not None:
        from lmedit.evaluate.shards import data_digest, parse_shard, shard_range

        k, n_shards = parse_shard(shard)
        if sequential:
            raise InputError("a sequential run cannot be sharded: each batch edits the model the next one starts from")
        if len(sizes) != 1:
            raise InputError("--shard takes one --batch-size (shard each size of a sweep as its own run)")
        start, end = shard_range(len(reqs), sizes[0] or len(reqs), k, n_shards)
        part = {"index": k, "of": n_shards, "start": start, "end": end, "n_total": len(reqs),
                "data": data_digest(reqs)}
        reqs = reqs[start:end]
    lm = _load(model)
    from lmedit.locate.value_store import ValueStore
    from lmedit.models.loading import cache_dir

    store = ValueStore(lm.model, cache_dir() / "values") if reuse_values else None
    baseline: dict = {}
    for b, o, j in zip(sizes, outs, journals):
        if task == "zsre":
            from lmedit.evaluate import zsre

            scoring = dict(scorer=zsre.ZsreScorer(generated=generated), aggregator=zsre.aggregate)
        else:
            import functools

            from lmedit.evaluate.counterfact import score_counterfact

            scoring = dict(scorer=functools.partial(score_counterfact, fluency=fluency, generated=generated,
                                                    fluency_seed=fluency_seed))
        result = run_edit_eval(lm, method, reqs, b, sequential, _parse_sets(sets), task=task,
                               announce=console.print, journal=j, resume=resume, value_store=store,
                               baseline=baseline, keep_baseline_records=part is not None, **scoring)
        if part is not None:
            result["shard"] = part
        if skipped is not None:
            result["skipped_invalid"] = {"n": len(skipped), "records": [r.to_dict() for r in skipped]}
        atomic_write_json(o, result)
        discard_journal(j)
        console.print(_metrics_table(result))
        t = result["timing"]
        console.print(f"edit {t['edit_seconds']:.1f}s ({t['seconds_per_edit']:.2f}s/edit), eval {t['eval_seconds']:.1f}s,"
                      f" peak RSS {t['peak_rss_mb']:.0f} MB, v* reused {t['values_reused']} → {o}")


DataOpt = typer.Option(..., "--data", help="data file")
OutOpt = typer.Option(..., "--out", "-o", help="result JSON file")
MethodOpt = typer.Option("memit", help="rome | memit | emmet | ft | ft-conditional | lora")
LimitOpt = typer.Option(None, help="only the first N records")
BatchOpt = typer.Option(None, "--batch-size", help="edits per batch (default: all at once; 1 = each edit alone); "
                        "a list such as 1,10,100 runs a scaling sweep, one result file per size")
ResumeOpt = typer.Option(False, "--resume", help="continue an interrupted run from its journal")
SeqOpt = typer.Option(False, help="each batch on top of the previous ones, all scored at the end")
ReuseOpt = typer.Option(True, "--reuse-values/--no-reuse-values",
                        help="reuse v* already computed for the same request, layer and settings on this model "
                        "(cached under the lmedit cache); the edits themselves are recomputed")
GeneratedOpt = typer.Option(True, "--generated/--no-generated",
                            help="also score whether the greedy continuation begins with the answer (*_generated; "
                            "a few tokens per prompt)")
SkipInvalidOpt = typer.Option(False, "--skip-invalid", help="leave out records that are not valid requests (e.g. "
                              "an empty new answer) instead of refusing the file; each is listed in the result")
ShardOpt = typer.Option(None, "--shard", help="k/N: evaluate only the k-th of N contiguous runs of whole batches "
                        "(one machine each); `lmedit eval merge` joins the N result files")


@eval_app.command("counterfact")
def eval_counterfact(data: Path = DataOpt, out: Path = OutOpt, model: str = ModelOpt, method: str = MethodOpt,
                     limit: Optional[int] = LimitOpt, batch_size: Optional[str] = BatchOpt, sequential: bool = SeqOpt,
                     sets: Optional[list[str]] = SetOpt, force: bool = ForceOpt, resume: bool = ResumeOpt,
                     fluency: bool = typer.Option(False, "--fluency", help="also score fluency: ROME's (n-gram "
                                                  "entropy of top-5 samples, 100 tokens) and a greedy variant"),
                     fluency_seed: int = typer.Option(0, "--fluency-seed", help="seed of the fluency samples"),
                     generated: bool = GeneratedOpt,
                     reuse_values: bool = ReuseOpt, shard: Optional[str] = ShardOpt,
                     skip_invalid: bool = SkipInvalidOpt) -> None:
    """Edit CounterFact records; score efficacy, generalisation, specificity, edit score (probability comparison:
    mean per-token log-probs as in ROME/MEMIT, and summed as *_summed) and generation-based checks.

    Example (each of the first 100 records edited alone):

      lmedit eval counterfact --method rome --data cf.json --limit 100 \\
        --batch-size 1 --out rome.json
    """
    _run_eval("counterfact", data, out, model, method, limit, batch_size, sequential, sets, force, resume, fluency,
              reuse_values, shard, generated, fluency_seed, skip_invalid)


@eval_app.command("zsre")
def eval_zsre(data: Path = DataOpt, out: Path = OutOpt, model: str = ModelOpt, method: str = MethodOpt,
              limit: Optional[int] = LimitOpt, batch_size: Optional[str] = BatchOpt, sequential: bool = SeqOpt,
              sets: Optional[list[str]] = SetOpt, force: bool = ForceOpt, resume: bool = ResumeOpt,
              generated: bool = GeneratedOpt,
              reuse_values: bool = ReuseOpt, shard: Optional[str] = ShardOpt,
              skip_invalid: bool = SkipInvalidOpt) -> None:
    """Edit zsRE records (MEND format); score token-level top-1 accuracy, specificity (MEMIT's), locality
    (EasyEdit's) and generation-based checks.

    Example:

      lmedit eval zsre --method memit --data zsre-500.json --out memit-zsre.json
    """
    _run_eval("zsre", data, out, model, method, limit, batch_size, sequential, sets, force, resume,
              reuse_values=reuse_values, shard=shard, generated=generated, skip_invalid=skip_invalid)


@eval_app.command("merge")
def eval_merge(shards: list[Path] = typer.Argument(..., help="the N shard result files of one run"),
               out: Path = OutOpt, force: bool = ForceOpt) -> None:
    """Join the result files of `lmedit eval ... --shard k/N` into the result of the whole run.

    Example:

      lmedit eval merge memit.1.json memit.2.json --out memit.json
    """
    from lmedit.evaluate.shards import merge_shards
    from lmedit.fileio import atomic_write_json, check_writable, read_json

    check_writable(out, force)
    result = merge_shards([read_json(p) for p in shards], [str(p) for p in shards])
    atomic_write_json(out, result)
    console.print(_metrics_table(result))
    console.print(f"{result['n']} records from {len(shards)} shards → {out}")


_SAMPLE = Sample()  # the statistics sample editors use unless told otherwise
CorpusOpt = typer.Option("wiki", help="the statistics corpus: 'wiki' (offline default), a text/JSONL file, or hf:NAME")
UnitOpt = typer.Option(_SAMPLE.unit, "--unit", help="what --n counts: documents or tokens (settings stats_unit)")
NOpt = typer.Option(str(_SAMPLE.n), "--n", help="how many documents/tokens, or 'all' (the whole corpus; stats_n)")
MaxLenOpt = typer.Option(_SAMPLE.max_length, "--max-length",
                         help="tokens kept per document, at most the model's context (stats_max_length)")
SeedOpt = typer.Option(_SAMPLE.seed, "--seed", help="the shuffle the documents are drawn in (stats_seed)")
TokensOpt = typer.Option(None, "--tokens", help="old spelling of --unit tokens --n N")


def _sample(unit: str, n: str, max_length: int, seed: int, tokens: Optional[int]):
    """The sample the options name, checked (one line listing the valid units on a bad --unit)."""
    if tokens is not None:
        unit, n = "tokens", str(tokens)
    return Sample.parse(unit, n, max_length, seed)


@stats_app.command("compute")
def stats_compute(model: str = ModelOpt,
                  layers: str = typer.Option(..., help="comma-separated layers, e.g. 2,3,4"),
                  corpus: str = CorpusOpt, unit: str = UnitOpt, n: str = NOpt, max_length: int = MaxLenOpt,
                  seed: int = SeedOpt, tokens: Optional[int] = TokensOpt) -> None:
    """Compute and cache C = E(k kᵀ) at the input of the MLP output projections (one pass for all layers).
    Documents are drawn in a seeded random order and cut to --max-length tokens; --n counts documents or tokens.
    Under torchrun the ranks share the pass (each runs every world-th batch; the sums are all-reduced).

    Examples (the last: four processes under torchrun):

      lmedit stats compute --layers 2,3,4,5,6 --unit tokens --n 100000
      lmedit stats compute --layers 6 --unit documents --n all
      torchrun --nproc-per-node 4 -m lmedit.cli \\
        stats compute --layers 2,3,4,5,6 --n 10000000
    """
    from lmedit.stats.moments import join_process_group, load_or_compute, stats_path

    sample = _sample(unit, n, max_length, seed, tokens)
    device = join_process_group()
    lm = _load(model)
    if device is not None:
        lm.model.to(device)
    wanted = _parse_layers(layers)
    moments = load_or_compute(lm.model, lm.tokenizer, wanted, corpus, sample, announce=console.print)
    console.print(f"C over {moments.description}")
    for l in wanted:
        console.print(f"layer {l}: {stats_path(lm.model, l, moments.corpus_id, moments.sample)}")


@stats_app.command("inspect")
def stats_inspect(model: str = ModelOpt,
                  layer: int = typer.Option(..., help="layer"),
                  corpus: str = CorpusOpt, unit: str = UnitOpt, n: str = NOpt, max_length: int = MaxLenOpt,
                  seed: int = SeedOpt, tokens: Optional[int] = TokensOpt) -> None:
    """Show a cached C: where it is, its size, trace and conditioning (never computes).

    Example:

      lmedit stats inspect --layer 4 --unit documents --n all
    """
    import torch

    from lmedit.models.arch import check_layer
    from lmedit.stats.corpora import get_corpus
    from lmedit.stats.moments import as_sample, cached_stats, stats_path, whole_if_larger

    wanted = _sample(unit, n, max_length, seed, tokens)
    lm = _load(model)
    check_layer(lm.model, layer)
    source = get_corpus(corpus)
    wanted = whole_if_larger(as_sample(wanted, lm.model), source)
    path = stats_path(lm.model, layer, source.id, wanted)
    cached = cached_stats(lm.model, layer, source.id, wanted)  # a damaged entry: moved aside, one warning line
    if cached is None:
        raise InputError(f"no statistics for layer {layer} ({source.id}, {wanted.describe()}); "
                         "run `lmedit stats compute`")
    C, meta = cached
    eig = torch.linalg.eigvalsh(C)
    table = Table(title=f"C at layer {layer}")
    table.add_column("field")
    table.add_column("value")
    for k, v in {**meta, "path": str(path), "shape": str(tuple(C.shape)), "dtype": str(C.dtype),
                 "trace": f"{C.trace().item():.4g}", "eigenvalue min/max": f"{eig[0].item():.3g} / {eig[-1].item():.3g}",
                 "condition number": f"{(eig[-1] / eig[0].clamp(min=1e-30)).item():.3g}"}.items():
        table.add_row(k, v)
    console.print(table)


@app.command()
def export(patch: Path = typer.Option(..., "--patch", "-p", help="patch directory"),
           out: Path = typer.Option(..., "--out", "-o", help="output: an HF model directory, or FILE.gguf"),
           model: str = ModelOpt,
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
    lm = _load(model)
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


@app.command()
def report(results: list[Path] = typer.Argument(..., help="result JSON files from `lmedit eval`"),
           out: Path = typer.Option(Path("report"), "--out", "-o", help="output directory"),
           headline: str = typer.Option("reference", "--headline",
                                        help="which convention leads the tables and plots: reference (ROME/MEMIT "
                                             "code: mean per-token CounterFact, MEMIT's zsRE specificity) or "
                                             "whole-target (summed CounterFact, zsRE locality)"),
           force: bool = ForceOpt) -> None:
    """Turn result files into one markdown page with tables and PNG plots.

    Example:

      lmedit report rome.json memit.json emmet.json --out report
    """
    from lmedit.evaluate.report import build_report, check_headline
    from lmedit.fileio import check_writable

    check_headline(headline)  # before anything is read or written

    if (out / "report.md").exists():
        check_writable(out / "report.md", force)
    console.print(f"wrote {build_report(results, out, headline)}")


from lmedit.cli_canonical import register_canonical  # noqa: E402  (registers `eval canonical`)
register_canonical(eval_app)
from lmedit.cli_trace import register_trace  # noqa: E402  (registers `trace`)
register_trace(app)
from lmedit.cli_bench import register_bench  # noqa: E402  (registers `bench`)
register_bench(app)
from lmedit.cli_backpack import register_backpack  # noqa: E402  (registers `backpack train`)
register_backpack(app)


def _show_warnings() -> None:
    """lmedit's warnings as one line each on stderr; other libraries' warnings as Python shows them."""
    import warnings

    from lmedit.errors import LmeditWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LmeditWarning):
            err_console.print(f"lmedit: warning: {message}", markup=False, highlight=False)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", LmeditWarning)


def _usage_line(e: Exception) -> str:
    """A usage error (missing or unknown option, bad value) as one line that points at the command's help."""
    message = e.format_message() if hasattr(e, "format_message") else str(e)
    ctx = getattr(e, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return " ".join(message.split()) + where


def main() -> None:
    import click

    _show_warnings()
    try:
        code = app(standalone_mode=False)  # Typer turns Ctrl-C into a returned 130, not an exception
        if isinstance(code, int) and code != 0:
            err_console.print("lmedit: interrupted" if code == 130 else f"lmedit: exit code {code}")
            sys.exit(code)
    except LmeditError as e:
        if _VERBOSE["on"]:
            traceback.print_exc()
        err_console.print(f"lmedit: error: {e}", markup=False, highlight=False)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, typer.Abort):
        err_console.print("lmedit: aborted")
        sys.exit(130)
    except (click.exceptions.ClickException, typer.TyperException) as e:  # Typer ≥ 0.2x vendors its own click
        err_console.print(f"lmedit: error: {_usage_line(e)}", markup=False, highlight=False)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        err_console.print("lmedit: interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - an unexpected failure still gets one line unless --verbose
        if _VERBOSE["on"] or os.environ.get("LMEDIT_DEBUG"):
            raise
        err_console.print(f"lmedit: failed: {type(e).__name__}: {e} (rerun as `lmedit --verbose ...` for details)",
                          markup=False, highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
