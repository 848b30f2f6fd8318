"""INT8 weight-only quantization for ONNX Runtime: `com.microsoft.MatMulNBits` with bits=8.

The scheme (what tests/test_quant_int8.py re-implements in numpy):
  W [N=out, K=in] fp32, blocks of `bs` consecutive input channels per output row (bs: the power of
  two in 16..block_size storing the row in the fewest bytes; K zero-padded to a multiple of bs).
  symmetric (default): scale = amax(|block|) / 127 (1.0 for an all-zero block), all in float32;
      q = clip(rint(w / scale), -127, 127) + 128 stored as uint8; zero point 128, which is
      MatMulNBits' default for 8 bits, so no zero_points input is written.
  asymmetric: lo = min(block, 0), hi = max(block, 0); scale = (hi - lo) / 255 (1.0 when 0);
      zp = clip(rint(-lo / scale), 0, 255); q = clip(rint(w / scale) + zp, 0, 255) uint8.
  dequantized W = (q - zp) * scale.
MatMulNBits layout, checked against numpy on ORT 1.32 (tests/test_quant_int8.py): B uint8
[N, K/bs, bs] (row n, block j holds W[n, j*bs:(j+1)*bs]), scales fp32 [N * K/bs] (row-major
[N, K/bs]), zero_points uint8 [N * K/bs]; Y = A @ dequant(B)^T.

Routed experts exported one MatMul per expert over an [E, out, in] table (DeepSeek-V4, which moe-ort-fused
does not lower): with expert_tables=True each expert's slice becomes its own initializer first
(quant_weights.split_expert_tables), so its MatMul is a linear site quantized like any other.

Routed experts fused into `com.microsoft.MoE` (the ort-cpu target's moe-ort-fused pass) are not
MatMuls; they become `com.microsoft.QMoE` int8 (passes/quant_qmoe.py): per output channel (weight-only
numerics) by default, per block with accuracy_level=4 (activations quantized per block inside the
kernel, as MatMulNBits does at that level). `experts="none"` leaves them fp32.

accuracy_level (MatMulNBits and QMoE attribute): None/0 = fp32 activations (weight-only numerics);
4 = the kernels quantize activations to int8 per token per block (symmetric, amax/127) and use
int8 dot products: faster on CPUs with int8 dot-product instructions, no longer weight-only.

scale_dtype "float16" (the ort-cuda target, whose CUDA MatMulNBits takes scales in the activations'
type): each scale is amax/127 rounded to the nearest fp16 (the smallest fp16 subnormal where that
rounds to 0 for a non-zero block), and q is computed against that rounded scale, so the scales are
stored as fp32 values that fp16 holds exactly and the later fp16 conversion changes no dequantized
weight: W = (q - zp) * fp16(scale), exactly.

Storage per weight: 1 byte + 4/bs bytes (+1/bs with zero points): 0.258x of fp32 at bs=128,
0.266x at bs=64, 0.281x at bs=32 -- layers with in_features 32 (the `tiny` preset) cannot reach
0.27x with fp32 scales; real models (K >= 128) are at 0.258x.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from .quant_weights import (DEFAULT_EXCLUDE, QuantizationError, QuantReport, add_initializer, const_bytes,
                            initializer_bytes, record, remove_if_unused, round_scale, select_sites, set_opset,
                            split_expert_tables)


def block_size_for(in_features: int, block_size: int, zero_points: bool = False) -> int:
    """The power-of-two block (16..block_size) that stores a row of `in_features` in the fewest bytes
    (padding included); ties go to the larger block."""
    if block_size < 16 or block_size & (block_size - 1):
        raise QuantizationError(f"MatMulNBits block_size must be a power of two >= 16, got {block_size}")
    best, best_bytes = 16, None
    bs = 16
    while bs <= block_size:
        nb = -(-in_features // bs)
        size = nb * bs + nb * (5 if zero_points else 4)
        if best_bytes is None or size <= best_bytes:
            best, best_bytes = bs, size
        bs *= 2
    return best


SCALE_DTYPES = ("float32", "float16")


def quantize_int8_blocks(w_oi: np.ndarray, block_size: int, symmetric: bool = True, scale_dtype: str = "float32"):
    """fp32 [N, K] -> (q uint8 [N, K/bs, bs], scales fp32 [N, K/bs], zero_points uint8 [N, K/bs], bs)."""
    if scale_dtype not in SCALE_DTYPES:
        raise QuantizationError(f"int8 scale_dtype {scale_dtype!r}: choose one of {', '.join(SCALE_DTYPES)}")
    n, k = w_oi.shape
    bs = block_size_for(k, block_size, zero_points=not symmetric)
    nb = -(-k // bs)
    pad = np.zeros((n, nb * bs), np.float32)
    pad[:, :k] = w_oi
    blocks = pad.reshape(n, nb, bs)
    if symmetric:
        amax = np.abs(blocks).max(-1)
        scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        scale = round_scale(scale, scale_dtype)
        q = np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128
        zp = np.full((n, nb), 128, np.uint8)
    else:
        lo = np.minimum(blocks.min(-1), 0).astype(np.float32)
        hi = np.maximum(blocks.max(-1), 0).astype(np.float32)
        rng = (hi - lo).astype(np.float32)
        scale = np.where(rng > 0, rng / np.float32(255), np.float32(1)).astype(np.float32)
        scale = round_scale(scale, scale_dtype)
        zp = np.clip(np.rint(-lo / scale), 0, 255)
        q = np.clip(np.rint(blocks / scale[..., None]) + zp[..., None], 0, 255)
        zp = zp.astype(np.uint8)
    return q.astype(np.uint8), scale, zp, bs


class Int8WeightOnlyPass(ir.passes.InPlacePass):
    """Linear layers -> MatMulNBits(bits=8). See the module docstring for the exact scheme."""

    def __init__(self, block_size: int = 128, symmetric: bool = True, exclude: Iterable[str] = DEFAULT_EXCLUDE,
                 logits_outputs=("logits",), accuracy_level: int | None = None, experts: str = "auto",
                 scale_dtype: str = "float32", expert_tables: bool = False):
        super().__init__()
        block_size_for(64, block_size)  # validates
        self.expert_tables = expert_tables
        if scale_dtype not in SCALE_DTYPES:
            raise QuantizationError(f"int8 scale_dtype {scale_dtype!r}: choose one of {', '.join(SCALE_DTYPES)}")
        self.scale_dtype = scale_dtype
        if accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise QuantizationError(f"int8 accuracy_level {accuracy_level!r}: MatMulNBits takes 0..4 "
                                    "(0: fp32 activations, 4: int8 activations per block)")
        if experts not in ("auto", "channel", "block", "none"):
            raise QuantizationError(f"int8 experts {experts!r}: choose auto (channel, or block with "
                                    "accuracy_level=4), channel, block or none")
        self.experts = ("block" if accuracy_level == 4 else "channel") if experts == "auto" else experts
        self.block_size, self.symmetric = block_size, symmetric
        self.exclude, self.logits_outputs = tuple(exclude), tuple(logits_outputs)
        self.accuracy_level = accuracy_level
        self.report = QuantReport("int8")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        rep = self.report = QuantReport("int8")
        rep.weights_bytes_before = initializer_bytes(graph)
        if self.expert_tables:  # DeepSeek-V4's per-expert MatMuls over [E, out, in] tables
            rep.notes.append(f"{split_expert_tables(graph)} expert weights sliced from their [E, out, in] tables "
                             "into per-expert linears (quant_weights.split_expert_tables)")
        groups = select_sites(graph, self.exclude, self.logits_outputs, rep)
        if groups:
            set_opset(model, "com.microsoft", 1)
        for group in groups:
            w = group[0].weight
            n, k = group[0].out_features, group[0].in_features
            q, scale, zp, bs = quantize_int8_blocks(group[0].weight_oi, self.block_size, self.symmetric,
                                                    self.scale_dtype)
            base = w.name or "weight"
            qv = add_initializer(graph, f"{base}.q8", q)
            sv = add_initializer(graph, f"{base}.scales", scale.reshape(-1))
            new_inits = [qv, sv]
            if not self.symmetric:
                new_inits.append(add_initializer(graph, f"{base}.zero_points", zp.reshape(-1)))
            attrs = {"K": k, "N": n, "bits": 8, "block_size": bs}
            if self.accuracy_level is not None:
                attrs["accuracy_level"] = self.accuracy_level
            for site in group:
                old = site.node
                nodes = [ir.node("MatMulNBits", [site.activation, *new_inits], attrs, domain="com.microsoft",
                                 name=f"{old.name}.int8")]
                out = nodes[0].outputs[0]
                if old.op_type == "Gemm" and len(old.inputs) > 2 and old.inputs[2] is not None:
                    nodes.append(ir.node("Add", [out, old.inputs[2]], name=f"{old.name}.bias"))
                    out = nodes[-1].outputs[0]
                ir.convenience.replace_nodes_and_values(graph, old, [old], nodes, [old.outputs[0]], [out])
                remove_if_unused(graph, site.transpose.outputs[0] if site.transpose else None)
            remove_if_unused(graph, w)
            after = const_bytes(new_inits)
            rep.add_site(base, group, (n, k), after, block_size=bs)
        moe = False
        if self.experts != "none":
            from .quant_qmoe import QMoEPass
            moe = QMoEPass(self.experts, self.block_size, self.accuracy_level, self.exclude, rep)(model).modified
        if self.scale_dtype != "float32":
            rep.notes.append(f"scales rounded to {self.scale_dtype} before quantizing (stored exactly in that type)")
        if self.accuracy_level is not None:
            rep.notes.append(f"accuracy_level={self.accuracy_level}: " + (
                "activations quantized to int8 per block inside MatMulNBits/QMoE (not weight-only numerics)"
                if self.accuracy_level == 4 else "fp32 activations"))
        rep.weights_bytes_after = initializer_bytes(graph)
        record(model, rep)
        return ir.passes.PassResult(model, modified=bool(groups) or moe)
