"""DeepSeek-V4 attention: shared-KV MQA over a sliding window, plus compressed entries on CSA / HCA layers.

    q_res = q_a_norm(q_a_proj(x));  q = rms(q_b_proj(q_res)) per head (unweighted)        [B, S, H, D]
    kv    = kv_norm(kv_proj(x))                                     one head, used as K and V  [B, S, D]
    RoPE (interleaved, trailing rope dims) on q and kv at the token positions ("main" rope on sliding
    layers, "compress" on CSA / HCA)
    keys  = window (the last sliding_window - 1 tokens' kv) ++ this step's kv ++ compressed entries
    mask  = sliding: key position in (t - sliding_window, t];  HCA: entry w < (t + 1) // m;
            CSA: the indexer's top index_topk of the visible entries (v4_compressor.py)
    p     = softmax([q.k * D^-0.5 + mask, sink_h]) without the sink column   (per-head learnable sinks)
    o     = p @ keys, then the rope slice rotated back (-sin) at the query position (V = K carries RoPE)
    out   = o_b_proj(o_a_proj(o grouped into o_groups heads groups))   (o_a_proj block-diagonal per group)

Checkpoint names (under model.layers.N.self_attn.): q_a_proj, q_a_norm, q_b_proj, kv_proj, kv_norm, o_a_proj
[o_groups * o_lora_rank, H * D / o_groups], o_b_proj, sinks [H], compressor.* (compressor and indexer).
past/present per layer type: v4_cache.py.
"""
from __future__ import annotations

import torch
from torch import nn

from .norm import RMSNorm
from .v4_compressor import Compressor, Indexer, visible_entries
from .v4_config import CSA, HCA, SLIDING
from .v4_hc import unweighted_rms_norm
from .v4_rope import rotate_tail


class CSACompressor(Compressor):
    """CSA's compressor (two overlapping series) with its lightning indexer under `.indexer`."""

    def __init__(self, cfg):
        super().__init__(cfg.hidden_size, cfg.head_dim, cfg.csa_rate, True, cfg.rms_norm_eps)
        self.indexer = Indexer(cfg)


class GroupedLinear(nn.Module):
    """o_a_proj: group g of the heads (in_per_group wide) through rows g*r .. (g+1)*r-1 of the weight."""

    def __init__(self, in_per_group: int, out_features: int, groups: int):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_features, in_per_group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., groups, in_per_group] -> [..., groups * r]."""
        w = self.weight.view(self.groups, -1, self.weight.shape[-1])  # [g, r, in]
        return torch.einsum("...gi,gri->...gr", x, w).flatten(-2)


class V4Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_type = cfg.layer_types[layer_idx]
        self.rope_kind = "main" if self.layer_type == SLIDING else "compress"
        H, D, eps = cfg.num_attention_heads, cfg.head_dim, cfg.rms_norm_eps
        self.n_heads, self.head_dim, self.window, self.eps, self.o_groups = H, D, cfg.sliding_window, eps, cfg.o_groups
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * D, bias=False)
        self.kv_proj = nn.Linear(cfg.hidden_size, D, bias=False)
        self.kv_norm = RMSNorm(D, eps)
        self.o_a_proj = GroupedLinear(H * D // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, cfg.o_groups)
        self.o_b_proj = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.empty(H))
        if self.layer_type == CSA:
            self.compressor = CSACompressor(cfg)
        elif self.layer_type == HCA:
            self.compressor = Compressor(cfg.hidden_size, D, cfg.hca_rate, False, eps)
        else:
            self.compressor = None

    def sliding_mask(self, positions: torch.Tensor, n_keys: int) -> torch.Tensor:
        """[S, n_keys] additive over the window's and this step's keys (the last key at the last query's
        position): key position k visible from t when t - sliding_window < k <= t."""
        keys = torch.arange(n_keys, device=positions.device) + (positions[-1] + 1 - n_keys)
        d = positions.unsqueeze(-1) - keys
        return torch.where((d >= 0) & (d < self.window), 0.0, float("-inf"))

    def forward(self, x, positions, rope: dict, past: tuple):
        """x [B, S, hidden]; positions [S] (T0 .. T0+S-1); rope {"main"|"compress": (cos, sin) [S, rope/2]};
        past: this layer's tuple (v4_cache.py) -> (out [B, S, hidden], present)."""
        B, S, _ = x.shape
        cos, sin = rope[self.rope_kind]
        q_residual = self.q_a_norm(self.q_a_proj(x))
        q = unweighted_rms_norm(self.q_b_proj(q_residual).unflatten(-1, (self.n_heads, self.head_dim)), self.eps)
        q = rotate_tail(q, cos.unsqueeze(-2), sin.unsqueeze(-2)).transpose(1, 2)  # [B, H, S, D]
        kv = rotate_tail(self.kv_norm(self.kv_proj(x)), cos, sin)  # [B, S, D]

        window = past[0]
        keys = torch.cat([window, kv], dim=1)  # [B, Wp + S, D]
        bias = self.sliding_mask(positions, keys.shape[1]).expand(B, S, -1)
        keep = min(keys.shape[1], self.window - 1)
        present = (keys[:, keys.shape[1] - keep:],)

        if self.layer_type == HCA:
            entries, state = self.compressor(x, past[1:3], past[3], rope["compress_freqs"])
            visible = torch.arange(entries.shape[1], device=x.device) < visible_entries(positions, self.compressor.m).unsqueeze(-1)
            block = torch.where(visible, 0.0, float("-inf")).expand(B, S, -1)
            present = present + state + (entries,)
        elif self.layer_type == CSA:
            comp = self.compressor
            entries, state = comp(x, past[1:5], past[5], rope["compress_freqs"])
            ids, index_keys, index_state = comp.indexer.select(x, q_residual, positions, cos, sin, past[6:10],
                                                               past[10], rope["compress_freqs"])
            C = entries.shape[1]
            safe = torch.where(ids >= 0, ids, C)  # -1 -> a dropped column
            block = torch.full((B, S, C + 1), float("-inf"), device=x.device).scatter(-1, safe, 0.0)[..., :C]
            present = present + state + (entries,) + index_state + (index_keys,)
        if self.compressor is not None:
            keys = torch.cat([keys, entries], dim=1)
            bias = torch.cat([bias, block], dim=-1)

        logits = (q.float() @ keys.float().unsqueeze(1).transpose(-1, -2)) * self.head_dim ** -0.5 + bias.unsqueeze(1)
        sinks = self.sinks.float().view(1, -1, 1, 1).expand(B, -1, S, 1)
        p = torch.cat([logits, sinks], dim=-1).softmax(dim=-1)[..., :-1]  # [B, H, S, K]
        o = (p @ keys.unsqueeze(1)).transpose(1, 2)  # [B, S, H, D]
        o = rotate_tail(o, cos.unsqueeze(-2), -sin.unsqueeze(-2))
        o = self.o_a_proj(o.reshape(B, S, self.o_groups, -1))
        return self.o_b_proj(o), present
