"""Built-in DeepSeek-V4 configurations with deterministic weights (init_weights).

`tiny-v4` (CI): every layer type (sliding, CSA with m = 4, HCA with m = 8) and both MLP types (2 hash_moe
layers), sliding_window 8 and index_topk 3, so a 20-40 token prompt crosses windows and the indexer drops
entries. `small-v4` (benchmarks, ~30M parameters). `deepseek-v4-flash` / `deepseek-v4-pro`: the real
dimensions, config only (never materialised).

Known for both real models (transformers 5.24's DeepseekV4Config and its docstrings, REFERENCE.md): layers,
hidden, heads (64 / 128), one KV head, head_dim 512 with 64 rope dims, o_groups (8 / 16) x o_lora_rank 1024,
experts (256 / 384) top-6 with one shared, index_topk (512 / 1024), sliding_window 128, m = 4 / 128,
hc_mult 4, vocab 129280, max_position_embeddings 2^20. Not known here for V4-Pro (transformers' defaults,
which are V4-Flash's, are used; a real checkpoint's config.json overrides them): q_lora_rank,
moe_intermediate_size, index_n_heads / index_head_dim, num_hash_layers, the compress rope's YaRN factor and
the per-layer schedule (compress_ratios). Both use transformers' default schedule (2 HCA, then CSA / HCA
alternating) and YaRN factor 16 over 65536 original positions for the compress rope (transformers' comment:
"compress layers use theta=compress_rope_theta (160000) with yarn factor=16"; original_max_position_embeddings
65536 = 2^20 / 16 is inferred, not read from a checkpoint). With those stand-ins param_count() gives V4-Flash
~284B (the published figure) but V4-Pro ~1.05T against the published ~1.6T: Pro's unknown widths are larger.
"""
from __future__ import annotations

import copy
import math

import torch

from .errors import ConfigError
from .v4_config import CSA, HCA, SLIDING, DeepseekV4Config

_RATES = {CSA: 4, HCA: 8}
_YARN_V4 = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536, "beta_fast": 32,
            "beta_slow": 1}

PRESETS: dict[str, DeepseekV4Config] = {
    "tiny-v4": DeepseekV4Config(
        vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=5, num_attention_heads=4,
        head_dim=32, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=8, partial_rotary_factor=0.25,
        layer_types=[SLIDING, CSA, HCA, CSA, HCA], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"],
        compress_rates=dict(_RATES), hc_mult=4, hc_sinkhorn_iters=20, sliding_window=8, o_groups=2, o_lora_rank=16,
        index_n_heads=8, index_head_dim=16, index_topk=3, max_position_embeddings=4096,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                      "beta_slow": 1}),
    "small-v4": DeepseekV4Config(
        vocab_size=8192, hidden_size=256, moe_intermediate_size=256, num_hidden_layers=8, num_attention_heads=8,
        head_dim=64, q_lora_rank=128, num_experts_per_tok=4, n_routed_experts=16, partial_rotary_factor=0.25,
        layer_types=[SLIDING, HCA, CSA, HCA, CSA, HCA, CSA, HCA], mlp_layer_types=["hash_moe"] * 2 + ["moe"] * 6,
        compress_rates={CSA: 4, HCA: 32}, sliding_window=64, o_groups=4, o_lora_rank=64, index_n_heads=8,
        index_head_dim=32, index_topk=16, max_position_embeddings=65536,
        rope_scaling={**_YARN_V4, "factor": 4.0, "original_max_position_embeddings": 16384}),
    "deepseek-v4-flash": DeepseekV4Config(rope_scaling=dict(_YARN_V4)),
    "deepseek-v4-pro": DeepseekV4Config(num_hidden_layers=61, hidden_size=7168, num_attention_heads=128, o_groups=16,
                                        n_routed_experts=384, index_topk=1024, rope_scaling=dict(_YARN_V4)),
}
CONFIG_ONLY = ("deepseek-v4-flash", "deepseek-v4-pro")


def preset_config(name: str) -> DeepseekV4Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}: the DeepSeek-V4 presets are {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name]).validate(f"preset {name}")


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic weights from a seed: matrices ~ N(0, 1/fan_in), norms near 1, non-zero sinks, routing
    bias, position biases and mHC biases, a random tid2eid table (distinct experts per token)."""
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    E = model.config.n_routed_experts
    for name in sorted(state):
        t = state[name]
        if name.endswith("tid2eid"):
            t.copy_(torch.stack([torch.randperm(E, generator=g)[:t.shape[1]] for _ in range(t.shape[0])]))
        elif name.endswith("norm.weight"):
            t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
        elif name.endswith("embed_tokens.weight"):
            t.copy_(torch.randn(t.shape, generator=g))
        elif name.endswith("scale") and t.dim() == 1:  # mHC scales
            t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
        elif t.dim() < 2 or name.endswith("position_bias"):  # sinks, biases, e_score_correction_bias
            t.copy_(0.3 * torch.randn(t.shape, generator=g))
        else:
            t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1]))


def build_preset(name: str, seed: int = 0, attention: str = "naive"):
    from .v4_hf_checkpoint import empty_model
    if name in CONFIG_ONLY:
        raise ConfigError(f"preset {name!r} has the real model's dimensions and is config-only (never "
                          "materialised here); use it with `mlamoe plan`/`inspect`, or load a checkpoint folder")
    model = empty_model(preset_config(name), attention)
    init_weights(model, seed)
    return model.eval()
