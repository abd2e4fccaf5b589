"""`lmedit bench`: the speed and memory benchmark (lmedit.bench) on any model and CounterFact-format data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmedit.cli.common import DeviceOpt
from lmedit.errors import InputError


def bench(data: Path = typer.Option(..., "--data", "-d", help="CounterFact-format records (the requests timed)"),
          out: Path = typer.Option(..., "--out", "-o", help="output directory: locate.json and locate.md"),
          model: str = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m, an HF directory, "
                                    "or a .gguf file"),
          device: Optional[str] = DeviceOpt,
          parts: str = typer.Option("scoring,stats,values,editors", "--parts", help="comma list of scoring, "
                                    "stats, values, editors, ft_vs_memit, lifelong"),
          facts: Optional[Path] = typer.Option(None, "--facts", help="random-fact pool of ft_vs_memit"),
          sizes: str = typer.Option("10,100", "--sizes", help="editors: MEMIT/EMMET batch sizes"),
          values_n: int = typer.Option(100, "--values-n", help="values: requests optimised together"),
          reference_n: int = typer.Option(20, "--reference-n", help="values: requests timed the reference way"),
          stats_tokens: int = typer.Option(20_000, "--stats-tokens", help="stats: tokens of the timed pass"),
          scoring_n: int = typer.Option(200, "--scoring-n", help="scoring: records scored both ways"),
          mass_n: int = typer.Option(1000, "--mass-n", help="ft_vs_memit: edits in the one mass edit"),
          force: bool = typer.Option(False, "--force", help="overwrite an existing output")) -> None:
    """Time the editing core on one model: each part compares two ways of the same work in one run, so its
    ratio holds on a noisy machine. Run it alone.

    Example:

      lmedit bench --data cf.json --out bench --parts scoring,stats \\
        --scoring-n 100
    """
    from lmedit.bench import check_parts, run_bench
    from lmedit.cli.common import console, load_lm
    from lmedit.fileio import check_writable
    from lmedit.requests import load_requests

    chosen = [p.strip() for p in parts.split(",") if p.strip()]
    check_parts(chosen, facts)
    try:
        batch_sizes = [int(s) for s in sizes.split(",")]
    except ValueError:
        raise InputError(f"--sizes expects comma-separated integers, got {sizes!r}") from None
    for name, value in (("--values-n", values_n), ("--reference-n", reference_n), ("--stats-tokens", stats_tokens),
                        ("--scoring-n", scoring_n), ("--mass-n", mass_n), *(("--sizes", s) for s in batch_sizes)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    check_writable(out / "locate.json", force)
    requests = load_requests(data)
    lm = load_lm(model, device)
    run_bench(lm, requests, out, chosen, facts_file=facts, sizes=batch_sizes, values_n=values_n,
              reference_n=reference_n, stats_tokens=stats_tokens, scoring_n=scoring_n, mass_n=mass_n)
    console.print((out / "locate.md").read_text(), markup=False, highlight=False)
