"""DeepSeek-V3.2: DeepSeek-V3 (MLA + DeepSeekMoE) with DeepSeek Sparse Attention. Each layer's lightning
indexer (indexer.py) picks the top index_topk cached tokens per query; MLA attends only to those (an
additive mask on MLA's scores here, as in transformers; a gather of the selected latent rows is the same math).

Everything but the attention is DeepSeek-V3's (decoder.py, moe.py, mla.py): SparseMLA is MLA plus
`self_attn.indexer`, so the checkpoint names are V3's plus `model.layers.N.self_attn.indexer.{wq_b, wk,
k_norm, weights_proj}` (the names transformers saves and the Hugging Face checkpoints carry).

Cache per layer (cache_spec): MLA's tensors in the chosen layout (latent: c_kv, k_pe; expanded: key, value)
and, beside them, the indexer's key cache index_key [B, T, index_head_dim]; all three grow by one row per
token (prefill chunks and decode steps append).
"""
from __future__ import annotations

import torch

from .cache import CacheSpec, CacheTensor
from .decoder import DecoderLayer, DeepseekForCausalLM, DeepseekModel
from .indexer import LightningIndexer
from .mla import CACHE_LAYOUTS, MLA
from .mla import cache_spec as mla_cache_spec
from .v32_config import DeepseekV32Config

INDEX_KEY = "index_key"


def cache_spec(cfg: DeepseekV32Config, layout: str = "latent") -> CacheSpec:
    """MLA's cache in `layout` plus the indexer key cache (one index_head_dim-wide key per token)."""
    mla = mla_cache_spec(cfg, layout)
    return CacheSpec(layout, cfg.num_hidden_layers,
                     mla.tensors + (CacheTensor(INDEX_KEY, ("batch", "past", cfg.index_head_dim)),))


class SparseMLA(MLA):
    """MLA whose keys are restricted per query to the indexer's top-k. past/present: MLA's pair + index_key."""

    def __init__(self, cfg: DeepseekV32Config):
        super().__init__(cfg)
        self.indexer = LightningIndexer(cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim,
                                        cfg.qk_rope_head_dim, cfg.index_topk)

    def forward(self, x, cos, sin, mask, scale: float, past: tuple, layout: str = "latent", absorbed: bool = False):
        """mask: the causal mask [S, T]; past: (c_kv, k_pe, index_key) or (key, value, index_key)."""
        q_lat = self.q_latent(x)
        sparse, index_keys = self.indexer(x, q_lat, cos, sin, mask, past[2])  # [B, 1, S, T], [B, T, D]
        out, present = super().forward(x, cos, sin, sparse, scale, past[:2], layout, absorbed, q_lat)
        return out, present + (index_keys,)


class V32DecoderLayer(DecoderLayer):
    attention_cls = SparseMLA


class V32Model(DeepseekModel):
    layer_cls = V32DecoderLayer


class DeepseekV32ForCausalLM(DeepseekForCausalLM):
    """Eager reference of DeepSeek-V3.2. `forward(input_ids)` -> fp32 logits; `step(input_ids, cache, layout)`
    with the cache of `cache_spec(layout)` (DeepseekForCausalLM.step: the per-layer tuples gain index_key)."""

    model_cls = V32Model

    def __init__(self, cfg: DeepseekV32Config, attention: str = "naive"):
        if not isinstance(cfg, DeepseekV32Config):
            raise TypeError(f"DeepseekV32ForCausalLM needs a DeepseekV32Config, got {type(cfg).__name__}")
        super().__init__(cfg, attention)

    def cache_spec(self, layout: str = "latent") -> CacheSpec:
        return cache_spec(self.config, layout)


__all__ = ["CACHE_LAYOUTS", "DeepseekV32ForCausalLM", "SparseMLA", "cache_spec", "INDEX_KEY"]
