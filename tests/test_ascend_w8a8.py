"""`mlamoe compile --target ascend --quant w8a8` on tiny: the package builds through the CLI, its graphs
pass the (w8a8) profile checker, every QDQ weight dequantizes exactly to an independent numpy
per-channel int8 quantization of the eager weights (routed experts included, in both static expert
forms), nothing that must stay fp32 is quantized, parity is recorded and within budget, and the
manifest/README say quant w8a8 and what was not verified. Plus the profile's Q/DQ rules and the
schemes the ascend target refuses (fp8)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper

import models
from pipeline.cli import main
from pipeline.compile import CompileError, compile_package
from targets.ascend import checker
from targets.ascend.profile import AscendProfileError, make_profile


def ref_w8(w_oi: np.ndarray) -> np.ndarray:
    """Independent per-output-channel symmetric int8 (amax/127, round half even, clip +-127),
    dequantized, float32 throughout: [out, in] -> [out, in]."""
    w = np.asarray(w_oi, np.float32)
    amax = np.max(np.abs(w), axis=1)
    s = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8)
    return q.astype(np.float32) * s[:, None]


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """ONNX DequantizeLinear (zero point 0) in numpy."""
    if scale.ndim == 0:
        return q.astype(np.float32) * scale
    shape = [1] * q.ndim
    shape[axis] = scale.size
    return q.astype(np.float32) * scale.reshape(shape)


@pytest.fixture(scope="module")
def tiny():
    return models.load("tiny")


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    out = tmp_path_factory.mktemp("ascend_w8a8") / "tiny-ascend-w8a8"
    # the shapes of export_static_graphs' defaults, which test_quant_parity_is_routing_aware... re-exports
    r = CliRunner().invoke(main, ["compile", "--model", "tiny", "--target", "ascend", "--quant", "w8a8",
                                  "--max-cache", "256", "--prefill-buckets", "16,64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _graphs(pkg):
    return sorted((pkg / "onnx").glob("*.onnx"))


def test_manifest_says_w8a8_and_what_was_not_verified(pkg):
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["target"]["name"] == "ascend" and m["target"]["quantization"] == "w8a8"
    q = m["ascend"]["quantization"]
    assert q["scheme"] == "w8a8" and q["ascend_route"]["verified"] is False
    assert "convert_qat_model" in q["ascend_route"]["documented"]
    not_verified = " ".join(m["verification"]["not_verified"])
    assert "convert_qat_model" in not_verified and "int8 numerics on the NPU" in not_verified
    assert "om not built: atc not found" == m["ascend"]["om"]["status"]
    readme = (pkg / "README.md").read_text()
    assert "## W8A8" in readme and "Not verified" in readme
    for f in ("reports/quantization.json", "reports/error_profile.csv", "reports/parity.json"):
        assert (pkg / f).is_file(), f
    assert json.loads((pkg / "golden/ascend/cases.json").read_text())["reference"].startswith("the package's W8A8")


def test_checker_passes_and_graphs_are_opset18_qdq(pkg):
    prof = make_profile("Ascend910B3", "mixed_float16", "w8a8")
    for p in _graphs(pkg):
        assert checker.check(p, prof) == [], p.name
        m = onnx.load(str(p))
        assert {o.domain or "ai.onnx": o.version for o in m.opset_import}["ai.onnx"] == 18
        ops = {n.op_type for n in m.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Round"} <= ops
        for n in m.graph.node:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                assert not [a for a in n.attribute if a.name == "block_size"]
        # the same graphs are violations in a plain (none) profile: Q/DQ belong to w8a8 graphs only
        assert any(v.op == "DequantizeLinear" for v in checker.check(p, make_profile("Ascend910B3", "mixed_float16")))


def test_qdq_weights_are_the_numpy_per_channel_scheme(pkg, tiny):
    """Every int8 DequantizeLinear weight equals ref_w8 of an eager weight (exactly), every quantizable
    eager linear is among them, and embeddings / lm_head / router gate / norms stay fp32."""
    cfg = tiny.config
    refs: dict[str, np.ndarray] = {}  # eager name -> ref dequantized [out, in]
    for name, mod in tiny.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".experts." not in name:
            refs[name] = ref_w8(mod.weight.detach().numpy())
    experts = {}  # layer -> (gate [E*inter, h], up, down [E*h, inter]) reference stacks
    for i, layer in enumerate(tiny.model.layers):
        if hasattr(layer.mlp, "experts"):
            ex = layer.mlp.experts
            experts[i] = tuple(np.concatenate([ref_w8(getattr(e, p).weight.detach().numpy()) for e in ex])
                               for p in ("gate_proj", "up_proj", "down_proj"))
    never = {n for n in refs if n.endswith("lm_head") or n.endswith("mlp.gate")}
    matched: set[str] = set()
    for p in _graphs(pkg):
        m = onnx.load(str(p))
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        n_weight_dq = 0
        for n in m.graph.node:
            if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
                continue
            q, s = inits[n.input[0]], inits[n.input[1]]
            assert q.dtype == np.int8 and s.dtype == np.float32 and s.ndim == 1
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            deq = dequantize(q, s, axis)
            w_oi = deq if axis == 0 else deq.T  # the scale runs along the output channels
            n_weight_dq += 1
            base = n.input[0][: -len(".w8")]
            if base.startswith("moe_"):
                kind, layer = base.rsplit("_", 1)
                g, u, d = experts[int(layer)]
                E, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
                if kind == "moe_gate_up_t":
                    want = np.concatenate([np.concatenate([g[e * inter:(e + 1) * inter], u[e * inter:(e + 1) * inter]])
                                           for e in range(E)])
                else:
                    want = {"moe_gate": g, "moe_up": u, "moe_down": d, "moe_down_t": d}[kind]
                assert np.array_equal(w_oi, want), n.name
                matched.add(f"{p.stem}:{base}")
                continue
            hits = [k for k, r in refs.items() if r.shape == w_oi.shape and np.array_equal(r, w_oi)]
            assert hits, f"{p.name}: {n.name} matches no eager weight's numpy quantization"
            assert not set(hits) & never, f"{n.name} quantizes {hits}"
            matched.update(f"{p.stem}:{h}" for h in hits)
        assert n_weight_dq > 0
        # fp32 tensors that must stay fp32 are still there, unquantized
        floats = [a for a in inits.values() if a.dtype == np.float32]
        emb = tiny.model.embed_tokens.weight.detach().numpy()
        assert any(a.shape == emb.shape and np.array_equal(a, emb) for a in floats)
        for i, layer in enumerate(tiny.model.layers):
            if hasattr(layer.mlp, "gate"):
                gw = layer.mlp.gate.weight.detach().numpy()
                assert any(a.shape == gw.shape and np.array_equal(a, gw) for a in floats), f"router {i}"
    # kv_b_proj lives in the static graphs only as the absorbed W_UK / W_UV constants (not quantized)
    quantizable = {k for k in refs if k not in never and not k.endswith("kv_b_proj")}
    for p in _graphs(pkg):
        missing = {k for k in quantizable if f"{p.stem}:{k}" not in matched}
        assert not missing, f"{p.name}: not quantized: {sorted(missing)}"
        n_tables = sum(1 for x in matched if x.startswith(f"{p.stem}:moe_"))
        assert n_tables == len(experts) * (3 if p.stem == "decode" else 2)


def test_parity_recorded_and_within_budget(pkg):
    doc = json.loads((pkg / "reports/parity.json").read_text())
    stages = {r["stage"]: r for r in doc["stages"]}
    assert all(r["passed"] for r in stages.values())
    fp32 = [s for s in stages if s.startswith("export/ascend-static/")]
    quant = [s for s in stages if s.startswith("quantize-w8a8/ascend-static/")]
    emul = [s for s in stages if s.startswith("ascend-fp16-emulation/")]
    assert fp32 and quant and emul
    for s in quant:
        r = stages[s]
        assert r["budget"]["min_cosine"] == 0.98
        for o in r["outputs"]:
            assert o["cosine"] >= 0.98 and o["rel_euclid"] <= 0.2
    for s in emul:
        for o in stages[s]["outputs"]:
            assert o["cosine"] > 0.99 and o["rel_euclid"] < 0.05
    q = json.loads((pkg / "reports/quantization.json").read_text())
    assert set(q) == {p.stem for p in _graphs(pkg)}
    for g, rep in q.items():
        # int8 + one fp32 scale per output channel: 0.25 + 1/in_features (tiny's narrowest in is 32)
        assert rep["scheme"] == "w8a8" and rep["linear_ratio"] < 0.3
        assert rep["weights_bytes_after"] < rep["weights_bytes_before"]
        assert {s["role"] for s in rep["skipped"]} == {"router", "lm_head"}
        assert {tuple(x["activations"]) for x in rep["quantized"] if x["role"] == "attention"} <= {("static",), ("static", "static")}
    rows = (pkg / "reports/error_profile.csv").read_text().splitlines()
    assert rows[0].startswith("index,node,weight,role") and len(rows) > 10


def test_verify_passes(pkg):
    r = CliRunner().invoke(main, ["verify", str(pkg)])
    assert r.exit_code == 0, r.output
    assert "golden decode" in r.output


def test_fp8_for_ascend_names_the_supported_schemes(tmp_path):
    with pytest.raises(CompileError, match=r"--quant fp8: target 'ascend' supports none, w8a8"):
        compile_package("tiny", "ascend", tmp_path / "o", quant="fp8")
    r = CliRunner().invoke(main, ["compile", "--model", "tiny", "--target", "ascend", "--quant", "fp8",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "supports none, w8a8" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_w8a8_refuses_high_precision_modes():
    with pytest.raises(AscendProfileError, match="no high-precision mode"):
        make_profile("Ascend910B3", "origin", "w8a8")
    with pytest.raises(AscendProfileError, match="supports none, w8a8"):
        make_profile("Ascend910B3", "mixed_float16", "fp8")


def _qdq_model(block: bool = False, zero_point: int = 0, dtype=onnx.TensorProto.INT8, opset: int = 18):
    w = numpy_helper.from_array(np.ones((4, 3), np.int8 if dtype == onnx.TensorProto.INT8 else np.uint8), "w")
    s = numpy_helper.from_array(np.full((3,), 0.5, np.float32), "s")
    xs = numpy_helper.from_array(np.array(0.1, np.float32), "xs")
    zp = numpy_helper.from_array(np.array(zero_point, np.int8), "zp")
    attrs = {"axis": 1, **({"block_size": 2} if block else {})}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "zp"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="dq_w", **attrs),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])], [w, s, xs, zp])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_checker_qdq_rules():
    w8 = make_profile("Ascend910B3", "mixed_float16", "w8a8")
    assert checker.check(_qdq_model(), w8) == []
    none = checker.check(_qdq_model(), make_profile())
    assert {v.node for v in none} == {"q", "dq_x", "dq_w"}
    assert any("zero point" in v.reason for v in checker.check(_qdq_model(zero_point=3), w8))
    assert any("uint8" in v.reason for v in checker.check(_qdq_model(dtype=onnx.TensorProto.UINT8), w8))
    bad = checker.check(_qdq_model(block=True, opset=21), w8)
    assert any("block_size" in v.reason for v in bad) and any(v.op == "opset" for v in bad)


def test_compile_help_lists_ascend_w8a8():
    r = CliRunner().invoke(main, ["compile", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "ascend none|w8a8" in text


def test_tiny_v2_w8a8_builds(tmp_path):
    """V2-Lite-style tiny (q_proj without q_lora, softmax greedy router, 2 shared experts): calibration
    keys, expert tables and parity hold there too (small shapes: one bucket of 8, cache 32)."""
    from targets.ascend.flow import build_ascend
    b = build_ascend(models.load("tiny-v2"), tmp_path, batch=2, max_cache=32, buckets=(8,), atc="atc-not-installed-here",
                     progress=lambda *_: None, quant="w8a8")
    assert all(r.passed for r in b.reports)
    assert {r.stage.split("/")[0] for r in b.reports} == {"export", "quantize-w8a8", "ascend-fp16-emulation"}
    for g, rep in b.quant_reports.items():
        assert {s["role"] for s in rep["skipped"]} == {"router", "lm_head"}
        assert any(q.get("expert_form") for q in rep["quantized"])
    prof = make_profile("Ascend910B3", "mixed_float16", "w8a8")
    for s in b.specs:
        assert checker.check(tmp_path / "onnx" / f"{s.name}.onnx", prof) == []


def test_quant_parity_is_routing_aware_and_fails_a_wrong_scale(pkg, tiny, tmp_path):
    """emulation.quant_parity (the quantize-w8a8/ascend-static stage): the packaged QDQ graphs pass against eager
    with their routing compared to the fp32 static graphs'; the same graphs with one weight's dequantization
    scales doubled (one MoE layer's expert down projections) fail, naming the output."""
    import onnx_ir as ir

    from pipeline.parity import ParityError
    from pipeline.static_export import export_static_graphs, save_static_graph
    from targets.ascend import emulation
    fp32 = {}
    for name, (spec, m) in export_static_graphs(tiny).items():
        fp32[name] = (spec, save_static_graph(m, tmp_path / "fp32" / f"{name}.onnx"))
    quant = {name: (spec, pkg / "onnx" / f"{name}.onnx") for name, (spec, _) in fp32.items()}
    assert all(p.is_file() for _, p in quant.values())
    reports = emulation.quant_parity(tiny, fp32, quant, "quantize-w8a8/ascend-static", gen_tokens=4)
    assert all(r.passed for r in reports) and all("routing" in r.extra for r in reports)

    def doubled(path):  # the first MoE layer's routed-expert down projections: scales x2
        m = ir.load(path)
        dqs = [n for n in m.graph if n.op_type == "DequantizeLinear" and n.name.startswith(("moe_down_1", "moe_down_t_1"))]
        assert dqs, path
        for dq in dqs:
            s = dq.inputs[1]
            s.const_value = ir.tensor(s.const_value.numpy() * 2, name=s.name)
        out = tmp_path / "fault" / path.name
        save_static_graph(m, out)
        return out
    faulty = {name: (spec, doubled(p)) for name, (spec, p) in quant.items()}
    reports = emulation.quant_parity(tiny, fp32, faulty, "quantize-w8a8/ascend-static", gen_tokens=4)
    failed = [r for r in reports if not r.passed]
    assert failed
    with pytest.raises(ParityError, match=r"(?s)quantize-w8a8/ascend-static/.*output 'logits'.*cosine 0\.\d+ < 0\.98"):
        failed[0].raise_if_failed()


def test_no_accuracy_fallback_on_tiny(pkg):
    """tiny meets both budgets with every site quantized: the fallback record says so and keeps nothing fp16."""
    fb = json.loads((pkg / "manifest.json").read_text())["ascend"]["quantization"]["accuracy_fallback"]
    assert fb["sites"] == [] and fb["passed"] is True and fb["max_sites"] == 10
    assert len(fb["attempts"]) == 1 and fb["attempts"][0]["failed"] == []
    assert "Accuracy fallback: none needed" in (pkg / "README.md").read_text()


def _static_graph(tiny, name="prefill_s16"):
    from pipeline.static_export import export_static_graphs
    spec, m = export_static_graphs(tiny)[name]
    return m


def test_fallback_candidates_and_keep_unquantized(tiny):
    """Candidates are the rank-2 linear sites in network order (layer 0's q_a first; never the router, lm_head or
    the stacked experts); a kept site stays fp32 and is recorded; an unknown site is refused by name."""
    from targets.ascend import quant as aq
    m = _static_graph(tiny)
    cand = aq.fallback_candidates(m)
    assert cand[0] == "model.layers.0.self_attn.q_a_proj" and cand[1] == "model.layers.0.self_attn.q_b_proj"
    assert not any("gate.weight" in c or "lm_head" in c or "routers" in c or c.startswith("node_") for c in cand)
    layers = [int(c.split(".")[2]) for c in cand]
    assert layers == sorted(layers)
    cal = {k: 1.0 for k in aq.static_activation_keys(m).values()}
    rep = aq.quantize_static_graph(m, tiny.config, cal, keep_unquantized=cand[:2])
    kept = [s for s in rep.skipped if s["reason"].startswith("accuracy fallback")]
    assert {s["node"].split("/")[0] for s in kept} == set(cand[:2])
    q_a = tiny.model.layers[0].self_attn.q_a_proj.weight.detach().numpy()
    assert any(np.array_equal(v.const_value.numpy(), q_a.T) or np.array_equal(v.const_value.numpy(), q_a)
               for v in m.graph.initializers.values() if v.const_value is not None and v.const_value.numpy().dtype == np.float32
               and v.const_value.numpy().size == q_a.size)
    with pytest.raises(Exception, match=r"cannot keep \['model.layers.0.nothing'\] unquantized"):
        aq.quantize_static_graph(_static_graph(tiny), tiny.config, cal, keep_unquantized=["model.layers.0.nothing"])


@pytest.mark.parametrize("fault", ["dq_scale_x2", "coarse_x2"])
def test_a_wrong_scale_fails_before_any_fallback(tiny, monkeypatch, fault):
    """A quantizer whose first weight (layer 0's q_a_proj, the first site the accuracy fallback would take out) has
    its scales x2 fails quantize_static_graph's postcondition naming the weight, whether the int8 values are left as
    they were (dequantizes to 2 W) or recomputed for the coarser scale (a consistent but wrong quantizer): the
    fallback never sees it."""
    import passes.quant_w8a8 as qw
    from targets.ascend import quant as aq
    real = qw.quantize_per_channel
    calls = []

    def faulty(w_oi):
        q, s = real(w_oi)
        calls.append(w_oi.shape)
        if len(calls) == 1:
            s = s * 2
            if fault == "coarse_x2":
                q = np.clip(np.rint(w_oi / s[:, None]), -127, 127).astype(np.int8)
        return q, s
    monkeypatch.setattr(qw, "quantize_per_channel", faulty)
    m = _static_graph(tiny)
    cal = {k: 1.0 for k in aq.static_activation_keys(m).values()}
    with pytest.raises(aq.AscendQuantError, match=r"scale of output channel 0 is .*the scheme gives amax/127"):
        aq.quantize_static_graph(m, tiny.config, cal)


def test_fallback_is_bounded_and_does_not_hide_a_fault(tiny, tmp_path, monkeypatch):
    """A fault outside the fallback's candidates (the first MoE layer's routed-expert down scales x2 in the graph,
    past the postcondition, which is switched off for this test) still fails the build after the fallback has kept
    its maximum of sites unquantized (2 here, for time), and the error names the stage, the numbers and the sites."""
    import onnx_ir as ir

    from pipeline.parity import ParityError
    from targets.ascend import quant as aq
    from targets.ascend.flow import build_ascend
    real = aq.quantize_static_graph

    def faulty(model, cfg, calibration, keep_unquantized=()):
        rep = real(model, cfg, calibration, keep_unquantized)
        for n in model.graph:
            if n.op_type == "DequantizeLinear" and n.name.startswith(("moe_down_1.", "moe_down_t_1.")):
                s = n.inputs[1]
                s.const_value = ir.tensor(s.const_value.numpy() * 2, name=s.name)
        return rep
    monkeypatch.setattr(aq, "quantize_static_graph", faulty)
    monkeypatch.setattr(aq, "FALLBACK_MAX_SITES", 2)
    lines = []
    with pytest.raises(ParityError, match=r"(?s)quantize-w8a8/ascend-static/.*cosine 0\.\d+ < 0\.98.*after the accuracy "
                                          r"fallback kept 2 linear site\(s\) unquantized, its maximum \(2 sites, \d+ candidates\): "
                                          r"model\.layers\.0\.self_attn\.q_a_proj, model\.layers\.0\.self_attn\.q_b_proj"):
        build_ascend(tiny, tmp_path, max_cache=256, buckets=(16,), atc="atc-not-installed-here", progress=lines.append,
                     quant="w8a8", gen_tokens=4)
    assert sum("accuracy fallback keeps" in x for x in lines) == 2


def test_compile_with_a_wrong_scale_fails_naming_the_weight(tiny, tmp_path, monkeypatch):
    """The same fault through the build: layer 0's q_a_proj (the fallback's first candidate) with scales x2 fails
    build_ascend at quantization with the weight's name, not after a fallback that took the site out."""
    import passes.quant_w8a8 as qw
    from targets.ascend.flow import build_ascend
    from targets.ascend.quant import AscendQuantError
    real = qw.quantize_per_channel
    q_a = tiny.model.layers[0].self_attn.q_a_proj.weight.detach().numpy()

    def faulty(w_oi):
        q, s = real(w_oi)
        return (q, s * 2) if w_oi.shape == q_a.shape and np.array_equal(w_oi, q_a) else (q, s)
    monkeypatch.setattr(qw, "quantize_per_channel", faulty)
    lines = []
    with pytest.raises(AscendQuantError, match=r"scale of output channel 0 is .*the scheme gives amax/127"):
        build_ascend(tiny, tmp_path, max_cache=256, buckets=(16,), atc="atc-not-installed-here", progress=lines.append,
                     quant="w8a8", gen_tokens=4)
    assert not any("accuracy fallback keeps" in x for x in lines)
