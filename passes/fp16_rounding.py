"""An fp32 twin of an fp16 graph that rounds every fp16 tensor to fp16 explicitly, for checking fp16 graphs on ORT CPU.

Why: ORT CPU has no fp16 kernel for most ops (MatMul, Sigmoid, Add, ... on x86). Its InsertCastTransformer runs
such a node in fp32 between Casts, and between two such nodes it drops the fp32 -> fp16 -> fp32 pair, so a chain
of them computes in fp32 with no rounding in between (measured: Sigmoid -> Add -> Sigmoid on fp16 tensors equals
the unrounded fp32 chain on every element, at every optimisation level; tests/test_fp16_rounding.py). A GPU or an
NPU writes each fp16 tensor to memory as fp16 (cube and tensor cores accumulate in fp32, then round), so checking
the fp16 graph as it is on ORT CPU measures less error than the device makes.

The twin computes every node in fp32 and rounds each output that the fp16 graph holds in fp16 with an explicit
Cast(to fp16) -> Cast(to fp32) pair, which ORT keeps (it only drops the pairs it inserted itself). fp16
initializers and constants become fp32 arrays of the same (fp16-exact) values, fp16 graph inputs and outputs become
fp32 (an fp32 feed is rounded on entry, as a caller casting it to fp16 would). One rounding per tensor written: what "fp32 accumulate, write fp16"
does; ops that the device runs with fp16 intermediates inside one kernel are not modelled.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from models.errors import MlamoeError
from passes.ir_external import copy_model

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
_DTYPE_ATTRS = ("to", "dtype", "output_dtype")


class RoundingTwinError(MlamoeError):
    pass


class DtypeInferenceError(MlamoeError):
    pass


def check_initializer_shapes(graph: ir.Graph) -> None:
    """Every initializer's tensor has the rank and the fixed dims its value declares. A mismatch (e.g. a scalar declared [] but stored
    [1]) makes ONNX shape inference fail on the whole graph, which onnx-ir's ShapeInferencePass only logs (the
    model is left without inferred types)."""
    for v in graph.initializers.values():
        t = v.const_value
        if t is None or v.shape is None:
            continue
        declared, stored = list(v.shape), list(t.shape)
        if len(declared) != len(stored) or any(isinstance(d, int) and d != n for d, n in zip(declared, stored)):
            raise DtypeInferenceError(
                f"initializer {v.name!r} declares shape {list(v.shape)} but its tensor has shape {list(t.shape)}: "
                "ONNX shape inference fails on such a graph; the pass that created it must give the value the "
                "tensor's shape (np.ascontiguousarray turns a 0-d array into a 1-d one)")


def _type_follows_first_input(node: ir.Node, k: int) -> bool:
    """Whether output k of `node` has the type of its first input by the op's ONNX schema (the output's type
    constraint is the first input's), or the op has no ONNX schema (contrib ops: com.microsoft.MoE / QMoE /
    MoEGroupRouter, whose float outputs have their first input's type)."""
    import onnx
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    if not onnx.defs.has(node.op_type, domain):
        return True
    schema = onnx.defs.get_schema(node.op_type, domain=domain)
    if not schema.inputs or k >= len(schema.outputs):
        return False
    return schema.outputs[k].type_str == schema.inputs[0].type_str


def infer_dtypes(model: ir.Model) -> None:
    """Give every value a dtype (in place): ONNX shape inference, then (contrib ops it does not know, and what
    follows them) the dtype of the node's first typed input where the output's type is the first input's
    (_type_follows_first_input). An output whose type is not its input's (Shape, TopK's indices, EyeLike's dtype
    attribute, ...) is left untyped when shape inference did not type it: guessing its first input's dtype gave
    Shape a float output once, which ORT refuses at load. Initializers stored in another shape than declared (what
    made ONNX shape inference fail then) are refused first (check_initializer_shapes)."""
    check_initializer_shapes(model.graph)
    common_passes.ShapeInferencePass()(model)
    for node in model.graph:
        for k, o in enumerate(node.outputs):
            if o.dtype is not None:
                continue
            typed = [i.dtype for i in node.inputs if i is not None and i.dtype is not None]
            if typed and _type_follows_first_input(node, k):
                o.dtype = typed[0]


def _fp32_tensor(t, name: str):
    return ir.tensor(t.numpy().astype(np.float32), name=name)


def rounding_twin(model: ir.Model) -> ir.Model:
    """A copy of the fp16 graph `model` computing in fp32 with an explicit fp16 rounding of every fp16 tensor."""
    m = copy_model(model)
    infer_dtypes(m)
    g = m.graph
    for v in g.initializers.values():
        if v.dtype == F16 and v.const_value is not None:
            v.const_value = _fp32_tensor(v.const_value, v.name)
            v.dtype = F32
    for k, v in enumerate(list(g.inputs)):  # an fp16 input: the fp32 feed rounded as the fp16 graph's caller would
        if v.dtype != F16:
            continue
        uses = list(v.uses())
        v.dtype = F32
        half = ir.node("Cast", [v], attributes={"to": F16}, name=f"input_{k}/{v.name}/twin_round")
        back = ir.node("Cast", [half.outputs[0]], attributes={"to": F32}, name=f"input_{k}/{v.name}/twin_fp32")
        half.outputs[0].dtype, half.outputs[0].shape, half.outputs[0].name = F16, v.shape, f"{v.name}__round16"
        back.outputs[0].dtype, back.outputs[0].shape, back.outputs[0].name = F32, v.shape, f"{v.name}__rounded"
        first = next(iter(g), None)
        if first is None:
            g.extend([half, back])
        else:
            g.insert_before(first, [half, back])
        for u, i in uses:
            u.replace_input_with(i, back.outputs[0])
        for j, out in enumerate(g.outputs):
            if out is v:
                g.outputs[j] = back.outputs[0]
    for k_node, node in enumerate(list(g)):
        label = node.name or f"{node.op_type}_{k_node}"
        for a in _DTYPE_ATTRS:
            attr = node.attributes.get(a)
            if attr is not None and attr.type == ir.AttributeType.INT and attr.value == F16 \
                    and not (node.op_type == "Cast" and node.domain == ""):
                raise RoundingTwinError(f"rounding twin: node {node.name!r} ({node.op_type}) produces fp16 by its "
                                        f"{a!r} attribute; only Cast is rewritten")
        if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
            t = node.attributes["value"].value
            if t.dtype == F16:
                node.attributes["value"] = ir.AttrTensor("value", _fp32_tensor(t, t.name or ""))
        for o in node.outputs:
            if o.dtype != F16:
                continue
            uses = list(o.uses())
            o.dtype = F32
            if node.op_type == "Cast" and node.domain == "":
                # Cast(to fp16) is the rounding itself: keep it, read it back as fp32
                o.dtype = F16
                back = ir.node("Cast", [o], attributes={"to": F32}, name=f"{label}/{o.name}/twin_fp32")
            else:
                half = ir.node("Cast", [o], attributes={"to": F16}, name=f"{label}/{o.name}/twin_round")
                half.outputs[0].dtype, half.outputs[0].shape = F16, o.shape
                half.outputs[0].name = f"{o.name}__round16"
                back = ir.node("Cast", [half.outputs[0]], attributes={"to": F32}, name=f"{label}/{o.name}/twin_fp32")
            back.outputs[0].dtype, back.outputs[0].shape = F32, o.shape
            rounded = back.outputs[0]
            name = o.name
            o.name = f"{name}__unrounded"
            rounded.name = name
            new = [back] if node.op_type == "Cast" and node.domain == "" else [half, back]
            g.insert_after(node, new)
            for u, i in uses:
                u.replace_input_with(i, rounded)
            for k, out in enumerate(g.outputs):
                if out is o:
                    g.outputs[k] = rounded
    g.name = f"{g.name}_fp16_rounding_twin"
    return m
