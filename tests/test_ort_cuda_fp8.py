"""ort-cuda `--quant fp8`: E4M3 128x128-block weights in the form onnxruntime-gpu's CUDA EP runs
(passes/quant_fp8_cuda.py: per-tensor DequantizeLinear x block scales), fp16 compute.

CPU side (fast): on hand-built graphs the CUDA form dequantizes every weight exactly as an independent
numpy implementation of DeepSeek-V3's scheme does and as the blocked form (ORT CPU) does, keeping the fp8
bytes; on tiny, after to_fp16, each weight a fp16 GEMM reads is numpy's dequantized weight rounded once to
fp16; an FP8 checkpoint compiles for ort-cuda as fp8 by default with its bytes passed through, the package
passes its budgets and re-verifies on ORT CPU. GPU side (marked gpu; skipped without onnxruntime-gpu and
a package): tests/test_ort_cuda_quant_gpu.py.
"""
from __future__ import annotations

import hashlib
import json

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from passes.quant_fp8_cuda import Fp8CudaFormPass
from passes.quantize import quantize
from targets import ort_cuda
from test_quant_schemes import ref_fp8  # the independent numpy scheme

FP8 = onnx.TensorProto.FLOAT8E4M3FN


def _graph(weights: dict[str, tuple[str, np.ndarray]]) -> ir.Model:
    """x [2, in] -> one MatMul ([in, out] weight) or Gemm (transB=1, [out, in] weight) per entry."""
    nodes, inputs, outputs, inits = [], [], [], []
    for i, (name, (op, w)) in enumerate(weights.items()):
        k = w.shape[0] if op == "MatMul" else w.shape[1]
        n_out = w.shape[1] if op == "MatMul" else w.shape[0]
        inputs.append(h.make_tensor_value_info(f"x{i}", TP.FLOAT, [2, k]))
        outputs.append(h.make_tensor_value_info(f"y{i}", TP.FLOAT, [2, n_out]))
        inits.append(nh.from_array(w, name))
        attrs = {"transB": 1} if op == "Gemm" else {}
        nodes.append(h.make_node(op, [f"x{i}", name], [f"y{i}"], name=f"{op.lower()}{i}", **attrs))
    g = h.make_graph(nodes, "fp8_cuda", inputs, outputs, initializer=inits)
    return ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 20)], ir_version=10))


def _run(model: ir.Model, feeds: dict, extra: list[str]) -> dict:
    m = ir.from_proto(onnx.load_from_string(ir.to_proto(model).SerializeToString()))
    by_name = {v.name: v for n in m.graph for v in n.outputs}
    m.graph.outputs.extend(by_name[n] for n in extra)
    sess = ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def _fp8_bytes(model: ir.Model) -> dict[str, bytes]:
    return {n: v.const_value.tobytes() for n, v in model.graph.initializers.items()
            if v.dtype == ir.DataType.FLOAT8E4M3FN}


def test_cuda_form_dequantizes_each_weight_exactly_like_numpy_and_the_blocked_form():
    rng = np.random.default_rng(3)
    weights = {  # in_features a multiple of 128 with two blocks, a partial block (Pad/Slice), a Gemm [out, in]
        "w_two_blocks": ("MatMul", rng.standard_normal((256, 384)).astype(np.float32)),
        "w_partial": ("MatMul", (rng.standard_normal((300, 200)) * 3).astype(np.float32)),
        "w_gemm": ("Gemm", (rng.standard_normal((130, 256)) * 0.01).astype(np.float32)),
    }
    blocked = _graph(weights)
    rep = quantize(blocked, "fp8", exclude=())
    assert len(rep.quantized) == 3
    cuda = ir.from_proto(onnx.load_from_string(ir.to_proto(blocked).SerializeToString()))
    p = Fp8CudaFormPass()
    p(cuda)
    assert p.rewritten == 3
    dqs = [n for n in cuda.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 3 and all(n.attributes.get("block_size") is None and n.inputs[1].shape.rank() == 0
                                 for n in dqs)  # per-tensor: what the CUDA EP runs
    assert sum(n.op_type == "Pad" for n in cuda.graph) == 1 and sum(n.op_type == "Slice" for n in cuda.graph) == 1
    assert _fp8_bytes(cuda) == _fp8_bytes(blocked)  # the fp8 bytes are the same initializers, unchanged

    feeds = {f"x{i}": rng.standard_normal((2, w.shape[0] if op == "MatMul" else w.shape[1])).astype(np.float32)
             for i, (op, w) in enumerate(weights.values())}
    deq = [f"{name}.dequantized" for name in weights]
    got_blocked, got_cuda = _run(blocked, feeds, deq), _run(cuda, feeds, deq)
    for name, (op, w) in weights.items():
        q, s, want = ref_fp8(w if op == "Gemm" else w.T)  # [out, in]
        assert np.array_equal(got_cuda[f"{name}.dequantized"], want), name
        assert np.array_equal(got_blocked[f"{name}.dequantized"], want), name
        stored = cuda.graph.initializers[f"{name}.fp8"].const_value.numpy()
        assert np.array_equal(stored.view(np.uint8), q.view(np.uint8)), name
    for i in range(3):
        np.testing.assert_array_equal(got_cuda[f"y{i}"], got_blocked[f"y{i}"])


def test_cuda_form_leaves_other_dequantize_nodes_alone():
    """Per-tensor fp8 and int8 DequantizeLinear are not the blocked fp8 form: nothing to rewrite."""
    x = h.make_tensor_value_info("x", TP.FLOAT, [4])
    nodes = [h.make_node("DequantizeLinear", ["q8", "s"], ["a"]), h.make_node("DequantizeLinear", ["qi", "s"], ["b"]),
             h.make_node("Add", ["a", "b"], ["c"]), h.make_node("Add", ["c", "x"], ["y"])]
    q8 = nh.from_array(np.array([1, 2, 3, 4], np.float32).astype(ml_dtypes.float8_e4m3fn), "q8")
    g = h.make_graph(nodes, "g", [x], [h.make_tensor_value_info("y", TP.FLOAT, [4])],
                     initializer=[q8, nh.from_array(np.array([1, 2, 3, 4], np.int8), "qi"),
                                  nh.from_array(np.array(0.5, np.float32), "s")])
    m = ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10))
    p = Fp8CudaFormPass()
    result = p(m)
    assert p.rewritten == 0 and not result.modified


def test_tiny_fp8_weights_reach_the_fp16_gemms_as_numpy_fp16_of_the_scheme(tiny_cuda_graphs):
    """quantize_fp8 then to_fp16 on tiny's prefill graph: each weight a MatMul/Gemm reads is a Cast to fp16
    of the dequantized weight (its Transpose, if any, after the cast), equal bit for bit to
    fp16(float32(q) * scale_inv[block]) from numpy, and the logits stay close to the fp32-activation fp8
    graph (the same weights unrounded)."""
    from passes.quant_weights import find_linear_sites
    m = ir.from_proto(onnx.load_from_string(tiny_cuda_graphs["prefill"]))
    fp32 = {s.weight.name: s.weight_oi for s in find_linear_sites(m.graph)}
    report = ort_cuda.quantize_fp8(m)
    names = [q["weight"] for q in report.quantized]
    assert names and report.linear_ratio <= 0.27
    assert not any(n.op_type == "DequantizeLinear" and n.attributes.get("block_size") is not None for n in m.graph)
    fp32_graph = ir.from_proto(onnx.load_from_string(ir.to_proto(m).SerializeToString()))
    fp16_report = ort_cuda.to_fp16(m)
    # find each fp16 weight: Cast(to fp16) of "<weight>.dequantized", possibly through its Transpose
    found = {}
    for n in m.graph:
        if n.op_type != "Cast" or n.attributes["to"].as_int() != ir.DataType.FLOAT16:
            continue
        v, transposed = n.inputs[0], False
        if v.producer() is not None and v.producer().op_type == "Transpose":
            v, transposed = v.producer().inputs[0], True
        if v.name.endswith(".dequantized"):
            found[n.outputs[0].name] = (v.name[: -len(".dequantized")], transposed)
    assert {b for b, _ in found.values()} == set(names)
    # the MatMuls' Transposes run after the cast, in fp16 (bit-identical; ORT can fuse them into FusedMatMul)
    assert not any(t for _, t in found.values()) and fp16_report.transposes_fp16 > 0
    assert all(n.outputs[0].dtype == ir.DataType.FLOAT16 for n in m.graph if n.op_type == "Transpose"
               and n.inputs[0].name.endswith("__fp16"))
    feeds = {"input_ids": np.array([[1, 5, 9, 200, 31]], np.int64)}
    sess_in = ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])
    for i in sess_in.get_inputs():
        if i.name.startswith("past."):
            shape = [1 if "batch" in str(d) else (0 if not isinstance(d, int) else d) for d in i.shape]
            feeds[i.name] = np.zeros(shape, np.float16)
    got = _run(m, feeds, list(found))
    for out, (base, transposed) in found.items():
        want = ref_fp8(fp32[base])[2].astype(np.float16)
        np.testing.assert_array_equal(got[out].view(np.uint16), (want.T if transposed else want).view(np.uint16))
    f32 = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feeds.items()}
    ref = _run(fp32_graph, f32, [])["logits"].ravel().astype(np.float64)
    lg = got["logits"].ravel().astype(np.float64)
    assert ref @ lg / (np.linalg.norm(ref) * np.linalg.norm(lg)) > 0.9999


def test_fp8_checkpoint_compiles_for_ort_cuda_as_fp8_with_its_bytes(tmp_path):
    """No --quant + an FP8 checkpoint: ort-cuda now has fp8, so the package is fp8; every non-expert FP8
    weight of the checkpoint is in the graphs byte for byte; budgets pass; the package re-verifies on CPU."""
    import torch

    import models
    from runtime import cuda_runtime
    from pipeline.compile import compile_package
    from pipeline.package import verify_package
    src = tmp_path / "tiny-fp8"
    models.save(models.load("tiny"), src, fp8=True)
    ckpt = models.load(src).checkpoint
    pkg = compile_package(str(src), "ort-cuda", tmp_path / "pkg", progress=lambda m: None, use_cache=False,
                          gen_tokens=8)
    man = json.loads((pkg / "manifest.json").read_text())
    t, choice = man["target"], man["quantization_choice"]
    assert t["quantization"] == "fp8" and t["precision"] == "fp16" and man["parity"]["passed"]
    assert choice["requested"] is None and choice["fp8_checkpoint"] and "passed through" in choice["why"]
    assert t["quantization_options"] == ort_cuda.FP8_OPTIONS and t["routed_expert_ops"] == {"QMoE": 0, "MoE": 2}
    digest = {n: hashlib.sha256(ckpt.raw_fp8(n)[0].view(torch.uint8).numpy().tobytes()).hexdigest()
              for n in ckpt.fp8_names}
    got = set()
    for f in (pkg / "onnx").glob("*.onnx"):
        m = onnx.load(str(f))
        for node in m.graph.node:  # every DequantizeLinear is per-tensor (the CUDA EP runs no blocked fp8 DQ)
            assert node.op_type != "DequantizeLinear" or not any(a.name == "block_size" and a.i for a in node.attribute)
        for init in m.graph.initializer:
            if init.data_type == FP8:
                got.add(hashlib.sha256(nh.to_array(init).view(np.uint8).tobytes()).hexdigest())
    missing = {n for n in ckpt.fp8_names if digest[n] not in got}
    assert missing == {n for n in ckpt.fp8_names if ".mlp.experts." in n}, sorted(missing)[:4]
    stages = {s["name"]: s for s in man["stages"]}
    assert stages["quantize"]["params"]["scheme"] == "fp8"
    judged = [r for s in man["stages"] for r in s["parity"]]
    assert any(r["stage"].startswith("quantize-fp8/") and r["passed"] for r in judged)  # the fp32-activation graphs
    fp8 = [r for r in judged if r["stage"].startswith("target-ort-cuda-fp8/")]
    assert {r["stage"].split("/")[1] for r in fp8} == {"prefill", "prefill-chunk", "decode", "greedy"}
    assert all(r["passed"] for r in fp8 if r["binding"])
    ref = man["golden"]["fp32_reference"]
    assert ref["stage"] == "target-ort-cuda-fp8" and ref["limits"]["prefill"]["logits"]["min_cosine"] < 0.95
    assert (pkg / "reports" / "quantization.json").is_file() and (pkg / "reports" / "error_profile.csv").is_file()
    readme = (pkg / "README.md").read_text()
    assert "## fp8 judgement" in readme and "DequantizeLinear" in readme and "not yet run on a GPU" in readme
    assert any("not expected to be faster" in s for s in man["verification"]["not_verified"])
    failures, _ = cuda_runtime.verify_golden(pkg, device="cpu")
    assert failures == [], failures
    assert verify_package(pkg) == []


def test_ort_cuda_refuses_w8a8_naming_its_schemes(tmp_path):
    from pipeline.compile import CompileError, compile_package
    with pytest.raises(CompileError, match=r"--quant w8a8: target 'ort-cuda' supports none, int8, int4, fp8"):
        compile_package("tiny", "ort-cuda", tmp_path / "pkg", quant="w8a8", progress=lambda m: None)
    assert not (tmp_path / "pkg").exists()
