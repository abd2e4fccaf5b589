"""Speed and memory of the editing core on one model: `lmedit bench` and `make bench` (benchmarks/run.py).

Every part compares two ways of doing the same work in one run, so its ratio survives a noisy machine:
- scoring: batched CounterFact scoring vs one prompt at a time (and that both give the same metrics);
- stats: the statistics pass vs a plain forward over the same tokens;
- values: batched v* vs one request at a time, with and without replaying the layers below the edit layer,
  and vs the reference implementations' way (every full prompt at every step);
- editors: seconds per edit of ROME, MEMIT and EMMET (statistics excluded);
- ft_vs_memit: wall time of one mass edit, FT-conditional + augmentation vs MEMIT;
- lifelong: seconds per edit of the training-free UltraEdit vs MEMIT, the same 100 requests in one batch each.
Results go to OUT/locate.json and OUT/locate.md after every part (an interrupted run keeps what it measured).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

PARTS = ("scoring", "stats", "values", "editors", "ft_vs_memit", "lifelong")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_editors(lm, requests, sizes):
    from lmedit.editors import get_editor, make_config

    rows = {}
    rome = get_editor("rome")
    cfg = make_config("rome", lm.name, lm.model)
    n_single = 5
    total = 0.0
    for r in requests[:n_single]:
        patch, dt = timed(lambda: rome.fn(lm.model, lm.tokenizer, [r], cfg, progress=False, announce=lambda *_: None))
        total += dt - patch.meta["timing"]["stats_seconds"]
    rows["rome_single_s_per_edit"] = total / n_single
    for method in ("memit", "emmet"):
        editor = get_editor(method)
        cfg = make_config(method, lm.name, lm.model)
        for size in sizes:
            patch, dt = timed(lambda: editor.fn(lm.model, lm.tokenizer, requests[:size], cfg, progress=False,
                                                announce=lambda *_: None))
            rows[f"{method}_batch{size}_s_per_edit"] = (dt - patch.meta["timing"]["stats_seconds"]) / size
    return rows


def bench_batched_values(lm, requests, n, reference_n):
    """Batched v* for n requests vs the sum of n one-request optimisations (same code path, same config), and
    with vs without replaying the layers below the edit layer."""
    from lmedit.editors import make_config
    from lmedit.locate.context import context_templates
    from lmedit.locate.values import compute_values

    cfg = make_config("memit", lm.name, lm.model)
    templates = context_templates(lm.model, lm.tokenizer, cfg.n_context, cfg.context_length, cfg.seed)
    layer = cfg.layers[-1]
    batched, t_batched = timed(lambda: compute_values(lm.model, lm.tokenizer, requests[:n], layer, templates,
                                                      cfg.value, progress=False))
    no_replay, t_no_replay = timed(lambda: compute_values(lm.model, lm.tokenizer, requests[:n], layer, templates,
                                                          cfg.value, progress=False, replay_layers=False))
    t_single = 0.0
    singles = []
    for r in requests[:n]:
        v, dt = timed(lambda: compute_values(lm.model, lm.tokenizer, [r], layer, templates, cfg.value, progress=False))
        t_single += dt
        singles.append(v.delta)
    max_diff = (torch.cat(singles) - batched.delta).abs().max().item()
    # the reference implementations' way: one request at a time, every full prompt at every step
    # (slow: measured on the first `reference_n` requests and compared per request)
    t_reference = 0.0
    for r in requests[:reference_n]:
        _, dt = timed(lambda: compute_values(lm.model, lm.tokenizer, [r], layer, templates, cfg.value, progress=False,
                                             cache_prefix=False))
        t_reference += dt
    return {"values_n": n, "values_batched_s": t_batched, "values_one_by_one_s": t_single,
            "values_batched_without_layer_replay_s": t_no_replay,
            "values_layer_replay_over_none": t_batched / t_no_replay,
            "values_max_abs_diff_replay_vs_none": (no_replay.delta - batched.delta).abs().max().item(),
            "values_batched_over_one_by_one": t_batched / t_single,
            "values_reference_n": reference_n, "values_one_by_one_reference_style_s": t_reference,
            "values_batched_over_reference_style_per_request": (t_batched / n) / (t_reference / reference_n),
            "values_max_abs_diff_batched_vs_single": max_diff}


def bench_stats(lm, n_tokens):
    """Statistics pass vs a plain forward over the same tokens, stopped after the same layer."""
    from lmedit.editors import make_config
    from lmedit.models.forward import right_pad
    from lmedit.models.arch import mlp_out_module
    from lmedit.models.hooks import capture_io, run_until_stop
    from lmedit.stats.corpora import wiki_corpus
    from lmedit.stats.moments import as_sample, batch_token_ids, compute_second_moments, plan_batches

    layers = list(make_config("memit", lm.name, lm.model).layers)
    corpus = wiki_corpus()
    sample = as_sample(n_tokens, lm.model)  # n tokens, drawn and batched as the statistics pass does
    _, t_stats = timed(lambda: compute_second_moments(lm.model, lm.tokenizer, layers, corpus, n_tokens, progress=False))
    # the plain forward: same batches, same stop point, no accumulation
    stop = {str(layers[-1]): mlp_out_module(lm.model, layers[-1])}
    pad = lm.tokenizer.pad_token_id

    def plain():
        with torch.no_grad():
            for batch in plan_batches(lm.tokenizer, corpus, sample):
                ids, mask = right_pad(batch_token_ids(lm.tokenizer, corpus, batch, sample.max_length), pad)
                with capture_io(stop, inputs=False, stop_after=str(layers[-1])):
                    run_until_stop(lambda: lm.model(input_ids=ids, attention_mask=mask))

    _, t_plain = timed(plain)
    return {"stats_tokens": n_tokens, "stats_layers": layers, "stats_s": t_stats, "plain_forward_s": t_plain,
            "stats_throughput_over_plain_forward": t_plain / t_stats}


def bench_scoring(lm, records):
    """Batched CounterFact scoring vs one prompt at a time, same records, same run; metrics must agree to 1e-5."""
    from lmedit.evaluate.counterfact import aggregate, score_counterfact

    n = len(records)
    batched, t_batched = timed(lambda: score_counterfact(lm.model, lm.tokenizer, records, batch_size=64, generated=False))
    single, t_single = timed(lambda: score_counterfact(lm.model, lm.tokenizer, records, batch_size=1, generated=False))
    a, b = aggregate(batched), aggregate(single)
    keys = [k for k, v in a.items() if isinstance(v, float)]
    max_metric_diff = max(abs(a[k] - b[k]) for k in keys)
    max_logp_diff = max(abs(x["prompt"]["logp_new"] - y["prompt"]["logp_new"]) for x, y in zip(batched, single))
    return {"scoring_records": n, "scoring_batched_records_per_s": n / t_batched,
            "scoring_one_at_a_time_records_per_s": n / t_single, "scoring_speedup": t_single / t_batched,
            "scoring_max_metric_diff": max_metric_diff, "scoring_max_logp_diff": max_logp_diff}


def bench_ft_vs_memit(lm, requests, facts_file):
    """Wall time of one mass edit of the same requests: FT-conditional with augmentation (m = r = 2, facts from
    `facts_file`) vs MEMIT.
    No v* is reused (no ValueStore is active), and C is loaded before the clock starts."""
    from lmedit.editors import get_editor, make_config

    n = len(requests)
    rows = {"mass_n": n}
    for label, method, overrides in (("memit", "memit", {}),
                                     ("ft_conditional_aug", "ft-conditional",
                                      {"n_paraphrases": "2", "n_random_facts": "2", "facts_file": str(facts_file)})):
        cfg = make_config(method, lm.name, lm.model, overrides)
        patch, dt = timed(lambda: get_editor(method).fn(lm.model, lm.tokenizer, requests, cfg, progress=True,
                                                        announce=lambda *_: None))
        rows[f"mass{n}_{label}_s"] = dt - patch.meta.get("timing", {}).get("stats_seconds", 0.0)
    rows[f"mass{n}_ft_conditional_aug_over_memit"] = rows[f"mass{n}_ft_conditional_aug_s"] / rows[f"mass{n}_memit_s"]
    return rows


def bench_lifelong(lm, requests):
    """Seconds per edit of UltraEdit (one forward/backward, no v*, no C) vs MEMIT on the same requests, one batch
    each, C loaded before the clock starts. Neither reuses v* (no ValueStore is active)."""
    from lmedit.editors import get_editor, make_config

    n, rows = len(requests), {"lifelong_n": len(requests)}
    for method in ("memit", "ultraedit"):
        cfg = make_config(method, lm.name, lm.model)
        patch, dt = timed(lambda: get_editor(method).fn(lm.model, lm.tokenizer, requests, cfg, progress=False,
                                                        announce=lambda *_: None))
        rows[f"lifelong_{method}_s_per_edit"] = (dt - patch.meta["timing"]["stats_seconds"]) / n
    rows["lifelong_memit_over_ultraedit"] = rows["lifelong_memit_s_per_edit"] / rows["lifelong_ultraedit_s_per_edit"]
    return rows


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_parts(parts, facts_file) -> None:
    """Known parts only, and ft_vs_memit with its fact pool (checked before any model is loaded)."""
    from lmedit.errors import InputError

    if not parts or set(parts) - set(PARTS):
        raise InputError(f"--parts must be a comma list of {', '.join(PARTS)}, got {','.join(parts)!r}")
    if "ft_vs_memit" in parts and facts_file is None:
        raise InputError("the ft_vs_memit part needs a facts file (--facts FILE: the random facts of "
                         "FT-conditional + augmentation)")


def run_bench(lm, requests, out: Path, parts=PARTS, *, facts_file: Path | None = None, sizes=(10, 100),
              values_n: int = 100, reference_n: int = 20, stats_tokens: int = 20_000, scoring_n: int = 200,
              mass_n: int = 1000, keep_previous: bool = False) -> dict:
    """Run the chosen parts on `requests` (CounterFact records); returns and writes the results."""
    from lmedit.editors import make_config
    from lmedit.errors import InputError
    from lmedit.stats.moments import load_or_compute

    check_parts(parts, facts_file)
    needs = {"scoring": [scoring_n], "values": [values_n, reference_n], "editors": list(sizes), "ft_vs_memit": [mass_n],
             "lifelong": [100]}
    need = max((n for part in parts for n in needs[part]), default=1)
    if need > len(requests):
        raise InputError(f"the chosen parts need {need} records, the data has {len(requests)}")
    for method in ("rome", "memit", "emmet") if {"editors", "ft_vs_memit", "lifelong"} & set(parts) else ():
        cfg = make_config(method, lm.name, lm.model)  # statistics are not part of the edit timings
        load_or_compute(lm.model, lm.tokenizer, list(cfg.layers), cfg.stats_corpus, cfg)
    result = {"model": lm.name, "torch_threads": torch.get_num_threads()}
    if keep_previous and (out / "locate.json").is_file():  # re-measuring some parts: keep the others' numbers
        # (each ratio is measured within one part, in one run)
        result = {**json.loads((out / "locate.json").read_text()), **result}
    table = {"scoring": lambda: bench_scoring(lm, requests[:scoring_n]),
             "stats": lambda: bench_stats(lm, stats_tokens),
             "values": lambda: bench_batched_values(lm, requests, values_n, reference_n),
             "editors": lambda: bench_editors(lm, requests, list(sizes)),
             "ft_vs_memit": lambda: bench_ft_vs_memit(lm, requests[:mass_n], facts_file),
             "lifelong": lambda: bench_lifelong(lm, requests[:100])}
    for name in PARTS:
        if name not in parts:
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        result.update(table[name]())
        write_results(result, out)  # partial results survive an interruption
    write_results(result, out)
    return result


def write_results(result: dict, out: Path) -> None:
    from lmedit.fileio import atomic_write_bytes, atomic_write_json

    result["peak_rss_mb"] = peak_rss_mb()
    atomic_write_json(out / "locate.json", result)
    lines = ["| measurement | value |", "|---|---|"]
    for k, v in result.items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    atomic_write_bytes(out / "locate.md", ("\n".join(lines) + "\n").encode())
