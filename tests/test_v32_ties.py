"""The lightning indexer's exported selection (models/indexer.py tie_exact_top_ids) is independent of TopK's tie order:
run under the ONNX reference evaluator with a TopK that returns equal values in DESCENDING index order (ORT's CUDA EP
does not keep ONNX's lower-index-first rule either, docs/v32.md), the old form (TopK's indices) picks other keys than
eager's stable sort, the new form picks eager's keys exactly."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from models.errors import MlamoeError
from models.indexer import top_ids
from pipeline.export import trace


class AdversarialTopK(OpRun):
    """ONNX TopK, except equal values come out in descending index order (the spec says ascending)."""
    op_domain = ""

    def _run(self, x, k, axis=None, largest=None, sorted=None):  # noqa: A002
        axis = -1 if axis is None else axis
        k = int(np.asarray(k).reshape(-1)[0])
        xm = np.moveaxis(x, axis, -1)
        rev = xm[..., ::-1]
        key = -rev if (largest is None or largest) else rev
        order = np.argsort(key, axis=-1, kind="stable")[..., :k]
        ids = xm.shape[-1] - 1 - order
        vals = np.take_along_axis(xm, ids, axis=-1)
        return np.moveaxis(vals, -1, axis), np.moveaxis(ids.astype(np.int64), -1, axis)


AdversarialTopK.__name__ = "TopK"


class Select(torch.nn.Module):
    def __init__(self, k, old=False):
        super().__init__()
        self.k, self.old = k, old

    def forward(self, scores):
        k = min(self.k, scores.shape[-1])
        return scores.topk(k, dim=-1).indices if self.old else top_ids(scores, k)


def tied_scores(rng, B, S, T):
    """Scores with many exact ties: a third exact zeros (all-ReLU-zeroed keys), causal -inf, a few repeated values."""
    s = rng.standard_normal((B, S, T)).astype(np.float32)
    s[rng.random((B, S, T)) < 0.35] = 0.0
    s[rng.random((B, S, T)) < 0.1] = 1.5
    past = T - S
    for q in range(S):
        s[:, q, past + q + 1:] = -np.inf
    return s


def _export(module, T, tmp_path, name):
    x = torch.zeros(2, 3, T)
    dyn = {"scores": {2: torch.export.Dim("T", min=2, max=4096)}}
    prog = trace(module, (x,), name, MlamoeError, dynamic_shapes=dyn, input_names=["scores"], output_names=["ids"])
    path = tmp_path / f"{name}.onnx"
    prog.save(str(path))
    return onnx.load(str(path))


def _sets(ids):
    return np.sort(np.asarray(ids), axis=-1)


@pytest.mark.parametrize("T", [9, 40, 300])
def test_exported_selection_ignores_topk_tie_order(tmp_path, T):
    k = 16
    rng = np.random.default_rng(T)
    scores = tied_scores(rng, 2, 3, T)
    ref = _sets(top_ids(torch.from_numpy(scores), min(k, T)).numpy())  # eager: stable sort
    new = _export(Select(k), T, tmp_path, "new")
    old = _export(Select(k, old=True), T, tmp_path, "old")
    run = lambda m, ops: ReferenceEvaluator(m, new_ops=ops).run(None, {"scores": scores})[0]  # noqa: E731
    # the spec-conforming TopK: both forms agree with eager
    np.testing.assert_array_equal(_sets(run(old, None)), ref)
    np.testing.assert_array_equal(_sets(run(new, None)), ref)
    # the adversarial TopK: the old form picks other tied keys (where ties cross the k-th place), the new form does not
    if T > k:
        assert not np.array_equal(_sets(run(old, [AdversarialTopK])), ref)
    got = run(new, [AdversarialTopK])
    np.testing.assert_array_equal(_sets(got), ref)
    np.testing.assert_array_equal(got, _sets(got))  # ascending key order, whatever the tie order


def test_exported_selection_runs_on_ort_cpu_and_equals_eager(tmp_path):
    import onnxruntime as ort
    k, T = 16, 300
    scores = tied_scores(np.random.default_rng(1), 2, 3, T)
    model = _export(Select(k), T, tmp_path, "new")
    assert sorted({n.op_type for n in model.graph.node} & {"TopK", "CumSum", "ReduceSum", "ReduceMin"}) == \
        ["CumSum", "ReduceMin", "ReduceSum", "TopK"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"scores": scores})[0]
    np.testing.assert_array_equal(got, _sets(top_ids(torch.from_numpy(scores), k).numpy()))


def test_forced_selection_reads_the_forced_scores_everywhere(tmp_path):
    """passes/routing_probes.py: one selection per exported selection (the k-th-value TopK is not one), its scores the
    indexer's scores, and forcing makes both TopKs and the compares read the forced scores: fed garbage as its own
    scores, the forced graph picks eager's keys of the forced scores."""
    import onnx_ir as ir
    import onnxruntime as ort
    from passes.routing_probes import force_selections, selection_forced_name, selection_scores, selection_topks
    k, T = 16, 120
    model = ir.from_proto(_export(Select(k), T, tmp_path, "new"))
    sel = selection_topks(model)
    assert len(sel) == 1 and sel[0].outputs[1].is_graph_output()
    assert selection_scores(sel[0]) is model.graph.inputs[0]
    assert force_selections(model) == 1
    assert not model.graph.inputs[0].uses()
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    forced = tied_scores(np.random.default_rng(2), 2, 3, T)
    own = np.random.default_rng(3).standard_normal(forced.shape).astype(np.float32)
    out = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, {"selection.0.scores": own, selection_forced_name(0): forced})))  # the input, renamed
    np.testing.assert_array_equal(out["selection.0.ids"], _sets(top_ids(torch.from_numpy(forced), k).numpy()))
