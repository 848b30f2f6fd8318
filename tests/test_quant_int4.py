"""INT4 weight-only quantization (passes/quant_int4.py, QMoE 4-bit in passes/quant_qmoe.py) on ORT CPU.

Independent references, none of them the pass's own helpers:
  - onnxruntime's own `MatMulNBitsQuantizer` (default algorithm, RTN) on the same MatMul: the packed
    weights, scales and zero points must be its bytes exactly (blocks 32 and 128, K not a multiple of
    the block, symmetric and with zero points; an attention_bits=8 layer is test_quant_schemes' int8);
  - a numpy unpacking written here from MatMulNBits' schema (low nibble first, zero point 8 by default):
    ORT's output at accuracy_level 0 is x @ dequant(W)^T to float rounding; at level 4 it is that with
    x quantized to int8 per block (what the kernel does);
  - routed experts: ORT's `quantize_matmul_4bits` per expert (QMoE's raw layout is "as produced by
    quantize_matmul_4bits") and a numpy DeepSeekMoE (tests/test_quant_qmoe.py) with those weights;
  - injected faults (swapped nibbles, scales shifted by one block) make the same checkers fail;
  - tiny through the ort-cpu passes: int4 is judged routing-aware against the fp32 graphs (the numbers
    are printed for the record and behind the suggested quantize-int4 budget).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh
from onnxruntime.capi._pybind_state import quantize_matmul_4bits
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from passes.quant_qmoe import QMoEPass
from passes.quant_weights import QuantizationError, QuantReport
from passes.quantize import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_quant_qmoe as qm  # noqa: E402  (numpy DeepSeekMoE, router, the hand-built com.microsoft.MoE)
from test_quant_qmoe import moe_case  # noqa: E402,F401  (the hand-built MoE case, a module fixture)
from test_quant_schemes import QUANTIZED, _weights, build_graph  # noqa: E402

logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
MS = [h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)]


# ---- independent references -----------------------------------------------------------------------
def matmul_model(w_kn: np.ndarray) -> onnx.ModelProto:
    k, n = w_kn.shape
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "mm",
                     [h.make_tensor_value_info("x", TP.FLOAT, ["b", k])], [h.make_tensor_value_info("y", TP.FLOAT, ["b", n])],
                     [nh.from_array(w_kn, "W")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)])


def ort_quantizer(w_oi: np.ndarray, bs: int, symmetric: bool) -> dict:
    """onnxruntime's MatMulNBitsQuantizer (its default RTN path) on MatMul(x, W^T): {attrs, B, scales, zp}."""
    q = MatMulNBitsQuantizer(matmul_model(np.ascontiguousarray(w_oi.T)), bits=4, block_size=bs, is_symmetric=symmetric)
    q.process()
    m = q.model.model
    (node,) = m.graph.node
    inits = {t.name: nh.to_array(t) for t in m.graph.initializer}
    return {"attrs": {a.name: h.get_attribute_value(a) for a in node.attribute}, "B": inits[node.input[1]],
            "scales": inits[node.input[2]], "zp": inits[node.input[3]] if len(node.input) > 3 else None}


def ref_dequant(b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, n: int, k: int, bs: int) -> np.ndarray:
    """MatMulNBits bits=4 read back from its schema: byte j of a block = element 2j (low) | 2j+1 (high)."""
    nb = -(-k // bs)
    b = b.reshape(n, nb, bs // 2)
    codes = np.empty((n, nb, bs), np.float32)
    codes[..., 0::2], codes[..., 1::2] = b & 0x0F, b >> 4
    if zp is None:
        z = np.full((n, nb), 8, np.float32)
    else:
        zb = zp.reshape(n, -1)
        z = np.empty((n, 2 * zb.shape[1]), np.float32)
        z[:, 0::2], z[:, 1::2] = zb & 0x0F, zb >> 4
        z = z[:, :nb]
    w = (codes - z[..., None]) * scales.reshape(n, nb)[..., None].astype(np.float32)
    return w.reshape(n, nb * bs)[:, :k]


def act_q8(a: np.ndarray, bs: int) -> np.ndarray:
    """int8 per row per block of bs, symmetric amax/127, round half to even (MatMulNBits accuracy_level 4)."""
    rows, k = a.shape
    nb = -(-k // bs)
    p = np.zeros((rows, nb * bs), np.float32)
    p[:, :k] = a
    blk = p.reshape(rows, nb, bs)
    s = np.abs(blk).max(-1, keepdims=True) / np.float32(127)
    s[s == 0] = 1
    return (np.rint(blk / s) * s).reshape(rows, nb * bs)[:, :k].astype(np.float32)


def single_mm(w_oi, bs, symmetric, accuracy_level=None) -> ir.Model:
    m = ir.from_proto(matmul_model(np.ascontiguousarray(w_oi.T)))
    quantize(m, "int4", exclude=(), block_size=bs, symmetric=symmetric, accuracy_level=accuracy_level)
    return m


def mnb_node(m: ir.Model) -> ir.Node:
    (node,) = [n for n in m.graph if n.op_type == "MatMulNBits"]
    return node


def run_x(m: ir.Model, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level, so.intra_op_num_threads = 3, 1
    s = ort.InferenceSession(ir.to_proto(m).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


# ---- the checkers (reused by the fault tests) ------------------------------------------------------------
def check_against_ort_quantizer(m: ir.Model, w_oi: np.ndarray, bs: int, symmetric: bool) -> None:
    """(a) the pass's MatMulNBits = onnxruntime's MatMulNBitsQuantizer, byte for byte."""
    node, ref = mnb_node(m), ort_quantizer(w_oi, bs, symmetric)
    attrs = {k: node.attributes[k].value for k in ("K", "N", "bits", "block_size")}
    assert attrs == {k: ref["attrs"][k] for k in attrs}
    np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), ref["B"])
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), ref["scales"].reshape(-1))
    if symmetric:
        assert len(node.inputs) == 3 and ref["zp"] is None
    else:
        np.testing.assert_array_equal(node.inputs[3].const_value.numpy(), ref["zp"].reshape(-1))


def check_output(m: ir.Model, x: np.ndarray, w_oi: np.ndarray | None = None) -> np.ndarray:
    """(b) ORT CPU's output = numpy x @ dequant(W)^T (accuracy_level 0), dequant read from the node's own
    initializers by ref_dequant; with w_oi also the RTN error bound |dequant - W| <= |scale| (half a step
    inside the grid, up to one step at a block's clipped end: zero-point rounding, symmetric's +7/-8)."""
    node = mnb_node(m)
    n, k, bs = (node.attributes[a].value for a in ("N", "K", "block_size"))
    zp = node.inputs[3].const_value.numpy() if len(node.inputs) > 3 else None
    scales = node.inputs[2].const_value.numpy()
    deq = ref_dequant(node.inputs[1].const_value.numpy(), scales, zp, n, k, bs)
    np.testing.assert_allclose(run_x(m, x), x @ deq.T, atol=2e-5, rtol=1e-5)
    if w_oi is not None:
        step = np.repeat(np.abs(scales.reshape(n, -1)), bs, 1)[:, :k]
        assert (np.abs(deq - w_oi) <= step * (1 + 1e-5) + 1e-7).all()
    return deq


CASES = [(32, 256), (128, 256), (32, 200), (128, 200), (128, 328)]  # (block, K): K % block != 0 in the last three


@pytest.mark.parametrize("symmetric", [False, True], ids=["zero_points", "symmetric"])
@pytest.mark.parametrize("bs,k", CASES)
def test_packing_is_onnxruntimes_quantizer_and_output_is_numpy(bs, k, symmetric):
    rng = np.random.default_rng(k + bs)
    w = (rng.standard_normal((48, k)) / np.sqrt(k)).astype(np.float32)
    w[3] = 0  # an all-zero row: scale 0
    w[5, : bs // 2] = np.abs(w[5, : bs // 2])  # a block with no negative value
    m = single_mm(w, bs, symmetric)
    node = mnb_node(m)
    assert node.attributes["block_size"].value == bs  # the cheapest block for these K is the largest
    nb = -(-k // bs)
    assert node.inputs[1].const_value.numpy().shape == (48, nb, bs // 2)
    assert "accuracy_level" not in node.attributes
    check_against_ort_quantizer(m, w, bs, symmetric)
    x = rng.standard_normal((5, k)).astype(np.float32)
    check_output(m, x, w)


@pytest.mark.parametrize("bs,k", [(32, 256), (128, 200)])
def test_accuracy_level_4_quantizes_activations_per_block(bs, k):
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((64, k)) / np.sqrt(k)).astype(np.float32)
    x = rng.standard_normal((4, k)).astype(np.float32)
    m = single_mm(w, bs, False, accuracy_level=4)
    node = mnb_node(m)
    assert node.attributes["accuracy_level"].value == 4
    deq = ref_dequant(node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy(),
                      node.inputs[3].const_value.numpy(), 64, k, bs)
    y = run_x(m, x)
    np.testing.assert_allclose(y, act_q8(x, bs) @ deq.T, atol=5e-5, rtol=1e-5)
    assert np.abs(y - x @ deq.T).max() > 1e-4  # not weight-only numerics any more


# ---- (d) faults the checkers must catch --------------------------------------------------------------------
def _swap_nibbles(node: ir.Node) -> None:
    b = node.inputs[1].const_value.numpy()
    node.inputs[1].const_value = ir.tensor(((b & 0x0F) << 4) | (b >> 4), name=node.inputs[1].name)


def _scales_off_by_one_block(node: ir.Node) -> None:
    s = node.inputs[2].const_value.numpy()
    node.inputs[2].const_value = ir.tensor(np.roll(s, 1).astype(np.float32), name=node.inputs[2].name)


def _zero_points_swapped(node: ir.Node) -> None:
    z = node.inputs[3].const_value.numpy()
    node.inputs[3].const_value = ir.tensor(((z & 0x0F) << 4) | (z >> 4), name=node.inputs[3].name)


@pytest.mark.parametrize("fault", [_swap_nibbles, _scales_off_by_one_block, _zero_points_swapped])
def test_injected_faults_fail_the_checkers(fault):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((32, 256)) / 16).astype(np.float32)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    m = single_mm(w, 32, False)
    check_against_ort_quantizer(m, w, 32, False)
    check_output(m, x, w)
    fault(mnb_node(m))
    with pytest.raises(AssertionError):
        check_against_ort_quantizer(m, w, 32, False)
    # the output check against the unquantized weights' RTN bound catches it too (the numpy-vs-ORT part
    # alone cannot: it reads the faulty initializers the same way ORT does)
    with pytest.raises(AssertionError):
        check_output(m, x, w)


# ---- the hand-built graph of test_quant_schemes: roles, exclusions, sizes -------------------------------------
def test_every_eligible_weight_is_the_ort_quantizers_and_the_rest_stay_fp32():
    W = _weights()
    m = build_graph()
    rep = quantize(m, "int4", block_size=32)
    assert rep.scheme == "int4" and {q["weight"] for q in rep.quantized} == set(QUANTIZED.values())
    assert {s["role"] for s in rep.skipped} == {"router", "lm_head"}
    for name in ("E", "Wr", "Wlm_io"):
        assert m.graph.initializers[name].const_value.dtype == ir.DataType.FLOAT
    for src, wname in QUANTIZED.items():
        node = next(n for n in m.graph if n.op_type == "MatMulNBits" and n.inputs[1].name == f"{wname}.q4")
        ref = ort_quantizer(W[src], 32, False)
        np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), ref["B"])
        np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), ref["scales"].reshape(-1))
        np.testing.assert_array_equal(node.inputs[3].const_value.numpy(), ref["zp"].reshape(-1))
    # bytes per row: K/2 of codes, 4 per 32-block scale, one zero-point byte per two blocks (rounded up)
    shapes = [W[src].shape for src in QUANTIZED]
    after = sum(n * (k // 2 + 4 * (k // 32) + -(-(k // 32) // 2)) for n, k in shapes)
    assert rep.linear_bytes_after == after and rep.linear_bytes_before == sum(4 * n * k for n, k in shapes)
    assert rep.linear_ratio < 0.161
    assert rep.weights_bytes_after < rep.weights_bytes_before
    # block 128 on K = 96 / 192 rows: 32 / 64 store them in fewer bytes than zero-padding to 128 would
    sym = quantize(build_graph(), "int4", block_size=128, symmetric=True)
    assert {q["shape_oi"][1]: q["block_size"] for q in sym.quantized} == {128: 128, 96: 32, 192: 64, 256: 128}
    assert sym.linear_ratio < 0.14
    with pytest.raises(QuantizationError, match="block_size"):
        quantize(build_graph(), "int4", block_size=48)
    with pytest.raises(QuantizationError, match="experts"):
        quantize(build_graph(), "int4", experts="fp8")


def test_attention_bits_8_writes_the_attention_linears_as_int8():
    from test_quant_schemes import ref_int8
    W = _weights()
    m = build_graph()
    rep = quantize(m, "int4", attention_bits=8)
    bits = {q["weight"]: q["bits"] for q in rep.quantized}
    assert bits == {"W1_io": 8, "W2_oi": 8, "Wg": 4, "Wu": 4, "Wd": 4}  # q_like/o_like are the attention role
    for src in ("W1", "W2"):
        node = next(n for n in m.graph if n.op_type == "MatMulNBits" and n.inputs[1].name == f"{QUANTIZED[src]}.q8")
        bs = node.attributes["block_size"].value
        q, s, _ = ref_int8(W[src], bs)
        assert node.attributes["bits"].value == 8 and len(node.inputs) == 3
        np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), q)
        np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), s.reshape(-1))
    with pytest.raises(QuantizationError, match="attention_bits"):
        quantize(build_graph(), "int4", attention_bits=2)


@pytest.mark.parametrize("symmetric", [False, True], ids=["zero_points", "symmetric"])
def test_float16_scales_are_exact_in_fp16_and_still_rtn(symmetric):
    """scale_dtype float16 (fp16-scale kernels, e.g. CUDA): every scale is an fp16 value, the codes are
    computed against it (RTN bound on the rounded scale), ORT CPU still computes x @ dequant(W)^T, and fp16
    scales written into the same graph change no output."""
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((40, 200)) / 14).astype(np.float32)
    w[2] = 1e-9  # scales that round to 0 in fp16: the smallest subnormal instead (of the right sign)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    m = ir.from_proto(matmul_model(np.ascontiguousarray(w.T)))
    quantize(m, "int4", exclude=(), block_size=32, symmetric=symmetric, scale_dtype="float16")
    node = mnb_node(m)
    s = node.inputs[2].const_value.numpy()
    np.testing.assert_array_equal(s.astype(np.float16).astype(np.float32), s)
    tiny = np.float32(np.finfo(np.float16).smallest_subnormal)
    np.testing.assert_array_equal(s.reshape(40, -1)[2], -tiny if symmetric else tiny)  # -m/8 < 0 when m > 0
    check_output(m, x, w)
    with pytest.raises(QuantizationError, match="scale_dtype"):
        quantize(build_graph(), "int4", scale_dtype="bfloat16")


# ---- (c) routed experts: QMoE 4-bit ----------------------------------------------------------------------
def ort_q4_experts(w: np.ndarray, bs: int, symmetric: bool):
    """Per expert, onnxruntime's quantize_matmul_4bits (QMoE raw layout's producer): (packed [E, N, K/2],
    scales [E, N, K/bs], packed zero points [E, N, ceil(K/bs/2)])."""
    e, n, k = w.shape
    nb = k // bs
    out = np.zeros((e, n, nb, bs // 2), np.uint8), np.zeros((e, n, nb), np.float32), np.zeros((e, n, (nb + 1) // 2), np.uint8)
    for i in range(e):
        p, s, z = np.zeros((n, nb, bs // 2), np.uint8), np.zeros((n, nb), np.float32), np.zeros((n, (nb + 1) // 2), np.uint8)
        quantize_matmul_4bits(p, np.ascontiguousarray(w[i].T), s, z, bs, n, k, symmetric)
        out[0][i], out[1][i], out[2][i] = p, s, z
    return out[0].reshape(e, n, k // 2), out[1], out[2]


def ref_deq_experts(packed, scales, zp, bs):
    e, n, half = packed.shape
    return np.stack([ref_dequant(packed[i], scales[i], None if zp is None else zp[i], n, 2 * half, bs)
                     for i in range(e)])


@pytest.mark.parametrize("router", ["v3", "v2"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["zero_points", "symmetric"])
@pytest.mark.parametrize("level", [None, 4])
def test_qmoe_4bit_experts_are_ort_quantized_and_the_numpy_moe(moe_case, router, symmetric, level):
    fc1, fc2, x, probs, ids, w = moe_case[router]
    m = qm.moe_model(fc1, fc2)
    rep = QuantReport("int4")
    QMoEPass("block", block_size=32, accuracy_level=level, report=rep, bits=4, symmetric=symmetric)(m)
    node = next(n for n in m.graph if n.op_type == "QMoE")
    a = {k: node.attributes[k].value for k in ("expert_weight_bits", "weights_prepacked", "block_size")}
    assert a == {"expert_weight_bits": 4, "weights_prepacked": 0, "block_size": 32}
    deq = []
    for i_w, i_s, i_z, wt in ((2, 3, 11, fc1), (5, 6, 12, fc2)):
        p, s, z = ort_q4_experts(wt, 32, symmetric)
        np.testing.assert_array_equal(node.inputs[i_w].const_value.numpy(), p)
        np.testing.assert_array_equal(node.inputs[i_s].const_value.numpy(), s)
        if symmetric:
            assert len(node.inputs) <= i_z or node.inputs[i_z] is None
        else:
            np.testing.assert_array_equal(node.inputs[i_z].const_value.numpy(), z)
        deq.append(ref_deq_experts(p, s, None if symmetric else z, 32))
    got = qm.run(m, x, probs)
    if level == 4:  # int8 activations per token per block inside the kernel
        np.testing.assert_allclose(got, qm.deepseek_moe(x, w, ids, *deq, act_bs=32), atol=2e-5, rtol=0)
        assert np.abs(got - qm.deepseek_moe(x, w, ids, *deq)).max() > 1e-4
        assert rep.quantized[0]["activations"].startswith("int8")
    else:  # 4-bit blocks keep fp32 activations: weight-only numerics
        np.testing.assert_allclose(got, qm.deepseek_moe(x, w, ids, *deq), atol=2e-5, rtol=0)
        assert rep.quantized[0]["activations"] == "fp32 (weight-only)"
    (entry,) = rep.quantized
    assert entry["bits"] == 4 and entry["bytes_after"] == sum(
        v.const_value.nbytes for v in node.inputs if v is not None and v.const_value is not None)
    assert rep.linear_ratio <= (0.5 + 5 / 32) / 4  # fc2 rows (K = 32) are one block: a whole zero-point byte


def test_qmoe_4bit_per_channel_and_a_wrong_scale_is_caught(moe_case):
    fc1, fc2, x, probs, ids, w = moe_case["v3"]
    m = qm.moe_model(fc1, fc2)
    QMoEPass("channel", bits=4, symmetric=False)(m)
    node = next(n for n in m.graph if n.op_type == "QMoE")
    assert "block_size" not in node.attributes and node.inputs[3].const_value.numpy().shape == (qm.E, 2 * qm.I)
    deq = []
    for i_w, i_s, i_z, wt in ((2, 3, 11, fc1), (5, 6, 12, fc2)):
        e, n, k = wt.shape
        p, s, z = ort_q4_experts(wt, k, False)  # one block = the whole row
        np.testing.assert_array_equal(node.inputs[i_w].const_value.numpy(), p)
        np.testing.assert_array_equal(node.inputs[i_s].const_value.numpy(), s[..., 0])
        # per channel, QMoE packs the rows' zero points two per byte along N
        zc = z[..., 0] & 0x0F
        np.testing.assert_array_equal(node.inputs[i_z].const_value.numpy(), zc[:, 0::2] | (zc[:, 1::2] << 4))
        deq.append(ref_deq_experts(p, s, z, k))
    want = qm.deepseek_moe(x, w, ids, *deq)
    np.testing.assert_allclose(qm.run(m, x, probs), want, atol=2e-5, rtol=0)
    s = node.inputs[6].const_value.numpy().copy()
    s[1] = s[0]  # expert 1's fc2 scales replaced by expert 0's
    node.inputs[6].const_value = ir.tensor(s, name=node.inputs[6].name)
    assert np.abs(qm.run(m, x, probs) - want).max() > 1e-3


# ---- (e) tiny: the quantized graph is the eager model with ORT-quantized weights ----------------------------
def _ort_deq(w_oi: np.ndarray, bs: int) -> np.ndarray:
    """W -> dequant(ORT quantize_matmul_4bits(W)) by ref_dequant, zero points (the default scheme)."""
    n, k = w_oi.shape
    nb = -(-k // bs)
    wp = np.zeros((nb * bs, n), np.float32)
    wp[:k] = w_oi.T
    p, s, z = np.zeros((n, nb, bs // 2), np.uint8), np.zeros((n, nb), np.float32), np.zeros((n, (nb + 1) // 2), np.uint8)
    quantize_matmul_4bits(p, wp, s, z, bs, n, k, False)
    return ref_dequant(p, s, z, n, k, bs)


def test_tiny_ort_fused_int4_is_the_numpy_quantized_model():
    """tiny (K = 32, 64, 128: one block of 32 or more per row), its routed experts in QMoE 4-bit per block of
    32: ORT CPU's logits = the eager model with every quantized weight replaced by ORT's own 4-bit RTN of it
    (router gate, lm_head, embeddings and norms fp32), accuracy_level 0."""
    import copy

    import torch

    import models
    from passes import PASSES
    from passes.cleanup import cleanup
    from pipeline.export import export_graph
    model = models.load("tiny")
    g = export_graph(model, "prefill")
    PASSES["moe-ort-fused"]()(g)
    cleanup(g)
    rep = quantize(g, "int4")
    assert {q["block_size"] for q in rep.quantized} == {32}
    ids = np.random.default_rng(0).integers(0, 256, (2, 8)).astype(np.int64)
    feeds = {"input_ids": ids, **{v.name: np.zeros([2, 0, v.shape[2]], np.float32) for v in g.graph.inputs[1:]}}
    so = ort.SessionOptions()
    so.log_severity_level, so.intra_op_num_threads = 3, 1
    got = ort.InferenceSession(ir.to_proto(g).SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        ["logits"], feeds)[0]
    fq = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in fq.named_parameters():
            if name.endswith(("proj.weight", "proj_with_mqa.weight")) and ".mlp.gate." not in name:
                p.copy_(torch.from_numpy(_ort_deq(p.numpy().copy(), 32)))
        want = fq(torch.from_numpy(ids)).numpy()
        fp32 = model(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)
    assert np.abs(got - fp32).max() > 1e-2  # and it is not the fp32 model


# ---- (e) tiny through the ort-cpu passes -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ort_cpu(tmp_path_factory):
    import models
    from passes import PASSES, graphs_for
    from passes.cleanup import cleanup
    from pipeline.export import export_graphs, save_graph
    from pipeline.golden import make_golden
    model = models.load("tiny")
    graphs = export_graphs(model, "latent")
    for name in ("latent-kv-fusion", "moe-ort-fused", "ort-simplify"):  # the ort-cpu target's passes
        for g in graphs_for(name):
            PASSES[name]()(graphs[g])
            cleanup(graphs[g])
    folder = tmp_path_factory.mktemp("tiny-fp32")
    for g, m in graphs.items():
        save_graph(m, folder / f"{g}.onnx")
    return model, make_golden(model, "latent", gen_tokens=2), folder


def _quantized_tiny(folder, out, fault=None, **options) -> dict:
    from pipeline.export import save_graph
    paths = {}
    for g in ("prefill", "decode"):
        m = ir.load(folder / f"{g}.onnx")
        rep = quantize(m, "int4", **options)
        ops = [n.op_type for n in m.graph]
        linear = [q for q in rep.quantized if q["role"] != "routed_experts"]
        assert ops.count("QMoE") == 2 and "MoE" not in ops and len(linear) >= 20
        assert ops.count("MatMulNBits") == sum(len(q["nodes"]) for q in linear)
        assert sorted(s["role"] for s in rep.skipped) == ["lm_head", "router", "router"]
        if fault is not None:
            fault(m)
        paths[g] = out / f"{g}.onnx"
        save_graph(m, paths[g])
    return paths


def _tiny_reports(tiny_ort_cpu, out, fault=None, **options):
    from pipeline.build import moe_routers, routed_reports
    model, golden, folder = tiny_ort_cpu
    paths = _quantized_tiny(folder, out, fault, **options)
    return routed_reports("quantize-int4", paths, {g: folder / f"{g}.onnx" for g in paths}, golden, moe_routers(model))


@pytest.mark.parametrize("options", [{}, {"accuracy_level": 4}, {"block_size": 128, "accuracy_level": 4},
                                     {"accuracy_level": 4, "attention_bits": 8},
                                     {"accuracy_level": 4, "attention_bits": 8, "dense_mlp_bits": 8}],
                         ids=["b32", "b32-acc4", "b128-acc4", "b32-acc4-attn8", "b32-acc4-attn8-dense8"])
def test_tiny_int4_is_within_the_quantize_int4_budget(tiny_ort_cpu, tmp_path, options):
    """tiny (random weights) through the ort-cpu passes, int4, judged routing-aware (pipeline.parity's
    quantize-int4 budget: numeric error with the reference's routing forced, flips on their own)."""
    for r in _tiny_reports(tiny_ort_cpu, tmp_path, **options):
        rt, o = r.extra["routing"], r.outputs[0]
        print(f"tiny int4 {options} {r.stage}: forced cosine {o.cosine:.5f} KL {o.kl:.4f} rel euclid "
              f"{o.rel_euclid:.3f}; {rt['summary']}; unforced cosine {rt['unforced']['logits']['cosine']:.4f}")
        r.raise_if_failed()


def test_dense_mlp_bits_8_writes_the_first_dense_layers_mlp_as_int8(tiny_ort_cpu):
    """dense_mlp_bits=8: exactly the MLP linears of tiny's dense layer 0 (first_k_dense_replace 1; found here by
    value from the eager model, not by the pass's graph walk) become MatMulNBits 8-bit with the int8 reference's
    codes; shared experts and every other MLP linear stay 4-bit; the report says why each stayed 8-bit."""
    from test_quant_schemes import ref_int8
    model, _, folder = tiny_ort_cpu
    assert model.config.first_k_dense_replace == 1
    dense = {name: getattr(model.model.layers[0].mlp, name).weight.detach().numpy() for name in
             ("gate_proj", "up_proj", "down_proj")}
    m = ir.load(folder / "prefill.onnx")
    fp32 = {v.name: v.const_value.numpy().copy() for v in m.graph.initializers.values() if v.const_value is not None}
    rep = quantize(m, "int4", attention_bits=8, dense_mlp_bits=8)
    mlp = [q for q in rep.quantized if q["role"] == "mlp"]

    def dense_name(w):
        return next((n for n, d in dense.items() if d.shape in (w.shape, w.T.shape)
                     and (np.array_equal(d, w) or np.array_equal(d, w.T))), None)
    found = {q["weight"]: dense_name(fp32[q["weight"]]) for q in mlp}
    assert sorted(n for n in found.values() if n) == sorted(dense)
    for q in mlp:
        assert q["bits"] == (8 if found[q["weight"]] else 4), q
        assert ("dense MLP before the first MoE layer" in q.get("why_8bit", "")) == bool(found[q["weight"]])
        if found[q["weight"]]:
            node = next(n for n in m.graph if n.op_type == "MatMulNBits" and n.inputs[1].name == f"{q['weight']}.q8")
            want, scales, _ = ref_int8(dense[found[q["weight"]]], node.attributes["block_size"].value)
            np.testing.assert_array_equal(node.inputs[1].const_value.numpy(), want)
            np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), scales.reshape(-1))
    assert any("shared_experts" in q["weight"] and q["bits"] == 4 for q in mlp)
    assert any("3 dense-layer MLP linears" in n for n in rep.notes)
    with pytest.raises(QuantizationError, match="dense_mlp_bits"):
        quantize(ir.load(folder / "prefill.onnx"), "int4", dense_mlp_bits=6)


def _nibbles_swapped_everywhere(m: ir.Model) -> None:
    for n in m.graph:
        if n.op_type == "MatMulNBits":
            _swap_nibbles(n)


def _expert_scales_doubled(m: ir.Model) -> None:
    node = [n for n in m.graph if n.op_type == "QMoE"][1]
    for i in (3, 6):
        v = node.inputs[i]
        v.const_value = ir.tensor(v.const_value.numpy() * np.float32(2), name=v.name)


def _one_block_shift_first_layer(m: ir.Model) -> None:
    for n in [n for n in m.graph if n.op_type == "MatMulNBits"][:4]:
        _scales_off_by_one_block(n)


@pytest.mark.parametrize("fault", [_nibbles_swapped_everywhere, _expert_scales_doubled, _one_block_shift_first_layer])
def test_tiny_int4_budget_catches_a_wrong_quantizer(tiny_ort_cpu, tmp_path, fault):
    from pipeline.parity import ParityError
    reports = _tiny_reports(tiny_ort_cpu, tmp_path, fault=fault)
    with pytest.raises(ParityError, match="quantize-int4/"):
        for r in reports:
            print(fault.__name__, r.stage, r.outputs[0].cosine, r.extra["routing"]["summary"])
            r.raise_if_failed()


def test_tiny_int4_ort_cpu_package_builds_verifies_and_records_its_form(tmp_path, stage_cache):
    """--quant int4 on ort-cpu: the target's recommended form (block 32, accuracy_level 4, attention and dense-layer
    MLP 8-bit) is what the quantize stage ran and what the manifest records; the package verifies (hashes and
    golden data)."""
    import json
    from pipeline.compile import compile_package
    from pipeline.verify import verify_full
    from targets.ort_cpu import INT4_OPTIONS
    pkg = compile_package("tiny", "ort-cpu", tmp_path / "tiny-int4", quant="int4", cache_dir=stage_cache,
                          progress=lambda m: None, genai="none")
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["target"]["quantization"] == "int4" and m["target"]["quantization_options"] == INT4_OPTIONS
    quant = next(s for s in m["stages"] if s["name"] == "quantize")
    assert quant["params"] == {"scheme": "int4", **INT4_OPTIONS}
    reports = json.loads((pkg / "reports" / "parity.json").read_text())["stages"]
    assert any(r["stage"].startswith("quantize-int4/") for r in reports) and all(
        r["passed"] for r in reports if not r["stage"].startswith("info/"))
    assert "genai" not in m and not (pkg / "onnx" / "genai_config.json").exists()
    ok, lines = verify_full(pkg)
    assert ok, lines
