"""copy_model: an independent copy of an onnx-ir model (every node, value and type new) that keeps its weights.

`ir.from_proto(ir.to_proto(m))` copies the graph, but an initializer held as external data (a package graph over
its shared weights file, pipeline/weights_file.py) comes back as a reference relative to no folder at all, and
`Model.clone()` shares the values' type objects with the original (changing a dtype on the copy changes both).
Here the graph goes through the proto round trip and each external initializer gets the original's ExternalTensor
back (immutable, so sharing it is safe; its data stays on disk)."""
from __future__ import annotations

import onnx_ir as ir


def copy_model(model: ir.Model) -> ir.Model:
    m = ir.from_proto(ir.to_proto(model))
    for src, dst in zip(model.graphs(), m.graphs()):
        for name, v in src.initializers.items():
            if isinstance(v.const_value, ir.ExternalTensor) and name in dst.initializers:
                dst.initializers[name].const_value = v.const_value
    return m
