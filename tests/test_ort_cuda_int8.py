"""ort-cuda `--quant int8`: MatMulNBits 8-bit weights with fp16 activations and fp16 scales.

CPU side (fast, tiny): the quantize -> fp16 order gives fp16 scales that dequantize to an independent
numpy implementation exactly; the combined int8 + fp16 limits; the package builds without a GPU and
re-verifies on ORT CPU. GPU side (marked gpu; skipped without onnxruntime-gpu and a package):
tests/test_ort_cuda_quant_gpu.py.
"""
from __future__ import annotations

import json
import math

import numpy as np
import onnx_ir as ir
import pytest

from targets import ort_cuda
from test_quant_schemes import ref_int8  # the independent numpy scheme (fp16 scales: scale_dtype)

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT


def _load(blob: bytes) -> ir.Model:
    import onnx
    return ir.from_proto(onnx.load_from_string(blob))


# ---- independent numpy reference of the ort-cuda int8 scheme (tiny_cuda_graphs: tests/conftest.py) --------
def ref_experts_fp16_scales(w: np.ndarray):
    """[E, N, K] -> (uint8 q + 128, fp16 scale per (expert, output row), dequantized fp32)."""
    amax = np.abs(w).max(-1)
    s16 = (amax / np.float32(127)).astype(np.float16)
    s16[amax == 0] = 1
    s = s16.astype(np.float32)
    q = np.clip(np.rint(w / s[..., None]), -127, 127).astype(np.int32)
    return (q + 128).astype(np.uint8), s16, q.astype(np.float32) * s[..., None]


def test_int8_then_fp16_scales_dequantize_exactly(tiny_cuda_graphs):
    from passes.quant_weights import find_linear_sites
    for g, blob in tiny_cuda_graphs.items():
        pre = _load(blob)
        # the fp32 weights as [out, in] (orientation read from the graph: MatMul [in, out] or Transpose/Gemm)
        before = {s.weight.name: s.weight_oi for s in find_linear_sites(pre.graph)}
        experts = {v.name: v.const_value.numpy() for n in pre.graph if n.op_type == "MoE" for v in (n.inputs[2], n.inputs[4])}
        m = _load(blob)
        rep = ort_cuda.quantize_int8(m)
        assert rep.quantized and {s["role"] for s in rep.skipped} >= {"router", "lm_head"}
        ort_cuda.to_fp16(m)
        nodes = [n for n in m.graph if n.op_type == "MatMulNBits"]
        sites = [s for s in rep.quantized if s["role"] != "routed_experts"]
        assert len(nodes) >= len(sites) > 0  # a weight shared by several sites counts once
        # tiny's routed experts (moe_intermediate 32): the CUDA QMoE kernel needs a multiple of 64 -> fp16 MoE
        assert not any(n.op_type == "QMoE" for n in m.graph)
        assert all(n.inputs[2].dtype == F16 for n in m.graph if n.op_type == "MoE")
        kept = [x for x in rep.skipped if x["role"] == "routed_experts"]
        assert kept and all("multiple of 64" in x["reason"] for x in kept)
        # the QMoE form the target writes where the kernel takes the shape (e.g. trained-small), on the same
        # graph: int8 per output channel, fp16 scales, raw layout, no router_weights input, exactly as numpy
        from passes.quant_qmoe import QMoEPass
        from passes.quant_weights import QuantReport
        mq = _load(blob)
        QMoEPass("channel", 128, None, (), QuantReport("int8"), scale_dtype="float16", router_weights=False)(mq)
        ort_cuda.to_fp16(mq)
        qmoe = [n for n in mq.graph if n.op_type == "QMoE"]
        assert qmoe and not any(n.op_type == "MoE" for n in mq.graph)
        for n in qmoe:
            assert n.attributes["expert_weight_bits"].value == 8 and n.attributes["weights_prepacked"].value == 0
            assert "block_size" not in n.attributes and len(n.inputs) == 7 and n.inputs[0].dtype == F16
            assert n.inputs[1].dtype == F16  # router_probs cast from the fp32 router island
            for wi, si in ((2, 3), (5, 6)):
                q, scales = n.inputs[wi].const_value.numpy(), n.inputs[si].const_value.numpy()
                assert scales.dtype == np.float16
                rq, rs, rdeq = ref_experts_fp16_scales(experts[n.inputs[wi].name[: -len(".q8")]])
                np.testing.assert_array_equal(q, rq)
                np.testing.assert_array_equal(scales, rs)
                np.testing.assert_array_equal((q.astype(np.float32) - 128) * scales.astype(np.float32)[..., None], rdeq)
        for site in sites:
            node = next(n for n in nodes if n.name in [f"{x}.int8" for x in site["nodes"]])
            assert node.attributes["bits"].value == 8
            a, b, scales = node.inputs[0], node.inputs[1], node.inputs[2]
            assert a.dtype == F16 and scales.dtype == F16 and b.dtype == ir.DataType.UINT8  # what CUDA requires
            assert len(node.inputs) == 3  # symmetric: zero point 128 is the 8-bit default
            w_oi = before[site["weight"]]
            n_out, k = site["shape_oi"]
            assert w_oi.shape == (n_out, k)
            bs = node.attributes["block_size"].value
            assert bs == site["block_size"] and (bs == 128 or k < 128 or k % 128)
            q, s16, deq = ref_int8(np.ascontiguousarray(w_oi, np.float32), bs, scale_dtype=np.float16)
            got_q = b.const_value.numpy()
            got_s = scales.const_value.numpy()
            assert got_s.dtype == np.float16
            np.testing.assert_array_equal(got_q, q)
            np.testing.assert_array_equal(got_s.reshape(s16.shape), s16)
            got_deq = ((got_q.astype(np.float32) - 128) * got_s.reshape(s16.shape).astype(np.float32)[..., None])
            np.testing.assert_array_equal(got_deq.reshape(n_out, -1)[:, :k], deq)
        # the router gate stays an fp32 MatMul (an island), lm_head an fp16 MatMul
        routers = [s for s in rep.skipped if s["role"] == "router"]
        for r in routers:
            node = next(n for n in m.graph if n.name == r["node"])
            assert node.op_type in ("MatMul", "Gemm") and node.outputs[0].dtype == F32


def test_fp16_scale_rounding_edge_cases():
    from passes.quant_int8 import quantize_int8_blocks
    w = np.zeros((3, 128), np.float32)
    w[1, :] = 1e-9  # amax/127 underflows fp16: the smallest fp16 subnormal instead of 0
    w[2, 0] = 70000.0 * 127  # beyond fp16 max: clipped to 65504
    q, s, zp, bs = quantize_int8_blocks(w, 128, scale_dtype="float16")
    assert s.dtype == np.float32 and np.array_equal(s.astype(np.float16).astype(np.float32), s)
    assert s[0, 0] == 1.0 and s[1, 0] == np.finfo(np.float16).smallest_subnormal
    assert s[2, 0] == np.finfo(np.float16).max and q[2, 0, 0] == 255
    from passes.quant_weights import QuantizationError
    with pytest.raises(QuantizationError, match="scale_dtype"):
        quantize_int8_blocks(w, 128, scale_dtype="bfloat16")


def test_quant_fp16_limits_add_at_worst_case():
    from pipeline.parity import BUDGETS, Budget, quant_fp16_limits
    q = BUDGETS["quantize-int8"]
    f = Budget(atol=0.02, rtol=0.02, min_cosine=0.9998, max_kl=1e-3, min_top1=1.0, max_rel_euclid=0.02)
    lim = quant_fp16_limits(q, f)
    assert math.isinf(lim.atol) and lim.min_top1 is None
    assert lim.max_rel_euclid == pytest.approx(0.17)
    assert 1 - lim.min_cosine == pytest.approx((0.1 + math.sqrt(2e-4)) ** 2)
    assert lim.max_kl == pytest.approx((math.sqrt(0.05) + math.sqrt(1e-3)) ** 2)
    # never tighter than either part
    assert lim.min_cosine < min(q.min_cosine, f.min_cosine) and lim.max_kl > max(q.max_kl, f.max_kl)
    assert BUDGETS["target-ort-cuda-int8"] == q and BUDGETS["target-ort-cuda-fp8"] == BUDGETS["quantize-fp8"]
    assert lim.max_flipped_fraction == q.max_flipped_fraction  # the flip share is the quantization's budget


def test_int8_package_builds_without_gpu(tmp_path):
    from runtime import cuda_runtime
    from pipeline.compile import compile_package
    pkg = compile_package("tiny", "ort-cuda", tmp_path / "pkg", quant="int8", progress=lambda m: None,
                          use_cache=False, gen_tokens=8)
    man = json.loads((pkg / "manifest.json").read_text())
    t = man["target"]
    assert man["parity"]["passed"] and t["quantization"] == "int8" and t["precision"] == "fp16"
    assert t["quantization_options"] == ort_cuda.INT8_OPTIONS and "QMoE" in t["routed_experts"]
    assert t["quantization_options"]["experts"] == "channel" and t["routed_expert_ops"] == {"QMoE": 0, "MoE": 2}
    assert t["verified_with"] is None
    assert any(s.startswith("not yet run on a GPU") for s in man["verification"]["not_verified"])
    stages = {s["name"]: s for s in man["stages"]}
    assert stages["quantize"]["params"]["scheme"] == "int8"
    judged = [r for s in man["stages"] for r in s["parity"]]
    assert any(r["stage"].startswith("quantize-int8/") for r in judged)  # the fp32-activation twin
    int8 = [r for r in judged if r["stage"].startswith("target-ort-cuda-int8/")]
    assert {r["stage"].split("/")[1] for r in int8} == {"prefill", "prefill-chunk", "decode", "greedy"}
    assert all(r["passed"] for r in int8 if r["binding"])
    # the graphs: MatMulNBits 8-bit with fp16 A and scales, MoE fp16, logits fp32, cache fp16
    dec = ir.load(pkg / "onnx" / "decode.onnx")
    mm = [n for n in dec.graph if n.op_type == "MatMulNBits"]
    assert mm and all(n.attributes["bits"].value == 8 and n.inputs[2].dtype == F16 for n in mm)
    assert not any(n.op_type == "QMoE" for n in dec.graph)  # tiny: moe_intermediate 32 (CUDA QMoE needs 64k)
    # golden: the int8 graphs' own outputs (tolerance: fp16 limits) and eager fp32 with the int8 limits
    gold = man["golden"]
    assert gold["tolerance"]["stage"] == "target-ort-cuda-fp16"
    assert set(gold["tolerance"]["cases"]) == {"prefill", "prefill-chunk", "decode"}
    ref = gold["fp32_reference"]
    assert ref["stage"] == "target-ort-cuda-int8" and set(ref["limits"]) == {"prefill", "prefill-chunk", "decode",
                                                                           "greedy"}
    lim = ref["limits"]["prefill"]["logits"]
    assert lim["atol"] is None and lim["min_cosine"] < 0.99 and lim["max_kl"] > 0.05
    assert (pkg / ref["cases"][0]["outputs"]["logits"]).is_file() and (pkg / "reports" / "quantization.json").is_file()
    readme = (pkg / "README.md").read_text()
    assert "## int8 judgement" in readme and "MatMulNBits" in readme and "not yet run on a GPU" in readme
    failures, record = cuda_runtime.verify_golden(pkg, device="cpu")
    assert failures == [], failures
    from pipeline.package import verify_package
    assert verify_package(pkg) == []  # every file hashed in the manifest (golden/fp32 included)
