"""`mlamoe compile --stream` (pipeline/streaming.py, pipeline/layerwise.py, models/layer_stream.py): a checkpoint
compiled one decoder layer at a time. The references are independent of the streaming code: the whole eager model
(models.load) and ONNX Runtime on the saved package."""
from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

import models
from models.layer_stream import LayerStream
from pipeline import streaming
from pipeline.compile import CompileError, compile_package
from pipeline.parity import ParityError
from pipeline.verify import verify_full
from runtime.ort_runtime import PackageRuntime


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-ckpt") / "tiny"
    models.save(models.load("tiny", seed=3), folder)
    return folder


@pytest.fixture(scope="module")
def fp32_package(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "pkg"
    return compile_package(str(tiny_checkpoint), "ort-cpu", out, stream=True, progress=lambda m: None,
                           use_cache=False)


def test_layer_stream_layers_equal_the_loaded_models(tiny_checkpoint):
    model = models.load(tiny_checkpoint)
    stream = LayerStream(tiny_checkpoint)
    for i, whole in enumerate(model.model.layers):
        one = stream.layer(i)
        for (name, a), (_, b) in zip(sorted(whole.state_dict().items()), sorted(one.state_dict().items())):
            assert torch.equal(a, b), (i, name)


def test_streamed_package_matches_the_whole_eager_model(fp32_package, tiny_checkpoint):
    """The package's graphs (stitched from layer parts) against DeepseekForCausalLM.step of the model loaded
    whole: prompt, a chunk after it and greedy tokens."""
    model = models.load(tiny_checkpoint)
    manifest = json.loads((fp32_package / "manifest.json").read_text())
    rt = PackageRuntime(fp32_package, manifest=manifest)
    prompt = np.array([[5, 17, 33, 2, 90, 41, 7]], np.int64)
    tokens, step_logits = rt.generate(prompt, 12)
    ref_tokens, ref_logits = models.greedy_generate(model, torch.as_tensor(prompt), 12)
    assert np.array_equal(tokens, ref_tokens.numpy())
    np.testing.assert_allclose(step_logits, ref_logits.numpy(), atol=1e-4, rtol=1e-3)
    # the golden data the package ships were computed layer by layer: check them against the whole model too
    case = next(c for c in manifest["golden"]["cases"] if c["name"] == "prefill")
    ids = np.load(fp32_package / case["inputs"]["input_ids"])
    logits, _ = model.step(torch.as_tensor(ids), model.empty_cache(ids.shape[0]))
    shipped = np.load(fp32_package / case["outputs"]["logits"])
    np.testing.assert_allclose(shipped, logits.detach().numpy(), atol=1e-5, rtol=1e-4)


def test_streamed_package_verifies_and_has_one_weights_copy(fp32_package):
    ok, lines = verify_full(fp32_package)
    assert ok, lines
    manifest = json.loads((fp32_package / "manifest.json").read_text())
    assert manifest["io"]["weights"]["file"] == "onnx/weights.data"
    assert sorted(manifest["io"]["weights"]["graphs"]) == ["onnx/decode.onnx", "onnx/prefill.onnx"]
    reports = json.loads((fp32_package / "reports" / "parity.json").read_text())["stages"]
    layers = {r["stage"].split("/")[1] for r in reports if r["stage"].startswith("layer/")}
    assert layers == {"0", "1", "2"}
    assert manifest["streaming"]["end_to_end"] is True
    ops = {n.op_type for n in ir.load(fp32_package / "onnx" / "decode.onnx").graph}
    assert {"MoE", "MoEGroupRouter"} <= ops  # the target's passes ran on each layer


def test_a_layer_left_with_the_templates_weights_fails_its_layer_check(tiny_checkpoint, tmp_path, monkeypatch):
    """The fault `instantiate` guards against: every MoE layer keeping the weights of the layer its template was
    traced from. Layer 2 must fail its own check, naming it."""
    real = streaming.lw.instantiate
    first: dict[str, torch.nn.Module] = {}

    def stale(template, layer):
        return real(template, first.setdefault(streaming.lw.layer_kind(layer), layer))

    monkeypatch.setattr(streaming.lw, "instantiate", stale)
    with pytest.raises(ParityError, match=r"layer/2/prefill"):
        compile_package(str(tiny_checkpoint), "ort-cpu", tmp_path / "pkg", stream=True, progress=lambda m: None,
                        use_cache=False)
    assert not (tmp_path / "pkg").exists()


def test_int8_layer_checks_catch_a_scale_off_by_2x(tiny_checkpoint, tmp_path, monkeypatch):
    """--stream --quant int8: one layer's MatMulNBits scales doubled (its attention projections, the shared expert)
    fails that layer's teacher-forced check."""
    real = streaming._quantize
    calls = {"n": 0}

    def broken(graphs, quant):
        notes = real(graphs, quant)
        calls["n"] += 1
        if calls["n"] == 2:  # layer 1 (MoE)
            for m in graphs.values():  # every MatMulNBits scale of the layer
                for node in m.graph:
                    if node.op_type == "MatMulNBits":
                        v = node.inputs[2]
                        v.const_value = ir.Tensor(v.const_value.numpy() * 2, name=v.name)
        return notes

    monkeypatch.setattr(streaming, "_quantize", broken)
    with pytest.raises(ParityError, match=r"layer-int8/1/"):
        compile_package(str(tiny_checkpoint), "ort-cpu", tmp_path / "pkg", stream=True, quant="int8",
                        progress=lambda m: None, use_cache=False)


def test_int8_streamed_package_is_judged_per_layer_teacher_forced(tiny_checkpoint, tmp_path):
    pkg = compile_package(str(tiny_checkpoint), "ort-cpu", tmp_path / "pkg", stream=True, quant="int8",
                          progress=lambda m: None, use_cache=False, archive=False)
    assert not (tmp_path / "pkg.tar.gz").exists()
    reports = json.loads((pkg / "reports" / "parity.json").read_text())["stages"]
    moe = [r for r in reports if r["stage"].startswith("layer-int8/") and r["stage"].split("/")[1] in ("1", "2")]
    assert len(moe) == 6 and all(r["extra"]["routing"]["forced_routing_checked"] for r in moe)
    manifest = json.loads((pkg / "manifest.json").read_text())
    binding = [p for st in manifest["stages"] for p in st["parity"] if p["binding"]]
    assert binding and all(p["passed"] for p in binding)
    ops = {n.op_type for n in ir.load(pkg / "onnx" / "decode.onnx").graph}
    assert {"MatMulNBits", "QMoE"} <= ops
    ok, lines = verify_full(pkg)
    assert ok, lines


@pytest.mark.parametrize("spec,target,quant,match", [
    ("tiny", "ort-cpu", None, "reads a checkpoint folder"),
    (None, "ascend", None, "--stream builds for --target ort-cpu"),
    (None, "ort-cpu", "int4", "--stream builds --quant none, int8"),
])
def test_stream_refuses_what_it_cannot_build(tiny_checkpoint, tmp_path, spec, target, quant, match):
    with pytest.raises(CompileError, match=match):
        compile_package(spec or str(tiny_checkpoint), target, tmp_path / "pkg", stream=True, quant=quant,
                        progress=lambda m: None)


def test_fp8_checkpoint_streams_dequantized_as_a_load_does(tmp_path):
    """An FP8 e4m3 checkpoint: each streamed layer equals models.load's (blocks dequantized with their scales), and
    --stream without --quant refuses the fp8 default it cannot build, saying what to pass."""
    folder = tmp_path / "tiny-fp8"
    models.save(models.load("tiny", seed=5), folder, fp8=True)
    whole, stream = models.load(folder), LayerStream(folder)
    assert stream.is_fp8()
    for i, layer in enumerate(whole.model.layers):
        for (name, a), (_, b) in zip(sorted(layer.state_dict().items()), sorted(stream.layer(i).state_dict().items())):
            assert torch.equal(a, b), (i, name)
    assert stream.fp8_names and all(n.startswith("model.layers.") for n in stream.fp8_names)
    with pytest.raises(CompileError, match="pass --quant none or int8"):
        compile_package(str(folder), "ort-cpu", tmp_path / "pkg", stream=True, progress=lambda m: None)


def test_routing_flips_are_pooled_per_case_over_the_layers():
    """--stream judges the share of routing flips per golden case over every MoE layer (as a whole-model report pools
    its layers): one flip in each of 3 layers of 10 decisions is 10% (allowed), two in each is 20% (fails), and a
    case's flips do not count against another case's decisions."""
    def rep(layer, case, flips, n=10):
        return {"stage": f"layer-int8/{layer}/{case}", "extra": {"routing": {"n_flips": flips, "n_decisions": n}}}

    pooled, failures = streaming.pooled_flips([rep(i, "prefill", 1) for i in range(3)])
    assert pooled["prefill"]["n_flips"] == 3 and pooled["prefill"]["n_decisions"] == 30 and not failures
    pooled, failures = streaming.pooled_flips([rep(i, "prefill", 2) for i in range(3)] + [rep(0, "decode", 0, 2)])
    assert len(failures) == 1 and "case prefill" in failures[0] and "6 of 30" in failures[0]
    assert pooled["decode"] == {"n_flips": 0, "n_decisions": 2, "share": 0.0}
    assert not streaming.pooled_flips([rep(0, "decode", 1, 2)])[1]  # one flip is always allowed
