"""Quantized ort-cuda packages (`--quant int8` / `--quant int4` / `--quant fp8`) on a GPU (marked gpu; CI skips: no
onnxruntime-gpu there). A package compiled on a CPU machine (MLAMOE_ORT_CUDA_PACKAGE, benchmarks/gpu/README.md)
runs on the CUDA EP against eager fp32 (golden/fp32) under the limits its compiler recorded, reproduces
its golden data, and each quantized op is placed on the CUDA EP (ORT silently falls back to the CPU EP
for a node without a CUDA kernel for its dtype, bits or block size). Without a package: int4's QMoE 4-bit form
(block 32, zero points, fp16 scales, raw layout) on the CUDA EP against numpy (tests/test_ort_cuda_int4.py's case).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from targets import ort_cuda

HAS_CUDA, NO_CUDA_REASON = ort_cuda.has_cuda_provider()
PACKAGE_ENV = "MLAMOE_ORT_CUDA_PACKAGE"
QUANTIZED = ("int8", "int4", "fp8")
# the ops that carry each scheme (and the MoE that holds the routed experts)
SCHEME_OPS = {"int8": ("MatMulNBits", "QMoE", "MoE"), "int4": ("MatMulNBits", "QMoE", "MoE"),
              "fp8": ("DequantizeLinear", "MoE")}


@pytest.fixture
def quant_package(tmp_path):
    from conftest import package_copy
    src = os.environ.get(PACKAGE_ENV)
    if not src:
        pytest.skip(f"{PACKAGE_ENV} is not set: compile a quantized package on a CPU machine (`mlamoe compile --model "
                    "tiny --target ort-cuda --quant int8|int4|fp8 --out dist/tiny-ort-cuda-int8`) and point it there")
    def check(manifest):
        if manifest["target"].get("quantization") not in QUANTIZED:
            pytest.skip(f"{src}: an ort-cuda package of quantization {manifest['target'].get('quantization')!r}, "
                        f"not one of {', '.join(QUANTIZED)}")
    return package_copy(src, tmp_path / "pkg", check)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON or "no GPU")
def test_quantized_package_on_gpu_vs_eager_fp32(quant_package):
    """Each golden case on the CUDA EP against eager fp32 (golden/fp32) under the limits the compiler
    recorded (quantize-<scheme> + fp16), and the golden data (the graphs' CPU outputs) reproduced."""
    from runtime import cuda_runtime
    from pipeline.parity import Budget, compare
    pkg = quant_package
    failures, record = cuda_runtime.verify_golden(pkg, device="cuda")
    assert failures == [], failures
    rt = cuda_runtime.CudaPackageRuntime(pkg, device="cuda")
    ref = rt.manifest["golden"]["fp32_reference"]
    for case in ref["cases"]:
        feeds = {n: np.load(pkg / f) for n, f in case["inputs"].items()}
        got = rt.run_numpy(case["graph"], feeds)
        for n, f in case["outputs"].items():
            lim = ref["limits"][case["name"]][n]
            budget = Budget(**{k: (math.inf if v is None and k in ("atol", "rtol") else v) for k, v in lim.items()})
            rep = compare(f"gpu-{rt.manifest['target']['quantization']}/{case['name']}", {n: np.load(pkg / f)},
                          {n: got[n].astype(np.float32)}, logits_outputs=["logits"] if n == "logits" else [],
                          budget=budget)
            assert rep.passed, rep.failure_reasons()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON or "no GPU")
def test_quantized_ops_run_on_the_cuda_ep(quant_package):
    """The profile of one prefill and one decode step: every node of the scheme's ops (MatMulNBits, QMoE
    or MoE for int8 and int4; DequantizeLinear and MoE for fp8) and every node of the fp8 CUDA form
    (passes/quant_fp8_cuda.py names them "<weight>/fp8_cuda_*") ran on CUDAExecutionProvider."""
    from runtime.cuda_runtime import CudaPackageRuntime
    rt = CudaPackageRuntime(quant_package, device="cuda", profile=True)
    scheme = rt.manifest["target"]["quantization"]
    _, past = rt.run("prefill", np.array([[1, 2, 3]]), rt.empty_cache(1))
    rt.run("decode", np.array([[4]]), past)
    placed: dict = {}
    for sess in rt.sessions.values():
        path = sess.end_profiling()
        events = json.loads(open(path).read())
        os.remove(path)
        for e in events:
            a = e.get("args", {})
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            if a.get("op_name") in SCHEME_OPS[scheme]:
                placed.setdefault(a["op_name"], set()).add(a.get("provider"))
            if "/fp8_cuda_" in e["name"]:
                placed.setdefault("fp8 CUDA form", set()).add(a.get("provider"))
    want = {"int8": ("MatMulNBits",), "int4": ("MatMulNBits",), "fp8": ("DequantizeLinear", "fp8 CUDA form")}[scheme]
    assert all(placed.get(op) == {"CUDAExecutionProvider"} for op in want), placed
    assert placed.get("QMoE", placed.get("MoE")) == {"CUDAExecutionProvider"}, placed  # experts: MoE or QMoE
    assert all(v == {"CUDAExecutionProvider"} for v in placed.values()), placed


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON or "no GPU")
def test_int4_qmoe_4bit_block_zero_points_on_the_cuda_ep():
    """int4's routed-expert form (QMoE expert_weight_bits 4, block 32, uint8 zero points, fp16 scales and
    activations, weights_prepacked=0; trained-small's expert shape) on CUDAExecutionProvider: placed there (not
    the CPU fallback) and equal to the numpy DeepSeekMoE with the dequantized 4-bit weights."""
    import onnx_ir as ir
    import onnxruntime as ort
    from test_ort_cuda_int4 import qmoe_int4_case
    m, feeds, _, want, _, tol, _ = qmoe_int4_case()
    so = ort.SessionOptions()
    so.log_severity_level, so.enable_profiling = 3, True
    sess = ort.InferenceSession(ir.to_proto(m).SerializeToString(), so, providers=ort_cuda.providers())
    got = sess.run(None, feeds)[0].astype(np.float32)
    path = sess.end_profiling()
    events = json.loads(open(path).read())
    os.remove(path)
    placed = {e["args"].get("provider") for e in events if e.get("cat") == "Node"
              and e.get("args", {}).get("op_name") == "QMoE"}
    assert placed == {"CUDAExecutionProvider"}, placed
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
