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

The fixed-shape form (models/static_lm.py StaticRouter, the ort-cuda decode gears) has no MoE node: its routers are
found as TopKs over a Sigmoid/Softmax-scored gate projection (:func:`static_routers`; the same finds DeepSeek-V4's
exported routers, a TopK over sqrt(softplus(gate)) + e_score_correction_bias; its hash_moe layers make no TopK
choice and are not routers here), and the expert TopK's scores
(the choice scores, dropped groups at -inf) are its ``routing.{i}.router_probs``.

The same for the other top-k choices a graph makes (DeepSeek-V3.2's lightning indexer, which picks the keys each query
attends to): :func:`selection_topks` finds the ids TopKs outside the routers, :func:`expose_selections` /
:func:`force_selections` expose their scores (:func:`selection_scores`) and feed every reader of them from graph
input ``selection.{j}.scores.forced``.
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


def static_routers(model: ir.Model) -> list[tuple[ir.Value, ir.Node]]:
    """The fixed-shape form's routers (models/static_lm.py StaticRouter: no MoE node, the group and expert choices are
    TopKs over the gate's scores), in graph order: (gate logits, expert TopK) per MoE layer. The gate logits are a
    projection's output read by Sigmoid/Softmax that a TopK's scores reach (walking back, stopping at projections);
    of the TopKs reaching one gate, the last in graph order is the expert choice (the group choices feed it)."""
    from passes.graph_utils import is_projection
    from passes.quant_weights import _is_sqrtsoftplus_router
    order = {id(n): i for i, n in enumerate(model.graph)}
    by_gate: dict[int, tuple[ir.Value, list[ir.Node]]] = {}
    for t in model.graph:
        if t.op_type != "TopK" or t.domain not in ("", "ai.onnx"):
            continue
        seen, stack = set(), [t.inputs[0]]
        while stack:
            v = stack.pop()
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            p = v.producer()
            if p is None or p.op_type in ("Shape", "Size"):
                continue
            if is_projection(p):
                if (any(u.op_type in ("Sigmoid", "Softmax") for u, _ in v.uses())
                        or _is_sqrtsoftplus_router(v)):  # DeepSeek-V4's sqrt(softplus) scores (exported form)
                    by_gate.setdefault(id(v), (v, []))[1].append(t)
                continue
            stack.extend(i for i in p.inputs if i is not None and i.const_value is None and not i.is_initializer())
    out = [(v, max(ts, key=lambda n: order[id(n)])) for v, ts in by_gate.values()]
    return sorted(out, key=lambda r: order[id(r[1])])


def _routers(model: ir.Model) -> list[tuple[ir.Value, ir.Node | None]]:
    """(gate logits, expert TopK or None) per MoE layer: the MoE nodes' gates (ort-fused form; None: the MoE op
    routes itself), else the fixed-shape form's routers (static_routers)."""
    moes = [n for n in model.graph if (n.domain, n.op_type) in MOE_OPS]
    if moes:
        return [(_gate_of(n), None) for n in moes]
    found = static_routers(model)
    if not found:
        raise MlamoeError("routing probe: the graph has no com.microsoft.MoE/QMoE node and no fixed-shape router "
                          "(a TopK over a Sigmoid/Softmax-scored gate projection): routing-aware checks need one")
    return found


def gate_logits(model: ir.Model) -> list[ir.Value]:
    """Each MoE layer's gate logits value, in graph order of the MoE nodes (or of the fixed-shape routers)."""
    return [v for v, _ in _routers(model)]


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
    routers = _routers(model)
    moes = [n for n in model.graph if (n.domain, n.op_type) in MOE_OPS]
    for i, (v, _) in enumerate(routers):
        v.name = gate_name(i)
        forced = ir.Value(name=forced_name(i), type=v.type, shape=v.shape)
        model.graph.inputs.append(forced)
        ir.convenience.replace_all_uses_with(v, forced)
        model.graph.outputs.append(v)
    for i, (_, topk) in enumerate(routers):  # the fixed-shape form: the expert TopK's scores are its router_probs
        if topk is not None:
            probs = topk.inputs[0]
            probs.name = router_probs_name(i)
            if not probs.is_graph_output():
                model.graph.outputs.append(probs)
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
    return len(routers)


# ---- selections: TopKs outside the MoE routers (DeepSeek-V3.2's lightning indexer) -------------------------------
# A second discrete choice, probed like routing: the indexer's scores [B, S, T] (causal -inf included) are exposed as
# ``selection.{j}.scores`` (j = the selection's index, graph order of its ids TopK) and, in the forced copy, every
# reader of them reads graph input ``selection.{j}.scores.forced`` instead (fed with the reference's scores: the lossy
# graph attends to the reference's keys), its own scores still an output, and the selected ids exposed as
# ``selection.{j}.ids`` (what it picked given the forced scores).
# The exported selection (models/indexer.py tie_exact_top_ids) is two TopKs: one for the k-th largest score (its
# indices unused: not a selection) and the ids TopK over the chosen keys; the scores are the first one's input.

def selection_name(j: int) -> str:
    return f"selection.{j}.scores"


def selection_forced_name(j: int) -> str:
    return f"selection.{j}.scores.forced"


def selection_ids_name(j: int) -> str:
    return f"selection.{j}.ids"


def selection_topks(model: ir.Model) -> list[ir.Node]:
    """The TopK nodes whose scores do not come from a MoE layer's gate logits, in graph order: walking back from
    each TopK's scores through every non-constant input, stopping at projections (passes.graph_utils.is_projection),
    a TopK reaching a gate logits value is a router's (the ort-cuda subgraph router), any other a selection."""
    from passes.graph_utils import is_projection
    moes = [n for n in model.graph if (n.domain, n.op_type) in MOE_OPS]
    gates = {id(v) for v in (gate_logits(model) if moes else [v for v, _ in static_routers(model)])}
    out = []
    for t in model.graph:
        if t.op_type != "TopK" or t.domain not in ("", "ai.onnx") or not _indices_used(t):
            continue
        seen, stack, router = set(), [t.inputs[0]], False
        while stack and not router:
            v = stack.pop()
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            if id(v) in gates:
                router = True
                break
            p = v.producer()
            if p is None or p.op_type in ("Shape", "Size") or is_projection(p):
                continue
            stack.extend(i for i in p.inputs if i is not None and i.const_value is None and not i.is_initializer())
        if not router:
            out.append(t)
    return out


def _indices_used(t: ir.Node) -> bool:
    ids = t.outputs[1] if len(t.outputs) > 1 else None
    return ids is not None and (bool(ids.uses()) or ids.is_graph_output())


def selection_scores(t: ir.Node) -> ir.Value:
    """The scores a selection's ids TopK `t` ranks: the input of the nearest TopK upstream of `t` whose indices are
    unused (tie_exact_top_ids's k-th-value TopK; breadth-first, stopping at projections), else `t`'s own input."""
    from passes.graph_utils import is_projection
    seen, frontier = set(), [t.inputs[0]]
    while frontier:
        nxt = []
        for v in frontier:
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            p = v.producer()
            if p is None or p.op_type in ("Shape", "Size") or is_projection(p):
                continue
            if p.op_type == "TopK" and p.domain in ("", "ai.onnx") and p is not t and not _indices_used(p):
                return p.inputs[0]
            nxt += [i for i in p.inputs if i is not None and i.const_value is None and not i.is_initializer()]
        frontier = nxt
    return t.inputs[0]


def expose_selections(model: ir.Model, topks: list[ir.Node] | None = None) -> int:
    """Add each selection's scores (and its TopK's indices) as outputs ``selection.{j}.scores`` / ``.ids`` (in
    place); -> number of selections. topks: selection_topks(model), computed before any other probe edit."""
    topks = selection_topks(model) if topks is None else topks
    for j, t in enumerate(topks):
        v, ids = selection_scores(t), t.outputs[1]
        v.name, ids.name = selection_name(j), selection_ids_name(j)
        for w in (v, ids):
            if not w.is_graph_output():
                model.graph.outputs.append(w)
    return len(topks)


def force_selections(model: ir.Model, topks: list[ir.Node] | None = None) -> int:
    """Expose each selection's scores and ids, and make every reader of the scores (both TopKs and the compares of
    tie_exact_top_ids) read graph input ``selection.{j}.scores.forced`` instead (in place); -> number of selections."""
    topks = selection_topks(model) if topks is None else topks
    scores = [selection_scores(t) for t in topks]
    expose_selections(model, topks)
    for j, v in enumerate(scores):
        forced = ir.Value(name=selection_forced_name(j), type=v.type, shape=v.shape)
        model.graph.inputs.append(forced)
        for node, idx in list(v.uses()):
            node.replace_input_with(idx, forced)
    return len(topks)
