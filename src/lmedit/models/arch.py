"""The architecture table: one row per `config.model_type`, naming the modules lmedit touches.

Nothing outside `lmedit.models` knows a module path; everything asks the row for the role it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmedit.errors import InputError


@dataclass(frozen=True)
class Arch:
    """Where the roles live in one architecture family (paths relative to the model / to a block)."""

    model_type: str
    layers: str  # the ModuleList of transformer blocks
    mlp_out: str  # MLP output projection inside a block: W, mapping key k (its input) to value v = W k
    mlp_in: str  # MLP input projection inside a block (the one whose output feeds the nonlinearity)
    attn_out: str  # attention output projection inside a block
    final_norm: str  # the norm applied before the unembedding
    unembed: str  # the output embedding (logits = unembed(final_norm(h)))
    embed: str  # the input token embedding
    transposed: bool = False  # weights stored (in, out), as GPT-2's Conv1D does
    body: str | None = None  # the module whose last_hidden_state `unembed` reads; None = the parent of `layers`
    kv_cache: bool = True  # whether the body can run on cached prefix keys/values (batched scoring, v*)
    mlp_out_norm: str | None = None  # a norm between W's output and the residual stream (Gemma-2/3), in a block


_LLAMA_LIKE = dict(
    layers="model.layers",
    mlp_out="mlp.down_proj",
    mlp_in="mlp.up_proj",
    attn_out="self_attn.o_proj",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
)

ARCHITECTURES: dict[str, Arch] = {
    row.model_type: row
    for row in [
        Arch("gpt2", "transformer.h", "mlp.c_proj", "mlp.c_fc", "attn.c_proj", "transformer.ln_f", "lm_head",
             "transformer.wte", transposed=True),
        Arch("gptj", "transformer.h", "mlp.fc_out", "mlp.fc_in", "attn.out_proj", "transformer.ln_f", "lm_head",
             "transformer.wte"),
        Arch("gpt_neox", "gpt_neox.layers", "mlp.dense_4h_to_h", "mlp.dense_h_to_4h", "attention.dense",
             "gpt_neox.final_layer_norm", "lm_head", "gpt_neox.embed_in"),
        Arch("llama", **_LLAMA_LIKE),
        Arch("mistral", **_LLAMA_LIKE),
        Arch("qwen2", **_LLAMA_LIKE),
        Arch("gemma", **_LLAMA_LIKE),
        Arch("gemma2", **_LLAMA_LIKE, mlp_out_norm="post_feedforward_layernorm"),
        Arch("gemma3_text", **_LLAMA_LIKE, mlp_out_norm="post_feedforward_layernorm"),
        Arch("phi3", **{**_LLAMA_LIKE, "mlp_in": "mlp.gate_up_proj"}),
        # Backpack (backpack/model.py): the roles are those of its contextualising GPT-2; the output that the
        # tied embedding unembeds is the sense sum of `backpack`, which has no final norm of its own
        Arch("backpack-gpt2", "backpack.gpt2_model.h", "mlp.c_proj", "mlp.c_fc", "attn.c_proj",
             "backpack.gpt2_model.ln_f", "lm_head", "backpack.gpt2_model.wte", transposed=True, body="backpack",
             kv_cache=False),
        # backpack/ensemble.py: a large model steered by a Backpack's edit; it is evaluated, never edited itself,
        # so it has no block roles, only a body (the ensemble logits) and an identity unembedding
        Arch("lmedit-ensemble", "", "", "", "", "", "head", "", body="ensemble", kv_cache=False),
    ]
}


def arch_for(model: nn.Module) -> Arch:
    """The row for a loaded model; an unknown type is a clear error listing the known ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise InputError(
            f"unknown model architecture {model_type!r}; lmedit knows: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def get_module(model: nn.Module, path: str) -> nn.Module:
    if not path:
        raise InputError(f"a {arch_for(model).model_type} model has no such module (it cannot be edited directly)")
    module = model
    for part in path.split("."):
        module = getattr(module, part)
    return module


def num_layers(model: nn.Module) -> int:
    return len(get_module(model, arch_for(model).layers))


def check_layer(model: nn.Module, layer: int) -> int:
    n = num_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise InputError(f"layer {layer} is out of range: this model has layers 0..{n - 1}")
    return layer


def check_edit_layers(model: nn.Module, layers) -> None:
    """The edit layers of a method that spreads one edit over several: at least one, each in range, increasing."""
    if not layers:
        raise InputError("at least one edit layer is needed")
    for l in layers:
        check_layer(model, l)
    if list(layers) != sorted(set(layers)):
        raise InputError(f"edit layers must be distinct and increasing, got {list(layers)}")


def block(model: nn.Module, layer: int) -> nn.Module:
    return get_module(model, arch_for(model).layers)[check_layer(model, layer)]


def mlp_out_name(model: nn.Module, layer: int) -> str:
    """Module path of W (the MLP output projection) at `layer`."""
    arch = arch_for(model)
    return f"{arch.layers}.{check_layer(model, layer)}.{arch.mlp_out}"


def mlp_out_module(model: nn.Module, layer: int) -> nn.Module:
    return get_module(model, mlp_out_name(model, layer))


def mlp_out_norm_module(model: nn.Module, layer: int) -> nn.Module | None:
    """The norm that W's output passes through before it is added to the residual stream, if the family has one."""
    arch = arch_for(model)
    return None if arch.mlp_out_norm is None else get_module(block(model, layer), arch.mlp_out_norm)


def embedding_output_scale(model: nn.Module) -> float:
    """What the input embedding module multiplies a row of its table by: √d for Gemma's scaled embeddings (the
    module returns E[id] · √d), 1 for the others. Measured on a few rows, so no family needs naming here."""
    import torch

    module = get_module(model, arch_for(model).embed)
    ids = torch.arange(min(8, module.weight.shape[0]), device=module.weight.device)
    with torch.no_grad():
        rows = module.weight[ids].double()
        out = module(ids).double()
    return float(out.norm() / rows.norm().clamp(min=1e-30))


def mlp_out_dims(model: nn.Module, layer: int) -> tuple[int, int]:
    """(d_out, d_in) of W at `layer`, whatever the storage layout."""
    w = mlp_out_module(model, layer).weight
    return (w.shape[1], w.shape[0]) if arch_for(model).transposed else (w.shape[0], w.shape[1])


def weight_as_matrix(module: nn.Module, transposed: bool):
    """W as (out, in) whatever the storage layout: v = W k. A view, not a copy."""
    return module.weight.T if transposed else module.weight


def delta_to_storage(delta_out_in, transposed: bool):
    """ΔW given as (out, in) → the parameter's own storage layout."""
    return delta_out_in.T.contiguous() if transposed else delta_out_in
