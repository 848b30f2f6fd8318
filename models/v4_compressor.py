"""DeepSeek-V4's KV compressors and the CSA lightning indexer, written as steps over explicit state.

A compressor turns every closed window of m source tokens into one entry of width d:
    C = kv_proj(x), Z = gate_proj(x) + position_bias[token's place in its window]
    entry_w = kv_norm( sum_j softmax_j(Z_j) * C_j )   (softmax per channel over the window's tokens)
    RoPE ("compress") on the trailing rope dims at position w * m (the window's first token).
HCA (m = 128): width d, the window is its own m tokens.
CSA (m = 4): width 2d, two series Ca = [..., :d], Cb = [..., d:]; entry w pools window w-1's Ca with window
w's Cb (2m tokens, stride m), so the last closed window's Ca is carried to the next step as the "overlap"
(initially kv 0 / gate -inf: weight 0 for entry 0's missing half).

State per compressor (v4_cache.py): pending kv / gate [B, T % m, width] (raw gate, position_bias added when
the window closes), for CSA overlap kv / gate [B, m, d] (gate with position_bias), and the entries
[B, T // m, d]. A step appends its S tokens to pending, closes floor((T % m + S) / m) windows, and keeps the rest.

The indexer (CSA only) has its own compressor at index_head_dim and scores queries against its entries with
the lightning indexer's sum_h w_h relu(q_h . k) (models/indexer.py's weighted_relu_scores and top_ids, shared
with V3.2; V3.2's keys are one per token, these one per window). A query at t may see entry w only when
w < (t + 1) // m (the window is closed at t); of those it keeps the top index_topk; picks past the causal
limit (a query with fewer closed windows than index_topk) get the -1 sentinel.
"""
from __future__ import annotations

import torch
from torch import nn

from .indexer import top_ids, weighted_relu_scores
from .norm import RMSNorm
from .v4_rope import cos_sin, rotate_tail


class Compressor(nn.Module):
    """Checkpoint names (under self_attn.compressor. or self_attn.compressor.indexer.): kv_proj, gate_proj,
    position_bias, kv_norm."""

    def __init__(self, hidden_size: int, head_dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        self.d, self.m, self.overlap = head_dim, rate, overlap
        width = 2 * head_dim if overlap else head_dim
        self.kv_proj = nn.Linear(hidden_size, width, bias=False)
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.position_bias = nn.Parameter(torch.empty(rate, width))
        self.kv_norm = RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, state: tuple, past_entries: torch.Tensor, freqs: torch.Tensor):
        """x [B, S, hidden]; state: (pending_kv, pending_gate) or, with overlap, (pending_kv, pending_gate,
        overlap_kv, overlap_gate); past_entries [B, C, d] -> (entries [B, C + n, d], new state)."""
        B, m, d = x.shape[0], self.m, self.d
        kv = torch.cat([state[0], self.kv_proj(x)], dim=1)
        gate = torch.cat([state[1], self.gate_proj(x)], dim=1)
        n = kv.shape[1] // m
        closed = n * m
        pending = (kv[:, closed:], gate[:, closed:])
        wkv = kv[:, :closed].unflatten(1, (n, m))  # [B, n, m, width]
        wgate = gate[:, :closed].unflatten(1, (n, m)) + self.position_bias
        if self.overlap:
            ca_kv = torch.cat([state[2].unsqueeze(1), wkv[..., :d]], dim=1)  # [B, n + 1, m, d]: windows -1 .. n-1
            ca_gate = torch.cat([state[3].unsqueeze(1), wgate[..., :d]], dim=1)
            wkv = torch.cat([ca_kv[:, :n], wkv[..., d:]], dim=2)  # [B, n, 2m, d]
            wgate = torch.cat([ca_gate[:, :n], wgate[..., d:]], dim=2)
            pending = pending + (ca_kv[:, n], ca_gate[:, n])  # the last closed window's Ca (or the old overlap)
        new = self.kv_norm((wkv * wgate.softmax(dim=2)).sum(dim=2))  # [B, n, d]
        start = past_entries.shape[1]
        positions = (torch.arange(n, device=x.device) + start) * m
        cos, sin = cos_sin(positions, freqs)
        return torch.cat([past_entries, rotate_tail(new, cos, sin)], dim=1), pending


def visible_entries(positions: torch.Tensor, m: int) -> torch.Tensor:
    """[S] query positions -> [S] number of closed windows each query may see: (t + 1) // m."""
    return torch.div(positions + 1, m, rounding_mode="floor")


class Indexer(Compressor):
    """CSA's lightning indexer: a compressor at index_head_dim (its kv_proj, gate_proj, position_bias, kv_norm)
    plus q_b_proj and scorer.weights_proj (checkpoint names under self_attn.compressor.indexer.)."""

    def __init__(self, cfg):
        super().__init__(cfg.hidden_size, cfg.index_head_dim, cfg.csa_rate, True, cfg.rms_norm_eps)
        self.n_heads, self.topk = cfg.index_n_heads, cfg.index_topk
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.scorer = nn.Module()
        self.scorer.weights_proj = nn.Linear(cfg.hidden_size, cfg.index_n_heads, bias=False)

    def select(self, x, q_residual, positions, cos, sin, state: tuple, past_keys: torch.Tensor, freqs):
        """-> (top ids [B, S, k] into the entries, -1 where not visible; keys [B, C, Di]; new state)."""
        keys, state = self(x, state, past_keys, freqs)
        q = self.q_b_proj(q_residual).unflatten(-1, (self.n_heads, self.d))
        q = rotate_tail(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
        w = self.scorer.weights_proj(x).float() * self.n_heads ** -0.5
        scores = weighted_relu_scores(q, keys, w, self.d ** -0.5)  # [B, S, C]
        limit = visible_entries(positions, self.m).unsqueeze(-1)  # [S, 1]
        future = torch.arange(keys.shape[1], device=x.device) >= limit  # [S, C]
        ids = top_ids(scores.masked_fill(future, float("-inf")), min(self.topk, keys.shape[1]))
        return torch.where(ids >= limit, -1, ids), keys, state
