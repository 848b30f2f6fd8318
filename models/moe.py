"""DeepSeekMoE: the router (gate) and routed + shared SwiGLU experts.

Written without data-dependent Python branching so torch.onnx.export (dynamo) can trace it: the
expert loop uses torch.where + index_add (REFERENCE.md section 2), which exports as
NonZero / Gather / ScatterND-add. Graph passes lower this "dynamic" form for other targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeepseekConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers, each expert and the shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Checkpoint name `mlp.gate`. Returns (weights [N, k] fp32, expert ids [N, k] int64)."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.has_e_score_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            grouped = choice.unflatten(-1, (cfg.n_group, -1))
            if cfg.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:  # group_limited_greedy
                group_scores = grouped.amax(dim=-1)
            group_idx = group_scores.topk(cfg.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores).scatter(1, group_idx, 1.0).bool()
            keep = keep.unsqueeze(-1).expand_as(grouped).flatten(-2)
            choice = choice.masked_fill(~keep, float("-inf"))
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, idx


class MoE(nn.Module):
    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """sum_k w_k * expert_{idx_k}(x) for x [N, hidden], looping over experts (dynamic form)."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)
            y = expert(x[token]) * weights[token, slot].unsqueeze(-1).to(x.dtype)
            out = out.index_add(0, token, y)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx = self.gate(flat)
        out = self.routed(flat, weights, idx)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)
