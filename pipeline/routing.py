"""Routing probes for the check graphs of lossy stages (check-only copies; shipped graphs are untouched).

Each MoE layer's router starts from its gate logits, ``x @ W_gate^T`` [N, E] (checkpoint ``mlp.gate``),
whatever form the rest of the router takes in a graph (com.microsoft.MoEGroupRouter, MoE's own softmax
top-k, or the exported TopK subgraph). Two edits on a copy of a graph, found by computation:

- :func:`expose_gate_logits`: each layer's gate logits become a graph output ``routing.{i}.gate_logits``
  (i = the MoE layer's index in graph order); the expert ids and the top-k margin are computed from them
  with the checkpoint's router (:func:`pipeline.parity.route`).
- :func:`force_gate_logits`: each layer's gate logits are additionally replaced, for everything that reads
  them, by a graph input ``routing.{i}.gate_logits.forced``: fed with the reference's gate logits, the lossy graph computes
  with the reference's expert ids and routing weights (teacher-forced routing), while its own gate logits
  (computed from its own hidden state) are still an output, so the routing decision it would have made is
  still seen; the MoE op's router input is exposed as ``routing.{i}.router_probs`` (what it selects experts
  from, given the forced logits: an fp32 router reproduces the reference's choice exactly).
"""
from __future__ import annotations

import onnx_ir as ir

from models.errors import MlamoeError

MOE_OPS = {("com.microsoft", "MoE"), ("com.microsoft", "QMoE")}
_PROJECTIONS = {"MatMul", "Gemm", "MatMulNBits"}
_SCORERS = {"Sigmoid", "Softmax", "MoEGroupRouter", "MoE", "QMoE"}  # what reads gate logits (models/moe.py Router)


def gate_name(i: int) -> str:
    return f"routing.{i}.gate_logits"


def forced_name(i: int) -> str:
    return f"routing.{i}.gate_logits.forced"


def router_probs_name(i: int) -> str:
    return f"routing.{i}.router_probs"


def _gate_of(moe: ir.Node) -> ir.Value:
    """The gate projection upstream of the MoE node's router input (breadth-first): a MatMul/Gemm whose output
    is scored (Sigmoid/Softmax, or read by MoEGroupRouter/MoE as logits)."""
    seen, frontier = set(), [moe.inputs[1]]
    while frontier:
        nxt = []
        for v in frontier:
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            p = v.producer()
            if p is None:
                continue
            if p.op_type in _PROJECTIONS and any(u.op_type in _SCORERS for u, _ in v.uses()):
                return v
            nxt += list(p.inputs)
        frontier = nxt
    raise MlamoeError(f"routing probe: no gate projection (MatMul/Gemm) found upstream of {moe.name!r}'s router input")


def gate_logits(model: ir.Model) -> list[ir.Value]:
    """Each MoE layer's gate logits value, in graph order of the MoE nodes."""
    moes = [n for n in model.graph if (n.domain, n.op_type) in MOE_OPS]
    if not moes:
        raise MlamoeError("routing probe: the graph has no com.microsoft.MoE/QMoE node "
                          "(routing-aware checks need the ort-fused MoE form)")
    return [_gate_of(n) for n in moes]


def expose_gate_logits(model: ir.Model) -> int:
    """Add each layer's gate logits as output ``routing.{i}.gate_logits`` (in place); -> number of layers."""
    values = gate_logits(model)
    for i, v in enumerate(values):
        v.name = gate_name(i)
        if not v.is_graph_output():
            model.graph.outputs.append(v)
    return len(values)


def force_gate_logits(model: ir.Model) -> int:
    """Expose the gate logits and feed every reader of them from graph input ``routing.{i}.gate_logits.forced``;
    expose each MoE op's router input as ``routing.{i}.router_probs``."""
    values = gate_logits(model)
    moes = [n for n in model.graph if (n.domain, n.op_type) in MOE_OPS]
    for i, v in enumerate(values):
        v.name = gate_name(i)
        forced = ir.Value(name=forced_name(i), type=v.type, shape=v.shape)
        model.graph.inputs.append(forced)
        ir.convenience.replace_all_uses_with(v, forced)
        model.graph.outputs.append(v)
    for i, moe in enumerate(moes):
        probs = moe.inputs[1]
        if probs.is_graph_input():  # the MoE op reads the forced logits themselves: route them through an Identity
            node = ir.node("Identity", [probs], name=f"routing_probe_identity_{i}")
            model.graph.insert_before(moe, node)
            moe.replace_input_with(1, node.outputs[0])
            node.outputs[0].type, node.outputs[0].shape = probs.type, probs.shape
            probs = node.outputs[0]
        probs.name = router_probs_name(i)
        if not probs.is_graph_output():
            model.graph.outputs.append(probs)
    return len(values)
