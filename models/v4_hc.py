"""Manifold-constrained hyper-connections (mHC) of DeepSeek-V4: the residual is hc_mult streams [B, S, N, D].

Per block (attention, then MLP) one HyperConnection reads the streams and gives three weights from a projection
of the RMS-normed flattened streams (pre [N], post [N], comb [N, N]):

    collapsed = sum_n pre[n] * streams[n]                       the block's input [B, S, D]
    out[k]    = post[k] * block(collapsed) + sum_j comb[j, k] * streams[j]

comb is pushed towards doubly stochastic by hc_sinkhorn_iters Sinkhorn-Knopp steps (columns first, then rows
and columns alternately). comb is not symmetric: the sum runs over its FIRST axis (comb^T @ streams).
HyperHead collapses the streams once more (pre weights only) before the final norm.
Checkpoint names: layers.N.attn_hc / ffn_hc .{fn, base, scale}; model.hc_head.{hc_fn, hc_base, hc_scale}.
"""
from __future__ import annotations

import torch
from torch import nn


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Alternate column (axis -2) and row (axis -1) normalisation, columns first and last."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class HyperConnection(nn.Module):
    def __init__(self, hc_mult: int, hidden_size: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.n, self.iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, hc_eps, norm_eps
        self.fn = nn.Parameter(torch.empty((2 + hc_mult) * hc_mult, hc_mult * hidden_size))
        self.base = nn.Parameter(torch.empty((2 + hc_mult) * hc_mult))
        self.scale = nn.Parameter(torch.empty(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [B, S, N, D] -> (post [B, S, N], comb [B, S, N, N], collapsed [B, S, D])."""
        n = self.n
        mixes = unweighted_rms_norm(streams.flatten(2).float(), self.norm_eps) @ self.fn.float().T
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * comb_s + comb_b.view(n, n), dim=-1) + self.hc_eps
        comb = sinkhorn(comb, self.iters, self.hc_eps)
        return post, comb, (pre.unsqueeze(-1) * streams).sum(dim=2)

    @staticmethod
    def merge(post: torch.Tensor, comb: torch.Tensor, block_out: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
        """out[k] = post[k] * block_out + sum_j comb[j, k] streams[j]."""
        return post.unsqueeze(-1) * block_out.unsqueeze(-2) + comb.transpose(-1, -2) @ streams


class HyperHead(nn.Module):
    def __init__(self, hc_mult: int, hidden_size: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size))
        self.hc_base = nn.Parameter(torch.empty(hc_mult))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mixes = unweighted_rms_norm(streams.flatten(2).float(), self.norm_eps) @ self.hc_fn.float().T
        pre = torch.sigmoid(mixes * self.hc_scale + self.hc_base) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=2)
