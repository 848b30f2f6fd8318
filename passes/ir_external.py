"""Graphs whose weights are external data (a package graph over its shared weights file, pipeline/weights_file.py),
in memory: copy_model and session_from_model.

copy_model: an independent copy of an onnx-ir model (every node, value and type new) that keeps its weights.

`ir.from_proto(ir.to_proto(m))` copies the graph, but an initializer held as external data (a package graph over
its shared weights file, pipeline/weights_file.py) comes back as a reference relative to no folder at all, and
`Model.clone()` shares the values' type objects with the original (changing a dtype on the copy changes both).
Here the graph goes through the proto round trip and each external initializer gets the original's ExternalTensor
back (immutable, so sharing it is safe; its data stays on disk)."""
from __future__ import annotations

import os

import onnx_ir as ir


def copy_model(model: ir.Model) -> ir.Model:
    m = ir.from_proto(ir.to_proto(model))
    for src, dst in zip(model.graphs(), m.graphs()):
        for name, v in src.initializers.items():
            if isinstance(v.const_value, ir.ExternalTensor) and name in dst.initializers:
                dst.initializers[name].const_value = v.const_value
    return m


def external_folder(model: ir.Model) -> str | None:
    """The one folder the model's external initializers live in (None when all are in memory)."""
    folders = {os.path.abspath(t.base_dir) for g in model.graphs() for v in g.initializers.values()
               if isinstance(t := v.const_value, ir.ExternalTensor)}
    if len(folders) > 1:
        raise ValueError(f"initializers in external data under several folders ({sorted(folders)}); save the graph "
                         "with pipeline.export.save_graph first")
    return folders.pop() if folders else None


def session_from_model(model: ir.Model, so=None, providers=("CPUExecutionProvider",), proto=None):
    """An ONNX Runtime session on an in-memory model (or its `proto`, e.g. with outputs added): serialized to bytes,
    which ORT resolves external data against only when told the folder (session option
    session.model_external_initializers_file_folder_path), so it is told."""
    import onnxruntime as ort
    so = so or ort.SessionOptions()
    folder = external_folder(model)
    if folder is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    proto = proto if proto is not None else ir.to_proto(model)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=list(providers))
