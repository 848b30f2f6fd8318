"""INT4 weight-only quantization for ONNX Runtime: `com.microsoft.MatMulNBits` with bits=4 (RTN).

The scheme is the one onnxruntime's own `MatMulNBitsQuantizer` (its default algorithm, round to nearest,
the MLAS `quantize_matmul_4bits` kernel) writes, byte for byte (tests/test_quant_int4.py compares the
two); per output row n, blocks of `bs` consecutive input channels (bs = block_size, 32 by default; K
not a multiple of bs: the last block is partial), all arithmetic in float32:
  asymmetric (default, zero points; MatMulNBitsQuantizer's own default is_symmetric=False -- ONNX Runtime
  GenAI's model builder and the quantizer's command line pass symmetric instead; zero points cost 1/64
  byte per weight at block 32 and halve trained-small's perplexity increase, benchmarks/
  cpu_trained_small_int4_accuracy.json):
      lo = min(block, 0), hi = max(block, 0), scale = (hi - lo) / 15,
      zp = clip(roundf(0 - lo / scale), 0, 15) (zp = 0 when scale is 0),
      q  = clip(roundf(w * (1 / scale) + zp), 0, 15)  (q = zp when scale is 0)
  symmetric: m = the block's value of largest magnitude (the negative one on a tie), scale = -m / 8
      (so m itself maps to code 0, i.e. -8; scale may be negative), zp = 8 (MatMulNBits' default for
      4 bits: no zero_points input), q as above.
  dequantized W = (q - zp) * scale. roundf rounds half away from zero (C's roundf, not rint).
An all-zero block gets scale 0 (dequantizes to 0), as ORT's quantizer writes it.
MatMulNBits layout (bits=4): B uint8 [N, n_blocks, bs/2], byte j of a block holds element 2j in its
low nibble and 2j+1 in its high nibble; input channels past K (the partial last block) are nibble 0;
scales fp32 [N * n_blocks] (row-major [N, n_blocks]); zero_points uint8 [N * ceil(n_blocks/2)]
(row n: block 2i in the low nibble, 2i+1 in the high nibble, an odd row's unused high nibble = 8).
Y = A @ dequant(B)^T.

Block size (option, 16..256, a power of two; a layer whose K is not a multiple of it gets the power of
two <= it storing its rows in the fewest bytes, `block_size_for`, as quant_int8 does): 32 by default, the
ecosystem's CPU default (ONNX Runtime GenAI's model builder, the ORT quantizer's command line): at 4 bits
the error grows quickly with the block (measured on trained-small: benchmarks/
cpu_trained_small_int4_accuracy.json). Storage per weight: 0.5 byte + (4 + 0.5)/bs of scale and zero
point: 0.1602x of fp32 at bs=32, 0.1338x at 128 (symmetric: 0.1563x / 0.1328x).

scale_dtype "float16" (for a target whose MatMulNBits takes scales in fp16, as quant_int8's option): each
scale is rounded to fp16 (sign kept) before the zero point and codes are computed against it; the bytes then
differ from ORT's fp32 quantizer by design, and W = (q - zp) * fp16(scale) exactly.

accuracy_level (MatMulNBits attribute): None/0 = fp32 activations (weight-only numerics, Y equals
A @ dequant(W)^T to float tolerance); 4 = the CPU kernel quantizes activations to int8 per token per
block and uses int8 dot products (ORT GenAI's model builder's CPU default; faster, no longer weight-only).

attention_bits (option, 4 by default): 8 writes the attention-role linears (MLA projections; roles in
passes/quant_weights.py) as quant_int8 does (MatMulNBits bits=8, symmetric, blocks of 128) and keeps 4 bits
for the MLP / shared / routed experts, where a DeepSeek model's bytes are. On trained-small it is what brings
top-1 agreement past 95% (measured: benchmarks/cpu_trained_small_int4_accuracy.json).

dense_mlp_bits (option, 4 by default): 8 writes the MLP linears of the dense layers that precede the first MoE
layer (DeepSeek's first_k_dense_replace layers: the MLP sites upstream of every router, `leading_dense_mlp`) as
the attention linears at attention_bits 8: every later layer reads their error, and in full-size DeepSeek models
they are a small share of the bytes (docs/quantization.md#int4-mixed-precision: where the int4 error of the
randomized x3 checkpoints comes from, and what the rule costs on trained-small).

Routed experts in `com.microsoft.MoE` (the ort-cpu target's moe-ort-fused pass) become
`com.microsoft.QMoE` with expert_weight_bits=4 (passes/quant_qmoe.py), per block of the largest power
of two <= block_size dividing hidden and moe_intermediate, with the same numbers (asymmetric with zero
points, or symmetric) and the same accuracy_level; experts="int8" keeps them int8 as `--quant int8` does,
"none" leaves them fp32.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from .quant_weights import (DEFAULT_EXCLUDE, QuantizationError, QuantReport, add_initializer,
                            const_bytes, find_linear_sites, initializer_bytes, int4_codes, pack_nibbles, record,
                            remove_if_unused, round_scale_signed, select_sites, set_opset)

EXPERT_MODES = ("auto", "block", "channel", "int8", "none")


def check_block_size(block_size: int) -> int:
    if not isinstance(block_size, int) or block_size < 16 or block_size > 256 or block_size & (block_size - 1):
        raise QuantizationError(f"int4 block_size must be a power of two in 16..256, got {block_size!r}")
    return block_size


def block_size_for(in_features: int, block_size: int, zero_points: bool = True) -> int:
    """The power-of-two block (16..block_size) storing a row of `in_features` in the fewest bytes (codes of the
    zero-padded row + 4 per scale + the packed zero points); ties go to the larger block. A row of K a multiple
    of block_size gets block_size itself; only short or ragged rows (the small presets' K = 32, 96, ...) get
    a smaller block, which is never less accurate."""
    check_block_size(block_size)
    best, best_bytes, bs = 16, None, 16
    while bs <= block_size:
        nb = -(-in_features // bs)
        size = nb * bs // 2 + 4 * nb + (-(-nb // 2) if zero_points else 0)
        if best_bytes is None or size <= best_bytes:
            best, best_bytes = bs, size
        bs *= 2
    return best


def quantize_int4_blocks(w_oi: np.ndarray, block_size: int = 32, symmetric: bool = False, scale_dtype: str = "float32"):
    """fp32 [N, K] -> (B uint8 [N, nb, bs/2], scales fp32 [N, nb], packed zero points uint8 [N, ceil(nb/2)],
    zero-point codes uint8 [N, nb]) in MatMulNBits' bits=4 layout (module docstring)."""
    bs = check_block_size(block_size)
    n, k = w_oi.shape
    nb = -(-k // bs)
    pad = np.zeros((n, nb * bs), np.float32)
    pad[:, :k] = w_oi
    q, scale, zp = int4_codes(pad.reshape(n, nb, bs), symmetric, scale_dtype)
    q = q.reshape(n, nb * bs)
    q[:, k:] = 0  # ORT's quantizer leaves the padding past K at nibble 0
    return pack_nibbles(q.reshape(n, nb, bs)), scale, pack_nibbles(zp, pad=8), zp


def dequantize_int4(b: np.ndarray, scales: np.ndarray, k: int, zero_points: np.ndarray | None = None) -> np.ndarray:
    """The inverse as MatMulNBits reads it: B [N, nb, bs/2], scales [N*nb] or [N, nb], zero points packed
    [N*ceil(nb/2)] or None (8) -> fp32 [N, K]."""
    n, nb, half = b.shape
    codes = np.stack([b & 0xF, b >> 4], -1).reshape(n, nb, 2 * half).astype(np.float32)
    if zero_points is None:
        zp = np.full((n, nb), 8, np.float32)
    else:
        zpb = zero_points.reshape(n, -1)
        zp = np.stack([zpb & 0xF, zpb >> 4], -1).reshape(n, -1)[:, :nb].astype(np.float32)
    w = (codes - zp[..., None]) * scales.reshape(n, nb)[..., None]
    return w.reshape(n, nb * 2 * half)[:, :k].astype(np.float32)


def leading_dense_mlp(graph: ir.Graph, logits_outputs=("logits",)) -> set[int]:
    """id(node) of each `mlp` linear site upstream of every MoE router (the router-role sites): the MLPs of the
    dense layers before the first MoE layer. Empty for a graph without routers."""
    sites = find_linear_sites(graph, logits_outputs)
    routers = [s for s in sites if s.role == "router"]
    if not routers:
        return set()
    common = None
    for r in routers:
        seen, stack = set(), [r.activation]
        while stack:
            p = stack.pop().producer()
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            stack.extend(i for i in p.inputs if i is not None and i.const_value is None)
        common = seen if common is None else common & seen
    return {id(s.node) for s in sites if s.role == "mlp" and id(s.node) in common}


class Int4WeightOnlyPass(ir.passes.InPlacePass):
    """Linear layers -> MatMulNBits(bits=4), routed experts -> QMoE 4-bit. See the module docstring."""

    def __init__(self, block_size: int = 32, symmetric: bool = False, exclude: Iterable[str] = DEFAULT_EXCLUDE,
                 logits_outputs=("logits",), accuracy_level: int | None = None, experts: str = "auto",
                 attention_bits: int = 4, scale_dtype: str = "float32", dense_mlp_bits: int = 4):
        super().__init__()
        check_block_size(block_size)
        round_scale_signed(np.zeros(1, np.float32), scale_dtype)  # validates
        self.scale_dtype = scale_dtype
        if attention_bits not in (4, 8):
            raise QuantizationError(f"int4 attention_bits {attention_bits!r}: 4 or 8 (MatMulNBits as --quant int8)")
        self.attention_bits = attention_bits
        if dense_mlp_bits not in (4, 8):
            raise QuantizationError(f"int4 dense_mlp_bits {dense_mlp_bits!r}: 4 or 8 (MatMulNBits as --quant int8)")
        self.dense_mlp_bits = dense_mlp_bits
        if accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise QuantizationError(f"int4 accuracy_level {accuracy_level!r}: MatMulNBits takes 0..4 "
                                    "(0: fp32 activations, 4: int8 activations per block)")
        if experts not in EXPERT_MODES:
            raise QuantizationError(f"int4 experts {experts!r}: choose one of {', '.join(EXPERT_MODES)} "
                                    "(auto = block: QMoE 4-bit per block)")
        self.experts = "block" if experts == "auto" else experts
        self.block_size, self.symmetric = block_size, symmetric
        self.exclude, self.logits_outputs = tuple(exclude), tuple(logits_outputs)
        self.accuracy_level = accuracy_level
        self.report = QuantReport("int4")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        rep = self.report = QuantReport("int4")
        rep.weights_bytes_before = initializer_bytes(graph)
        groups = select_sites(graph, self.exclude, self.logits_outputs, rep)
        if groups:
            set_opset(model, "com.microsoft", 1)
        dense = leading_dense_mlp(graph, self.logits_outputs) if self.dense_mlp_bits == 8 else set()
        for group in groups:
            w = group[0].weight
            n, k = group[0].out_features, group[0].in_features
            base = w.name or "weight"
            why = None
            if group[0].role == "attention" and self.attention_bits == 8:
                why = "attention linear (attention_bits 8)"
            elif any(id(s.node) in dense for s in group):
                why = "dense MLP before the first MoE layer (dense_mlp_bits 8)"
            bits = 8 if why else 4
            if bits == 8:
                from .quant_int8 import quantize_int8_blocks
                b, scale, _, bs = quantize_int8_blocks(group[0].weight_oi, 128, scale_dtype=self.scale_dtype)
                new_inits = [add_initializer(graph, f"{base}.q8", b), add_initializer(graph, f"{base}.scales", scale.reshape(-1))]
            else:
                bs = block_size_for(k, self.block_size, not self.symmetric)
                b, scale, zp, _ = quantize_int4_blocks(group[0].weight_oi, bs, self.symmetric, self.scale_dtype)
                new_inits = [add_initializer(graph, f"{base}.q4", b), add_initializer(graph, f"{base}.scales", scale.reshape(-1))]
                if not self.symmetric:
                    new_inits.append(add_initializer(graph, f"{base}.zero_points", zp.reshape(-1)))
            attrs = {"K": k, "N": n, "bits": bits, "block_size": bs}
            if self.accuracy_level:  # 0 is the attribute's default: written only when non-zero (as ORT's quantizer)
                attrs["accuracy_level"] = self.accuracy_level
            for site in group:
                old = site.node
                nodes = [ir.node("MatMulNBits", [site.activation, *new_inits], attrs, domain="com.microsoft",
                                 name=f"{old.name}.int{bits}")]
                out = nodes[0].outputs[0]
                if old.op_type == "Gemm" and len(old.inputs) > 2 and old.inputs[2] is not None:
                    nodes.append(ir.node("Add", [out, old.inputs[2]], name=f"{old.name}.bias"))
                    out = nodes[-1].outputs[0]
                ir.convenience.replace_nodes_and_values(graph, old, [old], nodes, [old.outputs[0]], [out])
                remove_if_unused(graph, site.transpose.outputs[0] if site.transpose else None)
            remove_if_unused(graph, w)
            rep.add_site(base, group, (n, k), const_bytes(new_inits), block_size=bs, bits=bits,
                         zero_points=bits == 4 and not self.symmetric, **({"why_8bit": why} if why else {}))
        moe = False
        if self.experts != "none":
            from .quant_qmoe import QMoEPass
            if self.experts == "int8":
                qp = QMoEPass("block" if self.accuracy_level == 4 else "channel", 128, self.accuracy_level,
                              self.exclude, rep, scale_dtype=self.scale_dtype)
            else:
                qp = QMoEPass(self.experts, self.block_size, self.accuracy_level, self.exclude, rep, bits=4,
                              symmetric=self.symmetric, scale_dtype=self.scale_dtype)
            moe = qp(model).modified
        kept = [q["weight"] for q in rep.quantized if "dense MLP" in q.get("why_8bit", "")]
        rep.notes.append(f"int4 RTN, block {self.block_size}, " + ("symmetric (zero point 8)" if self.symmetric
                                                                   else "asymmetric (zero points)")
                         + ("; attention linears int8 (MatMulNBits bits=8, symmetric, blocks of 128)"
                            if self.attention_bits == 8 else "")
                         + (f"; {len(kept)} dense-layer MLP linears before the first MoE layer int8 (dense_mlp_bits 8"
                            f"{': ' + ', '.join(kept) if kept else ''})" if self.dense_mlp_bits == 8 else ""))
        if self.scale_dtype != "float32":
            rep.notes.append(f"scales rounded to {self.scale_dtype} before quantizing (stored exactly in that type)")
        if self.accuracy_level is not None:
            rep.notes.append(f"accuracy_level={self.accuracy_level}: " + (
                "activations quantized to int8 per block inside MatMulNBits/QMoE (not weight-only numerics)"
                if self.accuracy_level == 4 else "fp32 activations"))
        rep.weights_bytes_after = initializer_bytes(graph)
        record(model, rep)
        return ir.passes.PassResult(model, modified=bool(groups) or moe)
