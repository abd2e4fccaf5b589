"""Evaluation across machines: a run split by record range into shards, and the merge step (DESIGN §10).

In batch mode every batch of B consecutive records is edited and scored on its own, so the batches can be
shared out: shard k of N takes a contiguous run of whole batches (`shard_range`), and `lmedit eval ... --shard
k/N` evaluates only those records, keeping the unedited scores of its records too. `merge_shards` checks that the
files are the N shards of one run (same task, model, method, settings, batch size and data) and computes the
metrics over all records exactly as one process would. Sequential runs cannot be split: each batch edits the
model the next one starts from.
"""

from __future__ import annotations

import hashlib
import json
import math

from lmedit.errors import InputError
from lmedit.evaluate.protocols import is_legacy

_SAME = ("task", "model", "method", "config", "batch_size", "sequential", "protocol")


def parse_shard(text: str) -> tuple[int, int]:
    """'k/N' → (k, N) with 1 ≤ k ≤ N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard expects k/N, e.g. 2/4 (the second of four shards), got {text!r}") from None
    if n < 1 or not 1 <= k <= n:
        raise InputError(f"--shard {text}: k must be between 1 and N")
    return k, n


def shard_range(n_records: int, batch_size: int, k: int, n_shards: int) -> tuple[int, int]:
    """Records [start, end) of shard k of N: whole batches, as evenly shared as they go."""
    n_batches = math.ceil(n_records / batch_size)
    if n_shards > n_batches:
        raise InputError(f"{n_shards} shards of {n_batches} batch(es) of {batch_size}: a shard needs a whole batch "
                         "(lower the batch size or the number of shards)")
    first, last = (n_batches * (k - 1)) // n_shards, (n_batches * k) // n_shards
    return first * batch_size, min(last * batch_size, n_records)


def data_digest(requests) -> str:
    """The identity of a run's whole record list (every shard of one run carries the same)."""
    return hashlib.sha256(json.dumps([r.to_dict() for r in requests], sort_keys=True).encode()).hexdigest()[:16]


def _whole(shard: dict) -> tuple:
    return shard["of"], shard["n_total"], shard["data"]


def merge_shards(results: list[dict], names: list[str]) -> dict:
    """One result from the N shard results of a run: records in order, metrics recomputed over all of them."""
    from lmedit.evaluate import counterfact, zsre

    for result, name in zip(results, names):
        if not isinstance(result, dict) or "shard" not in result or "baseline_records" not in result:
            raise InputError(f"{name} is not a shard result (run `lmedit eval ... --shard k/N`)")
    first = results[0]
    if is_legacy(first):  # its records hold the summed comparison under the keys that now mean per-token means
        raise InputError(f"{names[0]} was written before every metric named its protocol: its records cannot be "
                         "merged with today's metrics; re-run the shards")
    for result, name in zip(results[1:], names[1:]):
        for key in _SAME + ("shard",):
            a, b = first.get(key), result.get(key)
            if key == "shard":  # the whole run's size and data, not this shard's place in it
                key, a, b = "shard count or data", _whole(a), _whole(b)
            if a != b:
                raise InputError(f"{name} and {names[0]} are shards of different runs ({key} differs)")
    n_shards = first["shard"]["of"]
    order = sorted(range(len(results)), key=lambda i: results[i]["shard"]["index"])
    indices = [results[i]["shard"]["index"] for i in order]
    if indices != list(range(1, n_shards + 1)):
        missing = sorted(set(range(1, n_shards + 1)) - set(indices))
        doubled = sorted({i for i in indices if indices.count(i) > 1})
        raise InputError(f"the run has {n_shards} shards; "
                         + (f"missing: {', '.join(map(str, missing))}" if missing else "")
                         + ("; " if missing and doubled else "")
                         + (f"given twice: {', '.join(map(str, doubled))}" if doubled else ""))
    records, baseline_records = [], []
    expected_start = 0
    for i in order:
        shard = results[i]["shard"]
        if shard["start"] != expected_start:
            raise InputError(f"{names[i]} starts at record {shard['start']}, expected {expected_start}")
        expected_start = shard["end"]
        records += results[i]["records"]
        baseline_records += results[i]["baseline_records"]
    if expected_start != first["shard"]["n_total"] or len(records) != expected_start:
        raise InputError(f"the shards hold {len(records)} records, the run has {first['shard']['n_total']}")
    aggregator = zsre.aggregate if first["task"] == "zsre" else counterfact.aggregate
    metrics, baseline = aggregator(records), aggregator(baseline_records)
    metrics.pop("protocol", None)
    baseline.pop("protocol", None)
    timings = [r["timing"] for r in results]
    edit = sum(t["edit_seconds"] for t in timings)
    return {
        **{k: first.get(k) for k in _SAME},
        "n": len(records),
        "metrics": metrics,
        "baseline": baseline,
        "merged_from": {"shards": n_shards, "data": first["shard"]["data"]},
        "timing": {"edit_seconds": edit, "seconds_per_edit": edit / len(records),
                   "eval_seconds": sum(t["eval_seconds"] for t in timings),
                   "baseline_eval_seconds": sum(t["baseline_eval_seconds"] for t in timings),
                   "peak_rss_mb": max(t["peak_rss_mb"] for t in timings),
                   "values_reused": sum(t.get("values_reused", 0) for t in timings)},
        "records": records,
    }
