"""DeepSeek-V4 configuration (config.json model_type deepseek_v4), with transformers 5.24's DeepseekV4Config
field names and the legacy fields the released checkpoints ship, folded in as transformers folds them:

    compress_ratios [0|4|128 per layer]   -> layer_types (sliding_attention / compressed_sparse_attention /
                                             heavily_compressed_attention)
    compress_rate_csa, compress_rate_hca  -> compress_rates
    num_hash_layers                       -> mlp_layer_types (the first N hash_moe, then moe)
    qk_rope_head_dim                      -> partial_rotary_factor = qk_rope_head_dim / head_dim
    rope_scaling (YaRN)                   -> rope_parameters["compress"]; rope_parameters["main"] is plain RoPE

RoPE: sliding layers rotate with theta rope_theta, no scaling ("main"); CSA/HCA layers and their compressors
with theta compress_rope_theta and YaRN when given ("compress", attention_factor 1: cos/sin unscaled).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar

from .config import _is_kind
from .errors import ConfigError
from .family import read_config_json

V4_MODEL_TYPES = ("deepseek_v4",)
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
COMPRESS_RATIO_TO_LAYER_TYPE = {0: SLIDING, 4: CSA, 128: HCA}
MLP_LAYER_TYPES = ("hash_moe", "moe")
SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")

_INT_FIELDS = ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "q_lora_rank", "num_experts_per_tok", "n_routed_experts",
               "n_shared_experts", "max_position_embeddings", "hc_mult", "hc_sinkhorn_iters", "sliding_window",
               "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk")
_NUMBER_FIELDS = ("routed_scaling_factor", "rope_theta", "compress_rope_theta", "hc_eps", "swiglu_limit",
                  "rms_norm_eps", "partial_rotary_factor")


@dataclasses.dataclass
class DeepseekV4Config:
    model_types: ClassVar[tuple[str, ...]] = V4_MODEL_TYPES
    checkpoint_kind: ClassVar[str] = "a DeepSeek-V4 checkpoint"

    model_type: str = "deepseek_v4"
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    q_lora_rank: int = 1024
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    layer_types: list | None = None
    compress_rates: dict | None = None
    mlp_layer_types: list | None = None
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_nextn_predict_layers: int = 1
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    partial_rotary_factor: float = 64 / 512
    rope_scaling: dict | None = None  # YaRN of the compress rope (None: plain)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    quantization_config: dict | None = None

    def __post_init__(self):
        n = self.num_hidden_layers
        if self.compress_rates is None:
            self.compress_rates = {CSA: 4, HCA: 128}
        if self.layer_types is None and isinstance(n, int):  # transformers' default: 2 HCA, then CSA / HCA
            self.layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        if self.mlp_layer_types is None and isinstance(n, int):
            self.mlp_layer_types = ["hash_moe"] * min(n, 3) + ["moe"] * max(0, n - 3)
        if isinstance(self.rope_scaling, dict) and self.rope_scaling.get("rope_type") == "yarn":
            self.rope_scaling = {"attention_factor": 1.0, **self.rope_scaling}  # transformers forces it so

    # ---- derived ------------------------------------------------------------------------------------
    @property
    def qk_rope_head_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def csa_rate(self) -> int:
        return self.compress_rates[CSA]

    @property
    def hca_rate(self) -> int:
        return self.compress_rates[HCA]

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Every DeepSeek-V4 layer is MoE (hash_moe or moe); no dense layers."""
        return True

    def compress_rate(self, layer: int) -> int:
        """m of a compressor layer (0 for a sliding-only layer)."""
        return self.compress_rates.get(self.layer_types[layer], 0)

    @property
    def rope_parameters(self) -> dict:
        """transformers' nested form: {"main": plain theta rope_theta, "compress": theta compress_rope_theta,
        YaRN (attention_factor 1) when rope_scaling is set}."""
        main = {"rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": self.partial_rotary_factor}
        compress = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.compress_rope_theta,
                    "partial_rotary_factor": self.partial_rotary_factor}
        if compress["rope_type"] == "yarn":
            compress.setdefault("attention_factor", 1.0)
        return {"main": main, "compress": compress}

    @property
    def fp8(self) -> bool:
        return bool(self.quantization_config) and self.quantization_config.get("quant_method") == "fp8"

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self, source: str = "config") -> "DeepseekV4Config":
        def bad(field: str, value: Any, why: str) -> ConfigError:
            return ConfigError(f"{source}: field '{field}' = {value!r} is invalid: {why}")

        if self.model_type not in V4_MODEL_TYPES:
            raise bad("model_type", self.model_type, f"expected one of {V4_MODEL_TYPES} for {self.checkpoint_kind}")
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if not _is_kind(v, "int") or v <= 0:
                raise bad(name, v, "must be a positive integer")
        for name in _NUMBER_FIELDS:
            v = getattr(self, name)
            if not _is_kind(v, "number") or v <= 0:
                raise bad(name, v, "must be a positive finite number")
        n = self.num_hidden_layers
        if self.num_key_value_heads != 1:
            raise bad("num_key_value_heads", self.num_key_value_heads, "DeepSeek-V4 is shared-KV MQA: one KV head")
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", self.scoring_func, f"expected one of {', '.join(SCORING_FUNCS)}")
        if self.hidden_act != "silu":
            raise bad("hidden_act", self.hidden_act, "DeepSeek-V4's experts are SwiGLU (silu)")
        if self.n_shared_experts != 1:
            raise bad("n_shared_experts", self.n_shared_experts, "DeepSeek-V4 has exactly one shared expert")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", self.num_experts_per_tok,
                      f"cannot exceed n_routed_experts={self.n_routed_experts}")
        if not self.norm_topk_prob:
            raise bad("norm_topk_prob", self.norm_topk_prob, "transformers' DeepSeek-V4 router always normalizes "
                      "the top-k weights; set it to true")
        rope = self.qk_rope_head_dim
        if rope <= 0 or rope % 2 or rope > self.head_dim or not math.isclose(rope, self.head_dim * self.partial_rotary_factor):
            raise bad("partial_rotary_factor", self.partial_rotary_factor, f"head_dim={self.head_dim} x factor must "
                      "be an even number of rope dims no larger than head_dim (qk_rope_head_dim)")
        if self.index_head_dim < rope or self.index_head_dim % 2:
            raise bad("index_head_dim", self.index_head_dim, f"the indexer rotates its trailing {rope} dims: it must "
                      "be even and at least qk_rope_head_dim")
        if self.num_attention_heads % self.o_groups:
            raise bad("o_groups", self.o_groups, f"must divide num_attention_heads={self.num_attention_heads} (the "
                      "grouped output projection splits the heads into o_groups groups)")
        if self.num_attention_heads * self.head_dim % self.o_groups:
            raise bad("o_groups", self.o_groups, "must divide num_attention_heads x head_dim")
        for name, types, allowed in (("layer_types", self.layer_types, LAYER_TYPES),
                                     ("mlp_layer_types", self.mlp_layer_types, MLP_LAYER_TYPES)):
            if not isinstance(types, list) or len(types) != n:
                raise bad(name, types, f"must be a list of num_hidden_layers={n} entries")
            wrong = [t for t in types if t not in allowed]
            if wrong:
                raise bad(name, types, f"entry {wrong[0]!r} is not one of {', '.join(allowed)}")
        if not isinstance(self.compress_rates, dict) or set(self.compress_rates) != {CSA, HCA} or not all(
                _is_kind(v, "int") and v > 0 for v in self.compress_rates.values()):
            raise bad("compress_rates", self.compress_rates, f"must give a positive integer rate for {CSA} and {HCA}")
        if not any(t != SLIDING for t in self.layer_types):
            raise bad("layer_types", self.layer_types, "needs at least one compressed layer (CSA or HCA): the cache "
                      "reads the tokens seen from a compressor's state (v4_cache.py)")
        if self.sliding_window < 2:
            raise bad("sliding_window", self.sliding_window, "must be at least 2")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if not isinstance(rs, dict) or rs.get("rope_type", rs.get("type")) != "yarn":
                raise bad("rope_scaling", rs, "only YaRN (rope_type 'yarn') scales the compress rope")
            for key in ("factor", "original_max_position_embeddings"):
                if not _is_kind(rs.get(key), "number") or rs[key] <= 0:
                    raise bad(f"rope_scaling.{key}", rs.get(key), "YaRN needs a positive number")
            if rs.get("attention_factor", 1.0) != 1.0:
                raise bad("rope_scaling.attention_factor", rs["attention_factor"], "DeepSeek-V4 leaves cos/sin "
                          "unscaled (transformers forces attention_factor 1)")
        return self

    # ---- config.json ----------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "DeepseekV4Config":
        d = copy.deepcopy(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        n = d.get("num_hidden_layers", cls.num_hidden_layers)
        rates = dict(d.get("compress_rates") or {CSA: 4, HCA: 128})
        if "compress_rate_csa" in d:
            rates[CSA] = d["compress_rate_csa"]
        if "compress_rate_hca" in d:
            rates[HCA] = d["compress_rate_hca"]
        kw["compress_rates"] = rates
        if d.get("layer_types") is None and d.get("compress_ratios") is not None:
            ratios = d["compress_ratios"]
            if not isinstance(ratios, list) or any(r not in COMPRESS_RATIO_TO_LAYER_TYPE for r in ratios):
                raise ConfigError(f"{source}: field 'compress_ratios' = {ratios!r} is invalid: each entry must be "
                                  "0 (sliding), 4 (CSA) or 128 (HCA)")
            kw["layer_types"] = [COMPRESS_RATIO_TO_LAYER_TYPE[r] for r in ratios]
        if isinstance(kw.get("layer_types"), list) and isinstance(n, int):
            kw["layer_types"] = list(kw["layer_types"][:n])  # transformers keeps the first n (MTP layers beyond)
        if d.get("mlp_layer_types") is None and isinstance(n, int):
            h = d.get("num_hash_layers", 3)
            if not _is_kind(h, "int") or h < 0:
                raise ConfigError(f"{source}: field 'num_hash_layers' = {h!r} is invalid: must be a non-negative integer")
            kw["mlp_layer_types"] = ["hash_moe"] * min(n, h) + ["moe"] * max(0, n - h)
        if d.get("partial_rotary_factor") is None:
            if d.get("qk_rope_head_dim") is not None:
                kw["partial_rotary_factor"] = d["qk_rope_head_dim"] / d.get("head_dim", cls.head_dim)
            else:
                kw.pop("partial_rotary_factor", None)
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
            main, comp = rp["main"], rp["compress"]
            if main.get("rope_type", "default") != "default":
                raise ConfigError(f"{source}: field 'rope_parameters.main.rope_type' = {main.get('rope_type')!r} is "
                                  "invalid: DeepSeek-V4's sliding layers use plain RoPE ('default')")
            kw["rope_theta"] = main.get("rope_theta", kw.get("rope_theta", cls.rope_theta))
            kw["compress_rope_theta"] = comp.get("rope_theta", kw.get("compress_rope_theta", cls.compress_rope_theta))
            if "partial_rotary_factor" in comp:
                kw["partial_rotary_factor"] = comp["partial_rotary_factor"]
            yarn = {k: v for k, v in comp.items() if k not in ("rope_theta", "partial_rotary_factor")}
            kw["rope_scaling"] = yarn if yarn.get("rope_type", yarn.get("type")) == "yarn" else None
        elif isinstance(rp, dict) or isinstance(d.get("rope_scaling"), dict):
            flat = {k: v for k, v in (rp or d["rope_scaling"]).items() if k not in ("main", "compress")}
            if "type" in flat and "rope_type" not in flat:
                flat["rope_type"] = flat.pop("type")
            kw["rope_theta"] = flat.pop("rope_theta", kw.get("rope_theta", cls.rope_theta))
            flat.pop("partial_rotary_factor", None)
            kw["rope_scaling"] = flat if flat.get("rope_type") == "yarn" else None
        if kw.get("rope_scaling"):
            kw["rope_scaling"] = {"attention_factor": 1.0, **{k: v for k, v in kw["rope_scaling"].items() if k != "type"}}
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0] if kw["eos_token_id"] else None
        return cls(**kw).validate(source)

    @classmethod
    def from_json(cls, path: str | Path) -> "DeepseekV4Config":
        return cls.from_hf_dict(read_config_json(Path(path)), str(path))

    def to_hf_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d.pop("rope_scaling")
        d["rope_parameters"] = self.rope_parameters
        d["intermediate_size"] = self.moe_intermediate_size
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        return d

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    def param_count(self) -> int:
        """Parameters and persistent buffers of DeepseekV4ForCausalLM's state dict (tid2eid included)."""
        h, H, D, q, E, I = (self.hidden_size, self.num_attention_heads, self.head_dim, self.q_lora_rank,
                            self.n_routed_experts, self.moe_intermediate_size)
        hc, k, Di, Hi = self.hc_mult, self.num_experts_per_tok, self.index_head_dim, self.index_n_heads
        attn = h * q + q + q * H * D + h * D + D + (H * D // self.o_groups) * self.o_groups * self.o_lora_rank \
            + self.o_groups * self.o_lora_rank * h + H
        total = 0
        for i in range(self.num_hidden_layers):
            t, m = self.layer_types[i], self.compress_rate(i)
            comp = 0
            if t == HCA:
                comp = 2 * h * D + m * D + D
            elif t == CSA:
                comp = 2 * h * 2 * D + m * 2 * D + D
                comp += 2 * h * 2 * Di + m * 2 * Di + Di + q * Hi * Di + h * Hi
            moe = E * 2 * I * h + E * h * I + 3 * h * I + E * h
            moe += self.vocab_size * k if self.mlp_layer_types[i] == "hash_moe" else E
            hc_block = (2 + hc) * hc * hc * h + (2 + hc) * hc + 3
            total += attn + comp + moe + 2 * h + 2 * hc_block
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return total + self.vocab_size * h + head + h + hc * hc * h + hc + 1
