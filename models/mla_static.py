"""MLA's fixed-shape step (the form ATC-ready static graphs trace): absorbed attention over a latent
cache of fixed length M, this step's rows written in place.

Shapes: x [B, S, hidden]; cos/sin [B, S, rope/2] (gathered by position); mask [B, S, M] (query may see
key); write [B, S, M] one-hot (query s writes row position + s); covered [B, M, 1] (rows
position .. position+S-1); past (c_kv [B, M, r], k_pe [B, M, rope]).

Cache rows are written with Where, not ScatterND (whose indices must be int64). Decode (S = 1):
Where(write, new row, past), the row broadcast over M. Prefill: the one-hot [B, M, S] moves the S new
rows to their places with one MatMul (exact in fp16 too) and Where keeps the rows it does not cover.

Absorbed attention (q_lat = q_nope @ W_UK, scores against the latent cache, o = (p @ c_kv) @ W_UV^T)
with W_UK / W_UV^T precomputed per layer (`constants`).
"""
from __future__ import annotations

from typing import Callable

import torch

from .mla import MLA
from .rope import apply_rope

LAYOUT = "latent"


def constants(attn: MLA) -> dict[str, torch.Tensor]:
    """Per-layer constants of the static step: W_UK [H, nope, r], W_UV^T [H, r, v]."""
    w_uk, w_uv = attn.w_uk_uv()
    return {"w_uk": w_uk.clone().contiguous(), "w_uv_t": w_uv.transpose(1, 2).contiguous()}


def write_rows(past: torch.Tensor, rows: torch.Tensor, write, covered) -> torch.Tensor:
    """past [B, M, w] with rows [B, S, w] written at position .. position+S-1 (module docstring)."""
    if rows.shape[1] == 1:  # decode: the new row broadcasts over M, selected where key_pos == position
        return torch.where(write.transpose(1, 2), rows, past)  # write^T [B, M, 1] bool
    place = write.transpose(1, 2).to(rows.dtype)  # prefill: one-hot [B, M, S] @ rows [B, S, w]
    return torch.where(covered, place @ rows, past)


def attention(attn: MLA, x, cos, sin, mask, write, covered, past: tuple, const: Callable[[str], torch.Tensor],
              softmax: Callable) -> tuple[torch.Tensor, tuple]:
    """One layer's attention at fixed shapes -> out [B, S, hidden], present (c_kv, k_pe) [B, M, .].

    const(name): this layer's constant (see `constants`); softmax(scores, mask): the masked softmax."""
    past_c, past_pe = past
    B, S, _ = x.shape
    H, nope, rope = attn.n_heads, attn.nope, attn.rope
    if attn.cfg.q_lora_rank is None:
        q = attn.q_proj(x)
    else:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q = q.view(B, S, H, nope + rope).transpose(1, 2)  # [B, H, S, nope+rope]
    q_nope, q_pe = q.split([nope, rope], dim=-1)
    q_pe = apply_rope(q_pe, cos.unsqueeze(1), sin.unsqueeze(1))  # cos [B, 1, S, rope/2]
    c, k_pe = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, rope], dim=-1)
    c = attn.kv_a_layernorm(c)
    k_pe = apply_rope(k_pe, cos, sin)  # [B, S, rope]
    c_all, pe_all = write_rows(past_c, c, write, covered), write_rows(past_pe, k_pe, write, covered)
    q_lat = q_nope @ const("w_uk")  # [B, H, S, r]
    c_t = c_all.unsqueeze(1)  # [B, 1, M, r]
    scores = q_lat @ c_t.transpose(2, 3) + q_pe @ pe_all.unsqueeze(1).transpose(2, 3)  # [B, H, S, M]
    p = softmax(scores, mask.unsqueeze(1)).to(c_t.dtype)
    o = (p @ c_t) @ const("w_uv_t")  # [B, H, S, v]
    out = attn.o_proj(o.transpose(1, 2).reshape(B, S, H * attn.v_dim))
    return out, (c_all, pe_all)
