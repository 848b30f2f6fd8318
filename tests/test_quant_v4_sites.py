"""Fast tier for V4 quantization: the graph rules on small hand-built graphs (no export), and the numpy router.

The graphs spell what tiny-v4's export spells (tests/test_quant_v4.py checks the real export, slow tier):
a sqrt(softplus) gate feeding TopK after the correction bias (moe layer), or only GatherElements (hash_moe layer);
an mHC mix (a linear on the unweighted RMS norm of the streams flattened [B, S, 4, H] -> [B, S, 4H]); routed experts
as MatMul(x, Transpose(Gather(table [E, out, in], e))).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from passes.quant_weights import find_linear_sites, split_expert_tables
from pipeline.parity import Router, route

H, E, S = 16, 8, 3
rng = np.random.default_rng(0)


def _graph() -> tuple[ir.Model, dict[str, np.ndarray]]:
    w = {n: rng.standard_normal(s).astype(np.float32) for n, s in
         {"gate_moe": (H, E), "gate_hash": (H, E), "hc_fn": (4 * H, 24), "o_proj": (4 * H, H), "plain": (H, H),
          "table": (E, 2 * H, H)}.items()}
    bias = rng.standard_normal(E).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in w.items()] + [
        numpy_helper.from_array(bias, "bias"), numpy_helper.from_array(np.array([2], np.int64), "k"),
        numpy_helper.from_array(np.array([1, S, 4 * H], np.int64), "flat"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array(3, np.int64), "e3")]
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "gate_moe"], ["g1"], name="gate_moe_mm"), n("Softplus", ["g1"], ["sp1"]),
        n("Sqrt", ["sp1"], ["s1"]), n("Add", ["s1", "bias"], ["c1"]), n("TopK", ["c1", "k"], ["v1", "i1"]),
        n("GatherElements", ["s1", "i1"], ["w1"], axis=1),
        n("MatMul", ["x", "gate_hash"], ["g2"], name="gate_hash_mm"), n("Softplus", ["g2"], ["sp2"]),
        n("Sqrt", ["sp2"], ["s2"]), n("GatherElements", ["s2", "hash_ids"], ["w2"], axis=1),
        n("Reshape", ["streams", "flat"], ["r"]), n("Pow", ["r", "two"], ["p"]), n("ReduceMean", ["p"], ["m"], axes=[-1]),
        n("Sqrt", ["m"], ["rms"]), n("Div", ["r", "rms"], ["normed"]),
        n("MatMul", ["normed", "hc_fn"], ["mix"], name="hc_mm"),
        n("MatMul", ["r", "o_proj"], ["o"], name="o_mm"),  # a flatten straight into a linear (MLA's o_proj): not mHC
        n("MatMul", ["x", "plain"], ["y"], name="plain_mm"),
        n("Gather", ["table", "e3"], ["w_e"], axis=0), n("Transpose", ["w_e"], ["w_e_t"], perm=[1, 0]),
        n("MatMul", ["x", "w_e_t"], ["expert"], name="expert_mm")]
    f = TensorProto.FLOAT
    g = helper.make_graph(nodes, "v4like", [helper.make_tensor_value_info("x", f, [S, H]),
                                            helper.make_tensor_value_info("hash_ids", TensorProto.INT64, [S, 2]),
                                            helper.make_tensor_value_info("streams", f, [1, S, 4, H])],
                          [helper.make_tensor_value_info(v, f, None) for v in ("w1", "w2", "mix", "o", "y", "expert")],
                          inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    proto = onnx.shape_inference.infer_shapes(proto)
    return ir.from_proto(proto), {**w, "bias": bias}


def test_v4_routers_hash_gate_and_mhc_mix_get_their_roles_and_a_plain_flatten_does_not():
    m, _ = _graph()
    roles = {s.node.name: s.role for s in find_linear_sites(m.graph, logits_outputs=("none",))}
    assert roles["gate_moe_mm"] == "router" and roles["gate_hash_mm"] == "router"
    assert roles["hc_mm"] == "hc"
    assert roles["o_mm"] != "hc" and roles["plain_mm"] == "attention"


def test_split_expert_tables_makes_the_expert_a_linear_site_with_its_own_slice():
    m, w = _graph()
    assert "expert_mm" not in {s.node.name for s in find_linear_sites(m.graph, ("none",))}
    assert split_expert_tables(m.graph) == 1
    site = next(s for s in find_linear_sites(m.graph, ("none",)) if s.node.name == "expert_mm")
    assert np.array_equal(site.weight_oi, w["table"][3])  # [out, in] = table[e]
    assert "table" not in m.graph.initializers  # nothing else read it


def test_sqrtsoftplus_router_choice_matches_torch():
    logits = rng.standard_normal((5, E)) * 3
    bias = rng.standard_normal(E) * 0.1
    r = Router(2, "sqrtsoftplus", "greedy", 1, 1, bias)
    scores = torch.sqrt(F.softplus(torch.as_tensor(logits)))
    want = np.sort(torch.topk(scores + torch.as_tensor(bias), 2).indices.numpy(), -1)
    ids, margin = route(r, logits)
    assert np.array_equal(ids, want)
    c = np.sort((scores + torch.as_tensor(bias)).numpy(), -1)
    assert np.allclose(margin, c[:, -2] - c[:, -3])


def test_a_v4_gate_not_kept_fp32_fails_the_router_site_check():
    import pytest
    import models
    from passes.quant_weights import QuantizationError, QuantReport
    from pipeline.build import check_router_sites
    model = models.load("tiny-v4")  # 5 layers, every one MoE (2 hash_moe)
    ok = QuantReport("int8", skipped=[{"weight": f"g{i}", "role": "router", "node": "", "reason": ""} for i in range(5)])
    check_router_sites(ok, model, "prefill")
    missed = QuantReport("int8", skipped=ok.skipped[:4], quantized=[{"weight": "g4", "role": "attention"}])
    with pytest.raises(QuantizationError, match=r"graph 'prefill' has 4 router gates kept fp32 and 0 quantized, for 5 MoE"):
        check_router_sites(missed, model, "prefill")
    check_router_sites(QuantReport("int8"), models.load("tiny"), "prefill")  # other families: not this check's business
