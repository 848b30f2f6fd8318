"""ort-cuda `--quant int4`: MatMulNBits 4-bit (RTN, block 32 with zero points) with fp16 activations and fp16 scales,
the attention linears 8-bit, routed experts com.microsoft.QMoE 4-bit per block where CUDA's QMoE takes them.

CPU side (tiny, and a hand-built MoE of CUDA-sized experts): the quantize -> fp16 order gives fp16 scales whose codes
and zero points are an independent numpy RTN exactly; ORT CPU runs the fp16 MatMulNBits 4-bit and the fp16 QMoE 4-bit
(its x86 kernels convert fp16 around fp32 arithmetic) as numpy does with the dequantized weights; the budget mirrors
quantize-int4; the package builds without a GPU and re-verifies on ORT CPU; a fault (one layer's scales x2) fails the
fp16 judgement. GPU side (marked gpu; skipped without onnxruntime-gpu): tests/test_ort_cuda_quant_gpu.py.
"""
from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from passes.ir_external import session_from_model
from targets import ort_cuda

F16, F32, U8 = ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.UINT8


def _load(blob: bytes) -> ir.Model:
    import onnx
    return ir.from_proto(onnx.load_from_string(blob))


def _session(m: ir.Model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level, so.intra_op_num_threads = 3, 1
    return session_from_model(m, so)  # a package graph's weights are in onnx/weights.data: ORT is told the folder


# ---- an independent numpy RTN with fp16 scales (written from MatMulNBits' schema and MLAS's formulas) ---------
def ref_int4_fp16(w_oi: np.ndarray, bs: int):
    """fp32 [N, K] (K a multiple of bs) -> (codes uint8 [N, K], fp16 scales [N, K/bs], zero points uint8 [N, K/bs],
    dequantized fp32 [N, K]): lo/hi include 0, scale = fp16((hi - lo) / 15), zp = roundf(-lo / scale),
    q = clip(roundf(w * (1 / scale) + zp), 0, 15), roundf half away from zero."""
    n, k = w_oi.shape
    b = w_oi.reshape(n, k // bs, bs).astype(np.float32)
    lo, hi = np.minimum(b.min(-1), 0).astype(np.float32), np.maximum(b.max(-1), 0).astype(np.float32)
    s16 = ((hi - lo) / np.float32(15)).astype(np.float16)
    s = s16.astype(np.float32)
    assert (s > 0).all()  # random weights: no all-zero block
    roundf = lambda v: np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # noqa: E731
    zp = np.clip(roundf(-lo / s), 0, 15)
    q = np.clip(roundf((b * (np.float32(1) / s)[..., None]).astype(np.float32) + zp[..., None]), 0, 15)
    return (q.reshape(n, k).astype(np.uint8), s16, zp.astype(np.uint8),
            ((q - zp[..., None]) * s[..., None]).reshape(n, k).astype(np.float32))


def unpack(packed: np.ndarray, length: int) -> np.ndarray:
    """uint8 [..., L/2] (element 2j low nibble, 2j+1 high) -> uint8 [..., length]."""
    return np.stack([packed & 0xF, packed >> 4], -1).reshape(*packed.shape[:-1], -1)[..., :length]


def test_int4_then_fp16_is_the_numpy_rtn_with_fp16_scales(tiny_cuda_graphs):
    """Every 4-bit MatMulNBits of tiny's fp16 graphs: fp16 A and scales, uint8 B and packed zero points, block 32,
    codes / scales / zero points = the numpy RTN with fp16 scales; the attention linears 8-bit; the router gate an
    fp32 MatMul, lm_head an fp16 MatMul; tiny's experts (moe_intermediate 32) stay fp16 MoE, each recorded."""
    from passes.quant_weights import find_linear_sites
    blob = tiny_cuda_graphs["prefill"]
    before = {s.weight.name: s.weight_oi for s in find_linear_sites(_load(blob).graph)}
    m = _load(blob)
    rep = ort_cuda.quantize_int4(m)
    ort_cuda.to_fp16(m)
    sites = [s for s in rep.quantized if s["role"] != "routed_experts"]
    assert {s["bits"] for s in sites if s["role"] == "attention"} == {8}
    four = [s for s in sites if s["bits"] == 4]
    assert four and {s["role"] for s in four} >= {"mlp"} and {s["block_size"] for s in four} == {32}
    nodes = {n.name: n for n in m.graph if n.op_type == "MatMulNBits"}
    for site in four:
        node = nodes[f"{site['nodes'][0]}.int4"]
        a, b, scales, zp = node.inputs[:4]
        assert (a.dtype, b.dtype, scales.dtype, zp.dtype) == (F16, U8, F16, U8)  # what CUDA's MatMulNBits takes
        n_out, k = site["shape_oi"]
        assert {x: node.attributes[x].value for x in ("bits", "block_size", "K", "N")} == {
            "bits": 4, "block_size": 32, "K": k, "N": n_out}
        assert "accuracy_level" not in node.attributes  # weight-only (CUDA keeps fp16 activations)
        q, s16, z, _ = ref_int4_fp16(before[site["weight"]], 32)
        np.testing.assert_array_equal(unpack(b.const_value.numpy(), 32).reshape(n_out, k), q)
        np.testing.assert_array_equal(scales.const_value.numpy().reshape(s16.shape), s16)
        np.testing.assert_array_equal(unpack(zp.const_value.numpy().reshape(n_out, -1), k // 32), z)
    assert not any(n.op_type == "QMoE" for n in m.graph)
    kept = [x for x in rep.skipped if x["role"] == "routed_experts"]
    assert len(kept) == 2 and all("moe_intermediate 32 is not a multiple of 64" in x["reason"] for x in kept)
    assert all(n.inputs[2].dtype == F16 for n in m.graph if n.op_type == "MoE")
    for r in [s for s in rep.skipped if s["role"] == "router"]:
        assert next(n for n in m.graph if n.name == r["node"]).outputs[0].dtype == F32


@pytest.mark.parametrize("bs", [32, 128])
def test_fp16_matmulnbits_4bit_runs_on_ort_cpu_as_numpy(bs):
    """One linear of K = 256 quantized with ort-cuda's 4-bit options (block 32, or 128: the other block
    quantize_int4 takes) and stored as to_fp16 stores it: ORT CPU's fp16 MatMulNBits 4-bit gives
    fp16(x) @ dequant(W)^T to fp16 output rounding."""
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    rng = np.random.default_rng(bs)
    w = (rng.standard_normal((48, 256)) / 16).astype(np.float32)
    x = rng.standard_normal((5, 256)).astype(np.float32).astype(np.float16)
    # (a MatMul feeding a graph output directly is taken for lm_head and kept: a Neg after it)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["h"]), h.make_node("Neg", ["h"], ["y"])], "mm",
                     [h.make_tensor_value_info("x", TP.FLOAT, [5, 256])], [h.make_tensor_value_info("y", TP.FLOAT, [5, 48])],
                     [nh.from_array(np.ascontiguousarray(w.T), "w")])
    m = ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 20)], ir_version=10))
    from passes.quantize import quantize
    opts = {k: v for k, v in ort_cuda.INT4_OPTIONS.items() if k not in ("experts", "attention_bits")}
    rep = quantize(m, "int4", experts="none", **{**opts, "block_size": bs})  # a lone linear's role is "attention"
    assert rep.quantized[0]["block_size"] == bs and rep.quantized[0]["bits"] == 4
    node = next(n for n in m.graph if n.op_type == "MatMulNBits")
    for v in node.inputs[2:3]:  # the scales stored fp16 (exact), as to_fp16 stores them
        v.const_value = ir.tensor(v.const_value.numpy().astype(np.float16), name=v.name)
        v.dtype = F16
    m.graph.inputs[0].dtype = node.outputs[0].dtype = m.graph.outputs[0].dtype = F16
    got = -_session(m).run(None, {"x": x})[0]
    assert got.dtype == np.float16
    _, _, _, deq = ref_int4_fp16(w, bs)
    want = x.astype(np.float32) @ deq.T
    np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-3 * np.abs(want).max(), rtol=2e-3)
    assert np.abs(want - x.astype(np.float32) @ w.T).max() > 1e-2  # and it is not the fp32 weight


# ---- routed experts of a CUDA QMoE shape (hidden 128, moe_intermediate 64: trained-small's) ------------------
EH, EI, EE, EK, ET = 128, 64, 4, 2, 6  # hidden, moe_intermediate, experts, top-k, tokens


def _moe_graph(fc1: np.ndarray, fc2: np.ndarray) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape(["n", EH]), type=ir.TensorType(F32))
    p = ir.Value(name="router_probs", shape=ir.Shape(["n", EE]), type=ir.TensorType(F32))
    inits = [ir.Value(name=nm, shape=ir.Shape(a.shape), type=ir.TensorType(F32), const_value=ir.tensor(a, name=nm))
             for nm, a in (("moe.fc1_experts_weights", fc1), ("moe.fc2_experts_weights", fc2))]
    node = ir.node("MoE", [x, p, inits[0], None, inits[1]], dict(
        k=EK, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=0, activation_alpha=1.0,
        activation_beta=0.0, use_sparse_mixer=0), domain="com.microsoft", name="moe.0/moe")
    node.outputs[0].name, node.outputs[0].dtype = "y", F32
    g = ir.Graph([x, p], node.outputs, nodes=[node], initializers=inits, opset_imports={"": 20, "com.microsoft": 1})
    return ir.Model(g, ir_version=10)


def _to_fp16_io(m: ir.Model) -> None:
    """What to_fp16 does to a QMoE computing in fp16 (activations and float initializers fp16; this graph has no
    token-stream inputs for to_fp16 to find)."""
    for v in m.graph.initializers.values():
        if v.dtype == F32:
            v.const_value = ir.tensor(v.const_value.numpy().astype(np.float16), name=v.name)
            v.dtype = F16
    for v in [*m.graph.inputs, *m.graph.outputs]:
        v.dtype = F16


def qmoe_int4_case(check=lambda *a: None):
    """An MoE of trained-small's expert shape through quantize_int4, stored fp16 as to_fp16 stores it: (model,
    feeds, the QMoE node, numpy DeepSeekMoE with the dequantized 4-bit weights, the same with the fp32 weights,
    tolerance). check(node, fc1, fc2) runs on the quantized node before the fp16 storage."""
    rng = np.random.default_rng(3)
    fc1 = (rng.standard_normal((EE, 2 * EI, EH)) / 11).astype(np.float32)
    fc2 = (rng.standard_normal((EE, EH, EI)) / 8).astype(np.float32)
    m = _moe_graph(fc1, fc2)
    rep = ort_cuda.quantize_int4(m)
    assert rep.quantized[-1]["role"] == "routed_experts" and rep.quantized[-1]["bits"] == 4
    (node,) = [n for n in m.graph if n.op_type == "QMoE"]
    check(node, fc1, fc2)
    deq = []
    for i_w, i_s, i_z in ((2, 3, 11), (5, 6, 12)):
        packed, s, zp = (node.inputs[i].const_value.numpy() for i in (i_w, i_s, i_z))
        e, n, half = packed.shape
        codes, zps = unpack(packed, 2 * half).astype(np.float32), unpack(zp, s.shape[-1]).astype(np.float32)
        deq.append(((codes.reshape(e, n, -1, 32) - zps[..., None]) * s[..., None]).reshape(e, n, 2 * half))
    _to_fp16_io(m)
    x = rng.standard_normal((ET, EH)).astype(np.float16)
    logits = rng.standard_normal((ET, EE)).astype(np.float32)
    ids = np.argsort(-logits, 1)[:, :EK]
    w_sel = np.take_along_axis(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), ids, 1)
    w_sel = w_sel / w_sel.sum(1, keepdims=True)
    probs = np.full((ET, EE), -np.inf, np.float32)
    np.put_along_axis(probs, ids, np.log(w_sel), 1)

    def numpy_moe(fc1_d, fc2_d):
        out = np.zeros((ET, EH), np.float32)
        for t in range(ET):
            for wk, e in zip(w_sel[t], ids[t]):
                a = fc1_d[e] @ x[t].astype(np.float32)
                g, u = a[0::2], a[1::2]
                out[t] += wk * (fc2_d[e] @ (g / (1 + np.exp(-g)) * u))
        return out

    want = numpy_moe(*deq)
    return (m, {"x": x, "router_probs": probs.astype(np.float16)}, node, want, numpy_moe(fc1, fc2),
            5e-3 * np.abs(want).max(), ids)


def test_qmoe_4bit_fp16_experts_are_the_numpy_moe_on_ort_cpu():
    """quantize_int4 on an MoE of trained-small's expert shape: QMoE expert_weight_bits 4, block 32, zero points,
    fp16-exact scales, raw layout, no router_weights; each expert's codes / scales / zero points are the numpy RTN,
    and ORT CPU's fp16 QMoE is the numpy DeepSeekMoE with the dequantized weights (log-weight routing, -inf outside
    the chosen experts, as the ort-cuda router writes it). An expert's fc2 scales x2 is caught."""
    def check(node, fc1, fc2):
        assert {k: node.attributes[k].value for k in ("expert_weight_bits", "weights_prepacked", "block_size",
                                                      "quant_type")} == {
            "expert_weight_bits": 4, "weights_prepacked": 0, "block_size": 32, "quant_type": "int"}
        assert len(node.inputs) == 13 and node.inputs[11] is not None and node.inputs[12] is not None  # no router_weights
        for i_w, i_s, i_z, wt in ((2, 3, 11, fc1), (5, 6, 12, fc2)):
            e, n, k = wt.shape
            ref = [ref_int4_fp16(wt[i], 32) for i in range(e)]
            np.testing.assert_array_equal(unpack(node.inputs[i_w].const_value.numpy(), k), np.stack([r[0] for r in ref]))
            np.testing.assert_array_equal(node.inputs[i_s].const_value.numpy(), np.stack([r[1] for r in ref]).astype(np.float32))
            np.testing.assert_array_equal(unpack(node.inputs[i_z].const_value.numpy(), k // 32), np.stack([r[2] for r in ref]))

    m, feeds, node, want, want_fp32, tol, ids = qmoe_int4_case(check)
    got = _session(m).run(None, feeds)[0].astype(np.float32)
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    assert np.abs(want - want_fp32).max() > 10 * tol  # the 4-bit weights, not the fp32 ones
    s = node.inputs[6].const_value.numpy().copy()
    s[ids[0, 0]] *= 2
    node.inputs[6].const_value = ir.tensor(s, name=node.inputs[6].name)
    bad = _session(m).run(None, feeds)[0].astype(np.float32)
    assert np.abs(bad - want).max() > 10 * tol


def test_qmoe_shapes_cuda_refuses_stay_fp16_moe():
    assert ort_cuda.cuda_qmoe_int4_problem(128, 64, 32) == (32, None)
    assert ort_cuda.cuda_qmoe_int4_problem(1024, 512, 128) == (128, None)
    assert "moe_intermediate 32 is not a multiple of 64" in ort_cuda.cuda_qmoe_int4_problem(64, 32, 32)[1]
    assert "hidden 96" in ort_cuda.cuda_qmoe_int4_problem(96, 64, 32)[1]
    from passes.quant_weights import QuantizationError
    with pytest.raises(QuantizationError, match="block_size 64"):
        ort_cuda.quantize_int4(_moe_graph(np.zeros((EE, 2 * EI, EH), np.float32), np.zeros((EE, EH, EI), np.float32)),
                               block_size=64)


def test_int4_budget_mirrors_quantize_int4():
    from pipeline.parity import BUDGETS, quant_fp16_limits
    from targets.ort_cuda.build import QUANT_STAGES
    assert QUANT_STAGES["int4"] == "target-ort-cuda-int4"
    assert BUDGETS["target-ort-cuda-int4"] == BUDGETS["quantize-int4"]
    lim = quant_fp16_limits(BUDGETS["quantize-int4"], BUDGETS["target-ort-cuda-fp16"])
    assert lim.min_cosine < BUDGETS["quantize-int4"].min_cosine and lim.max_kl > BUDGETS["quantize-int4"].max_kl
    assert "int4" in ort_cuda.PROFILE.quant_schemes


# ---- the package, and a fault the fp16 judgement must catch ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_int4_package(tmp_path_factory):
    from pipeline.compile import compile_package
    return compile_package("tiny", "ort-cuda", tmp_path_factory.mktemp("i4") / "pkg", quant="int4",
                           progress=lambda m: None, use_cache=False, gen_tokens=8)


def test_int4_package_builds_without_gpu(tiny_int4_package):
    from pipeline.package import verify_package
    from runtime import cuda_runtime
    pkg = tiny_int4_package
    man = json.loads((pkg / "manifest.json").read_text())
    t = man["target"]
    assert man["parity"]["passed"] and t["quantization"] == "int4" and t["precision"] == "fp16"
    assert t["quantization_options"] == ort_cuda.INT4_OPTIONS and "QMoE 4-bit" in t["routed_experts"]
    assert t["routed_expert_ops"] == {"QMoE": 0, "MoE": 2} and t["verified_with"] is None
    assert any(s.startswith("not yet run on a GPU") for s in man["verification"]["not_verified"])
    stages = {s["name"]: s for s in man["stages"]}
    assert stages["quantize"]["params"] == {"scheme": "int4", **ort_cuda.INT4_OPTIONS}
    judged = [r for s in man["stages"] for r in s["parity"]]
    assert any(r["stage"].startswith("quantize-int4/") for r in judged)
    int4 = [r for r in judged if r["stage"].startswith("target-ort-cuda-int4/")]
    assert {r["stage"].split("/")[1] for r in int4} == {"prefill", "prefill-chunk", "decode", "greedy"}
    assert all(r["passed"] for r in int4 if r["binding"])
    dec = ir.load(pkg / "onnx" / "decode.onnx")
    mm = [n for n in dec.graph if n.op_type == "MatMulNBits"]
    assert {n.attributes["bits"].value for n in mm} == {4, 8} and all(n.inputs[2].dtype == F16 for n in mm)
    assert all(len(n.inputs) == 4 and n.inputs[3].dtype == U8 for n in mm if n.attributes["bits"].value == 4)
    ref = man["golden"]["fp32_reference"]
    assert ref["stage"] == "target-ort-cuda-int4" and set(ref["limits"]) == {"prefill", "prefill-chunk", "decode",
                                                                           "greedy"}
    readme = (pkg / "README.md").read_text()
    assert "## int4 judgement" in readme and "MatMulNBits` (bits 4" in readme and "not yet run on a GPU" in readme
    failures, _ = cuda_runtime.verify_golden(pkg, device="cpu")
    assert failures == [], failures
    assert verify_package(pkg) == []


def _judge_prefill(graph: ir.Model, model, golden) -> object:
    """The build's fp16 judgement (targets/ort_cuda/build.py _fp16_cases) of the prefill case."""
    from pipeline import fp16_reference
    from pipeline.parity import BUDGETS, compare_fp16
    from runtime import cuda_runtime
    case = next(c for c in golden.cases if c.name == "prefill")
    sess = _session(graph)
    types = {i.name: cuda_runtime._ORT_TYPES[i.type] for i in sess.get_inputs()}
    got = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, {n: np.asarray(a).astype(types[n]) for n, a in case.inputs.items()})))
    return compare_fp16("target-ort-cuda-int4/prefill", case.outputs,
                        {n: got[n].astype(np.float32) for n in case.outputs},
                        fp16_reference.case_outputs(model, case.inputs, "latent"), logits_outputs=["logits"],
                        budget=BUDGETS["target-ort-cuda-fp16"], quant_budget=BUDGETS["quantize-int4"])


def test_one_layers_scales_doubled_fails_the_fp16_int4_judgement(tiny_int4_package):
    """The package's own fp16 prefill graph passes; with the scales of one layer's 4-bit MatMulNBits (layer 1's
    shared-expert MLP) x2 it fails, and so it does with layer 0's attention or dense-MLP (8-bit) scales x2."""
    import models
    from pipeline.golden import make_golden
    model = models.load("tiny", seed=0)
    golden = make_golden(model, "latent", gen_tokens=2, seed=0)
    path = tiny_int4_package / "onnx" / "prefill.onnx"
    assert _judge_prefill(ir.load(path), model, golden).passed

    def doubled(layer: int, part: str, bits: int) -> ir.Model:
        m = ir.load(path)
        mnb = [n for n in m.graph if n.op_type == "MatMulNBits"]  # graph order: 5 attention, then 3 MLP, per layer
        hit = mnb[8 * layer: 8 * layer + 5] if part == "attention" else mnb[8 * layer + 5: 8 * layer + 8]
        assert [n.attributes["bits"].value for n in hit] == [bits] * len(hit)
        for n in hit:
            v = n.inputs[2]
            v.const_value = ir.tensor(v.const_value.numpy() * np.float16(2), name=v.name)
        return m

    # layer 1's shared-expert MLP (4-bit), layer 0's attention (8-bit), layer 0's dense MLP (8-bit: dense_mlp_bits)
    for layer, part, bits in ((1, "mlp", 4), (0, "attention", 8), (0, "mlp", 8)):
        rep = _judge_prefill(doubled(layer, part, bits), model, golden)
        assert not rep.passed, [(o.name, o.cosine) for o in rep.outputs]
