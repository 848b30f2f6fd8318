"""Routing-aware fp16 emulation (targets/ascend/emulation.py): a routing decision that fp16 flips on
an fp32 near-tie is excluded from msit's thresholds and reported, and never hides a real precision
error elsewhere; a flip that is not a near-tie, or too many flips, fail the report."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import models
from pipeline.parity import ParityError
from targets.ascend import emulation
from targets.ascend.emulation import (MAX_FLIP_MARGIN, MAX_FLIPPED_FRACTION, RoutingCall, RoutingDecision,
                                      _judge, _RoutingTrace, emulate, make_prompt, to_fp16)
from targets.ascend.static_export import (INDEX_DTYPE, export_static_graph, fp32_island_nodes, graph_specs,
                                          save_static_graph, zero_inputs)

BUCKET, M, L = 16, 32, 12  # one flipped position of 12 stays under MAX_FLIPPED_FRACTION
POS, LAYER, ETA = L - 1, 2, 5e-5  # the last prompt token, tiny's last (MoE) layer, fp32 margin 5e-5


def _router_input(m: ir.Model, layer: int, feeds: dict) -> np.ndarray:
    """The input [N, hidden] of router `layer`'s gate Gemm, as the graph computes it (fp32 on entry)."""
    m = ir.from_proto(ir.to_proto(m))
    gemm = next(n for n in m.graph
                if (n.name or "").startswith(f"routers.{layer}/") and n.op_type in ("Gemm", "MatMul"))
    m.graph.outputs.append(gemm.inputs[0])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(ir.to_proto(m).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run([gemm.inputs[0].name], feeds)[0].astype(np.float64)


def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """tiny with one gate row of layer 2 rewritten so that, at position 11 of the emulation prompt,
    the k-th and (k+1)-th expert tie within ETA in fp32 and the order is reversed by the fp16 graph's
    own rounding of the router input: a genuine fp16 flip on a near-tie, at one position only."""
    model = models.load("tiny")
    cfg = model.config
    specs = graph_specs(1, M, (BUCKET,))
    irs = {s.name: (s, export_static_graph(model, s)) for s in specs}
    keep = {n: [x for xs in fp32_island_nodes(m).values() for x in xs] for n, (_, m) in irs.items()}
    pre = f"prefill_s{BUCKET}"
    spec, m32 = irs[pre]
    feeds = zero_inputs(cfg, spec)
    feeds["input_ids"] = np.zeros((1, BUCKET), INDEX_DTYPE)
    feeds["input_ids"][:, :L] = make_prompt(cfg, 1, L, seed=0).numpy()
    x32 = _router_input(m32, LAYER, feeds)[POS]
    x16 = _router_input(to_fp16(m32, keep[pre]), LAYER, feeds)[POS]
    assert 0 < np.linalg.norm(x16 - x32) < 1e-2 * np.linalg.norm(x32)  # fp16 rounding, nothing more

    gate = model.model.layers[LAYER].mlp.gate
    W = gate.weight.detach().double().numpy()
    bias = gate.e_score_correction_bias.double().numpy()
    c32, c16 = _sig(W @ x32) + bias, _sig(W @ x16) + bias
    E, G, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    per = E // G
    group_score = np.sort(c32.reshape(G, per), axis=-1)[:, -2:].sum(-1)  # noaux_tc
    groups = np.argsort(-group_score)[:cfg.topk_group]
    cand = sorted((e for g in groups for e in range(g * per, (g + 1) * per)), key=lambda e: -c32[e])
    a, b = cand[k - 1], cand[k]  # fp32: a is the k-th choice, b the (k+1)-th

    # w_b = w_b + alpha x32 + beta x16 with choice_b = choice_a - ETA on x32 and choice_a + ETA on x16
    def logit(c):
        return np.log(c / (1 - c))
    t32, t16 = logit(c32[a] - bias[b] - ETA), logit(c16[a] - bias[b] + ETA)
    A = np.array([[x32 @ x32, x16 @ x32], [x32 @ x16, x16 @ x16]])
    alpha, beta = np.linalg.solve(A, [t32 - W[b] @ x32, t16 - W[b] @ x16])
    wb = (W[b] + alpha * x32 + beta * x16).astype(np.float32)
    b32, b16 = _sig(wb.astype(np.float64) @ x32) + bias[b], _sig(wb.astype(np.float64) @ x16) + bias[b]
    assert 0 < c32[a] - b32 < 1e-4 and b16 > c16[a]

    import torch
    with torch.no_grad():
        gate.weight[b] = torch.from_numpy(wb)
    new = gate.weight.detach().numpy().copy()
    folder = tmp_path_factory.mktemp("routing_crafted")
    graphs = {}
    for name, (s, m) in irs.items():
        init = m.graph.initializers[f"model.model.layers.{LAYER}.mlp.gate.weight"]
        init.const_value = ir.tensor(new, name=init.name)
        graphs[name] = (s, save_static_graph(m, folder / f"{name}.onnx"))
    return SimpleNamespace(model=model, graphs=graphs, keep=keep, a=int(a), b=int(b))


def _emulate(c):
    return emulate(c.model, c.graphs, c.keep, prompt_len=L, decode_steps=2, gen_tokens=4)


def test_near_tie_flip_is_excluded_and_reported(crafted):
    reports = _emulate(crafted)
    assert [r.stage.rsplit("/", 1)[-1] for r in reports] == ["prefill", "decode-0", "decode-1", "greedy"]
    assert all(r.passed for r in reports), [r.failure_reasons() for r in reports]
    pre = reports[0].extra["routing"]
    assert pre["flipped_positions"] == [POS] and pre["excluded_positions"] == [POS]
    assert pre["n_positions"] == L and pre["n_rows"] == L and pre["n_rows_judged"] == L - 1
    assert pre["n_decisions"] == L * 2  # tiny: 2 MoE layers
    (root,) = [f for f in pre["flips"] if not f["follows"]]
    assert root["position"] == POS and root["layer"] == LAYER and root["decided_by"] == "experts"
    assert 0 < root["margin"] < 1e-4 and pre["min_margin_of_flips"] == root["margin"]
    assert crafted.a in root["experts_reference"] and crafted.b not in root["experts_reference"]
    assert crafted.b in root["experts_actual"] and crafted.a not in root["experts_actual"]
    assert pre["n_flipped_decisions"] == 1 and pre["reasons"] == []
    assert pre["cache_rows_reset"] == []  # the last layer flipped: no cache row depends on it
    logits = next(o for o in reports[0].outputs if o.name == "logits")
    assert logits.shape == (L - 1, 256)  # judged over the 11 agreeing positions
    assert pre["unmasked"]["logits"]["rel_euclid"] > logits.rel_euclid
    for r in reports[1:3]:  # decode steps: their own tokens agreed, judged in full
        assert r.extra["routing"]["excluded_positions"] == [] and r.extra["routing"]["flipped_positions"] == [POS]
    greedy = reports[-1].extra["routing"]
    assert greedy["excluded_positions"] == [POS]  # greedy step 0 is the logits at position 11
    div = greedy["first_token_divergence"]
    assert div is None or (div["routing_flip_before"] and div["flipped_positions_before"] == [POS])
    text = emulation.describe(reports)
    assert f"on {L - 1} of {L} prefill positions" in text and f"1 position excluded ({POS})" in text
    assert f"layer {LAYER} expert choice, fp32 margin" in text
    md = reports[0].to_markdown()
    assert "Routing vs the fp32 graphs" in md and f"position {POS} layer {LAYER}" in md


def test_flip_does_not_hide_a_precision_error(crafted, monkeypatch):
    """The same flip, plus the fp16 lm_head scaled by 1.1: the agreeing positions break msit's
    thresholds and the report fails, with the flip still excluded and reported."""
    plain = emulation.to_fp16

    def corrupted(model, keep):
        m = plain(model, keep)
        head = next(n for n in m.graph if (n.name or "").startswith("lm_head/"))
        w = next(v for v in head.inputs if v is not None and v.is_initializer())
        w.const_value = ir.tensor((w.const_value.numpy().astype(np.float32) * 1.1).astype(w.const_value.numpy().dtype),
                                  name=w.name)
        return m

    monkeypatch.setattr(emulation, "to_fp16", corrupted)
    reports = _emulate(crafted)
    pre = reports[0]
    assert not pre.passed
    assert pre.extra["routing"]["excluded_positions"] == [POS] and pre.extra["routing"]["reasons"] == []
    assert any("'logits'" in r and "rel_euclid" in r for r in pre.failure_reasons())
    with pytest.raises(ParityError, match="rel_euclid"):
        pre.raise_if_failed()


# ---------------------------------------------------------------------------- the rules, synthetic
S, K, E = 20, 2, 4


def _trace(margins: dict[int, float], later: dict[int, float] | None = None):
    """fp32 vs 'fp16' routing over S positions, 1 or 2 layers: position p flips (k-th and (k+1)-th
    swapped) where margins has it, with that fp32 margin; `later` flips layer 2 likewise."""
    rng = np.random.default_rng(0)
    layers = [1] + ([2] if later is not None else [])
    dec = {"g": [RoutingDecision(f"routers.{i}/topk", i, "experts", f"i{i}", f"s{i}", -1, K) for i in layers]}
    ref, act = SimpleNamespace(decisions=dec), SimpleNamespace(decisions=dec)
    rc = RoutingCall("g", np.array([0]), S, {}, {})
    ac = RoutingCall("g", np.array([0]), S, {}, {})
    for i, flips in zip(layers, [margins, later or {}]):
        scores = np.sort(rng.uniform(0, 1, (1, S, E)), axis=-1)[..., ::-1].copy()
        scores[..., K:] -= 0.05  # a clear margin everywhere ...
        for p, m in flips.items():  # ... except at the flipped positions
            scores[0, p, K] = scores[0, p, K - 1] - m
        order = np.argsort(-scores, axis=-1)
        rc.scores[dec["g"][i - 1].node] = scores
        rc.indices[dec["g"][i - 1].node] = order[..., :K]
        swapped = order.copy()
        for p in flips:
            swapped[0, p, [K - 1, K]] = swapped[0, p, [K, K - 1]]
        ac.indices[dec["g"][i - 1].node] = swapped[..., :K]
    t = _RoutingTrace(ref, act)
    t.add(rc, ac, S)
    return t


def _logits(flipped: list[int]):
    rng = np.random.default_rng(1)
    r = rng.normal(0, 1, (1, S, 32))
    a = r + rng.normal(0, 1e-3, r.shape)
    for p in flipped:
        a[0, p] = rng.normal(0, 1, 32)  # a flipped token diverges
    return {"logits": r}, {"logits": a}


def _judged(trace, flipped):
    ref, act = _logits(flipped)
    return _judge("ascend-fp16-emulation/prefill", ref, act, ["logits"], trace, np.arange(S)[None])


def test_rules_near_tie_passes_and_masks():
    rep = _judged(_trace({5: 3e-4}), [5])
    rt = rep.extra["routing"]
    assert rep.passed and rt["excluded_positions"] == [5] and rt["n_rows_judged"] == S - 1
    assert rt["min_margin_of_flips"] == pytest.approx(3e-4) and not rt["unmasked"]["logits"]["passed"]


def test_rules_flip_with_a_clear_margin_fails():
    rep = _judged(_trace({5: 5 * MAX_FLIP_MARGIN}), [5])
    assert rep.outputs[0].passed and not rep.passed  # masked numbers fine: the flip itself fails
    assert any("not a near-tie" in r for r in rep.failure_reasons())
    with pytest.raises(ParityError, match="not a near-tie"):
        rep.raise_if_failed()


def test_rules_a_flip_following_an_earlier_one_is_a_consequence():
    # layer 1 flips on a near-tie at 5; layer 2 then flips at 5 and at 7 (which attends to 5) with
    # clear margins: consequences, recorded but not judged as near-ties
    rep = _judged(_trace({5: 1e-4}, later={5: 0.2, 7: 0.2}), [5, 7])
    rt = rep.extra["routing"]
    assert rep.passed, rep.failure_reasons()
    assert rt["excluded_positions"] == [5, 7] and rt["n_root_flips"] == 1 and rt["n_flipped_decisions"] == 3
    assert {(f["position"], f["layer"]): f["follows"] for f in rt["flips"]} == {
        (5, 1): None, (5, 2): {"position": 5, "layer": 1}, (7, 2): {"position": 5, "layer": 1}}


def test_rules_too_many_flips_fail():
    n = int(MAX_FLIPPED_FRACTION * S) + 1
    flips = {p: 1e-4 for p in range(0, 2 * n, 2)}
    rep = _judged(_trace(flips), list(flips))
    assert rep.outputs[0].passed and not rep.passed
    assert any(f"flipped at {n} of {S} token positions" in r for r in rep.failure_reasons())
