"""FP8 128x128-block weights in the form onnxruntime-gpu's CUDA EP runs.

passes/quant_fp8.py writes each weight as one blocked DequantizeLinear (float8e4m3fn, block_size 128,
axis 1, scale = Gather(scale_inv, row_block_index)). onnxruntime-gpu 1.31.1 places that node on the
CUDA EP and fails at run time ("Unsupported quantization type"), with CPU fallback allowed or not;
per-tensor and per-axis fp8 DequantizeLinear run there (measured on an H200:
benchmarks/h200_fp8_dequantize_probe.json). There is no ORT op for a 2-D-blocked FP8 weight, so this
pass rewrites each blocked DQ into a per-tensor DQ followed by the block scales, in standard ONNX:

    w_fp8 [out, in] float8e4m3fn      (the same initializer: checkpoint bytes unchanged)
    rows = Gather(scale_inv, row_block_index)                      [out, nb] fp32 (as before)
    w = DequantizeLinear(w_fp8, 1.0f)                              [out, in] fp32: float32(q), exact
        [-> Pad(0, nb*128 - in on the last axis)]                  only when in % 128 != 0
        -> Reshape [out, nb, 128] -> Mul(Unsqueeze(rows, 2))       float32(q) * scale_inv[block], exact
        -> Reshape [out, nb*128] [-> Slice [:, :in]]               [out, in] fp32

So the dequantized weight equals the blocked DQ's, value for value (one fp32 product per element),
and targets/ort_cuda.to_fp16 rounds it once to fp16 where a fp16 MatMul/Gemm reads it (these nodes
read only constants, so they stay fp32). ORT does not constant-fold DequantizeLinear (measured: it is in
the CUDA profile at ORT_ENABLE_ALL), so the fp8 bytes stay resident and each weight is dequantized on
every run before an fp16 GEMM: a memory saving, not a speed-up (no FP8 GEMM kernel in ORT). Only the
rows Gather/Unsqueeze (compact, [out, nb, 1]) fold at session start.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .quant_weights import add_initializer

FP8 = ir.DataType.FLOAT8E4M3FN


def _is_blocked_fp8(node: ir.Node) -> bool:
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    bs = node.attributes.get("block_size")
    q = node.inputs[0]
    return (bs is not None
            and bs.as_int() > 0 and q is not None and q.dtype == FP8 and q.const_value is not None
            and len(q.shape) == 2 and node.attributes.get("axis") is not None
            and node.attributes["axis"].as_int() in (1, -1))


class Fp8CudaFormPass(ir.passes.InPlacePass):
    """Blocked fp8 DequantizeLinear (axis 1) -> per-tensor DequantizeLinear x block scales (module doc)."""

    def __init__(self):
        super().__init__()
        self.rewritten = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        consts: dict[tuple, ir.Value] = {}

        def const(key: str, array: np.ndarray) -> ir.Value:
            k = (key, array.dtype.str, tuple(np.ravel(array).tolist()))
            if k not in consts:
                consts[k] = add_initializer(g, f"fp8_cuda_{key}", array)
            return consts[k]

        self.rewritten = 0
        for dq in [n for n in g if _is_blocked_fp8(n)]:
            bs = dq.attributes["block_size"].as_int()
            q, rows = dq.inputs[0], dq.inputs[1]
            out_f, in_f = (int(d) for d in q.shape)
            nb = -(-in_f // bs)
            base = dq.name or q.name
            nodes: list[ir.Node] = []

            def op(op_type, inputs, suffix, **attrs):
                nodes.append(ir.node(op_type, inputs, attrs or None, name=f"{base}/fp8_cuda_{suffix}"))
                out = nodes[-1].outputs[0]
                out.dtype = ir.DataType.FLOAT
                return out

            w = op("DequantizeLinear", [q, const("one", np.array(1.0, np.float32))], "dq")
            w.shape = ir.Shape([out_f, in_f])
            if nb * bs != in_f:
                w = op("Pad", [w, const("pads", np.array([0, 0, 0, nb * bs - in_f], np.int64))], "pad")
            blocks = op("Reshape", [w, const("shape3", np.array([out_f, nb, bs], np.int64))], "blocks")
            scales = op("Unsqueeze", [rows, const("axis2", np.array([2], np.int64))], "scales")
            scales.shape = ir.Shape([out_f, nb, 1])
            y = op("Reshape", [op("Mul", [blocks, scales], "scale"),
                               const("shape2", np.array([out_f, nb * bs], np.int64))], "rows")
            if nb * bs != in_f:
                y = op("Slice", [y, const("zero", np.array([0], np.int64)), const("end", np.array([in_f], np.int64)),
                                 const("axis1", np.array([1], np.int64))], "slice")
            y.shape = ir.Shape([out_f, in_f])
            g.insert_before(dq, nodes)
            name = dq.outputs[0].name
            dq.outputs[0].replace_all_uses_with(y)
            g.remove(dq, safe=True)
            y.name = name
            self.rewritten += 1
        return ir.passes.PassResult(model, modified=bool(self.rewritten))

