"""DeepSeek-V2/V3 model configuration, read from and written to Hugging Face `config.json`.

Field names are the checkpoint's own (REFERENCE.md section 1). Two RoPE spellings are accepted:
the original checkpoints' `rope_theta` + `rope_scaling` and transformers 5's `rope_parameters`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError
from .family import read_config_json

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


_FIELD_KINDS = {
    "model_type": "str", "scoring_func": "str", "topk_method": "str",
    **{n: "int" for n in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                          "num_hidden_layers", "first_k_dense_replace", "num_attention_heads", "n_routed_experts",
                          "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "kv_lora_rank",
                          "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")},
    "q_lora_rank": "int?", "bos_token_id": "int?", "eos_token_id": "int?",
    **{n: "number" for n in ("routed_scaling_factor", "rms_norm_eps", "rope_theta")},
    **{n: "bool" for n in ("norm_topk_prob", "tie_word_embeddings", "attention_bias")},
    "rope_scaling": "dict?", "quantization_config": "dict?",
}
_KIND_WORDS = {"str": "a string", "int": "an integer", "int?": "an integer or null", "number": "a finite number",
               "bool": "true or false", "dict?": "an object or null"}
_MAX_DIM = 1 << 24  # no DeepSeek dimension comes near; larger values are corrupt, not models


def _is_kind(v: Any, kind: str) -> bool:
    if kind.endswith("?"):
        return v is None or _is_kind(v, kind[:-1])
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= _MAX_DIM
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, {"str": str, "bool": bool, "dict": dict}[kind])


@dataclasses.dataclass
class DeepseekConfig:
    # the config.json model_type values this class reads, and what they are called in messages
    # (DeepSeek-V3.2's config, models/v32_config.py, subclasses and sets both)
    model_types: ClassVar[tuple[str, ...]] = MODEL_TYPES
    checkpoint_kind: ClassVar[str] = "a DeepSeek-V2/V3/R1 checkpoint"

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # YaRN parameters (None: plain RoPE). Keys: factor, original_max_position_embeddings,
    # beta_fast, beta_slow, mscale, mscale_all_dim (and optionally attention_factor, truncate).
    rope_scaling: dict | None = None
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    quantization_config: dict | None = None

    # ---- derived -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_e_score_correction_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    @property
    def latent_cache_width(self) -> int:
        """Values cached per token per layer in the latent form: c_kv then k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def expanded_cache_width(self) -> int:
        """Values cached per token per layer by a per-head K/V cache."""
        return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @property
    def fp8(self) -> bool:
        q = self.quantization_config or {}
        return q.get("quant_method") == "fp8"

    # ---- validation ----------------------------------------------------------------------
    def validate(self, source: str = "config") -> "DeepseekConfig":
        def bad(field: str, value: Any, why: str) -> ConfigError:
            return ConfigError(f"{source}: field '{field}' = {value!r} is invalid: {why}")

        if self.model_type not in self.model_types:
            raise bad("model_type", self.model_type, f"expected one of {', '.join(self.model_types)}")
        for f in dataclasses.fields(self):  # the JSON types first: every later check may rely on them
            v = getattr(self, f.name)
            kind = _FIELD_KINDS.get(f.name)
            if kind is not None and not _is_kind(v, kind):
                raise bad(f.name, v, f"must be {_KIND_WORDS[kind]}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "n_routed_experts",
                     "num_experts_per_tok", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim", "n_group", "topk_group", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, v, "must be a positive integer")
        for name in ("n_shared_experts", "first_k_dense_replace"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, v, "must be a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise bad("q_lora_rank", self.q_lora_rank, "must be a positive integer or null (plain q_proj)")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", self.qk_rope_head_dim, "RoPE rotates pairs, so it must be even")
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", self.scoring_func, f"expected one of {', '.join(SCORING_FUNCS)}")
        if self.topk_method not in TOPK_METHODS:
            raise bad("topk_method", self.topk_method, f"expected one of {', '.join(TOPK_METHODS)}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", self.num_experts_per_tok,
                      f"larger than n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_group:
            raise bad("n_group", self.n_group, f"does not divide n_routed_experts={self.n_routed_experts}")
        if self.topk_group > self.n_group:
            raise bad("topk_group", self.topk_group, f"larger than n_group={self.n_group}")
        if self.topk_method != "greedy":
            kept = self.topk_group * (self.n_routed_experts // self.n_group)
            if self.num_experts_per_tok > kept:
                raise bad("num_experts_per_tok", self.num_experts_per_tok,
                          f"larger than the {kept} experts in the topk_group={self.topk_group} kept groups "
                          f"({self.n_routed_experts // self.n_group} experts per group); raise topk_group "
                          f"or lower num_experts_per_tok")
        if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
            raise bad("n_group", self.n_group, "noaux_tc scores a group by its top-2 experts, so each group "
                      "needs at least 2 experts")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise bad("first_k_dense_replace", self.first_k_dense_replace,
                      f"larger than num_hidden_layers={self.num_hidden_layers}")
        for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor"):
            if not getattr(self, name) > 0:
                raise bad(name, getattr(self, name), "must be a positive, finite number")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise bad(name, v, f"must be a token id in [0, vocab_size={self.vocab_size}) or null")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            for key in ("factor", "original_max_position_embeddings"):
                if key not in rs:
                    raise bad("rope_scaling", rs, f"YaRN needs '{key}'")
            for key, v in rs.items():
                if key == "truncate":
                    if not isinstance(v, bool):
                        raise bad(f"rope_scaling.{key}", v, "must be true or false")
                elif not _is_kind(v, "number") or not v > 0:
                    raise bad(f"rope_scaling.{key}", v, "must be a positive, finite number")
            if rs["factor"] < 1:
                raise bad("rope_scaling.factor", rs["factor"], "must be a number >= 1")
            if rs.get("beta_fast", 32) <= rs.get("beta_slow", 1):
                raise bad("rope_scaling.beta_fast", rs.get("beta_fast", 32),
                          f"must be larger than beta_slow={rs.get('beta_slow', 1)}")
        q = self.quantization_config
        if q is not None:
            if q.get("quant_method") != "fp8":
                raise bad("quantization_config.quant_method", q.get("quant_method"),
                          "only 'fp8' (DeepSeek-V3 block FP8) checkpoints are supported")
            if q.get("fmt", "e4m3") != "e4m3":
                raise bad("quantization_config.fmt", q.get("fmt"), "only e4m3 is supported")
            if list(q.get("weight_block_size", [128, 128])) != [128, 128]:
                raise bad("quantization_config.weight_block_size", q.get("weight_block_size"),
                          "only [128, 128] blocks are supported")
        return self

    # ---- Hugging Face config.json ---------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "DeepseekConfig":
        model_type = d.get("model_type")
        if model_type not in cls.model_types:
            raise ConfigError(f"{source}: field 'model_type' = {model_type!r} is not supported: expected one of "
                              f"{', '.join(cls.model_types)} ({cls.checkpoint_kind})")
        v3 = model_type != "deepseek_v2"  # V3 and V3.2 share V3's defaults
        kw: dict[str, Any] = {"model_type": model_type}
        defaults = {
            "scoring_func": "sigmoid" if v3 else "softmax",
            "topk_method": "noaux_tc" if v3 else "greedy",
            "first_k_dense_replace": 3 if v3 else 0,
            "norm_topk_prob": v3,
            "routed_scaling_factor": 2.5 if v3 else 1.0,
            "n_shared_experts": 1 if v3 else 2,
        }
        for f in dataclasses.fields(cls):
            if f.name in ("model_type", "rope_theta", "rope_scaling"):
                continue
            if f.name in d:
                kw[f.name] = d[f.name]
            elif f.name in defaults:
                kw[f.name] = defaults[f.name]
        if "q_lora_rank" in d:
            kw["q_lora_rank"] = d["q_lora_rank"]
        for k in ("n_group", "topk_group"):
            if kw.get(k) is None:
                kw[k] = 1
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0] if kw["eos_token_id"] else None
        # RoPE: transformers 5 nests everything under rope_parameters; original checkpoints use
        # rope_theta + rope_scaling (with "type" or "rope_type").
        rp = d.get("rope_parameters") or {}
        rs = d.get("rope_scaling") or {}
        for name, value in (("rope_parameters", rp), ("rope_scaling", rs)):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: field '{name}' = {value!r} is invalid: must be an object or null")
        theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
        if not _is_kind(theta, "number"):
            raise ConfigError(f"{source}: field 'rope_theta' = {theta!r} is invalid: must be a positive, finite number")
        merged = {**rs, **rp}
        rope_type = merged.get("rope_type", merged.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"{source}: field 'rope_scaling.rope_type' = {rope_type!r} is not supported: "
                              "DeepSeek models use 'yarn' or plain RoPE ('default')")
        kw["rope_theta"] = float(theta)
        if rope_type == "yarn":
            keep = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                    "mscale_all_dim", "attention_factor", "truncate")
            kw["rope_scaling"] = {k: merged[k] for k in keep if k in merged and merged[k] is not None}
            kw["rope_scaling"].setdefault("original_max_position_embeddings",
                                          kw.get("max_position_embeddings", 163840))
        cfg = cls(**kw)
        return cfg.validate(source)

    @classmethod
    def from_json(cls, path: str | Path) -> "DeepseekConfig":
        return cls.from_hf_dict(read_config_json(path), source=str(path))

    def to_hf_dict(self) -> dict:
        v3 = self.model_type == "deepseek_v3"
        d: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        }
        for f in dataclasses.fields(self):
            if f.name in ("rope_theta", "rope_scaling", "quantization_config"):
                continue
            d[f.name] = getattr(self, f.name)
        d["num_key_value_heads"] = self.num_attention_heads
        d["hidden_act"] = "silu"
        rope = {"rope_type": "yarn" if self.rope_scaling else "default", "rope_theta": self.rope_theta}
        rope.update(self.rope_scaling or {})
        d["rope_parameters"] = rope
        d["rope_interleave"] = True
        if self.quantization_config:
            d["quantization_config"] = self.quantization_config
        return dict(sorted(d.items()))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def param_count(self) -> int:
        """Parameters the model holds, computed from shapes alone."""
        h, H = self.hidden_size, self.num_attention_heads
        attn = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
                if self.q_lora_rank else h * H * self.qk_head_dim)
        attn += h * self.latent_cache_width + self.kv_lora_rank
        attn += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim) + H * self.v_head_dim * h
        dense = 3 * h * self.intermediate_size
        moe = (3 * h * self.moe_intermediate_size * (self.n_routed_experts + self.n_shared_experts)
               + self.n_routed_experts * h + (self.n_routed_experts if self.has_e_score_correction_bias else 0))
        n_moe = self.num_hidden_layers - self.first_k_dense_replace
        total = self.num_hidden_layers * (attn + 2 * h) + self.first_k_dense_replace * dense + n_moe * moe
        total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        return total


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
