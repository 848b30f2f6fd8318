"""Ascend precision emulation on ORT CPU: the ATC-ready graphs run in fp16 (softmax, RMSNorm and the
MoE router kept in fp32, as `--keep_dtype` asks ATC), compared with eager fp32 by msit's thresholds.

`to_fp16(model, keep_fp32)` rewrites a graph on onnx-ir, without onnxconverter-common:
- every node outside the keep set computes in fp16: its float inputs are cast to fp16, its float
  outputs are fp16, float Constants / ConstantOfShape values and Cast-to-float targets become fp16;
- nodes in the keep set (node names from static_export.fp32_island_nodes, the same list written
  to ascend/keep_dtype/<g>.cfg) compute in fp32: their float inputs are cast to fp32;
- float initializers used by any fp16 node are stored as fp16 (weights as ATC stores them), those
  used only by fp32 nodes stay fp32;
- graph inputs and outputs keep their fp32 dtype (Casts at the boundary), like an OM built without
  --input_fp16_nodes, so the same feeds drive both.
ORT CPU has no fp16 kernel for several of these ops (MatMul/Gemm among them on x86); its
InsertCastTransformer then runs that op in fp32 between Casts, and between two such ops it drops
the casts, so a chain of them computes in fp32 without rounding in between (measured,
tests/test_fp16_rounding.py). The emulation therefore rounds less than the NPU does (cube units
accumulate in fp32 and write every tensor as fp16). Its rounding twin (passes/fp16_rounding.py,
every fp16 tensor rounded explicitly; what the ort-cuda check runs) is not used here yet: with it,
tiny's w8a8 package exceeds msit's rel euclid at decode step 0 (0.0587 > 0.05) and trained-small's
w8a8 flips routing at 2 of 15 positions of a decode step, over this module's share rule (measured
2026-12-03); adopting it wants the teacher-forced routing judgement the quantize and ort-cuda
stages use (pipeline.parity.compare_routed) for these static graphs first.

`emulate(...)` compares the fp16 graphs with eager fp32 on a prompt prefilled in a bucket, several
decode steps (each fed the emulated cache) and greedy generation, under
BUDGETS["ascend-fp16-emulation"] (cosine >= 0.99, KL <= 0.005, rel euclid <= 0.05); greedy token
agreement is recorded (informational under this budget, as msit has no top-1 rule).

Routing-aware judging. MoE routing is a discrete choice (TopK over router scores): where two
candidates' fp32 scores nearly tie, fp16 rounding of the hidden state can pick the other expert set
for that token, after which the token's state legitimately diverges (a different expert computed
it). msit's thresholds are for numeric error, so such a flip must not be judged as one, nor hidden.
`emulate` therefore adds every routing TopK's indices (group TopK, expert TopK) as extra outputs of
comparison-only copies of the fp32 static graphs and their fp16 twins, runs both on the same
trajectory and compares the chosen sets per (token position, layer). In every report
(extra["routing"]):
- rows (prefill positions, the decode step's token, greedy steps) whose routing differed in any
  layer are excluded from the thresholds; the unmasked numbers are kept for information;
- a flip that follows an earlier one (a later layer at the same position, or any position attending
  to an earlier flipped one from a later layer) is a consequence and is recorded as such;
- the report still FAILS when more than MAX_FLIPPED_FRACTION of the positions its outputs depend on
  flipped, or when a flip that follows none had an fp32 margin (k-th minus (k+1)-th score of the
  TopK that flipped) above MAX_FLIP_MARGIN: that is a precision error, not a near-tie;
- before the next decode step, the cache rows a flipped token wrote after its first flipped layer
  are reset to the reference's, so later steps measure fp16 error, not the flip's consequence
  (recorded as cache_rows_reset); positions of the same prefill after a flip stay judged as they are;
- greedy: the first token divergence and whether a routing flip preceded it.
"""
from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from passes.ir_external import copy_model
from pipeline.export import save_graph
from passes import routing_probes as probes
from pipeline.parity import (BUDGETS, FLIP_MARGIN_FACTOR, ParityError, ParityReport, _judge_selections,
                             _selection_flip_text, budget_for, compare, selection_outputs)

from .static_export import MASK_VALUE, INDEX_DTYPE, StaticGraphSpec, StaticRunner, ort_sessions, static_cache_spec

STAGE = "ascend-fp16-emulation"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def to_fp16(model: ir.Model, keep_fp32: set[str] | list[str]) -> ir.Model:
    """A copy of `model` computing in fp16 except the nodes named in keep_fp32 (see module doc)."""
    m = copy_model(model)
    keep = set(keep_fp32)
    g = m.graph
    nodes = list(g)
    want = {id(n): (ir.DataType.FLOAT if n.name in keep else ir.DataType.FLOAT16) for n in nodes}

    # initializers: fp16 when any fp16 node uses them
    for v in list(g.initializers.values()):
        if v.dtype != ir.DataType.FLOAT or v.const_value is None:
            continue
        if any(want[id(user)] == ir.DataType.FLOAT16 for user, _ in v.uses()):
            v.const_value = ir.tensor(v.const_value.numpy().astype(np.float16), name=v.name)
            v.dtype = ir.DataType.FLOAT16

    casts: dict[tuple[int, ir.DataType], ir.Value] = {}

    def cast_of(v: ir.Value, to: ir.DataType, before: ir.Node) -> ir.Value:
        key = (id(v), to)
        if key not in casts:
            node = ir.node("Cast", [v], attributes={"to": to},
                           name=f"{v.name}/emulation_cast_{'fp16' if to == ir.DataType.FLOAT16 else 'fp32'}")
            node.outputs[0].name = f"{v.name}__{'fp16' if to == ir.DataType.FLOAT16 else 'fp32'}"
            node.outputs[0].dtype = to
            node.outputs[0].shape = v.shape
            g.insert_before(before, node)
            casts[key] = node.outputs[0]
        return casts[key]

    for node in nodes:
        dt = want[id(node)]
        for i, v in enumerate(node.inputs):
            if v is not None and v.dtype in _FLOATS and v.dtype != dt:
                node.replace_input_with(i, cast_of(v, dt, node))
        if dt == ir.DataType.FLOAT16:
            if node.op_type == "Cast" and node.attributes["to"].value == ir.DataType.FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT16)
            if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
                t = node.attributes["value"].value
                if t.dtype == ir.DataType.FLOAT:
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(t.numpy().astype(np.float16)))
            for o in node.outputs:
                if o.dtype == ir.DataType.FLOAT:
                    o.dtype = ir.DataType.FLOAT16
        else:  # fp32 island: a Cast to float / float constants stay fp32
            for o in node.outputs:
                if o.dtype == ir.DataType.FLOAT16 and node.op_type not in ("Cast",):
                    o.dtype = ir.DataType.FLOAT

    # graph outputs stay fp32
    for i, out in enumerate(list(g.outputs)):
        if out.dtype == ir.DataType.FLOAT16:
            name = out.name
            out.name = f"{name}__fp16"
            cast = ir.node("Cast", [out], attributes={"to": ir.DataType.FLOAT}, name=f"{name}/emulation_output_cast")
            cast.outputs[0].name = name
            cast.outputs[0].dtype = ir.DataType.FLOAT
            cast.outputs[0].shape = out.shape
            g.append(cast)
            g.outputs[i] = cast.outputs[0]
    m.graph.name = f"{model.graph.name}_fp16_emulation"
    return m


def emulation_graphs(graphs: dict[str, tuple[StaticGraphSpec, Path]], keep_fp32: dict[str, list[str]],
                     folder: Path) -> dict[str, Path]:
    """Write the fp16 twin of every graph into folder; -> {name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (_, path) in graphs.items():
        m16 = to_fp16(ir.load(path), keep_fp32.get(name, []))
        p = folder / f"{name}.fp16.onnx"
        save_graph(m16, p, check=False)
        out[name] = p
    return out


# ------------------------------------------------------------------------------------ routing
MAX_FLIPPED_FRACTION = BUDGETS[STAGE].max_flipped_fraction
"""A report fails when more than this fraction of the token positions its outputs depend on had a
routing flip: rare near-ties are expected under fp16, a router that drifts on many tokens is not
(the budget table's max_flipped_fraction of the stage)."""

MAX_FLIP_MARGIN = 1e-2
"""A flip is a near-tie only when the fp32 margin of the decision that flipped (the k-th minus the
(k+1)-th score ranked by that TopK in the fp32 graph) is at most this; fp16 rounding moves router
scores by ~1e-4..1e-3, so a larger margin overturned is a precision error and fails the report.
Where the lossy graph's ranked scores are seen too (quant_parity), the limit is the larger of this and
parity.FLIP_MARGIN_FACTOR x 2 x the most the stage moved that TopK's scores in that run (parity's rule)."""

_ROUTER_SCOPE = re.compile(r"(?:^|/)routers\.(\d+)/")
_INDEXER_SCOPE = re.compile(r"(?:^|/)index_select_\d+[./]")


@dataclasses.dataclass(frozen=True)
class RoutingDecision:
    """A TopK whose indices the graph uses: the router's group TopK or its expert TopK."""

    node: str  # TopK node name (the same in a graph and its fp16 twin)
    layer: int | str  # decoder layer, from the node's `routers.{i}/` scope (else the node name)
    kind: str  # "experts" (the last decision of its layer) or "groups"
    indices: str  # value name of the indices output
    scores: str  # value name of the ranked input (choice scores)
    axis: int
    k: int


def _decision_nodes(model: ir.Model) -> list[tuple[ir.Node, int | str, int, int]]:
    found = []
    for node in model.graph:
        if node.op_type != "TopK" or len(node.outputs) < 2:
            continue
        if _INDEXER_SCOPE.search(node.name or ""):
            continue  # DeepSeek-V3.2's indexer top-k, not a router's: judged by the numbers it leads to
        idx = node.outputs[1]
        if not idx.uses() and not idx.is_graph_output():
            continue  # e.g. the per-group top-2, whose values alone make the group score
        axis = node.attributes.get_int("axis", -1)
        dim = idx.shape[axis] if idx.shape is not None else None
        if not isinstance(dim, int):
            kv = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
            if kv is None:
                raise ValueError(f"TopK {node.name!r}: k is neither static in its output shape nor a constant")
            dim = int(kv.numpy().reshape(-1)[0])
        m = _ROUTER_SCOPE.search(node.name or "")
        found.append((node, int(m.group(1)) if m else (node.name or f"topk{len(found)}"), axis, dim))
    return found


def routing_decisions(model: ir.Model) -> list[RoutingDecision]:
    """The routing TopK nodes of `model`, in graph order (group TopK before expert TopK per layer)."""
    found = _decision_nodes(model)
    last = {layer: node.name for node, layer, _, _ in found}
    return [RoutingDecision(node.name, layer, "experts" if last[layer] == node.name else "groups",
                            node.outputs[1].name, node.inputs[0].name, axis, k) for node, layer, axis, k in found]


def expose_routing(model: ir.Model, scores: bool = True) -> list[RoutingDecision]:
    """Add every routing TopK's indices (and, with scores, its ranked input) to `model`'s graph
    outputs, in place (use it on a copy kept for the comparison); -> the decisions."""
    g = model.graph
    present = {id(v) for v in g.outputs}
    for node, _, _, _ in _decision_nodes(model):
        for v in (node.outputs[1], node.inputs[0] if scores else None):
            if v is not None and id(v) not in present and not v.is_initializer():
                g.outputs.append(v)
                present.add(id(v))
    return routing_decisions(model)


@dataclasses.dataclass
class RoutingCall:
    """One graph run's routing: indices [B, S, k] (and ranked scores [B, S, n]) per TopK node; with forced
    selections (SelectionForcedRunner), per selection j the reference's scores and ids, the lossy graph's own
    scores and the ids its TopK picked from the forced scores ([B, S, M] / [B, S, k]; masked keys -inf)."""

    graph: str
    position: np.ndarray  # [B], position of the first row
    seq: int
    indices: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    selections: dict[str, list[np.ndarray]] | None = None


def _rows(x: np.ndarray, axis: int, B: int, S: int, node: str) -> np.ndarray:
    x = np.moveaxis(np.asarray(x), axis, -1)
    if x.ndim != 2 or x.shape[0] != B * S:
        raise ValueError(f"routing TopK {node!r}: output {list(x.shape)} is not [batch*seq = {B * S}, k]")
    return x.reshape(B, S, -1)


class RoutingRunner(StaticRunner):
    """A StaticRunner over graphs with routing outputs (expose_routing): every run appends a
    RoutingCall to `calls`; prefill / decode / generate return what StaticRunner's do."""

    def __init__(self, sessions: dict, specs: dict[str, StaticGraphSpec], cfg,
                 decisions: dict[str, list[RoutingDecision]]):
        super().__init__(sessions, specs, cfg)
        self.decisions = decisions
        self.calls: list[RoutingCall] = []

    def _outputs(self, name: str, ids: np.ndarray, position: np.ndarray, cache: dict,
                 extra: dict | None = None) -> dict[str, np.ndarray]:
        sess = self.sessions[name]
        feeds = {"input_ids": ids.astype(INDEX_DTYPE), "position": position.astype(INDEX_DTYPE), **cache,
                 **(extra or {})}
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))

    def _record(self, name: str, ids: np.ndarray, position: np.ndarray, res: dict) -> RoutingCall:
        B, S = ids.shape
        call = RoutingCall(name, position.astype(np.int64).copy(), S, {}, {})
        for d in self.decisions.get(name, []):
            call.indices[d.node] = _rows(res[d.indices], d.axis, B, S, d.node)
            if d.scores in res:
                call.scores[d.node] = _rows(res[d.scores], d.axis, B, S, d.node)
        self.calls.append(call)
        return call

    def _run(self, name: str, ids: np.ndarray, position: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
        res = self._outputs(name, ids, position, cache)
        self._record(name, ids, position, res)
        return res["logits"], _present(res)


def _present(res: dict, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k.replace("present.", "past.", 1): v for k, v in res.items() if k.startswith("present.")}


_REFERENCE = "reference|"  # cache keys of the reference's own trajectory inside a SelectionForcedRunner's cache


def selection_nodes(model: ir.Model) -> list[ir.Node]:
    """The lightning indexer's ids TopK nodes (DeepSeek-V3.2, models/v32_static.py `index_select_{i}`), graph order:
    the TopKs whose indices are used (models/indexer.py tie_exact_top_ids's k-th-value TopK is not a selection)."""
    return [n for n in model.graph if n.op_type == "TopK" and _INDEXER_SCOPE.search(n.name or "")
            and len(n.outputs) > 1 and (n.outputs[1].uses() or n.outputs[1].is_graph_output())]


def _masked(scores: np.ndarray) -> np.ndarray:
    """The static graphs mask invisible keys with MASK_VALUE (a finite fp16 floor); -inf for the selection judge."""
    return np.where(scores <= MASK_VALUE, -np.inf, scores.astype(np.float64))


class SelectionForcedRunner(RoutingRunner):
    """A RoutingRunner over lossy graphs whose indexer TopKs read the reference's scores (teacher-forced selection,
    passes/routing_probes.py force_selections): every run first runs the reference graph (`reference`'s sessions, the
    fp32 graphs with their selections exposed) on the same tokens with the reference's own cache, kept under
    `reference|` keys of this runner's cache, then the lossy graph with `selection.{j}.scores.forced` fed from it.
    The lossy graph then attends to the reference's keys at every query, so the stage's numeric error is judged
    everywhere, and the keys its own scores would have picked are judged apart (RoutingCall.selections)."""

    def __init__(self, sessions: dict, specs: dict[str, StaticGraphSpec], cfg,
                 decisions: dict[str, list[RoutingDecision]], reference: RoutingRunner, n_selections: dict[str, int]):
        super().__init__(sessions, specs, cfg, decisions)
        self.reference, self.n_selections = reference, n_selections

    def empty_cache(self) -> dict[str, np.ndarray]:
        cache = super().empty_cache()
        return {**cache, **{_REFERENCE + k: v.copy() for k, v in cache.items()}}

    def _run(self, name: str, ids: np.ndarray, position: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
        own = {k: v for k, v in cache.items() if not k.startswith(_REFERENCE)}
        theirs = {k[len(_REFERENCE):]: v for k, v in cache.items() if k.startswith(_REFERENCE)}
        if len(theirs) != len(own):
            raise ValueError("SelectionForcedRunner: the cache lacks the reference's rows (start from its empty_cache())")
        ref = self.reference._outputs(name, ids, position, theirs)
        n = self.n_selections.get(name, 0)
        res = self._outputs(name, ids, position, own,
                            {probes.selection_forced_name(j): ref[probes.selection_name(j)] for j in range(n)})
        call = self._record(name, ids, position, res)
        call.selections = {
            "reference_scores": [_masked(ref[probes.selection_name(j)]) for j in range(n)],
            "reference_ids": [ref[probes.selection_ids_name(j)] for j in range(n)],
            "actual_scores": [np.where(_masked(ref[probes.selection_name(j)]) == -np.inf, -np.inf,
                                       res[probes.selection_name(j)].astype(np.float64)) for j in range(n)],
            "forced_ids": [res[probes.selection_ids_name(j)] for j in range(n)]}
        return res["logits"], {**_present(res), **_present(ref, _REFERENCE)}


def _margins(scores: np.ndarray, k: int) -> np.ndarray:
    """k-th minus (k+1)-th largest along the last axis (inf when nothing ranks below the k-th)."""
    s = -np.sort(-scores.astype(np.float64), axis=-1)
    if s.shape[-1] <= k:
        return np.full(s.shape[:-1], np.inf)
    with np.errstate(invalid="ignore"):
        m = s[..., k - 1] - s[..., k]
    return np.nan_to_num(m, nan=0.0, posinf=np.inf)


def _pair_decisions(ref: list[RoutingDecision], act: list[RoutingDecision], graph: str):
    if [d.node for d in ref] == [d.node for d in act] or len(ref) == len(act):
        return list(zip(ref, act))  # by name, else by order (both come from the same export)
    raise ValueError(f"{graph}: the fp32 graph has {len(ref)} routing TopK nodes, its fp16 twin {len(act)}")


class _RoutingTrace:
    """Per (batch row, absolute position) of one trajectory: the routing flips (one per router
    layer whose decision differs, fp32 static graph vs fp16; empty when every layer agreed)."""

    def __init__(self, ref: RoutingRunner, act: RoutingRunner):
        self.ref, self.act = ref, act
        self.layers = 0
        self.positions: dict[tuple[int, int], list[dict]] = {}
        self.new: list[tuple[int, int]] = []  # positions the last add() found flipped
        self.reset: set[tuple[int, int]] = set()  # positions whose diverged cache rows were reset (repair)
        self.selections: list[dict[str, list[np.ndarray]]] = []  # forced calls' selection rows not yet judged

    def add_selections(self, ac: RoutingCall, n_valid: int) -> None:
        """Keep a forced call's selection rows (rows >= n_valid: padding, dropped) for the next judgement."""
        if ac.selections:
            self.selections.append({k: [np.asarray(a)[:, :n_valid] for a in v] for k, v in ac.selections.items()})

    def take_selections(self) -> dict[str, list[np.ndarray]] | None:
        """The selection rows kept since the last call, each selection's as [queries, ...] (_judge_selections)."""
        calls, self.selections = self.selections, []
        if not calls:
            return None
        return {k: [np.concatenate([c[k][j].reshape(-1, c[k][j].shape[-1]) for c in calls])
                    for j in range(len(calls[0][k]))] for k in calls[0]}

    def add(self, rc: RoutingCall, ac: RoutingCall, n_valid: int) -> None:
        """Compare two runs of the same graph on the same inputs; rows >= n_valid (padding) are skipped."""
        if rc.graph != ac.graph or rc.seq != ac.seq or not np.array_equal(rc.position, ac.position):
            raise ValueError(f"routing calls differ: {rc.graph} at {rc.position.tolist()} vs "
                             f"{ac.graph} at {ac.position.tolist()}")
        self.add_selections(ac, n_valid)
        layers: dict = {}
        for dr, da in _pair_decisions(self.ref.decisions.get(rc.graph, []), self.act.decisions.get(ac.graph, []),
                                      rc.graph):
            layers.setdefault(dr.layer, []).append((dr, da))
        self.layers = max(self.layers, len(layers))
        B = rc.position.shape[0]
        for b in range(B):
            for s in range(n_valid):
                self.positions[(b, int(rc.position[b]) + s)] = []
        for layer, pairs in layers.items():
            er, ea = pairs[-1]  # the expert TopK: the sets the flip record shows
            done = np.zeros((B, rc.seq), bool)
            for dr, da in pairs:
                r, a = rc.indices[dr.node], ac.indices[da.node]
                differ = (np.sort(r, axis=-1) != np.sort(a, axis=-1)).any(axis=-1) & ~done
                done |= differ
                differ[:, n_valid:] = False
                if not differ.any():
                    continue
                margins = _margins(rc.scores[dr.node], dr.k) if dr.node in rc.scores else None
                allowed = MAX_FLIP_MARGIN
                if dr.node in rc.scores and da.node in ac.scores:  # both ranked inputs seen: the stage's own movement
                    with np.errstate(invalid="ignore"):  # -inf - -inf at the masked groups, dropped below
                        moved = np.abs(rc.scores[dr.node][:, :n_valid].astype(np.float64)
                                       - ac.scores[da.node][:, :n_valid].astype(np.float64))
                    moved = float(np.max(moved[np.isfinite(moved)], initial=0.0))
                    allowed = max(MAX_FLIP_MARGIN, FLIP_MARGIN_FACTOR * 2 * moved)
                for b, s in zip(*np.nonzero(differ)):
                    self.positions[(int(b), int(rc.position[b]) + int(s))].append({
                        "batch": int(b), "position": int(rc.position[b]) + int(s), "layer": layer,
                        "decided_by": dr.kind, "topk": dr.node,
                        "margin": None if margins is None else float(margins[b, s]), "allowed": allowed,
                        "experts_reference": sorted(int(i) for i in rc.indices[er.node][b, s]),
                        "experts_actual": sorted(int(i) for i in ac.indices[ea.node][b, s])})

        # a flip is a consequence, not a near-tie of its own, when this token's state had already
        # diverged: an earlier layer flipped at this position, or at an earlier position whose
        # cache rows this token attends to from the next layer on (unless those rows were reset)
        self.new = sorted({(f["batch"], f["position"]) for bp, fl in self.positions.items() for f in fl
                           if bp[1] >= int(rc.position[bp[0]]) and bp[1] < int(rc.position[bp[0]]) + n_valid})
        for b, p in self.new:
            for f in self.positions[(b, p)]:
                causes = [g for (gb, gp), gl in self.positions.items()
                          if gb == b and (gp == p or (gp < p and (gb, gp) not in self.reset)) for g in gl
                          if isinstance(g["layer"], int) and isinstance(f["layer"], int) and g["layer"] < f["layer"]]
                first = min(causes, key=lambda g: (g["layer"], g["position"]), default=None)
                f["follows"] = None if first is None else {"position": first["position"], "layer": first["layer"]}

    def flipped(self, b: int, p: int) -> bool:
        return bool(self.positions.get((b, p)))

    def first_layer(self, b: int, p: int):
        """The first router layer that flipped at (b, p) (None: none, or layers without an order)."""
        layers = [f["layer"] for f in self.positions.get((b, p), [])]
        return min(layers) if layers and all(isinstance(x, int) for x in layers) else None

    def repair(self, cache16: dict, reference_cache, spec) -> list[dict]:
        """Reset the cache rows that the last call's flipped tokens wrote after their first flip
        (layers > the first flipped router layer; every layer when layers have no order) to the
        reference's rows, in place; -> what was replaced. Later decode steps then measure fp16
        error, not the consequence of a discrete decision that went the other way."""
        done = []
        for b, p in self.new:
            first = self.first_layer(b, p)
            layers = [i for i in range(spec.num_layers) if first is None or i > first]
            for i in layers:
                for j, t in enumerate(spec.tensors):
                    key = f"past.{i}.{t.name}"
                    if not cache16[key].flags.writeable:
                        cache16[key] = cache16[key].copy()
                    row = (b,) + t.rows(p, p + 1)[1:]
                    cache16[key][row] = reference_cache[i][j][row].numpy()
            if layers:
                done.append({"batch": b, "position": p, "layers": layers})
            self.reset.add((b, p))
        return done


@dataclasses.dataclass
class EmulationReport(ParityReport):
    """A ParityReport whose outputs are judged over the positions whose routing agreed with the
    fp32 graphs; it also fails on extra["routing"]["reasons"] (too many flips, a flip that was
    not a near-tie)."""

    def _routing_reasons(self) -> list[str]:
        return list(self.extra.get("routing", {}).get("reasons", []))

    @property
    def passed(self) -> bool:
        return super().passed and not self._routing_reasons()

    def failure_reasons(self) -> list[str]:
        return super().failure_reasons() + [f"routing: {r}" for r in self._routing_reasons()]

    def raise_if_failed(self) -> ParityReport:
        if self.passed:
            return self
        try:
            ParityReport.raise_if_failed(self)
        except ParityError as e:
            raise ParityError("\n".join([str(e)] + [f"  routing: {r}" for r in self._routing_reasons()]),
                              report=self) from None
        return self

    def to_markdown(self) -> str:
        text = super().to_markdown()
        rt = self.extra.get("routing")
        if not rt:
            return text
        lines = ["", f"Routing vs the fp32 graphs: {rt['summary']}"]
        for name, u in (rt.get("unmasked") or {}).items():
            lines.append(f"- unmasked `{name}` (informational, flipped rows included): cosine {u['cosine']:.6g}, "
                         f"rel euclid {u['rel_euclid']:.3g}" + ("" if u["kl"] is None else f", KL {u['kl']:.3g}")
                         + ("" if u["passed"] else " (over the thresholds)"))
        for c in rt.get("cache_rows_reset") or []:
            lines.append(f"- cache rows of position {c['position']}" + (f" (row {c['batch']})" if c["batch"] else "")
                         + f", layers {c['layers'][0]}-{c['layers'][-1]}, reset to the reference's before the "
                         "next decode step")
        sel = rt.get("selection")
        if sel:
            lines.append(f"- indexer selection (teacher-forced: the graph attends to the reference's keys): "
                         f"{sel['summary']}")
            lines += [f"- selection flip: {_selection_flip_text(f)}" for f in sel["flips"]]
        lines += [f"- routing: {r}" for r in rt.get("reasons", [])]
        return text + "\n".join(lines) + "\n"


def _flip_text(f: dict) -> str:
    m = "?" if f["margin"] is None else f"{f['margin']:.2g}"
    where = f"row {f['batch']} " if f["batch"] else ""
    after = (f", after the flip at position {f['follows']['position']} layer {f['follows']['layer']}"
             if f.get("follows") else "")
    return (f"{where}position {f['position']} layer {f['layer']}: experts {f['experts_reference']} -> "
            f"{f['experts_actual']} ({f['decided_by']} TopK, fp32 margin {m}{after})")


def selection_budget(stage: str):
    """The stage's budget for the indexer's scores: its cosine, rel euclid and KL recorded but not judged."""
    return dataclasses.replace(budget_for(stage), max_rel_euclid=None, max_kl=None)


def _max_flipped_fraction(stage: str) -> float:
    """The stage's share of flipped positions from the budget table (this module's default where it has none)."""
    b = budget_for(stage).max_flipped_fraction
    return MAX_FLIPPED_FRACTION if b is None else b


def _judge(stage: str, ref: dict, act: dict, logits_outputs: list[str], trace: _RoutingTrace | None,
           rows: np.ndarray) -> ParityReport:
    """compare() over the rows (leading [B, T] axes of every array; rows[b, t] = absolute position)
    whose routing agreed in every layer; flipped rows are excluded (the judged arrays are then the
    kept rows, [n_kept, ...]) and recorded, the unmasked numbers kept as information. Without a
    trace: plain compare()."""
    if trace is None:
        return compare(stage, ref, act, logits_outputs=logits_outputs)
    B = rows.shape[0]
    keep = np.array([[not trace.flipped(b, int(p)) for p in rows[b]] for b in range(B)], bool).reshape(rows.shape)
    last = rows.max(axis=1)
    context = [(b, p) for (b, p) in trace.positions if p <= last[b]]
    flips = [dict(f) for bp in sorted(context) for f in trace.positions[bp]]
    flipped = sorted({(f["batch"], f["position"]) for f in flips})
    excluded = [(b, int(p)) for b in range(B) for p, k in zip(rows[b], keep[b]) if not k]
    n_ctx = len(context)
    if keep.all():
        rep = compare(stage, ref, act, logits_outputs=logits_outputs)
        unmasked = None
    elif keep.any():
        rep = compare(stage, {k: np.asarray(v)[keep] for k, v in ref.items()},
                      {k: np.asarray(v)[keep] for k, v in act.items()}, logits_outputs=logits_outputs)
        unmasked = compare(stage, ref, act, logits_outputs=logits_outputs)
    else:  # every row of this report flipped: nothing left to judge
        rep = compare(stage, {}, {})
        unmasked = compare(stage, ref, act, logits_outputs=logits_outputs)
    reasons = []
    max_share = _max_flipped_fraction(stage)
    if n_ctx and len(flipped) / n_ctx > max_share:
        reasons.append(f"expert choice flipped at {len(flipped)} of {n_ctx} token positions "
                       f"({100 * len(flipped) / n_ctx:.1f}% > {100 * max_share:g}%): more than "
                       "occasional near-ties")
    for f in flips:  # a flip that follows an earlier one is a consequence: its margin is not judged
        allowed = f.get("allowed", MAX_FLIP_MARGIN)
        if not f.get("follows") and f["margin"] is not None and not f["margin"] <= allowed:
            reasons.append(f"{_flip_text(f)}: margin > {allowed:.3g}, not a near-tie")
    roots = [f for f in flips if not f.get("follows")]
    margins = [f["margin"] for f in roots if f["margin"] is not None]
    n_rows = int(rows.size)
    summary = (f"{n_rows - len(excluded)} of {n_rows} rows judged; " +
               ("no routing flip" if not flips else
                f"{len(flipped)} of {n_ctx} positions flipped ({'; '.join(_flip_text(f) for f in flips)})") +
               (f"; excluded from the thresholds: positions {[p for _, p in excluded]}" if excluded else ""))
    record = {
        "reference": "fp32 static graphs on ORT CPU (same inputs)",
        "batch": B,
        "n_positions": n_ctx,  # (batch row, position) pairs the outputs depend on, routing compared
        "n_decisions": n_ctx * trace.layers,
        "n_flipped_decisions": len(flips),
        "n_root_flips": len(roots),
        "flipped_positions": sorted({p for _, p in flipped}),
        "excluded_positions": [p for _, p in excluded],
        "excluded_rows": [[b, p] for b, p in excluded],
        "n_rows": n_rows,
        "n_rows_judged": n_rows - len(excluded),
        "min_margin_of_flips": min(margins) if margins else None,
        "max_margin_of_flips": max(margins) if margins else None,
        "max_flipped_fraction": max_share,
        "max_flip_margin": MAX_FLIP_MARGIN,
        "flips": flips,
        "reasons": reasons,
        "summary": summary,
    }
    if unmasked is not None:
        record["unmasked"] = {o.name: {"cosine": o.cosine, "rel_euclid": o.rel_euclid, "kl": o.kl,
                                       "passed": o.passed, "reasons": list(o.reasons)} for o in unmasked.outputs}
    outputs = list(rep.outputs)
    selections = trace.take_selections()
    if selections is not None:
        # the indexer's own scores are judged as outputs too: under forcing they no longer reach the logits, and a
        # stage that broke them would otherwise only widen its own allowed flip margin. By direction (cosine), not by
        # msit's rel euclid: their one consumer is the TopK, whose flips the margin rule judges (docs/v32.md)
        sel_ref, sel_act = selection_outputs(selections)
        outputs += compare(stage, sel_ref, sel_act, budget=selection_budget(stage)).outputs
        sel = _judge_selections(selections, max_share)
        record["selection"] = sel
        record["reasons"] = reasons + [f"selection: {r}" for r in sel["reasons"]]
        record["summary"] += f"; indexer selection teacher-forced: {sel['summary']}"
    out = EmulationReport(stage=rep.stage, budget=rep.budget, outputs=outputs, extra=dict(rep.extra))
    out.extra["routing"] = record
    return out


# ------------------------------------------------------------------------------------ runs
def emulate(model, graphs: dict[str, tuple[StaticGraphSpec, Path]], keep_fp32: dict[str, list[str]],
            prompt_len: int | None = None, decode_steps: int = 4, gen_tokens: int = 16, seed: int = 0,
            work: Path | None = None, stage: str = STAGE, routing_aware: bool = True) -> list[ParityReport]:
    """fp16 emulation vs eager fp32: reports for the prefill (logits + cache rows), each decode step
    and greedy generation (tokens recorded), under BUDGETS[stage].

    routing_aware: every routing TopK's indices (and, in the fp32 graphs, its scores) become extra
    outputs of comparison-only copies of the fp32 static graphs and their fp16 twins; both run on
    the same inputs, and token positions whose expert choice differs in any layer are excluded from
    the thresholds and recorded (extra["routing"]); see compare_runs."""
    specs = {n: s for n, (s, _) in graphs.items()}
    with tempfile.TemporaryDirectory(prefix="mlamoe-emul-") as tmp:
        folder = Path(work) if work else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if routing_aware:
            pairs = ((name, m32, to_fp16(m32, keep_fp32.get(name, [])))
                     for name, (_, path) in graphs.items() for m32 in [ir.load(path)])
            runner, ref = _routing_runners(model.config, specs, pairs, folder, "fp16", act_scores=False)
        else:
            p16 = {}
            for name, (_, path) in graphs.items():
                p16[name] = folder / f"{name}.fp16.onnx"
                save_graph(to_fp16(ir.load(path), keep_fp32.get(name, [])), p16[name], check=False)
            runner, ref = StaticRunner(ort_sessions(p16), specs, model.config), None
        return compare_runs(model, runner, stage, prompt_len, decode_steps, gen_tokens, seed, routing_ref=ref)


def _routing_runners(cfg, specs: dict, pairs, folder: Path, tag: str, act_scores: bool):
    """(runner over the lossy graphs, reference runner over the fp32 ones) from (name, fp32 ir.Model, lossy ir.Model)
    triples, taken one at a time (a lazy iterable keeps one pair in memory): comparison-only copies with every
    routing TopK exposed (the fp32 ones with their ranked scores, the lossy ones too when act_scores), saved in
    folder."""
    pa, pr, da, dr, ns = {}, {}, {}, {}, {}
    for name, m32, mact in pairs:
        sel32, sel = selection_nodes(m32), selection_nodes(mact)
        if len(sel32) != len(sel):
            raise ValueError(f"{name}: the fp32 graph has {len(sel32)} indexer TopK nodes, the {tag} graph {len(sel)}")
        if sel:  # DeepSeek-V3.2: the lossy graph's indexer TopKs read the reference's scores
            probes.expose_selections(m32, sel32)
            probes.force_selections(mact, sel)
            ns[name] = len(sel)
        da[name] = expose_routing(mact, scores=act_scores)
        dr[name] = expose_routing(m32, scores=True)
        pa[name], pr[name] = folder / f"{name}.{tag}.onnx", folder / f"{name}.fp32.routing.onnx"
        save_graph(mact, pa[name], check=False)  # its own copy of the weights: folder is not the package's onnx/
        save_graph(m32, pr[name], check=False)
    ref = RoutingRunner(ort_sessions(pr), specs, cfg, dr)
    if ns:
        return SelectionForcedRunner(ort_sessions(pa), specs, cfg, da, ref, ns), ref
    return RoutingRunner(ort_sessions(pa), specs, cfg, da), ref


def quant_parity(model, fp32_graphs: dict[str, tuple[StaticGraphSpec, Path]],
                 graphs: dict[str, tuple[StaticGraphSpec, Path]], stage: str, prompt_len: int | None = None,
                 decode_steps: int = 4, gen_tokens: int = 16, seed: int = 0) -> list[ParityReport]:
    """The quantized static graphs on ORT CPU vs eager, routing-aware as the fp16 emulation is: comparison-only
    copies of the quantized graphs and of the fp32 static graphs they came from expose every routing TopK, both run
    the same trajectory, and rows whose expert choice the quantization flipped are excluded from the stage's
    budget and reported (compare_runs with routing_ref; share of flips from the stage's budget)."""
    specs = {n: s for n, (s, _) in graphs.items()}
    with tempfile.TemporaryDirectory(prefix="mlamoe-quant-routing-") as tmp:
        pairs = ((name, ir.load(fp32_graphs[name][1]), ir.load(path)) for name, (_, path) in graphs.items())
        runner, ref = _routing_runners(model.config, specs, pairs, Path(tmp), "quant.routing", act_scores=True)
        return compare_runs(model, runner, stage, prompt_len, decode_steps, gen_tokens, seed, routing_ref=ref)


def static_parity(model, graphs: dict[str, tuple[StaticGraphSpec, Path]], stage: str = "export/ascend-static",
                  prompt_len: int | None = None, decode_steps: int = 4, gen_tokens: int = 16,
                  seed: int = 0) -> list[ParityReport]:
    """The fp32 static graphs on ORT CPU vs eager (the `export` fp32 budget: greedy tokens binding)."""
    specs = {n: s for n, (s, _) in graphs.items()}
    runner = StaticRunner(ort_sessions({n: p for n, (_, p) in graphs.items()}), specs, model.config)
    return compare_runs(model, runner, stage, prompt_len, decode_steps, gen_tokens, seed)


def make_prompt(cfg, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """The prompt compare_runs uses: [batch, length] token ids from torch.Generator(seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


@torch.no_grad()
def compare_runs(model, runner: StaticRunner, stage: str, prompt_len: int | None = None, decode_steps: int = 4,
                 gen_tokens: int = 16, seed: int = 0, routing_ref: RoutingRunner | None = None) -> list[ParityReport]:
    """Eager vs `runner` on one prompt: prefill in the smallest bucket (prompt = 3/4 of it by
    default, so padding is exercised), `decode_steps` steps each fed the runner's own cache, then
    greedy generation of `gen_tokens` tokens.

    With routing_ref (the fp32 static graphs as a RoutingRunner; `runner` a RoutingRunner too), the
    reference graphs run the same trajectory (same tokens, their own cache) and every router
    decision is compared: a row (prefill position, decode step, greedy step) whose expert choice
    differs in any layer is excluded from the thresholds (a discrete flip on a near-tie, after which
    that token legitimately diverges), the rest is judged as usual. A report still fails when more
    than MAX_FLIPPED_FRACTION of the positions its outputs depend on flipped, or when a flip's fp32
    margin exceeds MAX_FLIP_MARGIN. Rows after a flipped position that attend to it stay judged."""
    specs = runner.specs
    cfg = model.config
    dec = specs["decode"]
    buckets = sorted(s.seq for s in specs.values() if s.kind == "prefill")
    L = prompt_len or max(1, (3 * buckets[0]) // 4)
    prompt = make_prompt(cfg, dec.batch, L, seed)
    B = dec.batch
    if routing_ref is not None and not isinstance(runner, RoutingRunner):
        raise TypeError("compare_runs: routing_ref needs a RoutingRunner as runner")
    trace = _RoutingTrace(routing_ref, runner) if routing_ref is not None else None
    reports = []
    cache_spec = static_cache_spec(cfg)
    ref_logits, cache = model.step(prompt, model.empty_cache(B, cache_spec.layout), cache_spec.layout)
    logits, c16 = runner.prefill(prompt.numpy())
    if trace is not None:
        _, c32 = routing_ref.prefill(prompt.numpy())
        trace.add(routing_ref.calls[-1], runner.calls[-1], L)
    ref = {"logits": ref_logits.numpy()}
    act = {"logits": logits}
    # cache rows 0..L-1 are the ones this prefill wrote (rows L.. hold the bucket's padding)
    for i, layer in enumerate(cache):
        for t, a in zip(cache_spec.tensors, layer):
            ref[f"present.{i}.{t.name}"] = a.numpy()
            act[f"present.{i}.{t.name}"] = c16[f"past.{i}.{t.name}"][t.rows(0, L)]
    reports.append(_judge(f"{stage}/prefill", ref, act, ["logits"], trace, np.tile(np.arange(L), (B, 1))))
    if trace is not None:
        reports[-1].extra["routing"]["cache_rows_reset"] = trace.repair(c16, cache, cache_spec)
    tok = ref_logits[:, -1].argmax(-1, keepdim=True)
    pos = L
    for step in range(decode_steps):
        if pos >= dec.max_cache:
            break
        ref_logits, cache = model.step(tok, cache, cache_spec.layout)
        logits, c16 = runner.decode(tok.numpy(), pos, c16)
        if trace is not None:
            _, c32 = routing_ref.decode(tok.numpy(), pos, c32)
            trace.add(routing_ref.calls[-1], runner.calls[-1], 1)
        reports.append(_judge(f"{stage}/decode-{step}", {"logits": ref_logits.numpy()}, {"logits": logits},
                              ["logits"], trace, np.full((B, 1), pos)))
        if trace is not None:
            reports[-1].extra["routing"]["cache_rows_reset"] = trace.repair(c16, cache, cache_spec)
        tok = ref_logits[:, -1].argmax(-1, keepdim=True)
        pos += 1
    from models.generation import greedy_generate
    n = min(gen_tokens, dec.max_cache - L)
    ref_tokens, ref_steps = greedy_generate(model, prompt, n, cache_spec.layout)
    mark = len(runner.calls) if trace is not None else 0
    tokens, steps = runner.generate(prompt.numpy(), n)
    gtrace, agree32 = None, 0
    if trace is not None:
        mark32 = len(routing_ref.calls)
        tokens32, _ = routing_ref.generate(prompt.numpy(), n)
        # call 0 is the prefill, call i >= 1 decodes token i-1: comparable while both runs were
        # fed the same tokens (fp32 static vs fp16 greedy)
        agree32 = int((tokens32 == tokens).all(0).cumprod().sum())
        gtrace = _RoutingTrace(routing_ref, runner)
        for i, (rc, ac) in enumerate(zip(routing_ref.calls[mark32:], runner.calls[mark:])):
            if i <= agree32:
                gtrace.add(rc, ac, L if i == 0 else 1)
        for i, ac in enumerate(runner.calls[mark:]):  # forced selections: each call's reference ran its tokens
            if i > agree32:
                gtrace.add_selections(ac, L if i == 0 else 1)
    # the runner's own greedy logits are compared up to the first token mismatch (after it the
    # two trajectories see different tokens and are no longer comparable)
    agree = int((ref_tokens.numpy() == tokens).all(0).cumprod().sum())
    upto = max(agree, 1)
    rep = _judge(f"{stage}/greedy", {"step_logits": ref_steps.numpy()[:, :upto]}, {"step_logits": steps[:, :upto]},
                 ["step_logits"], gtrace, np.tile(L - 1 + np.arange(upto), (B, 1)))
    record = rep.add_tokens("greedy", ref_tokens.numpy(), tokens)
    if gtrace is not None:
        d = record["first_mismatch"]
        div = None
        if d is not None:  # step d's logits come from positions 0 .. L-1+d
            at = L - 1 + d
            before = sorted({p for (b, p), f in gtrace.positions.items() if f and p <= at})
            div = {"step": d, "position": at, "routing_compared": d <= agree32,
                   "routing_flip_before": bool(before), "flipped_positions_before": before}
        rep.extra["routing"]["first_token_divergence"] = div
    reports.append(rep)
    return reports


def describe(reports: list[ParityReport]) -> str:
    """The README's account of the routing-aware emulation reports: what met msit's thresholds, which
    positions were excluded and why (e.g. "meets msit's thresholds on 11 of 12 prefill positions
    and 4 of 4 decode steps; 1 position excluded (11): ...")."""
    emul = {r.stage.rsplit("/", 1)[-1]: r for r in reports if "routing" in r.extra}
    pre = emul.get("prefill")
    if pre is None:
        return "meets msit's thresholds"
    decodes = [r for k, r in emul.items() if k.startswith("decode-")]
    rt = pre.extra["routing"]
    n, judged = rt["n_rows"], rt["n_rows_judged"]
    d_judged = sum(1 for r in decodes if r.extra["routing"]["n_rows_judged"])
    unit = "positions" if rt["batch"] == 1 else f"tokens ({rt['batch']} batch rows)"
    text = (f"meets msit's thresholds on {'all ' if judged == n else ''}{judged}{'' if judged == n else f' of {n}'} "
            f"prefill {unit} and {d_judged} of {len(decodes)} decode steps")
    flips = {(f["batch"], f["position"], f["layer"]): f for r in emul.values() for f in r.extra["routing"]["flips"]}
    roots = sorted((f for f in flips.values() if not f.get("follows")), key=lambda f: (f["position"], f["batch"]))
    excluded = sorted({p for r in emul.values() for p in r.extra["routing"]["excluded_positions"]})
    if not flips:
        text += " (expert choices identical to the fp32 graphs' at every position and layer)"
    else:
        def kind(f):
            return "group" if f["decided_by"] == "groups" else "expert"
        if len(roots) <= 3:
            why = "; ".join(f"position {f['position']} layer {f['layer']} {kind(f)} choice, fp32 margin "
                            + ("?" if f["margin"] is None else f"{f['margin']:.2g}") for f in roots)
        else:
            ms = [f["margin"] for f in roots if f["margin"] is not None]
            why = f"{len(roots)} near-ties" + (f", fp32 margins <= {max(ms):.2g}" if ms else "")
        n_after = len(flips) - len(roots)
        text += (f"; {len(excluded)} position{'s' * (len(excluded) != 1)} excluded "
                 f"({', '.join(map(str, excluded))}): the expert choice flipped on a near-tie with the fp32 "
                 f"routing ({why})"
                 + (f", and {n_after} later router decision{'s' * (n_after != 1)} of the diverged token"
                    f"{'s' * (len(excluded) != 1)} followed" if n_after else ""))
        if any(r.extra["routing"].get("cache_rows_reset") for r in emul.values()):
            text += "; the decode steps ran on a cache whose rows written after a flip were reset to the reference's"
    greedy = emul.get("greedy")
    if greedy is not None:
        t = greedy.extra.get("tokens", {}).get("greedy", {})
        text += f"; greedy tokens equal for {t.get('n_equal_steps', '?')} of {t.get('n_steps_reference', '?')} steps"
        div = greedy.extra["routing"].get("first_token_divergence")
        if div:
            text += (f" (first divergence at step {div['step']}, "
                     + (f"following the routing flip at position {div['flipped_positions_before'][-1]})"
                        if div["routing_flip_before"] else "with no routing flip before it)"))
    return text


class StaticGraphReference:
    """A reference with the eager model's interface (config, empty_cache, step: what compare_runs,
    greedy_generate and kit.golden_cases call) computed by fixed-shape graphs on ORT CPU: the fp32
    W8A8 QDQ graphs, against which the fp16 emulation of those same graphs is judged (the quantization
    error itself is judged separately, QDQ graphs vs eager, under BUDGETS["quantize-w8a8"])."""

    def __init__(self, runner: StaticRunner):
        self.runner, self.config = runner, runner.cfg

    def cache_spec(self, layout: str | None = None):
        return static_cache_spec(self.config)

    def empty_cache(self, batch: int, layout: str | None = None, dtype=torch.float32):
        return self.cache_spec().empty(batch, dtype)

    def step(self, input_ids, past, layout: str | None = None):
        ids = torch.as_tensor(input_ids).numpy()
        B, S = ids.shape
        spec = self.cache_spec()
        T = spec.length(past)
        cache = self.runner.empty_cache()
        for i, layer in enumerate(past):
            for t, a in zip(spec.tensors, layer):
                cache[f"past.{i}.{t.name}"][t.rows(0, T)] = a.numpy()
        if S == 1:
            logits, cache = self.runner.decode(ids[:, 0], T, cache)
        else:
            logits, cache = self.runner.prefill(ids, cache, start=T)
        present = [tuple(torch.from_numpy(np.ascontiguousarray(cache[f"past.{i}.{t.name}"][t.rows(0, T + S)]))
                         for t in spec.tensors)
                   for i in range(self.config.num_hidden_layers)]
        return torch.from_numpy(np.ascontiguousarray(logits[:, :S], dtype=np.float32)), present


def static_reference(graphs: dict[str, tuple[StaticGraphSpec, Path]], cfg) -> StaticGraphReference:
    specs = {n: s for n, (s, _) in graphs.items()}
    return StaticGraphReference(StaticRunner(ort_sessions({n: p for n, (_, p) in graphs.items()}), specs, cfg))
