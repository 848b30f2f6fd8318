"""Routing-aware judging of the lossy (quantize) stages on randomized transformers checkpoints.

Checkpoints saved by transformers (DeepSeek-V3: sigmoid + noaux_tc, non-zero e_score_correction_bias;
DeepSeek-V2: softmax + group_limited_greedy; 4 groups keep 2), weights scaled x3 so that routing decisions
sit close together and quantization flips some of them. Each scheme must pass with its numeric error judged
under teacher-forced routing (the reference's gate logits forced into the quantized graph) and its flips
reported; the same comparison must fail a quantizer that is wrong.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import hf_reference
import models
from models.config import DeepseekConfig
from models.moe import Router as TorchRouter
from passes import PASSES, graphs_for
from passes.cleanup import cleanup
from passes.quantize import quantize
from pipeline.build import calibrate_w8a8, moe_routers, routed_reports
from pipeline.export import export_graphs, save_graph
from pipeline.golden import make_golden
from pipeline.package_readme import judged_line
from pipeline.parity import ParityError, Router, route
from targets import ort_cpu

CHECKPOINTS = {  # name: (family, seed, config overrides)
    "v3-s0": ("v3", 0, {}),
    "v2-s1": ("v2", 1, {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}),
}


_MODELS: dict[tuple[str, float], object] = {}


def shared_checkpoint(name: str, tmp_path_factory, gate_scale: float = 3.0):
    """randomized_checkpoint, built once per module for each (name, gate_scale)."""
    if (name, gate_scale) not in _MODELS:
        _MODELS[name, gate_scale] = randomized_checkpoint(name, tmp_path_factory.mktemp(f"ckpt-{name}"), gate_scale)
    return _MODELS[name, gate_scale]


def randomized_checkpoint(name: str, folder, gate_scale: float = 3.0):
    """A transformers-saved checkpoint of CHECKPOINTS[name], weights x3 (router gates and, with gate_scale != 3,
    e_score_correction_bias x gate_scale), loaded by models.load."""
    family, seed, over = CHECKPOINTS[name]
    hf = hf_reference.hf_model(family, seed=seed, **over)
    with torch.no_grad():
        for k, t in hf.state_dict().items():
            if t.dim() >= 2:
                t.mul_(gate_scale if k.endswith("mlp.gate.weight") else 3.0)
            elif k.endswith("e_score_correction_bias") and gate_scale != 3.0:
                t.mul_(gate_scale)
    hf.save_pretrained(folder)
    return models.load(folder)


_EXPORTS: dict[int, dict[str, bytes]] = {}  # id(model) -> its exported latent graphs, exported once per module


def fp32_graphs(model, passes, folder, factories=None):
    """The exported latent graphs after `passes` (PASSES, or `factories`' variant), saved in folder."""
    if id(model) not in _EXPORTS:
        _EXPORTS[id(model)] = {g: ir.to_proto(m).SerializeToString() for g, m in export_graphs(model, "latent").items()}
    graphs = {g: ir.from_proto(onnx.load_from_string(b)) for g, b in _EXPORTS[id(model)].items()}
    for name in passes:
        for g in graphs_for(name):
            (factories or {}).get(name, PASSES[name])()(graphs[g])
            cleanup(graphs[g])
    for g, m in graphs.items():
        save_graph(m, folder / f"{g}.onnx")
    return folder


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def fp32_stage(request, tmp_path_factory):
    """(model, golden, folder of the ort-cpu fp32 graphs after the passes) for one randomized checkpoint."""
    model = shared_checkpoint(request.param, tmp_path_factory)
    folder = fp32_graphs(model, ort_cpu.PROFILE.passes, tmp_path_factory.mktemp(f"fp32-{request.param}"))
    return model, make_golden(model, "latent", gen_tokens=2), folder


def _quantized(model, folder, scheme: str, out, fault=None) -> dict:
    calibration = calibrate_w8a8(ir.load(folder / "prefill.onnx"), model.config, 0) if scheme == "w8a8" else None
    paths = {}
    for g in ("prefill", "decode"):
        m = ir.load(folder / f"{g}.onnx")
        quantize(m, scheme, model=model, calibration=calibration)
        if fault is not None:
            fault(m)
        paths[g] = out / f"{g}.onnx"
        save_graph(m, paths[g])
    return paths


def _reports(model, golden, folder, scheme, out, fault=None):
    paths = _quantized(model, folder, scheme, out, fault)
    return routed_reports(f"quantize-{scheme}", paths, {g: folder / f"{g}.onnx" for g in paths}, golden,
                          moe_routers(model))


@pytest.mark.parametrize("scheme", ["int8", "w8a8", "fp8"])
def test_every_scheme_passes_with_flips_reported(fp32_stage, scheme, tmp_path):
    model, golden, folder = fp32_stage
    reports = _reports(model, golden, folder, scheme, tmp_path)
    for r in reports:
        r.raise_if_failed()
        rt = r.extra["routing"]
        assert rt["n_decisions"] > 0 and len(rt["layers"]) == len(moe_routers(model))
        assert rt["n_flips"] == len(rt["flips"]) and all(f["margin"] <= f["allowed"] for f in rt["flips"])
        assert "logits" in rt["unforced"]  # the graph routing by itself, recorded
        print(r.stage, rt["summary"], "forced cosine", r.outputs[0].cosine,
              "unforced", rt["unforced"]["logits"]["cosine"])
    line = judged_line(reports, "checkpoint")
    assert line.startswith(f"**Judged:** Quantize-{scheme}: logits cosine >= ") and "routing decisions flipped" in line


def _initializers_of(m: ir.Model, op_type: str, index: int) -> list[ir.Value]:
    node = [n for n in m.graph if n.op_type == op_type][index]
    return [v for v in node.inputs if v is not None and v.const_value is not None]


def _scale(v: ir.Value, f) -> None:
    v.const_value = ir.tensor(f(v.const_value.numpy().copy()), name=v.name)


def test_expert_scales_off_by_2x_fail(fp32_stage, tmp_path):
    """One MoE layer's routed-expert int8 scales doubled (QMoE of the second MoE layer)."""
    model, golden, folder = fp32_stage

    def fault(m):
        for v in _initializers_of(m, "QMoE", 1):
            if "scale" in v.name:
                _scale(v, lambda s: s * 2)
    reports = _reports(model, golden, folder, "int8", tmp_path, fault)
    failed = [r for r in reports if not r.passed]
    assert failed, [r.outputs[0].cosine for r in reports]
    with pytest.raises(ParityError, match=r"(?s)output 'logits'.*cosine 0\.\d+ < 0\.99"):
        failed[0].raise_if_failed()


def test_dequantization_dropping_a_block_fails(fp32_stage, tmp_path):
    """A dequantization that drops the first K-block of a weight (its scales zeroed in every row)."""
    model, golden, folder = fp32_stage

    def fault(m):
        q, scales = _initializers_of(m, "MatMulNBits", 0)[:2]  # MatMulNBits(A, B q8 [N, K/bs, bs], scales [N*K/bs])
        n_rows = q.const_value.shape[0]
        _scale(scales, lambda x: (x.reshape(n_rows, -1) * (np.arange(x.size // n_rows) > 0)).reshape(-1)
               .astype(x.dtype))
    reports = _reports(model, golden, folder, "int8", tmp_path, fault)
    failed = [r for r in reports if not r.passed]
    assert failed, [r.outputs[0].cosine for r in reports]
    with pytest.raises(ParityError, match=r"(?s)quantize-int8/.*output '(logits|present)"):
        failed[0].raise_if_failed()


def test_route_matches_the_models_router():
    """route() (numpy) chooses the experts models/moe.Router chooses, on random gate logits."""
    for family, over in (("v3", {}), ("v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}),
                         ("v2", {})):
        cfg = DeepseekConfig.from_hf_dict(hf_reference.hf_config(family, **over).to_dict())
        r = TorchRouter(cfg)
        torch.nn.init.normal_(r.weight)
        if r.e_score_correction_bias is not None:
            r.e_score_correction_bias.normal_(0, 0.1)
        x = torch.randn(64, cfg.hidden_size)
        _, idx = r(x)
        logits = torch.nn.functional.linear(x, r.weight).detach().numpy()
        ids, margin = route(Router.of(cfg, None if r.e_score_correction_bias is None
                                      else r.e_score_correction_bias.detach().numpy()), logits)
        np.testing.assert_array_equal(ids, np.sort(idx.numpy(), -1))
        assert (margin >= 0).all()


def test_default_model_is_trained_small():
    """`mlamoe compile` with no --model (and `make compile`) builds the shipped trained checkpoint."""
    from click.testing import CliRunner

    from pipeline.cli import main
    help_text = CliRunner().invoke(main, ["compile", "--help"]).output
    assert "[default: trained-small]" in help_text
    assert models.resolve("trained-small") == str(models.TRAINED_SMALL)
    assert models.load_config("trained-small").num_hidden_layers >= 1
    assert "MODEL  ?= trained-small" in (models.TRAINED_SMALL.parents[2] / "Makefile").read_text()


def test_router_gate_off_by_2x_fails(fp32_stage, tmp_path):
    """One MoE layer's router gate weights doubled: forced routing hides it from the logits, the judged gate
    logits (rel euclid 1.0) and the flips do not."""
    model, golden, folder = fp32_stage

    def fault(m):
        gemm = next(n for n in m.graph if n.op_type in ("Gemm", "MatMul") and n.outputs[0].uses()
                    and any(u.op_type in ("MoEGroupRouter", "MoE", "QMoE", "Sigmoid", "Softmax")
                            for u, _ in n.outputs[0].uses()) and n.inputs[1].const_value is not None)
        _scale(gemm.inputs[1], lambda w: w * 2)
    reports = _reports(model, golden, folder, "int8", tmp_path, fault)
    failed = [r for r in reports if not r.passed]
    assert failed
    with pytest.raises(ParityError, match=r"(?s)output 'routing\.0\.gate_logits': .*rel_euclid 1"):
        failed[0].raise_if_failed()


# ---------------------------------------------------------------------------------- ort-cuda fp16, routing-aware

def _cuda_stage(tmp_path_factory, gate_scale: float, **golden):
    from targets import ort_cuda
    from targets.ort_cuda.build import CUDA_PASS_OVERRIDES
    model = shared_checkpoint("v3-s0", tmp_path_factory, gate_scale)
    folder = fp32_graphs(model, ort_cuda.PROFILE.passes, tmp_path_factory.mktemp("fp32-cuda"), CUDA_PASS_OVERRIDES)
    return model, make_golden(model, "latent", gen_tokens=2, **golden), folder


@pytest.fixture(scope="module")
def cuda_fp32_stage(tmp_path_factory):
    """(model, golden, the ort-cuda fp32 graphs after its passes) for the V3 randomized checkpoint."""
    return _cuda_stage(tmp_path_factory, 3.0)


@pytest.fixture(scope="module")
def cuda_flat_router_stage(tmp_path_factory):
    """The same with router gates and bias x0.01: gate logits near 0, choice scores ~1e-3 apart, so that fp16
    rounding of the scores (2.4e-4 to 4.9e-4 near 0.5) would change choices where an fp32 router does not."""
    return _cuda_stage(tmp_path_factory, 0.01)


def _cuda_reports(stage_data, out, quant=None, router_fp32=True, monkeypatch=None):
    from targets import ort_cuda
    from targets.ort_cuda import graphs as cuda_graphs
    from targets.ort_cuda.build import PROFILE_STAGE, QUANT_STAGES, fp16_case_reports
    from pipeline.parity import BUDGETS
    model, golden, folder = stage_data
    src = folder
    if quant == "int8":
        src = out / "int8"
        for g in ("prefill", "decode"):
            m = ir.load(folder / f"{g}.onnx")
            ort_cuda.quantize_int8(m)
            save_graph(m, src / f"{g}.onnx")
    if not router_fp32:  # the fault: the router's fp32 island lost (gate projection and scores in fp16)
        monkeypatch.setattr(cuda_graphs, "_router_nodes", lambda graph: set())
        monkeypatch.setattr(cuda_graphs, "_ALWAYS_FP32", {"Softmax", "LogSoftmax"})
    for g in ("prefill", "decode"):
        ort_cuda.convert_graph_files(src / f"{g}.onnx", out / "fp16" / f"{g}.onnx")
    stage = QUANT_STAGES[quant] if quant else PROFILE_STAGE
    return fp16_case_reports(stage, out / "fp16", golden, ort_cuda.session_config(), model, "latent", folder,
                             quant_budget=BUDGETS[f"quantize-{quant}"] if quant else None)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_ort_cuda_fp16_judged_with_forced_routing(cuda_fp32_stage, quant, tmp_path):
    """ort-cuda's fp16 (and int8) graphs on the x3 checkpoint: numeric error judged with the fp32 graphs' gate
    logits forced, flips counted apart, and the fp32 router reproduces the forced choice exactly."""
    reports = _cuda_reports(cuda_fp32_stage, tmp_path, quant)
    for r in reports:
        r.raise_if_failed()
        rt = r.extra["routing"]
        assert rt["forced_routing_checked"] and rt["n_decisions"] > 0
        assert all(layer["forced_not_reproduced"] == 0 for layer in rt["layers"]), rt["layers"]
        assert "fp16" in r.extra and "logits" in rt["unforced"]
        print(r.stage, rt["summary"], "forced cosine", r.outputs[0].cosine,
              "unforced", rt["unforced"]["logits"]["cosine"])


def test_flat_router_fused_and_reproduced_under_forcing(cuda_flat_router_stage, tmp_path):
    """Routers whose probe tokens nearly tie (gates x0.01) are still fused (the MoE lowering's verification leaves
    fp32-rounding ties out), and the fp32 router reproduces every forced choice above FORCED_TIE_MARGIN."""
    model, golden, folder = cuda_flat_router_stage
    for g in ("prefill", "decode"):
        assert sum(n.op_type == "MoE" for n in ir.load(folder / f"{g}.onnx").graph) == len(moe_routers(model))
    for r in _cuda_reports(cuda_flat_router_stage, tmp_path):
        r.raise_if_failed()
        assert all(layer["forced_not_reproduced"] == 0 for layer in r.extra["routing"]["layers"]), r.stage


def test_ort_cuda_router_in_fp16_is_refused(cuda_flat_router_stage, tmp_path, monkeypatch):
    """The fault: the router's fp32 island dropped from the fp16 conversion. ORT CPU would not show it (its
    InsertCastTransformer keeps chained fallback ops in fp32), so the conversion's postcondition refuses it, naming
    the MoE node and the op."""
    from targets.ort_cuda.graphs import RouterPrecisionError
    with pytest.raises(RouterPrecisionError, match=r"MoE node .*router computes in fp16 at \w+ "):
        _cuda_reports(cuda_flat_router_stage, tmp_path, router_fp32=False, monkeypatch=monkeypatch)


def test_router_bias_dropped_fails(fp32_stage, tmp_path):
    """A router that loses e_score_correction_bias (choice only, so forced logits and weights look right): the
    forced-routing check fails it. V3 only (V2 routes without a bias)."""
    model, golden, folder = fp32_stage
    if model.config.topk_method != "noaux_tc":
        pytest.skip("the V2 checkpoint's router has no e_score_correction_bias")

    def fault(m):
        node = next(n for n in m.graph if n.op_type == "MoEGroupRouter")
        bias = next(v for v in node.inputs[1:] if v is not None and v.const_value is not None)
        _scale(bias, lambda b: b * 0)
    reports = _reports(model, golden, folder, "int8", tmp_path, fault)
    failed = [r for r in reports if not r.passed]
    assert failed
    with pytest.raises(ParityError, match=r"routing: layer 0 position .*reference margin"):
        failed[0].raise_if_failed()
