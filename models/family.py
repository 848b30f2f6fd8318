"""Model families: what the compiler needs of each (config, reference module, checkpoint I/O, presets,
cache spec, which graph passes apply, its fixed-shape form), looked up by config.json's model_type.

    register(family)            add a family (models/__init__.py registers the built-in ones)
    family_for(model_type)      the family reading that model_type
    family_of(model)            the family of an eager model (by its config's model_type)
    checkpoint_family(folder)   the family of a checkpoint folder (reads config.json's model_type)
    preset_family(name)         the family holding a preset
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from .cache import CacheSpec
from .errors import CheckpointError, ConfigError


@dataclasses.dataclass(frozen=True)
class StaticStep:
    """A family's fixed-shape attention step (static graphs, e.g. for ATC): the cache in `layout` with
    its growing axis fixed to M; a step at `position` overwrites rows position .. position+S-1.

    constants(attention module) -> {name: tensor} precomputed per layer from its weights;
    modules(attention module) -> {name: torch module} per layer (a family's own fp32 islands, so that their nodes
    carry the module's scope in their names; None: none);
    attention(module, x, cos, sin, mask, write, covered, past, const, softmax) -> (out, present), where
    const(name) gives this layer's constant or module by name."""

    layout: str
    constants: Callable[[Any], dict]
    attention: Callable[..., tuple]
    modules: Callable[[Any], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    """What the compiler asks of a model family.

    Its config has model_type, vocab_size, num_hidden_layers, max_position_embeddings, to_hf_dict() and
    param_count(); its eager model has config, attention (the form's name), cache_spec(layout),
    empty_cache(batch, layout) and step(input_ids, past, layout) -> (logits, present), the cache a list
    of per-layer tuples in the spec's order."""

    name: str
    model_types: tuple[str, ...]  # config.json model_type values it reads
    config_from_json: Callable[[Path], Any]  # config.json -> validated config
    module: Callable[[Any, str], Any]  # (config, attention form) -> the reference module
    load_checkpoint: Callable[[Path, str], Any]  # (folder, attention form) -> eval-mode model
    save_checkpoint: Callable[..., Path] | None  # (model, folder, **options) -> folder
    presets: Mapping[str, Any]  # name -> config
    preset_config: Callable[[str], Any]
    build_preset: Callable[[str, int, str], Any]  # (name, seed, attention form) -> eval-mode model
    cache_layouts: tuple[str, ...]  # the first is the default
    cache_spec: Callable[[Any, str], CacheSpec]  # (config, layout) -> spec
    passes: tuple[str, ...] | None = None  # the graph passes that apply (None: every pass)
    static_step: StaticStep | None = None
    pass_notes: Mapping[str, str] = dataclasses.field(default_factory=dict)  # pass -> why it does not apply
    no_static_step: str = ""  # why there is no static_step (said by targets that need one)
    target_notes: Mapping[str, str] = dataclasses.field(default_factory=dict)  # target -> why it is refused
    quant_schemes: tuple[str, ...] | None = None  # the --quant schemes built for it (None: every one)
    quant_note: str = ""  # why the others are not
    quant_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)  # scheme -> its options

    def applies(self, pass_name: str) -> bool:
        return self.passes is None or pass_name in self.passes

    def why_not(self, pass_name: str) -> str:
        """Why a pass that does not apply is left out (pass_notes, or a plain statement)."""
        return self.pass_notes.get(pass_name, f"model family {self.name!r} does not list it among its passes")

    def describe(self) -> str:
        return f"{self.name} (model_type {', '.join(self.model_types)})"

    def __repr__(self) -> str:
        return f"Family({self.describe()})"


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family; a model_type or preset another family already reads is refused."""
    for other in FAMILIES.values():
        if other.name == family.name:
            continue
        clash = set(other.model_types) & set(family.model_types) or set(other.presets) & set(family.presets)
        if clash:
            raise ConfigError(f"model family {family.name!r}: {', '.join(sorted(clash))} already belong(s) to "
                              f"family {other.name!r}")
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    FAMILIES.pop(name, None)


def _known() -> str:
    return "; ".join(f.describe() for f in FAMILIES.values()) or "none"


def family_for(model_type: Any, source: str = "config") -> Family:
    for f in FAMILIES.values():
        if model_type in f.model_types:
            return f
    raise ConfigError(f"{source}: field 'model_type' = {model_type!r} names no model family this compiler "
                      f"knows; families: {_known()}")


def family_of(model) -> Family:
    return family_for(model.config.model_type, f"model {type(model).__name__}")


def read_config_json(path: Path) -> dict:
    """config.json as a dict, or a ConfigError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; a Hugging Face checkpoint folder needs config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); config.json is damaged, "
                          "copy it again from the checkpoint") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def checkpoint_family(folder: Path) -> Family:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected config.json + *.safetensors)")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json; a Hugging Face checkpoint folder needs config.json "
                              "beside its safetensors files")
    path = folder / "config.json"
    return family_for(read_config_json(path).get("model_type"), str(path))


def preset_family(name: str) -> Family:
    for f in FAMILIES.values():
        if name in f.presets:
            return f
    names = [p for f in FAMILIES.values() for p in f.presets]
    raise ConfigError(f"unknown model preset {name!r}: choose one of {', '.join(names)} or give a checkpoint folder")
