"""The package's IO spec: each graph's inputs and outputs (graph_io) and the cache layout (cache_spec),
recorded in manifest.json's "io" section and read by the runtimes."""
from __future__ import annotations

from pathlib import Path

import onnx

import models


def graph_io(path: Path) -> dict:
    """Names, dtypes and (symbolic) shapes of a saved graph's inputs and outputs."""
    m = onnx.load(str(path), load_external_data=False)

    def spec(v) -> dict:
        t = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]}

    return {"inputs": [spec(v) for v in m.graph.input], "outputs": [spec(v) for v in m.graph.output],
            "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import}}


def cache_spec(cfg, layout: str) -> dict:
    """The manifest's io.cache section: the model family's cache spec (models/cache.py)."""
    return models.family_for(cfg.model_type).cache_spec(cfg, layout).to_manifest()
