"""passes/ort_simplify.py: exact rewrites that let ORT fuse RMSNorm and drop Reshape shape arithmetic."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import models
from passes.ort_simplify import ORTSimplifyPass
from pipeline.export import export_graphs


def _session(blob: bytes, optimized_path=None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    if optimized_path is not None:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny():
    model = models.load("tiny", seed=0)
    return model, {g: ir.to_proto(m) for g, m in export_graphs(model).items()}


def _feeds(sess, batch: int, seq: int, past: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal([batch, past, i.shape[2]]).astype(np.float32)
    return feeds


@pytest.mark.parametrize("graph,batch,seq,past", [("prefill", 1, 5, 0), ("prefill", 3, 4, 6), ("decode", 2, 1, 9)])
def test_simplified_graph_matches_exported_graph(tiny, tmp_path, graph, batch, seq, past):
    model, protos = tiny
    m = ir.from_proto(protos[graph])
    p = ORTSimplifyPass()
    p(m)
    n_norms = 2 * model.config.num_hidden_layers + 1 + 2 * model.config.num_hidden_layers  # layer, final, q_a/kv_a
    assert p.report["rmsnorm-div"] == n_norms
    assert p.report["reshape-infer"] > 0
    ref = _session(protos[graph].SerializeToString())
    new = _session(ir.to_proto(m).SerializeToString(), tmp_path / "opt.onnx")
    feeds = _feeds(ref, batch, seq, past, model.config.vocab_size)
    names = [o.name for o in ref.get_outputs()]
    for name, a, b in zip(names, ref.run(None, feeds), new.run(names, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)
    # ORT now fuses every RMSNorm into one kernel
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph.node]
    assert ops.count("SimplifiedLayerNormalization") == n_norms
    assert "Reciprocal" not in ops


def _reshape_model(concat_inputs, data_shape, initializers):
    """x -> Reshape(x, Concat(concat_inputs)); 'n' = the batch read back through Shape/Gather/Unsqueeze."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["n0"], axis=0),
        helper.make_node("Reshape", ["n0", "minus1"], ["n"]),  # the exporter's spelling: Reshape(scalar, [-1])
        helper.make_node("Shape", ["x"], ["s2"]),
        helper.make_node("Gather", ["s2", "i1"], ["m0"], axis=0),
        helper.make_node("Reshape", ["m0", "minus1"], ["m"]),
        helper.make_node("Concat", concat_inputs, ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1),
    ]
    inits = [helper.make_tensor("i0", TensorProto.INT64, [], [0]), helper.make_tensor("i1", TensorProto.INT64, [], [1]),
             helper.make_tensor("minus1", TensorProto.INT64, [1], [-1])]
    inits += [helper.make_tensor(k, TensorProto.INT64, [1], [v]) for k, v in initializers.items()]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, data_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
                          # as torch's exporter writes them: the dims read back are annotated scalars
                          value_info=[helper.make_tensor_value_info(v, TensorProto.INT64, []) for v in ("n0", "m0")])
    return ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))


@pytest.mark.parametrize("concat,consts,rewritten", [
    (["n", "c4", "c6"], {"c4": 4, "c6": 6}, True),       # one unknown dim -> -1
    (["n", "m", "c6"], {"c6": 6}, False),                # two unknown dims: no single -1 can say it
    (["n", "c0", "c24"], {"c0": 0, "c24": 24}, False),   # a literal 0 (allowzero) is left alone
])
def test_reshape_infer_only_where_exact(concat, consts, rewritten):
    m = _reshape_model(concat, ["batch", 4, 6] if "c0" not in consts else ["batch", 0, 6], consts)
    before = ir.to_proto(m).SerializeToString()
    p = ORTSimplifyPass()
    p(m)
    assert p.report["reshape-infer"] == int(rewritten)
    x = np.arange(3 * 4 * 6 if "c0" not in consts else 0, dtype=np.float32).reshape(3, -1 if "c0" not in consts else 0, 6)
    want = _session(before).run(None, {"x": x})[0]
    got = _session(ir.to_proto(m).SerializeToString()).run(None, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    ops = [n.op_type for n in m.graph]
    assert ("Concat" in ops) == (not rewritten)  # the shape arithmetic is gone only when rewritten
