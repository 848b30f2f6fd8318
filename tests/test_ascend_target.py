"""The ascend target on the tiny model: static graphs vs eager, the profile checker on them, fp16
emulation by msit's thresholds, the generated atc commands, the ATC run paths (with a stand-in
`atc` that never writes an .om), and the on-device kit."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import models
from models.generation import greedy_generate
from targets.ascend import atc as atc_mod
from targets.ascend import checker
from targets.ascend.flow import build_ascend
from targets.ascend.profile import make_profile
from targets.ascend.static_export import StaticRunner, ort_sessions

BATCH, M, BUCKETS = 2, 32, (8,)


@pytest.fixture(scope="module")
def tiny():
    return models.load("tiny")


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    pkg = tmp_path_factory.mktemp("ascend_pkg")
    b = build_ascend(tiny, pkg, batch=BATCH, max_cache=M, buckets=BUCKETS, atc="atc-not-installed-here",
                     progress=lambda *_: None)
    return pkg, b


def _runner(pkg, b, cfg):
    specs = {s.name: s for s in b.specs}
    return StaticRunner(ort_sessions({n: pkg / "onnx" / f"{n}.onnx" for n in specs}), specs, cfg)


def test_graphs_are_static_opset18_int32(built):
    pkg, b = built
    assert [s.name for s in b.specs] == ["decode", "prefill_s8"]
    for s in b.specs:
        m = onnx.load(str(pkg / "onnx" / f"{s.name}.onnx"))
        assert {o.domain or "ai.onnx": o.version for o in m.opset_import}["ai.onnx"] == 18
        ins = {v.name: v.type.tensor_type for v in m.graph.input}
        assert ins["input_ids"].elem_type == onnx.TensorProto.INT32 and ins["position"].elem_type == onnx.TensorProto.INT32
        for t in ins.values():
            assert all(d.HasField("dim_value") for d in t.shape.dim)
        assert [d.dim_value for d in ins["input_ids"].shape.dim] == [BATCH, s.seq]
        assert [d.dim_value for d in ins["past.0.c_kv"].shape.dim] == [BATCH, M, 32]
        ops = {n.op_type for n in m.graph.node}
        assert not ops & {"NonZero", "ScatterND", "GatherND", "Einsum", "Loop", "If"}


@pytest.mark.parametrize("mode", ["mixed_float16", "force_fp16"])
def test_checker_passes_on_static_graphs(built, mode):
    pkg, b = built
    for s in b.specs:
        assert checker.check(pkg / "onnx" / f"{s.name}.onnx", make_profile("Ascend910B3", mode)) == []


def test_static_graphs_match_eager(built, tiny):
    pkg, b = built
    r = _runner(pkg, b, tiny.config)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 256, (BATCH, 5), generator=g)
    with torch.no_grad():
        ref, cache = tiny.step(prompt, tiny.empty_cache(BATCH))
    logits, c = r.prefill(prompt.numpy())
    assert np.abs(logits - ref.numpy()).max() < 1e-4
    assert np.abs(c["past.1.c_kv"][:, :5] - cache[1][0].numpy()).max() < 1e-4
    tok, pos = ref[:, -1].argmax(-1, keepdim=True), 5
    for _ in range(4):
        with torch.no_grad():
            ref, cache = tiny.step(tok, cache)
        logits, c = r.decode(tok.numpy(), pos, c)
        assert np.abs(logits - ref.numpy()).max() < 1e-4
        tok, pos = ref[:, -1].argmax(-1, keepdim=True), pos + 1
    ref_tokens, _ = greedy_generate(tiny, prompt, 16)
    tokens, _ = r.generate(prompt.numpy(), 16)
    assert (tokens == ref_tokens.numpy()).all()


def test_parity_reports_pass(built):
    _, b = built
    stages = [r.stage for r in b.reports]
    assert any(s.startswith("export/ascend-static/") for s in stages)
    emul = [r for r in b.reports if r.stage.startswith("ascend-fp16-emulation/")]
    assert len(emul) >= 3 and all(r.passed for r in b.reports)
    for r in emul:
        for o in r.outputs:
            assert o.cosine > 0.99 and o.rel_euclid < 0.05
            if o.kl is not None:
                assert o.kl < 0.005
    assert emul[-1].extra["tokens"]["greedy"]["n_steps_reference"] == 16
    # teacher-forced, every row judged; tiny's own fp16 routing matches the fp32 graphs' at every decision
    for r in emul:
        rt = r.extra["routing"]
        assert rt["flips"] == [] and rt["reasons"] == [] and rt["forced_routing_checked"]
        assert {f"routing.{i}.gate_logits" for i in range(2)} <= {o.name for o in r.outputs}
    assert emul[0].extra["routing"]["n_decisions"] == BATCH * 6 * 2  # prompt = 3/4 of the bucket of 8, 2 MoE layers
    assert {o.name: o for o in emul[0].outputs}["logits"].shape[:2] == (BATCH, 6)
    assert all(r.extra["routing"]["n_decisions"] == BATCH * 2 for r in emul if "/decode-" in r.stage)
    unforced = emul[-1].extra["unforced_greedy"]
    assert unforced["n_equal_steps"] == unforced["n_steps"] == 16 and unforced["flips_before"] == []
    assert not any("routing" in r.extra for r in b.reports if r.stage.startswith("export/"))
    verified = b.manifest["verification"]["verified_here"]
    assert any("on all 12 prefill tokens (2 batch rows), 4 of 4 decode steps and the greedy steps' logits" in v
               and "no expert choice differs from the fp32 graphs' in 40 (position, MoE layer) decisions" in v
               and "as deployed (routing by itself) greedy tokens equal for 16 of 16 steps" in v for v in verified)


def test_atc_commands_match_graph_inputs(built):
    pkg, b = built
    cmds = atc_mod.parse_script((pkg / "ascend" / "build_om.sh").read_text())
    builds = [c for c in cmds if "--mode=3" not in c]
    checks = [c for c in cmds if "--mode=3" in c]
    assert len(builds) == len(checks) == len(b.specs)
    for s, argv in zip(b.specs, builds):
        flags = dict(a.split("=", 1) for a in argv[1:])
        assert argv[0] == "atc"
        assert flags["--model"] == f"onnx/{s.name}.onnx" and (pkg / flags["--model"]).is_file()
        assert flags["--framework"] == "5" and flags["--input_format"] == "ND"
        assert flags["--output"] == f"ascend/om/{s.name}"
        assert flags["--soc_version"] == "Ascend910B3"
        assert flags["--precision_mode_v2"] == "mixed_float16"
        assert flags["--external_weight"] == "0" and flags["--log"] == "error"
        assert "--dynamic_dims" not in flags
        m = onnx.load(str(pkg / flags["--model"]))
        expected = [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in m.graph.input]
        got = [(n, [int(d) for d in shape.split(",")]) for n, shape in
               (item.rsplit(":", 1) for item in flags["--input_shape"].split(";"))]
        assert got == expected
        keep = (pkg / flags["--keep_dtype"]).read_text().split()
        names = {n.name: n.op_type for n in m.graph.node}
        assert keep and all(k in names for k in keep)
        kept_ops = {names[k] for k in keep}
        assert {"Softmax", "ReduceMean", "TopK", "Sigmoid"} <= kept_ops
        assert sum(op == "Softmax" for op in kept_ops) >= 1
    for s, argv in zip(b.specs, checks):
        assert argv[1] == "--mode=3" and f"--model=onnx/{s.name}.onnx" in argv and "--framework=5" in argv
    cfg = json.loads((pkg / "ascend" / "atc_config.json").read_text())
    assert [g["atc_argv"] for g in cfg["graphs"]] == builds


def test_om_missing_reported(built):
    _, b = built
    assert b.atc.status == "om not built: atc not found"
    assert b.manifest["om"]["status"] == "om not built: atc not found"
    assert "om not built: atc not found" in b.readme


def test_require_om_without_atc_fails(built):
    pkg, _ = built
    with pytest.raises(atc_mod.AtcError, match="atc not found"):
        atc_mod.run_atc(pkg, require_om=True, atc="atc-not-installed-here")


def _standin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "atc"
    exe.write_text(f"""#!{sys.executable}
import json, os, sys
with open(os.environ["ATC_RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if os.environ.get("ATC_FAIL") and "--mode=3" not in sys.argv:
    print("ATC start working now, please wait for a moment.")
    print("E10001: Value [bad] for parameter [--input_shape] is invalid.", file=sys.stderr)
    print("ATC run failed, Please check the detail log, Try 'atc --help' for more information")
    sys.exit(1)
print("ATC run success, welcome to the next use.")
""")
    exe.chmod(0o755)
    return bin_dir


def _no_om(root: Path):
    assert not [p for p in root.rglob("*") if p.name.endswith(".om")]


@pytest.mark.parametrize("fail", [False, True])
def test_atc_standin_invocation_and_failure(built, tmp_path, monkeypatch, fail):
    pkg0, b = built
    pkg = tmp_path / "pkg"
    shutil.copytree(pkg0, pkg)
    bin_dir = _standin(tmp_path)
    record = tmp_path / "argv.jsonl"
    monkeypatch.setenv("ATC_RECORD", str(record))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    if fail:
        monkeypatch.setenv("ATC_FAIL", "1")
    with pytest.raises(atc_mod.AtcError) as e:
        atc_mod.run_atc(pkg, require_om=False)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    cfg = json.loads((pkg / "ascend" / "atc_config.json").read_text())
    if fail:  # the first build fails: its pre-check and build ran, then the script stopped
        assert calls == [cfg["graphs"][0]["precheck_argv"][1:], cfg["graphs"][0]["atc_argv"][1:]]
        assert "E10001" in str(e.value) and "exit 1" in str(e.value)
    else:  # exit 0 everywhere, but a stand-in writes no .om: reported, never faked
        expected = [a for g in cfg["graphs"] for a in (g["precheck_argv"][1:], g["atc_argv"][1:])]
        assert calls == expected
        assert "did not write ascend/om/decode.om" in str(e.value)
    assert (pkg / "ascend" / "logs" / "build_om.log").is_file()
    _no_om(pkg)
    _no_om(tmp_path)


def test_gears_validation(built):
    pkg, _ = built
    with pytest.raises(atc_mod.AtcError, match="static inputs"):
        atc_mod.atc_graph(pkg, "onnx/decode.onnx", gears=[(1,), (2,)])
    dyn = ir.load(pkg / "onnx" / "prefill_s8.onnx")
    dyn.graph.inputs[0].shape = ir.Shape([BATCH, "seq"])
    ir.save(dyn, pkg / "onnx" / "dyn_test.onnx")
    try:
        with pytest.raises(atc_mod.AtcError, match="no gears"):
            atc_mod.atc_graph(pkg, "onnx/dyn_test.onnx")
        with pytest.raises(atc_mod.AtcError, match="more than 1"):
            atc_mod.atc_graph(pkg, "onnx/dyn_test.onnx", gears=[(8,)])
        with pytest.raises(atc_mod.AtcError, match="cannot express"):
            atc_mod.atc_graph(pkg, "onnx/dyn_test.onnx", gears=[(8, 1), (16, 1)])
        g = atc_mod.atc_graph(pkg, "onnx/dyn_test.onnx", gears=[(8,), (16,)])
        assert g.inputs[0] == ("input_ids", [BATCH, -1]) and g.dynamic_dims == "8;16"
        argv = atc_mod.atc_argv(g, make_profile())
        assert "--dynamic_dims=8;16" in argv
        assert next(a for a in argv if a.startswith("--input_shape=")).startswith(
            f"--input_shape=input_ids:{BATCH},-1;position:{BATCH};past.0.c_kv:{BATCH},{M},32")
    finally:
        os.remove(pkg / "onnx" / "dyn_test.onnx")


def _kit(pkg):
    spec = importlib.util.spec_from_file_location("verify_on_device", pkg / "ascend" / "kit" / "verify_on_device.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kit_golden_and_thresholds(built, monkeypatch):
    pkg, b = built
    doc = json.loads((pkg / "golden" / "ascend" / "cases.json").read_text())
    assert [c["name"] for c in doc["cases"]] == [s.name for s in b.specs]
    kit = _kit(pkg)
    # the golden outputs are eager's: the fp32 static graph reproduces them (same checks as on device)
    sessions = ort_sessions({c["name"]: pkg / c["onnx"] for c in doc["cases"]})
    for c in doc["cases"]:
        feeds = {n: np.load(pkg / c["inputs"][n]) for n in c["input_order"]}
        outs = sessions[c["name"]].run(c["output_order"], feeds)
        for name, act in zip(c["output_order"], outs):
            row = kit.judge(name, np.load(pkg / c["outputs"][name]), act, name == "logits")
            assert row["passed"], row
    logits = np.load(pkg / doc["cases"][0]["outputs"]["logits"])
    noisy = logits + np.random.default_rng(0).normal(0, 3 * logits.std(), logits.shape).astype(np.float32)
    bad = kit.judge("logits", logits, noisy, True)
    assert not bad["passed"] and any("cosine" in r for r in bad["reasons"])
    decode = next(c for c in doc["cases"] if c["name"] == "decode")
    assert kit.compare_command(pkg, decode).startswith(
        "msit debug compare -gm onnx/decode.onnx -om ascend/om/decode.om "
        "-i golden/ascend/decode.in.input_ids.npy,golden/ascend/decode.in.position.npy,")
    monkeypatch.setattr(kit, "pick_backend", lambda choice: None)
    assert kit.main(["--package", str(pkg)]) == 2
