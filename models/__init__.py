"""Reference models in PyTorch, one family per architecture, and their Hugging Face checkpoint I/O.

Public API:
    models.load(path_or_preset, seed=0, attention="naive") -> eval-mode model of the family that config.json's
                                                              model_type (or the preset) names
    models.save(model, dir, fp8=False, max_shard_bytes=None) -> Path
    models.family_of(model) / family_for(model_type) -> Family (models/family.py)
"""
from __future__ import annotations

import os
from pathlib import Path

from .cache import CacheSpec, CacheTensor
from .checkpoint import CheckpointSource
from .config import DeepseekConfig
from .decoder import DeepseekForCausalLM
from .errors import CheckpointError, ConfigError, MlamoeError
from .family import FAMILIES, Family, checkpoint_family, family_for, family_of, preset_family, register
from .generation import greedy_generate
from .mla_family import MLA_FAMILY
from .presets import CONFIG_ONLY, PRESETS, preset_config
from .v32_family import V32_FAMILY
from .v4_family import V4_FAMILY

register(MLA_FAMILY)
register(V32_FAMILY)
register(V4_FAMILY)

__all__ = ["load", "resolve", "TRAINED_SMALL", "save", "load_config", "DeepseekConfig", "DeepseekForCausalLM", "greedy_generate",
           "PRESETS", "CONFIG_ONLY", "MlamoeError", "ConfigError", "CheckpointError", "CheckpointSource",
           "Family", "FAMILIES", "register", "family_for", "family_of", "CacheSpec", "CacheTensor"]


TRAINED_SMALL = Path(__file__).resolve().parent / "trained" / "trained-small"
"""The checkpoint shipped in the repository whose outputs mean something (trained by models/train_small.py):
the default model of `mlamoe compile` and `make compile`, named "trained-small"."""


def resolve(path_or_preset: str | os.PathLike) -> str | os.PathLike:
    """"trained-small" (unless a folder of that name exists here) -> the shipped checkpoint folder."""
    if str(path_or_preset) == "trained-small" and not Path(path_or_preset).exists():
        return str(TRAINED_SMALL)
    return path_or_preset


def load(path_or_preset: str | os.PathLike, seed: int = 0, attention: str = "naive"):
    """A preset name, "trained-small" or a Hugging Face checkpoint folder -> eval-mode model (fp32) of the
    family its config.json's model_type (or the preset) belongs to."""
    path_or_preset = resolve(path_or_preset)
    p = Path(path_or_preset)
    if p.is_dir() or os.sep in str(path_or_preset) or (p.exists()):
        return checkpoint_family(p).load_checkpoint(p, attention)
    name = str(path_or_preset)
    return preset_family(name).build_preset(name, seed, attention)


def load_config(path_or_preset: str | os.PathLike):
    """Config alone (works for the config-only presets and never reads weights)."""
    path_or_preset = resolve(path_or_preset)
    p = Path(path_or_preset)
    if p.is_dir() or os.sep in str(path_or_preset) or p.exists():  # a path, as load() tells one from a preset name
        if p.is_dir() and not (p / "config.json").is_file():
            raise CheckpointError(f"{p}: no config.json; a Hugging Face checkpoint folder needs config.json")
        return checkpoint_family(p).config_from_json(p / "config.json")
    name = str(path_or_preset)
    return preset_family(name).preset_config(name)


def save(model, path: str | os.PathLike, **kw) -> Path:
    family = family_of(model)
    if family.save_checkpoint is None:
        raise ConfigError(f"model family {family.name!r} has no checkpoint format to save to")
    return family.save_checkpoint(model, path, **kw)
