"""ort-cuda target: fp16 conversion (CPU), the package build (CPU), and GPU runs (skipped without a GPU)."""
from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

import models
from pipeline.export import export_graphs
from passes import PASSES, graphs_for
from passes.cleanup import cleanup
from targets import ort_cuda

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT

HAS_CUDA, NO_CUDA_REASON = ort_cuda.has_cuda_provider()


@pytest.fixture(scope="module")
def tiny_graphs():
    model = models.load("tiny", seed=0)
    graphs = export_graphs(model, "latent")
    for g in graphs_for("latent-kv-fusion"):
        PASSES["latent-kv-fusion"]()(graphs[g])
        cleanup(graphs[g])
    for g in ("prefill", "decode"):
        PASSES["moe-ort-fused"]()(graphs[g])
        cleanup(graphs[g])
    return model, {g: ir.to_proto(m).SerializeToString() for g, m in graphs.items()}


def _fp16(blob: bytes):
    import onnx
    m = ir.from_proto(onnx.load_from_string(blob))
    return m, ort_cuda.to_fp16(m)


def _out_dtype(node):
    return node.outputs[0].dtype


def test_fp16_keeps_numerics_islands_fp32(tiny_graphs):
    _, blobs = tiny_graphs
    m, report = _fp16(blobs["decode"])
    nodes = list(m.graph)
    by_op = {}
    for n in nodes:
        by_op.setdefault(n.op_type, []).append(n)
    assert all(_out_dtype(n) == F32 for n in by_op["Softmax"])
    assert all(_out_dtype(n) == F32 for n in by_op["ReduceMean"])  # RMSNorm statistics
    assert all(_out_dtype(n) == F32 for n in by_op.get("MoEGroupRouter", []))
    assert all(_out_dtype(n) == F16 for n in by_op["MoE"])
    # the router's gate projection (MatMul/Gemm feeding the router) stays fp32, the big ones are fp16
    for moe in by_op["MoE"]:
        probs = moe.inputs[1]
        src = probs.producer()
        while src.op_type == "Cast":
            src = src.inputs[0].producer()
        assert src.outputs[0].dtype == F32
    assert sum(_out_dtype(n) == F16 for n in by_op["MatMul"] + by_op.get("Gemm", [])) > 10
    # RoPE angles are computed in fp32 (Cos/Sin are not activation nodes)
    assert all(_out_dtype(n) == F32 for n in by_op["Cos"] + by_op["Sin"])
    # IO: cache fp16, logits fp32
    assert {v.name: v.dtype for v in m.graph.inputs if v.name.startswith("past.")} and \
        all(v.dtype == F16 for v in m.graph.inputs if v.name.startswith("past."))
    assert all(v.dtype == F16 for v in m.graph.outputs if v.name.startswith("present."))
    assert next(v for v in m.graph.outputs if v.name == "logits").dtype == F32
    assert report.islands["rmsnorm"] > 0 and report.weight_bytes_fp16 > 10 * report.weight_bytes_fp32


def test_fp16_graphs_on_ort_cpu_within_cuda_budget(tiny_graphs, tmp_path):
    """The fp16 graphs on ORT CPU vs eager fp32, budget target-ort-cuda-fp16."""
    import torch
    from pipeline.cuda_runtime import CudaPackageRuntime
    from pipeline.export import save_graph
    from pipeline.parity import compare
    model, blobs = tiny_graphs
    for g, blob in blobs.items():
        m, _ = _fp16(blob)
        save_graph(m, tmp_path / "onnx" / f"{g}.onnx")
    manifest = {"io": {"vocab_size": model.config.vocab_size,
                       "graphs": {g: {"file": f"onnx/{g}.onnx"} for g in blobs}},
                "target": {"session": ort_cuda.session_config()}}
    rt = CudaPackageRuntime(tmp_path, device="cpu", manifest=manifest)
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, _ = model.step(prompt, model.empty_cache(1, "latent"), "latent")
    got, past = rt.run("prefill", prompt.numpy(), rt.empty_cache(1))
    assert past["past.0.c_kv"].data_type() == "tensor(float16)"
    report = compare("target-ort-cuda-fp16/prefill", {"logits": ref.numpy()}, {"logits": got}, logits_outputs=["logits"])
    assert report.passed, report.to_dict()
    from models.generation import greedy_generate
    ref_tokens, _ = greedy_generate(model, prompt, 16)
    tokens, _ = rt.generate(prompt.numpy(), 16)
    np.testing.assert_array_equal(tokens, ref_tokens.numpy())


def test_package_builds_without_gpu(tmp_path):
    from pipeline import cuda_runtime
    from pipeline.compile import compile_package
    pkg = compile_package("tiny", "ort-cuda", tmp_path / "pkg", progress=lambda m: None, use_cache=False, gen_tokens=8)
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["parity"]["passed"]
    assert manifest["target"]["name"] == "ort-cuda"
    assert manifest["target"]["providers"][0] == "CUDAExecutionProvider"
    assert manifest["target"]["verified_with"] is None
    assert any(s.startswith("not yet run on a GPU") for s in manifest["verification"]["not_verified"])
    assert manifest["io"]["cache"]["dtype"] == "float16"
    assert (pkg / "runtime" / "cuda_runtime.py").is_file()
    assert (tmp_path / "pkg.tar.gz").is_file()
    failures, record = cuda_runtime.verify_golden(pkg, device="cpu")
    assert failures == [], failures
    assert record["device"] == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON or "no GPU")
def test_package_verifies_on_gpu_and_records(tmp_path):
    from pipeline import cuda_runtime
    from pipeline.compile import compile_package
    pkg = compile_package("tiny", "ort-cuda", tmp_path / "pkg", progress=lambda m: None, use_cache=False, gen_tokens=8)
    failures, record = cuda_runtime.verify_golden(pkg, device="cuda")
    assert failures == [], failures
    assert record["providers"][0] == "CUDAExecutionProvider"
    cuda_runtime.record_verification(pkg, record)
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["target"]["verified_with"]["providers"][0] == "CUDAExecutionProvider"
    assert manifest["verification"]["gpu"]["passed"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON or "no GPU")
def test_iobinding_keeps_cache_on_device(tmp_path):
    from pipeline.compile import compile_package
    from pipeline.cuda_runtime import CudaPackageRuntime
    pkg = compile_package("tiny", "ort-cuda", tmp_path / "pkg", progress=lambda m: None, use_cache=False, gen_tokens=4)
    rt = CudaPackageRuntime(pkg, device="cuda")
    _, past = rt.run("prefill", np.array([[1, 2, 3]]), rt.empty_cache(1))
    _, past = rt.run("decode", np.array([[4]]), past)
    v = past["past.0.c_kv"]
    assert v.device_name().lower() == "cuda" and v.shape()[1] == 4
