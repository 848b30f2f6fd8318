"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2; DeepSeek-V4's compressed sparse
attention reuses it): per query, score every cached token cheaply and keep the top `index_topk`.

Independent of MLA: it reads the block's input x, a query latent (V3.2: MLA's q_a_layernorm(q_a_proj(x))),
the RoPE cos/sin and its own key cache, and returns which keys each query may attend to.

Shapes: x [B, S, hidden]; q_lat [B, S, q_lora_rank]; Hi = index_n_heads heads of D = index_head_dim;
T = past + S cached tokens; cos/sin [S, rope/2] (the same angles as MLA's RoPE).

    q[s, h]   = wq_b(q_lat)[s, h]                     [B, S, Hi, D]
    k[t]      = k_norm(wk(x))[t]                      [B, T, D]   (LayerNorm, one key per token, cached)
    RoPE on the first `rope` dims of q and k, HALF-SPLIT layout (x[i] with x[i + rope/2]), unlike MLA
    w[s, h]   = weights_proj(x)[s, h] * Hi^-0.5
    score[s,t]= sum_h w[s, h] * relu(q[s, h] . k[t] * D^-0.5)      + causal mask (0 / -inf)
    ids[s]    = top min(index_topk, T) of score[s, :]               (ties: the lower key id)
    mask[s,t] = 0 where t in ids[s] (and causal), -inf elsewhere

DeepSeek's reference rotates q and k by a Hadamard matrix and scores in FP8; transformers (the reference
this module is checked against) skips both: the rotation is orthogonal, FP8 is precision only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope_half_split

K_NORM_EPS = 1e-6  # transformers builds k_norm with eps 1e-6 whatever rms_norm_eps says


def weighted_relu_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """score[s, t] = sum_h weights[s, h] * relu(q[s, h] . keys[t] * softmax_scale), fp32: the lightning indexer's
    scoring, shared by V3.2 (keys: one per token) and V4's CSA (keys: one per compressed window).
    q [B, S, Hi, D], keys [B, T, D], weights [B, S, Hi] (already scaled) -> [B, S, T]."""
    s = F.relu((q.float() @ keys.float().unsqueeze(1).transpose(-1, -2)) * softmax_scale)  # [B, S, Hi, T]
    return (weights.float().unsqueeze(-2) @ s).squeeze(-2)


def top_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The top k ids per row of scores [..., T] (int64); equal scores go to the lower id (LightningIndexer.select).
    Exported: tie_exact_top_ids (ascending key order); eager: a stable sort (descending score order)."""
    if torch.compiler.is_exporting():
        return tie_exact_top_ids(scores, k)
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def tie_exact_top_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The set top_ids picks (top k by score, equal scores -> the lower id), built from TopK whatever order a TopK
    kernel returns equal values in (ORT's CUDA EP does not keep ONNX's lower-index-first rule; docs/v32.md), as
    ids [..., k] int64 in ascending key order. Only the k-th largest VALUE comes from a tie-ordered TopK; the keys
    tied at it are ranked by key id with a CumSum; the last TopK ranks k distinct values T - t (no ties; fp16
    rounding of them may merge neighbours, but chosen keys stay >= 1 > 0, so the set is still exact)."""
    T = scores.shape[-1]
    v_k = scores.topk(k, dim=-1).values.amin(dim=-1, keepdim=True)
    above, tied = scores > v_k, scores == v_k  # -inf == -inf: masked keys tie like any others
    need = k - above.to(torch.int32).sum(dim=-1, keepdim=True, dtype=torch.int32)
    rank = tied.to(torch.int32).cumsum(dim=-1, dtype=torch.int32)  # 1-based among the tied keys, by key id
    chosen = above | (tied & (rank <= need))
    key_order = (T - torch.arange(T, device=scores.device, dtype=torch.int32)).to(torch.float32)
    return torch.where(chosen, key_order, torch.zeros((), dtype=torch.float32, device=scores.device)).topk(k, dim=-1).indices


class LightningIndexer(nn.Module):
    """Checkpoint names (under `self_attn.indexer.` in V3.2): wq_b, wk, k_norm (weight, bias), weights_proj."""

    def __init__(self, hidden_size: int, q_lora_rank: int, index_n_heads: int, index_head_dim: int,
                 rope_dim: int, index_topk: int):
        super().__init__()
        self.n_heads, self.head_dim, self.rope, self.topk = index_n_heads, index_head_dim, rope_dim, index_topk
        self.wq_b = nn.Linear(q_lora_rank, index_n_heads * index_head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(index_head_dim, eps=K_NORM_EPS)
        self.weights_proj = nn.Linear(hidden_size, index_n_heads, bias=False)
        self.softmax_scale = index_head_dim ** -0.5

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x.split([self.rope, self.head_dim - self.rope], dim=-1)
        return torch.cat([apply_rope_half_split(x_rot, cos, sin), x_pass], dim=-1)

    def key(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """-> k [B, S, D]: this step's rows of the indexer key cache (normed, rotated)."""
        return self._rope(self.k_norm(self.wk(x)), cos, sin)

    def scores(self, x: torch.Tensor, q_lat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Index scores [B, S, T] fp32 of this step's queries against every cached key (keys [B, T, D]);
        mask: the causal mask [S, T] (or [B, S, T]), added."""
        B, S, _ = x.shape
        q = self.wq_b(q_lat).unflatten(-1, (self.n_heads, self.head_dim))  # [B, S, Hi, D]
        q = self._rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))  # cos [S, 1, rope/2] broadcast over heads
        w = self.weights_proj(x).float() * self.n_heads ** -0.5  # [B, S, Hi]
        return weighted_relu_scores(q, keys, w, self.softmax_scale) + mask  # [B, S, T]

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """The top min(index_topk, T) key ids per query [B, S, k] (int64); equal scores go to the lower key id.

        Ties are common: a key that every head's ReLU zeroes scores exactly 0 (with 2 indexer heads a
        quarter of the keys do). torch.topk breaks ties arbitrarily, and differently for a prefill row
        over T keys and a decode row over the same keys, so cached decode would disagree with a full
        forward; a stable sort keeps the lower id, and prefill and decode select alike. A stable sort does not
        export, and ONNX TopK's own rule (equal values: the lower index first) is not kept by every kernel
        (ORT's CUDA EP breaks it), so an exported graph selects with tie_exact_top_ids: the same set, by TopK
        whatever its tie order."""
        return top_ids(scores, min(self.topk, scores.shape[-1]))

    @staticmethod
    def sparse_mask(ids: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
        """Additive mask [B, 1, S, T] for attention: 0 at the selected keys that the causal `mask` allows,
        -inf elsewhere (a query with fewer than index_topk visible keys selects some invisible ones)."""
        B, S, _ = ids.shape
        chosen = torch.zeros(B, S, length, dtype=torch.bool, device=ids.device).scatter(-1, ids, True)
        return torch.where(chosen, mask, float("-inf")).unsqueeze(1)

    def forward(self, x, q_lat, cos, sin, mask, past_keys: torch.Tensor):
        """-> (sparse additive mask [B, 1, S, T], present keys [B, T, D]): past_keys with this step's rows appended."""
        keys = torch.cat([past_keys, self.key(x, cos, sin)], dim=1)
        ids = self.select(self.scores(x, q_lat, cos, sin, keys, mask))
        return self.sparse_mask(ids, mask, keys.shape[1]), keys
