"""DeepSeek-V4 checkpoint I/O: a folder of config.json + safetensors -> transformers-named state dict.

Reads either naming a V4 folder can carry and returns transformers 5.24's DeepseekV4ForCausalLM names:
- DeepSeek's native names as published on the Hub (`layers.N.attn.wq_a.weight`, `ffn.experts.E.w1.weight`,
  `embed.weight`, `hc_head_fn`, ...; the rename table below is transformers' conversion_mapping.py
  "deepseek_v4" entry written out name by name), routed experts stored one tensor per expert and merged here
  into `mlp.experts.gate_up_proj` [E, 2I, H] (w1 rows then w3 rows) and `mlp.experts.down_proj` [E, H, I];
- transformers' own names (`model.layers.N.self_attn.q_a_proj.weight`, ...), loaded as stored.
A folder holding both namings is refused. MTP tensors (`mtp.*`, layers >= num_hidden_layers) are skipped
and counted.

Quantized storage (any tensor that has a scale beside it):
- FP8 E4M3 in 128x128 blocks (quantization_config.weight_block_size): `W.weight` float8_e4m3fn with the scale
  `W.scale` (native; V3 and transformers call it `W.weight_scale_inv`), one per block, E8M0
  (float8_e8m0fnu, `scale_fmt: ue8m0`: 2^(e-127)) or fp32. Dequantized = fp8 * scale, per block
  (models.checkpoint.fp8_block_dequantize).
- FP4 E2M1 routed experts (`expert_dtype: fp4`): int8 [rows, K/2], two values per byte, element 2j in the low
  nibble and 2j+1 in the high nibble; nibble = sign bit 3, magnitude code bits 0-2 indexing
  {0, 0.5, 1, 1.5, 2, 3, 4, 6}; one E8M0 (or fp32) scale per row per 32 values of K: scale [rows, K/32].
Dequantization is exact (a power-of-two scale times a value of a few bits). The stored bytes stay reachable
through `V4CheckpointSource.raw(name)` / `raw_fp8(name)` for an FP8/FP4 passthrough stage.

Never unpickles; tensors are memory-mapped with safetensors' safe_open and read one at a time.
`save_v4_native_checkpoint` writes the native format (FP8 blocks, FP4 experts, the config.json fields a real
V4 checkpoint ships) for tests and benchmarks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError

from .checkpoint import FP8_BLOCK, FP8_MAX, _check_file_sizes, _open, _scan, fp8_block_dequantize, write_folder
from .errors import CheckpointError

FP4_BLOCK = 32  # values of K per FP4 scale
FP4_MAX = 6.0
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NATIVE, TRANSFORMERS, TRANSFORMERS_SAVED = "native", "transformers", "transformers-saved"
COMPRESS_RATIO_TO_LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention",
                                128: "heavily_compressed_attention"}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.float32)
_INT_DTYPES = (torch.int64, torch.int32)

# ---- names ---------------------------------------------------------------------------------------------
# transformers name (under model.) -> native name, outside the layers
_TOP_HF_TO_NATIVE = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}
# transformers suffix under model.layers.N. -> native suffix under layers.N.
_LAYER_HF_TO_NATIVE = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn", "attn_hc.base": "hc_attn_base", "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn", "ffn_hc.base": "hc_ffn_base", "ffn_hc.scale": "hc_ffn_scale",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
}
_TOP_NATIVE_TO_HF = {v: k for k, v in _TOP_HF_TO_NATIVE.items()}
_LAYER_NATIVE_TO_HF = {v: k for k, v in _LAYER_HF_TO_NATIVE.items()}
# transformers maps `.norm.` -> `.kv_norm.`, so it also reads the attention's kv_norm as attn.norm (and writes it so)
_LAYER_NATIVE_TO_HF["attn.norm.weight"] = "self_attn.kv_norm.weight"
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_NATIVE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_NATIVE_EXPERT_RE = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight$")
_EXPERTS_HF = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# DeepSeek's practice (and what a real V4-Flash ships): these stay unquantized.
_NATIVE_FP8_SUFFIXES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight",
                        "attn.wo_b.weight", "attn.indexer.wq_b.weight", "ffn.shared_experts.w1.weight",
                        "ffn.shared_experts.w2.weight", "ffn.shared_experts.w3.weight")
_FP32_NATIVE_SUFFIXES = ("attn_sink", "ffn.gate.bias", "ape", "hc_attn_fn", "hc_attn_base", "hc_attn_scale",
                         "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale", "hc_head_fn", "hc_head_base", "hc_head_scale")


def hf_to_native(name: str, n_routed_experts: int | None = None) -> str:
    """transformers name -> native name (for experts, a description of the per-expert tensors)."""
    if name in _TOP_HF_TO_NATIVE:
        return _TOP_HF_TO_NATIVE[name]
    m = _HF_LAYER_RE.match(name)
    if m:
        layer, rest = m.groups()
        if rest in _LAYER_HF_TO_NATIVE:
            return f"layers.{layer}.{_LAYER_HF_TO_NATIVE[rest]}"
        if rest in _EXPERTS_HF:
            e = f"{{0..{n_routed_experts - 1}}}" if n_routed_experts else "E"
            w = "w1/w3" if rest.endswith("gate_up_proj") else "w2"
            return f"layers.{layer}.ffn.experts.{e}.{w}.weight"
    raise KeyError(name)


def native_to_hf(name: str) -> str:
    """native name -> transformers name; routed experts map to the merged tensor they are part of."""
    if name in _TOP_NATIVE_TO_HF:
        return _TOP_NATIVE_TO_HF[name]
    m = _NATIVE_EXPERT_RE.match(name)
    if m:
        layer, _, w = m.groups()
        return f"model.layers.{layer}.mlp.experts.{'down_proj' if w == 'w2' else 'gate_up_proj'}"
    m = _NATIVE_LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NATIVE_TO_HF:
        return f"model.layers.{m.group(1)}.{_LAYER_NATIVE_TO_HF[m.group(2)]}"
    raise KeyError(name)


def _both(name: str, n_experts: int | None = None) -> str:
    try:
        return f"{name!r} (native name {hf_to_native(name, n_experts)!r})"
    except KeyError:
        return repr(name)


# ---- config --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class V4Dims:
    """What the tensor names and shapes depend on, from config.json (legacy or transformers field names)."""
    vocab_size: int
    hidden_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    n_routed_experts: int
    num_experts_per_tok: int
    index_n_heads: int
    index_head_dim: int
    hc_mult: int
    layer_types: tuple[str, ...]
    mlp_layer_types: tuple[str, ...]
    compress_rates: dict
    tie_word_embeddings: bool
    expert_dtype: str  # "fp8" or "fp4": how routed experts are stored when quantized
    weight_block_size: tuple[int, int] | None


def v4_dims(cfg: dict, where: str = "config.json") -> V4Dims:
    def need(key):
        if key not in cfg:
            raise CheckpointError(f"{where}: field {key!r} is missing; a DeepSeek-V4 config.json needs it")
        return cfg[key]
    n = int(need("num_hidden_layers"))
    rates = dict(cfg.get("compress_rates") or {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})
    if cfg.get("compress_rate_csa") is not None:
        rates["compressed_sparse_attention"] = cfg["compress_rate_csa"]
    if cfg.get("compress_rate_hca") is not None:
        rates["heavily_compressed_attention"] = cfg["compress_rate_hca"]
    layer_types = cfg.get("layer_types")
    if layer_types is None and cfg.get("compress_ratios") is not None:
        try:
            layer_types = [COMPRESS_RATIO_TO_LAYER_TYPE[int(r)] for r in cfg["compress_ratios"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: compress_ratios {cfg['compress_ratios']!r} holds a value other than "
                                  "0, 4, 128") from None
    if layer_types is None:  # transformers' default (V4-Pro): 2 HCA then CSA/HCA interleaved
        layer_types = ["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))]
    layer_types = list(layer_types)[:n]  # compress_ratios of a real checkpoint also lists the MTP layer
    mlp_types = cfg.get("mlp_layer_types")
    if mlp_types is None:
        k = int(cfg.get("num_hash_layers", 3))
        mlp_types = ["hash_moe"] * min(n, k) + ["moe"] * max(0, n - k)
    mlp_types = list(mlp_types)[:n]
    if len(layer_types) != n or len(mlp_types) != n:
        raise CheckpointError(f"{where}: layer_types/compress_ratios and mlp_layer_types must list "
                              f"num_hidden_layers={n} layers")
    q = cfg.get("quantization_config") or {}
    block = q.get("weight_block_size")
    return V4Dims(
        vocab_size=int(need("vocab_size")), hidden_size=int(need("hidden_size")),
        moe_intermediate_size=int(need("moe_intermediate_size")), num_hidden_layers=n,
        num_attention_heads=int(need("num_attention_heads")), head_dim=int(need("head_dim")),
        q_lora_rank=int(need("q_lora_rank")), o_groups=int(need("o_groups")), o_lora_rank=int(need("o_lora_rank")),
        n_routed_experts=int(need("n_routed_experts")), num_experts_per_tok=int(need("num_experts_per_tok")),
        index_n_heads=int(need("index_n_heads")), index_head_dim=int(need("index_head_dim")),
        hc_mult=int(need("hc_mult")), layer_types=tuple(layer_types), mlp_layer_types=tuple(mlp_types),
        compress_rates=rates, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        expert_dtype=str(q.get("expert_dtype", cfg.get("expert_dtype", "fp8"))),
        weight_block_size=tuple(block) if block else None)


def expected_shapes(d: V4Dims) -> dict[str, tuple[int, ...]]:
    """transformers-named tensor -> shape, as DeepseekV4ForCausalLM(config).state_dict() has them."""
    H, hc = d.hidden_size, d.hc_mult
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (d.vocab_size, H)}
    for i in range(d.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        nq = d.num_attention_heads * d.head_dim
        out.update({
            a + "sinks": (d.num_attention_heads,),
            a + "q_a_proj.weight": (d.q_lora_rank, H), a + "q_a_norm.weight": (d.q_lora_rank,),
            a + "q_b_proj.weight": (nq, d.q_lora_rank),
            a + "kv_proj.weight": (d.head_dim, H), a + "kv_norm.weight": (d.head_dim,),
            a + "o_a_proj.weight": (d.o_groups * d.o_lora_rank, nq // d.o_groups),
            a + "o_b_proj.weight": (H, d.o_groups * d.o_lora_rank),
        })
        kind = d.layer_types[i]
        if kind != "sliding_attention":
            m = int(d.compress_rates[kind])
            csa = kind == "compressed_sparse_attention"
            width = 2 * d.head_dim if csa else d.head_dim  # CSA: two overlapping series
            c = a + "compressor."
            out.update({c + "position_bias": (m, width), c + "kv_proj.weight": (width, H),
                        c + "gate_proj.weight": (width, H), c + "kv_norm.weight": (d.head_dim,)})
            if csa:
                x = c + "indexer."
                iw = 2 * d.index_head_dim
                out.update({x + "position_bias": (m, iw), x + "kv_proj.weight": (iw, H),
                            x + "gate_proj.weight": (iw, H), x + "kv_norm.weight": (d.index_head_dim,),
                            x + "q_b_proj.weight": (d.index_n_heads * d.index_head_dim, d.q_lora_rank),
                            x + "scorer.weights_proj.weight": (d.index_n_heads, H)})
        E, I = d.n_routed_experts, d.moe_intermediate_size
        out[p + "mlp.gate.weight"] = (E, H)
        if d.mlp_layer_types[i] == "hash_moe":
            out[p + "mlp.gate.tid2eid"] = (d.vocab_size, d.num_experts_per_tok)
        else:
            out[p + "mlp.gate.e_score_correction_bias"] = (E,)
        out.update({
            p + "mlp.experts.gate_up_proj": (E, 2 * I, H), p + "mlp.experts.down_proj": (E, H, I),
            p + "mlp.shared_experts.gate_proj.weight": (I, H), p + "mlp.shared_experts.up_proj.weight": (I, H),
            p + "mlp.shared_experts.down_proj.weight": (H, I),
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
        })
        for hcn in ("attn_hc", "ffn_hc"):
            out.update({f"{p}{hcn}.fn": ((2 + hc) * hc, hc * H), f"{p}{hcn}.base": ((2 + hc) * hc,),
                        f"{p}{hcn}.scale": (3,)})
    out.update({"model.norm.weight": (H,), "model.hc_head.hc_fn": (hc, hc * H), "model.hc_head.hc_base": (hc,),
                "model.hc_head.hc_scale": (1,)})
    if not d.tie_word_embeddings:
        out["lm_head.weight"] = (d.vocab_size, H)
    return out


# ---- formats -------------------------------------------------------------------------------------------
def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu (or its raw uint8 bytes) -> fp32 2^(e-127); e=255 is NaN."""
    e = s.view(torch.uint8).to(torch.int32) if s.dtype in (torch.float8_e8m0fnu, torch.uint8) else None
    if e is None:
        return s.float()
    out = torch.ldexp(torch.ones(e.shape), (e - 127).float())
    return torch.where(e == 255, torch.tensor(float("nan")), out)


def _scale_float(s: torch.Tensor) -> torch.Tensor:
    return e8m0_to_float(s) if s.dtype == torch.float8_e8m0fnu else s.float()


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [..., K/2] -> fp32 [..., K] E2M1 values; element 2j = low nibble, 2j+1 = high nibble."""
    u = packed.contiguous().view(torch.uint8).to(torch.int64)
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32)
    lut = torch.cat([mags, -mags])
    out = torch.stack([lut[u & 0xF], lut[u >> 4]], dim=-1)
    return out.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def fp4_dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP4 [rows, K/2] with scales [rows, K/32] -> fp32 [rows, K]."""
    v = fp4_unpack(packed)
    s = _scale_float(scale).repeat_interleave(FP4_BLOCK, dim=-1)
    return v * s


def fp8_dequantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [out, in] with 128x128 block scales (fp32 or E8M0) -> fp32."""
    return fp8_block_dequantize(w, _scale_float(scale))


def _pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= qmax, as E8M0 exponent bytes (uint8); amax 0 -> 2^0."""
    x = torch.where(amax > 0, amax.double() / qmax, torch.ones_like(amax, dtype=torch.float64))
    mant, exp = torch.frexp(x)  # x = mant * 2^exp, mant in [0.5, 1)
    ceil_log2 = torch.where(mant == 0.5, exp - 1, exp)
    return (ceil_log2 + 127).clamp(0, 254).to(torch.uint8)


def fp8_quantize_e8m0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> (e4m3 [out, in], float8_e8m0fnu [ceil(out/128), ceil(in/128)]) power-of-two scales."""
    out, inp = w.shape
    bo, bi = -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)
    padded = torch.zeros(bo * FP8_BLOCK, bi * FP8_BLOCK)
    padded[:out, :inp] = w.float()
    blocks = padded.view(bo, FP8_BLOCK, bi, FP8_BLOCK)
    e = _pow2_scale(blocks.abs().amax(dim=(1, 3)), FP8_MAX)
    s = e8m0_to_float(e)
    q = (blocks / s[:, None, :, None]).view_as(padded)[:out, :inp].to(torch.float8_e4m3fn)
    return q, e.view(torch.float8_e8m0fnu)


def fp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [rows, K] -> (int8 [rows, K/2] packed E2M1, float8_e8m0fnu [rows, K/32]).

    Scale: the smallest power of two putting the group's amax within 6. Values round to the nearest E2M1
    magnitude, ties to the even code."""
    rows, k = w.shape
    if k % FP4_BLOCK:
        raise CheckpointError(f"FP4 needs the input dim to be a multiple of {FP4_BLOCK}; got {k}")
    g = w.float().reshape(rows, k // FP4_BLOCK, FP4_BLOCK)
    e = _pow2_scale(g.abs().amax(dim=-1), FP4_MAX)
    a = (g.abs() / e8m0_to_float(e)[..., None]).reshape(rows, k)
    # midpoints between magnitudes; at a tie the even code wins (down at 0.25/1.25/2.5/5, up at 0.75/1.75/3.5)
    idx = torch.zeros(a.shape, dtype=torch.int64)
    for t, up in ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False)):
        idx += (a >= t) if up else (a > t)
    sign = ((w.float() < 0) & (idx > 0)).to(torch.int64)
    code = (sign << 3) | idx
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8)
    return packed.view(torch.int8), e.view(torch.float8_e8m0fnu)


# ---- reading -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class V4CheckpointSource:
    """Where a V4 state dict came from; reads the stored (raw) tensors again on demand."""
    path: Path
    naming: str  # "native" or "transformers"
    weight_map: dict[str, str]  # tensor name (native for the native and transformers-saved layouts) -> file
    parts: dict[str, list[tuple[str, str | None]]]  # transformers name -> [(stored weight, stored scale|None)]
    fp8_names: tuple[str, ...]  # transformers names stored as FP8 E4M3 blocks
    fp4_names: tuple[str, ...]  # transformers names stored as FP4 E2M1 (routed experts)
    skipped_mtp: int  # stored tensors ignored as MTP (mtp.*, layers >= num_hidden_layers), scales included
    scale_dtypes: tuple[str, ...] = ()
    stored_names: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> key in the file, where differing

    def read(self, name: str) -> torch.Tensor:
        with _open(self.path / self.weight_map[name]) as f:
            return f.get_tensor(self.stored_names.get(name, name))

    def raw(self, name: str) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """[(stored name, stored weight, stored scale or None)] that make up transformers tensor `name`, in
        merge order (experts: for gate_up_proj e0.w1, e0.w3, e1.w1, ...; for down_proj e0.w2, e1.w2, ...)."""
        return [(w, self.read(w), self.read(s) if s else None) for w, s in self.parts[name]]

    def raw_fp8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(float8_e4m3fn weight, its block scale) exactly as stored, for a 2-D FP8 tensor."""
        if name not in self.fp8_names or len(self.parts[name]) != 1:
            raise CheckpointError(f"{self.path}: {name!r} is not stored as one FP8 tensor")
        (_, w, s), = self.raw(name)
        return w, s


# transformers 5.24's save_pretrained runs the conversion mapping backwards without the model. prefix rules:
# model.layers.N.<native layer name>, head.weight, model.embed_tokens.weight, model.norm.weight,
# model.hc_head.hc_*; and the attention's kv_norm comes out as attn.norm (the reverse of `.norm.` -> `.kv_norm.`).
_SAVED_LAYER_RE = re.compile(r"^model\.(?:layers|mtp)\.\d+\.(?:attn\.|ffn\.|attn_norm\.|ffn_norm\.|hc_attn_|hc_ffn_)")
_SAVED_TOP = {"head.weight": "head.weight", "model.embed_tokens.weight": "embed.weight",
              "model.norm.weight": "norm.weight", "model.hc_head.hc_fn": "hc_head_fn",
              "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"}


def _saved_to_native(name: str) -> str | None:
    """A save_pretrained (transformers 5.24) tensor name -> native name; None if it is not one."""
    if name in _SAVED_TOP:
        return _SAVED_TOP[name]
    if not _SAVED_LAYER_RE.match(name):
        return None
    n = re.sub(r"^(layers\.\d+\.attn)\.norm\.", r"\1.kv_norm.", name[len("model."):])
    return n[: -len(".weight_scale_inv")] + ".scale" if n.endswith(".weight_scale_inv") else n


def _classify(name: str) -> str | None:
    if name.startswith(("model.", "lm_head.")):
        return TRANSFORMERS
    if name.startswith(("layers.", "mtp.", "embed.", "head.", "norm.", "hc_head_")):
        return NATIVE
    return None


def _scale_name(weight: str, naming: str) -> str:
    if naming == NATIVE:
        return (weight[: -len(".weight")] if weight.endswith(".weight") else weight) + ".scale"
    return weight + "_scale_inv"


def _is_scale(name: str, naming: str) -> bool:
    return name.endswith(".scale") if naming == NATIVE else name.endswith("_scale_inv")


def _is_mtp(name: str, naming: str, n_layers: int) -> bool:
    if name.startswith(("mtp.", "model.mtp.")):
        return True
    m = re.match(r"^(?:model\.)?layers\.(\d+)\.", name)
    return bool(m and int(m.group(1)) >= n_layers)


class _Reader:
    def __init__(self, path: Path, weight_map: dict[str, str], d: V4Dims, stored: dict[str, str]):
        self.path, self.weight_map, self.d, self.stored = path, weight_map, d, stored
        self.handles: dict[str, object] = {}

    def meta(self, name: str) -> tuple[torch.dtype, list[int]]:
        f = self._handle(self.weight_map[name])
        try:
            sl = f.get_slice(self.stored.get(name, name))
            return _dtype(sl.get_dtype(), self.where(name)), list(sl.get_shape())
        except (SafetensorError, ValueError, TypeError) as e:
            raise CheckpointError(f"{self.where(name)} cannot be read ({e}); the file is corrupt: copy or re-save "
                                  "it") from None

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(self.weight_map[name]).get_tensor(self.stored.get(name, name))
        except (SafetensorError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{self.where(name)} cannot be read ({e}); the file is corrupt: copy or re-save "
                                  "it") from None

    def where(self, name: str) -> str:
        return f"{self.path / self.weight_map[name]}: tensor {self.stored.get(name, name)!r}"

    def close(self):
        for h in self.handles.values():
            h.__exit__(None, None, None)
        self.handles.clear()

    def _handle(self, fname: str):
        if fname not in self.handles:
            self.handles[fname] = _open(self.path / fname).__enter__()
        return self.handles[fname]


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn,
              "F8_E8M0": torch.float8_e8m0fnu, "I8": torch.int8, "U8": torch.uint8, "I64": torch.int64,
              "I32": torch.int32}


def _dtype(st: str, where: str) -> torch.dtype:
    if st not in _ST_DTYPES:
        raise CheckpointError(f"{where} has dtype {st}, which a DeepSeek-V4 checkpoint does not use (supported: "
                              "F32, BF16, F16; F8_E4M3 or I8 (packed FP4) weights with an F8_E8M0/F32 scale; "
                              "I64/I32 tid2eid)")
    return _ST_DTYPES[st]


def _dequantize_piece(r: _Reader, w_name: str, s_name: str | None, want: tuple[int, ...],
                      allow_fp4: bool, fp8_block_ok: bool) -> tuple[torch.Tensor, str | None]:
    """Read one stored weight (+ scale) and return (fp32 or stored tensor of shape `want`, format or None)."""
    dtype, shape = r.meta(w_name)
    where = r.where(w_name)
    if s_name is None:
        if dtype in (torch.float8_e4m3fn, torch.int8, torch.uint8):
            raise CheckpointError(f"{where} is stored as {str(dtype).removeprefix('torch.')} (quantized) but its "
                                  f"scale {_scale_name(w_name, _classify(w_name) or NATIVE)!r} is missing; copy "
                                  "the complete checkpoint")
        if tuple(shape) != want:
            raise CheckpointError(f"{where} has shape {shape}, config.json implies {list(want)}; config.json and "
                                  "the weights do not match")
        if dtype in _INT_DTYPES or dtype in _FLOAT_DTYPES:
            return r.get(w_name), None
        raise CheckpointError(f"{where} has dtype {str(dtype).removeprefix('torch.')}, not a weight dtype "
                              "(fp32, bf16, fp16; fp8/fp4 only with a scale)")
    s_dtype, s_shape = r.meta(s_name)
    s_where = r.where(s_name)
    if s_dtype not in _SCALE_DTYPES:
        raise CheckpointError(f"{s_where} has dtype {str(s_dtype).removeprefix('torch.')}; a scale is "
                              "float8_e8m0fnu (scale_fmt ue8m0) or float32")
    if len(want) != 2:
        raise CheckpointError(f"{where} has a scale {s_name!r} but is not a matrix; only linear weights and "
                              "experts are quantized")
    rows, k = want
    if dtype == torch.float8_e4m3fn:
        if not fp8_block_ok:
            raise CheckpointError(f"{r.path / 'config.json'}: quantization_config.weight_block_size is "
                                  f"{list(r.d.weight_block_size)}; only [128, 128] FP8 blocks are supported")
        if tuple(shape) != want:
            raise CheckpointError(f"{where} has shape {shape}, config.json implies {list(want)}; config.json and "
                                  "the weights do not match")
        need = [-(-rows // FP8_BLOCK), -(-k // FP8_BLOCK)]
        if s_shape != need:
            raise CheckpointError(f"{s_where} has shape {s_shape}; 128x128 blocks of {list(want)} need {need}")
        return fp8_dequantize(r.get(w_name), r.get(s_name)), "fp8"
    if dtype in (torch.int8, torch.uint8):
        if not allow_fp4:
            raise CheckpointError(f"{where} is packed FP4 (int8) but only routed experts are stored as FP4")
        if shape != [rows, k // 2] or k % FP4_BLOCK:
            raise CheckpointError(f"{where} is packed FP4 with shape {shape}; two E2M1 values per byte of "
                                  f"{list(want)} need [{rows}, {k // 2}] (and K a multiple of {FP4_BLOCK})")
        need = [rows, k // FP4_BLOCK]
        if s_shape != need:
            raise CheckpointError(f"{s_where} has shape {s_shape}; FP4 {list(want)} with one scale per "
                                  f"{FP4_BLOCK} values of K needs {need}")
        return fp4_dequantize(r.get(w_name), r.get(s_name)), "fp4"
    raise CheckpointError(f"{where} has dtype {str(dtype).removeprefix('torch.')} and a scale {s_name!r}; quantized "
                          "weights are float8_e4m3fn (128x128 blocks) or int8 (packed FP4 E2M1)")


def load_v4_state_dict(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                       expected: dict[str, tuple[int, ...]] | None = None,
                       into: Callable[[str, torch.Tensor], None] | None = None
                       ) -> tuple[dict, dict[str, torch.Tensor], V4CheckpointSource]:
    """V4 folder -> (config.json as a dict, transformers-named state dict, V4CheckpointSource).

    Floating tensors come back in `dtype` (fp32 by default: every stored format converts to it exactly),
    tid2eid as stored (int64). `expected`: name -> shape to check against (default: what config.json implies,
    the shapes of transformers' DeepseekV4ForCausalLM); feed the result to model.load_state_dict(strict=True).
    `into(name, tensor)`: called for each tensor as soon as it is read (every name and scale is checked before
    the first); the returned state dict is then empty, so a caller copying into preallocated parameters
    holds at most one tensor (one merged expert tensor) beside its model.
    """
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (expected config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; a DeepSeek-V4 checkpoint folder needs config.json beside "
                              "its safetensors files")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    if cfg.get("model_type") not in (None, "deepseek_v4"):
        raise CheckpointError(f"{path / 'config.json'}: model_type is {cfg.get('model_type')!r}, not 'deepseek_v4'")
    d = v4_dims(cfg, str(path / "config.json"))
    expected = dict(expected) if expected is not None else expected_shapes(d)
    weight_map = _scan(path)
    _check_file_sizes(path, set(weight_map.values()))

    stored: dict[str, str] = {}
    saved = sorted(n for n in weight_map if _SAVED_LAYER_RE.match(n))
    if saved:  # transformers' save_pretrained layout: native names under model., see _saved_to_native
        renamed = {}
        for n, f in weight_map.items():
            c = _saved_to_native(n)
            if c is None:
                raise CheckpointError(
                    f"{path}: mixes transformers' save_pretrained names ({len(saved)}, e.g. {saved[0]!r}) and "
                    f"another naming ({n!r}); a checkpoint uses one naming. Re-save it with one "
                    "(save_v4_native_checkpoint, or transformers' save_pretrained)")
            renamed[c] = f
            if c != n:
                stored[c] = n
        weight_map = renamed
    kinds = {n: _classify(n) for n in weight_map}
    unknown = sorted(n for n, k in kinds.items() if k is None)
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} tensor(s) in neither DeepSeek's native nor transformers' "
                              f"naming, e.g. {', '.join(unknown[:3])}")
    native = sorted(n for n, k in kinds.items() if k == NATIVE)
    hf = sorted(n for n, k in kinds.items() if k == TRANSFORMERS)
    if native and hf:
        raise CheckpointError(f"{path}: mixes DeepSeek's native tensor names ({len(native)}, e.g. {native[0]!r}) "
                              f"and transformers' names ({len(hf)}, e.g. {hf[0]!r}); a checkpoint uses one naming. "
                              "Re-save it with one (save_v4_native_checkpoint, or transformers' save_pretrained)")
    naming = NATIVE if native else TRANSFORMERS
    layout = TRANSFORMERS_SAVED if saved else naming
    mtp = {n for n in weight_map if _is_mtp(n, naming, d.num_hidden_layers)}
    kept = {n: f for n, f in weight_map.items() if n not in mtp}
    scales = {n for n in kept if _is_scale(n, naming)}
    # Which stored tensors make up each transformers tensor.
    parts: dict[str, list[tuple[str, str | None]]] = {}
    extra: list[str] = []
    E = d.n_routed_experts
    for name in sorted(set(kept) - scales):
        if naming == NATIVE:
            if _NATIVE_EXPERT_RE.match(name):
                continue  # assembled below, expert by expert
            try:
                target = native_to_hf(name)
            except KeyError:
                extra.append(name)
                continue
        else:
            target = name
        if target in parts:
            raise CheckpointError(f"{path}: {parts[target][0][0]!r} and {name!r} are both {target!r}; keep one")
        parts[target] = [(name, _scale_name(name, naming) if _scale_name(name, naming) in kept else None)]
    if naming == NATIVE:
        for i in range(d.num_hidden_layers):
            for target, ws in ((f"model.layers.{i}.mlp.experts.gate_up_proj", ("w1", "w3")),
                               (f"model.layers.{i}.mlp.experts.down_proj", ("w2",))):
                names = [f"layers.{i}.ffn.experts.{e}.{w}.weight" for e in range(E) for w in ws]
                present = [n for n in names if n in kept]
                if not present:
                    continue  # reported as missing below
                absent = [n for n in names if n not in kept]
                if absent:
                    raise CheckpointError(f"{path}: routed expert tensor {absent[0]!r} is missing ({len(absent)} of "
                                          f"{len(names)} for {target!r}); copy the complete checkpoint")
                parts[target] = [(n, _scale_name(n, NATIVE) if _scale_name(n, NATIVE) in kept else None)
                                 for n in names]
        known = {n for n in kept if _NATIVE_EXPERT_RE.match(n)}
        bad = sorted(n for n in known if int(_NATIVE_EXPERT_RE.match(n).group(2)) >= E)
        if bad:
            raise CheckpointError(f"{path}: expert tensor {bad[0]!r} is beyond n_routed_experts={E}")
    used_scales = {s for p in parts.values() for _, s in p if s}
    orphan = sorted(scales - used_scales)
    if orphan:
        w = orphan[0][: -len(".scale")] + ".weight" if naming == NATIVE else orphan[0][: -len("_scale_inv")]
        raise CheckpointError(f"{path}: scale {orphan[0]!r} has no weight {w!r} beside it ({len(orphan)} such "
                              "scale(s)); the checkpoint is incomplete or mislabelled")
    tied = d.tie_word_embeddings and "lm_head.weight" not in parts
    missing = sorted(set(expected) - set(parts) - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, e.g. "
                              f"{'; '.join(_both(n, E) for n in missing[:3])}; the checkpoint does not match its "
                              "config.json")
    extra += sorted(set(parts) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}; the "
                              "checkpoint does not match its config.json (num_hidden_layers, layer_types / "
                              "compress_ratios, num_hash_layers?)")

    r = _Reader(path, kept, d, stored)
    try:
        fp8_ok = d.weight_block_size in (None, (FP8_BLOCK, FP8_BLOCK))
        out: dict[str, torch.Tensor] = {}
        fp8_names, fp4_names, scale_dtypes = [], [], set()
        for target in sorted(parts):
            want = tuple(expected[target])
            pieces = parts[target]
            is_expert = target.endswith(_EXPERTS_HF)
            if is_expert and naming == NATIVE:
                rows = want[1] // (2 if target.endswith("gate_up_proj") else 1)
                t, fmts, per = torch.empty(want, dtype=dtype), set(), len(pieces) // E
                for i, (w, s) in enumerate(pieces):  # filled in place: no list of experts beside the merged one
                    v, fmt = _dequantize_piece(r, w, s, (rows, want[2]), True, fp8_ok)
                    t[i // per, (i % per) * rows:(i % per + 1) * rows] = v
                    fmts.add(fmt)
                    del v
            elif is_expert:  # transformers naming: one [E, rows, K] tensor (+ [E, ...] scale)
                w, s = pieces[0]
                if s is None:
                    t, fmt = _dequantize_piece(r, w, None, want, False, fp8_ok)
                    fmts = {fmt}
                else:
                    full_w, full_s = r.get(w), r.get(s)
                    if full_w.shape[0] != want[0]:
                        raise CheckpointError(f"{r.where(w)} holds {full_w.shape[0]} experts, config.json implies "
                                              f"{want[0]}")
                    t, fmts = torch.empty(want, dtype=dtype), set()
                    for e in range(full_w.shape[0]):  # expert by expert, into the merged tensor
                        sub = _SubReader(r, w, s, full_w[e], full_s[e])
                        v, fmt = _dequantize_piece(sub, w, s, want[1:], True, fp8_ok)
                        t[e] = v
                        fmts.add(fmt)
                        del v
                    del full_w, full_s
            else:
                w, s = pieces[0]
                t, fmt = _dequantize_piece(r, w, s, want, False, fp8_ok)
                fmts = {fmt}
            for w, s in pieces:
                if s:
                    scale_dtypes.add(str(r.meta(s)[0]).removeprefix("torch."))
            if "fp8" in fmts:
                fp8_names.append(target)
            if "fp4" in fmts:
                fp4_names.append(target)
            t = t.to(dtype) if t.is_floating_point() else t
            if into is None:
                out[target] = t
            else:
                into(target, t)
            del t
    finally:
        r.close()
    if fp4_names and d.expert_dtype != "fp4":
        raise CheckpointError(f"{path / 'config.json'}: experts are stored as FP4 but expert_dtype is "
                              f"{d.expert_dtype!r}; set quantization_config.expert_dtype to 'fp4'")
    src = V4CheckpointSource(path, layout, dict(kept), parts, tuple(fp8_names), tuple(fp4_names), len(mtp),
                             tuple(sorted(scale_dtypes)), {k: v for k, v in stored.items() if k in kept})
    return cfg, out, src


class _SubReader:
    """One expert's slice of a transformers-named [E, ...] quantized tensor, read like a stored tensor."""
    def __init__(self, r: _Reader, w: str, s: str, wt: torch.Tensor, st: torch.Tensor):
        self.r, self.path, self.d = r, r.path, r.d
        self.t = {w: wt, s: st}

    def meta(self, name):
        return self.t[name].dtype, list(self.t[name].shape)

    def get(self, name):
        return self.t[name]

    def where(self, name):
        return self.r.where(name)


# ---- writing -------------------------------------------------------------------------------------------
def native_config(config) -> dict:
    """transformers DeepseekV4Config (or its dict) -> config.json as a real V4 checkpoint ships it: legacy
    compress_ratios / num_hash_layers / qk_rope_head_dim / rope_scaling, quantization_config filled by the
    writer."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    n = c["num_hidden_layers"]
    rates = c.get("compress_rates") or {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    ratio = {"sliding_attention": 0, **rates}
    mlp = list(c["mlp_layer_types"])
    k = mlp.count("hash_moe")
    if mlp != ["hash_moe"] * k + ["moe"] * (n - k):
        raise CheckpointError(f"mlp_layer_types {mlp} is not 'hash_moe' layers first then 'moe'; the native config "
                              "can only say num_hash_layers")
    if any(ratio.get(t) not in (0, 4, 128) for t in c["layer_types"]):
        raise CheckpointError(f"compress_rates {rates} are not 4 (CSA) and 128 (HCA); compress_ratios cannot say "
                              "them")
    mtp = int(c.get("num_nextn_predict_layers", 0) or 0)
    rp = c.get("rope_parameters") or {}
    comp = rp.get("compress", {}) if isinstance(rp.get("compress"), dict) else {}
    main = rp.get("main", {}) if isinstance(rp.get("main"), dict) else {}
    out = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": c.get("bos_token_id"), "eos_token_id": c.get("eos_token_id"),
        "compress_ratios": [ratio[t] for t in c["layer_types"]] + [0] * mtp,
        "compress_rope_theta": comp.get("rope_theta", c.get("compress_rope_theta", 160000.0)),
        "hc_eps": c["hc_eps"], "hc_mult": c["hc_mult"], "hc_sinkhorn_iters": c["hc_sinkhorn_iters"],
        "head_dim": c["head_dim"], "hidden_act": c.get("hidden_act", "silu"), "hidden_size": c["hidden_size"],
        "index_head_dim": c["index_head_dim"], "index_n_heads": c["index_n_heads"], "index_topk": c["index_topk"],
        "max_position_embeddings": c["max_position_embeddings"],
        "moe_intermediate_size": c["moe_intermediate_size"], "n_routed_experts": c["n_routed_experts"],
        "n_shared_experts": c["n_shared_experts"], "norm_topk_prob": c.get("norm_topk_prob", True),
        "num_attention_heads": c["num_attention_heads"], "num_experts_per_tok": c["num_experts_per_tok"],
        "num_hash_layers": k, "num_hidden_layers": n, "num_key_value_heads": c["num_key_value_heads"],
        "num_nextn_predict_layers": mtp, "o_groups": c["o_groups"], "o_lora_rank": c["o_lora_rank"],
        "q_lora_rank": c["q_lora_rank"],
        "qk_rope_head_dim": int(round(c["head_dim"] * (c.get("partial_rotary_factor") or 0.125))),
        "rms_norm_eps": c["rms_norm_eps"], "rope_theta": main.get("rope_theta", c.get("rope_theta", 10000.0)),
        "routed_scaling_factor": c["routed_scaling_factor"], "scoring_func": c["scoring_func"],
        "sliding_window": c["sliding_window"], "swiglu_limit": c["swiglu_limit"],
        "tie_word_embeddings": c.get("tie_word_embeddings", False), "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16", "vocab_size": c["vocab_size"],
    }
    if comp.get("rope_type") == "yarn":
        out["rope_scaling"] = {"type": "yarn", **{k2: comp[k2] for k2 in ("factor", "beta_fast", "beta_slow",
                                                                          "original_max_position_embeddings")
                                                  if k2 in comp}}
    return out


def save_v4_native_checkpoint(state_dict: dict[str, torch.Tensor], config, path: str | os.PathLike, *,
                              fp8: bool = True, expert_dtype: str = "fp4", dtype: torch.dtype = torch.bfloat16,
                              max_shard_bytes: int | None = None, mtp_layers: int = 0) -> Path:
    """Write a transformers-named V4 state dict as a native-named checkpoint (DeepSeek's Hub layout).

    fp8: linear weights of attention, indexer and shared experts as FP8 E4M3 128x128 blocks with E8M0 `.scale`;
    expert_dtype: routed experts as "fp4" (packed E2M1, E8M0 scale per 32 of K), "fp8" (128x128 blocks) or
    "bf16"/None (unquantized, in `dtype`). Other floats are written in `dtype` (bf16 like a real checkpoint),
    sinks, router bias, ape and mHC parameters in fp32, tid2eid int64. mtp_layers: append that many MTP blocks
    (copies of the last layer under `mtp.K.`) to exercise loaders that must skip them. The folder is written
    beside the target and renamed, so a failed save leaves nothing.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"{path}: exists and is not empty; choose a new folder")
    cfg = native_config(config)
    if mtp_layers:
        cfg["num_nextn_predict_layers"] = mtp_layers
        cfg["compress_ratios"] = cfg["compress_ratios"][:cfg["num_hidden_layers"]] + [0] * mtp_layers
    quant_experts = expert_dtype in ("fp4", "fp8")
    if fp8 or quant_experts:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "scale_fmt": "ue8m0", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
        if quant_experts:
            cfg["quantization_config"]["expert_dtype"] = expert_dtype
            cfg["expert_dtype"] = expert_dtype  # where V4-Flash's config.json has it (V4.1 moved it)
    tensors: dict[str, torch.Tensor] = {}

    def put(native: str, t: torch.Tensor, quant: str | None):
        t = t.detach().contiguous()
        if quant == "fp8":
            tensors[native], tensors[_scale_name(native, NATIVE)] = fp8_quantize_e8m0(t)
        elif quant == "fp4":
            tensors[native], tensors[_scale_name(native, NATIVE)] = fp4_quantize(t)
        elif not t.is_floating_point():
            tensors[native] = t.to(torch.int64)
        elif native.endswith(_FP32_NATIVE_SUFFIXES):
            tensors[native] = t.float()
        else:
            tensors[native] = t.to(dtype)

    n_layers = cfg["num_hidden_layers"]
    for name, t in state_dict.items():
        m = _HF_LAYER_RE.match(name)
        if m and m.group(2) in _EXPERTS_HF:
            layer = m.group(1)
            q = expert_dtype if quant_experts else None
            for e in range(t.shape[0]):
                if m.group(2).endswith("gate_up_proj"):
                    half = t.shape[1] // 2
                    put(f"layers.{layer}.ffn.experts.{e}.w1.weight", t[e, :half], q)
                    put(f"layers.{layer}.ffn.experts.{e}.w3.weight", t[e, half:], q)
                else:
                    put(f"layers.{layer}.ffn.experts.{e}.w2.weight", t[e], q)
            continue
        try:
            native = hf_to_native(name)
        except KeyError:
            raise CheckpointError(f"{name!r} is not a DeepSeek-V4 tensor name (transformers 5.24 "
                                  "DeepseekV4ForCausalLM); nothing to write it as") from None
        quant = "fp8" if fp8 and native.split(".", 2)[-1] in _NATIVE_FP8_SUFFIXES else None
        put(native, t, quant)
    for k in range(mtp_layers):  # MTP blocks: the last layer's tensors again, under mtp.K.
        last = f"layers.{n_layers - 1}."
        for native in [n for n in tensors if n.startswith(last)]:
            tensors[f"mtp.{k}.{native[len(last):]}"] = tensors[native].clone()
    return write_folder(path, tensors, lambda f: f.write_text(json.dumps(cfg, indent=2) + "\n"), max_shard_bytes)


__all__ = ["load_v4_state_dict", "save_v4_native_checkpoint", "V4CheckpointSource", "native_config",
           "expected_shapes", "v4_dims", "hf_to_native", "native_to_hf", "fp4_quantize", "fp4_dequantize",
           "fp4_unpack", "fp8_quantize_e8m0", "fp8_dequantize", "e8m0_to_float", "FP4_BLOCK", "E2M1_MAGNITUDES"]
