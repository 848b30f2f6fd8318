"""Routing-aware judging of the lossy (quantize) stages on randomized transformers checkpoints.

Checkpoints saved by transformers (DeepSeek-V3: sigmoid + noaux_tc, non-zero e_score_correction_bias;
DeepSeek-V2: softmax + group_limited_greedy; 4 groups keep 2), weights scaled x3 so that routing decisions
sit close together and quantization flips some of them. Each scheme must pass with its numeric error judged
under teacher-forced routing (the reference's gate logits forced into the quantized graph) and its flips
reported; the same comparison must fail a quantizer that is wrong.
"""
from __future__ import annotations

import numpy as np
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


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def fp32_stage(request, tmp_path_factory):
    """(model, golden, folder of the ort-cpu fp32 graphs after the passes) for one randomized checkpoint."""
    family, seed, over = CHECKPOINTS[request.param]
    hf = hf_reference.hf_model(family, seed=seed, **over)
    with torch.no_grad():
        for t in hf.state_dict().values():
            if t.dim() >= 2:
                t.mul_(3.0)
    ckpt = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    hf.save_pretrained(ckpt)
    model = models.load(ckpt)
    graphs = export_graphs(model, "latent")
    for name in ort_cpu.PROFILE.passes:
        for g in graphs_for(name):
            PASSES[name]()(graphs[g])
            cleanup(graphs[g])
    folder = tmp_path_factory.mktemp(f"fp32-{request.param}")
    for g, m in graphs.items():
        save_graph(m, folder / f"{g}.onnx")
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
