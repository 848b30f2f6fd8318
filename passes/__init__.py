"""ONNX graph passes (onnx-ir passes and onnxscript rewriter rules). A pass never depends on a
target; targets list pass names from PASSES in the order they want them."""
from __future__ import annotations

from typing import Callable

import onnx_ir as ir

from .cleanup import CleanupPass


def _latent_kv_fusion() -> ir.passes.PassBase:
    from .latent_kv_fusion import LatentKVFusionPass
    return LatentKVFusionPass()


def _moe(form: str, **kw) -> Callable[[], ir.passes.PassBase]:
    def make() -> ir.passes.PassBase:
        from .moe_lowering import MoELoweringPass
        # inside compile: exact dispatch (capacity = all tokens) and no extra graph outputs
        return MoELoweringPass(form, **kw)
    return make


# name -> factory of a fresh pass instance
PASSES: dict[str, Callable[[], ir.passes.PassBase]] = {
    "cleanup": CleanupPass,
    "latent-kv-fusion": _latent_kv_fusion,
    "moe-ort-fused": _moe("ort-fused", report_dropped=False),
    "moe-static-gather": _moe("static-gather", report_dropped=False),
    "moe-static": _moe("static", capacity_factor=None, report_dropped=False),
}
