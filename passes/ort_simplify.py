"""ORT-friendly simplifications of an exported graph: exact rewrites that let ONNX Runtime's own
fusions fire and drop the per-call shape arithmetic the exporter leaves around every Reshape.

  rmsnorm-div   x * Reciprocal(Sqrt(s))  ->  x / Sqrt(s)
                torch's `x * rsqrt(mean(x^2) + eps)` exports as Sqrt + Reciprocal + Mul, a spelling ORT's
                SimplifiedLayerNormFusion does not recognise; with Div it fuses each RMSNorm (Pow,
                ReduceMean, Add, Sqrt, Div, Mul by weight) into one SimplifiedLayerNormalization kernel
                when ORT optimises the graph (node counts: docs/benchmarks.md). x / s and
                x * (1 / s) differ by at most one rounding.
  reshape-infer Reshape(x, Concat(d_0 .. d_n)) where every d_i is a 1-element constant except one
                computed d_j (e.g. the batch read back through Shape/Gather/Squeeze/Unsqueeze):
                -> Reshape(x, [d_0 .. -1 .. d_n]) as one constant. Exact: a valid Reshape keeps the
                element count, so the single unknown dim is numel(x) / prod(the others), which is
                what -1 means (for every non-empty x; an empty x cannot infer a -1). Skipped when a
                constant is 0 or -1, so allowzero (set by torch's exporter) changes nothing. The shape
                subgraph then has no consumer and is removed.

A DeepSeek decode step with batch 1 runs ~800 tiny kernels on `small`; at a few microseconds each
the launch overhead is the same order as the matmuls, so these rewrites matter for decode latency.
`self.report` counts each rewrite.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript.rewriter import pattern, rewrite

from .graph_utils import attr as _attr, const_array as _const


def _rsqrt_mul(op, x, s):
    return op.Mul(x, op.Reciprocal(op.Sqrt(s)))


def _div_sqrt(op, x, s):
    return op.Div(x, op.Sqrt(s))


RMSNORM_DIV = pattern.RewriteRule(_rsqrt_mul, _div_sqrt)


def _one_element(value: ir.Value | None) -> bool:
    """The value is a 1-D tensor of one element: by its shape, or as Reshape(x, [1]) / Reshape(scalar, [-1])."""
    if value is None:
        return False
    if value.shape is not None:
        return value.shape.rank() == 1 and value.shape[0] == 1
    src = value.producer()
    if src is None or src.op_type != "Reshape" or src.domain not in ("", "ai.onnx") or len(src.inputs) < 2:
        return False
    target, data = _const(src.inputs[1]), src.inputs[0]
    if target is None:
        return False
    scalar = data is not None and data.shape is not None and data.shape.rank() == 0
    return target.reshape(-1).tolist() == [1] or (target.reshape(-1).tolist() == [-1] and scalar)


def _infer_dim_shape(reshape: ir.Node) -> np.ndarray | None:
    """The constant shape (one -1) equivalent to this Reshape's Concat-built shape, else None."""
    if len(reshape.inputs) < 2:
        return None
    shape = reshape.inputs[1]
    concat = shape.producer() if shape is not None else None
    if concat is None or concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx"):
        return None
    dims, unknown = [], []
    for i, part in enumerate(concat.inputs):
        c = _const(part)
        if c is None:
            if not _one_element(part):
                return None
            unknown.append(i)
            dims.append(-1)
            continue
        if c.size != 1 or int(c.reshape(-1)[0]) in (0, -1):
            return None
        dims.append(int(c.reshape(-1)[0]))
    if len(unknown) != 1:
        return None
    return np.array(dims, dtype=np.int64)


class ORTSimplifyPass(ir.passes.InPlacePass):
    """rmsnorm-div + reshape-infer (see the module docstring). report: {"rmsnorm-div": n, "reshape-infer": n}."""

    def __init__(self):
        super().__init__()
        self.report: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = sum(1 for n in model.graph if n.op_type == "Reciprocal")
        rewrite(model, pattern_rewrite_rules=[RMSNORM_DIV])
        rms = before - sum(1 for n in model.graph if n.op_type == "Reciprocal")
        reshapes = 0
        for node in list(model.graph):
            if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
                continue
            dims = _infer_dim_shape(node)
            if dims is None:
                continue
            const = ir.node("Constant", [], attributes={"value": ir.tensor(dims)},
                            name=f"{node.name}/shape_infer")
            model.graph.insert_before(node, const)
            node.replace_input_with(1, const.outputs[0])
            reshapes += 1
        common_passes.RemoveUnusedNodesPass()(model)
        self.report = {"rmsnorm-div": rms, "reshape-infer": reshapes}
        return ir.passes.PassResult(model, modified=bool(rms or reshapes))
