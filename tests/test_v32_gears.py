"""DeepSeek-V3.2 (tiny-v32) decode gears on ort-cuda (--decode-gears, targets/ort_cuda/gears.py): the fixed-shape fp16
step with the lightning indexer scoring the whole gear-length key cache, TopK, int32 Gather of the chosen rows.
Built and checked on the CPU (ORT CPU runs the fp16 gear graphs; no GPU run here).

References are independent of the gear code: the eager model (models/, tested against transformers'
DeepseekV32ForCausalLM) and its weights, eager fp32 golden data with the fp16 judgement, the dynamic runtime's tokens.
"""
from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

import models

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
GEARS = (32, 64)  # tiny-v32: max_position_embeddings 1024; golden greedy prompt 8 + 16 tokens fits gear 32
GEN = 16


@pytest.fixture(scope="module")
def model():
    return models.load("tiny-v32", seed=0)


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    from pipeline.compile import compile_package
    out = tmp_path_factory.mktemp("v32-gears") / "pkg"
    return compile_package("tiny-v32", "ort-cuda", out, progress=lambda m: None, use_cache=False, gen_tokens=GEN,
                           decode_gears=",".join(map(str, GEARS)))


def _golden_case(pkg, name):
    m = json.loads((pkg / "manifest.json").read_text())
    case = next(c for c in m["golden"]["cases"] if c["name"] == name)

    class C:
        inputs = {n: np.load(pkg / f) for n, f in case["inputs"].items()}
        outputs = {n: np.load(pkg / f) for n, f in case["outputs"].items()}
    return C


def _matmuls_reading(graph: ir.Graph, w: np.ndarray) -> list[ir.Node]:
    """MatMul / FusedMatMul nodes whose weight input equals `w` ([out, in] eager) as [in, out], fp32 or fp16."""
    hits = []
    for n in graph:
        if n.op_type not in ("MatMul", "FusedMatMul") or len(n.inputs) < 2 or n.inputs[1] is None \
                or n.inputs[1].const_value is None:
            continue
        b = n.inputs[1].const_value.numpy()
        if b.shape == w.T.shape and np.allclose(b.astype(np.float32), w.T, atol=1e-3, rtol=1e-3):
            hits.append(n)
    return hits


def test_package_builds_and_gear_checks_are_routed(pkg, model):
    """The package passes; each gear's check is routing- and selection-aware (the reference's gate logits and indexer
    scores forced, flips judged apart), and given the reference's scores the gear's TopK picks the reference's keys."""
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["parity"]["passed"] and m["io"]["decode_gears"]["gears"] == list(GEARS)
    cfg = model.config
    stages = {s["stage"]: s for s in json.loads((pkg / "reports" / "parity.json").read_text())["stages"]}
    for g in GEARS:
        r = stages[f"target-ort-cuda-fp16/gear{g}-decode"]
        assert r["passed"]
        rt = r["extra"]["routing"]
        n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
        assert len(rt["layers"]) == n_moe and all(e["forced_not_reproduced"] == 0 for e in rt["layers"])
        sel = rt["selection"]
        # one selection per layer, one decision per (batch row, layer) of the golden decode case (batch 2, one token)
        assert len(sel["selections"]) == cfg.num_hidden_layers and sel["n_decisions"] == 2 * cfg.num_hidden_layers
        assert all(e["k"] == cfg.index_topk and e["keys"] == g and e["forced_not_reproduced"] == 0
                   for e in sel["selections"])
        names = {o["name"] for o in r["outputs"]}
        assert {f"selection.{j}.scores" for j in range(cfg.num_hidden_layers)} <= names
    greedy = stages["target-ort-cuda-fp16/gears-greedy"]["extra"]["tokens"]["greedy"]
    assert greedy["n_steps_reference"] == GEN and greedy["equal"]


def test_gear_graph_keeps_the_indexer_fp32(pkg, model):
    """In the packaged gear graph every indexer projection (found by the eager model's weights) reads an fp32 weight
    and computes fp32, and every TopK reads fp32 scores; MLA's q_b projection is fp16."""
    for g in GEARS:
        m = ir.load(pkg / "onnx" / f"decode_g{g}.onnx")
        for layer in model.model.layers:
            ix = layer.self_attn.indexer
            for lin in (ix.wq_b, ix.wk, ix.weights_proj):
                hits = _matmuls_reading(m.graph, lin.weight.detach().numpy())
                assert hits and all(n.inputs[1].dtype == F32 and n.outputs[0].dtype == F32 for n in hits)
            q_b = _matmuls_reading(m.graph, layer.self_attn.q_b_proj.weight.detach().numpy())
            assert q_b and all(n.inputs[1].dtype == F16 for n in q_b)
        assert all(t.inputs[0].dtype == F32 for t in m.graph if t.op_type == "TopK")


def test_gear_without_the_indexer_island_is_refused(model, monkeypatch):
    """With the topk-selection island removed the gear's conversion is refused by its postcondition, naming the
    indexer's TopK (SelectionPrecisionError), while the router island alone still passes for the router TopKs."""
    from targets.ort_cuda import gears, graphs
    monkeypatch.setattr(graphs, "_selection_nodes", lambda g, router: set())
    with pytest.raises(graphs.SelectionPrecisionError, match=r"TopK 'index_select_0/.*' \(a selection outside"):
        gears.export_gear(model, GEARS[0])


def _eager_indexer_margins(model, ids: np.ndarray) -> np.ndarray:
    """[S]: per query position of `ids` [1, S], the smallest (over layers) eager fp32 indexer margin, k-th minus
    (k+1)-th score of its selection (models/indexer.py LightningIndexer.select's input)."""
    import torch
    from models.indexer import LightningIndexer
    scores, orig = [], LightningIndexer.select

    def record(self, s):
        scores.append(s.detach().double().numpy()[0])
        return orig(self, s)
    k = model.config.index_topk
    try:
        LightningIndexer.select = record
        with torch.no_grad():
            model.step(torch.as_tensor(ids), model.empty_cache(1, "latent"), "latent")
    finally:
        LightningIndexer.select = orig
    out = np.full(ids.shape[1], np.inf)
    for layer in scores:  # [S, T], -inf where masked
        for q, row in enumerate(layer):
            srt = np.sort(row[np.isfinite(row)])[::-1]
            if srt.size > k:
                out[q] = min(out[q], srt[k - 1] - srt[k])
    return out


def test_gear_greedy_equals_eager(pkg, model):
    """Greedy decode through the package's gears (runtime/cuda_runtime.py GearDecoder on the CPU EP: dynamic prefill,
    pad into gear 32, in-place row writes, switch to gear 64 at position 32) gives the eager model's tokens for 16
    steps; step logits equal the dynamic fp16 runtime's up to fp16 rounding and are within the fp16 judgement's atol
    of eager fp32 except at a query whose eager indexer selection is a near tie (there fp16's score error may swap
    one key in the fp16 graphs, dynamic and gear alike: measured 0.93 at one step here, indexer margin 0.012)."""
    from models.generation import greedy_generate
    from pipeline.parity import BUDGETS
    from runtime.cuda_runtime import CudaPackageRuntime, GearDecoder
    prompt = np.array([[5, 17, 99, 3, 250, 8, 41, 77, 12, 200, 31, 64, 9, 150, 2, 90, 33, 18, 6, 240, 55, 121, 7, 19]])
    want, want_steps = (t.numpy() for t in greedy_generate(model, prompt, GEN))  # positions 24..39: gears 32, 64
    rt = CudaPackageRuntime(pkg, device="cpu")
    dyn_tokens, dyn_steps = rt.generate(prompt, GEN)
    dec = GearDecoder(rt)
    tokens, steps = dec.generate(prompt, GEN)
    assert sorted(dec.state) == list(GEARS)
    np.testing.assert_array_equal(tokens, want)
    np.testing.assert_array_equal(dyn_tokens, want)
    assert np.abs(steps - dyn_steps).max() < 5e-3  # measured 2.0e-3
    err = np.abs(steps - want_steps).max(-1)[0]  # per step
    # the query that computes step t's logits sits at position len(prompt) - 1 + t
    margins = _eager_indexer_margins(model, np.concatenate([prompt, want[:, :-1]], 1))[prompt.shape[1] - 1:]
    off = np.flatnonzero(err > BUDGETS["target-ort-cuda-fp16"].atol)
    # every step off by more than fp16's atol is explained by an indexer near tie, and there is at most one
    assert off.size <= 1 and (margins[off] < 0.02).all(), (err, margins)


def _selection_ids_plus_one(src, dst):
    """The gear graph with every indexer TopK's indices + 1 before the row Gather (the fault)."""
    from pipeline.export import save_graph
    from passes.routing_probes import selection_topks
    m = ir.load(src)
    topks = selection_topks(m)
    assert topks
    for j, t in enumerate(topks):
        ids = t.outputs[1]
        one = ir.Value(name=f"fault_one_{j}", type=ir.TensorType(ids.dtype), shape=ir.Shape([]),
                       const_value=ir.tensor(np.array(1, ids.dtype.numpy())))
        m.graph.register_initializer(one)
        uses = list(ids.uses())
        add = ir.node("Add", [ids, one], name=f"fault_add_{j}")
        add.outputs[0].dtype, add.outputs[0].shape = ids.dtype, ids.shape
        m.graph.insert_after(t, add)
        for u, i in uses:
            u.replace_input_with(i, add.outputs[0])
    save_graph(m, dst)


def test_gear_check_catches_a_shifted_selection(pkg, model, tmp_path):
    """check_gear_decode passes on the packaged gear and fails on the same gear whose top-k Gather reads ids + 1."""
    from models.static_lm import static_cache_spec
    from pipeline import fp16_reference
    from pipeline.export import save_graph
    from targets.ort_cuda import gears, session_config
    from targets.ort_cuda.build import check_gear_decode
    g = GEARS[0]
    names = static_cache_spec(model.config).input_names()
    case = _golden_case(pkg, "decode")
    ref16 = fp16_reference.case_outputs(model, case.inputs, "latent")
    reference = tmp_path / "ref" / f"decode_g{g}.onnx"
    save_graph(gears.trace_gear(model, g), reference)
    src = pkg / "onnx" / f"decode_g{g}.onnx"
    kw = dict(model=model, reference=reference)
    good = check_gear_decode(src, g, case, ref16, names, "t/good", session_config(), **kw)
    assert good.passed, good.failure_reasons()
    bad_path = tmp_path / "bad" / f"decode_g{g}.onnx"
    _selection_ids_plus_one(src, bad_path)
    bad = check_gear_decode(bad_path, g, case, ref16, names, "t/bad", session_config(), **kw)
    assert not bad.passed
    assert any(r.startswith("output 'logits'") for r in bad.failure_reasons()), bad.failure_reasons()


def test_verify_runs_the_v32_gears_on_the_cpu(pkg):
    """The package runtime's golden re-run on the CPU EP (runtime/cuda_runtime.py verify_golden device cpu: the golden
    cases, greedy through the dynamic graphs and through the gears), and `mlamoe verify` (pipeline/verify.py
    verify_full: hashes and archive; without a CUDA EP it re-runs no golden data for ort-cuda)."""
    from pipeline.verify import verify_full
    from runtime import cuda_runtime
    failures, _ = cuda_runtime.verify_golden(pkg, device="cpu")
    assert failures == [], failures
    ok, lines = verify_full(pkg)
    assert ok, lines


def test_static_routers_are_the_eager_gates(model):
    """passes/routing_probes.py static_routers on the fp32 traced gear: one per MoE layer, in layer order, each gate
    logits value the output of the MatMul / Gemm by that layer's eager gate weight, its expert TopK of k num_experts_per_tok;
    selection_topks finds one indexer TopK per layer, k index_topk."""
    from passes.routing_probes import selection_topks, static_routers
    from targets.ort_cuda import gears
    m = gears.trace_gear(model, GEARS[0])
    routers = static_routers(m)
    moe_layers = [layer for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    assert len(routers) == len(moe_layers)
    for (gate, topk), layer in zip(routers, moe_layers):
        w = layer.mlp.gate.weight.detach().numpy()
        b = gate.producer().inputs[1].const_value.numpy()  # MatMul [in, out] or Gemm transB [out, in]
        assert any(b.shape == x.shape and np.allclose(b, x, atol=1e-6) for x in (w, w.T))
        assert int(topk.inputs[1].const_value.numpy().ravel()[0]) == model.config.num_experts_per_tok
    sel = selection_topks(m)
    assert len(sel) == model.config.num_hidden_layers
    assert all(int(t.inputs[1].const_value.numpy().ravel()[0]) == model.config.index_topk for t in sel)


def test_gear_check_catches_a_router_without_its_bias(pkg, model, tmp_path):
    """With routing forced, a gear whose router lost e_score_correction_bias does not reproduce the reference's
    expert choice: the routed gear check fails on routing, naming it."""
    from models.static_lm import static_cache_spec
    from pipeline import fp16_reference
    from pipeline.export import save_graph
    from passes.routing_probes import static_routers
    from targets.ort_cuda import gears, session_config
    from targets.ort_cuda.build import check_gear_decode
    g = GEARS[0]
    m = ir.load(pkg / "onnx" / f"decode_g{g}.onnx")
    zeroed = 0
    for gate, _ in static_routers(m):
        for sig, _ in gate.uses():
            for add, _ in (sig.outputs[0].uses() if sig.op_type == "Sigmoid" else ()):
                for v in add.inputs:
                    if add.op_type == "Add" and v is not None and v.const_value is not None:
                        v.const_value = ir.tensor(np.zeros(v.const_value.shape, np.float32), name=v.name)
                        zeroed += 1
    assert zeroed == len(static_routers(m))
    bad_path = tmp_path / "bad" / f"decode_g{g}.onnx"
    save_graph(m, bad_path)
    reference = tmp_path / "ref" / f"decode_g{g}.onnx"
    save_graph(gears.trace_gear(model, g), reference)
    case = _golden_case(pkg, "decode")
    bad = check_gear_decode(bad_path, g, case, fp16_reference.case_outputs(model, case.inputs, "latent"),
                            static_cache_spec(model.config).input_names(), "t/bias", session_config(), model=model,
                            reference=reference)
    assert not bad.passed
    assert any(r.startswith("routing:") and "checkpoint's routing" in r for r in bad.failure_reasons()), \
        bad.failure_reasons()
