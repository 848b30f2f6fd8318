"""DeepSeek-V3.2 (tiny-v32) on the ort-cuda target and under --quant (issue 17): the lightning indexer stays fp32 in
every lossy form, its top-k selection is judged as a discrete choice (teacher-forced like MoE routing), and the
faults that matter still fail.

References are independent of the code under test: the eager model (its weights, its logits) and the fp32 graphs
after the passes; the selection judge is checked on synthetic scores whose flips are known.
"""
from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import models

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT


def _fused(moe_pass, simplify: bool):
    """tiny-v32's fp32 graphs as a target's flow has them before quantization (conftest.tiny_fused_graphs)."""
    from conftest import tiny_fused_graphs
    return tiny_fused_graphs(moe_pass, "tiny-v32", simplify)


@pytest.fixture(scope="module")
def cuda_fp32():
    """(model, {graph: proto bytes}) of the ort-cuda flow before the fp16 conversion (MoE router as plain ops)."""
    from targets.ort_cuda.build import CUDA_PASS_OVERRIDES
    return _fused(CUDA_PASS_OVERRIDES["moe-ort-fused"], simplify=False)


def _load(proto: bytes) -> ir.Model:
    import onnx
    return ir.from_proto(onnx.load_from_string(proto))


def _indexer_weights(model) -> list[np.ndarray]:
    """The eager model's indexer projection weights ([out, in]), every layer: wq_b, wk, weights_proj."""
    out = []
    for layer in model.model.layers:
        ix = layer.self_attn.indexer
        out += [m.weight.detach().numpy() for m in (ix.wq_b, ix.wk, ix.weights_proj)]
    return out


def _matmuls_reading(graph: ir.Graph, w: np.ndarray) -> list[ir.Node]:
    """MatMul (or ORT's FusedMatMul) nodes whose weight input equals `w` (as [in, out], fp32 or fp16-rounded)."""
    hits = []
    for n in graph:
        if n.op_type not in ("MatMul", "FusedMatMul") or len(n.inputs) < 2 or n.inputs[1] is None or n.inputs[1].const_value is None:
            continue
        b = n.inputs[1].const_value.numpy()
        if b.shape == w.T.shape and np.allclose(b.astype(np.float32), w.T, atol=1e-3, rtol=1e-3):
            hits.append(n)
    return hits


# ---- the ort-cuda load failure (root cause: a 0-d constant stored 1-d) --------------------------------------------

def test_every_initializer_of_the_fused_graphs_has_its_declared_shape(cuda_fp32):
    """latent-kv-fusion's topk-gather scale was declared [] and stored [1] (np.ascontiguousarray of a 0-d array):
    ONNX shape inference then failed on the whole decode graph and the fp16 conversion guessed Shape's output as
    float (ORT: 'moe.0.E_shape ... does not match expected type (tensor(int64))')."""
    for g in ("prefill", "decode"):
        m = _load(cuda_fp32[1][g])
        for v in m.graph.initializers.values():
            assert list(v.shape) == list(v.const_value.shape) or any(not isinstance(d, int) for d in v.shape), v.name


def test_an_initializer_stored_in_another_shape_is_refused_by_name():
    from passes.fp16_rounding import DtypeInferenceError, infer_dtypes
    x = ir.Value(name="x", type=ir.TensorType(F32), shape=ir.Shape([2]))
    s = ir.Value(name="the_scale", type=ir.TensorType(F32), shape=ir.Shape([]),
                 const_value=ir.tensor(np.array([0.5], np.float32), name="the_scale"))
    mul = ir.node("Mul", [x, s], name="mul")
    shape = ir.node("Shape", [mul.outputs[0]], name="shape")
    graph = ir.Graph([x], [shape.outputs[0]], nodes=[mul, shape], initializers=[s], opset_imports={"": 20})
    with pytest.raises(DtypeInferenceError, match=r"'the_scale' declares shape \[\] but its tensor has shape \[1\]"):
        infer_dtypes(ir.Model(graph, ir_version=10))


def test_when_shape_inference_fails_a_shape_output_is_not_given_a_float_dtype():
    """EyeLike on a 1-D input makes ONNX shape inference fail on the whole graph; Shape(x) must then not be typed
    float from its input (what the old fallback did, and ORT refused at load)."""
    from passes.fp16_rounding import infer_dtypes
    x = ir.Value(name="x", type=ir.TensorType(F32), shape=ir.Shape([3]))
    eye = ir.node("EyeLike", [x], name="eye")
    shape = ir.node("Shape", [x], name="shape")
    graph = ir.Graph([x], [eye.outputs[0], shape.outputs[0]], nodes=[eye, shape], opset_imports={"": 20})
    infer_dtypes(ir.Model(graph, ir_version=10))
    assert shape.outputs[0].dtype in (None, ir.DataType.INT64)


# ---- ort-cuda: the indexer island ------------------------------------------------------------------------------

def test_fp16_conversion_keeps_the_indexer_fp32(cuda_fp32):
    """Every indexer projection (found by the eager model's weights) still reads an fp32 weight after to_fp16, and
    every non-router TopK's scores are fp32; the MLA projections around it are fp16."""
    from targets.ort_cuda.graphs import to_fp16
    model, protos = cuda_fp32
    for g in ("prefill", "decode"):
        m = _load(protos[g])
        rep = to_fp16(m)
        assert rep.islands.get("topk-selection", 0) > 0, rep.islands
        for w in _indexer_weights(model):
            hits = _matmuls_reading(m.graph, w)
            assert hits and all(n.inputs[1].dtype == F32 and n.outputs[0].dtype == F32 for n in hits), g
        q_b = model.model.layers[0].self_attn.q_b_proj.weight.detach().numpy()
        assert all(n.inputs[1].dtype == F16 for n in _matmuls_reading(m.graph, q_b))


def test_a_conversion_that_leaves_the_indexer_fp16_is_refused(cuda_fp32, monkeypatch):
    """Without the topk-selection island the conversion's postcondition refuses the graph, naming the TopK."""
    from targets.ort_cuda import graphs
    monkeypatch.setattr(graphs, "_selection_nodes", lambda g, router: set())
    m = _load(cuda_fp32[1]["decode"])
    with pytest.raises(graphs.SelectionPrecisionError, match=r"TopK '.*' \(a selection outside the MoE routers"):
        graphs.to_fp16(m)


def _reports(pkg) -> dict:
    return {s["stage"]: s for s in json.loads((pkg / "reports" / "parity.json").read_text())["stages"]}


def _eager_logits_cosine(pkg, model, graph: str, case_name: str) -> float:
    """Cosine of the package's own graph (run on ORT CPU, feeds cast to its dtypes) vs eager fp32 on a golden case."""
    from pipeline.build import run_cast
    from pipeline.golden import make_golden
    case = next(c for c in make_golden(model).cases if c.name == case_name)
    sess = ort.InferenceSession(str(pkg / "onnx" / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
    got = run_cast(sess, case.inputs)["logits"].astype(np.float64).ravel()
    with __import__("torch").no_grad():
        spec = model.cache_spec("latent")
        cache = [tuple(__import__("torch").from_numpy(np.asarray(a)) for a in layer)
                 for layer in spec.unflatten(case.inputs)]
        ref = model.step(__import__("torch").from_numpy(case.inputs["input_ids"]), cache, "latent")[0]
    ref = ref.double().numpy().ravel()
    return float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref))


def _check_selection_judged(pkg, prefix: str) -> None:
    reps = [r for s, r in _reports(pkg).items() if s.startswith(prefix) and not s.endswith("/greedy")]
    assert {s.split("/")[1] for s in (r["stage"] for r in reps)} >= {"prefill", "prefill-chunk", "decode"}
    for r in reps:
        sel = r["extra"]["routing"]["selection"]
        cfg = models.load("tiny-v32").config
        assert len(sel["selections"]) == cfg.num_hidden_layers and sel["n_decisions"] > 0, sel
        assert r["passed"] and not sel["reasons"], sel["reasons"]
        assert any(o["name"] == "selection.0.scores" for o in r["outputs"])


def test_tiny_v32_compiles_and_verifies_for_ort_cuda(tmp_path, stage_cache):
    from pipeline.compile import compile_package
    from pipeline.package import verify_package
    from runtime import cuda_runtime
    pkg = compile_package("tiny-v32", "ort-cuda", tmp_path / "cuda", cache_dir=stage_cache, progress=lambda m: None)
    man = json.loads((pkg / "manifest.json").read_text())
    assert man["parity"]["passed"] and man["target"]["precision"] == "fp16"
    _check_selection_judged(pkg, "target-ort-cuda-fp16/")
    failures, _ = cuda_runtime.verify_golden(pkg, device="cpu")
    assert failures == [], failures
    assert verify_package(pkg) == []
    # decode (no selection near a tie in this case) against eager fp32, independently of the build's judgement
    assert _eager_logits_cosine(pkg, models.load("tiny-v32", seed=0), "decode", "decode") > 0.999
    _greedy_divergence_is_excused_only_after_a_near_tie_of_that_step(pkg, man, tmp_path)
    _a_golden_case_mismatch_is_excused_only_where_forcing_the_recorded_choices_reproduces_it(pkg, man, tmp_path)


def _greedy_divergence_is_excused_only_after_a_near_tie_of_that_step(pkg, man, tmp_path):
    """verify_golden on the GPU: a greedy divergence at a step whose own router / indexer choice was a near tie in
    eager fp32 (golden greedy.choice_margins within the build's allowed flip margin, tolerance "choices") is a note;
    at a step without one it fails. Checked by moving the golden tokens (the runtime on ORT CPU reproduces them)."""
    import shutil
    from runtime import cuda_runtime
    gen, limits = man["golden"]["greedy"], man["golden"]["tolerance"]["choices"]
    assert limits["selection"] > 0 and limits["routing"] > 0, limits
    sel = np.load(pkg / gen["choice_margins"]["selection"])
    route = np.load(pkg / gen["choice_margins"]["routing"])
    tokens = np.load(pkg / gen["tokens"])
    assert sel.shape == (tokens.shape[1], 3) and route.shape == (tokens.shape[1], 2)  # 3 indexer, 2 MoE layers
    near = (sel <= limits["selection"]).any(1) | (route <= limits["routing"]).any(1)
    assert near.any() and not near.all(), (sel.min(1), route.min(1), limits)
    for step, excused in ((int(np.flatnonzero(near)[0]), True), (int(np.flatnonzero(~near)[-1]), False)):
        copy = tmp_path / f"moved-{step}"
        shutil.copytree(pkg, copy)
        moved = tokens.copy()
        moved[0, step] = (moved[0, step] + 1) % man["io"]["vocab_size"]
        np.save(copy / gen["tokens"], moved)
        failures, record = cuda_runtime.verify_golden(copy, device="cpu")
        said = failures + record["notes"]
        assert any(f"at step {step}" in m for m in said), said
        if excused:
            assert failures == [] and "near tie of the" in record["notes"][0], said
        else:
            assert any("not a near tie" in f for f in failures), said


def _turned_selection_package(pkg, man, dest, j: int, row: tuple, logits_fault: float = 0.0):
    """A copy of pkg whose prefill-chunk golden data are those of a reference whose selection j at `row` (batch,
    query) took the (k+1)-th key instead of the k-th (its score raised to the k-th's + a quarter of their margin),
    every later choice and output as the package graph makes them given that (ORT CPU, choices forced, iterated to a
    fixed point): what the GPU meets when its rounding turns a near tie the other way. -> (copy, the margin)."""
    import shutil
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    from passes.routing_probes import force_gate_logits, force_selections, selection_topks
    shutil.copytree(pkg, dest)
    case = next(c for c in man["golden"]["cases"] if c["name"] == "prefill-chunk")
    feeds = {n: np.load(dest / f) for n, f in case["inputs"].items()}
    ref = {n: np.load(dest / f) for n, f in case["choices"].items()}
    scores, k = ref[f"selection.{j}.scores"], ref[f"selection.{j}.ids"].shape[-1]
    order = np.argsort(-scores[row], kind="stable")
    margin = float(scores[row][order[k - 1]] - scores[row][order[k]])
    scores[row][order[k]] = scores[row][order[k - 1]] + margin / 4
    graph = ir.from_proto(onnx.load(str(dest / "onnx" / "prefill.onnx"), load_external_data=False))
    topks = selection_topks(graph)
    force_gate_logits(graph)
    force_selections(graph, topks)
    onnx.save(ir.to_proto(graph), str(dest / "onnx" / "forced.onnx"))
    sess = ort.InferenceSession(str(dest / "onnx" / "forced.onnx"), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    for _ in range(4):
        x = {**feeds, **{f"{n}.forced": a for n, a in ref.items() if not n.endswith(".ids")}}
        got = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {n: a.astype(np.float16 if types[n] == "tensor(float16)" else a.dtype)
                                       for n, a in x.items()})))
        for n in ref:
            if not n.endswith(".ids") and n != f"selection.{j}.scores":
                ref[n] = got[n]
    (dest / "onnx" / "forced.onnx").unlink()
    ref[f"selection.{j}.ids"] = got[f"selection.{j}.ids"]
    for n, f in case["choices"].items():
        np.save(dest / f, ref[n])
    for n, f in case["outputs"].items():
        out = got[n].astype(np.float32)
        if n == "logits":
            out[0, 0, 0] += logits_fault
        np.save(dest / f, out)
    return dest, margin


def _a_golden_case_mismatch_is_excused_only_where_forcing_the_recorded_choices_reproduces_it(pkg, man, tmp_path):
    """verify_golden on the GPU: a golden case that fails because a selection near tie went the other way (the
    reference's choices, recorded at build, forced: within tolerance, scores moved within half the allowed flip
    margin) is a note naming the selection; the same with a decisive margin, or with a fault left after forcing
    (one logit +1), fails. Checked on ORT CPU against golden data of a reference that turned the choice."""
    from runtime import cuda_runtime
    from targets.ort_cuda.choice_forcing import explain
    limit = man["golden"]["tolerance"]["choices"]["selection"]
    case = next(c for c in man["golden"]["cases"] if c["name"] == "prefill-chunk")
    assert {f"selection.{j}.{w}" for j in range(3) for w in ("scores", "ids")} <= set(case["choices"])
    scores = np.load(pkg / case["choices"]["selection.1.scores"]).astype(np.float64)
    k = np.load(pkg / case["choices"]["selection.1.ids"]).shape[-1]
    srt = -np.sort(-scores, -1)
    margins = srt[..., k - 1] - srt[..., k]  # [B, S]
    near = tuple(int(x) for x in np.unravel_index(np.argmin(margins), margins.shape))
    far = tuple(int(x) for x in np.unravel_index(np.argmax(margins), margins.shape))
    assert margins[near] < limit / 2 < limit < margins[far], (margins, limit)
    for name, row, fault, excused in (("near", near, 0.0, True), ("decisive", far, 0.0, False),
                                      ("fault", near, 1.0, False)):
        copy, m = _turned_selection_package(pkg, man, tmp_path / f"turned-{name}", 1, row, fault)
        failures, record = cuda_runtime.verify_golden(copy, device="cpu", explain=explain)
        said = failures + record["notes"]
        if excused:  # the package's own runtime, without the passes to force choices, does not excuse it
            plain, _ = cuda_runtime.verify_golden(copy, device="cpu")
            assert any("recorded choices were not forced" in f for f in plain), plain
        assert any("prefill-chunk/logits" in x for x in said), said  # the unforced run differs from the reference
        if excused:
            assert failures == [] and f"selection 1 at index [{row[0]}, {row[1]}]" in record["notes"][0], said
        elif fault:
            assert any("with the reference's choices forced it still fails" in f for f in failures), said
        else:
            assert any("selection scores moved" in f and "not rounding" in f for f in failures), said


# ---- quantization: the indexer stays fp32, its selection is judged apart ------------------------------------------

@pytest.fixture(scope="module")
def cpu_int8(tmp_path_factory, stage_cache):
    from pipeline.compile import compile_package
    return compile_package("tiny-v32", "ort-cpu", tmp_path_factory.mktemp("v32") / "int8", quant="int8",
                           cache_dir=stage_cache, progress=lambda m: None)


def test_tiny_v32_int8_keeps_the_indexer_fp32_and_verifies(cpu_int8):
    from pipeline.verify import verify_full
    model = models.load("tiny-v32", seed=0)
    man = json.loads((cpu_int8 / "manifest.json").read_text())
    assert man["parity"]["passed"]
    for g in ("prefill", "decode"):
        m = ir.load(cpu_int8 / "onnx" / f"{g}.onnx")
        assert sum(n.op_type == "MatMulNBits" for n in m.graph) > 0
        for w in _indexer_weights(model):  # the eager weights, unquantized, still read by plain MatMuls
            assert [n.inputs[1].dtype for n in _matmuls_reading(m.graph, w)] == [F32], g
    _check_selection_judged(cpu_int8, "quantize-int8/")
    ok, lines = verify_full(cpu_int8)
    assert ok, lines


@pytest.fixture(scope="module")
def cpu_fp32():
    from passes import PASSES
    return _fused(PASSES["moe-ort-fused"], simplify=True)


def _routed_prefill_cases(tmp_path, quantized: ir.Model, fp32: bytes, model):
    from pipeline.build import moe_routers, routed_reports
    from pipeline.export import save_graph
    from pipeline.golden import Golden, make_golden
    golden = make_golden(model)
    cases = [c for c in golden.cases if c.graph == "prefill"]
    paths, refs = {"prefill": tmp_path / "q.onnx"}, {"prefill": tmp_path / "r.onnx"}
    save_graph(quantized, paths["prefill"], check=False)  # ORT contrib ops; reads in weights the package keeps in its onnx/weights.data
    save_graph(_load(fp32), refs["prefill"], check=False)
    return routed_reports("quantize-int8", paths, refs, Golden(cases, golden.prompt, golden.tokens,
                                                                golden.step_logits), moe_routers(model))


def test_faults_in_the_int8_package_fail_the_routed_judgement(cpu_int8, cpu_fp32, tmp_path):
    """The package's prefill graph passes quantize-int8 against the fp32 graph; one layer's int8 scales x2 fails
    it, and so does one layer's indexer weights_proj negated (under forced selection the logits do not show it:
    its scores, judged as outputs, do)."""
    model = models.load("tiny-v32", seed=0)
    path = cpu_int8 / "onnx" / "prefill.onnx"
    assert all(r.passed for r in _routed_prefill_cases(tmp_path, ir.load(path), cpu_fp32[1]["prefill"], model))

    m = ir.load(path)
    mnb = [n for n in m.graph if n.op_type == "MatMulNBits"]
    for n in mnb[len(mnb) // 2: len(mnb) // 2 + 3]:
        v = n.inputs[2]
        v.const_value = ir.tensor(v.const_value.numpy() * np.float32(2), name=v.name)
    assert not any(r.passed for r in _routed_prefill_cases(tmp_path, m, cpu_fp32[1]["prefill"], model))

    m = ir.load(path)
    w = model.model.layers[1].self_attn.indexer.weights_proj.weight.detach().numpy()
    (hit,) = _matmuls_reading(m.graph, w)
    v = hit.inputs[1]
    v.const_value = ir.tensor(-v.const_value.numpy(), name=v.name)
    reports = _routed_prefill_cases(tmp_path, m, cpu_fp32[1]["prefill"], model)
    assert not any(r.passed for r in reports)
    reasons = [x for r in reports for x in r.failure_reasons()]
    assert any("'selection.1.scores'" in x for x in reasons), reasons


# ---- the selection judge on known flips ------------------------------------------------------------------------

def test_selection_judge_counts_flips_and_refuses_what_forcing_does_not_reproduce():
    from pipeline.parity import _judge_selections
    ref = np.array([[[3.0, 2.0, 1.0, 0.999, -np.inf]]])  # one query, k = 3: margin 1.0 - 0.999 = 0.001
    ids = np.array([[[0, 1, 2]]])
    near = ref.copy()
    near[..., 3] = 1.0005  # swaps keys 2 and 3
    rec = _judge_selections({"reference_scores": [ref], "reference_ids": [ids], "actual_scores": [near],
                             "forced_ids": [ids]}, 0.1)
    assert rec["n_flips"] == 1 and rec["reasons"] == [] and rec["flips"][0]["keys_actual"] == [0, 1, 3]
    assert rec["flips"][0]["margin"] == pytest.approx(0.001) and rec["flips"][0]["allowed"] == pytest.approx(0.006)
    # given the reference's scores the TopK must pick the reference's keys
    rec = _judge_selections({"reference_scores": [ref], "reference_ids": [ids], "actual_scores": [ref],
                             "forced_ids": [np.array([[[0, 1, 3]]])]}, 0.1)
    assert rec["n_flips"] == 0 and any("given the reference's scores" in r for r in rec["reasons"]), rec["reasons"]
    # flips on 3 of 10 queries: over a 10% share
    many_ref = np.tile(ref, (1, 10, 1))
    many_act = many_ref.copy()
    many_act[0, :3, 3] = 1.0005
    rec = _judge_selections({"reference_scores": [many_ref], "reference_ids": [np.tile(ids, (1, 10, 1))],
                             "actual_scores": [many_act], "forced_ids": [np.tile(ids, (1, 10, 1))]}, 0.1)
    assert rec["n_flips"] == 3 and rec["n_decisions"] == 10
    assert any("selection flipped at 3 of 10" in r for r in rec["reasons"]), rec["reasons"]


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8", "fp8"])
def test_a_quantized_indexer_is_refused_by_the_quantize_postcondition(cpu_fp32, scheme, monkeypatch):
    """Numerically an int8 indexer passes the teacher-forced judgement (its error is small, its selection flips are
    near ties: docs/v32.md), so the rule is structural: with the site classification made to miss the indexer (it
    is then quantized as 'attention'), every scheme refuses the graph, naming the TopK and the projection."""
    from passes import quant_weights
    from passes.quantize import quantize
    model = models.load("tiny-v32", seed=0)
    quantize(_load(cpu_fp32[1]["decode"]), scheme, model=model)  # as built: passes
    monkeypatch.setattr(quant_weights, "_topk_feeding_sites", lambda graph, sites: {})
    with pytest.raises(quant_weights.QuantizationError, match=r"TopK '.*' selects from scores computed by a quantized"):
        quantize(_load(cpu_fp32[1]["decode"]), scheme, model=model)
