"""`lmedit stats compute|inspect`: the key statistics C = E(k kᵀ) as an explicit, cached artifact."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from lmedit.cli.common import DeviceOpt, ModelOpt, console, load_lm, parse_layers
from lmedit.errors import InputError
from lmedit.stats.sampling import Sample


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


def stats_compute(model: str = ModelOpt, device: Optional[str] = DeviceOpt,
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
    lm = load_lm(model, join_process_group() or device)  # under torchrun: each rank on its own device
    wanted = parse_layers(layers)
    moments = load_or_compute(lm.model, lm.tokenizer, wanted, corpus, sample, announce=console.print)
    console.print(f"C over {moments.description}")
    for l in wanted:
        console.print(f"layer {l}: {stats_path(lm.model, l, moments.corpus_id, moments.sample)}")


def stats_inspect(model: str = ModelOpt, device: Optional[str] = DeviceOpt,
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
    lm = load_lm(model, device)
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
