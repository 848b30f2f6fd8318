"""Tiny random transformers DeepSeek models: the independent reference (built offline)."""
from __future__ import annotations

import torch


def hf_config(kind: str = "v3", **over):
    from transformers import DeepseekV2Config, DeepseekV3Config
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                  num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                  n_routed_experts=8, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  max_position_embeddings=256, tie_word_embeddings=False)
    if kind == "v3":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
        kw = dict(common, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, q_lora_rank=24,
                  routed_scaling_factor=2.5, norm_topk_prob=True, rope_parameters=rope)
        kw.update(over)
        return DeepseekV3Config(**kw)
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    kw = dict(common, n_shared_experts=2, num_experts_per_tok=3, q_lora_rank=None, topk_method="greedy",
              routed_scaling_factor=1.0, norm_topk_prob=False, rope_parameters=rope)
    kw.update(over)
    return DeepseekV2Config(**kw)


def hf_model(kind: str = "v3", seed: int = 0, **over):
    """A random transformers model with non-zero e_score_correction_bias and unit-scale weights."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
    torch.manual_seed(seed)
    cfg = hf_config(kind, **over)
    cls = DeepseekV3ForCausalLM if kind == "v3" else DeepseekV2ForCausalLM
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("norm.weight"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            elif t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5)
    return model


@torch.no_grad()
def hf_logits_with_cache(model, prompt: torch.Tensor, continuation: torch.Tensor):
    """Prefill `prompt`, then feed `continuation` one token at a time with the model's cache.

    Returns (prefill logits [B, S, V], decode logits [B, N, V]).
    """
    out = model(input_ids=prompt, use_cache=True)
    cache, steps = out.past_key_values, []
    for i in range(continuation.shape[1]):
        o = model(input_ids=continuation[:, i:i + 1], cache=cache, use_cache=True)
        cache = o.past_key_values
        steps.append(o.logits[:, -1])
    return out.logits, torch.stack(steps, dim=1)
