"""The MLA family: DeepSeek-V2 and V3/R1 (config.json model_type deepseek_v2 / deepseek_v3).

Multi-head Latent Attention (mla.py) with dense MLP or DeepSeekMoE blocks (decoder.py, moe.py); the
cache is latent (c_kv, k_pe per layer) or expanded per head (mla.cache_spec); every graph pass applies;
the fixed-shape form is mla_static.py.
"""
from __future__ import annotations

from . import mla_static
from .checkpoint import load_checkpoint, save_checkpoint
from .config import MODEL_TYPES, DeepseekConfig
from .decoder import DeepseekForCausalLM
from .family import Family, StaticStep
from .mla import CACHE_LAYOUTS, cache_spec
from .presets import PRESETS, build_preset, preset_config

MLA_FAMILY = Family(
    name="mla",
    model_types=MODEL_TYPES,
    config_from_json=DeepseekConfig.from_json,
    module=DeepseekForCausalLM,
    load_checkpoint=load_checkpoint,
    save_checkpoint=save_checkpoint,
    presets=PRESETS,
    preset_config=preset_config,
    build_preset=build_preset,
    cache_layouts=CACHE_LAYOUTS,
    cache_spec=cache_spec,
    static_step=StaticStep(mla_static.LAYOUT, mla_static.constants, mla_static.attention),
)
