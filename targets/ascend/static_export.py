"""The Ascend target's fixed-shape ("ATC-ready") graphs: the family's fixed-shape form (models/static_lm.py
StaticCausalLM, traced by pipeline/static_export.py, both shared with ort-cuda's decode gears) at opset 18, and the
names of the nodes ATC must keep fp32 (FP32_ISLANDS, fp32_island_nodes). The names below are re-exported so that the
target's modules and tests keep one import place.

Why the form is what it is for ATC (int32 ids and position, the mask from the position, the cache written with Where,
one prefill graph per bucket, RoPE tables, static MoE forms): models/static_lm.py's docstring.
"""
from __future__ import annotations

import onnx_ir as ir

from models.static_lm import (MASK_VALUE, MOE_FORMS, AttnSoftmax, StaticCausalLM, StaticExportError,  # noqa: F401
                              StaticRouter, static_cache_spec)
from pipeline.static_export import (INDEX_DTYPE, STATIC_OPSET, StaticGraphSpec, StaticRunner,  # noqa: F401
                                    _example_args, convert_opset, export_static_graph, export_static_graphs,
                                    graph_specs, input_names, name_nodes_by_scope, ort_sessions,
                                    output_names, save_static_graph, zero_inputs)

TARGET_OPSET = STATIC_OPSET  # ATC's opset

FP32_ISLANDS = {
    "softmax": ("attn_softmax.",),
    "norm": ("layernorm/", "model.norm/"),
    "router": ("routers.",),
    "indexer": ("self_attn.indexer.", "index_select_"),
}
"""Name fragments of the nodes ATC must keep in fp32 under mixed precision (--keep_dtype); "indexer": DeepSeek-V3.2's
lightning indexer (its projections and its scoring + top-k, models/v32_static.py), whose top-k over fp16 scores
would choose other keys at near ties."""


def fp32_island_nodes(model_ir: ir.Model) -> dict[str, list[str]]:
    """{island kind: [node names]} for the attention softmax, every RMSNorm, the MoE router and the indexer."""
    out: dict[str, list[str]] = {k: [] for k in FP32_ISLANDS}
    for node in model_ir.graph:
        name = node.name or ""
        for kind, frags in FP32_ISLANDS.items():
            if any(f in name for f in frags):
                out[kind].append(name)
                break
    return out
