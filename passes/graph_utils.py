"""Small onnx-ir helpers shared by the graph passes."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (initializer or Constant), else None."""
    if value is None:
        return None
    t = ir.convenience.get_const_tensor(value)
    return None if t is None else t.numpy()


def consumers(value: ir.Value) -> list[ir.Node]:
    """Distinct nodes using the value, in use order."""
    seen, out = set(), []
    for use in value.uses():
        node = use.node if hasattr(use, "node") else use[0]
        if id(node) not in seen:
            seen.add(id(node))
            out.append(node)
    return out


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def from_constants(value: ir.Value | None, memo: dict | None = None) -> bool:
    """Whether the value is a constant or computed from constants only (no graph input upstream): a weight, also
    when a graph dequantizes it on every run."""
    if value is None:
        return False
    if value.const_value is not None or value.is_initializer():
        return True
    memo = {} if memo is None else memo
    if id(value) not in memo:
        p = value.producer()
        memo[id(value)] = p is not None and all(i is None or from_constants(i, memo) for i in p.inputs)
    return memo[id(value)]


def is_projection(node: ir.Node) -> bool:
    """A linear layer of the hidden state: MatMul/Gemm (or ORT's FusedMatMul, a MatMul with its scale folded in) by
    a weight (from_constants), or a quantized one (com.microsoft.MatMulNBits)."""
    if node.op_type == "MatMulNBits":
        return True
    return (node.op_type in ("MatMul", "Gemm", "FusedMatMul") and len(node.inputs) > 1
            and from_constants(node.inputs[1]))


def topk_score_projections(graph: ir.Graph) -> list[tuple[ir.Node, ir.Node]]:
    """(TopK, projection) pairs: for every TopK, the projections (is_projection) its scores are computed from,
    walking back through every non-constant input (not into Shape/Size): the router gate of a TopK router, the
    lightning indexer's wq_b / wk / weights_proj for its key selection."""
    out = []
    for t in graph:
        if t.op_type != "TopK" or not t.inputs or t.inputs[0] is None:
            continue
        seen, stack = set(), [t.inputs[0]]
        while stack:
            p = stack.pop().producer()
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if is_projection(p):
                out.append((t, p))
            elif p.op_type not in ("Shape", "Size"):
                stack.extend(i for i in p.inputs if i is not None and i.const_value is None and not i.is_initializer())
    return out


def is_fp32_projection(node: ir.Node) -> bool:
    """A projection (is_projection) by a plain fp32 weight: an fp32 initializer or constant, or its Transpose."""
    if node.op_type == "MatMulNBits":
        return False
    w = node.inputs[1]
    p = w.producer() if w.const_value is None and not w.is_initializer() else None
    if p is not None and p.op_type == "Transpose" and p.inputs[0] is not None:
        w = p.inputs[0]
    return (w.const_value is not None or w.is_initializer()) and w.dtype == ir.DataType.FLOAT
