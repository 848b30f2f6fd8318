"""W8A8: per-output-channel INT8 weights and INT8 activations, as QDQ (Ascend's DeepSeek serving scheme).

The scheme (what tests/test_quant_w8a8.py re-implements in numpy):
  weights     per output channel o: s_w[o] = amax(|W[o, :]|) / 127 (1.0 if zero), fp32;
              q = clip(rint(W / s_w), -127, 127) int8; dequantized = float32(q) * s_w.
              Graph: int8 initializer in the orientation its node takes + DequantizeLinear
              (per-axis: axis 0 for Gemm transB=1 [out, in], axis 1 for MatMul [in, out]).
  activations, per-token dynamic (MoE experts, shared experts, dense MLP; every site without a
              calibrated scale), per row of the last axis:
                s = max(amax(|x|, axis=-1, keepdims), 1e-8) / 127
                x' = clip(round_half_even(x / s), -127, 127) * s
              as ReduceMax(Abs)/Max/Div/Round/Clip/Mul (standard ops: QuantizeLinear only takes
              per-tensor/per-axis/blocked scales, and DynamicQuantizeLinear is per-tensor uint8).
  activations, static (the MLA projections -- role "attention" -- when calibration gives an amax):
                s = amax / 127 (per tensor); QuantizeLinear(x, s, int8 0) -> DequantizeLinear:
                saturating to [-128, 127] as QuantizeLinear does.
ORT CPU runs both forms (in fp32: the graph simulates the integer arithmetic exactly up to
accumulation order). No opset change is needed (opset 20 graphs stay opset 20; per-axis DQ is opset
13, so the ascend target's opset-18 graphs can carry it too: targets/ascend/quant.py). Whether Ascend's
tools take these forms is NOT verified: AMCT documents QDQ ONNX models as input to
`convert_qat_model` (-> AscendQuant/AscendDequant, int8 weights, then ATC) for Conv/Gemm/ConvTranspose
and single-input MatMul with per-tensor weights for Gemm/MatMul; per-channel MatMul weights and the
per-token subgraph are outside that documented scope.

`calibrate(model_ir, feeds_list)` runs ORT over calibration feeds with the activations exposed as
graph outputs and returns {activation name: amax}.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from .quant_weights import (DEFAULT_EXCLUDE, QuantizationError, QuantReport, add_initializer, const_bytes,
                            initializer_bytes, record, remove_if_unused, select_sites, session_with_outputs)

ACT_EPS = 1e-8
STATIC_ROLES = ("attention",)


class CalibrationError(QuantizationError):
    pass


def quantize_per_channel(w_oi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 [out, in] -> (int8 [out, in], fp32 scales [out])."""
    amax = np.abs(w_oi).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w_oi / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _scalar(graph: ir.Graph, name: str, value, dtype) -> ir.Value:
    return add_initializer(graph, name, np.array(value, dtype=dtype))


def dynamic_fake_quant(graph: ir.Graph, x: ir.Value, before: ir.Node, axes: ir.Value, consts: dict,
                       base: str) -> ir.Value:
    """Symmetric INT8 fake quantization of x with one scale per slice over `axes` (amax / 127, floored at
    consts["eps"]): Abs, ReduceMax, Max, Div, Div, Round, Clip(consts["qmin"], consts["qmax"]), Mul."""
    n_abs = ir.node("Abs", [x], name=f"{base}.abs")
    n_max = ir.node("ReduceMax", [n_abs.outputs[0], axes], {"keepdims": 1}, name=f"{base}.amax")
    n_clamp = ir.node("Max", [n_max.outputs[0], consts["eps"]], name=f"{base}.clamp")
    n_scale = ir.node("Div", [n_clamp.outputs[0], consts["qmax"]], name=f"{base}.scale")
    n_div = ir.node("Div", [x, n_scale.outputs[0]], name=f"{base}.div")
    n_round = ir.node("Round", [n_div.outputs[0]], name=f"{base}.round")
    n_clip = ir.node("Clip", [n_round.outputs[0], consts["qmin"], consts["qmax"]], name=f"{base}.clip")
    n_deq = ir.node("Mul", [n_clip.outputs[0], n_scale.outputs[0]], name=f"{base}.dq")
    n_deq.outputs[0].name = f"{base}.dq"
    graph.insert_before(before, [n_abs, n_max, n_clamp, n_scale, n_div, n_round, n_clip, n_deq])
    return n_deq.outputs[0]


class W8A8Pass(ir.passes.InPlacePass):
    """Linear layers -> int8 per-channel weight DQ + INT8 activation fake-quant (static or per-token)."""

    def __init__(self, calibration: Mapping[str, float] | None = None, exclude: Iterable[str] = DEFAULT_EXCLUDE,
                 static_roles: Sequence[str] = STATIC_ROLES, logits_outputs=("logits",)):
        super().__init__()
        self.calibration = dict(calibration or {})
        self.exclude, self.static_roles, self.logits_outputs = tuple(exclude), tuple(static_roles), tuple(logits_outputs)
        self.report = QuantReport("w8a8")

    def _dynamic(self, graph: ir.Graph, x: ir.Value, before: ir.Node, consts: dict) -> ir.Value:
        if "axes" not in consts:
            consts["axes"] = add_initializer(graph, "w8a8.axes_last", np.array([-1], np.int64))
            consts["eps"] = _scalar(graph, "w8a8.eps", ACT_EPS, np.float32)
            consts["qmax"] = _scalar(graph, "w8a8.qmax", 127.0, np.float32)
            consts["qmin"] = _scalar(graph, "w8a8.qmin", -127.0, np.float32)
        return dynamic_fake_quant(graph, x, before, consts["axes"], consts, f"{x.name}.a8")

    def _static(self, graph: ir.Graph, x: ir.Value, amax: float, before: ir.Node) -> ir.Value:
        base = f"{x.name}.a8s"
        s = _scalar(graph, f"{base}.scale", np.float32(amax) / np.float32(127) if amax > 0 else 1.0, np.float32)
        z = _scalar(graph, f"{base}.zero_point", 0, np.int8)
        q = ir.node("QuantizeLinear", [x, s, z], name=f"{base}.q")
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=f"{base}.dq")
        dq.outputs[0].name = f"{base}.dq"
        graph.insert_before(before, [q, dq])
        return dq.outputs[0]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        rep = self.report = QuantReport("w8a8")
        rep.weights_bytes_before = initializer_bytes(graph)
        groups = select_sites(graph, self.exclude, self.logits_outputs, rep)
        act_cache: dict[tuple[int, str], ir.Value] = {}
        consts: dict = {}
        n_static = n_dynamic = 0
        missing = []
        for group in groups:
            w = group[0].weight
            w_oi = group[0].weight_oi
            out_f, in_f = w_oi.shape
            q, scale = quantize_per_channel(w_oi)
            base = w.name or "weight"
            oi_form = group[0].node.op_type == "Gemm" and group[0].weight_is_oi
            qv = add_initializer(graph, f"{base}.w8", q if oi_form else np.ascontiguousarray(q.T))
            sv = add_initializer(graph, f"{base}.w8_scale", scale)
            dq = ir.node("DequantizeLinear", [qv, sv], {"axis": 0 if oi_form else 1}, name=f"{base}.dq")
            dq.outputs[0].name = f"{base}.dequantized"
            modes = []
            for i, site in enumerate(group):
                first = site.transpose or site.node
                if i == 0:
                    graph.insert_before(first, [dq])
                x = site.activation
                static = site.role in self.static_roles and x.name in self.calibration
                if site.role in self.static_roles and not static:
                    missing.append(x.name)
                key = (id(x), "static" if static else "dynamic")
                if key not in act_cache:
                    act_cache[key] = (self._static(graph, x, float(self.calibration[x.name]), site.node) if static
                                      else self._dynamic(graph, x, site.node, consts))
                site.node.replace_input_with(0, act_cache[key])
                site.node.replace_input_with(1, dq.outputs[0])
                if site.node.op_type == "Gemm" and not oi_form and site.weight_is_oi:
                    site.node.attributes["transB"] = ir.AttrInt64("transB", 0)
                remove_if_unused(graph, site.transpose.outputs[0] if site.transpose else None)
                modes.append("static" if static else "dynamic")
                n_static += static
                n_dynamic += not static
            remove_if_unused(graph, w)
            after = const_bytes([qv, sv])
            rep.add_site(base, group, (out_f, in_f), after, activations=modes)
        rep.notes.append(f"{n_static} linear sites with static per-tensor activation scales, "
                         f"{n_dynamic} with per-token dynamic activation quantization")
        if missing:
            rep.notes.append(f"{len(set(missing))} {'/'.join(self.static_roles)} activations had no calibrated "
                             "amax and use per-token dynamic quantization instead"
                             + ("" if self.calibration else " (no calibration given)"))
        rep.weights_bytes_after = initializer_bytes(graph)
        record(model, rep)
        return ir.passes.PassResult(model, modified=bool(groups))


def static_activation_names(model_ir: ir.Model, exclude: Iterable[str] = DEFAULT_EXCLUDE,
                            static_roles: Sequence[str] = STATIC_ROLES, logits_outputs=("logits",)) -> list[str]:
    """Names of the activations W8A8Pass quantizes statically (the inputs of the attention linears)."""
    names = []
    for group in select_sites(model_ir.graph, exclude, logits_outputs):
        for s in group:
            if s.role in static_roles and s.activation.name not in names:
                names.append(s.activation.name)
    return names


def _check_feeds(graph: ir.Graph, feeds: Mapping[str, np.ndarray], i: int) -> None:
    want = {v.name: v for v in graph.inputs if not v.is_initializer()}
    got = set(feeds)
    if got != set(want):
        raise CalibrationError(f"calibration feed {i}: inputs {sorted(got)} do not match the graph's inputs "
                               f"{sorted(want)} (missing {sorted(set(want) - got)}, unexpected {sorted(got - set(want))})")
    for name, v in want.items():
        a = np.asarray(feeds[name])
        if v.dtype is not None and a.dtype != v.dtype.numpy():
            raise CalibrationError(f"calibration feed {i}: input {name!r} has dtype {a.dtype}, the graph takes "
                                   f"{v.dtype.numpy()}")
        if v.shape is not None:
            dims = list(v.shape)
            if a.ndim != len(dims) or any(isinstance(d, int) and d != n for d, n in zip(dims, a.shape)):
                raise CalibrationError(f"calibration feed {i}: input {name!r} has shape {list(a.shape)}, the graph "
                                       f"takes {[d if isinstance(d, int) else str(d) for d in dims]}")


def calibrate(model_ir: ir.Model, feeds_list: Sequence[Mapping[str, np.ndarray]],
              tensors: Sequence[str] | None = None, threads: int = 1) -> dict[str, float]:
    """{tensor name: max |value| over every calibration feed}, running ORT CPU.

    `tensors` defaults to the activations W8A8Pass quantizes statically (static_activation_names).
    Feeds must match the graph's inputs (names, dtypes, ranks, fixed dims): else CalibrationError.
    """
    if not feeds_list:
        raise CalibrationError("calibration needs at least one feed (a dict of the graph's inputs)")
    for i, f in enumerate(feeds_list):
        _check_feeds(model_ir.graph, f, i)
    tensors = list(static_activation_names(model_ir) if tensors is None else tensors)
    known = {v.name for n in model_ir.graph for v in n.outputs} | {v.name for v in model_ir.graph.inputs}
    unknown = [t for t in tensors if t not in known]
    if unknown:
        raise CalibrationError(f"calibrate: tensors {unknown[:5]} are not values of the graph")
    sess = session_with_outputs(model_ir, tensors, threads)
    amax = dict.fromkeys(tensors, 0.0)
    for feeds in feeds_list:
        for name, val in zip(tensors, sess.run(tensors, dict(feeds))):
            if val.size:
                amax[name] = max(amax[name], float(np.abs(val).max()))
    return amax
