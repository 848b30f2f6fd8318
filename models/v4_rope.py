"""DeepSeek-V4's two RoPEs, interleaved pairs on the TRAILING qk_rope_head_dim dims of a head (x[..., -rope:],
pairs (0,1), (2,3), ...): "main" (sliding layers: theta rope_theta, plain) and "compress" (CSA/HCA layers and
their compressors: theta compress_rope_theta, YaRN frequencies when rope_scaling is set, cos/sin unscaled).
The YaRN blend is models/rope.py's (transformers' _compute_yarn_parameters), read at this rope's theta and dims.
"""
from __future__ import annotations

import types

import torch

from . import rope


def inv_freq(cfg, kind: str) -> torch.Tensor:
    """[qk_rope_head_dim / 2] fp32 inverse frequencies of the "main" or "compress" rope."""
    compress = kind == "compress"
    view = types.SimpleNamespace(qk_rope_head_dim=cfg.qk_rope_head_dim,
                                 rope_theta=cfg.compress_rope_theta if compress else cfg.rope_theta,
                                 rope_scaling=cfg.rope_scaling if compress else None)
    with torch.device("cpu"):
        return rope.inv_freq(view)


def cos_sin(positions: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] -> cos, sin [..., rope / 2] (attention_factor 1)."""
    return rope.rope_cos_sin(positions, freqs.to(positions.device), 1.0)


def rotate_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the trailing 2 * cos.shape[-1] dims of x; cos/sin broadcast against x[..., -r::2]."""
    r = 2 * cos.shape[-1]
    return torch.cat([x[..., :-r], rope.apply_rope(x[..., -r:], cos, sin)], dim=-1)
