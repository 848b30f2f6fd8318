"""DeepSeek-V4's MoE block: routed experts (packed SwiGLU weights) plus one shared expert, every layer.

    scores  = score_fn(x @ gate.weight^T)     sqrtsoftplus (sqrt(softplus)), softmax or sigmoid
    choice  = top-k of scores + e_score_correction_bias          ("moe" layers; the bias picks, never weighs)
            = tid2eid[input_id]                                  ("hash_moe" layers: a frozen token -> experts table)
    weights = scores[choice] / sum(scores[choice]) * routed_scaling_factor
    out     = sum_k weights_k * expert_k(x) + shared_expert(x)

SwiGLU with swiglu_limit on routed AND shared experts (as transformers): gate clamped above, up on both sides.
Checkpoint names: mlp.gate.weight, mlp.gate.e_score_correction_bias | mlp.gate.tid2eid, mlp.experts.gate_up_proj
[E, 2I, H] (gate rows first), mlp.experts.down_proj [E, H, I], mlp.shared_experts.{gate,up,down}_proj.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCORE_FNS = {"sqrtsoftplus": lambda x: torch.sqrt(F.softplus(x)), "softmax": lambda x: torch.softmax(x, dim=-1),
             "sigmoid": torch.sigmoid}


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


class Router(nn.Module):
    def __init__(self, cfg, hashed: bool):
        super().__init__()
        self.hashed, self.top_k, self.scaling = hashed, cfg.num_experts_per_tok, cfg.routed_scaling_factor
        self.score_fn = SCORE_FNS[cfg.scoring_func]
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H], input_ids [N] -> (weights [N, k], expert ids [N, k])."""
        scores = self.score_fn(x.float() @ self.weight.float().T)
        if self.hashed:
            ids = self.tid2eid[input_ids].long()
        else:
            ids = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1).indices
        w = scores.gather(1, ids)
        return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling, ids


class Experts(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E, I, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.limit = cfg.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by its routing weight (0 where not chosen): the eager reference;
        graph passes lower it to a gather or a fused MoE op."""
        out = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            w = (weights * (ids == e)).sum(dim=-1, keepdim=True)  # [N, 1]
            gate, up = (x @ self.gate_up_proj[e].T).chunk(2, dim=-1)
            out = out + w * (swiglu(gate, up, self.limit) @ self.down_proj[e].T)
        return out


class SharedExpert(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, I = cfg.hidden_size, cfg.moe_intermediate_size
        self.limit = cfg.swiglu_limit
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class V4MoE(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.gate = Router(cfg, cfg.mlp_layer_types[layer_idx] == "hash_moe")
        self.experts = Experts(cfg)
        self.shared_experts = SharedExpert(cfg)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(flat, input_ids.reshape(-1))
        return self.experts(flat, weights, ids).view_as(x) + self.shared_experts(x)
