"""`lmedit eval counterfact|zsre|merge` and `report`: edit then score, join shards, turn results into a page."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lmedit.cli.common import (METHODS_HELP, DeviceOpt, ForceOpt, ModelOpt, SetOpt, check_model_for, console, load_lm,
                               parse_sets)
from lmedit.errors import InputError


def metrics_table(result: dict) -> Table:
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
              generated: bool = True, fluency_seed: int = 0, skip_invalid: bool = False,
              curve_at: Optional[str] = None, curve_sample: Optional[int] = None,
              device: Optional[str] = None) -> None:
    from lmedit.editors import apply_overrides, get_editor
    from lmedit.evaluate.run import discard_journal, run_edit_eval
    from lmedit.fileio import atomic_write_json, check_writable
    from lmedit.requests import load_requests

    sizes = _batch_sizes(batch_size)
    at = _curve_counts(curve_at, sequential, curve_sample)
    if None not in sizes:
        sizes = sorted(sizes, reverse=True)  # largest first: its batched v* optimisation serves the smaller sizes
    outs = [out] if len(sizes) == 1 else [out.with_name(f"{out.stem}.b{b}{out.suffix or '.json'}") for b in sizes]
    journals = [o.with_name(o.name + ".journal.jsonl") for o in outs]
    for o, j in zip(outs, journals):
        check_writable(o, force or resume)
        if j.exists() and not (force or resume):
            raise InputError(f"{j} holds an unfinished run; pass --resume to continue it or --force to start over")
    check_model_for(get_editor(method), model)
    apply_overrides(get_editor(method).config_cls(), parse_sets(sets))  # bad --set: refused before any work
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
    lm = load_lm(model, device)
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
        result = run_edit_eval(lm, method, reqs, b, sequential, parse_sets(sets), task=task,
                               announce=console.print, journal=j, resume=resume, value_store=store,
                               baseline=baseline, keep_baseline_records=part is not None, curve_at=at,
                               curve_sample=curve_sample, **scoring)
        if part is not None:
            result["shard"] = part
        if skipped is not None:
            result["skipped_invalid"] = {"n": len(skipped), "records": [r.to_dict() for r in skipped]}
        atomic_write_json(o, result)
        discard_journal(j)
        console.print(metrics_table(result))
        t = result["timing"]
        console.print(f"edit {t['edit_seconds']:.1f}s ({t['seconds_per_edit']:.2f}s/edit), eval {t['eval_seconds']:.1f}s,"
                      f" peak RSS {t['peak_rss_mb']:.0f} MB, v* reused {t['values_reused']} → {o}")


def _curve_counts(text: Optional[str], sequential: bool, sample: Optional[int]) -> tuple[int, ...]:
    if text is None:
        if sample is not None:
            raise InputError("--curve-sample needs --curve-at")
        return ()
    if not sequential:
        raise InputError("--curve-at scores a sequence as it grows: it needs --sequential")
    try:
        counts = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise InputError(f"--curve-at must be a comma list of edit counts such as 100,1000, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise InputError(f"--curve-at counts must be at least 1, got {text!r}")
    if sample is not None and sample < 1:
        raise InputError(f"--curve-sample must be at least 1, got {sample}")
    return counts


DataOpt = typer.Option(..., "--data", help="data file")
OutOpt = typer.Option(..., "--out", "-o", help="result JSON file")
MethodOpt = typer.Option("memit", help=METHODS_HELP)
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
CurveOpt = typer.Option(None, "--curve-at", help="with --sequential: also score the edits made so far after "
                        "these numbers of edits, e.g. 100,1000,5000 (the forgetting curve in the result and report)")
CurveSampleOpt = typer.Option(None, "--curve-sample", help="score a seeded sample of at most N of the edits made so "
                              "far at each curve point (default: all of them)")
ShardOpt = typer.Option(None, "--shard", help="k/N: evaluate only the k-th of N contiguous runs of whole batches "
                        "(one machine each); `lmedit eval merge` joins the N result files")


def eval_counterfact(data: Path = DataOpt, out: Path = OutOpt, model: str = ModelOpt, device: Optional[str] = DeviceOpt,
                     method: str = MethodOpt,
                     limit: Optional[int] = LimitOpt, batch_size: Optional[str] = BatchOpt, sequential: bool = SeqOpt,
                     sets: Optional[list[str]] = SetOpt, force: bool = ForceOpt, resume: bool = ResumeOpt,
                     fluency: bool = typer.Option(False, "--fluency", help="also score fluency: ROME's (n-gram "
                                                  "entropy of top-5 samples, 100 tokens) and a greedy variant"),
                     fluency_seed: int = typer.Option(0, "--fluency-seed", help="seed of the fluency samples"),
                     generated: bool = GeneratedOpt,
                     reuse_values: bool = ReuseOpt, shard: Optional[str] = ShardOpt,
                     skip_invalid: bool = SkipInvalidOpt, curve_at: Optional[str] = CurveOpt,
                     curve_sample: Optional[int] = CurveSampleOpt) -> None:
    """Edit CounterFact records; score efficacy, generalisation, specificity, edit score (probability comparison:
    mean per-token log-probs as in ROME/MEMIT, and summed as *_summed) and generation-based checks.

    Example (each of the first 100 records edited alone):

      lmedit eval counterfact --method rome --data cf.json --limit 100 \\
        --batch-size 1 --out rome.json

    Example (a forgetting curve: ten batches of 100, one after another):

      lmedit eval counterfact --method alphaedit --data cf.json --limit 1000 \\
        --batch-size 100 --sequential --curve-at 100,300,500 --out alpha.json
    """
    _run_eval("counterfact", data, out, model, method, limit, batch_size, sequential, sets, force, resume, fluency,
              reuse_values, shard, generated, fluency_seed, skip_invalid, curve_at, curve_sample, device)


def eval_zsre(data: Path = DataOpt, out: Path = OutOpt, model: str = ModelOpt, device: Optional[str] = DeviceOpt,
              method: str = MethodOpt,
              limit: Optional[int] = LimitOpt, batch_size: Optional[str] = BatchOpt, sequential: bool = SeqOpt,
              sets: Optional[list[str]] = SetOpt, force: bool = ForceOpt, resume: bool = ResumeOpt,
              generated: bool = GeneratedOpt,
              reuse_values: bool = ReuseOpt, shard: Optional[str] = ShardOpt,
              skip_invalid: bool = SkipInvalidOpt, curve_at: Optional[str] = CurveOpt,
              curve_sample: Optional[int] = CurveSampleOpt) -> None:
    """Edit zsRE records (MEND format); score token-level top-1 accuracy, specificity (MEMIT's), locality
    (EasyEdit's) and generation-based checks.

    Example:

      lmedit eval zsre --method memit --data zsre-500.json --out memit-zsre.json
    """
    _run_eval("zsre", data, out, model, method, limit, batch_size, sequential, sets, force, resume,
              reuse_values=reuse_values, shard=shard, generated=generated, skip_invalid=skip_invalid,
              curve_at=curve_at, curve_sample=curve_sample, device=device)


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
    console.print(metrics_table(result))
    console.print(f"{result['n']} records from {len(shards)} shards → {out}")


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
