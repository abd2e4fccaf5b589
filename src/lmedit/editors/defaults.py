"""Per-model defaults for the locate-then-edit methods, in one table, with a rule for unknown models.

Rows are keyed by model name (the embedded ones) or by `config.model_type`. SmolLM2's and Gemma 3 270M's rows
were chosen by measurement on counterfact-train.json (see README, "How the defaults were chosen").
"""

from __future__ import annotations

from typing import Any

from lmedit.models.arch import num_layers

# (method, model) -> settings. "layers" are absolute layer indices.
DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    # ROME's clamp is against ‖W_6 k‖ (its v* is W's output); MEMIT's and EMMET's against ‖h_6‖ (the residual
    # stream, EasyEdit's Llama factor 4, which never binds on SmolLM2: ‖δ‖ ≈ ‖h_6‖ on counterfact-train)
    ("rome", "smollm2-135m"): {"layers": (6,), "value.clamp_norm_factor": 4.0},
    # re-chosen after the residual-stream fix (issue 16; README "How SmolLM2's defaults were chosen")
    ("memit", "smollm2-135m"): {"layers": (2, 3, 4, 5, 6), "mom2_weight": 2000.0},
    ("emmet", "smollm2-135m"): {"layers": (2, 3, 4, 5, 6), "mom2_weight": 15000.0, "mu": 0.001},
    # AlphaEdit: MEMIT's layers and v*; null-space threshold 2e-2 and L2 10 are the dataclass's (the reference hparams)
    ("alphaedit", "smollm2-135m"): {"layers": (2, 3, 4, 5, 6)},
    # UltraEdit: measured on counterfact-train, three sequential batches of 100 (docs/results.md)
    ("ultraedit", "smollm2-135m"): {"layers": (20, 21, 22, 23, 24), "lr": 3e-4},
    # Gemma 3 270M (issue 22), chosen as for a model lmedit had never seen (benchmarks/results/gemma3-defaults/,
    # trace-gemma3-cf-train10/): `lmedit trace` on 10 known train facts peaks at layer 8 (MEMIT band 4-8) on a
    # plateau over layers 0-8; on the first 10 train records (batch of 10) MEMIT at 4-8 scored 0.663, at the depth
    # rule's 1-4 0.848, ROME at the rule's layer 3 0.794 (layer 4: 0.733). The rule's λ was off: MEMIT 1-4 at the
    # generic 15000 reached efficacy 0.5 (edit score 0.553), at 20, 200 or 2000 efficacy 1.0, generalisation 0.9,
    # specificity 0.7 (0.848); 2000 is the most preserving of those
    ("rome", "gemma3-270m"): {"layers": (3,)},
    ("memit", "gemma3-270m"): {"layers": (1, 2, 3, 4), "mom2_weight": 2000.0},
    # EMMET on MEMIT's layers and v* (same last layer, same site): on the same 10 records λ = 200, 2000 and 15000
    # (μ = 0.001) all score 0.848, as MEMIT does; 15000 is SmolLM2's measured and the published EMMET value
    ("emmet", "gemma3-270m"): {"layers": (1, 2, 3, 4), "mom2_weight": 15000.0, "mu": 0.001},
    # GPT-J and GPT-2 XL rows as published with ROME/MEMIT
    ("rome", "gptj"): {"layers": (5,), "value.clamp_norm_factor": 4.0},
    ("memit", "gptj"): {"layers": (3, 4, 5, 6, 7, 8), "mom2_weight": 15000.0, "value.clamp_norm_factor": 0.75},
    ("rome", "gpt2"): {"layers": (17,), "value.clamp_norm_factor": 4.0},
    ("memit", "gpt2"): {"layers": (13, 14, 15, 16, 17), "mom2_weight": 20000.0, "value.clamp_norm_factor": 0.75},
    # Fine-tuning editors train the MLP output projections of MEMIT's edit layers; lr measured on counterfact-train
    # (README, "How the fine-tuning defaults were chosen"); epochs and early stopping: the dataclass defaults
    ("ft", "smollm2-135m"): {"layers": (2, 3, 4, 5, 6), "lr": 5e-4},
    ("ft-conditional", "smollm2-135m"): {"layers": (2, 3, 4, 5, 6), "lr": 5e-4},
    ("lora", "smollm2-135m"): {"layers": (2, 3, 4, 5, 6), "lr": 1e-2},
    ("ft", "gptj"): {"layers": (3, 4, 5, 6, 7, 8)},
    ("ft-conditional", "gptj"): {"layers": (3, 4, 5, 6, 7, 8)},
    ("lora", "gptj"): {"layers": (3, 4, 5, 6, 7, 8)},
    ("ft", "gpt2"): {"layers": (13, 14, 15, 16, 17)},
    ("ft-conditional", "gpt2"): {"layers": (13, 14, 15, 16, 17)},
    ("lora", "gpt2"): {"layers": (13, 14, 15, 16, 17)},
}


def rule_for_unknown(method: str, n_layers: int) -> dict[str, Any]:
    """Facts are recalled in early-middle MLPs (causal tracing across GPT-2, GPT-J, Llama): ~15% of depth for
    ROME, a window from ~7% to ~20% for MEMIT/EMMET. `lmedit trace` refines this per model."""
    centre = max(0, round(0.15 * n_layers) - 0)
    if method == "ultraedit":  # it edits later layers (the reference's run.sh: 64–94% of depth); SmolLM2: 67–80%
        lo = min(round(0.67 * n_layers), n_layers - 1)
        return {"layers": tuple(range(lo, max(lo, min(round(0.8 * n_layers), n_layers - 1)) + 1))}
    if method == "rome":
        return {"layers": (min(centre, n_layers - 1),)}
    lo, hi = round(0.07 * n_layers), max(round(0.2 * n_layers), round(0.07 * n_layers))
    return {"layers": tuple(range(min(lo, n_layers - 1), min(hi, n_layers - 1) + 1))}


def defaults_for(method: str, model_name: str, model) -> dict[str, Any]:
    for key in ((method, model_name), (method, model.config.model_type)):
        if key in DEFAULTS:
            row = dict(DEFAULTS[key])
            if max(row["layers"]) < num_layers(model):
                return row
    return rule_for_unknown(method, num_layers(model))
