"""Quantized `tiny` graphs on ORT CPU: each scheme computes exactly the model with its weights
quantized by an independent numpy implementation; an FP8 checkpoint passes through bit-identical.

Parity budgets (pipeline.parity quantize-*) are judged on the trained model in
tests/test_quant_trained.py: tiny's random weights make MoE routing flip on near-ties, which says
nothing about a scheme (numbers are printed here for the record).
"""
from __future__ import annotations

import copy
import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import models
from passes.quantize import quantize
from pipeline.export import export_graph, specialize_decode
from pipeline.parity import compare

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_quant_schemes import ref_fp8, ref_int8  # noqa: E402  (the independent numpy schemes)

IDS = np.random.default_rng(0).integers(0, 256, (2, 8)).astype(np.int64)


def _feeds(m: ir.Model, ids: np.ndarray) -> dict:
    f = {"input_ids": ids}
    for v in m.graph.inputs[1:]:
        f[v.name] = np.zeros([ids.shape[0], 0, v.shape[2]], np.float32)
    return f


def _run(m: ir.Model, ids=IDS) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    s = ort.InferenceSession(ir.to_proto(m).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(["logits"], _feeds(m, ids))[0]


def _copy(m: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(m))


def _quantizable(name: str) -> bool:  # the test's own oracle of which weights a scheme touches
    return name.endswith(("proj.weight", "proj_with_mqa.weight")) and ".mlp.gate." not in name


def _fake_quant(model, dequant) -> torch.nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if _quantizable(name):
                p.copy_(torch.from_numpy(dequant(p.numpy().copy())))
    return m


def _int8_deq(w):
    n, k = w.shape
    # the block the pass picks for K (the cheapest power of two <= 128): tiny has K = 32, 64, 128
    return ref_int8(w, {32: 32, 64: 64, 128: 128}[k])[2]


@pytest.fixture(scope="module")
def tiny():
    model = models.load("tiny")
    return model, export_graph(model, "prefill")


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    models.save(models.load("tiny"), path, fp8=True)
    model = models.load(path)
    return model, export_graph(model, "prefill")


def _eager(model, ids=IDS):
    with torch.no_grad():
        return model(torch.from_numpy(ids)).numpy()


def test_int8_graph_is_the_numpy_quantized_model(tiny):
    model, g = tiny
    q = _copy(g)
    rep = quantize(q, "int8")
    assert len(rep.quantized) == 72 and {s["role"] for s in rep.skipped} == {"router", "lm_head"}
    got = _run(q)
    want = _eager(_fake_quant(model, _int8_deq))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    r = compare("quantize-int8", {"logits": _eager(model)}, {"logits": got}, logits_outputs=["logits"])
    print("tiny int8 vs eager:", r.outputs[0].to_dict())
    # the decode graph (specialised from prefill) quantizes and runs too
    d = specialize_decode(g)
    quantize(d, "int8")
    assert any(n.op_type == "MatMulNBits" for n in d.graph)
    assert _run(d, IDS[:, :1]).shape == (2, 1, 256)


def test_int8_size(tiny):
    _, g = tiny
    rep = quantize(_copy(g), "int8")
    # K = 32 rows need a 32-wide block (1 + 4/32 bytes per weight): 0.281x; K >= 64 is <= 0.266x
    wide = [q for q in rep.quantized if q["shape_oi"][1] >= 64]
    assert sum(q["bytes_after"] for q in wide) / sum(q["bytes_before"] for q in wide) <= 0.27
    assert rep.linear_ratio <= 0.28


def test_w8a8_runs_on_ort(tiny):
    from passes.quant_w8a8 import calibrate
    model, g = tiny
    q = _copy(g)
    cal = calibrate(q, [_feeds(q, np.random.default_rng(1).integers(0, 256, (2, 16)))])
    rep = quantize(q, "w8a8", calibration=cal)
    assert "15 linear sites with static" in rep.notes[0]
    got = _run(q)
    assert np.isfinite(got).all()
    r = compare("quantize-w8a8", {"logits": _eager(model)}, {"logits": got}, logits_outputs=["logits"])
    print("tiny w8a8 vs eager:", r.outputs[0].to_dict())


def test_fp8_checkpoint_passes_through_bit_identical(tiny_fp8):
    model, g = tiny_fp8
    q = _copy(g)
    rep = quantize(q, "fp8", model=model)
    src = model.checkpoint
    assert len(src.fp8_names) == 72
    by_name = {r["checkpoint_name"]: r for r in rep.quantized}
    assert set(by_name) == set(src.fp8_names)  # every quantized weight came from the checkpoint
    for name in src.fp8_names:
        w, s = src.raw_fp8(name)
        base = by_name[name]["weight"]
        got_w = q.graph.initializers[f"{base}.fp8"].const_value.tobytes()
        got_s = q.graph.initializers[f"{base}.weight_scale_inv"].const_value.tobytes()
        assert hashlib.sha256(got_w).digest() == hashlib.sha256(w.view(torch.uint8).numpy().tobytes()).digest()
        assert got_s == s.numpy().tobytes()
    assert rep.linear_ratio <= 0.27
    # the graph computes the checkpoint's own dequantized weights, i.e. the loaded model
    got = _run(q)
    np.testing.assert_allclose(got, _eager(model), atol=2e-5, rtol=0)


def test_fp8_fresh_quantization_is_the_numpy_scheme(tiny):
    model, g = tiny
    q = _copy(g)
    rep = quantize(q, "fp8")
    assert rep.linear_ratio <= 0.27
    got = _run(q)
    np.testing.assert_allclose(got, _eager(_fake_quant(model, lambda w: ref_fp8(w)[2])), atol=2e-5, rtol=0)
    r = compare("quantize-fp8", {"logits": _eager(model)}, {"logits": got}, logits_outputs=["logits"])
    print("tiny fp8 vs eager:", r.outputs[0].to_dict())


def test_fp8_checkpoint_defaults_to_fp8_and_its_bytes_reach_the_package(tmp_path):
    """No --quant + an FP8 checkpoint on ort-cpu (which has fp8): the package is fp8 and holds the
    checkpoint's own E4M3 bytes for every weight but the routed experts; the manifest says why."""
    import json

    import onnx

    from pipeline.compile import compile_package
    src = tmp_path / "tiny-fp8"
    models.save(models.load("tiny"), src, fp8=True)
    ckpt = models.load(src).checkpoint
    pkg = compile_package(str(src), "ort-cpu", tmp_path / "pkg", cache_dir=tmp_path / "cache", progress=lambda m: None)
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["target"]["quantization"] == "fp8"
    choice = manifest["quantization_choice"]
    assert choice["requested"] is None and choice["fp8_checkpoint"] and "passed through" in choice["why"]
    digest = {n: hashlib.sha256(ckpt.raw_fp8(n)[0].view(torch.uint8).numpy().tobytes()).hexdigest() for n in ckpt.fp8_names}
    got = set()
    for f in (pkg / "onnx").glob("*.onnx"):
        for t in onnx.load(str(f)).graph.initializer:
            if t.data_type == onnx.TensorProto.FLOAT8E4M3FN:
                got.add(hashlib.sha256(onnx.numpy_helper.to_array(t).view(np.uint8).tobytes()).hexdigest())
    # routed experts live in com.microsoft.MoE (fp32: no FP8 MoE kernel in ORT) and the manifest says so
    assert "routed experts excepted" in choice["why"]
    missing = {n for n in ckpt.fp8_names if digest[n] not in got}
    assert missing == {n for n in ckpt.fp8_names if ".mlp.experts." in n}, sorted(missing)[:4]


def test_fp8_checkpoint_on_a_target_without_fp8_is_dequantized_and_says_so():
    from pipeline.compile import _default_quant
    from targets import get_profile
    ascend = get_profile("ascend")
    quant, why = _default_quant(None, "none", True, ascend)
    assert quant == "none" and "no fp8 scheme" in why and "dequantized" in why and "none, w8a8" in why
    assert _default_quant("w8a8", "w8a8", True, ascend) == ("w8a8", None)  # an explicit --quant wins
    assert _default_quant(None, "none", False, get_profile("ort-cpu")) == ("none", None)  # not an FP8 checkpoint
