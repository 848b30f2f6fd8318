"""Decode latency of the MoE forms on ONNX Runtime CPU (not a pytest test).

    python -m pipeline.benchmarks.moe [--model small] [--threads 2] [--past-len 128] [--repeats 20]

Forms timed (decode graph, batch 1, one new token after `past_len` cached tokens, fp32; MLA attention
first rewritten by LatentKVFusionPass as the ort-cpu target does, `fuse_attention=False` keeps it naive,
where re-expanding the cache every step dominates decode and hides the MoE):
  dynamic        the exported expert loop (Equal / NonZero / GatherND / ScatterND-add per expert)
  ort-fused      MoELoweringPass("ort-fused"): com.microsoft.MoEGroupRouter (V3 router) + com.microsoft.MoE
  static-gather  MoELoweringPass("static-gather"): per-token gather of the k experts + batched MatMul
The cache is the real one from a `past_len`-token prompt run through the prefill graph; every figure is
the median of `repeats` timed runs after `warmup` runs (forms interleaved run by run), in ms per token. The logits of each lowered form
are compared with the dynamic form's on the same step. `mlamoe bench` calls bench_moe_decode().
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

FORMS = ("dynamic", "ort-fused", "static-gather")


def _session(proto_bytes: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(proto_bytes, so, providers=["CPUExecutionProvider"])


def bench_moe_decode(model_name: str = "small", threads: int = 2, past_len: int = 128, repeats: int = 20,
                     warmup: int = 3, forms=FORMS, graphs: dict | None = None, fuse_attention: bool = True) -> dict:
    """-> {"model", "threads", "past_len", "ms_per_token": {form: ms}, "speedup_vs_dynamic": {form: x},
           "max_abs_logits_diff": {form: vs dynamic}, "export_s", "lowering": {form: report counts}}."""
    import models
    from passes.moe_lowering import MoELoweringPass
    from pipeline.export import export_graphs

    model = models.load(model_name)
    cfg = model.config
    t0 = time.perf_counter()
    graphs = graphs or export_graphs(model)  # graphs: pre-exported {"prefill", "decode"} of this model
    export_s = time.perf_counter() - t0
    decode = ir.from_proto(ir.to_proto(graphs["decode"]))
    attention = "naive"
    if fuse_attention:  # as the ort-cpu target does: absorbed MLA, so the MoE is what differs
        from passes.latent_kv_fusion import LatentKVFusionPass
        LatentKVFusionPass()(decode)
        attention = "latent-kv-fusion (matmul)"
    protos = {"dynamic": ir.to_proto(decode).SerializeToString()}
    lowering = {}
    for form in forms:
        if form == "dynamic":
            continue
        m = ir.from_proto(ir.to_proto(decode))
        p = MoELoweringPass(form)
        p(m)
        lowering[form] = p.counts
        protos[form] = ir.to_proto(m).SerializeToString()

    # the cache after a past_len-token prompt (eager model: no second ORT session holding the weights)
    import gc

    import torch
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(0, cfg.vocab_size, (1, past_len)))
    with torch.no_grad():
        logits0, cache = model.step(ids, model.empty_cache(1))
    step = {"input_ids": np.array([[int(logits0[0, -1].argmax())]], dtype=np.int64)}
    step.update({f"past.{i}.{n}": t.numpy() for i, layer in enumerate(cache) for n, t in zip(("c_kv", "k_pe"), layer)})
    del model, graphs, decode, logits0, cache
    gc.collect()  # medium: keep only the serialized graphs and their sessions in memory

    # forms interleaved round-robin so a change of machine load hits them alike
    sessions = {form: _session(proto, threads) for form, proto in protos.items()}
    logits = {form: None for form in sessions}
    for _ in range(warmup):
        for form, sess in sessions.items():
            logits[form] = sess.run(["logits"], step)[0]
    times: dict = {form: [] for form in sessions}
    for _ in range(repeats):
        for form, sess in sessions.items():
            t = time.perf_counter()
            sess.run(["logits"], step)
            times[form].append((time.perf_counter() - t) * 1e3)
    ms = {form: statistics.median(v) for form, v in times.items()}
    return {
        "model": model_name, "threads": threads, "past_len": past_len, "batch": 1, "repeats": repeats,
        "attention": attention,
        "experts": cfg.n_routed_experts, "k": cfg.num_experts_per_tok, "moe_layers": cfg.num_hidden_layers - cfg.first_k_dense_replace,
        "ms_per_token": {f: round(v, 3) for f, v in ms.items()},
        "speedup_vs_dynamic": {f: round(ms["dynamic"] / v, 2) for f, v in ms.items() if f != "dynamic"},
        "max_abs_logits_diff": {f: float(np.abs(logits[f] - logits["dynamic"]).max()) for f in ms if f != "dynamic"},
        "export_s": round(export_s, 1),
        "lowering": lowering,
    }


def format_bench_moe(r: dict) -> str:
    lines = [f"MoE decode on ORT CPU: {r['model']} ({r['experts']} experts, k={r['k']}, {r['moe_layers']} MoE layers), "
             f"batch 1, past {r['past_len']}, {r['threads']} threads, attention {r['attention']}, median of {r['repeats']}"]
    for f, v in r["ms_per_token"].items():
        extra = "" if f == "dynamic" else (f"  {r['speedup_vs_dynamic'][f]:.2f}x faster, "
                                           f"max |dlogits| {r['max_abs_logits_diff'][f]:.1e}")
        lines.append(f"  {f:14s} {v:8.3f} ms/token{extra}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = bench_moe_decode(a.model, a.threads, a.past_len, a.repeats)
    print(json.dumps(r, indent=2) if a.json else format_bench_moe(r))


if __name__ == "__main__":
    main()
