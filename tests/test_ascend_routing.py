"""Teacher-forced fp16 emulation (targets/ascend/emulation.py): the fp16 graphs read the fp32 static graphs' gate
logits, so msit's thresholds judge every row, while a decision their own gate logits flip on an fp32 near tie is
reported apart (parity's routing judgement) and never hides a precision error; a flip at a margin the stage's error
cannot explain, too many flips, or a router that does not reproduce the forced choice fail the report."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import models
from pipeline.parity import MAX_FLIPPED_FRACTION, ParityError, Router
from targets.ascend import emulation
from targets.ascend.emulation import ForcedCall, _judge, emulate, make_prompt, to_fp16
from targets.ascend.static_export import (INDEX_DTYPE, export_static_graph, fp32_island_nodes, graph_specs,
                                          save_static_graph, zero_inputs)

BUCKET, M, L = 16, 32, 12  # one flipped position of 12 stays under MAX_FLIPPED_FRACTION
POS, LAYER, ETA = L - 1, 2, 5e-5  # the last prompt token, tiny's last (MoE) layer, fp32 margin 5e-5
MOE_INDEX = 1  # LAYER among tiny's MoE layers (1 and 2): the index routing records use


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


def test_near_tie_flip_is_reported_and_every_row_judged(crafted):
    reports = _emulate(crafted)
    assert [r.stage.rsplit("/", 1)[-1] for r in reports] == ["prefill", "decode-0", "decode-1", "greedy"]
    assert all(r.passed for r in reports), [r.failure_reasons() for r in reports]
    pre = reports[0].extra["routing"]
    assert pre["forced_routing_checked"] and pre["n_decisions"] == L * 2  # tiny: 2 MoE layers
    (flip,) = pre["flips"]
    assert flip["position"] == [0, POS] and flip["layer"] == MOE_INDEX
    assert 0 < flip["margin"] < 1e-4 and flip["margin"] <= flip["allowed"]
    assert crafted.a in flip["experts_reference"] and crafted.b not in flip["experts_reference"]
    assert crafted.b in flip["experts_actual"] and crafted.a not in flip["experts_actual"]
    assert pre["reasons"] == []
    outputs = {o.name: o for o in reports[0].outputs}
    assert outputs["logits"].shape == (1, L, 256)  # forced: the flipped position is judged too
    assert {"routing.0.gate_logits", "routing.1.gate_logits"} <= set(outputs)
    for r in reports[1:3]:  # decode steps: their own token's routing agreed
        assert r.extra["routing"]["flips"] == [] and r.extra["routing"]["n_decisions"] == 2
    greedy = reports[-1]
    assert [f["position"] for f in greedy.extra["routing"]["flips"]] == [[0, POS]]  # step 0 = the prompt's last
    unforced = greedy.extra["unforced_greedy"]
    assert [(f["position"], f["layer"]) for f in unforced["flips_before"]] == [(POS, MOE_INDEX)]
    text = emulation.describe(reports)
    assert f"on all {L} prefill positions, 2 of 2 decode steps" in text
    assert f"1 of {L * 2 + 2 * 2} (position, MoE layer) decisions flipped, each a near tie (position {POS} layer " \
           f"{MOE_INDEX}: fp32 margin" in text
    md = reports[0].to_markdown()
    assert "Routing (numeric error judged with the reference's routing forced" in md
    assert f"layer {MOE_INDEX} position [0, {POS}]" in md


def test_flip_does_not_hide_a_precision_error(crafted, monkeypatch):
    """The same flip, plus the fp16 lm_head scaled by 1.1: msit's thresholds fail, the flip is still reported and is
    not what fails."""
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
    assert [f["position"] for f in pre.extra["routing"]["flips"]] == [[0, POS]] and pre.extra["routing"]["reasons"] == []
    assert any("'logits'" in r and "rel_euclid" in r for r in pre.failure_reasons())
    with pytest.raises(ParityError, match="rel_euclid"):
        pre.raise_if_failed()


# ---------------------------------------------------------------------------- the rules, synthetic
S, K, E = 20, 2, 8
ROUTER = Router(K, "sigmoid", "greedy")


def _call(flips: dict[int, float], noise: float = 1e-3, forced_ok: bool = True) -> ForcedCall:
    """One prefill call over S positions, one MoE layer: the reference's gate logits with a clear gap below the
    k-th expert (0.3 in sigmoid score) except at `flips` (position: the fp32 margin there); the lossy graph's own
    gate logits = the reference's + `noise`, with the k-th and (k+1)-th swapped at the flipped positions; its forced
    router scores = the reference's choice scores (forced_ok) or with the k-th and (k+1)-th swapped at position 0."""
    rng = np.random.default_rng(0)
    score = np.sort(rng.uniform(0.55, 0.95, (S, E)), axis=-1)[:, ::-1].copy()
    score[:, K:] -= 0.3
    for p, m in flips.items():
        score[p, K] = score[p, K - 1] - m
    ref = np.log(score / (1 - score))
    act = ref + rng.uniform(-noise, noise, ref.shape)
    for p in flips:
        act[p, [K - 1, K]] = ref[p, [K, K - 1]]
    probs = ROUTER.choice_scores(ref)
    if not forced_ok:
        probs[0, [K - 1, K]] = probs[0, [K, K - 1]]
    return ForcedCall("prefill_s20", np.array([0]), S, [ref[None]], [act[None]], [probs[None]])


def _judged(call: ForcedCall, fault: float = 0.0):
    rng = np.random.default_rng(1)
    r = rng.normal(0, 1, (1, S, 32))
    a = r + rng.normal(0, 1e-3, r.shape) + fault
    return _judge("ascend-fp16-emulation/prefill", {"logits": r}, {"logits": a}, ["logits"], [(call, S)], [ROUTER])


def test_rules_near_tie_flip_passes_and_is_listed():
    rep = _judged(_call({5: 1e-4}))
    rt = rep.extra["routing"]
    assert rep.passed, rep.failure_reasons()
    assert [f["position"] for f in rt["flips"]] == [[0, 5]] and rt["flips"][0]["margin"] == pytest.approx(1e-4, rel=1e-3)


def test_rules_flip_with_a_clear_margin_fails():
    """A flip at margin 0.05 where the stage moves router scores by ~2.5e-4 elsewhere: its own row moved ~0.05 (it had
    to, to flip), which the rule does not count as the stage's error."""
    rep = _judged(_call({5: 0.05}))
    assert rep.outputs[0].passed and not rep.passed
    assert any("not a near tie" in r and "position [0, 5]" in r for r in rep.failure_reasons()), rep.failure_reasons()
    with pytest.raises(ParityError, match="not a near tie"):
        rep.raise_if_failed()


def test_rules_too_many_flips_fail():
    n = int(MAX_FLIPPED_FRACTION * S) + 1
    rep = _judged(_call({p: 1e-4 for p in range(0, 2 * n, 2)}, noise=1e-3))
    assert rep.outputs[0].passed and not rep.passed
    assert any(f"routing flipped at {n} of {S} (position, layer) decisions" in r for r in rep.failure_reasons())


def test_rules_a_router_that_does_not_reproduce_the_forced_choice_fails():
    rep = _judged(_call({}, forced_ok=False))
    assert not rep.passed
    assert any("the router does not compute the checkpoint's routing" in r for r in rep.failure_reasons())


def test_rules_forcing_does_not_excuse_a_numeric_fault():
    rep = _judged(_call({5: 1e-4}), fault=0.5)
    assert not rep.passed and any("'logits'" in r for r in rep.failure_reasons())
