"""`lmedit backpack train`: a small Backpack with a large model's tokenizer (backpack/train.py).
"""

from __future__ import annotations

from pathlib import Path

import typer

from lmedit.errors import InputError



def train(out: Path = typer.Option(..., "--out", "-o", help="output directory (a loadable HF model)"),
          tokenizer_from: str = typer.Option("smollm2-135m", "--tokenizer-from", help="the large model whose "
                                             "tokenizer (and, by default, embedding) the Backpack takes"),
          corpus: str = typer.Option("wiki", "--corpus", help="wiki (the offline Wikipedia leads), a text/JSONL "
                                     "file, or hf:NAME"),
          init_embeddings: bool = typer.Option(True, "--init-embeddings/--random-embeddings", help="start E as "
                                               "the large model's embedding on its top principal directions"),
          layers: int = typer.Option(2, "--layers"), dim: int = typer.Option(128, "--dim"),
          heads: int = typer.Option(4, "--heads"), senses: int = typer.Option(16, "--senses"),
          seq_len: int = typer.Option(128, "--seq-len"), batch_size: int = typer.Option(16, "--batch-size"),
          steps: int = typer.Option(2000, "--steps", help="optimiser steps in all"),
          lr: float = typer.Option(1e-3, "--lr"), seed: int = typer.Option(0, "--seed"),
          checkpoint_every: int = typer.Option(200, "--checkpoint-every"),
          for_steps: int = typer.Option(None, "--for-steps", help="stop this call after N more steps (resume "
                                        "later with --resume)"),
          resume: bool = typer.Option(False, "--resume", help="continue the run in --out"),
          force: bool = typer.Option(False, "--force", help="start over in an existing --out")) -> None:
    """Train a Backpack on the offline corpus, checkpointing as it goes.

    Example (1000 of 3000 steps now; the same command with --resume goes on):

      lmedit backpack train --out backpack-smol --steps 3000 --for-steps 1000
    """
    import shutil

    from lmedit.cli.common import console, load_lm
    from lmedit.backpack.train import STATE_FILE, BackpackTrainConfig, train_backpack
    from lmedit.stats.corpora import get_corpus

    cfg = BackpackTrainConfig(layers=layers, dim=dim, heads=heads, senses=senses, seq_len=seq_len,
                              batch_size=batch_size, steps=steps, lr=lr, seed=seed,
                              checkpoint_every=checkpoint_every)
    cfg.validate()
    if for_steps is not None and for_steps < 1:
        raise InputError(f"--for-steps must be at least 1, got {for_steps}")
    if resume and force:
        raise InputError("give --resume or --force, not both")
    if out.exists() and not resume:
        if not force:
            raise InputError(f"{out} already exists; pass --resume to continue it or --force to start over")
        shutil.rmtree(out)
    if resume and not (out / STATE_FILE).is_file():
        raise InputError(f"nothing to resume in {out} (no {STATE_FILE})")
    documents = get_corpus(corpus)
    big = load_lm(tokenizer_from)
    embedding = big.model.get_input_embeddings().weight if init_embeddings else None
    result = train_backpack(out, big.tokenizer, documents, cfg, embeddings_from=embedding, resume=resume,
                            max_new_steps=for_steps)
    console.print(f"step {result['step']}/{cfg.steps}, mean loss per checkpoint: "
                  + ", ".join(f"{x:.3f}" for x in result["losses"][-5:]) + f" → {out}")
