"""The DeepSeek-V2/V3 decoder: pre-norm blocks of MLA + (dense MLP | DeepSeekMoE), and the LM head.

Module names equal the Hugging Face checkpoint names (model.layers.N.self_attn.kv_b_proj, ...), so
a checkpoint maps onto `state_dict()` one to one.
"""
from __future__ import annotations

import torch
from torch import nn

from .cache import CacheSpec
from .config import DeepseekConfig
from .mla import CACHE_LAYOUTS, MLA, cache_spec
from .moe import MLP, MoE
from .norm import RMSNorm
from .rope import attention_factor, inv_freq, rope_cos_sin, softmax_scale

ATTENTION_FORMS = ("naive", "absorbed")

Cache = list  # per layer: a tuple of the cache spec's tensors (mla.cache_spec)


def step_rope_mask(S, past_len, rope_inv_freq: torch.Tensor, rope_factor: float):
    """A step of S tokens after past_len cached ones -> RoPE cos, sin [S, rope / 2] at positions past_len + arange(S)
    and the causal mask [S, past_len + S] (0 or -inf) every layer reads."""
    positions = torch.arange(S, device=rope_inv_freq.device) + past_len
    cos, sin = rope_cos_sin(positions, rope_inv_freq, rope_factor)
    keys = torch.arange(past_len + S, device=rope_inv_freq.device)
    return cos, sin, torch.where(keys[None, :] <= positions[:, None], 0.0, float("-inf"))


class DecoderLayer(nn.Module):
    attention_cls = MLA  # a family with another attention (DeepSeek-V3.2's sparse MLA) subclasses and sets it

    def __init__(self, cfg: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.self_attn = self.attention_cls(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask, scale, past, layout, absorbed):
        a, present = self.self_attn(self.input_layernorm(h), cos, sin, mask, scale, past, layout, absorbed)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, present


class DeepseekModel(nn.Module):
    layer_cls = DecoderLayer

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """Eager reference. `forward(input_ids)` -> fp32 logits; `step(...)` runs with a cache."""

    model_cls = DeepseekModel

    def __init__(self, cfg: DeepseekConfig, attention: str = "naive"):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = self.model_cls(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("rope_inv_freq", inv_freq(cfg), persistent=False)
        self.rope_factor = attention_factor(cfg)
        self.softmax_scale = softmax_scale(cfg)
        self.attention = attention

    @property
    def attention(self) -> str:
        return self._attention

    @attention.setter
    def attention(self, form: str) -> None:
        if form not in ATTENTION_FORMS:
            raise ValueError(f"attention form {form!r}: expected one of {ATTENTION_FORMS}")
        self._attention = form

    def cache_spec(self, layout: str = "latent") -> CacheSpec:
        return cache_spec(self.config, layout)

    def empty_cache(self, batch: int, layout: str = "latent", dtype=torch.float32) -> Cache:
        return self.cache_spec(layout).empty(batch, dtype)

    def step(self, input_ids: torch.Tensor, past: Cache, layout: str = "latent") -> tuple[torch.Tensor, Cache]:
        """input_ids [B, S] following `past` (T0 cached tokens) -> logits [B, S, vocab], present cache."""
        past_len = self.cache_spec(layout).length(past)
        cos, sin, mask = step_rope_mask(input_ids.shape[1], past_len, self.rope_inv_freq, self.rope_factor)
        absorbed = self.attention == "absorbed"
        h = self.model.embed_tokens(input_ids)
        present: Cache = []
        for layer, layer_past in zip(self.model.layers, past):
            h, p = layer(h, cos, sin, mask, self.softmax_scale, layer_past, layout, absorbed)
            present.append(p)
        logits = self.lm_head(self.model.norm(h)).float()
        return logits, present

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits, _ = self.step(input_ids, self.empty_cache(input_ids.shape[0]))
        return logits
