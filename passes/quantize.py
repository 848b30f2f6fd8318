"""The quantize stage's entry: one scheme by name (what `compile --quant` calls).

The schemes are passes/quant_int8.py, quant_int4.py, quant_fp8.py and quant_w8a8.py; passes/quant_weights.py holds
what they share (finding linear sites, roles, the report) and imports none of them.
"""
from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from .quant_weights import DEFAULT_EXCLUDE, SCHEMES, QuantizationError, QuantReport, initializer_bytes


def quantize(model_ir: ir.Model, scheme: str, *, model=None, calibration: dict[str, float] | None = None,
             exclude: Iterable[str] = DEFAULT_EXCLUDE, **options) -> QuantReport:
    """Quantize `model_ir` in place with `scheme` and return the report.

    scheme "int8": options block_size (default 128, capped at each layer's in_features), symmetric,
                   accuracy_level (None/0: fp32 activations; 4: int8 activations per block inside the
                   kernels), experts (com.microsoft.MoE -> QMoE: "auto", "channel", "block", "none").
    scheme "int4": options block_size (default 32; 16..256, a power of two), symmetric (default False:
                   zero points, as onnxruntime's MatMulNBitsQuantizer), accuracy_level (None/0: fp32
                   activations; 4: int8 activations per block inside the kernels, ORT CPU's fast path),
                   experts (com.microsoft.MoE -> QMoE 4-bit: "auto" = "block", "channel"; "int8": QMoE
                   int8 as scheme int8 writes it; "none": fp32), attention_bits (4, or 8: the attention
                   linears as scheme int8 writes them, MLP and experts 4-bit), scale_dtype ("float32";
                   "float16": scales rounded to fp16 first, for fp16-scale kernels such as CUDA's).
    scheme "fp8" : `model` (the eager model) lets an FP8 checkpoint's bytes pass through unchanged;
                   activations "none" (default) or "dynamic" (FP8 per token per 128 channels).
    scheme "w8a8": `calibration` ({activation name: amax}, from passes.quant_w8a8.calibrate) gives
                   static per-tensor scales to the attention projections; without it they are dynamic too.
    scheme "none": nothing (an empty report).
    """
    if scheme == "none":
        rep = QuantReport("none")
        rep.weights_bytes_before = rep.weights_bytes_after = initializer_bytes(model_ir.graph)
        return rep
    if scheme == "int8":
        from .quant_int8 import Int8WeightOnlyPass
        p = Int8WeightOnlyPass(exclude=exclude, **options)
    elif scheme == "int4":
        from .quant_int4 import Int4WeightOnlyPass
        p = Int4WeightOnlyPass(exclude=exclude, **options)
    elif scheme == "fp8":
        from .quant_fp8 import Fp8WeightPass
        p = Fp8WeightPass(model=model, exclude=exclude, **options)
    elif scheme == "w8a8":
        from .quant_w8a8 import W8A8Pass
        p = W8A8Pass(calibration=calibration, exclude=exclude, **options)
    else:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    p(model_ir)
    _check_selections_fp32(model_ir, exclude, scheme)
    return p.report


def _check_selections_fp32(model_ir: ir.Model, exclude: Iterable[str], scheme: str) -> None:
    """The postcondition of every scheme, while the router and the indexer are excluded (the default): each TopK's
    scores still come from fp32 projections (passes.graph_utils.topk_score_projections: the router gate, DeepSeek-
    V3.2's lightning indexer wq_b / wk / weights_proj). Found from the quantized graph itself, so a role the site
    classification missed is refused, not shipped quantized."""
    from .graph_utils import is_fp32_projection, topk_score_projections
    exclude = tuple(exclude)
    if "router" not in exclude or "indexer" not in exclude:
        return
    for topk, proj in topk_score_projections(model_ir.graph):
        if not is_fp32_projection(proj):
            raise QuantizationError(
                f"--quant {scheme}: TopK {topk.name!r} selects from scores computed by a quantized projection "
                f"({proj.op_type} {proj.name!r}); a top-k selection (MoE router, lightning indexer) must be made from "
                "fp32 projections: exclude the role 'router' / 'indexer' (passes/quant_weights.py) or fix the site "
                "classification that missed it")
