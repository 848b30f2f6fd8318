"""MatMuls whose right operand is broadcast over the batch (its batch dims all 1, the left's not) get a 2-D right
operand, so that ONNX Runtime's CUDA MatMul takes one strided-batched GEMM (stride 0 on the right) instead of
cublasGemmBatched over per-batch pointer arrays.

ORT's CUDA MatMul (onnxruntime/core/providers/cuda/math/matmul.cc, CanUseStridedBatchedGemm) uses a strided-batched
GEMM only when the right operand is 2-D or has the left's batch size; otherwise it builds three pointer arrays on the
host and copies them to the device (CudaAsyncBuffer: pinned host memory, cudaMemcpyAsync) on every call. Inside a
captured CUDA graph those copies are replayed from host buffers ORT has released after the capture (and a second
captured graph of the same session may reuse them), and outside one they cost three host-to-device copies a MatMul.
The fixed-shape step has such MatMuls for batch 1: the absorbed attention's scores and context against the cache
[1, 1, M, r] for H heads, and the static-gather MoE's chosen experts [1, k, inter, h] against the token [1, 1, h, 1].

Rewrite (the same numbers; the GEMM is the same, only its batching changes):
    MatMul(A, B)                    B [1, ..., 1, K, N]           -> MatMul(A, Reshape(B, [K, N]))
    MatMul(A, Transpose(X, swap))   X [1, ..., 1, N, K], the last two axes swapped, batch axes kept
                                                                  -> MatMul(A, Transpose(Reshape(X, [N, K]), [1, 0]))
(the second keeps the Transpose next to the MatMul, where ORT fuses it into FusedMatMul's transB.)
Only static shapes; A of rank >= 3 whose batch dims multiply to more than 1 (else nothing is broadcast).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _shape(v: ir.Value | None) -> tuple[int, ...] | None:
    if v is None or v.shape is None or any(not isinstance(d, int) for d in v.shape):
        return None
    return tuple(int(d) for d in v.shape)


class MatMulBroadcastPass(ir.passes.InPlacePass):
    """MatMul with a batch-broadcast right operand -> a 2-D right operand (module doc)."""

    def __init__(self):
        super().__init__()
        self.rewritten = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        for node in list(g):
            if node.op_type != "MatMul" or len(node.inputs) != 2:
                continue
            a, b = node.inputs
            sa, sb = _shape(a), _shape(b)
            if sa is None or sb is None or len(sa) < 3 or len(sb) < 3 or any(d != 1 for d in sb[:-2]) \
                    or int(np.prod(sa[:-2])) <= 1:
                continue
            tag = f"{node.name}/right_2d"
            t = b.producer()
            perm = None
            if t is not None and t.op_type == "Transpose" and "perm" in t.attributes and len(list(b.uses())) == 1:
                perm = list(t.attributes["perm"].as_ints())
            swap = list(range(len(sb) - 2)) + [len(sb) - 1, len(sb) - 2]
            if perm == swap and _shape(t.inputs[0]) is not None:
                x = t.inputs[0]
                sx = _shape(x)
                r = ir.node("Reshape", [x, self._const(g, f"{tag}_shape", [sx[-2], sx[-1]])], name=f"{tag}/reshape")
                r.outputs[0].name, r.outputs[0].dtype, r.outputs[0].shape = f"{tag}_x", x.dtype, ir.Shape(sx[-2:])
                tr = ir.node("Transpose", [r.outputs[0]], attributes={"perm": [1, 0]}, name=f"{tag}/transpose")
                tr.outputs[0].name, tr.outputs[0].dtype, tr.outputs[0].shape = f"{tag}", x.dtype, ir.Shape(sb[-2:])
                g.insert_before(node, [r, tr])
                node.replace_input_with(1, tr.outputs[0])
                g.remove(t, safe=True)
            else:
                r = ir.node("Reshape", [b, self._const(g, f"{tag}_shape", list(sb[-2:]))], name=f"{tag}/reshape")
                r.outputs[0].name, r.outputs[0].dtype, r.outputs[0].shape = tag, b.dtype, ir.Shape(sb[-2:])
                g.insert_before(node, r)
                node.replace_input_with(1, r.outputs[0])
            self.rewritten += 1
        g.sort()
        return ir.passes.PassResult(model, modified=self.rewritten > 0)

    @staticmethod
    def _const(g: ir.Graph, name: str, dims) -> ir.Value:
        arr = np.array(dims, np.int64)
        v = ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(arr.shape),
                     const_value=ir.tensor(arr, name=name))
        g.register_initializer(v)
        return v
