"""Backpack language models (Hewitt et al. 2023), in the public `stanfordnlp/backpack-gpt2` checkpoint layout.

A Backpack gives every vocabulary item x k sense vectors C(x)_1..k (a sense network over its embedding). A GPT-2
transformer reads the sequence and produces non-negative contextualisation weights α (one causal softmax per
sense), and the output at position i is

    o_i = Σ_j Σ_ℓ α_ℓij · C(x_j)_ℓ,        logits_i = E o_i        (E: the tied input embedding)

so every prediction is a weighted sum of non-contextual sense vectors — which is what sense fine-tuning edits
(`backpack/senses.py`, DESIGN §6). The public model ships as remote code; lmedit implements it here so a local
copy loads without `trust_remote_code`, parameter names and shapes equal to the public ones
(`backpack.gpt2_model.*`, `backpack.sense_network.*`, `backpack.sense_weight_net.c_attn`, tied `lm_head`).

Beyond the public code: `attention_mask` also masks padded *sources* of α (so left padding gives the same numbers
as no padding), and `SenseEdits` adds zero-initialised deltas to chosen (token, sense) pairs. There is no KV cache:
α at position i needs the GPT-2 states of every earlier position, so every forward runs the whole sequence.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutput
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput

MODEL_TYPE = "backpack-gpt2"


class BackpackConfig(GPT2Config):
    """GPT-2's configuration plus the number of senses k and the sense network's hidden scale."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 50264, num_senses: int = 16, sense_intermediate_scale: int = 4,
                 n_positions: int = 512, scale_attn_by_inverse_layer_idx: bool = True,
                 sense_edit_sizes: list[int] | None = None, **kwargs):
        self.num_senses = num_senses
        self.sense_intermediate_scale = sense_intermediate_scale
        # an exported edited Backpack carries its sense edits (pairs per attached edit) beside the weights
        self.sense_edit_sizes = list(sense_edit_sizes or [])
        super().__init__(vocab_size=vocab_size, n_positions=n_positions,
                         scale_attn_by_inverse_layer_idx=scale_attn_by_inverse_layer_idx, **kwargs)


class _MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, config: BackpackConfig):
        super().__init__()
        self.c_fc = Conv1D(d_hidden, d_in)
        self.c_proj = Conv1D(d_out, d_hidden)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class _NoMixBlock(nn.Module):
    """A transformer block without attention: each position on its own (senses are non-contextual)."""

    def __init__(self, config: BackpackConfig):
        super().__init__()
        d = config.n_embd
        self.ln_1 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.ln_2 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.mlp = _MLP(d, 4 * d, d, config)
        self.resid_dropout1 = nn.Dropout(config.resid_pdrop)
        self.resid_dropout2 = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        residual = self.resid_dropout1(hidden) + residual
        residual = self.resid_dropout2(self.mlp(self.ln_1(residual))) + residual
        return self.ln_2(residual)


class SenseNetwork(nn.Module):
    """C(x): embedding (…, d) → k sense vectors, returned as (batch, k, seq, d)."""

    def __init__(self, config: BackpackConfig):
        super().__init__()
        self.num_senses, self.n_embd = config.num_senses, config.n_embd
        self.dropout = nn.Dropout(config.embd_pdrop)
        self.block = _NoMixBlock(config)
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.final_mlp = _MLP(config.n_embd, config.sense_intermediate_scale * config.n_embd,
                              config.n_embd * config.num_senses, config)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        residual = self.dropout(embeds)
        senses = self.final_mlp(self.block(self.ln(residual), residual))
        b, s, _ = senses.shape
        return senses.reshape(b, s, self.num_senses, self.n_embd).transpose(1, 2)


class WeightNetwork(nn.Module):
    """α: one causal softmax per sense over the GPT-2 states, α_ℓij ∝ exp(q_ℓi · k_ℓj / √(d/k)), j ≤ i."""

    def __init__(self, num_senses: int, n_embd: int):
        super().__init__()
        self.num_senses, self.per_sense = num_senses, n_embd // num_senses
        self.c_attn = nn.Linear(n_embd, 2 * num_senses * self.per_sense)

    def forward(self, encoded: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = encoded.shape
        q, k = self.c_attn(encoded).reshape(b, s, 2, self.num_senses, self.per_sense).unbind(dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k / math.sqrt(self.per_sense))  # (b, k, target, source)
        blocked = torch.ones(s, s, dtype=torch.bool, device=encoded.device).triu(1)[None, None]
        if attention_mask is not None:  # padded sources get no weight (left padding = no padding)
            blocked = blocked | (attention_mask[:, None, None, :] == 0)
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1)


class SenseEdits(nn.Module):
    """Additive deltas Δ(t, ℓ) on chosen senses: C'(t)_ℓ = C(t)_ℓ + Δ(t, ℓ), zero-initialised, so attaching them
    changes nothing until they are trained. Only `vectors` is a parameter; the (token, sense) pairs are fixed
    (buffers, saved with the model when an edited Backpack is exported)."""

    def __init__(self, tokens, senses, n_embd: int, vectors: torch.Tensor | None = None):
        super().__init__()
        tokens, senses = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(senses, dtype=torch.long)
        if tokens.shape != senses.shape or tokens.dim() != 1 or not len(tokens):
            raise ValueError("sense edits need one sense index per token, and at least one pair")
        self.register_buffer("tokens", tokens.clone())
        self.register_buffer("senses", senses.clone())
        init = torch.zeros(len(tokens), n_embd) if vectors is None else vectors.detach().clone()
        self.vectors = nn.Parameter(init, requires_grad=vectors is None)

    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.tokens.tolist(), self.senses.tolist()))

    def forward(self, input_ids: torch.Tensor, num_senses: int) -> torch.Tensor:
        """(batch, k, seq, d): Δ(x_j, ℓ) at every position j holding an edited token, 0 elsewhere."""
        hit = (input_ids[..., None] == self.tokens.to(input_ids.device)).to(self.vectors.dtype)  # (b, s, n)
        per_edit = torch.einsum("bsn,nd->bnsd", hit, self.vectors)  # (b, n, s, d)
        b, _, s, d = per_edit.shape
        return per_edit.new_zeros(b, num_senses, s, d).index_add(1, self.senses.to(input_ids.device), per_edit)


@dataclass
class BackpackOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # o_i, (batch, seq, d): what the tied embedding unembeds
    contextualization: torch.Tensor | None = None  # α, (batch, k, seq, seq)


class BackpackModel(nn.Module):
    """The Backpack without its unembedding (lmedit's `body` for this architecture)."""

    def __init__(self, config: BackpackConfig):
        super().__init__()
        self.config = config
        self.num_senses = config.num_senses
        self.gpt2_model = GPT2Model(config)
        self.sense_network = SenseNetwork(config)
        self.sense_weight_net = WeightNetwork(config.num_senses, config.n_embd)
        # attached sense edits, their sum acting (a patch stacks one, training another, an export keeps them)
        self.sense_edits = nn.ModuleList(SenseEdits([0] * n, [0] * n, config.n_embd, torch.zeros(n, config.n_embd))
                                         for n in config.sense_edit_sizes)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.gpt2_model.wte

    def senses(self, input_ids: torch.Tensor) -> torch.Tensor:
        """C(x_j)_ℓ for every position, (batch, k, seq, d), with any attached sense edits added."""
        senses = self.sense_network(self.word_embeddings(input_ids))
        for edits in self.sense_edits:
            senses = senses + edits(input_ids, self.num_senses)
        return senses

    # What a patch's sense entry (lmedit.patches.SenseDelta) asks of the module it edits: the parameters C(x) is
    # computed from (fingerprinted), and attach / restore. Nothing else of the model changes, so restoring the
    # list of attached edits makes the model bit-exactly what it was.
    def sense_inputs(self) -> list[str]:
        """Names (relative to this module) of the parameters the sense vectors C(x) are computed from."""
        return [f"sense_network.{n}" for n, _ in self.sense_network.named_parameters()] + ["gpt2_model.wte.weight"]

    def attach_sense_edits(self, edits: SenseEdits) -> list[SenseEdits]:
        """Put `edits` on top of those attached (their deltas add up); returns the list before, for restore."""
        if edits.vectors.shape[-1] != self.config.n_embd:
            raise ValueError(f"sense deltas of width {edits.vectors.shape[-1]} on a Backpack of width "
                             f"{self.config.n_embd}")
        if int(edits.tokens.max()) >= self.config.vocab_size or int(edits.senses.max()) >= self.num_senses:
            raise ValueError(f"sense edits name a token or sense this Backpack has not (vocabulary "
                             f"{self.config.vocab_size}, {self.num_senses} senses)")
        previous = list(self.sense_edits)
        device = self.word_embeddings.weight.device
        self.sense_edits.append(edits.to(device=device, dtype=self.word_embeddings.weight.dtype))
        return previous

    def attach_sense_vectors(self, tokens, senses, vectors: torch.Tensor) -> list[SenseEdits]:
        """Fixed (not trainable) deltas `vectors` on the (token, sense) pairs; returns the list before."""
        return self.attach_sense_edits(SenseEdits(tokens, senses, vectors.shape[-1], vectors))

    def restore_sense_edits(self, previous: list[SenseEdits]) -> None:
        self.sense_edits = nn.ModuleList(previous)

    @contextmanager
    def without_sense_edits(self):
        """The unedited Backpack for the block (the ensemble's reference distribution)."""
        previous = list(self.sense_edits)
        self.sense_edits = nn.ModuleList()
        try:
            yield
        finally:
            self.restore_sense_edits(previous)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                **_) -> BackpackOutput:
        if past_key_values is not None or use_cache:
            raise NotImplementedError("a Backpack has no KV cache: α at each position needs every earlier state")
        if position_ids is None and attention_mask is not None:  # real tokens keep their positions under padding
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        states = self.gpt2_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
        alpha = self.sense_weight_net(states, attention_mask)  # (b, k, s, s)
        hidden = (alpha @ self.senses(input_ids)).sum(dim=1)  # Σ_ℓ Σ_j α_ℓij C(x_j)_ℓ
        return BackpackOutput(last_hidden_state=hidden, contextualization=alpha)


class BackpackForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = BackpackConfig
    base_model_prefix = "backpack"
    _tied_weights_keys = {"lm_head.weight": "backpack.gpt2_model.wte.weight"}
    _keys_to_ignore_on_load_unexpected = [r"attn\.masked_bias", r"attn\.bias"]

    def __init__(self, config: BackpackConfig):
        super().__init__(config)
        self.backpack = BackpackModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backpack.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backpack.gpt2_model.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation (N(0, initializer_range) for weights, zero biases, unit norms)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, Conv1D)):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool | None = None, **_) -> CausalLMOutput:
        out = self.backpack(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=bool(use_cache))
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As PreTrainedModel's, with the attached sense edits' sizes in the config so that loading rebuilds them."""
        self.config.sense_edit_sizes = [len(e.tokens) for e in self.backpack.sense_edits]
        return super().save_pretrained(save_directory, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **_):
        """Generation re-runs the whole sequence each step (no cache)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM load `model_type: backpack-gpt2` directories with this code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, BackpackConfig)
        AutoModelForCausalLM.register(BackpackConfig, BackpackForCausalLM)
    except ValueError:  # already registered
        pass
