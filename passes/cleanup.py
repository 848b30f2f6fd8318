"""Graph cleanup on onnx-ir: constant folding, identity/unused-node removal, CSE, topological sort.

Used right after export (cheaper than the exporter's full optimizer, which dominates export time
on MoE graphs) and after every rewriting pass.
"""
from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript import optimizer


class CleanupPass(ir.passes.InPlacePass):
    """Fold constants, drop identities and dead nodes, merge duplicates, sort."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(model.graph)
        optimizer.fold_constants(model)
        ir.passes.PassManager([
            common_passes.IdentityEliminationPass(),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.CommonSubexpressionEliminationPass(),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.DeduplicateInitializersPass(),
            common_passes.RemoveUnusedOpsetsPass(),
            common_passes.TopologicalSortPass(),
        ])(model)
        return ir.passes.PassResult(model, modified=len(model.graph) != before)


def cleanup(model: ir.Model) -> ir.Model:
    CleanupPass()(model)
    return model
