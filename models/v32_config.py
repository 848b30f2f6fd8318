"""DeepSeek-V3.2 configuration (config.json model_type deepseek_v32): DeepSeek-V3's fields plus the lightning
indexer's, as transformers 5.24's DeepseekV32Config has them.

    index_n_heads   indexer query heads (64)
    index_head_dim  width of an indexer query head and of the one indexer key per token (128)
    index_topk      keys each query attends to (2048)

transformers' V3.2 fixes what V3 leaves to the config: the router is always sigmoid + noaux_tc with
e_score_correction_bias, the q path always has q_lora_rank (the indexer reads the q latent), every layer is
indexed attention, and the dense layers are the first `first_k_dense_replace`. A config.json saying otherwise
is refused with the field and value named.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .config import DeepseekConfig, _is_kind
from .errors import ConfigError

V32_MODEL_TYPES = ("deepseek_v32",)
INDEXER_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")


@dataclasses.dataclass
class DeepseekV32Config(DeepseekConfig):
    model_types: ClassVar[tuple[str, ...]] = V32_MODEL_TYPES
    checkpoint_kind: ClassVar[str] = "a DeepSeek-V3.2 checkpoint"

    model_type: str = "deepseek_v32"
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048

    @property
    def indexer_cache_width(self) -> int:
        """Values the indexer caches per token per layer (one key)."""
        return self.index_head_dim

    def validate(self, source: str = "config") -> "DeepseekV32Config":
        def bad(field: str, value: Any, why: str) -> ConfigError:
            return ConfigError(f"{source}: field '{field}' = {value!r} is invalid: {why}")

        for name in INDEXER_FIELDS:
            v = getattr(self, name)
            if not _is_kind(v, "int") or v <= 0:
                raise bad(name, v, "must be a positive integer")
        super().validate(source)
        if self.q_lora_rank is None:
            raise bad("q_lora_rank", None, "DeepSeek-V3.2 needs a q latent (the lightning indexer reads "
                      "q_a_layernorm(q_a_proj(x))); transformers' DeepseekV32 has no plain q_proj form")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise bad("index_head_dim", self.index_head_dim, f"the indexer rotates its first qk_rope_head_dim="
                      f"{self.qk_rope_head_dim} dims, so index_head_dim must be at least that")
        if self.scoring_func != "sigmoid":
            raise bad("scoring_func", self.scoring_func, "DeepSeek-V3.2's router is sigmoid (transformers' "
                      "DeepseekV32 has no other)")
        if self.topk_method != "noaux_tc":
            raise bad("topk_method", self.topk_method, "DeepSeek-V3.2's router is noaux_tc (transformers' "
                      "DeepseekV32 has no other)")
        return self

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "DeepseekV32Config":
        cfg = super().from_hf_dict(d, source)
        n, k = cfg.num_hidden_layers, cfg.first_k_dense_replace
        mlp_types = d.get("mlp_layer_types")
        if mlp_types is not None and list(mlp_types) != ["dense"] * min(k, n) + ["sparse"] * (n - min(k, n)):
            raise ConfigError(f"{source}: field 'mlp_layer_types' = {mlp_types!r} is not supported: the dense "
                              f"layers must be the first first_k_dense_replace={k} of num_hidden_layers={n}")
        layer_types = d.get("layer_types")
        if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != n
                                        or any(t != "indexed_attention" for t in layer_types)):
            raise ConfigError(f"{source}: field 'layer_types' = {layer_types!r} is not supported: DeepSeek-V3.2 "
                              f"has {n} layers of 'indexed_attention'")
        return cfg

    def to_hf_dict(self) -> dict:
        d = super().to_hf_dict()
        d["architectures"] = ["DeepseekV32ForCausalLM"]
        return d

    def param_count(self) -> int:
        Hi, D, h = self.index_n_heads, self.index_head_dim, self.hidden_size
        indexer = self.q_lora_rank * Hi * D + h * D + 2 * D + h * Hi
        return super().param_count() + self.num_hidden_layers * indexer
