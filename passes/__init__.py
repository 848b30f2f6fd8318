"""ONNX graph passes (onnx-ir passes and onnxscript rewriter rules). A pass never depends on a
target; targets list pass names from PASSES in the order they want them."""
from __future__ import annotations

from typing import Callable

import onnx_ir as ir

from .cleanup import CleanupPass


def _latent_kv_fusion() -> ir.passes.PassBase:
    from .latent_kv_fusion import LatentKVFusionPass
    return LatentKVFusionPass()


def _ort_simplify() -> ir.passes.PassBase:
    from .ort_simplify import ORTSimplifyPass
    return ORTSimplifyPass()


def _moe(form: str, **kw) -> Callable[[], ir.passes.PassBase]:
    def make() -> ir.passes.PassBase:
        from .moe_lowering import MoELoweringPass
        # inside compile: exact dispatch (capacity = all tokens) and no extra graph outputs
        return MoELoweringPass(form, **kw)
    return make


def graphs_for(name: str) -> tuple[str, ...]:
    """Which of the exported graphs a pass runs on (the others pass through unchanged).

    latent-kv-fusion: decode only, unless latent_kv_fusion.PREFILL_FUSION (the naive form is faster
    for prompts past a few hundred tokens; figures: docs/benchmarks.md).
    """
    if name == "latent-kv-fusion":
        from .latent_kv_fusion import graph_forms
        return tuple(g for g, form in graph_forms().items() if form)
    return ("prefill", "decode")


# name -> factory of a fresh pass instance
PASSES: dict[str, Callable[[], ir.passes.PassBase]] = {
    "cleanup": CleanupPass,
    "latent-kv-fusion": _latent_kv_fusion,
    "moe-ort-fused": _moe("ort-fused", report_dropped=False),
    "moe-static-gather": _moe("static-gather", report_dropped=False),
    "moe-static": _moe("static", capacity_factor=None, report_dropped=False),
    "ort-simplify": _ort_simplify,
}
