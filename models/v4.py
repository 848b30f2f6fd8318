"""DeepSeek-V4 eager reference (transformers 5.24's DeepseekV4ForCausalLM, its state-dict names).

    streams = embed_tokens(ids) copied into hc_mult residual streams           [B, S, N, hidden]
    per layer:  attention block, then MoE block, each between mHC weights (v4_hc.py):
        post, comb, x = attn_hc(streams);  streams = merge(post, comb, self_attn(input_layernorm(x)), streams)
        post, comb, x = ffn_hc(streams);   streams = merge(post, comb, mlp(post_attention_layernorm(x)), streams)
    logits = lm_head(norm(hc_head(streams)))

Attention: v4_attention.py (sliding window everywhere, CSA / HCA compressors v4_compressor.py); MoE: v4_moe.py
(hash_moe layers route by tid2eid[input_ids]); the cache: v4_cache.py. `step(input_ids, past)` is the whole
model: prefill from empty, chunked prefill, decode, all the same function, the tokens seen read from the
cache tensors' shapes.
"""
from __future__ import annotations

import torch
from torch import nn

from .cache import CacheSpec
from .norm import RMSNorm
from .v4_attention import V4Attention
from .v4_cache import CACHE_LAYOUTS, LAYOUT, cache_spec
from .v4_config import DeepseekV4Config
from .v4_hc import HyperConnection, HyperHead
from .v4_moe import V4MoE
from .v4_rope import cos_sin, inv_freq


class V4DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekV4Config, layer_idx: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = V4Attention(cfg, layer_idx)
        self.mlp = V4MoE(cfg, layer_idx)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.attn_hc = HyperConnection(cfg.hc_mult, h, cfg.hc_sinkhorn_iters, cfg.hc_eps, eps)
        self.ffn_hc = HyperConnection(cfg.hc_mult, h, cfg.hc_sinkhorn_iters, cfg.hc_eps, eps)

    def forward(self, streams, input_ids, positions, rope, past):
        post, comb, x = self.attn_hc(streams)
        out, present = self.self_attn(self.input_layernorm(x), positions, rope, past)
        streams = HyperConnection.merge(post, comb, out, streams)
        post, comb, x = self.ffn_hc(streams)
        return HyperConnection.merge(post, comb, self.mlp(self.post_attention_layernorm(x), input_ids), streams), present


class V4Model(nn.Module):
    def __init__(self, cfg: DeepseekV4Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(V4DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg.hc_mult, cfg.hidden_size, cfg.hc_eps, cfg.rms_norm_eps)


class DeepseekV4ForCausalLM(nn.Module):
    """`step(input_ids [B, S], past, layout)` -> (fp32 logits [B, S, V], present); `forward(input_ids)`: a step
    from the empty cache (transformers' no-cache forward)."""

    def __init__(self, cfg: DeepseekV4Config, attention: str = "naive"):
        super().__init__()
        if not isinstance(cfg, DeepseekV4Config):
            raise TypeError(f"DeepseekV4ForCausalLM needs a DeepseekV4Config, got {type(cfg).__name__}")
        self.config, self.attention = cfg, attention
        self.model = V4Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.freqs = {k: inv_freq(cfg, k) for k in ("main", "compress")}  # not state: recomputed from the config

    def cache_spec(self, layout: str = LAYOUT) -> CacheSpec:
        return cache_spec(self.config, layout)

    def empty_cache(self, batch: int, layout: str = LAYOUT) -> list[tuple[torch.Tensor, ...]]:
        return self.cache_spec(layout).empty(batch)

    def step(self, input_ids: torch.Tensor, past: list, layout: str = LAYOUT):
        spec = self.cache_spec(layout)
        seen = spec.length(past)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + seen
        rope = {k: cos_sin(positions, f) for k, f in self.freqs.items()}
        rope["compress_freqs"] = self.freqs["compress"]
        x = self.model.embed_tokens(input_ids)
        streams = x.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1)
        present = []
        for layer, layer_past in zip(self.model.layers, past):
            streams, p = layer(streams, input_ids, positions, rope, layer_past)
            present.append(p)
        logits = self.lm_head(self.model.norm(self.model.hc_head(streams)))
        return logits.float(), present

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.step(input_ids, self.empty_cache(input_ids.shape[0]))[0]


__all__ = ["CACHE_LAYOUTS", "DeepseekV4ForCausalLM", "cache_spec"]
