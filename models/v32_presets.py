"""Built-in DeepSeek-V3.2 configurations with deterministic weights (presets.init_weights).

Head dims keep V3.2's ratios: kv_lora_rank : qk_rope_head_dim : index_head_dim = 512 : 64 : 128 and
index_n_heads = num_attention_heads / 2, so index_n_heads x index_head_dim is 1/9 of
num_attention_heads x (kv_lora_rank + qk_rope_head_dim) as in the real model (64 x 128 against 128 x 576).
index_topk is below the 8-token golden prompt, so the selection matters in every test and package.
Both have 8 indexer heads: a key every head's ReLU zeroes scores exactly 0, so with few heads (2: a quarter
of the keys) ties at the top-k boundary are common and the selection depends on how ties are broken
(indexer.py keeps the lower id, torch.topk in transformers does not say); with 8 heads 1 key in 256.

`tiny-v32`: CI. `small-v32`: V3's `small` with 16 heads and the indexer. `deepseek-v3.2`: the real dimensions
(DeepSeek-V3.2 / V3.2-Exp config.json), config only (never materialised).
"""
from __future__ import annotations

import dataclasses

from .errors import ConfigError
from .presets import _YARN_V3, init_weights
from .v32_config import DeepseekV32Config

PRESETS: dict[str, DeepseekV32Config] = {
    "tiny-v32": DeepseekV32Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=32, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        index_n_heads=8, index_head_dim=16, index_topk=4,
        rope_scaling={**_YARN_V3, "factor": 4.0, "original_max_position_embeddings": 256},
        max_position_embeddings=1024),
    "small-v32": DeepseekV32Config(
        vocab_size=8192, hidden_size=256, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=8,
        first_k_dense_replace=1, num_attention_heads=16, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, index_n_heads=8, index_head_dim=32, index_topk=6,
        rope_scaling=dict(_YARN_V3), max_position_embeddings=163840),
    "deepseek-v3.2": DeepseekV32Config(rope_scaling=dict(_YARN_V3)),
}
CONFIG_ONLY = ("deepseek-v3.2",)


def preset_config(name: str) -> DeepseekV32Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}: the DeepSeek-V3.2 presets are {', '.join(PRESETS)}")
    cfg = dataclasses.replace(PRESETS[name])
    cfg.rope_scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    return cfg.validate(f"preset {name}")


def build_preset(name: str, seed: int = 0, attention: str = "naive"):
    from .checkpoint import empty_model
    from .v32 import DeepseekV32ForCausalLM
    if name in CONFIG_ONLY:
        raise ConfigError(f"preset {name!r} has the real model's dimensions and is config-only (never "
                          "materialised here); use it with `mlamoe plan`/`inspect`, or load a checkpoint folder")
    model = empty_model(preset_config(name), attention, DeepseekV32ForCausalLM)
    init_weights(model, seed)
    return model.eval()
