"""DeepSeek-V3.2's fixed-shape step (models.family.StaticStep; traced by models/static_lm.py for ATC's static
graphs and ort-cuda's decode gears): MLA's absorbed step (mla_static.py) whose queries attend only to the
lightning indexer's top k = min(index_topk, M) rows of a cache of fixed length M.

Shapes as mla_static's (x [B, S, hidden]; cos/sin [B, S, rope/2]; mask / write [B, S, M]; covered [B, M, 1]),
past (c_kv [B, M, r], k_pe [B, M, rope], index_key [B, M, D]).

    index_key = write_rows(past, rope_half(k_norm(wk(x))))            the indexer key cache, written in place
    score     = sum_h w[h] relu(q[h] . index_key^T / sqrt(D)), masked  [B, S, M]   (indexer.py)
    ids       = tie_exact_top_ids(score, k)                            [B, S, k]   ties: the lower id, whatever
                                                                                   order TopK gives equal values
    rows      = Gather(c_kv / k_pe flattened [B*M, .], b*M + ids)      [B, S, k, .] int32 indices, plain Gather
    attention = absorbed MLA over those k rows; a selected row the causal mask hides (fewer than k visible
                keys) is recognised by its masked score (score[ids] == MASK_VALUE) and gets zero weight

The same math as the eager model's additive top-k mask over all T keys (v32.py): softmax over the k chosen keys
equals softmax over all keys with -inf outside them. The gather uses Gather with int32 indices rather than
GatherND (whose indices must be int64, a Cast target ATC lacks, static_lm.py).

The indexer's scoring and selection run in one module per layer (IndexSelect, registered by the wrapper as
`index_select_{i}`), so its nodes carry that scope and ATC's mixed precision can keep them fp32 with the
indexer's projections (targets/ascend/static_export.py FP32_ISLANDS): a top-k over fp16 scores would choose
other keys at near ties.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .indexer import tie_exact_top_ids, weighted_relu_scores
from .mla_static import LAYOUT, constants, write_rows  # noqa: F401  (LAYOUT, constants: the family's StaticStep)
from .rope import apply_rope_half_split
from .static_lm import MASK_VALUE
from .v32 import SparseMLA


class IndexSelect(nn.Module):
    """The indexer's fixed-shape selection (module docstring): rotates q and the new keys, writes the key cache,
    scores every row in fp32, keeps the top k. -> ids [B, S, k] int32, visible [B, S, k] bool, index_key [B, M, D]."""

    def __init__(self, n_heads: int, head_dim: int, rope: int, topk: int):
        super().__init__()
        self.n_heads, self.head_dim, self.rope, self.topk = n_heads, head_dim, rope, topk
        self.softmax_scale = head_dim ** -0.5

    def _rope(self, x, cos, sin):
        x_rot, x_pass = x.split([self.rope, self.head_dim - self.rope], dim=-1)
        return torch.cat([apply_rope_half_split(x_rot, cos, sin), x_pass], dim=-1)

    def forward(self, q, k_new, w, cos, sin, past_keys, write, covered, mask):
        q = self._rope(q.float(), cos.unsqueeze(-2), sin.unsqueeze(-2))  # q [B, S, Hi, D]
        keys = write_rows(past_keys, self._rope(k_new.float(), cos, sin).to(past_keys.dtype), write, covered)
        scores = weighted_relu_scores(q, keys, w.float() * self.n_heads ** -0.5, self.softmax_scale)  # [B, S, M]
        scores = torch.where(mask, scores, MASK_VALUE)
        ids = tie_exact_top_ids(scores, min(self.topk, scores.shape[-1]))
        return ids.to(torch.int32), scores.gather(-1, ids) > MASK_VALUE, keys


def modules(attn: SparseMLA) -> dict[str, nn.Module]:
    idx = attn.indexer
    return {"index_select": IndexSelect(idx.n_heads, idx.head_dim, idx.rope, idx.topk)}


def _gather_rows(cache: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """cache [B, M, w], ids [B, S, k] int32 -> rows [B, S, k, w]: one Gather over the flattened [B*M, w]."""
    B, M, w = cache.shape
    offsets = (torch.arange(B, dtype=torch.int32) * M).view(B, 1, 1)
    return F.embedding(ids + offsets, cache.reshape(B * M, w))


def attention(attn: SparseMLA, x, cos, sin, mask, write, covered, past: tuple, const: Callable[[str], torch.Tensor],
              softmax: Callable) -> tuple[torch.Tensor, tuple]:
    """One layer's sparse attention at fixed shapes -> out [B, S, hidden], present (c_kv, k_pe, index_key)."""
    past_c, past_pe, past_ik = past
    B, S, _ = x.shape
    H = attn.n_heads
    idx = attn.indexer
    q_lat = attn.q_latent(x)
    ids, visible, ik_all = const("index_select")(
        idx.wq_b(q_lat).unflatten(-1, (idx.n_heads, idx.head_dim)), idx.k_norm(idx.wk(x)), idx.weights_proj(x),
        cos, sin, past_ik, write, covered, mask)
    q_nope, q_pe = attn.project_q(x, cos.unsqueeze(1), sin.unsqueeze(1), q_lat)  # [B, H, S, .]
    c, k_pe = attn.project_kv(x, cos, sin)
    c_all, pe_all = write_rows(past_c, c, write, covered), write_rows(past_pe, k_pe, write, covered)
    c_sel, pe_sel = _gather_rows(c_all, ids), _gather_rows(pe_all, ids)  # [B, S, k, r], [B, S, k, rope]
    q_abs = (q_nope @ const("w_uk")).transpose(1, 2)  # [B, S, H, r]
    scores = q_abs @ c_sel.transpose(2, 3) + q_pe.transpose(1, 2) @ pe_sel.transpose(2, 3)  # [B, S, H, k]
    p = softmax(scores, visible.unsqueeze(2)).to(c_sel.dtype)
    o = (p @ c_sel).transpose(1, 2) @ const("w_uv_t")  # [B, H, S, v]
    out = attn.o_proj(o.transpose(1, 2).reshape(B, S, H * attn.v_dim))
    return out, (c_all, pe_all, ik_all)
