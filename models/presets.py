"""Built-in model configurations with deterministic weights.

`tiny`, `tiny-v2`: CI models. `small`: the default model of `make compile`. `medium`: benchmarks.
`deepseek-v3-671b`, `deepseek-v2-lite`: the real dimensions, config only (never materialised).
"""
from __future__ import annotations

import math

import torch

from .config import DeepseekConfig
from .errors import ConfigError

_YARN_V3 = {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
_YARN_V2_LITE = {**_YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707}

PRESETS: dict[str, DeepseekConfig] = {
    "tiny": DeepseekConfig(
        model_type="deepseek_v3", vocab_size=256, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        scoring_func="sigmoid", topk_method="noaux_tc", routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        rope_scaling={**_YARN_V3, "factor": 4.0, "original_max_position_embeddings": 256},
        max_position_embeddings=1024),
    "tiny-v2": DeepseekConfig(
        model_type="deepseek_v2", vocab_size=256, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, n_group=1, topk_group=1,
        scoring_func="softmax", topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        rope_scaling={**_YARN_V2_LITE, "factor": 4.0, "original_max_position_embeddings": 256},
        max_position_embeddings=1024),
    "small": DeepseekConfig(
        model_type="deepseek_v3", vocab_size=8192, hidden_size=256, intermediate_size=1024,
        moe_intermediate_size=256, num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        rope_scaling=dict(_YARN_V3), max_position_embeddings=163840),
    "medium": DeepseekConfig(
        model_type="deepseek_v3", vocab_size=16384, hidden_size=1024, intermediate_size=2816,
        moe_intermediate_size=512, num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=16,
        n_routed_experts=24, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        rope_scaling=dict(_YARN_V3), max_position_embeddings=163840),
    "deepseek-v3-671b": DeepseekConfig(rope_scaling=dict(_YARN_V3)),
    "deepseek-v2-lite": DeepseekConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        scoring_func="softmax", topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
        q_lora_rank=None, rope_scaling=dict(_YARN_V2_LITE)),
}
CONFIG_ONLY = ("deepseek-v3-671b", "deepseek-v2-lite")


def preset_config(name: str) -> DeepseekConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)} "
                          "or give a checkpoint folder")
    import dataclasses
    cfg = dataclasses.replace(PRESETS[name])
    cfg.rope_scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    return cfg.validate(f"preset {name}")


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic weights from a seed, independent of module construction order.

    Linear weights ~ N(0, 1/fan_in) so activations and logits keep unit scale (clear greedy margins);
    norm weights near 1; a non-zero e_score_correction_bias so routing bias is exercised.
    """
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for name in sorted(state):
        t = state[name]
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
        elif name.endswith("e_score_correction_bias"):
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
        elif name.endswith("embed_tokens.weight"):
            t.copy_(torch.randn(t.shape, generator=g))
        else:
            t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1]))


def build_preset(name: str, seed: int = 0, attention: str = "naive"):
    from .checkpoint import empty_model
    if name in CONFIG_ONLY:
        raise ConfigError(f"preset {name!r} has the real model's dimensions and is config-only (never "
                          "materialised here); use it with `mlamoe plan`/`inspect`, or load a checkpoint folder")
    model = empty_model(preset_config(name), attention)
    init_weights(model, seed)
    return model.eval()
