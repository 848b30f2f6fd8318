"""DeepSeek-V4's cache spec: the state each layer type keeps between steps (models/cache.py's per-layer form).
T: tokens seen; D = head_dim; Di = index_head_dim; W = sliding_window; m: the layer's compress rate.

sliding_attention            window [B, min(T, W-1), D]           K = V after kv_norm and RoPE
heavily_compressed_attention window; pending_kv, pending_gate [B, T % m, D]; compressed [B, T // m, D]
compressed_sparse_attention  window; pending_kv, pending_gate [B, T % m, 2D]; overlap_kv, overlap_gate
                             [B, m, D] (fixed; gate starts at -inf); compressed [B, T // m, D]; the indexer's
                             index_pending_kv, index_pending_gate [B, T % m, 2Di], index_overlap_kv,
                             index_overlap_gate [B, m, Di], index_key [B, T // m, Di]

T itself is m * compressed + pending rows of any compressor layer (CacheSpec.length), so a step needs no
counter beside the tensors.
"""
from __future__ import annotations

from .cache import BATCH, PAST, CacheSpec, CacheTensor
from .errors import ConfigError
from .v4_config import CSA, HCA, DeepseekV4Config

LAYOUT = "compressed"
CACHE_LAYOUTS = (LAYOUT,)


def layer_tensors(cfg: DeepseekV4Config, layer: int) -> tuple[CacheTensor, ...]:
    D, Di, m, t = cfg.head_dim, cfg.index_head_dim, cfg.compress_rate(layer), cfg.layer_types[layer]
    out = (CacheTensor("window", (BATCH, PAST, D), rule="window", n=cfg.sliding_window - 1),)
    if t == HCA:
        out += (CacheTensor("pending_kv", (BATCH, PAST, D), rule="pending", n=m),
                CacheTensor("pending_gate", (BATCH, PAST, D), rule="pending", n=m),
                CacheTensor("compressed", (BATCH, PAST, D), rule="compressed", n=m))
    elif t == CSA:
        for prefix, d, last in (("", D, "compressed"), ("index_", Di, "index_key")):
            out += (CacheTensor(f"{prefix}pending_kv", (BATCH, PAST, 2 * d), rule="pending", n=m),
                    CacheTensor(f"{prefix}pending_gate", (BATCH, PAST, 2 * d), rule="pending", n=m),
                    CacheTensor(f"{prefix}overlap_kv", (BATCH, m, d), rule="fixed"),
                    CacheTensor(f"{prefix}overlap_gate", (BATCH, m, d), rule="fixed", fill=float("-inf")),
                    CacheTensor(last, (BATCH, PAST, d), rule="compressed", n=m))
    return out


def cache_spec(cfg: DeepseekV4Config, layout: str = LAYOUT) -> CacheSpec:
    if layout not in CACHE_LAYOUTS:
        raise ConfigError(f"cache layout {layout!r}: DeepSeek-V4's cache layouts are {', '.join(CACHE_LAYOUTS)}")
    return CacheSpec(layout, cfg.num_hidden_layers, (),
                     per_layer=tuple(layer_tensors(cfg, i) for i in range(cfg.num_hidden_layers)))
