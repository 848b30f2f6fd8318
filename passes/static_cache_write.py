"""The fixed-shape decode step's cache write as one in-place ScatterND row write instead of a full-buffer Where.

The family's fixed-shape form (models/static_lm.py, models/mla_static.py) writes the decode step's new row with
`present = Where(write, row, past)`: `write` the one-hot [B, M, 1] mask of the position, `row` [B, 1, w] broadcast
over M. That reads the whole past buffer and writes a whole new one every step (2 x the cache bytes), and a Where
cannot alias its output to an input it reads elsewhere in ONNX Runtime's planner. This pass rewrites each such
node (its output a graph output `present.*`, its third input the graph input `past.*`) into

    idx      = Cast(MatMul(Reshape(Cast(write, float), [B, 1, M]), arange(M) [M, 1]), int64)  [B, 1, 1]
    indices  = Concat(batch ids [B, 1, 1], idx)                                              [B, 1, 2]
    present  = ScatterND(past, indices, row)

with the row index read from the mask itself (so a wrong mask writes the wrong row, as the Where did; the MatMul
of a one-hot by 0..M-1 is exact in fp32 for M < 2^24, with TF32 off, as the ort-cuda provider options set). One
index computation per distinct mask (all layers share it). ScatterND copies `past` into `present` only when the
two are different buffers (ONNX Runtime's CPU and CUDA kernels skip the copy when they alias): a runtime that binds
`present.*` to the same device buffer as `past.*` (runtime/cuda_runtime.py GearDecoder) makes the step write one
row per layer and tensor. Rows the mask does not cover (a position >= M) are out of the step's contract: the
runtime keeps position < M (a Where would drop such a write; ScatterND writes row 0).

Preconditions (else the node is left alone and counted in `skipped`): the Where's condition is bool [B, M, 1], the
row [B, 1, w] and past [B, M, w] with static dims.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

CACHE_IN, CACHE_OUT = "past.", "present."


def _static(shape) -> tuple[int, ...] | None:
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return tuple(int(d) for d in shape)


def _const(name: str, arr: np.ndarray, graph: ir.Graph) -> ir.Value:
    v = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)), shape=ir.Shape(arr.shape),
                 const_value=ir.tensor(arr, name=name))
    graph.register_initializer(v)
    return v


class StaticCacheWritePass(ir.passes.InPlacePass):
    """Where(write, row, past.*) -> present.* becomes ScatterND(past.*, index of write, row) (module doc)."""

    def __init__(self):
        super().__init__()
        self.rewritten = 0
        self.skipped: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        outputs = {v.name: v for v in g.outputs}
        index_of: dict[int, ir.Value] = {}
        for name, out in outputs.items():
            if not name.startswith(CACHE_OUT):
                continue
            node = out.producer()
            if node is None or node.op_type != "Where":
                continue
            cond, row, past = node.inputs
            if past is None or not past.is_graph_input() or not past.name.startswith(CACHE_IN):
                continue
            cs, rs, ps = _static(cond.shape), _static(row.shape), _static(past.shape)
            if (cond.dtype != ir.DataType.BOOL or cs is None or rs is None or ps is None or len(ps) != 3
                    or cs != (ps[0], ps[1], 1) or rs != (ps[0], 1, ps[2])):
                self.skipped.append(f"{node.name}: condition {cs} / row {rs} / past {ps} is not the decode write")
                continue
            B, M, _ = ps
            if id(cond) not in index_of:
                tag = f"static_cache_write_{len(index_of)}"
                f = ir.node("Cast", [cond], attributes={"to": ir.DataType.FLOAT}, name=f"{tag}/cast")
                r = ir.node("Reshape", [f.outputs[0], _const(f"{tag}_shape", np.array([B, 1, M], np.int64), g)],
                            name=f"{tag}/reshape")
                mm = ir.node("MatMul", [r.outputs[0], _const(f"{tag}_rows", np.arange(M, dtype=np.float32)
                                                              .reshape(M, 1), g)], name=f"{tag}/row_index")
                ci = ir.node("Cast", [mm.outputs[0]], attributes={"to": ir.DataType.INT64}, name=f"{tag}/to_int64")
                cat = ir.node("Concat", [_const(f"{tag}_batch", np.arange(B, dtype=np.int64).reshape(B, 1, 1), g),
                                         ci.outputs[0]], attributes={"axis": -1}, name=f"{tag}/indices")
                for n, (dt, shp) in zip((f, r, mm, ci, cat), ((ir.DataType.FLOAT, [B, M, 1]), (ir.DataType.FLOAT, [B, 1, M]),
                                                              (ir.DataType.FLOAT, [B, 1, 1]), (ir.DataType.INT64, [B, 1, 1]),
                                                              (ir.DataType.INT64, [B, 1, 2]))):
                    n.outputs[0].name = n.name.replace("/", "_")
                    n.outputs[0].dtype, n.outputs[0].shape = dt, ir.Shape(shp)
                g.insert_before(node, [f, r, mm, ci, cat])
                index_of[id(cond)] = cat.outputs[0]
            scatter = ir.node("ScatterND", [past, index_of[id(cond)], row], name=f"{node.name}/scatter_row")
            g.insert_before(node, scatter)
            new = scatter.outputs[0]
            new.dtype, new.shape = out.dtype, out.shape
            out.replace_all_uses_with(new, replace_graph_outputs=True)
            out_name = out.name
            g.remove(node, safe=True)
            new.name = out_name
            self.rewritten += 1
        g.sort()
        return ir.passes.PassResult(model, modified=self.rewritten > 0)
