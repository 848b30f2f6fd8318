"""The Ascend target's fixed-shape ("ATC-ready") graphs: the family's fixed-shape form (models/static_lm.py
StaticCausalLM, traced by pipeline/static_export.py, both shared with ort-cuda's decode gears) at opset 18, and the
names of the nodes ATC must keep fp32 (FP32_ISLANDS, fp32_island_nodes). The names below are re-exported so that the
target's modules and tests keep one import place.

Why the form is what it is for ATC (the full account: models/static_lm.py):
`pipeline.export` (growing cache, data-dependent MoE loop with NonZero) do not fit. This module
wraps the `models/` submodules (their weights, unchanged) in :class:`StaticCausalLM`, a torch
module whose every shape is fixed at export time, and exports it with `torch.onnx.export` (dynamo,
no dynamic shapes), then converts the graph to opset 18 with onnx's version converter.

One wrapper, two uses (the same IO for both, so graphs chain without host-side reshaping):

    inputs : input_ids   int32 [B, S]      S = 1 for decode, S = bucket length for prefill
             position    int32 [B]         position of input_ids[:, 0] (= tokens already cached)
             past.{i}.{name}  fp32          the family's cache spec (models/cache.py) in its static
                                            layout, the growing axis fixed to the maximum length M
    outputs: logits      fp32 [B, S, vocab]
             present.{i}.{name}  same shapes  = past with rows position .. position+S-1 replaced

Decisions (and why):

- **input_ids / position are int32.** ATC's Cast has no int64 target, and ONNX Gather takes int32
  indices directly, so the ids feed the embedding Gather as they are. No tensor derived from a
  graph input is ever cast to int64. The only int64 tensors left are constant shape operands
  (Reshape/Slice/Split constants, which ATC folds) and TopK's index output (ONNX fixes it to int64);
  the router casts those indices to int32 (an allowed Cast target) before any further use.
- **Attention mask from the position, in the graph.** Query s of row b sits at position
  p = position[b] + s and may attend cache rows t <= p (`key_pos <= p`, an int32 LessOrEqual
  against a constant [M] table). Masked scores are replaced (Where) by -65504 (the fp16 minimum,
  finite, so the same graph is safe when ATC runs it in fp16). Rows past the position may hold
  anything (zeros, padding of a shorter prompt): they get exactly zero weight.
- **Cache written in place with Where, not ScatterND.** ONNX ScatterND takes int64 indices only;
  building them from the int32 position needs a Cast to int64 (forbidden) or an extra int64 input.
  This wrapper builds `write` = the one-hot [B, S, M] matrix `key_pos == position + s` and `covered`
  (rows position .. position+S-1); the family's static step (for MLA models/mla_static.py) selects
  the new rows into the cache with them. Writes past M - 1 are dropped: the caller keeps
  position + S <= M.
- **Prefill in fixed buckets, one graph per bucket.** A prompt shorter than its bucket is padded on
  the right (any token id); its logits are read at column len-1 and the next decode step uses
  position = len, which overwrites the first padded cache row; the others stay masked. Chunked
  prefill is the same graph with position > 0. One graph per bucket rather than `--dynamic_dims`
  gears: the static trace bakes S into reshape constants, and one OM per bucket is what public
  LLM conversions for Ascend ship (REFERENCE.md section 3).
- **RoPE from constant cos/sin tables [M, rope/2]** gathered by position (int32 Gather), so no
  angle is ever computed in fp16 (position * inv_freq loses whole radians in fp16 past ~2K).
- **Attention is the family's static step** (models.family.StaticStep; for MLA the absorbed form in
  models/mla_static.py), its per-layer constants registered here as buffers `{name}_{layer}`.
- **MoE without data-dependent shapes** (REFERENCE.md section 2): written here in torch until the
  static MoE lowering passes (passes/moe_lowering.py) exist; then this can be swapped for them.
  The router is re-expressed with one-hot compares instead of ScatterElements/GatherElements.
    "gather" (decode default): per token, Gather the top-k experts' stacked weights
             [E, inter, hidden] by the router's indices, then batched MatMul; cost ~ k experts/token.
    "dense"  (prefill default): every expert on every token as three stacked MatMuls, combined by a
             [N, E] weight matrix that is zero outside each token's top-k; static and the same sum,
             E/k times the expert FLOPs (the static-capacity form will replace it for large E).
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
}
"""Name fragments of the nodes ATC must keep in fp32 under mixed precision (--keep_dtype)."""


def fp32_island_nodes(model_ir: ir.Model) -> dict[str, list[str]]:
    """{island kind: [node names]} for the attention softmax, every RMSNorm and the MoE router."""
    out: dict[str, list[str]] = {k: [] for k in FP32_ISLANDS}
    for node in model_ir.graph:
        name = node.name or ""
        for kind, frags in FP32_ISLANDS.items():
            if any(f in name for f in frags):
                out[kind].append(name)
                break
    return out
