"""The DeepSeek-V3.2 family (config.json model_type deepseek_v32): MLA + DeepSeekMoE as V3, with the lightning
indexer's top-k sparse attention (v32.py, indexer.py). Cache layouts as MLA's (latent, expanded), each with the
indexer key cache beside MLA's tensors (v32.cache_spec).

Built so far: config, reference module, checkpoint I/O (V3's loader with this family's config and module),
presets, and its graph passes (issue 17 item 2): latent-kv-fusion recognises the indexer's top-k mask and
rewrites the decode graph to absorbed attention over the gathered top-k latent rows (passes/latent_kv_fusion.py,
form "topk-gather"); the MoE is V3's module (models/moe.py), so V3's MoE lowering and ORT simplification apply
as they are. Its fixed-shape step (v32_static.py: the indexer over the fixed-length key cache, absorbed MLA over the
Gather'ed top-k latent rows) gives the static graphs of the ascend target and ort-cuda's decode gears.
"""
from __future__ import annotations

import functools

from .checkpoint import load_checkpoint, save_checkpoint
from . import v32_static
from .family import Family, StaticStep
from .v32 import CACHE_LAYOUTS, DeepseekV32ForCausalLM, cache_spec
from .v32_config import V32_MODEL_TYPES, DeepseekV32Config
from .v32_presets import PRESETS, build_preset, preset_config

V32_FAMILY = Family(
    name="v32",
    model_types=V32_MODEL_TYPES,
    config_from_json=DeepseekV32Config.from_json,
    module=DeepseekV32ForCausalLM,
    load_checkpoint=functools.partial(load_checkpoint, config_cls=DeepseekV32Config, model_cls=DeepseekV32ForCausalLM),
    save_checkpoint=save_checkpoint,
    presets=PRESETS,
    preset_config=preset_config,
    build_preset=build_preset,
    cache_layouts=CACHE_LAYOUTS,
    cache_spec=cache_spec,
    passes=("latent-kv-fusion", "moe-ort-fused", "ort-simplify"),
    static_step=StaticStep(v32_static.LAYOUT, v32_static.constants, v32_static.attention, v32_static.modules),
)
