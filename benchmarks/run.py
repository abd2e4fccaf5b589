"""`make bench`: speed and memory of the locate-then-edit core on the embedded model.

Writes benchmarks/results/locate.json and locate.md. Timings are reported as ratios measured in one run
(this machine is noisy); run alone, never beside another torch process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"
TRAIN = DATA.with_name("counterfact-train.json")  # the random facts of FT-conditional + augmentation
OUT = ROOT / "benchmarks" / "results"


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
    from lmedit.locate.batching import right_pad
    from lmedit.models.arch import mlp_out_module
    from lmedit.models.hooks import capture_io, run_until_stop
    from lmedit.stats.corpora import wiki_corpus
    from lmedit.stats.moments import _batches, compute_second_moments

    layers = list(make_config("memit", lm.name, lm.model).layers)
    corpus = wiki_corpus()
    _, t_stats = timed(lambda: compute_second_moments(lm.model, lm.tokenizer, layers, corpus, n_tokens, progress=False))
    # the plain forward: same batches, same stop point, no accumulation
    stop = {str(layers[-1]): mlp_out_module(lm.model, layers[-1])}
    pad = lm.tokenizer.pad_token_id

    def plain():
        seen = 0
        with torch.no_grad():
            for _, batch in _batches(lm.tokenizer, corpus, 0, 256, 16):
                if seen >= n_tokens:
                    break
                ids, mask = right_pad(batch, pad)
                with capture_io(stop, inputs=False, stop_after=str(layers[-1])):
                    run_until_stop(lambda: lm.model(input_ids=ids, attention_mask=mask))
                seen += int(mask.sum())

    _, t_plain = timed(plain)
    return {"stats_tokens": n_tokens, "stats_layers": layers, "stats_s": t_stats, "plain_forward_s": t_plain,
            "stats_throughput_over_plain_forward": t_plain / t_stats}


def bench_scoring(lm, n: int):
    """Batched CounterFact scoring vs one prompt at a time, same records, same run; metrics must agree to 1e-5."""
    from lmedit.evaluate.counterfact import aggregate, score_counterfact
    from lmedit.requests import load_requests

    records = load_requests(DATA, limit=n)
    batched, t_batched = timed(lambda: score_counterfact(lm.model, lm.tokenizer, records, batch_size=64))
    single, t_single = timed(lambda: score_counterfact(lm.model, lm.tokenizer, records, batch_size=1))
    a, b = aggregate(batched), aggregate(single)
    keys = [k for k, v in a.items() if isinstance(v, float)]
    max_metric_diff = max(abs(a[k] - b[k]) for k in keys)
    max_logp_diff = max(abs(x["prompt"]["logp_new"] - y["prompt"]["logp_new"]) for x, y in zip(batched, single))
    return {"scoring_records": n, "scoring_batched_records_per_s": n / t_batched,
            "scoring_one_at_a_time_records_per_s": n / t_single, "scoring_speedup": t_single / t_batched,
            "scoring_max_metric_diff": max_metric_diff, "scoring_max_logp_diff": max_logp_diff}


def bench_ft_vs_memit(lm, requests):
    """Wall time of one mass edit of the same requests: FT-conditional with augmentation (m = r = 2, facts from
    counterfact-train) vs MEMIT.
    No v* is reused (no ValueStore is active), and C is loaded before the clock starts."""
    from lmedit.editors import get_editor, make_config

    n = len(requests)
    rows = {"mass_n": n}
    for label, method, overrides in (("memit", "memit", {}),
                                     ("ft_conditional_aug", "ft-conditional",
                                      {"n_paraphrases": "2", "n_random_facts": "2", "facts_file": str(TRAIN)})):
        cfg = make_config(method, lm.name, lm.model, overrides)
        patch, dt = timed(lambda: get_editor(method).fn(lm.model, lm.tokenizer, requests, cfg, progress=True,
                                                        announce=lambda *_: None))
        rows[f"mass{n}_{label}_s"] = dt - patch.meta.get("timing", {}).get("stats_seconds", 0.0)
    rows[f"mass{n}_ft_conditional_aug_over_memit"] = rows[f"mass{n}_ft_conditional_aug_s"] / rows[f"mass{n}_memit_s"]
    return rows


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--values-n", type=int, default=100)
    parser.add_argument("--reference-n", type=int, default=20)
    parser.add_argument("--sizes", default="10,100")
    parser.add_argument("--stats-tokens", type=int, default=20_000)
    parser.add_argument("--scoring-n", type=int, default=200)
    parser.add_argument("--mass-n", type=int, default=1000, help="edits in the FT-vs-MEMIT wall-time part")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: "
                        "editors,values,stats,scoring,ft_vs_memit")
    args = parser.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    from lmedit.editors import make_config
    from lmedit.models import load_model
    from lmedit.requests import load_requests
    from lmedit.stats.moments import load_or_compute

    lm = load_model("smollm2-135m")
    requests = load_requests(DATA, limit=max(args.values_n, args.mass_n, *map(int, args.sizes.split(","))))
    for method in ("rome", "memit", "emmet"):  # statistics are not part of the edit timings
        cfg = make_config(method, lm.name, lm.model)
        load_or_compute(lm.model, lm.tokenizer, list(cfg.layers), cfg.stats_corpus, cfg.stats_tokens)
    result = {"model": lm.name, "torch_threads": torch.get_num_threads()}
    skip = set(args.skip.split(",")) - {""}
    if skip and (OUT / "locate.json").is_file():  # re-measuring some parts: keep the others' numbers
        # (each ratio is measured within one part, in one run)
        result = {**json.loads((OUT / "locate.json").read_text()), **result}
    parts = [("scoring", lambda: bench_scoring(lm, args.scoring_n)),
             ("stats", lambda: bench_stats(lm, args.stats_tokens)),
             ("values", lambda: bench_batched_values(lm, requests, args.values_n, args.reference_n)),
             ("editors", lambda: bench_editors(lm, requests, [int(s) for s in args.sizes.split(",")])),
             ("ft_vs_memit", lambda: bench_ft_vs_memit(lm, requests[:args.mass_n]))]
    for name, part in parts:
        if name in skip:
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        result.update(part())
        _write(result)  # partial results survive an interruption
    _write(result)
    print((OUT / "locate.md").read_text())


def _write(result: dict) -> None:
    result["peak_rss_mb"] = peak_rss_mb()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "locate.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| measurement | value |", "|---|---|"]
    for k, v in result.items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    (OUT / "locate.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
