"""`lmedit trace`: causal tracing of one prompt or of many facts, heatmaps, and edit layers suggested from it.

The input is checked before the model is loaded; the output directory is built under a temporary name and appears only when complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lmedit.cli.common import DeviceOpt
from lmedit.errors import InputError


def trace(prompt: Optional[str] = typer.Option(None, "--prompt", help="a prompt that ends where the fact is "
                                               "recalled, e.g. 'The Eiffel Tower is located in the city of'"),
          subject: Optional[str] = typer.Option(None, "--subject", help="the subject in the prompt (its "
                                                "embeddings are corrupted)"),
          answer: Optional[str] = typer.Option(None, "--answer", help="the answer traced (default: the "
                                               "model's own top next token)"),
          requests: Optional[Path] = typer.Option(None, "--requests", "-r", help="trace many facts instead "
                                                  "(any requests file lmedit reads): those the model knows, i.e. "
                                                  "whose target_true is its top next token"),
          limit: int = typer.Option(10, "--limit", help="with --requests: the first N facts the model knows"),
          kinds: str = typer.Option("hidden,mlp,attn", "--kind", help="states restored: hidden, mlp, attn "
                                    "(comma list)"),
          samples: int = typer.Option(10, "--samples", help="noise draws per run"),
          noise: float = typer.Option(3.0, "--noise", help="noise std as a multiple of the embeddings' std"),
          window: int = typer.Option(10, "--window", help="mlp/attn: layers restored together"),
          out: Path = typer.Option(..., "--out", "-o", help="output directory: trace.json and one PNG per "
                                   "fact and kind"),
          model: str = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m, an HF directory, "
                                    "or a .gguf file"),
          device: Optional[str] = DeviceOpt,
          force: bool = typer.Option(False, "--force", help="overwrite an existing output")) -> None:
    """Causal tracing (ROME §2.1): corrupt the subject's embeddings with noise, restore one hidden state at a
    time, and plot how much of P(answer) each one brings back. With MLP traces of several facts, suggests
    the ROME layer (the peak of the average effect at the last subject token) and MEMIT's layers.

    Example:

      lmedit trace --prompt "The Eiffel Tower is located in the city of" \\
        --subject "The Eiffel Tower" --out eiffel-trace
    """
    from lmedit.cli.common import console, load_lm
    from lmedit.fileio import AtomicDirectory, atomic_write_json, check_writable
    from lmedit.locate.trace import KINDS, TraceConfig, known_facts, plot_trace, suggest_layers, trace_fact
    from lmedit.requests import load_requests

    # ---- the input, before the model is loaded
    names = [k.strip() for k in kinds.split(",") if k.strip()]
    if not names or any(k not in KINDS for k in names):
        raise InputError(f"--kind must be a comma list of {', '.join(KINDS)}, got {kinds!r}")
    configs = [TraceConfig(kind=k, samples=samples, noise=noise, window=window) for k in names]
    if (prompt is None) == (requests is None):
        raise InputError("give --prompt with --subject, or --requests FILE")
    if prompt is not None:
        if not subject:
            raise InputError("--prompt needs --subject (the words whose embeddings are corrupted)")
        if answer is not None and not answer.strip():
            raise InputError("--answer is blank: give the answer's text, or leave --answer out to trace the "
                             "model's own top next token")
        if subject not in prompt:
            raise InputError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
        facts = [(prompt, subject, answer)]
    else:
        if limit < 1:
            raise InputError(f"--limit must be at least 1, got {limit}")
        pool = load_requests(requests)
    check_writable(out, force)

    # ---- the work
    lm = load_lm(model, device)
    if requests is not None:
        facts, read = known_facts(lm.model, lm.tokenizer, pool, limit)
        console.print(f"{len(facts)} fact(s) the model knows (its top next token is the true answer) among the "
                      f"first {read} of {requests}")
        if not facts:
            raise InputError(f"the model knows none of the {read} facts read from {requests}: nothing to trace")
    traces = []
    for i, (p, s, a) in enumerate(facts):
        for config in configs:
            console.print(f"[{i + 1}/{len(facts)}] tracing {config.kind}: {p!r}", markup=False, highlight=False)
            traces.append(trace_fact(lm.model, lm.tokenizer, p, s, a, config, progress=True))
    mlp = [t for t in traces if t.kind == "mlp"]
    result = {"kind": "trace", "model": lm.name, "config": {"samples": samples, "noise": noise,
                                                             "window": window},
              "traces": [t.to_dict() for t in traces],
              "suggestion": suggest_layers(mlp) if mlp else None}
    with AtomicDirectory(out, force=force) as tmp:
        atomic_write_json(tmp / "trace.json", result)
        for j, t in enumerate(traces):
            plot_trace(t, tmp / f"fact{j // len(configs)}-{t.kind}.png")
    for t in traces:
        console.print(f"{t.kind:6s} {t.prompt!r} → {t.answer.strip()!r}: clean {t.p_clean:.3f}, corrupted "
                      f"{t.p_corrupted:.3f}, best restoration {max(map(max, t.effect)):.3f}",
                      markup=False, highlight=False)
    if result["suggestion"]:
        sug = result["suggestion"]
        console.print(f"suggested from {sug['n_facts']} MLP trace(s): ROME layer {sug['rome_layer']}, "
                      f"MEMIT layers {sug['memit_layers']} (the MLP effect at the last subject token peaks there; "
                      f"at any subject token it peaks at layer {sug['peak_layer_any_subject_token']})")
    console.print(f"→ {out}")
