"""Causal tracing (Meng et al. 2022, §2.1): where in the network does the model recall a fact?

Three runs of the prompt:
- clean: P(o) of the answer o (its first token; by default the model's own top prediction);
- corrupted: Gaussian noise ε ~ N(0, ν²) added to the embeddings of the subject tokens, `samples` draws; P*(o);
- corrupted-with-restoration: the same noise, but one state (layer l, token t) set back to its clean value.
Indirect effect IE(l, t) = P*_restored(o) − P*(o), averaged over the noise draws. `kind` picks the state:
"hidden" (the residual stream after block l), "mlp" or "attn" (the MLP / attention output projection of
block l, restored over a `window` of layers centred on l, as the paper does to see a site's total effect).

ν is `noise` × the standard deviation of the input embeddings as the embedding module outputs them (its table's
entries times the scale it applies: √d for Gemma; the paper uses 3 × the std of subject embeddings over its
data; the whole matrix needs no data set and gives the same scale). Averaged over many
facts, the MLP effect at the last subject token peaks at the layers where locate-then-edit writes: the peak
is the suggested ROME layer, and MEMIT's layers are the `memit_span` layers ending at it.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lmedit.errors import InputError
from lmedit.locate.batching import inference
from lmedit.locate.prompts import encode, encode_continuation, join_prompt_target, subject_tokens
from lmedit.models.arch import arch_for, block, embedding_output_scale, get_module, num_layers
from lmedit.models.hooks import capture_io, edit_output

KINDS = ("hidden", "mlp", "attn")


@dataclass(frozen=True)
class TraceConfig:
    kind: str = "hidden"  # hidden | mlp | attn
    samples: int = 10  # noise draws per run
    noise: float = 3.0  # ν as a multiple of the input embeddings' std
    window: int = 10  # layers restored together for mlp / attn (centred on the traced layer)
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"trace kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("samples", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"trace {name} must be a positive integer, got {value!r}")
        if not (isinstance(self.noise, (int, float)) and self.noise > 0 and self.noise < float("inf")):
            raise InputError(f"trace noise must be a positive finite number, got {self.noise!r}")


@dataclass
class Trace:
    """One prompt's trace: `effect[l][t]` is P(answer) with state (l, t) restored, averaged over the noise."""

    prompt: str
    subject: str
    answer: str
    tokens: list[str]
    subject_range: tuple[int, int]  # first, last token of the subject (inclusive)
    kind: str
    p_clean: float
    p_corrupted: float
    effect: list[list[float]]  # layers × tokens

    def indirect_effect(self) -> torch.Tensor:
        return torch.tensor(self.effect) - self.p_corrupted

    def to_dict(self) -> dict:
        return asdict(self)


def _site(model: nn.Module, kind: str, layer: int) -> nn.Module:
    a = arch_for(model)
    if kind == "hidden":
        return block(model, layer)
    return get_module(block(model, layer), a.mlp_out if kind == "mlp" else a.attn_out)


def _window(kind: str, layer: int, window: int, n_layers: int) -> list[int]:
    if kind == "hidden":
        return [layer]
    lo = max(0, layer - window // 2)
    return list(range(lo, min(n_layers, lo + window)))


def _subject_noise(model: nn.Module, config: TraceConfig, width: int, first: int, last: int, device) -> torch.Tensor:
    """ε for the `samples` draws, on the subject's tokens only: (samples, width, d). Drawn once per trace and
    shared by every restoration batch (common random numbers: effects differ only by what was restored)."""
    embed = get_module(model, arch_for(model).embed).weight
    scale = config.noise * float(embed.detach().float().std()) * embedding_output_scale(model)
    g = torch.Generator().manual_seed(config.seed)
    draws = torch.randn(config.samples, width, embed.shape[1], generator=g) * scale
    draws[:, :first] = 0
    draws[:, last + 1:] = 0
    return draws.to(device=device, dtype=embed.dtype)


def answer_token(tokenizer, prompt: str, answer: str) -> int | None:
    """The first token of `answer` as a continuation of `prompt` (None if it tokenizes to nothing)."""
    cont = encode_continuation(tokenizer, join_prompt_target(prompt, answer)[1])
    return cont[0] if cont else None


_TOKENS_PER_PASS = 1 << 16  # tokens in one forward pass of the trace (rows × prompt length)


def trace_fact(model: nn.Module, tokenizer, prompt: str, subject: str, answer: str | None = None,
               config: TraceConfig = TraceConfig(), progress: bool = False) -> Trace:
    """Causal trace of one prompt; `answer` defaults to the model's top next token."""
    ids, first, last = subject_tokens(tokenizer, prompt, subject)
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    n_layers, width = num_layers(model), len(ids)
    with inference(model):
        if answer is None:
            o = int(model(input_ids=x).logits[0, -1].argmax())
            answer = tokenizer.decode([o])
        else:
            o = answer_token(tokenizer, prompt, answer)
            if o is None:
                raise InputError(f"answer {answer!r} tokenizes to nothing")
        sites = {l: _site(model, config.kind, l) for l in range(n_layers)}
        with capture_io(sites, inputs=False, outputs=True) as store:
            p_clean = float(torch.softmax(model(input_ids=x).logits[0, -1].float(), -1)[o])
        clean = {l: store[l]["output"] for l in range(n_layers)}
        embed = get_module(model, arch_for(model).embed)
        noise = _subject_noise(model, config, width, first, last, device)

        def p_answer(restore: list[tuple[list[int], int]]) -> torch.Tensor:
            """P(o) per noise draw, for each (layers, token) restoration in `restore` (empty list: none)."""
            runs = max(1, len(restore))
            tiled = noise.repeat(runs, 1, 1)
            with ExitStack() as stack:
                stack.enter_context(edit_output(embed, lambda out: out + tiled))
                for l in range(n_layers):
                    targets = [(r, t) for r, (layers, t) in enumerate(restore) if l in layers]
                    if targets:
                        stack.enter_context(edit_output(sites[l], lambda out, l=l, targets=targets: _restore(
                            out, clean[l], targets, config.samples)))
                logits = model(input_ids=x.expand(runs * config.samples, -1)).logits[:, -1].float()
            return torch.softmax(logits, -1)[:, o].view(runs, config.samples).mean(1)

        p_corrupted = float(p_answer([])[0])
        # Restorations are independent rows: run them in chunks of at most _TOKENS_PER_PASS tokens, so a long
        # prompt neither fills memory nor sits minutes on one tick of the progress bar (same numbers).
        per_pass = max(1, _TOKENS_PER_PASS // (config.samples * width))
        starts = range(0, width, per_pass)
        effect = []
        with tqdm(total=n_layers * len(starts), desc=f"trace ({config.kind})", disable=not progress,
                  leave=False) as bar:
            for l in range(n_layers):
                layers = _window(config.kind, l, config.window, n_layers)
                row = []
                for t0 in starts:
                    row += p_answer([(layers, t) for t in range(t0, min(width, t0 + per_pass))]).cpu().tolist()
                    bar.update()
                effect.append(row)
    tokens = [tokenizer.decode([i]) for i in ids]
    return Trace(prompt, subject, answer, tokens, (first, last), config.kind, p_clean, p_corrupted, effect)


def _restore(out: torch.Tensor, clean: torch.Tensor, targets: list[tuple[int, int]], samples: int) -> torch.Tensor:
    """Put the clean state back at token t in every noise draw of restoration run r, for (r, t) in targets."""
    out = out.clone()
    for r, t in targets:
        out[r * samples:(r + 1) * samples, t] = clean[0, t]
    return out


def known_facts(model: nn.Module, tokenizer, requests, limit: int) -> tuple[list[tuple[str, str, str]], int]:
    """The first `limit` requests whose true answer is the model's top next token (the paper traces facts the model
    knows: corrupting a fact it does not know has nothing to take away). Returns (prompt, subject, answer) triples
    and how many requests were read to find them."""
    found, read = [], 0
    device = next(model.parameters()).device
    with inference(model):
        for r in requests:
            if len(found) == limit:
                break
            read += 1
            answer = answer_token(tokenizer, r.prompt, r.target_true) if r.target_true else None
            if answer is None:
                continue
            ids = torch.tensor([encode(tokenizer, r.prompt)], device=device)
            if int(model(input_ids=ids).logits[0, -1].argmax()) == answer:
                found.append((r.prompt, r.subject, r.target_true))
    return found, read


def suggest_layers(traces: list[Trace], memit_span: int = 5) -> dict:
    """From MLP traces: the average indirect effect at the last subject token per layer, its peak (ROME's
    layer, where ROME writes: k* is read at the last subject token) and the `memit_span` layers ending at the
    peak (MEMIT's); beside it, the same with each fact's strongest subject token."""
    if not traces or any(t.kind != "mlp" for t in traces):
        raise InputError("layer suggestions need MLP traces (kind='mlp')")
    aie = torch.stack([t.indirect_effect()[:, t.subject_range[1]] for t in traces]).mean(0)
    # where a model recalls at an earlier subject token (a multi-token name), this shows it beside the rule
    anywhere = torch.stack([t.indirect_effect()[:, t.subject_range[0]:t.subject_range[1] + 1].max(1).values
                            for t in traces]).mean(0)
    peak = int(aie.argmax())
    return {"aie_last_subject_token": aie.tolist(), "rome_layer": peak,
            "memit_layers": list(range(max(0, peak - memit_span + 1), peak + 1)), "n_facts": len(traces),
            "aie_best_subject_token": anywhere.tolist(), "peak_layer_any_subject_token": int(anywhere.argmax())}


def plot_trace(trace: Trace, path) -> None:
    """Heatmap of P(answer) with each state restored (layers × tokens), as in the paper's Figure 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    effect = torch.tensor(trace.effect).T  # tokens × layers
    labels = [f"{tok!r}*" if trace.subject_range[0] <= i <= trace.subject_range[1] else repr(tok)
              for i, tok in enumerate(trace.tokens)]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(labels) + 1.6), dpi=150)
    image = ax.pcolormesh(effect.numpy(), cmap={"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[trace.kind],
                          vmin=trace.p_corrupted)
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(len(labels))], labels, fontsize=8)
    ax.set_xlabel(f"single restored layer ({trace.kind})" if trace.kind == "hidden"
                  else f"centre of restored {trace.kind} layers")
    ax.set_title(f"P({trace.answer.strip()!r}) with one state restored; clean {trace.p_clean:.3f}, "
                 f"corrupted {trace.p_corrupted:.3f}", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
