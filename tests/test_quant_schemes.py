"""Quantization schemes on a small hand-built graph (no export): roles, exclusions, and each scheme's
dequantized weights against an independent numpy implementation of the scheme, exactly.

The numpy quantizers below are written from the schemes' definitions (passes/quant_*.py docstrings,
DeepSeek-V3's FP8 format, MatMulNBits' schema), not by calling the passes' helpers. What the graph
computes is read by running the dequantizing nodes on ONNX Runtime (fp8, w8a8) or MatMulNBits with
an identity activation (int8).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from passes.quant_fp8 import Fp8WeightPass
from passes.quant_int8 import Int8WeightOnlyPass
from passes.quant_w8a8 import CalibrationError, W8A8Pass, calibrate
from passes.quant_weights import QuantizationError, find_linear_sites
from passes.quantize import quantize

HID = 128


# ---- independent numpy references ---------------------------------------------------------------
def ref_int8(w_oi: np.ndarray, bs: int, scale_dtype=np.float32):
    """Symmetric per-block INT8 in MatMulNBits' storage: (uint8 [N, nb, bs], scales [N, nb] as scale_dtype,
    dequantized fp32). scale_dtype float16: amax/127 is rounded to fp16 first and quantized against (ort-cuda)."""
    n, k = w_oi.shape
    nb = -(-k // bs)
    wp = np.zeros((n, nb * bs), np.float32)
    wp[:, :k] = w_oi
    blk = wp.reshape(n, nb, bs)
    amax = np.max(np.abs(blk), axis=2)
    stored = (amax / np.float32(127)).astype(scale_dtype)
    stored[amax == 0] = 1
    scale = stored.astype(np.float32)
    q = np.clip(np.rint(blk / scale[:, :, None]), -127, 127).astype(np.int32) + 128
    deq = ((q - 128).astype(np.float32) * scale[:, :, None]).reshape(n, nb * bs)[:, :k]
    return q.astype(np.uint8), stored, deq


def ref_fp8(w_oi: np.ndarray):
    """DeepSeek-V3 FP8: 128x128 blocks, scale_inv = amax/448, e4m3 round-to-nearest-even."""
    n, k = w_oi.shape
    bo, bi = -(-n // 128), -(-k // 128)
    wp = np.zeros((bo * 128, bi * 128), np.float32)
    wp[:n, :k] = w_oi
    amax = np.abs(wp.reshape(bo, 128, bi, 128)).max(axis=(1, 3))
    s = (np.maximum(amax, np.float32(1e-12)) / np.float32(448)).astype(np.float32)
    full = np.repeat(np.repeat(s, 128, 0), 128, 1)[:n, :k]
    q = (w_oi / full).astype(ml_dtypes.float8_e4m3fn)
    return q, s, q.astype(np.float32) * full


def ref_w8(w_oi: np.ndarray):
    amax = np.abs(w_oi).max(1)
    s = np.where(amax > 0, amax / np.float32(127), 1).astype(np.float32)
    q = np.clip(np.rint(w_oi / s[:, None]), -127, 127).astype(np.int8)
    return q, s, q.astype(np.float32) * s[:, None]


def ref_a8_dynamic(x: np.ndarray) -> np.ndarray:
    s = (np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-8)) / np.float32(127)).astype(np.float32)
    return (np.clip(np.rint(x / s), -127, 127) * s).astype(np.float32)


def ref_a8_static(x: np.ndarray, amax: float) -> np.ndarray:
    s = np.float32(amax) / np.float32(127)
    return (np.clip(np.rint(x / s), -128, 127).astype(np.float32) * s).astype(np.float32)


# ---- the graph ----------------------------------------------------------------------------------
def _weights():
    rng = np.random.default_rng(1)
    w = lambda o, i: (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)  # noqa: E731
    return {"E": rng.standard_normal((256, HID)).astype(np.float32),
            "W1": w(96, HID),  # attention, MatMul [in, out]
            "W2": w(192, 96),  # attention, MatMul(Transpose([out, in]))
            "Wg": w(256, 192), "Wu": w(256, 192), "Wd": w(192, 256),  # SwiGLU, Gemm transB=1
            "Wr": w(8, 192),  # router
            "Wlm": w(256, 192)}  # lm_head


def build_graph() -> ir.Model:
    W = _weights()
    inits = [nh.from_array(W["E"], "E"), nh.from_array(W["W1"].T.copy(), "W1_io"), nh.from_array(W["W2"], "W2_oi"),
             nh.from_array(W["Wg"], "Wg"), nh.from_array(W["Wu"], "Wu"), nh.from_array(W["Wd"], "Wd"),
             nh.from_array(W["Wr"], "Wr"), nh.from_array(W["Wlm"].T.copy(), "Wlm_io"),
             nh.from_array(np.array([-1, 192], np.int64), "shape2d"), nh.from_array(np.array([2], np.int64), "k")]
    nodes = [
        h.make_node("Gather", ["E", "ids"], ["x"], name="embed"),
        h.make_node("MatMul", ["x", "W1_io"], ["h1"], name="q_like"),
        h.make_node("Transpose", ["W2_oi"], ["W2_t"], perm=[1, 0], name="w2_t"),
        h.make_node("MatMul", ["h1", "W2_t"], ["h2"], name="o_like"),
        h.make_node("Reshape", ["h2", "shape2d"], ["r"], name="flat"),
        h.make_node("Gemm", ["r", "Wg"], ["g"], transB=1, name="gate_proj"),
        h.make_node("Gemm", ["r", "Wu"], ["u"], transB=1, name="up_proj"),
        h.make_node("Sigmoid", ["g"], ["sg"]),
        h.make_node("Mul", ["g", "sg"], ["silu"]),
        h.make_node("Mul", ["silu", "u"], ["p"]),
        h.make_node("Gemm", ["p", "Wd"], ["d"], transB=1, name="down_proj"),
        h.make_node("Gemm", ["r", "Wr"], ["rl"], transB=1, name="router"),
        h.make_node("Sigmoid", ["rl"], ["rs"]),
        h.make_node("TopK", ["rs", "k"], ["topv", "topi"], name="topk"),
        h.make_node("MatMul", ["d", "Wlm_io"], ["logits"], name="lm_head"),
    ]
    g = h.make_graph(nodes, "synthetic", [h.make_tensor_value_info("ids", TP.INT64, ["b", "s"])],
                     [h.make_tensor_value_info("logits", TP.FLOAT, ["n", 256]),
                      h.make_tensor_value_info("topv", TP.FLOAT, ["n", 2])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 20)])
    m = onnx.shape_inference.infer_shapes(m)
    return ir.from_proto(m)


IDS = np.random.default_rng(2).integers(0, 256, (2, 5)).astype(np.int64)
EXPECTED_ROLES = {"q_like": "attention", "o_like": "attention", "gate_proj": "mlp", "up_proj": "mlp",
                  "down_proj": "mlp", "router": "router", "lm_head": "lm_head"}
QUANTIZED = {"W1": "W1_io", "W2": "W2_oi", "Wg": "Wg", "Wu": "Wu", "Wd": "Wd"}


def run(model: ir.Model, outputs: list[str], feeds=None) -> list[np.ndarray]:
    proto = ir.to_proto(model)
    have = {o.name for o in proto.graph.output}
    for n in outputs:
        if n not in have:
            proto.graph.output.append(h.make_tensor_value_info(n, TP.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds or {"ids": IDS})


def test_roles_found_from_the_graph_not_names():
    m = build_graph()
    roles = {s.node.name: s.role for s in find_linear_sites(m.graph)}
    assert roles == EXPECTED_ROLES
    # renaming every node and value changes nothing
    for i, n in enumerate(m.graph):
        n.name = f"n{i}"
    roles2 = [s.role for s in find_linear_sites(m.graph)]
    assert roles2 == list(EXPECTED_ROLES.values())


@pytest.mark.parametrize("scheme", ["int8", "fp8", "w8a8"])
def test_never_quantized_and_exclude(scheme):
    m = build_graph()
    rep = quantize(m, scheme)
    inits = m.graph.initializers
    for name in ("E", "Wr", "Wlm_io"):  # embedding, router, lm_head stay fp32 and untouched
        assert inits[name].const_value.dtype == ir.DataType.FLOAT
    assert {q["weight"] for q in rep.quantized} == set(QUANTIZED.values())
    assert {s["role"] for s in rep.skipped} == {"router", "lm_head"}
    for name in QUANTIZED.values():
        assert name not in inits  # the fp32 weight is gone
    # user exclusions: a role and a name pattern
    m2 = build_graph()
    rep2 = quantize(m2, scheme, exclude=("lm_head", "router", "mlp", "W1_*"))
    assert {q["weight"] for q in rep2.quantized} == {"W2_oi"}
    with pytest.raises(QuantizationError, match="unknown quantization scheme"):
        quantize(build_graph(), "int3")


def test_int8_matches_numpy_exactly():
    W = _weights()
    m = build_graph()
    p = Int8WeightOnlyPass(block_size=128)
    p(m)
    nodes = {n.name: n for n in m.graph if n.op_type == "MatMulNBits"}
    assert len(nodes) == 5
    for src, wname in QUANTIZED.items():
        node = next(n for n in nodes.values() if n.inputs[1].name.startswith(wname + "."))
        bs = node.attributes["block_size"].value
        assert bs & (bs - 1) == 0 and 16 <= bs <= 128
        assert node.attributes["bits"].value == 8
        assert node.attributes["K"].value == W[src].shape[1] and node.attributes["N"].value == W[src].shape[0]
        q, s, deq = ref_int8(W[src], bs)
        np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), q)
        np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), s.reshape(-1))
        assert len(node.inputs) == 3  # symmetric: zero point 128 is MatMulNBits' 8-bit default
        # what ORT computes: MatMulNBits(I) = dequant(B)^T
        K, N = W[src].shape[1], W[src].shape[0]
        single = h.make_model(h.make_graph(
            [h.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=8, block_size=bs)],
            "one", [h.make_tensor_value_info("A", TP.FLOAT, [K, K])], [h.make_tensor_value_info("Y", TP.FLOAT, [K, N])],
            [nh.from_array(q, "B"), nh.from_array(s.reshape(-1), "S")]),
            opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
        y = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"A": np.eye(K, dtype=np.float32)})[0]
        np.testing.assert_array_equal(y.T, deq)


def test_int8_asymmetric_has_zero_points():
    m = build_graph()
    Int8WeightOnlyPass(symmetric=False)(m)
    node = next(n for n in m.graph if n.op_type == "MatMulNBits")
    assert len(node.inputs) == 4 and node.inputs[3].const_value.dtype == ir.DataType.UINT8
    ref = build_graph()
    a, b = run(ref, ["logits"])[0], run(m, ["logits"])[0]
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_fp8_matches_numpy_exactly():
    W = _weights()
    m = build_graph()
    rep = quantize(m, "fp8")
    assert m.opset_imports[""] >= 21
    for src, wname in QUANTIZED.items():
        q, s, deq = ref_fp8(W[src])
        qv = m.graph.initializers[f"{wname}.fp8"].const_value
        assert qv.dtype == ir.DataType.FLOAT8E4M3FN
        assert qv.tobytes() == q.tobytes()
        np.testing.assert_array_equal(m.graph.initializers[f"{wname}.weight_scale_inv"].const_value.numpy(), s)
        got = run(m, [f"{wname}.dequantized"])[0]  # the Gather + DequantizeLinear part, on ORT
        np.testing.assert_array_equal(got, deq)
    assert rep.linear_ratio <= 0.27


def test_w8a8_weights_and_activations_match_numpy_exactly():
    W = _weights()
    m = build_graph()
    cal = calibrate(m, [{"ids": IDS}])
    assert set(cal) == {"x", "h1"}  # the attention linears' inputs
    rep = quantize(m, "w8a8", calibration=cal)
    for src, wname in QUANTIZED.items():
        q, s, deq = ref_w8(W[src])
        got = run(m, [f"{wname}.dequantized"])[0]
        oi = src in ("Wg", "Wu", "Wd")
        np.testing.assert_array_equal(got, deq if oi else deq.T)
    # activations: static for the attention linears, per-token dynamic for the SwiGLU ones
    # (each quantizer's input is read from the quantized graph itself: upstream layers are quantized too)
    x, h1, r, p, *got = run(m, ["x", "h1", "r", "p", "x.a8s.dq", "h1.a8s.dq", "r.a8.dq", "p.a8.dq"])
    np.testing.assert_array_equal(got[0], ref_a8_static(x, cal["x"]))
    np.testing.assert_array_equal(got[1], ref_a8_static(h1, cal["h1"]))
    np.testing.assert_array_equal(got[2], ref_a8_dynamic(r))
    np.testing.assert_array_equal(got[3], ref_a8_dynamic(p))
    assert "2 linear sites with static" in rep.notes[0]


def test_w8a8_without_calibration_is_all_dynamic():
    m = build_graph()
    rep = quantize(m, "w8a8")
    assert not any(n.op_type == "QuantizeLinear" for n in m.graph)
    assert any("no calibration given" in n for n in rep.notes)


def test_calibration_feeds_of_the_wrong_shape_are_refused():
    m = build_graph()
    with pytest.raises(CalibrationError, match="inputs"):
        calibrate(m, [{"input_ids": IDS}])
    with pytest.raises(CalibrationError, match="shape"):
        calibrate(m, [{"ids": IDS[0]}])
    with pytest.raises(CalibrationError, match="dtype"):
        calibrate(m, [{"ids": IDS.astype(np.float32)}])
    with pytest.raises(CalibrationError, match="at least one"):
        calibrate(m, [])


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_size_ratio(scheme):
    m = build_graph()
    rep = quantize(m, scheme)
    # K = 96, 128, 192, 256 here; int8 at block 128 (or the cheapest smaller block) and fp8 blocks
    assert rep.linear_ratio <= 0.27, rep.summary()
    assert rep.weights_bytes_after < rep.weights_bytes_before


def ref_act_fp8(x: np.ndarray) -> np.ndarray:
    """DeepSeek-V3 act_quant, per token per 128 channels (a partial last block zero-padded)."""
    k = x.shape[-1]
    nb = -(-k // 128)
    xp = np.zeros(x.shape[:-1] + (nb * 128,), np.float32)
    xp[..., :k] = x
    b = xp.reshape(-1, 128)
    s = (np.maximum(np.abs(b).max(-1, keepdims=True), np.float32(1e-4)) / np.float32(448)).astype(np.float32)
    q = (b / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s
    return q.reshape(xp.shape)[..., :k]


def test_fp8_dynamic_activations_match_numpy():
    """Fp8WeightPass(activations="dynamic"): every quantized site computes ref_act_fp8(x) @ deq(W)^T."""
    W = _weights()
    m = build_graph()
    rep = quantize(m, "fp8", activations="dynamic")
    assert any("at 4 distinct inputs" in n for n in rep.notes)  # x, h1, r (gate and up share it), p
    assert {q["activations"] for q in rep.quantized} == {"fp8 e4m3 dynamic per token per 128"}
    (x,) = run(build_graph(), ["x"])
    got_h1, got_h2, got_p, got_d = run(m, ["h1", "h2", "p", "d"])
    # each site on the quantized graph's own input: K=128 (one block), K=96 (a zero-padded partial
    # block), K=256 (two blocks)
    np.testing.assert_allclose(got_h1, ref_act_fp8(x) @ ref_fp8(W["W1"])[2].T, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_h2, ref_act_fp8(got_h1) @ ref_fp8(W["W2"])[2].T, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_d, ref_act_fp8(got_p) @ ref_fp8(W["Wd"])[2].T, atol=1e-5, rtol=0)
    with pytest.raises(QuantizationError, match="fp8 activations 'static'"):
        quantize(build_graph(), "fp8", activations="static")


def test_matmulnbits_accuracy_level_4_quantizes_activations_per_block():
    """What --int8-accuracy-level 4 means on ORT CPU: Y = q8(A per row per block) @ dequant(B)^T, where
    q8 is symmetric amax/127 round-half-even per block of the weight's block size (measured, exact)."""
    W = _weights()["Wd"]  # [192, 256]
    N, K, bs = W.shape[0], W.shape[1], 128
    q, s, deq = ref_int8(W, bs)
    a = np.random.default_rng(3).standard_normal((5, K)).astype(np.float32)
    blocks = a.reshape(5, K // bs, bs)
    sa = np.abs(blocks).max(-1, keepdims=True) / np.float32(127)
    aq = (np.rint(blocks / sa) * sa).reshape(5, K).astype(np.float32)
    for level, want in ((0, a @ deq.T), (4, aq @ deq.T)):
        single = h.make_model(h.make_graph(
            [h.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=8,
                         block_size=bs, accuracy_level=level)],
            "one", [h.make_tensor_value_info("A", TP.FLOAT, [5, K])], [h.make_tensor_value_info("Y", TP.FLOAT, [5, N])],
            [nh.from_array(q, "B"), nh.from_array(s.reshape(-1), "S")]),
            opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
        y = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
        np.testing.assert_allclose(y, want, atol=2e-5, rtol=0)
