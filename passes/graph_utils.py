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
