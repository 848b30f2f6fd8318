"""W8A8 for the ascend target's fixed-shape graphs (`compile --target ascend --quant w8a8`).

The scheme is passes/quant_w8a8.py's (DeepSeek's W8A8 as served on Ascend 910B/910C), applied to the
graphs of targets/ascend/static_export.py after export, before the profile check:

  weights      per output channel, symmetric INT8: s[o] = amax|W[o, :]| / 127 (1.0 if zero),
               q = clip(rint(W / s), -127, 127); in the graph an int8 initializer + DequantizeLinear
               (1-D scale, `axis`; opset 13 per-axis form, no block_size: the graphs stay opset 18).
  activations  static per-tensor (the MLA projections q_a/q_b/q, kv_a, o_proj) from calibration on
               the fp32 static prefill graph: QuantizeLinear(int8, zero point 0) -> DequantizeLinear;
               per-token dynamic (dense MLP, shared experts, routed experts): s = max(amax|x|, 1e-8)/127
               over the token's row, x' = clip(round(x / s), -127, 127) * s, as standard ops.
  never        embeddings (Gather tables), lm_head, norms, the router gate, the absorbed kv_b_proj
               constants W_UK / W_UV (rank-3 batched MatMul constants, not linear sites), DeepSeek-V3.2's
               lightning indexer (wq_b, wk, weights_proj: its top-k is a discrete choice, kept fp32 as
               the router is).

Two kinds of site:
- rank-2 linear sites (MatMul/Gemm on a 2-D fp32 initializer): passes.quant_w8a8.W8A8Pass.
- the routed experts, which the static export stacks per layer (this target's own forms):
    gather (decode)   moe_gate_{i}, moe_up_{i} [E, inter*h] and moe_down_{i} [E, h*inter], rows picked
                      by Gather(expert id): int8 [E*out, in] -> DequantizeLinear(axis 0) -> Reshape
                      [E, out*in] -> the Gather. The activation (the MatMul's other input, [N, 1, h, 1]
                      or [N, k, inter, 1]) is quantized per token (per token and expert for down) over
                      its axis -2.
    dense (prefill)   moe_gate_up_t_{i} [h, E*2*inter] (int8 [h, E*2*inter], DequantizeLinear axis 1)
                      and moe_down_t_{i} [E, inter, h] (int8 [E*h, inter] -> DequantizeLinear axis 0
                      -> Reshape [E, h, inter] -> Transpose [E, inter, h]); activations per token over
                      axis -1 ([N, h]; [E, N, inter] for down: per token and expert).
  Every expert output channel (e, o) gets the same int8 row and scale in both forms, so decode and
  prefill compute with identical weights.

Every int8 weight written is checked against its fp32 source (check_quantized_weights). `keep_unquantized`
(module scopes from fallback_candidates) leaves sites fp32 for the accuracy fallback of targets/ascend/flow.py.

What Ascend's own tools accept for such a graph is NOT verified here (no CANN): AMCT's documented
route for an ONNX model that already carries QuantizeLinear/DequantizeLinear ("QAT model") is
`amct_onnx.convert_qat_model` before ATC, and its documentation lists Conv/Gemm/ConvTranspose and
single-input MatMul with 2-D constant weights, per-tensor weights for Gemm/MatMul, float32 inputs.
These graphs use per-channel weights (the DeepSeek W8A8 scheme), per-token dynamic activations (not a
QDQ pattern) and dequantized expert tables feeding Gather/batched MatMul, all outside that list; see
VERIFICATION below, which the package's manifest and README repeat.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from passes.quant_w8a8 import (ACT_EPS, W8A8Pass, calibrate, dynamic_fake_quant, quantize_per_channel,
                                static_activation_names)
from passes.quant_weights import (DEFAULT_EXCLUDE, QuantizationError, QuantReport, add_initializer, const_bytes,
                                  find_linear_sites, initializer_bytes, record, select_sites)

EXPERT_TABLE = re.compile(r"^moe_(gate|up|down|gate_up_t|down_t)_(\d+)$")
EXPERT_EXCLUDE = ("moe_*",)  # the stacked expert tables: quantized by quantize_experts, not W8A8Pass
INDEXER_EXCLUDE = ("*indexer*",)  # DeepSeek-V3.2's lightning indexer stays fp32 (its top-k is a discrete choice)
QUANT_NODE_MARKERS = (".a8.", ".a8s.")
_PATH_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Expand"}

AMCT_QAT_DOC = "https://www.hiascend.com/document/detail/en/canncommercial/850/devaids/amct/atlasamct_16_0148.html"
AMCT_CONVERT_QAT_DOC = "https://www.hiascend.com/document/detail/en/canncommercial/850/devaids/amct/atlasamct_16_0160.html"
VERIFICATION = [
    "that ATC (or AMCT then ATC) accepts the W8A8 QDQ graphs: AMCT's documentation routes an ONNX model "
    "carrying QuantizeLinear/DequantizeLinear through `amct_onnx.convert_qat_model` before ATC "
    f"({AMCT_QAT_DOC}) and lists only Conv/Gemm/ConvTranspose/single-input MatMul with per-tensor "
    "weights for Gemm/MatMul; these graphs have per-channel weights, per-token dynamic activations (plain "
    "ops) and dequantized expert tables feeding Gather/batched MatMul, so whether ATC keeps them int8 or "
    "folds them to fp16 weights is unknown here",
    "int8 numerics on the NPU: the emulation here runs the QDQ graphs in fp32/fp16 on ORT CPU "
    "(Q/DQ and the per-token quantization kept fp32), not AscendQuant/AscendDequant or int8 cube units",
]


class AscendQuantError(QuantizationError):
    pass


def quant_node_names(model: ir.Model) -> list[str]:
    """Nodes of the W8A8 arithmetic (Q/DQ and the per-token quantization subgraphs): kept fp32 by the
    fp16 emulation (opset 18 Q/DQ take/give fp32 only) and listed in keep_dtype for ATC."""
    return [n.name for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")
            or any(m in (n.name or "") for m in QUANT_NODE_MARKERS)]


def _first_scope(node: ir.Node) -> str:
    return (node.name or "").split("/", 1)[0]


def static_activation_keys(model: ir.Model) -> dict[str, str]:
    """{activation name: key} for the statically quantized (attention) activations; the key is the
    module scope of the first linear using it (e.g. "model.layers.0.self_attn.q_a_proj"), the same in
    every static graph, so one calibration serves decode and every prefill bucket."""
    exclude = DEFAULT_EXCLUDE + EXPERT_EXCLUDE
    names = static_activation_names(model, exclude=exclude)
    keys: dict[str, str] = {}
    for s in find_linear_sites(model.graph):
        a = s.activation.name
        if a in names and a not in keys:
            keys[a] = _first_scope(s.node)
    if len(set(keys.values())) != len(keys):
        raise AscendQuantError(f"static activations are not distinguishable by module scope: {sorted(keys.values())}")
    return keys


def calibrate_static(model: ir.Model, feeds_list: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """{module scope key: amax} of the attention activations over the calibration feeds (ORT CPU)."""
    keys = static_activation_keys(model)
    amax = calibrate(model, feeds_list, tensors=list(keys))
    return {keys[n]: v for n, v in amax.items()}


def _dynamic(graph: ir.Graph, x: ir.Value, before: ir.Node, axis: int, consts: dict) -> ir.Value:
    """W8A8Pass's per-token fake quantization over `axis` (-1: rows of the last axis; -2 for a
    [..., K, 1] MatMul right operand)."""
    if "eps" not in consts:
        consts["eps"] = add_initializer(graph, "w8a8.experts.eps", np.array(ACT_EPS, np.float32))
        consts["qmax"] = add_initializer(graph, "w8a8.experts.qmax", np.array(127.0, np.float32))
        consts["qmin"] = add_initializer(graph, "w8a8.experts.qmin", np.array(-127.0, np.float32))
    if axis not in consts:
        consts[axis] = add_initializer(graph, f"w8a8.experts.axes{axis}", np.array([axis], np.int64))
    return dynamic_fake_quant(graph, x, before, consts[axis], consts, f"{x.name}.a8.ax{-axis}")


def _matmul_of(v: ir.Value) -> tuple[ir.Node, int] | None:
    """The MatMul a weight path (a Gather's output) reaches through shape-only ops: (node, input index)."""
    frontier, seen = [v], set()
    while frontier:
        cur = frontier.pop()
        for user, idx in cur.uses():
            if id(user) in seen:
                continue
            seen.add(id(user))
            if user.op_type == "MatMul":
                return user, idx
            if user.op_type in _PATH_OPS:
                frontier.extend(user.outputs)
    return None


def _chain(graph: ir.Graph, base: str, q: np.ndarray, scale: np.ndarray, axis: int,
           reshape: Sequence[int] | None = None, perm: Sequence[int] | None = None) -> tuple[list[ir.Node], ir.Value, list[ir.Value]]:
    """int8 initializer -> DequantizeLinear(axis) [-> Reshape] [-> Transpose]; -> (nodes, output, initializers)."""
    qv = add_initializer(graph, f"{base}.w8", q)
    sv = add_initializer(graph, f"{base}.w8_scale", scale)
    dq = ir.node("DequantizeLinear", [qv, sv], {"axis": axis}, name=f"{base}.dq")
    dq.outputs[0].name = f"{base}.dequantized"
    nodes, out = [dq], dq.outputs[0]
    if reshape is not None:
        shp = add_initializer(graph, f"{base}.shape", np.array(list(reshape), np.int64))
        r = ir.node("Reshape", [out, shp], name=f"{base}.reshape")
        r.outputs[0].name = f"{base}.reshaped"
        nodes.append(r)
        out = r.outputs[0]
    if perm is not None:
        t = ir.node("Transpose", [out], {"perm": list(perm)}, name=f"{base}.transpose")
        t.outputs[0].name = f"{base}.transposed"
        nodes.append(t)
        out = t.outputs[0]
    return nodes, out, [qv, sv]


def quantize_experts(model: ir.Model, cfg, report: QuantReport) -> int:
    """Quantize the stacked routed-expert tables of a static graph (module docstring), in place;
    -> how many tables. Raises AscendQuantError on a table whose use it does not recognise."""
    graph = model.graph
    E, inter, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    order = {id(n): i for i, n in enumerate(graph)}
    consts: dict = {}
    acts: dict[tuple[int, int], ir.Value] = {}
    n = 0
    for name in [k for k in graph.initializers if EXPERT_TABLE.match(k)]:
        v = graph.initializers[name]
        kind = EXPERT_TABLE.match(name).group(1)
        w = v.const_value.numpy().astype(np.float32, copy=False)
        if kind in ("gate", "up", "down"):  # gather form: [E, out*in], rows (e) of out x in
            out_f, in_f = (inter, h) if kind != "down" else (h, inter)
            if w.shape != (E, out_f * in_f):
                raise AscendQuantError(f"{name}: shape {list(w.shape)}, expected [{E}, {out_f * in_f}]")
            w_oi = w.reshape(E * out_f, in_f)
            q, s = quantize_per_channel(w_oi)
            nodes, out, inits = _chain(graph, name, q, s, 0, reshape=(E, out_f * in_f))
            form = "gather"
        elif kind == "gate_up_t":  # dense form: [h, E*2*inter] (in, out)
            if w.shape != (h, E * 2 * inter):
                raise AscendQuantError(f"{name}: shape {list(w.shape)}, expected [{h}, {E * 2 * inter}]")
            w_oi = np.ascontiguousarray(w.T)
            out_f, in_f = E * 2 * inter, h
            q, s = quantize_per_channel(w_oi)
            nodes, out, inits = _chain(graph, name, np.ascontiguousarray(q.T), s, 1)
            form = "dense"
        else:  # down_t, dense form: [E, inter, h] = d[e].T with d [E, h, inter]
            if w.shape != (E, inter, h):
                raise AscendQuantError(f"{name}: shape {list(w.shape)}, expected [{E}, {inter}, {h}]")
            w_oi = np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(E * h, inter)
            out_f, in_f = h, inter
            q, s = quantize_per_channel(w_oi)
            nodes, out, inits = _chain(graph, name, q, s, 0, reshape=(E, h, inter), perm=(0, 2, 1))
            form = "dense"
        users = sorted(v.uses(), key=lambda u: order[id(u[0])])
        if not users:
            raise AscendQuantError(f"{name}: an expert table nothing uses")
        graph.insert_before(users[0][0], nodes)
        for user, idx in users:
            user.replace_input_with(idx, out)
        graph.initializers.pop(name)
        # the activation each use multiplies: the MatMul the weight path reaches, its other operand
        modes = []
        for user, idx in users:
            mm = (user, idx) if user.op_type in ("MatMul", "Gemm") else _matmul_of(user.outputs[0])
            if mm is None:
                raise AscendQuantError(f"{name}: used by {user.op_type} {user.name!r} but reaches no MatMul; "
                                       "the static export's expert form changed")
            node, widx = mm
            x = node.inputs[1 - widx]
            axis = -2 if widx == 0 else -1  # weight as A: activation B [..., K, N=1]; weight as B: A [..., M, K]
            key = (id(x), axis)
            if key not in acts:
                acts[key] = _dynamic(graph, x, node, axis, consts)
            node.replace_input_with(1 - widx, acts[key])
            modes.append("dynamic")
        after = const_bytes(inits)
        report.quantized.append({"weight": name, "nodes": [u.name for u, _ in users], "role": "mlp",
                                 "expert_form": form, "shape_oi": [int(w_oi.shape[0]), int(w_oi.shape[1])],
                                 "activations": modes, "bytes_before": int(w.size) * 4, "bytes_after": after})
        report.linear_bytes_before += int(w.size) * 4
        report.linear_bytes_after += after
        n += 1
    return n


# Accuracy fallback (targets/ascend/flow.py): when the quantize stage or the fp16 emulation of the QDQ graphs misses
# its budget, linear sites are kept unquantized (fp16 under ATC's precision mode) one at a time in network order,
# at most this many, as msModelSlim's `amp_num` rolls back layers (its documented range for QAT is 0..10) and its
# `disable_first_layer` keeps the first quantized layer in float by default. Network order, not a per-site ranking:
# measured on the randomized x3 checkpoints (benchmarks/cpu_ascend_w8a8_x3_sensitivity.json), the error entering at
# the first decoder layer carries the stage's failure and single-site effects do not add up (keeping one site
# unquantized can make the logits worse), so a ranking by per-site error would not predict the sum.
FALLBACK_MAX_SITES = 10


def fallback_candidates(model: ir.Model) -> list[str]:
    """The rank-2 linear sites W8A8Pass quantizes, as module scopes (the same in decode and every prefill graph), in
    graph (network) order: the order the accuracy fallback keeps them unquantized. Routed experts are not
    candidates (a stacked table per layer, and measured not to carry the error)."""
    out = []
    for group in select_sites(model.graph, DEFAULT_EXCLUDE + EXPERT_EXCLUDE + INDEXER_EXCLUDE):
        scope = _first_scope(group[0].node)
        if scope not in out:
            out.append(scope)
    return out


def check_quantized_weights(model: ir.Model, fp32_oi: Mapping[str, np.ndarray], what: str) -> int:
    """Postcondition, independent of quantize_per_channel: every int8 weight `{name}.w8` (scale `{name}.w8_scale`,
    dequantized by a DequantizeLinear along its `axis`) that replaces the fp32 weight `fp32_oi[name]` ([out, in], one
    row per output channel) has scale amax|row| / 127 (1 for a zero row, rtol 1e-6) and |q * scale - w| <= scale / 2
    elementwise (plus fp32 rounding). A broken quantizer fails here, before the accuracy fallback could take its site
    out of the graph. -> how many weights were checked."""
    inits = model.graph.initializers
    axis = {n.inputs[0].name: n.attributes.get_int("axis", 1) for n in model.graph
            if n.op_type == "DequantizeLinear" and n.inputs[0] is not None}
    n = 0
    for name, w in fp32_oi.items():
        qv, sv = inits.get(f"{name}.w8"), inits.get(f"{name}.w8_scale")
        if qv is None or sv is None or f"{name}.w8" not in axis:
            raise AscendQuantError(f"{what}: {name}: no int8 weight / scale / DequantizeLinear after W8A8 (expected "
                                   f"{name}.w8, {name}.w8_scale)")
        q = qv.const_value.numpy()
        q = q.T if axis[f"{name}.w8"] == 1 else q
        scale = sv.const_value.numpy().astype(np.float64)
        if q.dtype != np.int8 or q.shape != w.shape or scale.shape != (w.shape[0],):
            raise AscendQuantError(f"{what}: {name}: int8 weight {q.dtype} {list(q.shape)} / scale "
                                   f"{list(scale.shape)} do not match the fp32 weight [out, in] {list(w.shape)}")
        w64 = w.astype(np.float64)
        amax = np.abs(w64).max(axis=1)
        want = np.where(amax > 0, amax / 127.0, 1.0)
        bad = np.flatnonzero(np.abs(scale - want) > 1e-6 * want)
        if bad.size:
            o = int(bad[0])
            raise AscendQuantError(f"{what}: {name}: scale of output channel {o} is {scale[o]:.6g}, the scheme gives "
                                   f"amax/127 = {want[o]:.6g} ({bad.size} of {scale.size} channels differ)")
        err = np.abs(q.astype(np.float64) * scale[:, None] - w64)
        lim = scale[:, None] / 2 * (1 + 1e-5) + 1e-7 * np.abs(w64)
        if (err > lim).any():
            o, i = (int(x[0]) for x in np.nonzero(err > lim))
            raise AscendQuantError(f"{what}: {name}: int8 weight [{o}, {i}] dequantizes to {q[o, i] * scale[o]:.6g}, "
                                   f"the fp32 weight is {w64[o, i]:.6g} (more than half a step, {scale[o] / 2:.3g})")
        n += 1
    return n


def _expert_oi(name: str, w: np.ndarray, cfg) -> np.ndarray:
    """A stacked routed-expert table as [E * out, in] rows per expert output channel (quantize_experts' rows)."""
    kind = EXPERT_TABLE.match(name).group(1)
    E, inter, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    if kind in ("gate", "up", "down"):
        return w.reshape(E * (inter if kind != "down" else h), -1)
    if kind == "gate_up_t":
        return np.ascontiguousarray(w.T)
    return np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(E * h, inter)


def quantize_static_graph(model: ir.Model, cfg, calibration: Mapping[str, float],
                          keep_unquantized: Sequence[str] = ()) -> QuantReport:
    """W8A8 on one static graph, in place: rank-2 linear sites by W8A8Pass (attention activations with
    the calibrated scale of their module scope), then the routed-expert tables. `keep_unquantized`: module scopes
    (fallback_candidates) left fp32 (the accuracy fallback). Every int8 weight written is checked against its fp32
    source (check_quantized_weights). -> the QuantReport."""
    before = initializer_bytes(model.graph)
    keys = static_activation_keys(model)
    missing = sorted(k for k in keys.values() if k not in calibration)
    if missing:
        raise AscendQuantError(f"no calibrated amax for {missing[:4]}{' ...' if len(missing) > 4 else ''}: "
                               "calibrate on a static graph of the same model (calibrate_static)")
    keep = list(dict.fromkeys(keep_unquantized))
    if keep:
        known = fallback_candidates(model)
        unknown = [k for k in keep if k not in known]
        if unknown:
            raise AscendQuantError(f"{model.graph.name}: cannot keep {unknown[:3]} unquantized: not a quantized linear "
                                   f"site of this graph (sites: {known[:4]} ...)")
    base_exclude = DEFAULT_EXCLUDE + EXPERT_EXCLUDE + INDEXER_EXCLUDE
    fp32_oi = {group[0].weight.name or "weight": group[0].weight_oi
               for group in select_sites(model.graph, base_exclude + tuple(f"{k}/*" for k in keep))}
    fp32_oi.update({k: _expert_oi(k, v.const_value.numpy().astype(np.float32), cfg)
                    for k, v in model.graph.initializers.items() if EXPERT_TABLE.match(k)})
    p = W8A8Pass(calibration={a: calibration[k] for a, k in keys.items()}, exclude=base_exclude + tuple(f"{k}/*" for k in keep))
    p(model)
    rep = p.report
    rep.skipped = [s for s in rep.skipped if not EXPERT_TABLE.match(s.get("weight") or "")]
    rep.skipped = [{**s, "reason": "accuracy fallback: kept unquantized (fp16 under ATC)"}
                   if any(fnmatch.fnmatchcase(s.get("node") or "", f"{k}/*") for k in keep) else s for s in rep.skipped]
    n = quantize_experts(model, cfg, rep)
    rep.notes.append(f"{n} stacked routed-expert tables: per-channel int8 (per expert output channel), per-token "
                     "dynamic activations")
    rep.notes.append("not quantized: embeddings, norms, lm_head, router gate, the absorbed kv_b_proj "
                     "(W_UK / W_UV rank-3 constants of the latent attention) and DeepSeek-V3.2's lightning indexer")
    if keep:
        rep.notes.append(f"accuracy fallback: {len(keep)} linear site(s) kept unquantized: {', '.join(keep)}")
    check_quantized_weights(model, fp32_oi, model.graph.name)
    rep.weights_bytes_before = before
    rep.weights_bytes_after = initializer_bytes(model.graph)
    common_passes.TopologicalSortPass()(model)
    _infer_types(model)
    record(model, rep)
    return rep


def _infer_types(model: ir.Model) -> None:
    """dtype/shape of the values the quantization added (the fp16 emulation reads dtypes), from ONNX
    shape inference."""
    import onnx
    try:
        proto = onnx.shape_inference.infer_shapes(ir.to_proto(model), check_type=False, strict_mode=False)
    except Exception as e:  # a malformed rewrite: say so rather than emulate a graph with unknown dtypes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AscendQuantError(f"{model.graph.name}: ONNX shape inference failed after W8A8: {first}") from e
    known = {vi.name: vi for vi in list(proto.graph.value_info) + list(proto.graph.output)}
    for node in model.graph:
        for o in node.outputs:
            vi = known.get(o.name)
            if vi is None or (o.dtype is not None and o.shape is not None):
                continue
            t = vi.type.tensor_type
            if o.dtype is None and t.elem_type:
                o.dtype = ir.DataType(t.elem_type)
            if o.shape is None and t.HasField("shape"):
                o.shape = ir.Shape([d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                    for d in t.shape.dim])
    ours = set(quant_node_names(model))
    untyped = [o.name for n in model.graph if n.name in ours or (n.name or "").endswith((".reshape", ".transpose"))
               for o in n.outputs if o.dtype is None]
    if untyped:
        raise AscendQuantError(f"{model.graph.name}: no dtype after W8A8 for {untyped[:5]}: shape inference could not "
                               "type the rewritten graph")
