"""Quantization, common part: find the linear layers of an exported graph, classify them, account bytes.

The schemes live one per file and all build on this module:
    passes/quant_int8.py  INT8 weight-only, `com.microsoft.MatMulNBits` bits=8 (ONNX Runtime)
    passes/quant_int4.py  INT4 weight-only (RTN), `com.microsoft.MatMulNBits` bits=4, QMoE 4-bit experts
    passes/quant_fp8.py   FP8 E4M3 128x128-block weights, blocked `DequantizeLinear` (opset 21)
    passes/quant_w8a8.py  W8A8: per-channel INT8 weights, per-token dynamic / static activations (QDQ)
passes/quantize.py runs one scheme by name (what `compile --quant` calls); this module imports none
of the schemes.

Finding linear layers (names never matter, only the graph):
  A *linear site* is a `MatMul` whose second input is an fp32 initializer of rank 2 ([in, out]),
  or a `Transpose(perm=[1, 0])` of one, or a `Gemm(transA=0, alpha=beta=1)` whose second input is
  such an initializer ([out, in] with transB=1, [in, out] otherwise). Its weight is always handed
  to the schemes in the checkpoint's orientation `[out, in]` (`LinearSite.weight_oi`).
Roles (each site gets one):
  "lm_head"  the linear producing a logits output (through Reshape/Cast/Identity/Squeeze only)
  "router"   the MoE gate: its output feeds Sigmoid/Softmax that reaches TopK within a few
             elementwise/shape ops (never through another MatMul/Gemm); an expert's SwiGLU gate
             (x * sigmoid(x)) never reaches TopK that way, so it is not mistaken for the router.
             After MoE lowering ("ort-fused"): the linear feeding com.microsoft.MoEGroupRouter or
             MoE/QMoE's router_probs input.
  "indexer"  a linear feeding the scores of a TopK that is not a router's (walking back from the TopK's input
             through non-linear ops to the linears that feed it): DeepSeek-V3.2's lightning indexer (wq_b, wk,
             weights_proj; models/indexer.py), whose top-k picks the keys each query attends to. Kept fp32 by
             default ("quantization as for V3, the indexer stays in higher precision"): its selection is a
             discrete choice like expert routing (docs/v32.md)
             DeepSeek-V4's sqrtsoftplus gate: its output reaches Softplus then Sqrt, whose scores reach TopK (the
             "moe" layers' choice, e_score_correction_bias added) or GatherElements (the routing weights; a
             "hash_moe" layer's experts come from tid2eid[input_ids], so its gate reaches no TopK).
  "hc"       DeepSeek-V4's mHC mixing projections (hc_attn_fn / hc_ffn_fn / hc_head_fn; models/v4_hc.py): a
             linear whose input is the unweighted RMS norm (Div or Mul by a computed, non-constant factor) of a
             Reshape folding a rank-4 [.., hc_mult, hidden] stream tensor into rank 3. Kept fp32 by default: its
             outputs become the Sigmoid pre/post weights and the Sinkhorn-normalised comb matrix that mix every
             residual stream of every later layer (a residual-path scale, not a feature projection)
  "mlp"      part of a SwiGLU block: gate/up (feeding Mul(x*Sigmoid(x), up)) or down (its input
             is that product) -- dense MLP, routed and shared experts
  "attention" every other linear (the MLA projections q_a/q_b/q, kv_a, kv_b, o_proj)
Embedding tables (Gather) and norm weights (Mul) are never linear sites, so never quantized.
`exclude` takes roles and/or fnmatch patterns matched against the node name or the initializer
name (a user's override; matching never depends on names otherwise). Default: lm_head, router, indexer, hc.

Weights used by anything other than linear sites (e.g. an lm_head tied to the embedding table)
are left as they are.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from models.errors import MlamoeError
from passes.ir_external import session_from_model

ROLES = ("attention", "mlp", "router", "lm_head", "indexer", "hc")
DEFAULT_EXCLUDE = ("lm_head", "router", "indexer", "hc")
SCHEMES = ("none", "int8", "int4", "w8a8", "fp8")
METADATA_KEY = "mlamoe.quantization"

_PASS_THROUGH = {"Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"}
_ROUTER_SEARCH_DEPTH = 6


class QuantizationError(MlamoeError):
    pass


@dataclasses.dataclass
class LinearSite:
    node: ir.Node  # MatMul or Gemm
    weight: ir.Value  # the fp32 initializer
    transpose: ir.Node | None  # Transpose(weight) feeding a MatMul, if any
    weight_is_oi: bool  # initializer stored [out, in] (Gemm transB=1 or MatMul behind a Transpose)
    role: str = "attention"

    @property
    def weight_oi(self) -> np.ndarray:
        """The weight as fp32 [out, in] (the checkpoint's orientation)."""
        w = self.weight.const_value.numpy()
        return np.ascontiguousarray(w if self.weight_is_oi else w.T, dtype=np.float32)

    @property
    def activation(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0] if self.weight_is_oi else self.weight.shape[1])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1] if self.weight_is_oi else self.weight.shape[0])


@dataclasses.dataclass
class QuantReport:
    """What a quantization pass did. Bytes count initializer storage (data + scales + zero points)."""
    scheme: str
    quantized: list[dict] = dataclasses.field(default_factory=list)  # per site: node, weight, role, shape, bytes
    skipped: list[dict] = dataclasses.field(default_factory=list)  # per site: node, weight, role, reason
    linear_bytes_before: int = 0  # fp32 bytes of the linear weights that were quantized
    linear_bytes_after: int = 0  # their quantized storage (data + scales + zero points)
    weights_bytes_before: int = 0  # every initializer of the graph
    weights_bytes_after: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def linear_ratio(self) -> float:
        return self.linear_bytes_after / self.linear_bytes_before if self.linear_bytes_before else 1.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["linear_ratio"] = self.linear_ratio
        return d

    def add_site(self, weight: str, group: Sequence, shape_oi: Sequence[int], bytes_after: int, **extra) -> None:
        """Record one quantized weight (shared by the nodes in `group`) and count its bytes."""
        before = int(shape_oi[0]) * int(shape_oi[1]) * 4
        self.quantized.append({"weight": weight, "nodes": [s.node.name for s in group], "role": group[0].role,
                               "shape_oi": [int(shape_oi[0]), int(shape_oi[1])], **extra,
                               "bytes_before": before, "bytes_after": bytes_after})
        self.linear_bytes_before += before
        self.linear_bytes_after += bytes_after

    def summary(self) -> str:
        return (f"{self.scheme}: {len(self.quantized)} linear weights quantized "
                f"({self.linear_bytes_before:,} -> {self.linear_bytes_after:,} bytes, "
                f"{self.linear_ratio:.4f}x), {len(self.skipped)} kept fp32; all weights "
                f"{self.weights_bytes_before:,} -> {self.weights_bytes_after:,} bytes")


def session_with_outputs(model_ir: ir.Model, extra_outputs: Iterable[str] = (), threads: int = 1):
    """An ORT CPU session on `model_ir` that also returns the named intermediate tensors (fp32)."""
    import onnx
    import onnxruntime as ort
    proto = ir.to_proto(model_ir)
    have = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name not in have:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return session_from_model(model_ir, so, proto=proto)


def initializer_bytes(graph: ir.Graph) -> int:
    return sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)


def _const(v: ir.Value | None) -> bool:
    return v is not None and v.is_initializer() and v.const_value is not None


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _site(node: ir.Node) -> LinearSite | None:
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    b = node.inputs[1]
    if node.op_type == "MatMul" and node.domain == "":
        if _const(b) and b.dtype == ir.DataType.FLOAT and len(b.shape) == 2:
            return LinearSite(node, b, None, False)
        p = b.producer()
        if (p is not None and p.op_type == "Transpose" and p.domain == "" and _const(p.inputs[0])
                and p.inputs[0].dtype == ir.DataType.FLOAT and len(p.inputs[0].shape) == 2
                and list(_attr(p, "perm", [1, 0])) == [1, 0] and len(b.uses()) == 1):
            return LinearSite(node, p.inputs[0], p, True)
        return None
    if node.op_type == "Gemm" and node.domain == "":
        if (_attr(node, "transA", 0) != 0 or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0
                or not _const(b) or b.dtype != ir.DataType.FLOAT or len(b.shape) != 2):
            return None
        return LinearSite(node, b, None, bool(_attr(node, "transB", 0)))
    return None


def _is_silu_product(node: ir.Node) -> ir.Value | None:
    """Mul(a, Sigmoid(a)) -> a (the SiLU input), else None."""
    if node.op_type != "Mul" or len(node.inputs) != 2:
        return None
    x, y = node.inputs
    for a, s in ((x, y), (y, x)):
        p = s.producer() if s is not None else None
        if p is not None and p.op_type == "Sigmoid" and p.inputs[0] is a:
            return a
    return None


def _reaches_topk(start: ir.Value) -> bool:
    frontier, seen = [(start, 0)], set()
    while frontier:
        v, depth = frontier.pop()
        for user, _ in v.uses():
            if id(user) in seen or user.op_type in ("MatMul", "Gemm"):
                continue
            seen.add(id(user))
            if user.op_type == "TopK":
                return True
            if depth + 1 < _ROUTER_SEARCH_DEPTH:
                frontier.extend((o, depth + 1) for o in user.outputs)
    return False


def _reached(start: ir.Value, ops: set[str], depth: int = _ROUTER_SEARCH_DEPTH) -> list[ir.Node]:
    """The nodes of type `ops` reachable downstream of `start` within `depth` nodes, never through a MatMul/Gemm."""
    frontier, seen, out = [(start, 0)], set(), []
    while frontier:
        v, d = frontier.pop()
        for user, _ in v.uses():
            if id(user) in seen or user.op_type in ("MatMul", "Gemm"):
                continue
            seen.add(id(user))
            if user.op_type in ops:
                out.append(user)
            if d + 1 < depth:
                frontier.extend((o, d + 1) for o in user.outputs)
    return out


def _is_sqrtsoftplus_router(out: ir.Value) -> bool:
    """DeepSeek-V4's gate (models/v4_moe.py Router, scoring_func sqrtsoftplus): out -> Softplus (the exporter's form
    scales and thresholds around it) -> Sqrt -> TopK (choice) or GatherElements (the chosen experts' weights)."""
    return any(_reached(q.outputs[0], {"TopK", "GatherElements"}, 3)
               for sp in _reached(out, {"Softplus"}, 3) for q in _reached(sp.outputs[0], {"Sqrt"}, 4))


def _is_hc_mix(site: LinearSite) -> bool:
    """DeepSeek-V4's mHC mixing projection (module docstring, role "hc")."""
    p = site.activation.producer() if site.activation is not None else None
    if p is None or p.op_type not in ("Div", "Mul") or len(p.inputs) != 2 or any(_const(i) for i in p.inputs):
        return False
    r = p.inputs[0].producer() if p.inputs[0] is not None else None
    if r is None or r.op_type != "Reshape" or r.inputs[0] is None:
        return False
    src, dst = r.inputs[0].shape, r.outputs[0].shape
    return src is not None and dst is not None and len(src) == 4 and len(dst) == 3


def _topk_feeding_sites(graph: ir.Graph, sites: Sequence[LinearSite]) -> dict[int, list[int]]:
    """{id(TopK node): [id(site node) of every linear site feeding its scores]}: walking back from each TopK's
    scores input through every non-constant input, stopping at linear sites (and not into Shape/Size)."""
    site_nodes = {id(s.node) for s in sites}
    out = {}
    for t in graph:
        if t.op_type != "TopK" or not t.inputs or t.inputs[0] is None:
            continue
        found, seen, stack = [], set(), [t.inputs[0]]
        while stack:
            p = stack.pop().producer()
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in site_nodes:
                found.append(id(p))
                continue
            if p.op_type in ("Shape", "Size"):
                continue
            stack.extend(i for i in p.inputs if i is not None and not _const(i))
        out[id(t)] = found
    return out


def _is_fused_router_input(node: ir.Node, index: int) -> bool:
    """The gate logits after passes/moe_lowering.py "ort-fused": MoEGroupRouter's input, or MoE/QMoE's
    router_probs (input 1; the V2 softmax-greedy router)."""
    if node.domain != "com.microsoft":
        return False
    return node.op_type == "MoEGroupRouter" or (node.op_type in ("MoE", "QMoE") and index == 1)


def _lm_head_nodes(graph: ir.Graph, logits_outputs: Sequence[str]) -> set[int]:
    out = set()
    for v in graph.outputs:
        if v.name not in logits_outputs:
            continue
        p = v.producer()
        while p is not None and p.op_type in _PASS_THROUGH:
            p = p.inputs[0].producer() if p.inputs and p.inputs[0] is not None else None
        if p is not None and p.op_type in ("MatMul", "Gemm"):
            out.add(id(p))
    return out


def find_linear_sites(graph: ir.Graph, logits_outputs: Sequence[str] = ("logits",)) -> list[LinearSite]:
    """Every linear site of `graph` in graph order, each with its role (module docstring)."""
    sites = [s for n in graph for s in [_site(n)] if s is not None]
    names = [v.name for v in graph.outputs]
    heads = _lm_head_nodes(graph, [n for n in logits_outputs if n in names] or names[:1])
    swiglu_in: dict[int, str] = {}  # id(value) -> "gate"/"up" for SwiGLU operands; id(product) -> "product"
    for n in graph:
        if n.op_type != "Mul" or len(n.inputs) != 2:
            continue
        for silu, other in ((n.inputs[0], n.inputs[1]), (n.inputs[1], n.inputs[0])):
            p = silu.producer() if silu is not None else None
            a = _is_silu_product(p) if p is not None else None
            if a is not None and other is not None:
                swiglu_in[id(a)] = "gate"
                swiglu_in[id(other)] = "up"
                swiglu_in[id(n.outputs[0])] = "product"
                for v, part in ((a, "gate"), (other, "up")):  # DeepSeek-V4's swiglu_limit: Clip before the SwiGLU
                    c = v.producer()
                    if c is not None and c.op_type == "Clip" and c.inputs and c.inputs[0] is not None:
                        swiglu_in[id(c.inputs[0])] = part
    def is_router(s: LinearSite) -> bool:
        out = s.node.outputs[0]
        return (any(u.op_type in ("Sigmoid", "Softmax") and _reaches_topk(u.outputs[0]) for u, _ in out.uses())
                or any(_is_fused_router_input(u, i) for u, i in out.uses()) or _is_sqrtsoftplus_router(out))

    routers = {id(s.node) for s in sites if id(s.node) not in heads and is_router(s)}
    indexer = {n for fed in _topk_feeding_sites(graph, sites).values() if not routers.intersection(fed) for n in fed}
    for s in sites:
        out = s.node.outputs[0]
        if id(s.node) in heads:
            s.role = "lm_head"
        elif id(s.node) in routers:
            s.role = "router"
        elif _is_hc_mix(s):
            s.role = "hc"
        elif id(s.node) in indexer:
            s.role = "indexer"
        elif (id(out) in swiglu_in or swiglu_in.get(id(s.activation)) == "product"
              or any(u.op_type == "Split" and any(id(o) in swiglu_in for o in u.outputs) for u, _ in out.uses())):
            # (the last: a packed gate_up projection split into the SwiGLU's gate and up, DeepSeek-V4's experts)
            s.role = "mlp"
        else:
            s.role = "attention"
    return sites


def _excluded(site: LinearSite, exclude: Iterable[str]) -> str | None:
    for pat in exclude:
        if pat == site.role:
            return f"role {site.role} excluded"
        if pat not in ROLES and (fnmatch.fnmatchcase(site.node.name or "", pat)
                                 or fnmatch.fnmatchcase(site.weight.name or "", pat)):
            return f"matches exclude pattern {pat!r}"
    return None


def select_sites(graph: ir.Graph, exclude: Iterable[str] = DEFAULT_EXCLUDE, logits_outputs=("logits",),
                 report: QuantReport | None = None) -> list[list[LinearSite]]:
    """Sites to quantize, grouped by weight initializer (one group per weight, in graph order).

    A weight is skipped (kept fp32, recorded in `report.skipped`) when one of its sites is
    excluded or when anything other than a linear site uses it.
    """
    exclude = tuple(exclude)
    unknown = [p for p in exclude if not isinstance(p, str)]
    if unknown:
        raise QuantizationError(f"exclude entries must be roles ({', '.join(ROLES)}) or name patterns, got {unknown}")
    sites = find_linear_sites(graph, logits_outputs)
    groups: dict[int, list[LinearSite]] = {}
    for s in sites:
        groups.setdefault(id(s.weight), []).append(s)
    chosen = []
    for group in groups.values():
        w = group[0].weight
        reason = next((r for s in group for r in [_excluded(s, exclude)] if r), None)
        users = {id(u) for u, _ in w.uses()}
        linear_users = {id(s.transpose or s.node) for s in group}
        if reason is None and users != linear_users:
            reason = "weight also used by non-linear nodes"
        if reason is None and len({s.weight_is_oi for s in group}) != 1:
            reason = "weight used in two orientations"
        if reason:
            if report is not None:
                report.skipped.extend({"node": s.node.name, "weight": w.name, "role": s.role, "reason": reason}
                                      for s in group)
            continue
        chosen.append(group)
    return chosen


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(array)
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    tensor.name = name
    v = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(v)
    return v


def const_bytes(values: Iterable[ir.Value]) -> int:
    return sum(v.const_value.nbytes for v in values)


def set_opset(model: ir.Model, domain: str, version: int) -> None:
    """Require at least `version` of `domain` (the default domain's ops used here are unchanged 20 -> 21)."""
    if model.opset_imports.get(domain, 0) < version:
        model.opset_imports[domain] = version
        if model.graph.opset_imports.get(domain, 0) < version:
            model.graph.opset_imports[domain] = version


def remove_if_unused(graph: ir.Graph, *values: ir.Value) -> None:
    for v in values:
        if v is None:
            continue
        p = v.producer()
        if p is not None and not any(o.uses() for o in p.outputs) and not any(o.is_graph_output() for o in p.outputs):
            graph.remove(p, safe=True)
        if v.is_initializer() and not v.uses() and not v.is_graph_output():
            graph.initializers.pop(v.name, None)


def record(model: ir.Model, report: QuantReport) -> None:
    """Store the report's summary in the model's metadata (goes into the saved ONNX file)."""
    model.metadata_props[METADATA_KEY] = json.dumps(
        {"scheme": report.scheme, "n_quantized": len(report.quantized), "n_skipped": len(report.skipped),
         "linear_bytes_before": report.linear_bytes_before, "linear_bytes_after": report.linear_bytes_after,
         "weights_bytes_before": report.weights_bytes_before, "weights_bytes_after": report.weights_bytes_after},
        sort_keys=True)


def round_scale(scale: np.ndarray, scale_dtype: str) -> np.ndarray:
    """scale_dtype "float16": the nearest fp16 value (kept in fp32; 0 -> smallest fp16 subnormal)."""
    if scale_dtype == "float32":
        return scale
    tiny = np.float32(np.finfo(np.float16).smallest_subnormal)
    s16 = np.minimum(scale, np.float32(np.finfo(np.float16).max)).astype(np.float16).astype(np.float32)
    return np.where(s16 > 0, s16, tiny).astype(np.float32)


# ---- 4-bit codes (MatMulNBits bits=4 in quant_int4.py, QMoE 4-bit in quant_qmoe.py) --------------------
def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero) of float32 values, exactly (float64 holds |x| + 0.5 exactly here)."""
    x = x.astype(np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


INT4_SCALE_DTYPES = ("float32", "float16")


def round_scale_signed(scale: np.ndarray, scale_dtype: str) -> np.ndarray:
    """scale_dtype "float16": the nearest fp16 value, kept in fp32 (sign kept: symmetric scales may be negative;
    a non-zero scale that rounds to 0 becomes the smallest fp16 subnormal of its sign; 0 stays 0)."""
    if scale_dtype == "float32":
        return scale
    if scale_dtype not in INT4_SCALE_DTYPES:
        raise QuantizationError(f"int4 scale_dtype {scale_dtype!r}: choose one of {', '.join(INT4_SCALE_DTYPES)}")
    big = np.float32(np.finfo(np.float16).max)
    s16 = np.clip(scale, -big, big).astype(np.float16).astype(np.float32)
    tiny = np.float32(np.finfo(np.float16).smallest_subnormal)
    return np.where((s16 == 0) & (scale != 0), np.copysign(tiny, scale), s16).astype(np.float32)


def int4_codes(blocks: np.ndarray, symmetric: bool, scale_dtype: str = "float32"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fp32 [..., bs] blocks -> (codes uint8 [..., bs] in 0..15, scales fp32 [...], zero points uint8 [...]).

    The MLAS round-to-nearest formulas of passes/quant_int4.py's docstring (shared with QMoE 4-bit); callers zero-pad partial blocks (zeros never
    change lo/hi, which include 0 anyway, nor the largest magnitude). scale_dtype "float16" (ort-cuda, whose
    MatMulNBits takes scales in the activations' type): each scale is rounded to fp16 first and the zero point
    and codes are computed against it, so a later fp16 conversion of the scales changes no dequantized weight."""
    blocks = blocks.astype(np.float32, copy=False)
    bmax, bmin = blocks.max(-1), blocks.min(-1)
    if symmetric:
        m = np.where(np.abs(bmax) > np.abs(bmin), bmax, bmin)
        scale = round_scale_signed((-m / np.float32(8)).astype(np.float32), scale_dtype)
        zp = np.full(scale.shape, 8, np.float32)
    else:
        lo, hi = np.minimum(bmin, np.float32(0)), np.maximum(bmax, np.float32(0))
        scale = round_scale_signed(((hi - lo) / np.float32(15)).astype(np.float32), scale_dtype)
        nz = scale != 0
        zfp = np.where(nz, np.float32(0) - lo / np.where(nz, scale, np.float32(1)), lo).astype(np.float32)
        zp = np.clip(_roundf(zfp), 0, 15).astype(np.float32)
    nz = scale != 0
    recip = np.where(nz, np.float32(1) / np.where(nz, scale, np.float32(1)), np.float32(0)).astype(np.float32)
    v = (blocks * recip[..., None]).astype(np.float32) + zp[..., None]
    q = np.clip(_roundf(v.astype(np.float32)), 0, 15).astype(np.uint8)
    return q, scale, zp.astype(np.uint8)


def pack_nibbles(codes: np.ndarray, pad: int = 0) -> np.ndarray:
    """uint8 codes [..., L] -> uint8 [..., ceil(L/2)]: element 2j in the low nibble of byte j, 2j+1 in the
    high one (an odd L's missing last element is `pad`)."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.full(codes.shape[:-1] + (1,), pad, np.uint8)], -1)
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


# ---- routed experts exported one MatMul per expert (DeepSeek-V4: models/v4_moe.py Experts) -------------------------
def split_expert_tables(graph: ir.Graph) -> int:
    """Make each expert's weight its own 2-D initializer, so its MatMul is a linear site (in place; -> number of
    slices). DeepSeek-V4's routed experts are exported as `MatMul(x, Transpose(Gather(table [E, out, in], e)))` with a
    constant scalar e (every expert on every token, models/v4_moe.py; moe-ort-fused does not run for V4): each such
    Gather along axis 0 of an fp32 rank-3 initializer at a constant scalar index becomes the initializer
    `{table}.{e}` [out, in], and the table is dropped once nothing reads it. The numbers are unchanged (a slice)."""
    n, tables = 0, []
    for node in list(graph):
        if node.op_type != "Gather" or node.domain != "" or len(node.inputs) != 2 or _attr(node, "axis", 0) != 0:
            continue
        table, index = node.inputs
        if (not _const(table) or table.dtype != ir.DataType.FLOAT or table.shape is None or len(table.shape) != 3
                or index is None):
            continue
        idx = ir.convenience.get_const_tensor(index)
        if idx is None or idx.numpy().ndim != 0:
            continue
        e = int(idx.numpy())
        w = add_initializer(graph, f"{table.name}.{e}", np.ascontiguousarray(table.const_value.numpy()[e]))
        ir.convenience.replace_all_uses_with(node.outputs[0], w)
        graph.remove(node, safe=True)
        tables.append(table)
        n += 1
    for t in {id(t): t for t in tables}.values():
        remove_if_unused(graph, t)
    return n
