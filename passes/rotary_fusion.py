"""The fixed-shape decode step's interleaved RoPE as one com.microsoft.RotaryEmbedding kernel (ort-cuda decode gears).

Why: a captured decode gear is launch-bound (docs/ort-cuda.md, "Where a captured step's time goes"): its time is
about the number of kernels times a few microseconds, whatever each computes. The traced MLA RoPE
(models/static_lm.py, DeepSeek's interleaved pairs) is, per q_pe and per k_pe of every layer,

    v = Reshape(x, [..., r/2, 2]); a = Gather(v, 0, axis=-1); b = Gather(v, 1, axis=-1)
    y = Reshape(Concat(Unsqueeze(a*cos - b*sin, -1), Unsqueeze(a*sin + b*cos, -1), axis=-1), [..., r])

with cos/sin = Gather(table [G, r/2], position) (Unsqueezed for the heads): nine kernels (two Gathers, four Muls,
Sub, Add, Concat; the Reshapes and Unsqueezes are aliases), 18 a layer. ONNX Runtime's CUDA EP has the op that
computes exactly this, com.microsoft.RotaryEmbedding with interleaved=1 (out[2i] = x[2i] cos_i - x[2i+1] sin_i,
out[2i+1] = x[2i] sin_i + x[2i+1] cos_i, cos/sin read from caches [max_position, r/2] at position_ids), one kernel.
The rewrite:

    y = Reshape(RotaryEmbedding(Reshape(x, [B, S, N*r]), Cast(position, int64), table_cos, table_sin,
                                interleaved=1, num_heads=N), shape of y)

x is [B, S, r] (k_pe, N = 1) or [B, N, S, r] with S = 1 (q_pe after the head transpose: for one token its bytes
are those of [B, 1, N*r], so the Reshape is an alias). The position is the index the traced Gathers read the
tables with ([B, S] int32, cast once per distinct index value).

Numerics: the same products and sums. The traced form rounds each product and the Sub/Add to fp16 (three
roundings an element); the kernel computes x*cos + sign*y*sin in one expression (at most as many roundings), so
the fp16 rounding twin of the rewritten graph (passes/fp16_rounding.py: one rounding for the op's output, fp32
inside) sits between the two. The gear stage's parity check (targets/ort_cuda/build.py check_gear_decode) judges
the rewritten graph's twin against eager fp32 under the same budget as before.

Matched structurally (op types, constant indices and axes, static shapes); anything else is left alone and counted
in `skipped`. Run on the fp32 traced step before to_fp16 (targets/ort_cuda/gears.py convert_gear): to_fp16 then
stores the tables fp16 (the op's caches share the input's type) and runs the op in fp16.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .graph_utils import attr, const_array

MS = "com.microsoft"


def _static(v: ir.Value | None) -> tuple[int, ...] | None:
    if v is None or v.shape is None or any(not isinstance(d, int) for d in v.shape):
        return None
    return tuple(int(d) for d in v.shape)


def _producer(v: ir.Value | None, op: str) -> ir.Node | None:
    p = None if v is None else v.producer()
    return p if p is not None and p.op_type == op and p.domain in ("", "ai.onnx") else None


def _skip_unsqueeze(v: ir.Value) -> ir.Value:
    """The value an Unsqueeze (chain) of `v` starts from (the tables' rows are Unsqueezed for the heads)."""
    while True:
        p = _producer(v, "Unsqueeze")
        if p is None:
            return v
        v = p.inputs[0]


def _select(v: ir.Value | None) -> tuple[ir.Value, int] | None:
    """Gather(src, scalar k, axis=last) -> (src, k)."""
    g = _producer(v, "Gather")
    if g is None:
        return None
    k = const_array(g.inputs[1])
    shape = _static(g.inputs[0])
    if k is None or k.size != 1 or k.ndim != 0 or shape is None:
        return None
    axis = int(attr(g, "axis", 0))
    if axis not in (-1, len(shape) - 1) or shape[-1] != 2:
        return None
    return g.inputs[0], int(k)


def _table(v: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """cos/sin operand -> (the table initializer [P, r/2], the index it is gathered at)."""
    g = _producer(_skip_unsqueeze(v), "Gather")
    if g is None or int(attr(g, "axis", 0)) != 0:
        return None
    t = g.inputs[0]
    if t is None or not t.is_initializer() or t.const_value is None or _static(t) is None or len(t.shape) != 2:
        return None
    return t, g.inputs[1]


def _products(v: ir.Value | None, op: str) -> tuple[ir.Node, list[tuple[ir.Value, ir.Value]]] | None:
    """Sub/Add(Mul(p, q), Mul(s, t)) -> (node, [(p, q), (s, t)])."""
    n = _producer(v, op)
    if n is None:
        return None
    out = []
    for i in n.inputs:
        m = _producer(i, "Mul")
        if m is None:
            return None
        out.append((m.inputs[0], m.inputs[1]))
    return n, out


class RotaryFusionPass(ir.passes.InPlacePass):
    """The interleaved RoPE pattern -> com.microsoft.RotaryEmbedding (module doc)."""

    def __init__(self):
        super().__init__()
        self.rewritten = 0
        self.skipped: list[str] = []

    def _match(self, concat: ir.Node):
        """Concat(Unsqueeze(Sub), Unsqueeze(Add), axis=-1) -> (x, cos table, sin table, index) or None."""
        if len(concat.inputs) != 2 or int(attr(concat, "axis", 0)) not in (-1, len(concat.outputs[0].shape or ()) - 1):
            return None
        parts = []
        for v in concat.inputs:
            u = _producer(v, "Unsqueeze")
            if u is None or len(list(u.outputs[0].uses())) != 1:
                return None
            parts.append(u.inputs[0])
        sub, add = _products(parts[0], "Sub"), _products(parts[1], "Add")
        if sub is None or add is None:
            return None
        # a*cos - b*sin and a*sin + b*cos, with a / b the even / odd lanes of one Reshape
        (a1, c1), (b1, s1) = sub[1]
        (a2, s2), (b2, c2) = add[1]
        sa, sb = _select(a1), _select(b1)
        if sa is None or sb is None or sa[0] is not sb[0] or (sa[1], sb[1]) != (0, 1):
            return None
        if a2 is not a1 or b2 is not b1 or c2 is not c1 or s2 is not s1:
            return None
        r = _producer(sa[0], "Reshape")
        if r is None:
            return None
        cos, sin = _table(c1), _table(s1)
        if cos is None or sin is None or cos[1] is not sin[1]:
            return None
        return r.inputs[0], cos[0], sin[0], cos[1]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        positions: dict[int, ir.Value] = {}
        for concat in list(g):
            if concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx"):
                continue
            m = self._match(concat)
            if m is None:
                continue
            x, cos, sin, index = m
            xs = _static(x)
            ys = _static(concat.outputs[0])
            final = next((u for u, _ in concat.outputs[0].uses()), None)
            if (xs is None or ys is None or final is None or final.op_type != "Reshape"
                    or len(list(concat.outputs[0].uses())) != 1):
                self.skipped.append(f"{concat.name}: shapes not static or the stack not reshaped back")
                continue
            out = final.outputs[0]
            r, half = xs[-1], int(cos.shape[1])
            if _static(out) != xs or r != 2 * half or _static(sin) != _static(cos):
                self.skipped.append(f"{concat.name}: x {xs} / out {_static(out)} / cos {_static(cos)} do not agree")
                continue
            if len(xs) == 3:
                B, S, N = xs[0], xs[1], 1
            elif len(xs) == 4 and xs[2] == 1:
                B, N, S = xs[0], xs[1], 1  # [B, N, 1, r]: the bytes of [B, 1, N*r]
            else:
                self.skipped.append(f"{concat.name}: x {xs} is neither [B, S, r] nor [B, N, 1, r]")
                continue
            if _static(index) not in ((B, S),):
                self.skipped.append(f"{concat.name}: position index {_static(index)} is not [B, S] = {(B, S)}")
                continue
            tag = f"rotary_{self.rewritten}"
            if id(index) not in positions:
                if index.dtype == ir.DataType.INT64:
                    positions[id(index)] = index
                else:
                    c = ir.node("Cast", [index], attributes={"to": ir.DataType.INT64}, name=f"{tag}/position_int64")
                    c.outputs[0].name, c.outputs[0].dtype, c.outputs[0].shape = f"{tag}_position", ir.DataType.INT64, ir.Shape([B, S])
                    g.insert_before(concat, c)
                    positions[id(index)] = c.outputs[0]
            shape3 = ir.Value(name=f"{tag}_shape3", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([3]),
                              const_value=ir.tensor(np.array([B, S, N * r], np.int64), name=f"{tag}_shape3"))
            shape_out = ir.Value(name=f"{tag}_shape_out", type=ir.TensorType(ir.DataType.INT64),
                                 shape=ir.Shape([len(xs)]), const_value=ir.tensor(np.array(xs, np.int64),
                                                                                  name=f"{tag}_shape_out"))
            g.register_initializer(shape3)
            g.register_initializer(shape_out)
            flat = ir.node("Reshape", [x, shape3], name=f"{tag}/flatten")
            rot = ir.node("RotaryEmbedding", [flat.outputs[0], positions[id(index)], cos, sin], domain=MS,
                          attributes={"interleaved": 1, "num_heads": N}, name=f"{tag}/rotary")
            back = ir.node("Reshape", [rot.outputs[0], shape_out], name=f"{tag}/unflatten")
            for n, shp in ((flat, [B, S, N * r]), (rot, [B, S, N * r]), (back, list(xs))):
                n.outputs[0].name = n.name.replace("/", "_")
                n.outputs[0].dtype, n.outputs[0].shape = x.dtype, ir.Shape(shp)
            g.insert_before(concat, [flat, rot, back])
            out.replace_all_uses_with(back.outputs[0], replace_graph_outputs=True)
            self.rewritten += 1
        if self.rewritten:
            if MS not in model.opset_imports:
                model.opset_imports[MS] = 1
            from onnx_ir.passes import common as common_passes
            common_passes.RemoveUnusedNodesPass()(model)
            g.sort()
        return ir.passes.PassResult(model, modified=self.rewritten > 0)
