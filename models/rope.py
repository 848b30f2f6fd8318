"""Decoupled RoPE with YaRN, in real arithmetic (complex tensors do not export to ONNX).

DeepSeek rotates interleaved pairs (x[2i], x[2i+1]) by theta_i, and only q_pe / k_pe are rotated.
YaRN follows transformers' `_compute_yarn_parameters` exactly: blended inverse frequencies, a
cos/sin `attention_factor`, and the mscale^2 folded into the softmax scale.
"""
from __future__ import annotations

import math

import torch

from .config import DeepseekConfig, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_correction_range(cfg: DeepseekConfig) -> tuple[float, float]:
    rs, dim = cfg.rope_scaling, cfg.qk_rope_head_dim
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    orig = rs["original_max_position_embeddings"]
    low = _correction_dim(beta_fast, dim, cfg.rope_theta, orig)
    high = _correction_dim(beta_slow, dim, cfg.rope_theta, orig)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def inv_freq(cfg: DeepseekConfig) -> torch.Tensor:
    """[rope_dim / 2] fp32 inverse frequencies (YaRN-blended when rope_scaling is set)."""
    dim = cfg.qk_rope_head_dim
    pos_freqs = cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    if not cfg.rope_scaling:
        return extrapolation
    factor = cfg.rope_scaling["factor"]
    interpolation = 1.0 / (factor * pos_freqs)
    low, high = yarn_correction_range(cfg)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    smooth = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate
    return interpolation * (1 - smooth) + extrapolation * smooth


def attention_factor(cfg: DeepseekConfig) -> float:
    """Scale on cos/sin. 1.0 for V3/V2-Lite (mscale == mscale_all_dim)."""
    rs = cfg.rope_scaling
    if not rs:
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(yarn_mscale(rs["factor"], mscale) / yarn_mscale(rs["factor"], mscale_all_dim))
    return yarn_mscale(rs["factor"])


def softmax_scale(cfg: DeepseekConfig) -> float:
    """(nope + rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs and rs.get("mscale_all_dim"):
        m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
        scale = scale * m * m
    return scale


def rope_cos_sin(positions: torch.Tensor, freqs: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] int -> cos, sin [..., rope_dim / 2] fp32."""
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs
    return torch.cos(angles) * factor, torch.sin(angles) * factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of x; cos/sin broadcast against x[..., ::2]."""
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def apply_rope_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of x in the half-split (non-interleaved) layout: x[i] pairs with x[i + d/2]
    (DeepSeek-V3.2's lightning indexer; transformers' rotate_half). cos/sin broadcast against x[..., :d/2]."""
    x0, x1 = x.chunk(2, dim=-1)
    return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
