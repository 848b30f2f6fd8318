"""INT8 routed experts for ONNX Runtime: `com.microsoft.MoE` (fp32, from passes/moe_lowering.py
"ort-fused") -> `com.microsoft.QMoE` with expert_weight_bits=8. Everything else of the node (router
input, k, swiglu_fusion=1 interleaved gate/up rows, normalize_routing_weights, activation alpha/beta)
is kept as it was.

Two granularities, because ORT 1.32's CPU kernel computes them differently (measured against numpy,
tests/test_quant_qmoe.py):
  "channel"  no block_size: one scale per output row of each expert (scale [E, N]). The CPU kernel
             dequantizes the weights and keeps fp32 activations: weight-only numerics, exactly
             x @ dequant(W)^T. The default of `--quant int8`.
  "block"    block_size bs along K (scale [E, N, K/bs]; bs must divide hidden and moe_intermediate, so
             the largest power of two in 16..block_size dividing both). The CPU kernel ALWAYS
             quantizes the activations too, per token per block of bs (symmetric, amax/127,
             round-half-even, like MatMulNBits accuracy_level=4), at every accuracy_level: W8A8-like
             numerics. Used for `--quant int8` with accuracy_level=4, where MatMulNBits does the same.
Routing: ORT 1.32's CPU QMoE always weights the k chosen experts by the softmax of their router_probs
over those k (as MoE does with normalize_routing_weights=1), while MoE with normalize_routing_weights=0
weights them by the softmax over ALL experts (the V2-Lite softmax-greedy router without norm_topk_prob).
Equal when router_probs are -inf outside the chosen experts (MoEGroupRouter, the log-weight form of
moe_lowering), not in general; so for normalize_routing_weights=0 the pass feeds QMoE's router_weights
input Softmax(router_probs) over all experts, whose values at the chosen experts are MoE's weights exactly
(QMoE then uses them as they are; measured, tests/test_quant_qmoe.py).
Weights (both): symmetric, scale = amax/127 (1.0 for an all-zero row/block), q = clip(rint(w/scale),
-127, 127) + 128 as uint8, zero point 128 = QMoE's default for 8 bits (no zero-point input);
dequantized W = (q - 128) * scale. Layout (weights_prepacked=0, the raw layout): fc1 uint8 [E, 2I, h]
(row n of expert e holds W[e, n, :] in input-channel order), fc2 uint8 [E, h, I].
For the ort-cuda target (fp16 activations; onnxruntime-gpu 1.31.1's CUDA QMoE reads this raw layout when
weights_prepacked=0, measured on the H200: benchmarks/h200_ort_cuda_int8.json qmoe_probe): scale_dtype
"float16" rounds each scale to fp16 before q is computed (as passes/quant_int8.py does), and
router_weights=False leaves out the Softmax router_weights input (a CPU-kernel workaround, not needed for
the log-weight router form, whose router_probs are -inf outside the chosen experts).
Storage: 1 byte per weight + 4 bytes per scale: (1 + 4/K)/4 of fp32 per channel, (1 + 4/bs)/4 per block.

4-bit experts (bits=4, `--quant int4`, passes/quant_int4.py): expert_weight_bits=4, the same per-row / per-block
round-to-nearest numbers as MatMulNBits 4-bit (quant_weights.int4_codes: asymmetric with zero points by default,
or symmetric scale = -m/8 with QMoE's 4-bit default zero point 8). Layout (weights_prepacked=0): fc1 uint8
[E, 2I, h/2], fc2 uint8 [E, h, I/2], element 2j of a row in the low nibble of byte j; zero points (asymmetric)
fc1_zero_points / fc2_zero_points (inputs 11, 12) uint8 [E, N, ceil(nb/2)] per block, [E, ceil(N/2)] per channel,
packed two per byte the same way. Unlike 8-bit blocks, ORT 1.32's CPU kernel keeps fp32 activations for 4-bit
blocks at accuracy_level None/0 (weight-only numerics, x @ dequant(W)^T to float rounding) and quantizes them
to int8 per token per block (as above) only at accuracy_level=4; measured against numpy, tests/test_quant_int4.py.
Storage: (0.5 + 4/bs [+ 0.5/bs with zero points]) bytes per weight.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from .graph_utils import attr, const_array
from .quant_weights import (ROLES, QuantizationError, QuantReport, add_initializer, int4_codes, pack_nibbles,
                            remove_if_unused, round_scale, set_opset)

MS_DOMAIN = "com.microsoft"
GRANULARITIES = ("channel", "block")
_KEPT_ATTRS = ("k", "activation_type", "swiglu_fusion", "normalize_routing_weights", "activation_alpha",
               "activation_beta", "use_sparse_mixer", "swiglu_limit")


def qmoe_block_size(hidden: int, inter: int, block_size: int = 128) -> int | None:
    """The largest power of two in 16..block_size dividing both hidden and inter (QMoE requires it); None if none."""
    bs = block_size
    while bs >= 16:
        if hidden % bs == 0 and inter % bs == 0:
            return bs
        bs //= 2
    return None


def quantize_experts_int8(w: np.ndarray, block_size: int | None = None,
                          scale_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """fp32 [E, N, K] -> (q uint8 [E, N, K], scales fp32 [E, N] (block_size None) or [E, N, K/bs])."""
    e, n, k = w.shape
    bs = k if block_size is None else block_size
    if k % bs:
        raise QuantizationError(f"QMoE block_size {bs} does not divide the expert weight's input dim {k}")
    blocks = w.astype(np.float32).reshape(e, n, k // bs, bs)
    amax = np.abs(blocks).max(-1)
    scale = round_scale(np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32), scale_dtype)
    q = (np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128).astype(np.uint8).reshape(e, n, k)
    return q, (scale[..., 0] if block_size is None else scale)


def quantize_experts_int4(w: np.ndarray, block_size: int | None = None, symmetric: bool = False,
                          scale_dtype: str = "float32"):
    """fp32 [E, N, K] -> (packed uint8 [E, N, K/2], scales fp32 [E, N] (block_size None) or [E, N, K/bs],
    packed zero points uint8 [E, ceil(N/2)] or [E, N, ceil(K/bs/2)], or None when symmetric)."""
    e, n, k = w.shape
    bs = k if block_size is None else block_size
    if k % bs or k % 2:
        raise QuantizationError(f"QMoE 4-bit block_size {bs} does not divide the expert weight's input dim {k}")
    q, scale, zp = int4_codes(w.astype(np.float32).reshape(e, n, k // bs, bs), symmetric, scale_dtype)
    packed = pack_nibbles(q.reshape(e, n, k))
    if block_size is None:
        scale, zp = scale[..., 0], zp[..., 0]
    return packed, scale, None if symmetric else pack_nibbles(zp, pad=8)


def _excluded(node: ir.Node, weights: Iterable[ir.Value], exclude: Iterable[str]) -> str | None:
    for pat in exclude:
        if pat in ("mlp", "experts"):
            return f"role {pat} excluded"
        if pat in ROLES:  # another role (lm_head, router, attention): not these weights
            continue
        names = [node.name or ""] + [w.name or "" for w in weights]
        if any(fnmatch.fnmatchcase(nm, pat) for nm in names):
            return f"matches exclude pattern {pat!r}"
    return None


class QMoEPass(ir.passes.InPlacePass):
    """Every `com.microsoft.MoE` with constant fp32 fc1/fc2 (and no fc3, no biases) -> `QMoE` int8 (bits=8) or
    int4 (bits=4; symmetric or with zero points).

    granularity "channel" (weight-only numerics) or "block" (block_size, activations quantized per
    block inside the kernel); accuracy_level is written to the node when given. Results are added to
    `report` (a QuantReport shared with the linear-layer pass, role "routed_experts").
    """

    def __init__(self, granularity: str = "channel", block_size: int = 128, accuracy_level: int | None = None,
                 exclude: Iterable[str] = (), report: QuantReport | None = None, scale_dtype: str = "float32",
                 router_weights: bool = True, bits: int = 8, symmetric: bool = True):
        super().__init__()
        self.scale_dtype, self.router_weights = scale_dtype, router_weights
        if bits not in (4, 8):
            raise QuantizationError(f"QMoE expert bits {bits!r}: 4 or 8")
        if bits == 8 and not symmetric:
            raise QuantizationError("QMoE 8-bit experts are symmetric only here")
        self.bits, self.symmetric = bits, symmetric
        if granularity not in GRANULARITIES:
            raise QuantizationError(f"QMoE granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
        self.granularity, self.block_size, self.accuracy_level = granularity, block_size, accuracy_level
        self.exclude = tuple(exclude)
        self.report = report if report is not None else QuantReport("int8")

    def _activations(self, bs: int | None) -> str:
        """What the ORT 1.32 CPU kernel does to the activations (module docstring)."""
        if bs is None or (self.bits == 4 and self.accuracy_level != 4):
            return "fp32 (weight-only)"
        return f"int8 per token per {bs}-block inside the kernel"

    def _skip(self, node: ir.Node, reason: str) -> None:
        self.report.skipped.append({"node": node.name, "weight": "", "role": "routed_experts", "reason": reason})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, rep = model.graph, self.report
        changed = False
        for node in list(graph):
            if node.op_type != "MoE" or node.domain != MS_DOMAIN:
                continue
            ins = list(node.inputs) + [None] * (8 - len(node.inputs))
            fc1_v, fc2_v = ins[2], ins[4]
            if any(v is not None for v in (ins[3], *ins[5:])):
                self._skip(node, "MoE with biases or fc3 weights: no QMoE form written for it")
                continue
            fc1, fc2 = const_array(fc1_v), const_array(fc2_v)
            if fc1 is None or fc2 is None or fc1.dtype != np.float32 or fc2.dtype != np.float32:
                self._skip(node, "expert weights are not fp32 constants")
                continue
            reason = _excluded(node, (fc1_v, fc2_v), self.exclude)
            if reason:
                self._skip(node, reason)
                continue
            if attr(node, "activation_type", "relu") != "swiglu" or attr(node, "swiglu_fusion", 0) != 1:
                self._skip(node, "only activation swiglu with swiglu_fusion=1 (interleaved gate/up) is converted")
                continue
            E, two_i, h = fc1.shape
            inter = two_i // 2
            bs = None
            if self.granularity == "block":
                bs = qmoe_block_size(h, inter, self.block_size)
                if bs is None:
                    self._skip(node, f"no power-of-two block in 16..{self.block_size} divides hidden {h} and "
                                     f"moe_intermediate {inter}")
                    continue
            zps = []
            if self.bits == 8:
                q1, s1 = quantize_experts_int8(fc1, bs, self.scale_dtype)
                q2, s2 = quantize_experts_int8(fc2, bs, self.scale_dtype)
            else:
                q1, s1, z1 = quantize_experts_int4(fc1, bs, self.symmetric, self.scale_dtype)
                q2, s2, z2 = quantize_experts_int4(fc2, bs, self.symmetric, self.scale_dtype)
            base = node.name or fc1_v.name or "moe"
            tag = f"q{self.bits}"
            new = [add_initializer(graph, f"{fc1_v.name}.{tag}", q1), add_initializer(graph, f"{fc1_v.name}.scales", s1),
                   add_initializer(graph, f"{fc2_v.name}.{tag}", q2), add_initializer(graph, f"{fc2_v.name}.scales", s2)]
            if self.bits == 4 and not self.symmetric:
                zps = [add_initializer(graph, f"{fc1_v.name}.zero_points", z1),
                       add_initializer(graph, f"{fc2_v.name}.zero_points", z2)]
            attrs = {a: node.attributes[a].value for a in _KEPT_ATTRS if a in node.attributes}
            attrs.update(expert_weight_bits=self.bits, weights_prepacked=0, quant_type="int")
            if bs is not None:
                attrs["block_size"] = bs
            if self.accuracy_level is not None:
                attrs["accuracy_level"] = self.accuracy_level
            q_inputs = [ins[0], ins[1], new[0], new[1], None, new[2], new[3]]
            if zps:
                q_inputs += [None] * 4 + zps  # fc1_zero_points, fc2_zero_points are QMoE inputs 11, 12
            nodes = []
            if self.router_weights and not attr(node, "normalize_routing_weights", 0):
                nodes.append(ir.node("Softmax", [ins[1]], {"axis": -1}, name=f"{base}.router_weights"))
                nodes[0].outputs[0].name = f"{base}.router_weights"
                q_inputs += [None] * (14 - len(q_inputs)) + [nodes[0].outputs[0]]  # router_weights is QMoE input 14
            qnode = ir.node("QMoE", q_inputs, attrs, domain=MS_DOMAIN, name=f"{base}.int{self.bits}")
            nodes.append(qnode)
            ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, [node.outputs[0]], [qnode.outputs[0]])
            remove_if_unused(graph, fc1_v, fc2_v)
            before = (fc1.size + fc2.size) * 4
            after = sum(v.const_value.nbytes for v in new + zps)
            rep.quantized.append({"weight": f"{fc1_v.name}, {fc2_v.name}", "nodes": [qnode.name], "role": "routed_experts",
                                  "op": "com.microsoft.QMoE", "shape": [E, two_i, h], "experts": E,
                                  "granularity": self.granularity, "block_size": bs, "bits": self.bits,
                                  "activations": self._activations(bs),
                                  "bytes_before": before, "bytes_after": after})
            rep.linear_bytes_before += before
            rep.linear_bytes_after += after
            changed = True
        if changed:
            set_opset(model, MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=changed)
