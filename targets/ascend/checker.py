"""Checks an ONNX graph against the ascend target profile: every node, every value's dtype (after
ONNX shape inference), the opset and the static shapes ATC needs.

    violations = check(model, profile)          # [] when the graph is ATC-ready
    check_or_raise(model, profile, what="decode.onnx")   # AscendCheckError listing each violation

`model` may be an onnx.ModelProto, an onnx_ir.Model or a path. Each Violation names the node, its
op and the reason, so a build log points at the exact node to fix.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from models.errors import MlamoeError

from .profile import (CUBE_OPS, DATA_DEPENDENT_OPS, FORBIDDEN_VALUE_DTYPES, QDQ_DTYPES, QDQ_OPS, SCATTERND_DTYPES,
                      TOPK_DTYPES, AscendProfile)


class AscendCheckError(MlamoeError):
    def __init__(self, message: str, violations: list["Violation"]):
        super().__init__(message)
        self.violations = violations


@dataclasses.dataclass(frozen=True)
class Violation:
    node: str  # node name ("<model>" / "<input:NAME>" for graph-level findings)
    op: str  # op type ("opset", "input" for graph-level findings)
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.reason}"


def _dtype_name(elem_type: int) -> str:
    try:
        return ir.DataType(elem_type).name.lower()
    except ValueError:
        return f"dtype {elem_type}"


def _as_proto(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, ir.Model):
        return ir.to_proto(model)
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(str(model))
    raise TypeError(f"check: expected an onnx.ModelProto, onnx_ir.Model or path, got {type(model).__name__}")


def _static(t: onnx.TypeProto) -> bool:
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return False
    return all(d.HasField("dim_value") for d in t.tensor_type.shape.dim)


def _shape_str(t: onnx.TypeProto) -> str:
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return "unknown"
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                           for d in t.tensor_type.shape.dim) + "]"


def check(model, profile: AscendProfile) -> list[Violation]:
    """Every violation of `profile` in `model` (empty list: ATC-ready as far as the profile knows)."""
    proto = _as_proto(model)
    out: list[Violation] = []
    graph_name = proto.graph.name or "<model>"

    # ---- opset / domains
    lo, hi = profile.opset_range
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            if not lo <= o.version <= hi:
                out.append(Violation(graph_name, "opset",
                                     f"default-domain opset {o.version} is outside ATC's {lo}..{hi}; convert with "
                                     f"onnx.version_converter.convert_version(model, {profile.target_opset})"))
        elif any(n.domain == o.domain for n in proto.graph.node):
            out.append(Violation(graph_name, "opset", f"domain {o.domain!r} (version {o.version}) is not an "
                                                      "ONNX domain ATC parses"))

    # ---- shape inference (values' dtypes and shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # keep checking node by node without inferred types
        inferred = proto
        out.append(Violation(graph_name, "shape-inference", f"ONNX shape inference failed: "
                                                            f"{str(e).strip().splitlines()[0] if str(e).strip() else e}"))
    g = inferred.graph
    types: dict[str, onnx.TypeProto] = {}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        types[v.name] = v.type
    consts: dict[str, np.ndarray] = {}
    for init in g.initializer:
        consts[init.name] = numpy_helper.to_array(init) if not init.external_data else None
        types.setdefault(init.name, onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    init_names = {i.name for i in g.initializer}

    # ---- graph inputs: static shapes, allowed dtypes
    all_static_inputs = True
    for v in g.input:
        if v.name in init_names:
            continue
        if not _static(v.type):
            all_static_inputs = False
            out.append(Violation(f"<input:{v.name}>", "input",
                                 f"shape {_shape_str(v.type)} is not static; ATC needs fixed shapes (gears via "
                                 "--dynamic_dims must be given explicitly)"))
        et = v.type.tensor_type.elem_type
        if et in FORBIDDEN_VALUE_DTYPES:
            out.append(Violation(f"<input:{v.name}>", "input", f"dtype {_dtype_name(et)} is not supported by ATC"))
    for init in g.initializer:
        if init.data_type in FORBIDDEN_VALUE_DTYPES:
            out.append(Violation(f"<initializer:{init.name}>", "initializer",
                                 f"dtype {_dtype_name(init.data_type)} is not supported by ATC"))

    def dtype(name: str) -> int | None:
        t = types.get(name)
        if t is None or not t.HasField("tensor_type"):
            return None
        return t.tensor_type.elem_type or None

    for i, node in enumerate(g.node):
        name = node.name or f"<node {i}>"
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs:
            consts[node.output[0]] = numpy_helper.to_array(attrs["value"])

        def bad(reason: str) -> None:
            out.append(Violation(name, op, reason))

        if node.domain not in ("", "ai.onnx"):
            bad(f"op {node.domain}::{op} is outside the default ONNX domain; ATC has no parser for it")
            continue
        if op in QDQ_OPS:
            if not profile.qdq:
                bad(f"{op} in a {profile.quant!r} profile: Q/DQ nodes belong to --quant w8a8 graphs only")
                continue
            _check_qdq(node, attrs, consts, dtype, bad)
        elif op not in profile.allowed_ops:
            bad("op is not in the CANN ONNX operator list the ascend profile accepts")
            continue
        # per-op dtype / attribute rules
        if op == "Cast":
            to = attrs.get("to")
            if to is not None and to not in {int(d) for d in profile.cast_targets}:
                bad(f"Cast to {_dtype_name(to)}: ATC's Cast targets only "
                    f"{', '.join(sorted(_dtype_name(int(d)) for d in profile.cast_targets))}")
        elif op == "TopK":
            dt = dtype(node.input[0])
            if dt is not None and dt not in {int(d) for d in TOPK_DTYPES}:
                bad(f"TopK input {node.input[0]!r} is {_dtype_name(dt)}; ATC's TopK takes float16/float32")
        elif op == "ScatterND":
            dt = dtype(node.input[0])
            if dt is not None and dt not in {int(d) for d in SCATTERND_DTYPES}:
                bad(f"ScatterND data {node.input[0]!r} is {_dtype_name(dt)}; ATC's ScatterND takes float16/float32")
            idx = consts.get(node.input[1])
            if idx is None:
                bad(f"ScatterND indices {node.input[1]!r} are computed at run time; ATC needs non-negative "
                    "indices and the checker cannot prove that (write the update with Where/one-hot instead)")
            elif (idx < 0).any():
                bad(f"ScatterND indices {node.input[1]!r} contain negative values; ATC needs non-negative indices")
        elif op == "Einsum":
            eq = attrs.get("equation", b"")
            eq = (eq.decode() if isinstance(eq, bytes) else str(eq)).replace(" ", "")
            if len(node.input) != 2:
                bad(f"Einsum with {len(node.input)} inputs; ATC supports two-input equations only")
            elif eq not in profile.einsum_equations:
                bad(f"Einsum equation {eq!r} is not one of ATC's supported two-input equations "
                    "(rewrite it as MatMul/Transpose/Reshape)")
        elif op in CUBE_OPS:
            dts = [dtype(x) for x in node.input[:2] if x]
            if any(d is not None and d not in (int(ir.DataType.FLOAT16), int(ir.DataType.FLOAT),
                                              int(ir.DataType.BFLOAT16)) for d in dts):
                bad(f"{op} on {', '.join(_dtype_name(d) for d in dts if d)}: ATC documents {op} for float16")
            elif int(ir.DataType.FLOAT) in dts and not profile.fp32_cube_ok:
                bad(f"fp32 {op} under precision mode {profile.precision_mode!r}: ATC documents {op} for float16 "
                    "and this mode keeps the original dtype; use force_fp16 / mixed_float16 or cast to fp16")
        if op in DATA_DEPENDENT_OPS:
            bad("output shape depends on the data; fixed shapes and --dynamic_dims gears cannot express it "
                "(use a static form: one-hot / Where / TopK with fixed k)")
            continue
        # values this node produces: dtypes, and static shapes once the inputs are static
        for o in node.output:
            if not o:
                continue
            dt = dtype(o)
            if dt is not None and dt in {int(d) for d in FORBIDDEN_VALUE_DTYPES}:
                bad(f"output {o!r} is {_dtype_name(dt)}, which ATC does not support")
            t = types.get(o)
            if all_static_inputs and op != "Constant" and (t is None or not _static(t)):
                bad(f"output {o!r} has shape {_shape_str(t) if t is not None else 'unknown'} after shape "
                    "inference with static inputs: a data-dependent intermediate shape, which fixed shapes and "
                    "gears do not support")
    return out


def _check_qdq(node, attrs: dict, consts: dict, dtype, bad) -> None:
    """QuantizeLinear / DequantizeLinear in the form the w8a8 profile accepts (profile docstring): int8,
    zero point 0, constant fp32 scale that is a scalar or 1-D along a valid axis, no block_size."""
    op = node.op_type
    if "block_size" in attrs and attrs["block_size"]:
        bad(f"{op} with block_size {attrs['block_size']}: blocked QDQ needs opset 21; ATC parses opset <= 18")
    # consts: name -> array for constants (None for an initializer whose data is external: not read)
    scale = consts.get(node.input[1]) if len(node.input) > 1 else None
    if len(node.input) < 2 or node.input[1] not in consts:
        bad(f"{op} scale {node.input[1] if len(node.input) > 1 else '?'!r} is not a constant; the w8a8 profile "
            "takes calibrated (static) scales only (per-token activations use plain ops)")
    elif scale is not None and (scale.dtype != np.float32 or scale.ndim > 1):
        bad(f"{op} scale is {scale.dtype} with shape {list(scale.shape)}; expected fp32, scalar (per tensor) or "
            "1-D (per axis)")
    quantized = node.output[0] if op == "QuantizeLinear" else node.input[0]
    qt = dtype(quantized)
    if qt is not None and qt not in {int(d) for d in QDQ_DTYPES}:
        bad(f"{op} quantized tensor {quantized!r} is {_dtype_name(qt)}; the w8a8 profile uses int8 only")
    if len(node.input) > 2 and node.input[2]:
        zp = consts.get(node.input[2])
        if node.input[2] not in consts or (zp is not None and (np.asarray(zp) != 0).any()):
            bad(f"{op} zero point {node.input[2]!r} is not a constant 0: W8A8 here is symmetric")
    if op == "DequantizeLinear" and scale is not None and scale.ndim == 1 and scale.size > 1:
        src = consts.get(node.input[0])
        axis = attrs.get("axis", 1)
        if node.input[0] not in consts:
            bad(f"{op} per-axis on a computed tensor {node.input[0]!r}: per-channel scales are for constant weights")
        elif src is not None and not -src.ndim <= axis < src.ndim or src.shape[axis] != scale.size:
            bad(f"{op} axis {axis} with {scale.size} scales does not match weight shape {list(src.shape)}")


def check_or_raise(model, profile: AscendProfile, what: str | None = None) -> None:
    """Raise AscendCheckError listing every violation (node, op, reason); return None when clean."""
    violations = check(model, profile)
    if violations:
        label = what or (str(model) if isinstance(model, (str, os.PathLike)) else "graph")
        lines = [f"{label}: {len(violations)} violation(s) of the ascend profile ({profile.describe()}):"]
        lines += [f"  - {v}" for v in violations]
        raise AscendCheckError("\n".join(lines), violations)


def summary(model) -> dict:
    """Op histogram and opset of a graph, for the manifest."""
    proto = _as_proto(model)
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import}, "ops": dict(sorted(ops.items()))}


def check_file(path: Path, profile: AscendProfile) -> list[Violation]:
    return check(Path(path), profile)
