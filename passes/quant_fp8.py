"""FP8 E4M3 weight quantization with 128x128 blocks, as standard ONNX (blocked DequantizeLinear, opset 21).

The scheme is DeepSeek-V3's checkpoint format (REFERENCE.md section 1), what tests/test_quant_fp8.py
re-implements in numpy:
  W [out, in] fp32 in 128x128 blocks (zero-padded at the edges);
  scale_inv[bo, bi] = amax(|block|) / 448 (fp32, clamped below at 1e-12 / 448);
  q = float8_e4m3fn(W / scale_inv[block]) (round to nearest even; |x| <= 448 so never saturates);
  dequantized W = float32(q) * scale_inv[block].
It is `models.checkpoint.fp8_block_quantize`, used here so a model quantized by this pass and a
checkpoint written by `models.save(model, dir, fp8=True)` hold the same bytes.

FP8 checkpoints pass through: when `model` was loaded from an FP8 checkpoint, every graph weight
whose fp32 values equal a stored FP8 weight's dequantized values (matched by content, not by name)
takes that weight's e4m3 bytes and weight_scale_inv exactly as stored (no requantization).

Graph form per weight (2-D blocks are not expressible in ONNX's blocked DequantizeLinear, which
blocks one axis, and ORT 1.32's CPU kernel rejects a scale that differs from x in more than the
block axis: "x_scale and x must have the same shape despite the quantize axis"):
    w_fp8 [out, in] float8e4m3fn      (the checkpoint's bytes, unchanged)
    scale_inv [ceil(out/128), ceil(in/128)] fp32   (the checkpoint's scales, unchanged)
    rows = Gather(scale_inv, row_block_index[out] int32 = arange(out) // 128, axis=0)   [out, ceil(in/128)]
    w = DequantizeLinear(w_fp8, rows, axis=1, block_size=128)                            [out, in] fp32
    MatMul(x, Transpose(w)) | Gemm(x, w, transB=1)
`rows` holds only constants, so ORT folds it once at session start; the file stores the compact
2-D scales (0.25x of fp32 plus 4 bytes per row for the shared int32 index, per distinct out).
fp8 -> float DequantizeLinear runs on ORT CPU (fp8 -> bf16 has no CPU kernel).

Optional activations="dynamic" (for targets with FP8 GEMMs; DeepSeek-V3's `act_quant`): each quantized
site's input x is quantized per token per 128 channels, in the graph:
    s = max(amax(|x_block|), 1e-4) / 448        x' = float32(float8_e4m3fn(x_block / s)) * s
(round to nearest even; |x/s| <= 448, never saturates). A last partial block (in_features not a multiple
of 128) is zero-padded, which leaves its amax unchanged. Graph: Pad(last axis) -> Reshape [-1, 128] ->
ReduceMax(Abs) -> Max -> Div -> Cast(e4m3) -> Cast(float) -> Mul -> Reshape -> Slice. On ORT CPU this
simulates the FP8 activations in fp32 (no FP8 GEMM), exactly up to accumulation order. Sites sharing
an input (gate/up) share one quantized activation.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from models.checkpoint import FP8_BLOCK, fp8_block_quantize

from .quant_weights import (DEFAULT_EXCLUDE, QuantizationError, QuantReport, add_initializer, const_bytes, initializer_bytes, record,
                            remove_if_unused, select_sites, set_opset)


ACTIVATIONS = ("none", "dynamic")
ACT_EPS = 1e-4
E4M3_MAX = 448.0


def _act_quant(graph: ir.Graph, x: ir.Value, k: int, before: ir.Node, base: str) -> ir.Value:
    """Insert x -> per-token-per-128 FP8 fake quantization of x (last axis k) before `before`; -> x'."""
    nb = -(-k // FP8_BLOCK)
    c = lambda name, a: add_initializer(graph, f"{base}.{name}", np.asarray(a))  # noqa: E731
    nodes = []

    def op(op_type, inputs, **attrs):
        nodes.append(ir.node(op_type, inputs, attrs or None, name=f"{base}/{op_type.lower()}{len(nodes)}"))
        return nodes[-1].outputs[0]

    xp = x if nb * FP8_BLOCK == k else op("Pad", [x, c("pads", np.array([0, nb * FP8_BLOCK - k], np.int64)), None,
                                                  c("pad_axes", np.array([-1], np.int64))])
    blocks = op("Reshape", [xp, c("block_shape", np.array([-1, FP8_BLOCK], np.int64))])
    amax = op("ReduceMax", [op("Abs", [blocks]), c("axes", np.array([-1], np.int64))], keepdims=1)
    scale = op("Div", [op("Max", [amax, c("eps", np.float32(ACT_EPS))]), c("e4m3_max", np.float32(E4M3_MAX))])
    q = op("Cast", [op("Div", [blocks, scale])], to=ir.DataType.FLOAT8E4M3FN)
    y = op("Reshape", [op("Mul", [op("Cast", [q], to=ir.DataType.FLOAT), scale]), op("Shape", [xp])])
    if xp is not x:
        y = op("Slice", [y, c("start", np.array([0], np.int64)), c("end", np.array([k], np.int64)),
                         c("slice_axes", np.array([-1], np.int64))])
    y.name = f"{base}.quantized"
    y.dtype, y.shape = ir.DataType.FLOAT, x.shape
    graph.insert_before(before, nodes)
    return y


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


def fp8_to_numpy(t: torch.Tensor) -> np.ndarray:
    """torch float8_e4m3fn -> numpy ml_dtypes.float8_e4m3fn with the same bytes."""
    return t.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)


def checkpoint_fp8_weights(model) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """{content digest of the fp32 weight: (checkpoint name, e4m3 bytes, scale_inv)} of an FP8 checkpoint."""
    src = getattr(model, "checkpoint", None) if model is not None else None
    if src is None or not src.fp8_names:
        return {}
    state = model.state_dict()
    out = {}
    for name in src.fp8_names:
        out[_digest(state[name].detach().numpy())] = (name, *src_raw(src, name))
    return out


def src_raw(src, name: str) -> tuple[np.ndarray, np.ndarray]:
    w, s = src.raw_fp8(name)
    return fp8_to_numpy(w), s.float().numpy()


class Fp8WeightPass(ir.passes.InPlacePass):
    """Linear layers -> float8e4m3fn weights + 128x128 block scales + DequantizeLinear (opset 21)."""

    def __init__(self, model=None, exclude: Iterable[str] = DEFAULT_EXCLUDE, logits_outputs=("logits",),
                 activations: str = "none"):
        super().__init__()
        if activations not in ACTIVATIONS:
            raise QuantizationError(f"fp8 activations {activations!r}: choose one of {', '.join(ACTIVATIONS)}")
        self.activations = activations
        self.model = model
        self.exclude, self.logits_outputs = tuple(exclude), tuple(logits_outputs)
        self.report = QuantReport("fp8")
        self._stored = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        rep = self.report = QuantReport("fp8")
        rep.weights_bytes_before = initializer_bytes(graph)
        if self._stored is None:
            self._stored = checkpoint_fp8_weights(self.model)
        groups = select_sites(graph, self.exclude, self.logits_outputs, rep)
        if groups:
            set_opset(model, "", 21)
        row_index: dict[int, ir.Value] = {}
        act_q: dict[int, ir.Value] = {}  # id(activation) -> its quantized form
        passed = 0
        for group in groups:
            w = group[0].weight
            w_oi = group[0].weight_oi
            out_f, in_f = w_oi.shape
            hit = self._stored.get(_digest(w_oi))
            if hit is not None:
                source, q, scale = hit
                passed += 1
            else:
                tq, ts = fp8_block_quantize(torch.from_numpy(w_oi.copy()))
                source, q, scale = None, fp8_to_numpy(tq), ts.numpy().astype(np.float32)
            base = w.name or "weight"
            qv = add_initializer(graph, f"{base}.fp8", q)
            sv = add_initializer(graph, f"{base}.weight_scale_inv", scale)
            if out_f not in row_index:
                row_index[out_f] = add_initializer(graph, f"fp8_row_block_index_{out_f}",
                                                   (np.arange(out_f) // FP8_BLOCK).astype(np.int32))
            gather = ir.node("Gather", [sv, row_index[out_f]], {"axis": 0}, name=f"{base}.scale_rows")
            dq = ir.node("DequantizeLinear", [qv, gather.outputs[0]], {"axis": 1, "block_size": FP8_BLOCK},
                         name=f"{base}.dq")
            dq.outputs[0].name = f"{base}.dequantized"
            prelude = [gather, dq]
            oi = dq.outputs[0]
            io = None
            for site in group:
                if site.node.op_type == "Gemm" and site.weight_is_oi:
                    feed = oi
                else:  # MatMul (and Gemm with transB=0) take [in, out]
                    if io is None:
                        t = ir.node("Transpose", [oi], {"perm": [1, 0]}, name=f"{base}.dq_t")
                        prelude.append(t)
                        io = t.outputs[0]
                    feed = io
                first = site.transpose or site.node
                graph.insert_before(first, prelude)
                prelude = []
                site.node.replace_input_with(1, feed)
                remove_if_unused(graph, site.transpose.outputs[0] if site.transpose else None)
            remove_if_unused(graph, w)
            if self.activations == "dynamic":
                for site in group:
                    x = site.activation
                    if id(x) not in act_q:
                        act_q[id(x)] = _act_quant(graph, x, in_f, site.node, f"{base}.act")
                    site.node.replace_input_with(0, act_q[id(x)])
            after = const_bytes([qv, sv])
            rep.add_site(base, group, (out_f, in_f), after, checkpoint_name=source,
                         activations="fp8 e4m3 dynamic per token per 128" if self.activations == "dynamic" else "fp32")
        if self._stored:
            rep.notes.append(f"{passed} of {len(groups)} weights are the FP8 checkpoint's own bytes and scales, "
                             f"passed through unchanged ({len(self._stored)} FP8 weights in the checkpoint)")
        if act_q:
            rep.notes.append(f"activations: dynamic FP8 E4M3 per token per {FP8_BLOCK} channels "
                             f"(scale max(amax, {ACT_EPS})/448) at {len(act_q)} distinct inputs")
        if row_index:
            rep.notes.append(f"{const_bytes(row_index.values())} bytes of shared int32 row-block indices")
        rep.weights_bytes_after = initializer_bytes(graph)
        record(model, rep)
        return ir.passes.PassResult(model, modified=bool(groups))
