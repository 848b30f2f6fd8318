"""ort-cuda target: fp16 conversion (CPU), the package build (CPU), and GPU runs (skipped without a GPU).

The GPU tests run a package compiled on a CPU machine (MLAMOE_ORT_CUDA_PACKAGE, benchmarks/gpu/README.md): the
compile-time parity needs the pinned onnxruntime CPU build, whose kernels (com.microsoft.MoE among
them) onnxruntime-gpu's CPU provider does not reproduce, and the two never share one environment.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import onnx_ir as ir
import pytest

from passes import PASSES
from targets import ort_cuda

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT

HAS_CUDA, NO_CUDA_REASON = ort_cuda.has_cuda_provider()
PACKAGE_ENV = "MLAMOE_ORT_CUDA_PACKAGE"


@pytest.fixture
def cpu_built_package(tmp_path):
    """A copy (the tests record into it) of the ort-cuda package named by $MLAMOE_ORT_CUDA_PACKAGE."""
    from conftest import package_copy
    src = os.environ.get(PACKAGE_ENV)
    if not src:
        pytest.skip(f"{PACKAGE_ENV} is not set: compile one on a CPU machine with the pinned onnxruntime "
                    "(`mlamoe compile --model tiny --target ort-cuda --out dist/tiny-ort-cuda`) and point "
                    f"{PACKAGE_ENV} at the folder or its .tar.gz (benchmarks/gpu/README.md)")
    def check(manifest):
        assert manifest["target"]["name"] == "ort-cuda", f"{src}: target {manifest['target']['name']}, not ort-cuda"
    return package_copy(src, tmp_path / "pkg", check)


@pytest.fixture(scope="module")
def tiny_graphs():
    """tiny with the ort-cpu MoE form (MoEGroupRouter): to_fp16 keeps that router op fp32 too."""
    from conftest import tiny_fused_graphs
    return tiny_fused_graphs(PASSES["moe-ort-fused"])


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
    from pipeline import fp16_reference
    from runtime.cuda_runtime import CudaPackageRuntime
    from pipeline.export import save_graph
    from pipeline.parity import compare, compare_fp16
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
    empty = model.empty_cache(1, "latent")
    inputs = {"input_ids": prompt.numpy(),
              **{f"past.{i}.{n}": t.numpy() for i, layer in enumerate(empty) for n, t in zip(("c_kv", "k_pe"), layer)}}
    ref16 = fp16_reference.case_outputs(model, inputs)
    report = compare_fp16("target-ort-cuda-fp16/prefill", {"logits": ref.numpy()}, {"logits": got},
                          {"logits": ref16["logits"]}, logits_outputs=["logits"])
    assert report.passed, report.to_dict()
    assert report.extra["fp16"]["outputs"]["logits"]["fp16_reference"]["cosine"] > 0.999
    # the plain budget (no fp16 reference) holds too on this model
    assert compare("target-ort-cuda-fp16/prefill", {"logits": ref.numpy()}, {"logits": got},
                   logits_outputs=["logits"]).passed
    from models.generation import greedy_generate
    ref_tokens, _ = greedy_generate(model, prompt, 16)
    tokens, _ = rt.generate(prompt.numpy(), 16)
    np.testing.assert_array_equal(tokens, ref_tokens.numpy())


def test_package_builds_without_gpu(tmp_path):
    from runtime import cuda_runtime
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
    tol = manifest["golden"]["tolerance"]
    assert set(tol["cases"]) == {"prefill", "prefill-chunk", "decode"} and tol["greedy"]["atol"] >= 0.02
    assert all(lim["logits"]["atol"] >= tol["atol"] for lim in tol["cases"].values())
    readme = (pkg / "README.md").read_text()
    assert "## fp16 judgement" in readme and "PyTorch fp16: max abs" in readme and "near ties excluded" in readme
    failures, record = cuda_runtime.verify_golden(pkg, device="cpu")
    assert failures == [], failures
    assert record["device"] == "cpu"
    # golden tokens that differ first at a near tie (fp32 margin within the greedy limits) are a note,
    # at a decisive step a failure
    gen = manifest["golden"]["greedy"]
    steps = np.load(pkg / gen["step_logits"])[0].astype(np.float64)
    top = np.sort(steps, -1)[:, -2:]
    lim = tol["greedy"]
    allowed = np.maximum(lim["atol"], lim["rtol"] * np.abs(top)).sum(-1)
    margin = top[:, 1] - top[:, 0]
    tokens = np.load(pkg / gen["tokens"])
    # a decisive step has no router near tie of its own either (runtime/cuda_runtime.py _choice_near_tie)
    choice = np.load(pkg / gen["choice_margins"]["routing"]).min(1) <= tol["choices"]["routing"]
    for step, tie in ((int(np.argmax(margin <= allowed)), True), (int(np.argmax((margin > allowed) & ~choice)), False)):
        assert (margin[step] <= allowed[step]) == tie
        want = tokens.copy()
        want[0, step] = int(np.argsort(steps[step])[-2])  # the runner-up
        np.save(pkg / gen["tokens"], want)
        failures, record = cuda_runtime.verify_golden(pkg, device="cpu")
        assert (failures == []) == tie, failures
        assert f"at step {step}" in (record["notes"] + failures)[0]
    np.save(pkg / gen["tokens"], tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON or "no GPU")
def test_package_verifies_on_gpu_and_records(cpu_built_package):
    from runtime import cuda_runtime
    pkg = cpu_built_package
    failures, record = cuda_runtime.verify_golden(pkg, device="cuda")
    assert failures == [], failures
    assert record["providers"][0] == "CUDAExecutionProvider"
    cuda_runtime.record_verification(pkg, record)
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["target"]["verified_with"]["providers"][0] == "CUDAExecutionProvider"
    assert manifest["verification"]["gpu"]["passed"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON or "no GPU")
def test_golden_cases_on_gpu_within_fp16_judgement(cpu_built_package):
    """Each golden case on the CUDA EP vs eager fp32 under compare_fp16, with the limits the compiler
    derived from PyTorch fp16 (golden.tolerance.cases); cosine/top-1/KL judged too, not only atol."""
    from runtime.cuda_runtime import CudaPackageRuntime
    from pipeline.parity import budget_for, compare_fp16
    pkg = cpu_built_package
    rt = CudaPackageRuntime(pkg, device="cuda")
    golden = rt.manifest["golden"]
    base = budget_for(golden["tolerance"]["stage"])
    for case in golden["cases"]:
        feeds = {n: np.load(pkg / f) for n, f in case["inputs"].items()}
        got = rt.run_numpy(case["graph"], feeds)
        ref = {n: np.load(pkg / f) for n, f in case["outputs"].items()}
        for n, r in ref.items():
            lim = golden["tolerance"]["cases"][case["name"]][n]
            rep = compare_fp16(f"gpu/{case['name']}", {n: r}, {n: got[n].astype(np.float32)},
                               logits_outputs=["logits"] if n == "logits" else [],
                               budget=dataclasses.replace(base, atol=lim["atol"], rtol=lim["rtol"]))
            assert rep.passed, rep.failure_reasons()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON or "no GPU")
def test_iobinding_keeps_cache_on_device(cpu_built_package):
    from runtime.cuda_runtime import CudaPackageRuntime
    rt = CudaPackageRuntime(cpu_built_package, device="cuda")
    _, past = rt.run("prefill", np.array([[1, 2, 3]]), rt.empty_cache(1))
    _, past = rt.run("decode", np.array([[4]]), past)
    v = past["past.0.c_kv"]
    assert v.device_name().lower() == "cuda" and v.shape()[1] == 4
