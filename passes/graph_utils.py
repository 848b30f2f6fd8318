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
