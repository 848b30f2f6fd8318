"""Feasibility (issue 14 item 6, slow tier): tiny-v4's `step` traces with torch.onnx.export (dynamo) into one
graph with a dynamic token axis and every cache axis dynamic by its length rule (window, pending(m),
compressed(m): one Dim per rule and rate), and ONNX Runtime runs it equal to the eager step for prefill from
empty, chunked prefill and decode (S = 1) at past lengths on both sides of CSA / HCA window boundaries.
Nothing in the eager form had to change: its lengths are shape arithmetic, the indexer's top-k has
k = min(index_topk, entries) (a symbolic min), and indexer.top_ids switches to TopK while exporting.
The compiler's export (pipeline/export.py length_dims / example_past) builds the same Dims; its packages are
tested in tests/test_compile_v4.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.export import Dim

import models

pytestmark = pytest.mark.slow


def dynamic_shapes(spec, graph_seq: bool):
    batch, dims = Dim("batch", min=1, max=64), {}

    def dim(t):
        key = {"window": "window", "pending": f"pending{t.n}", "compressed": f"compressed{t.n}", "append": "past"}[t.rule]
        if key not in dims:
            dims[key] = Dim(key, min=0, max=t.n if t.rule == "window" else 4096)
        return dims[key]

    ids = {0: batch, 1: Dim("seq", min=1, max=4096)} if graph_seq else {0: batch}
    return {"input_ids": ids, "past": tuple({0: batch} if t.rule == "fixed" else {0: batch, t.grows: dim(t)}
                                            for layer in spec.layers for t in layer)}


@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_tiny_v4_step_exports_with_dynamic_shapes_and_ort_matches_eager(tmp_path, graph):
    """decode: input_ids [batch, 1]. The pending Dims are left unbounded above: with max = m - 1 (their true
    bound) and an example at m - 1 the exporter specialised them to that size."""
    import onnxruntime as ort
    from pipeline.export import CausalLMGraph, ExportError, trace
    m = models.load("tiny-v4")
    spec = m.cache_spec()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # past 18: pending 2 (m=4) and 2 (m=8), full window: no axis at 0 or 1
        _, cache = m.step(torch.randint(0, 256, (2, 18), generator=g), m.empty_cache(2))
    seq = 1 if graph == "decode" else 6
    args = (torch.randint(0, 256, (2, seq), generator=g), *[t for layer in cache for t in layer])
    program = trace(CausalLMGraph(m, "compressed").eval(), args, "tiny-v4 step", ExportError,
                    dynamic_shapes=dynamic_shapes(spec, graph == "prefill"), input_names=["input_ids", *spec.input_names()],
                    output_names=["logits", *spec.output_names()])
    program.save(tmp_path / "step.onnx")
    sess = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    for past in (0, 3, 8, 19, 30):
        with torch.no_grad():
            c = m.empty_cache(2) if past == 0 else m.step(torch.randint(0, 256, (2, past), generator=g), m.empty_cache(2))[1]
            for s in ((1,) if graph == "decode" else (1, 3, 9)):
                x = torch.randint(0, 256, (2, s), generator=g)
                ref, present = m.step(x, c)
                out = sess.run(None, {"input_ids": x.numpy(), **spec.flatten(c)})
                assert np.abs(out[0] - ref.numpy()).max() <= 1e-4, (past, s)
                for got, want in zip(out[1:], [t for layer in present for t in layer]):
                    assert got.shape == want.shape
                    assert np.allclose(got, want.numpy(), atol=1e-4, equal_nan=True)
