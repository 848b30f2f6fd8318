"""The DeepSeek-V4 family (config.json model_type deepseek_v4): shared-KV MQA over a sliding window with CSA /
HCA compressed entries, mHC residual streams, hash / top-k MoE (v4*.py). One cache layout, "compressed"
(v4_cache.py: per-layer tensors, each with its own length rule).

Built so far: config, reference module with the explicit-state step, checkpoint loading from any V4 naming
(native FP8 / FP4, transformers' names, save_pretrained's layout: v4_hf_checkpoint.load_checkpoint over
v4_checkpoint's reader), a transformers-format writer, presets, cache spec. Not yet: graph passes and a
fixed-shape step, so `passes` is empty and `static_step` None.
"""
from __future__ import annotations

from .family import Family
from .v4 import DeepseekV4ForCausalLM
from .v4_cache import CACHE_LAYOUTS, cache_spec
from .v4_config import V4_MODEL_TYPES, DeepseekV4Config
from .v4_hf_checkpoint import load_checkpoint, save_checkpoint
from .v4_presets import PRESETS, build_preset, preset_config

V4_FAMILY = Family(
    name="v4",
    model_types=V4_MODEL_TYPES,
    config_from_json=DeepseekV4Config.from_json,
    module=DeepseekV4ForCausalLM,
    load_checkpoint=load_checkpoint,
    save_checkpoint=save_checkpoint,
    presets=PRESETS,
    preset_config=preset_config,
    build_preset=build_preset,
    cache_layouts=CACHE_LAYOUTS,
    cache_spec=cache_spec,
    passes=(),
    static_step=None,
)
