"""Multi-head Latent Attention (DeepSeek-V2/V3), naive and absorbed forms side by side.

Shapes: x [B, S, hidden]; H heads; T = past + S cached tokens.
Latent cache per layer: c_kv [B, T, kv_lora_rank] (after kv_a_layernorm) and k_pe [B, T, rope]
(after RoPE), shared by all heads. The "expanded" layout is the per-head K/V cache a generic
exporter keeps: k [B, H, T, nope + rope], v [B, H, T, v].
"""
from __future__ import annotations

import torch
from torch import nn

from .cache import CacheSpec, CacheTensor
from .config import DeepseekConfig
from .errors import ConfigError
from .norm import RMSNorm
from .rope import apply_rope

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm (not config.rms_norm_eps)
CACHE_LAYOUTS = ("latent", "expanded")


def cache_spec(cfg: DeepseekConfig, layout: str = "latent") -> CacheSpec:
    """MLA's cache per layer: latent (c_kv, k_pe), shared by all heads; expanded (key, value) per head."""
    if layout == "latent":
        tensors = (CacheTensor("c_kv", ("batch", "past", cfg.kv_lora_rank)),
                   CacheTensor("k_pe", ("batch", "past", cfg.qk_rope_head_dim)))
    elif layout == "expanded":
        H = cfg.num_attention_heads
        tensors = (CacheTensor("key", ("batch", H, "past", cfg.qk_head_dim)),
                   CacheTensor("value", ("batch", H, "past", cfg.v_head_dim)))
    else:
        raise ConfigError(f"cache layout {layout!r}: expected one of {', '.join(CACHE_LAYOUTS)}")
    return CacheSpec(layout, cfg.num_hidden_layers, tensors)


class MLA(nn.Module):
    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.cfg = cfg
        h, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads = H
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=bias)
            # The latent norms use eps 1e-6 whatever rms_norm_eps says (DeepSeek's reference code and
            # transformers build them without the config's eps).
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, h, bias=bias)

    def q_latent(self, x: torch.Tensor) -> torch.Tensor:
        """q_a_layernorm(q_a_proj(x)) [B, S, q_lora_rank]: the q latent (DeepSeek-V3.2's indexer reads it too)."""
        return self.q_a_layernorm(self.q_a_proj(x))

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_lat: torch.Tensor | None = None):
        """-> q_nope [B, H, S, nope], q_pe [B, H, S, rope] (rotated). q_lat: the q latent when already computed."""
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_latent(x) if q_lat is None else q_lat)
        q = q.unflatten(-1, (self.n_heads, self.nope + self.rope)).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """-> c_kv [B, S, kv_lora_rank] (normed), k_pe [B, S, rope] (rotated): this step's cache rows."""
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        return self.kv_a_layernorm(c), apply_rope(k_pe, cos, sin)

    def w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj.weight viewed [H, nope + v, kv_lora_rank] -> W_UK [H, nope, r], W_UV [H, v, r]."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope:]

    def _attend(self, scores: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.softmax(scores.float() * scale + mask, dim=-1)

    def forward(self, x, cos, sin, mask, scale: float, past: tuple[torch.Tensor, torch.Tensor],
                layout: str = "latent", absorbed: bool = False, q_lat: torch.Tensor | None = None):
        """One attention step. cos/sin: [S, rope/2]; mask: [S, T] additive (0 / -inf), or any shape that
        broadcasts against the scores [B, H, S, T] (a per-query sparse mask [B, 1, S, T]).

        past: (c_kv, k_pe) for layout "latent", (k, v) for layout "expanded".
        Returns out [B, S, hidden] and the present cache in the same layout.
        """
        B, S, _ = x.shape
        q_nope, q_pe = self.project_q(x, cos, sin, q_lat)  # cos/sin [S, rope/2] broadcast over B and H
        c_kv, k_pe = self.project_kv(x, cos, sin)
        if layout == "expanded":
            kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, self.nope + self.v_dim)).transpose(1, 2)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(B, self.n_heads, S, self.rope)], dim=-1)
            k_all, v_all = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            q = torch.cat([q_nope, q_pe], dim=-1)
            p = self._attend(q @ k_all.transpose(2, 3), mask, scale)
            o = p @ v_all
            present = (k_all, v_all)
        else:
            c_all, k_pe_all = torch.cat([past[0], c_kv], dim=1), torch.cat([past[1], k_pe], dim=1)
            rope_scores = q_pe @ k_pe_all.unsqueeze(1).transpose(2, 3)  # [B, H, S, T], one shared rope key
            if absorbed:
                w_uk, w_uv = self.w_uk_uv()
                q_lat = q_nope @ w_uk  # [B, H, S, r]
                c_t = c_all.unsqueeze(1)  # [B, 1, T, r]
                p = self._attend(q_lat @ c_t.transpose(2, 3) + rope_scores, mask, scale)
                o = (p @ c_t) @ w_uv.transpose(1, 2)  # o_lat [B, H, S, r] -> [B, H, S, v]
            else:
                kv = self.kv_b_proj(c_all).unflatten(-1, (self.n_heads, self.nope + self.v_dim)).transpose(1, 2)
                k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [B, H, T, .]
                p = self._attend(q_nope @ k_nope.transpose(2, 3) + rope_scores, mask, scale)
                o = p @ v
            present = (c_all, k_pe_all)
        out = self.o_proj(o.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim))
        return out, present
