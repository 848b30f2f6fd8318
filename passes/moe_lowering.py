"""MoE lowering: rewrite each exported DeepSeekMoE block's expert loop (and, where a fused op exists,
its router) into a form a target can run. One pass, one `form`:

  "ort-fused"      ONNX Runtime contrib ops: the routed experts as `com.microsoft.MoE` (activation
                   swiglu, swiglu_fusion=1: gate/up rows interleaved into one fc1 [E, 2I, h]; fc2 [E, h, I];
                   activation_alpha=1, activation_beta=0 so it is exactly silu(g) * u). The router:
                     - sigmoid + e_score_correction_bias + noaux_tc + norm_topk_prob (DeepSeek-V3):
                       `com.microsoft.MoEGroupRouter` on the gate logits (group_topk=2), whose
                       log-score output feeds MoE with normalize_routing_weights=0 (MoE's softmax of the
                       log-scores over the k selected experts IS the top-k normalisation); then
                       * routed_scaling_factor.
                     - softmax + greedy (V2-Lite): MoE takes the gate logits directly (its softmax + top-k
                       is the greedy router), normalize_routing_weights = norm_topk_prob; * scaling factor.
                     - any other router (group_limited_greedy, no norm with sigmoid, ...): the exported
                       router subgraph is kept; its (weights w, ids) become router_probs =
                       ScatterElements(-inf, ids, log w), MoE with normalize 0 gives w / sum(w), and the
                       output is multiplied back by sum(w) per token.
                   Shared experts stay plain MatMuls (untouched).
  "static-gather"  static shapes, compute proportional to k (the decode form for static-shape targets):
                   the exported router is kept; per token, Gather the k chosen experts' stacked
                   weights [N, k, h, 2I] / [N, k, I, h] and run batched MatMuls; weighted sum over k.
  "static-capacity" fixed-capacity dispatch [E, C, h] (prefill on static-shape targets):
                   C = ceil(capacity_factor * N * k / E) (computed in the graph from the token count; a
                   constant once shapes are static). Token-slot j of expert e is kept if fewer than C
                   earlier token-slots (in token order) chose e; kept slots are dispatched with a one-hot
                   [N*k, E*C] matrix, experts run as one batched MatMul [E, C, h] @ [E, h, 2I], results
                   are combined back with the same matrix. Dropped token-slots contribute nothing (their
                   weight is lost, like GShard/Switch capacity dropping). With capacity_factor >= E / k
                   (C >= N) nothing can drop and the result is exact. The number of dropped token-slots of
                   each block is an extra int64 scalar graph output `moe.<i>.dropped_tokens` when
                   `report_dropped=True` (default), so a runtime or a test reads it alongside the logits.
                   The one-hot dispatch/combine matrices are [N*k, E*C] (about N^2 k^2 cf / E values):
                   fine for prefill buckets of a few thousand tokens, not for very long prompts.
  "static"         static-gather on the graph named "decode", static-capacity on the others (prefill).

How a block is found (by computation, never by names). Anchor: a MatMul/Gemm by a constant 2-D
weight [E, h] whose output feeds Sigmoid or Softmax (the gate). From there:
  router   the GatherElements(scores, ids) with ids = the last TopK's indices; the optional
           normalisation (ReduceSum, + eps, Div) and the * routed_scaling_factor Mul after it give the
           routing weights w; e_score_correction_bias = a constant [E] Add on the scores; grouping from
           the Where(-inf) mask before the last TopK (n_group from the grouped Reshape's static shape,
           topk_group from the group TopK's K, noaux_tc if the group score is a ReduceSum of a top-2,
           group_limited_greedy if a ReduceMax).
  experts  exactly one Equal(ids, e) per expert e = 0..E-1; from each, forward to its ScatterND-add:
           exactly three constant-weight MatMul/Gemm (gate [I, h] feeding a Sigmoid, up [I, h],
           down [h, I]). The routed sum R = the last ScatterND's output (through identity Transposes).
Proof before rewriting: the block's subgraphs are evaluated on ONNX Runtime on random inputs and
compared with a numpy DeepSeekMoE built from the extracted weights and parameters: the router
(x -> w, ids, compared as dense [N, E] weights) and the expert loop ((x, w, ids) -> R) must agree
to 1e-4 (relative), else the block is skipped with the reason in `pass.report`. Router or loop
subgraphs that read anything but x (another graph input) are skipped too. Nothing skipped is changed.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from .graph_utils import attr as _attr, const_array as _const, consumers as _consumers

FORMS = ("ort-fused", "static-gather", "static-capacity", "static")
# "static": per graph, by the graph's name (export names them "prefill" / "decode"): static-gather on
# the decode graph (few tokens per call), static-capacity on every other graph (prefill).
MS_DOMAIN = "com.microsoft"
VERIFY_TOKENS = 24
VERIFY_RTOL = 1e-4
VERIFY_TIE = 1e-5  # choice-score margin under which a probe token's routing is a tie


class _Skip(Exception):
    """A candidate that cannot be proven a DeepSeekMoE block; the message is the reason."""


# ---- small graph helpers ------------------------------------------------------------------------------






def _std(node: ir.Node | None, *ops: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and (not ops or node.op_type in ops)


def _label(value: ir.Value | None) -> str | None:
    if value is None:
        return None
    folded = value.metadata_props.get("pkg.onnxscript.optimizer.folded_from")
    return folded.strip("[]'\" ") if folded else value.name


def _projection(node: ir.Node) -> tuple[ir.Value, np.ndarray, ir.Value] | None:
    """(data operand, weight [out, in], weight value) of a MatMul/Gemm by a constant 2-D weight."""
    if not _std(node, "MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or (len(node.inputs) > 2 and node.inputs[2] is not None):
            return None
        w = _const(node.inputs[1])
        if w is None or w.ndim != 2:
            return None
        w = w * np.float32(_attr(node, "alpha", 1.0))
        return node.inputs[0], (w if _attr(node, "transB", 0) else w.T), node.inputs[1]
    w = _const(node.inputs[1])
    if w is not None and w.ndim == 2:
        return node.inputs[0], w.T, node.inputs[1]
    return None


def _scalar(value: ir.Value | None) -> float | None:
    c = _const(value)
    return float(c.reshape(-1)[0]) if c is not None and c.size == 1 else None


# ---- extracted block ----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Router:
    scoring: str                 # sigmoid | softmax
    bias: np.ndarray | None      # e_score_correction_bias [E]
    method: str                  # greedy | noaux_tc | group_limited_greedy
    n_group: int
    topk_group: int
    k: int
    norm: bool
    scale: float


@dataclasses.dataclass
class _Block:
    x: ir.Value                  # [N, h] tokens into the MoE
    logits: ir.Value             # gate output [N, E]
    w: ir.Value                  # routing weights [N, k] as consumed by the expert loop
    ids: ir.Value                # expert ids [N, k]
    out: ir.Value                # the routed sum R [N, h]
    gate_w: np.ndarray           # [E, h]
    router: _Router
    w_gate: np.ndarray           # [E, I, h]
    w_up: np.ndarray             # [E, I, h]
    w_down: np.ndarray           # [E, h, I]
    label: str

    @property
    def E(self) -> int:
        return self.gate_w.shape[0]


def _router_of(gate: ir.Node, x: ir.Value, gate_w: np.ndarray) -> tuple[_Router, ir.Value, ir.Value]:
    E = gate_w.shape[0]
    logits = gate.outputs[0]
    scorers = [n for n in _consumers(logits) if _std(n, "Sigmoid", "Softmax")]
    if len(scorers) != 1:
        raise _Skip("gate output does not feed exactly one Sigmoid/Softmax")
    scorer = scorers[0]
    if scorer.op_type == "Softmax" and _attr(scorer, "axis", -1) not in (-1, 1):
        raise _Skip("router Softmax is not over the expert axis")
    s = scorer.outputs[0]
    gathers = [n for n in _consumers(s) if _std(n, "GatherElements") and n.inputs[0] is s]
    if len(gathers) != 1 or _attr(gathers[0], "axis", 0) not in (1, -1):
        raise _Skip("scores are not gathered once by GatherElements(axis=1) at the chosen ids")
    gather = gathers[0]
    ids = gather.inputs[1]
    topk = ids.producer()
    if not _std(topk, "TopK") or topk.outputs[1] is not ids or not _attr(topk, "largest", 1):
        raise _Skip("the gathered ids are not the indices of a TopK(largest)")
    k = _scalar(topk.inputs[1])
    if k is None:
        raise _Skip("the expert TopK has no constant K")
    bias = None
    adds = [n for n in _consumers(s) if _std(n, "Add")]
    for a in adds:
        other = a.inputs[1] if a.inputs[0] is s else a.inputs[0]
        c = _const(other)
        if c is not None and c.shape == (E,):
            bias = c.astype(np.float32)
    choice_in = topk.inputs[0]
    method, n_group, topk_group = "greedy", 1, 1
    where = choice_in.producer()
    if _std(where, "Where"):
        fill = _scalar(where.inputs[1])
        if fill is None or fill != float("-inf"):
            raise _Skip("the group mask does not fill with -inf")
        grouped = None
        for n in _nodes_between(where, x):
            if _std(n, "Reshape") and n.outputs[0].shape is not None and len(n.outputs[0].shape) == 3:
                grouped = n
        if grouped is None or not isinstance(grouped.outputs[0].shape[1], int):
            raise _Skip("cannot read n_group: no [N, n_group, E/n_group] Reshape with a static group count")
        n_group = grouped.outputs[0].shape[1]
        for c in _consumers(grouped.outputs[0]):
            if _std(c, "ReduceMax"):
                method, score_val = "group_limited_greedy", c.outputs[0]
                break
            if _std(c, "TopK") and _scalar(c.inputs[1]) == 2:
                sums = [n for n in _consumers(c.outputs[0]) if _std(n, "ReduceSum")]
                if sums:
                    method, score_val = "noaux_tc", sums[0].outputs[0]
                    break
        else:
            raise _Skip("group mask found but the group score is neither sum-of-top-2 nor max")
        gtops = [n for n in _consumers(score_val) if _std(n, "TopK")]
        if len(gtops) != 1 or _scalar(gtops[0].inputs[1]) is None:
            raise _Skip("no TopK with a constant K over the group scores")
        topk_group = int(_scalar(gtops[0].inputs[1]))
    # weights: GatherElements -> [ReduceSum, +eps, Div] -> [* scale]
    w = gather.outputs[0]
    norm, scale = False, 1.0
    divs = [n for n in _consumers(w) if _std(n, "Div") and n.inputs[0] is w]
    if divs:
        norm, w = True, divs[0].outputs[0]
    muls = [n for n in _consumers(w) if _std(n, "Mul") and any(_scalar(i) is not None for i in n.inputs)]
    if muls:
        c = [_scalar(i) for i in muls[0].inputs if _scalar(i) is not None][0]
        scale, w = float(c), muls[0].outputs[0]
    r = _Router(scorer.op_type.lower(), bias, method, n_group, topk_group, int(k), norm, scale)
    return r, w, ids


def _nodes_between(node: ir.Node, stop: ir.Value, limit: int = 200) -> list[ir.Node]:
    """Producers reachable backwards from `node`'s inputs, not past `stop` (bounded)."""
    out, stack, seen = [], list(node.inputs), set()
    while stack and len(out) < limit:
        v = stack.pop()
        if v is None or v is stop or id(v) in seen:
            continue
        seen.add(id(v))
        p = v.producer()
        if p is not None:
            out.append(p)
            stack.extend(p.inputs)
    return out


def _experts_of(ids: ir.Value, E: int, h: int):
    """Per expert (gate [I,h], up [I,h], down [h,I]) and the routed-sum value R."""
    equals: dict[int, ir.Node] = {}
    for n in _consumers(ids):
        if _std(n, "Equal"):
            other = n.inputs[1] if n.inputs[0] is ids else n.inputs[0]
            e = _scalar(other)
            if e is None or e != int(e) or int(e) in equals:
                raise _Skip("an Equal on the expert ids does not compare with a distinct constant expert id")
            equals[int(e)] = n
    if sorted(equals) != list(range(E)):
        raise _Skip(f"expert loop: Equal(ids, e) found for experts {sorted(equals)}, expected 0..{E - 1}")
    gates, ups, downs, scatters = [], [], [], []
    for e in range(E):
        projs, sc, stack, seen = [], [], [equals[e]], set()
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if _std(n, "ScatterND"):
                sc.append(n)
                continue
            p = _projection(n)
            if p is not None:
                projs.append((n, p))
            for o in n.outputs:
                stack.extend(_consumers(o))
            if len(seen) > 400:
                raise _Skip(f"expert {e}: the loop body is larger than expected")
        if len(sc) != 1 or _attr(sc[0], "reduction", "none") != "add":
            raise _Skip(f"expert {e}: expected one ScatterND(reduction=add), found {len(sc)}")
        # gate and up read the same gathered tokens; down reads their product (I may equal h)
        pairs = [(a, b) for i, a in enumerate(projs) for b in projs[i + 1:] if a[1][0] is b[1][0]]
        if len(projs) != 3 or len(pairs) != 1:
            raise _Skip(f"expert {e}: expected gate/up [I, {h}] projections of the same tokens and a down [{h}, I] "
                        f"projection, found {[list(p[1].shape) for _, p in projs]}")
        wide = list(pairs[0])
        narrow = [q for q in projs if q is not wide[0] and q is not wide[1]]
        (n0, p0), (n1, p1) = wide
        if p0[1].shape[1] != h or p1[1].shape != p0[1].shape or narrow[0][1][1].shape != (h, p0[1].shape[0]):
            raise _Skip(f"expert {e}: projection shapes {[list(p[1].shape) for _, p in projs]} are not "
                        f"gate/up [I, {h}], down [{h}, I]")
        is_gate = [any(_std(c, "Sigmoid") for c in _consumers(n.outputs[0])) for n in (n0, n1)]
        if is_gate.count(True) != 1:
            raise _Skip(f"expert {e}: cannot tell the gate projection (silu) from the up projection")
        g, u = (p0, p1) if is_gate[0] else (p1, p0)
        gates.append(g[1]); ups.append(u[1]); downs.append(narrow[0][1][1]); scatters.append(sc[0])
    I = gates[0].shape[0]
    if any(a.shape != (I, h) for a in gates + ups) or any(d.shape != (h, I) for d in downs):
        raise _Skip("experts have different widths")
    # the routed sum: the ScatterND that no other expert's ScatterND reads, through identity transposes
    scatter_ids = {id(s) for s in scatters}
    last = [s for s in scatters if not any(id(c) in scatter_ids for c in _downstream(s.outputs[0], 3))]
    if len(last) != 1:
        raise _Skip("the ScatterND-add accumulation is not one chain over the experts")
    out = last[0].outputs[0]
    while True:
        cs = _consumers(out)
        if len(cs) == 1 and _std(cs[0], "Transpose") and list(_attr(cs[0], "perm", [])) == [0, 1] \
                and not out.is_graph_output():
            out = cs[0].outputs[0]
        else:
            break
    return np.stack(gates), np.stack(ups), np.stack(downs), out


def _downstream(value: ir.Value, depth: int) -> list[ir.Node]:
    out, frontier = [], [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for c in _consumers(v):
                out.append(c)
                nxt.extend(c.outputs)
        frontier = nxt
    return out


# ---- numeric verification -----------------------------------------------------------------------------
def _closure(outputs: list[ir.Value], stops: list[ir.Value]) -> tuple[list[ir.Node], list[ir.Value]]:
    """Nodes computing `outputs` from `stops` and constants, and the graph inputs read only through
    Shape (the exporter computes reshape targets from input_ids' shape). Anything else -> _Skip."""
    stop_ids = {id(v) for v in stops}
    nodes, shape_inputs, stack, seen = {}, {}, [(v, None) for v in outputs], set()
    while stack:
        v, user = stack.pop()
        if v is None or id(v) in stop_ids:
            continue
        p = v.producer()
        if p is None and v.const_value is None:
            if not _std(user, "Shape"):
                raise _Skip(f"the block reads graph input {v.name!r} besides its tokens")
            shape_inputs[id(v)] = v
            continue
        if id(v) in seen:
            continue
        seen.add(id(v))
        if p is None:
            continue
        if p.domain not in ("", "ai.onnx"):
            raise _Skip(f"the block contains a {p.domain}::{p.op_type} node")
        nodes[id(p)] = p
        stack.extend((i, p) for i in p.inputs)
    return list(nodes.values()), list(shape_inputs.values())


def _shape_feed(v: ir.Value, tokens: int) -> np.ndarray:
    """A stand-in for a graph input read only through Shape: first symbolic dim = tokens, others 1."""
    dims, first = [], True
    for d in (v.shape or []):
        if isinstance(d, int):
            dims.append(d)
        else:
            dims.append(tokens if first else 1)
            first = False
    return np.zeros(dims, dtype=v.dtype.numpy() if v.dtype is not None else np.float32)


def _evaluate(model: ir.Model, outputs: list[ir.Value], feeds: dict[ir.Value, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort
    nodes, shape_inputs = _closure(outputs, list(feeds))
    tokens = next(iter(feeds.values())).shape[0]
    feeds = {**feeds, **{v: _shape_feed(v, tokens) for v in shape_inputs}}
    order = {id(n): i for i, n in enumerate(model.graph)}
    nodes.sort(key=lambda n: order.get(id(n), 0))
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    so.add_session_config_entry("session.disable_prepacking", "1")  # one run: no packed copy of every weight
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    # The block's weights go to an external data file, not into the protobuf: a layer's experts pass protobuf's 2 GiB
    # limit at real sizes (DeepSeek-V2-Lite: 2.2 GB), and each protobuf copy would hold them once more.
    with tempfile.TemporaryDirectory(prefix="moe-verify-") as folder:
        inits, done = [], set()
        with open(os.path.join(folder, "block.data"), "wb") as data:
            for n in nodes:
                for v in n.inputs:
                    if v is not None and v.producer() is None and v.const_value is not None and v.name not in done:
                        done.add(v.name)
                        inits.append(_external_tensor(v, data))
        g = onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes], "moe_block",
            [onnx.helper.make_tensor_value_info(v.name, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), None)
             for v, a in feeds.items()],
            [onnx.helper.make_tensor_value_info(v.name, int(v.dtype) if v.dtype is not None else 1, None)
             for v in outputs], inits)
        path = os.path.join(folder, "block.onnx")
        onnx.save_model(onnx.helper.make_model(g, opset_imports=opsets, ir_version=10), path)
        try:
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            return sess.run([v.name for v in outputs], {v.name: a for v, a in feeds.items()})
        except Exception as e:  # noqa: BLE001 - any failure means "not proven"
            raise _Skip(f"could not evaluate the block on ONNX Runtime to verify it: {str(e).splitlines()[0][:200]}")


def _external_tensor(v: ir.Value, data) -> "onnx.TensorProto":
    """v's tensor as a TensorProto: inline when small, else its bytes appended to the open file `data` (block.data)
    and referenced from the proto."""
    t = v.const_value
    if t.nbytes <= 1024:
        proto = ir.serde.serialize_tensor(t)
        proto.name = v.name
        return proto
    proto = onnx.TensorProto(name=v.name, data_type=int(t.dtype), dims=[int(d) for d in t.shape])
    offset = data.tell()
    t.tofile(data)
    proto.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "block.data"), ("offset", str(offset)), ("length", str(data.tell() - offset))):
        entry = proto.external_data.add()
        entry.key, entry.value = key, value
    return proto


def reference_router(x: np.ndarray, gate_w: np.ndarray, r: _Router) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy DeepSeekMoE gate (REFERENCE.md): -> (w [N, k], ids [N, k], margin [N]: the k-th minus the (k+1)-th
    choice score among the kept groups, how far each token's choice is from changing)."""
    logits = x.astype(np.float64) @ gate_w.T.astype(np.float64)
    if r.scoring == "sigmoid":
        s = 1 / (1 + np.exp(-logits))
    else:
        s = np.exp(logits - logits.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
    choice = s + (r.bias if r.bias is not None else 0)
    N, E = s.shape
    if r.method != "greedy" and r.n_group > 1:
        gr = choice.reshape(N, r.n_group, -1)
        gs = np.sort(gr, -1)[..., -2:].sum(-1) if r.method == "noaux_tc" else gr.max(-1)
        keep = np.zeros((N, r.n_group), bool)
        np.put_along_axis(keep, np.argsort(-gs, 1, kind="stable")[:, :r.topk_group], True, 1)
        choice = np.where(np.repeat(keep, E // r.n_group, 1), choice, -np.inf)
    ids = np.argsort(-choice, 1, kind="stable")[:, :r.k]
    w = np.take_along_axis(s, ids, 1)
    if r.norm:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    srt = -np.sort(-choice, 1)
    with np.errstate(invalid="ignore"):
        margin = srt[:, r.k - 1] - srt[:, r.k] if E > r.k else np.full(N, np.inf)
    return w * r.scale, ids, np.where(np.isnan(margin), np.inf, margin)


def reference_experts(x, w, ids, wg, wu, wd) -> np.ndarray:
    x = x.astype(np.float64)
    out = np.zeros_like(x)
    for j in range(ids.shape[1]):
        g = np.einsum("nih,nh->ni", wg[ids[:, j]], x)
        u = np.einsum("nih,nh->ni", wu[ids[:, j]], x)
        out += w[:, j:j + 1] * np.einsum("nhi,ni->nh", wd[ids[:, j]], g / (1 + np.exp(-g)) * u)
    return out


def _close(a, b) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and np.allclose(a, b, rtol=VERIFY_RTOL, atol=VERIFY_RTOL * max(1.0, np.abs(b).max()))


def _dense(w, ids, E):
    d = np.zeros((w.shape[0], E))
    np.put_along_axis(d, np.asarray(ids, np.int64), np.asarray(w, np.float64), 1)
    return d


def _verify(model: ir.Model, b: _Block) -> None:
    rng = np.random.default_rng(0)
    h, E, k = b.gate_w.shape[1], b.E, b.router.k
    x = rng.standard_normal((VERIFY_TOKENS, h)).astype(np.float32)
    w_got, ids_got = _evaluate(model, [b.w, b.ids], {b.x: x})
    w_ref, ids_ref, margin = reference_router(x, b.gate_w, b.router)
    # a token whose choice is a tie at fp32 rounding may go either way (fp32 graph vs float64 reference): those
    # are left out, as long as most tokens decide the question
    decisive = margin > VERIFY_TIE
    if decisive.sum() < VERIFY_TOKENS // 2:
        raise _Skip(f"router verification inconclusive: {VERIFY_TOKENS - int(decisive.sum())} of {VERIFY_TOKENS} "
                    f"probe tokens are ties (choice-score margin <= {VERIFY_TIE:g})")
    if ids_got.shape != (VERIFY_TOKENS, k) or not _close(_dense(w_got, ids_got, E)[decisive],
                                                         _dense(w_ref, ids_ref, E)[decisive]):
        raise _Skip(f"router verification failed: the subgraph does not compute the DeepSeekMoE gate "
                    f"{dataclasses.asdict(b.router) | {'bias': b.router.bias is not None}}")
    ids = np.stack([rng.permutation(E)[:k] for _ in range(VERIFY_TOKENS)]).astype(ids_got.dtype)
    w = rng.uniform(0.1, 1.0, (VERIFY_TOKENS, k)).astype(np.float32)
    (r_got,) = _evaluate(model, [b.out], {b.x: x, b.w: w, b.ids: ids})
    if not _close(r_got, reference_experts(x, w, ids, b.w_gate, b.w_up, b.w_down)):
        raise _Skip("expert-loop verification failed: the loop output is not sum_k w_k * SwiGLU_expert(x)")


def _match(model: ir.Model, gate: ir.Node) -> _Block:
    x, gate_w, gate_val = _projection(gate)
    E, h = gate_w.shape
    router, w, ids = _router_of(gate, x, gate_w)
    wg, wu, wd, out = _experts_of(ids, E, h)
    b = _Block(x, gate.outputs[0], w, ids, out, gate_w.astype(np.float32), router, wg, wu, wd,
               _label(gate_val) or gate.name)
    _verify(model, b)
    return b


def _candidates(graph: ir.Graph) -> list[ir.Node]:
    out = []
    for n in graph:
        p = _projection(n)
        if p is None or p[1].shape[0] < 2:
            continue
        users = _consumers(n.outputs[0])
        scorers = [c for c in users if _std(c, "Sigmoid", "Softmax")]
        # a SwiGLU gate projection (silu = y * sigmoid(y)) is not a router
        silu = any(_std(c, "Mul") and any(s.outputs[0] in c.inputs for s in scorers) for c in users)
        if scorers and not silu:
            out.append(n)
    return out


# ---- rewriting ----------------------------------------------------------------------------------------
class _Builder:
    def __init__(self, graph: ir.Graph, anchor: ir.Node, prefix: str, used: set[str]):
        self.graph, self.anchor, self.prefix, self.used = graph, anchor, prefix, used

    def _name(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name

    def init(self, array: np.ndarray, what: str) -> ir.Value:
        name = self._name(f"{self.prefix}.{what}")
        array = np.ascontiguousarray(array)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs, what: str, num_outputs: int = 1, domain: str = "", **attrs):
        node = ir.node(op_type, inputs, attributes=attrs or None, num_outputs=num_outputs, domain=domain,
                       name=self._name(f"{self.prefix}/{what}"))
        for i, o in enumerate(node.outputs):
            o.name = self._name(f"{self.prefix}.{what}" + (f".{i}" if i else ""))
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0] if num_outputs == 1 else node.outputs


def _i64(*v) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def _rewrite(graph: ir.Graph, b: _Block, form: str, bl: _Builder, capacity_factor: float,
             fused_router: bool = True) -> dict:
    f32 = np.float32
    r = b.router
    info: dict = {}
    if form == "ort-fused":
        E, I, h = b.w_gate.shape
        fc1 = np.empty((E, 2 * I, h), f32)
        fc1[:, 0::2], fc1[:, 1::2] = b.w_gate, b.w_up
        if not fused_router:
            pass
        elif r.scoring == "sigmoid" and r.bias is not None and r.method in ("noaux_tc", "greedy") and r.norm:
            # greedy = one group: MoEGroupRouter with n_group = topk_group = 1
            ng, tg = (r.n_group, r.topk_group) if r.method == "noaux_tc" else (1, 1)
            probs = bl.op("MoEGroupRouter", [b.logits, bl.init(r.bias, "e_score_correction_bias")], "router",
                          domain=MS_DOMAIN, router_sentinel=float("-inf"), group_topk=2, topk_group=tg,
                          n_group=ng, top_k=r.k)
            normalize, post, info["router"] = 0, None, "com.microsoft.MoEGroupRouter"
        elif r.scoring == "softmax" and r.method == "greedy":
            probs, normalize, post, info["router"] = b.logits, int(r.norm), None, "MoE softmax top-k (greedy)"
        if "router" not in info:
            minus_inf = bl.op("Expand", [bl.init(np.array(-np.inf, f32), "minus_inf"), bl.op("Shape", [b.logits], "E_shape")],
                              "sentinel")
            probs = bl.op("ScatterElements", [minus_inf, b.ids, bl.op("Log", [b.w], "log_w")], "router_probs", axis=1)
            normalize, info["router"] = 0, "exported router subgraph -> log-weights"
            post = bl.op("ReduceSum", [b.w, bl.init(_i64(-1), "k_axis")], "w_sum", keepdims=1)
        y = bl.op("MoE", [b.x, probs, bl.init(fc1, "fc1_experts_weights"), None,
                          bl.init(np.ascontiguousarray(b.w_down), "fc2_experts_weights")], "moe", domain=MS_DOMAIN,
                  k=r.k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=normalize,
                  activation_alpha=1.0, activation_beta=0.0, use_sparse_mixer=0)
        if post is not None:
            y = bl.op("Mul", [y, post], "rescale")
        elif r.scale != 1.0:
            y = bl.op("Mul", [y, bl.init(np.array(r.scale, f32), "routed_scaling_factor")], "scaled")
    elif form == "static-gather":
        gu = np.concatenate([b.w_gate.transpose(0, 2, 1), b.w_up.transpose(0, 2, 1)], axis=-1)  # [E, h, 2I]
        I = b.w_gate.shape[1]
        xs = bl.op("Unsqueeze", [b.x, bl.init(_i64(1, 2), "axes12")], "x_rows")                     # [N,1,1,h]
        wgu = bl.op("Gather", [bl.init(gu, "w_gate_up"), b.ids], "gather_gate_up", axis=0)        # [N,k,h,2I]
        a = bl.op("MatMul", [xs, wgu], "gate_up")                                                  # [N,k,1,2I]
        g, u = bl.op("Split", [a, bl.init(_i64(I, I), "split")], "split_gate_up", num_outputs=2, axis=-1)
        act = bl.op("Mul", [bl.op("Mul", [g, bl.op("Sigmoid", [g], "sig")], "silu"), u], "act")
        wd = bl.op("Gather", [bl.init(b.w_down.transpose(0, 2, 1), "w_down"), b.ids], "gather_down", axis=0)
        yk = bl.op("MatMul", [act, wd], "down")                                                    # [N,k,1,h]
        wk = bl.op("Unsqueeze", [b.w, bl.init(_i64(2, 3), "axes23")], "w4")                        # [N,k,1,1]
        y = bl.op("ReduceSum", [bl.op("Mul", [yk, wk], "weighted"), bl.init(_i64(1, 2), "sum_axes")], "y", keepdims=0)
    else:  # static-capacity
        E, I, h = b.w_gate.shape
        k = r.k
        gu = np.concatenate([b.w_gate.transpose(0, 2, 1), b.w_up.transpose(0, 2, 1)], axis=-1)  # [E, h, 2I]
        n = bl.op("Shape", [b.x], "N", start=0, end=1)                                             # [1]
        nf = bl.op("Cast", [n], "N_f", to=ir.DataType.FLOAT)
        cap_f = bl.op("Ceil", [bl.op("Mul", [nf, bl.init(np.array([capacity_factor * k / E], f32), "cf_k_E")], "cap_raw")], "cap_ceil")
        cap = bl.op("Cast", [cap_f], "C", to=ir.DataType.INT64)                                   # [1]
        ids_flat = bl.op("Reshape", [b.ids, bl.init(_i64(-1), "flat")], "ids_flat")               # [N*k]
        if b.ids.dtype is not None and b.ids.dtype != ir.DataType.INT64:
            ids_flat = bl.op("Cast", [ids_flat], "ids_i64", to=ir.DataType.INT64)
        onehot = bl.op("OneHot", [ids_flat, bl.init(_i64(E), "E"), bl.init(np.array([0.0, 1.0], f32), "onoff")],
                       "onehot", axis=-1)                                                          # [N*k, E]
        pos = bl.op("Sub", [bl.op("CumSum", [onehot, bl.init(np.array(0, np.int64), "axis0")], "cumsum"), onehot],
                    "pos_excl")
        pos = bl.op("ReduceSum", [bl.op("Mul", [pos, onehot], "pos_sel"), bl.init(_i64(-1), "ax_last")], "pos",
                    keepdims=0)                                                                    # [N*k] float
        keep = bl.op("Less", [pos, cap_f], "keep")                                                 # [N*k] bool
        slot = bl.op("Add", [bl.op("Mul", [ids_flat, cap], "e_times_C"),
                             bl.op("Cast", [pos], "pos_i", to=ir.DataType.INT64)], "slot")
        slot = bl.op("Where", [keep, slot, bl.init(_i64(-1), "dropped_slot")], "slot_kept")       # -1: no slot
        ec = bl.op("Mul", [bl.init(_i64(E), "E1"), cap], "EC")
        disp = bl.op("OneHot", [slot, bl.op("Squeeze", [ec], "EC_s"), bl.init(np.array([0.0, 1.0], f32), "onoff2")],
                     "dispatch", axis=-1)                                                          # [N*k, E*C]
        # OneHot maps index -1 to the last column; clear dropped rows explicitly.
        disp = bl.op("Mul", [disp, bl.op("Unsqueeze", [bl.op("Cast", [keep], "keep_f", to=ir.DataType.FLOAT),
                                                       bl.init(_i64(-1), "ax_m1")], "keep_col")], "dispatch_kept")
        x_rep = bl.op("Reshape", [bl.op("Expand", [bl.op("Unsqueeze", [b.x, bl.init(_i64(1), "ax1")], "x3"),
                                                   bl.op("Concat", [n, bl.init(_i64(k, 1), "k1")], "rep_shape", axis=0)],
                                         "x_rep3"), bl.init(_i64(-1, h), "rows_h")], "x_rep")     # [N*k, h]
        xd = bl.op("MatMul", [bl.op("Transpose", [disp], "dispatch_t", perm=[1, 0]), x_rep], "x_dispatched")
        xd = bl.op("Reshape", [xd, bl.op("Concat", [bl.init(_i64(E), "E2"), cap, bl.init(_i64(h), "h")], "ECh", axis=0)],
                   "x_ech")                                                                        # [E, C, h]
        a = bl.op("MatMul", [xd, bl.init(gu, "w_gate_up")], "gate_up")                             # [E, C, 2I]
        g, u = bl.op("Split", [a, bl.init(_i64(I, I), "split")], "split_gate_up", num_outputs=2, axis=-1)
        act = bl.op("Mul", [bl.op("Mul", [g, bl.op("Sigmoid", [g], "sig")], "silu"), u], "act")
        yd = bl.op("MatMul", [act, bl.init(b.w_down.transpose(0, 2, 1), "w_down")], "down")      # [E, C, h]
        yd = bl.op("Reshape", [yd, bl.init(_i64(-1, h), "rows_h2")], "y_rows")                    # [E*C, h]
        yt = bl.op("MatMul", [disp, yd], "combine")                                                # [N*k, h]
        wf = bl.op("Reshape", [b.w, bl.init(_i64(-1, 1), "col")], "w_col")
        yt = bl.op("Mul", [yt, wf], "weighted")
        y3 = bl.op("Reshape", [yt, bl.op("Concat", [n, bl.init(_i64(k, h), "kh")], "nkh", axis=0)], "y3")
        y = bl.op("ReduceSum", [y3, bl.init(_i64(1), "ax_k")], "y", keepdims=0)
        dropped = bl.op("ReduceSum", [bl.op("Cast", [bl.op("Not", [keep], "drop")], "drop_i", to=ir.DataType.INT64)],
                        "dropped", keepdims=0)
        info["dropped"] = dropped
    y.dtype, y.shape = ir.DataType.FLOAT, b.out.shape
    b.out.replace_all_uses_with(y)
    return info


@dataclasses.dataclass
class MoELoweringResult(ir.passes.PassResult):
    found: int = 0
    rewritten: int = 0
    skipped: int = 0
    form: str = "ort-fused"


class MoELoweringPass(ir.passes.InPlacePass):
    """Lower every proven DeepSeekMoE block to `form` (module docstring). After a call, `self.report`
    lists every gate candidate: label, dims, router parameters, status rewritten | skipped, reason.

    static-capacity: `capacity_factor` (default 1.25; None = E / k, i.e. capacity = all tokens, nothing
    can drop, exact); `report_dropped` adds one int64 scalar graph
    output per block, `moe.<i>.dropped_tokens` (token-slots dropped for lack of capacity).
    ort-fused: `fused_router="subgraph"` keeps the exported router for every router (log-weights into
    MoE) instead of MoEGroupRouter / MoE's own softmax top-k where those apply.
    """

    def __init__(self, form: str = "ort-fused", capacity_factor: float | None = 1.25, report_dropped: bool = True,
                 fused_router: str = "auto"):
        super().__init__()
        if fused_router not in ("auto", "subgraph"):
            raise ValueError(f"fused_router {fused_router!r}: expected 'auto' or 'subgraph'")
        self.fused_router = fused_router
        if form not in FORMS:
            raise ValueError(f"MoE lowering form {form!r}: expected one of {FORMS}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor {capacity_factor!r} must be positive (or None: exact, C = tokens)")
        self.form, self.report_dropped = form, report_dropped
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.report: list[dict] = []
        self._skipped: set[int] = set()

    def call(self, model: ir.Model) -> MoELoweringResult:
        graph = model.graph
        self.report, self._skipped = [], set()
        used = {v.name for v in graph.initializers.values()} | {i.name for i in graph.inputs}
        for n in graph:
            used.update(o.name for o in n.outputs if o.name)
            if n.name:
                used.add(n.name)
        form = self.form
        if form == "static":
            form = "static-gather" if graph.name == "decode" else "static-capacity"
        blocks = []
        for gate in _candidates(graph):
            entry: dict = {"gate": _label(_projection(gate)[2]) or gate.name, "node": gate.name}
            try:
                b = _match(model, gate)
            except _Skip as e:
                entry.update(status="skipped", reason=str(e))
                self._skipped.add(id(gate))
                self.report.append(entry)
                continue
            r = b.router
            entry.update(experts=b.E, hidden=b.gate_w.shape[1], moe_intermediate=b.w_gate.shape[1],
                         router={"scoring": r.scoring, "bias": r.bias is not None, "method": r.method,
                                 "n_group": r.n_group, "topk_group": r.topk_group, "k": r.k, "norm": r.norm,
                                 "routed_scaling_factor": r.scale})
            blocks.append((entry, b))
            self.report.append(entry)
        for i, (entry, b) in enumerate(blocks):
            bl = _Builder(graph, b.out.producer(), f"moe.{i}", used)
            cf = self.capacity_factor if self.capacity_factor is not None else b.E / b.router.k  # None: C = N
            info = _rewrite(graph, b, form, bl, cf, self.fused_router == "auto")
            entry.update(status="rewritten", form=form)
            if "router" in info:
                entry["router_lowering"] = info["router"]
            if "dropped" in info:
                entry["capacity_factor"] = cf
                if self.report_dropped:
                    d = info["dropped"]
                    d.name = f"moe.{i}.dropped_tokens"
                    d.dtype, d.shape = ir.DataType.INT64, ir.Shape([])
                    graph.outputs.append(d)
                    entry["dropped_output"] = d.name
        if blocks:
            if self.form == "ort-fused":
                for owner in (model, model.graph):
                    owner.opset_imports.setdefault(MS_DOMAIN, 1)
            common_passes.RemoveUnusedNodesPass()(model)
            common_passes.TopologicalSortPass()(model)
        return MoELoweringResult(model, modified=bool(blocks), found=len(self.report), rewritten=len(blocks),
                                 skipped=len(self.report) - len(blocks), form=form)

    def ensures(self, model: ir.Model) -> None:
        ops = [(n.domain, n.op_type) for n in model.graph]
        rewritten = sum(e["status"] == "rewritten" for e in self.report)
        if not any(e["status"] == "skipped" for e in self.report) and rewritten:
            if ("", "NonZero") in ops:
                raise ir.passes.PostconditionError("MoE lowering left a NonZero (data-dependent expert loop)")
        if self.form == "ort-fused" and ops.count((MS_DOMAIN, "MoE")) < rewritten:
            raise ir.passes.PostconditionError("MoE lowering: fewer com.microsoft.MoE nodes than rewritten blocks")

    @property
    def counts(self) -> dict[str, int]:
        rewritten = sum(e["status"] == "rewritten" for e in self.report)
        return {"found": len(self.report), "rewritten": rewritten, "skipped": len(self.report) - rewritten}


def lower_moe(model: ir.Model, form: str = "ort-fused", **kw) -> tuple[ir.Model, list[dict]]:
    """Convenience: run the pass in place, return (model, report)."""
    p = MoELoweringPass(form, **kw)
    p(model)
    return model, p.report
