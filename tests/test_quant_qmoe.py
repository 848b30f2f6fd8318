"""INT8 routed experts as `com.microsoft.QMoE` (passes/quant_qmoe.py) on ORT CPU.

The numpy side is written from the QMoE schema (ORT 1.32: raw [E, N, K] uint8 weights, zero point 128,
scales [E, N] per channel or [E, N, K/bs] per block) and DeepSeekMoE's definition, not from the pass:
  - the stored weights and scales equal an independent numpy quantizer exactly;
  - QMoE's output equals a numpy DeepSeekMoE (noaux_tc router weights, SwiGLU experts) with those
    dequantized weights: per channel exactly (fp32 activations, weight-only numerics); per block only
    once the activations are quantized per token per block too (what the CPU kernel does, at every
    accuracy_level: the reason `--quant int8` uses per-channel experts unless accuracy_level=4);
  - tiny's ort-cpu graphs (moe-ort-fused) quantized with int8 compute the numpy-quantized model, with
    the router gate and lm_head kept fp32, and an accuracy_level=4 package compiles, verifies and says so.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from passes.quant_qmoe import QMoEPass
from passes.quant_weights import QuantReport
from passes.quantize import quantize

E, I, H, K, N = 8, 32, 64, 2, 6  # experts, moe_intermediate, hidden, top-k, tokens


# ---- independent numpy references -----------------------------------------------------------------
def ref_q8(w: np.ndarray, bs: int | None):
    """[E, N, K] fp32 -> (uint8 codes, scales, dequantized); symmetric, zero point 128."""
    e, n, k = w.shape
    b = k if bs is None else bs
    blk = w.reshape(e, n, k // b, b)
    amax = np.abs(blk).max(-1)
    s = (amax / np.float32(127)).astype(np.float32)
    s[amax == 0] = 1
    q = np.clip(np.rint(blk / s[..., None]), -127, 127).astype(np.int32) + 128
    deq = ((q - 128).astype(np.float32) * s[..., None]).reshape(e, n, k)
    return q.astype(np.uint8).reshape(e, n, k), (s[..., 0] if bs is None else s), deq


def act_q8(v: np.ndarray, bs: int) -> np.ndarray:
    """Per-block symmetric int8 fake quantization of an activation vector (what QMoE block does)."""
    b = v.reshape(-1, bs)
    s = np.abs(b).max(1, keepdims=True) / np.float32(127)
    s[s == 0] = 1
    return (np.clip(np.rint(b / s), -127, 127) * s).reshape(v.shape).astype(np.float32)


def deepseek_moe(x, w_sel, ids, fc1, fc2, act_bs=None):
    """sum_k w_k * down(silu(gate x) * up x); fc1 rows interleave gate/up (swiglu_fusion=1)."""
    aq = (lambda v: act_q8(v, act_bs)) if act_bs else (lambda v: v)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for wk, e in zip(w_sel[n], ids[n]):
            a = fc1[e] @ aq(x[n])
            g, u = a[0::2], a[1::2]
            out[n] += wk * (fc2[e] @ aq(g / (1 + np.exp(-g)) * u))
    return out


def noaux_tc_router(logits, bias, n_group=4, topk_group=2, k=K):
    """DeepSeek-V3 routing (REFERENCE.md): ids by biased scores in the best groups, weights unbiased, normalised."""
    s = 1 / (1 + np.exp(-logits))
    choice = s + bias
    g = np.sort(choice.reshape(len(s), n_group, -1), -1)[..., -2:].sum(-1)
    keep = np.argsort(-g, -1)[:, :topk_group]
    mask = np.full_like(choice, -np.inf)
    for n in range(len(s)):
        for grp in keep[n]:
            sl = slice(grp * E // n_group, (grp + 1) * E // n_group)
            mask[n, sl] = choice[n, sl]
    ids = np.argsort(-mask, -1)[:, :k]
    w = np.take_along_axis(s, ids, -1)
    return ids, w / (w.sum(-1, keepdims=True) + 1e-20)


# ---- a hand-built com.microsoft.MoE, as passes/moe_lowering.py writes it ------------------------------
@pytest.fixture(scope="module")
def moe_case():
    rng = np.random.default_rng(6)
    gate = rng.standard_normal((E, I, H)).astype(np.float32) / 8
    up = rng.standard_normal((E, I, H)).astype(np.float32) / 8
    fc1 = np.empty((E, 2 * I, H), np.float32)
    fc1[:, 0::2], fc1[:, 1::2] = gate, up
    fc1[0, 3] = 0  # an all-zero row (scale 1.0)
    fc2 = rng.standard_normal((E, H, I)).astype(np.float32) / 6
    x = rng.standard_normal((N, H)).astype(np.float32)
    ids, w = noaux_tc_router(rng.standard_normal((N, E)).astype(np.float32), rng.standard_normal(E).astype(np.float32) / 4)
    # V3 form: router_probs as moe_lowering's subgraph router writes them (log w at the chosen ids, -inf
    # elsewhere); MoE(normalize_routing_weights=0) softmaxes them over all experts = w / sum(w)
    probs = np.full((N, E), -np.inf, np.float32)
    np.put_along_axis(probs, ids, np.log(w).astype(np.float32), -1)
    # V2-Lite form (softmax, greedy, norm_topk_prob false): router_probs = the gate logits; the weights are
    # the softmax over all experts at the top-k, not renormalised
    logits = rng.standard_normal((N, E)).astype(np.float32)
    p_all = np.exp(logits - logits.max(-1, keepdims=True))
    p_all /= p_all.sum(-1, keepdims=True)
    ids2 = np.argsort(-logits, -1)[:, :K]
    return {"v3": (fc1, fc2, x, probs, ids, w),
            "v2": (fc1, fc2, x, logits, ids2, np.take_along_axis(p_all, ids2, -1))}


def moe_model(fc1, fc2) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape(["n", H]), type=ir.TensorType(ir.DataType.FLOAT))
    p = ir.Value(name="router_probs", shape=ir.Shape(["n", E]), type=ir.TensorType(ir.DataType.FLOAT))
    inits = [ir.Value(name=nm, shape=ir.Shape(a.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(a, name=nm))
             for nm, a in (("moe.fc1_experts_weights", fc1), ("moe.fc2_experts_weights", fc2))]
    node = ir.node("MoE", [x, p, inits[0], None, inits[1]], dict(
        k=K, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=0, activation_alpha=1.0,
        activation_beta=0.0, use_sparse_mixer=0), domain="com.microsoft", name="moe.0/moe")
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.FLOAT
    g = ir.Graph([x, p], node.outputs, nodes=[node], initializers=inits, opset_imports={"": 20, "com.microsoft": 1})
    return ir.Model(g, ir_version=10)


def run(m: ir.Model, x, probs) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(ir.to_proto(m).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x, "router_probs": probs})[0]


@pytest.mark.parametrize("router", ["v3", "v2"])
@pytest.mark.parametrize("granularity,bs", [("channel", None), ("block", 32)])
def test_qmoe_weights_and_output_are_the_numpy_scheme(moe_case, granularity, bs, router):
    fc1, fc2, x, probs, ids, w = moe_case[router]
    m = moe_model(fc1, fc2)
    np.testing.assert_allclose(run(m, x, probs), deepseek_moe(x, w, ids, fc1, fc2), atol=1e-5, rtol=0)
    rep = QuantReport("int8")
    QMoEPass(granularity, block_size=128, accuracy_level=4 if bs else None, report=rep)(m)
    # QMoE renormalises over the k chosen experts; MoE(normalize 0) does not: router_weights carry MoE's
    softmax, node = list(m.graph)
    assert softmax.op_type == "Softmax" and node.inputs[14] is softmax.outputs[0]
    assert (node.op_type, node.attributes["expert_weight_bits"].value, node.attributes["weights_prepacked"].value) \
        == ("QMoE", 8, 0)
    assert ("block_size" in node.attributes) == (bs is not None)
    init = m.graph.initializers
    deq = []
    for name, wt in (("moe.fc1_experts_weights", fc1), ("moe.fc2_experts_weights", fc2)):
        q, s, d = ref_q8(wt, bs)
        assert init[f"{name}.q8"].const_value.numpy().tobytes() == q.tobytes()
        assert init[f"{name}.scales"].const_value.numpy().tobytes() == s.tobytes()
        deq.append(d)
    assert "moe.fc1_experts_weights" not in init
    got = run(m, x, probs)
    # per channel: weight-only, the fp32 DeepSeekMoE with dequantized weights; per block: the kernel
    # also quantizes activations per block (the fp32-activation reference is off by ~1e-2 there)
    np.testing.assert_allclose(got, deepseek_moe(x, w, ids, *deq, act_bs=bs), atol=2e-5, rtol=0)
    if bs:
        assert np.abs(got - deepseek_moe(x, w, ids, *deq)).max() > 1e-4
    (entry,) = rep.quantized
    assert entry["bytes_after"] == sum(a.nbytes for a in (*ref_q8(fc1, bs)[:2], *ref_q8(fc2, bs)[:2]))
    assert rep.linear_ratio <= 0.282  # (1 + 4/32 bytes) / 4 at worst: K = 32 rows or blocks of 32


def test_qmoe_exclude_and_block_size_errors(moe_case):
    fc1, fc2, *_ = moe_case["v3"]
    m = moe_model(fc1, fc2)
    rep = QuantReport("int8")
    QMoEPass(exclude=("mlp",), report=rep)(m)
    assert [n.op_type for n in m.graph] == ["MoE"] and rep.skipped[0]["reason"] == "role mlp excluded"
    rep = QuantReport("int8")
    QMoEPass("block", block_size=16, report=rep)(m)  # 16 divides H=64 and I=32
    assert [n.op_type for n in m.graph] == ["Softmax", "QMoE"] and rep.quantized[0]["block_size"] == 16


# ---- tiny, as the ort-cpu target lowers it ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_fused():
    import models
    from passes import PASSES
    from passes.cleanup import cleanup
    from pipeline.export import export_graph
    model = models.load("tiny")
    g = export_graph(model, "prefill")
    PASSES["moe-ort-fused"]()(g)
    cleanup(g)
    return model, g


def _fake_quant(model):
    """The eager model with its weights replaced by numpy-dequantized ones (the test's own oracle): routed
    experts per channel, the other projections per block (test_quant_schemes.ref_int8), gate kept."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_quant_schemes import ref_int8
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".mlp.experts." in name:
                p.copy_(torch.from_numpy(ref_q8(p.numpy()[None].copy(), None)[2][0]))
            elif name.endswith(("proj.weight", "proj_with_mqa.weight")) and ".mlp.gate." not in name:
                p.copy_(torch.from_numpy(ref_int8(p.numpy().copy(), min(128, p.shape[1]))[2]))
    return m


def test_tiny_ort_fused_int8_is_the_numpy_quantized_model(tiny_fused):
    model, g = tiny_fused
    q = ir.from_proto(ir.to_proto(g))
    rep = quantize(q, "int8")
    ops = [n.op_type for n in q.graph]
    assert ops.count("QMoE") == 2 and "MoE" not in ops and ops.count("MatMulNBits") == 24
    assert sorted(s["role"] for s in rep.skipped) == ["lm_head", "router", "router"]  # gate feeds MoEGroupRouter
    ids = np.random.default_rng(0).integers(0, 256, (2, 8)).astype(np.int64)
    feeds = {"input_ids": ids, **{v.name: np.zeros([2, 0, v.shape[2]], np.float32) for v in q.graph.inputs[1:]}}
    so = ort.SessionOptions()
    so.log_severity_level, so.intra_op_num_threads = 3, 1
    got = ort.InferenceSession(ir.to_proto(q).SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        ["logits"], feeds)[0]
    with torch.no_grad():
        want = _fake_quant(model)(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)


def test_tiny_int8_accuracy_level_4_package(tmp_path):
    """--int8-accuracy-level 4: QMoE per block + MatMulNBits accuracy_level=4 in the package, verified,
    recorded in the manifest and the stage parameters."""
    import onnx
    from pipeline.compile import CompileError, compile_package
    from pipeline.package import read_manifest
    from pipeline.verify import verify_full
    pkg = compile_package("tiny", "ort-cpu", tmp_path / "q4", quant="int8", int8_accuracy_level=4,
                          cache_dir=tmp_path / "cache", progress=lambda m: None)
    nodes = onnx.load(str(pkg / "onnx" / "decode.onnx")).graph.node
    qmoe = [n for n in nodes if n.op_type == "QMoE"]
    assert len(qmoe) == 2 and not [n for n in nodes if n.op_type == "MoE"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in qmoe[0].attribute}
    assert attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
    assert all(onnx.helper.get_attribute_value(a) == 4 for n in nodes if n.op_type == "MatMulNBits"
               for a in n.attribute if a.name == "accuracy_level")
    ok, lines = verify_full(pkg)
    assert ok, lines
    m = read_manifest(pkg)
    assert m["target"]["quantization_options"] == {"accuracy_level": 4}
    assert next(s for s in m["stages"] if s["name"] == "quantize")["params"]["accuracy_level"] == 4
    with pytest.raises(CompileError, match="applies to --quant int8"):
        compile_package("tiny", "ort-cpu", tmp_path / "bad", quant="fp8", int8_accuracy_level=4)
