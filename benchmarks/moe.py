"""Decode latency of the MoE forms on ONNX Runtime CPU (not a pytest test).

    python -m benchmarks.moe [--model small] [--threads 2] [--past-len 128] [--repeats 20]

Two measurements, each of the three forms:
  whole decode step  the model's decode graph, batch 1, one new token after `past_len` cached tokens, fp32,
                     with the ort-cpu target's other passes applied to every form (MLA rewritten by
                     LatentKVFusionPass, then ORTSimplifyPass; `fuse_attention=False` keeps MLA naive, where
                     re-expanding the cache every step dominates decode and hides the MoE);
  MoE layers         every DeepSeekMoE module of the model (router, routed and shared experts) chained
                     (x <- x + moe_l(x)) and exported alone, one token per run from a cycled pool of 16,
                     so routing changes run to run and each layer's weights come from memory as in the
                     model: the part the lowering changes. Beside it, the memory floor: the fp32 weight
                     bytes one token reads there (shared + k routed experts + gate, every MoE layer) / this
                     machine's read bandwidth (a numpy sum over 1 GiB, best of 3, single thread).
Forms:
  dynamic        the exported expert loop (Equal / NonZero / GatherND / ScatterND-add per expert)
  ort-fused      MoELoweringPass("ort-fused"): com.microsoft.MoEGroupRouter (V3 router) + com.microsoft.MoE
  static-gather  MoELoweringPass("static-gather"): per-token gather of the k experts + batched MatMul
The cache is the real one from a `past_len`-token prompt run through the eager model. Every figure is the
median of `repeats` timed runs in ms; each form is timed in a block of runs (after `warmup` runs), and the
blocks are repeated in alternating order (`rounds`): timing forms interleaved run by run is wrong on a
2-core machine, because the previous session's ORT worker threads are still spinning and slow the next
session's run by milliseconds. The logits of each lowered form
are compared with the dynamic form's on the same step. `mlamoe bench` calls bench_moe_decode().
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from benchmarks import time_blocks  # noqa: E402

FORMS = ("dynamic", "ort-fused", "static-gather")


def _session(proto_bytes: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(proto_bytes, so, providers=["CPUExecutionProvider"])


def _time_blocks(run: dict, repeats: int, warmup: int) -> dict[str, float]:
    return {form: statistics.median(v) for form, v in time_blocks(run, repeats, warmup).items()}


def read_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """GB/s of a single-threaded numpy sum over `nbytes` of float32 (best of 3)."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def _lowered(model: ir.Model, forms) -> tuple[dict[str, bytes], dict]:
    from passes.moe_lowering import MoELoweringPass
    protos, lowering = {}, {}
    for form in forms:
        m = ir.from_proto(ir.to_proto(model))
        if form != "dynamic":
            p = MoELoweringPass(form)
            p(m)
            lowering[form] = p.counts
        protos[form] = ir.to_proto(m).SerializeToString()
    return protos, lowering


class _MoELayers(torch.nn.Module):
    """All of a model's DeepSeekMoE modules in sequence (x <- x + moe_l(x)): the MoE part of a decode step
    with each layer's own weights, so weights come from memory as in the model, not from cache."""

    def __init__(self, moes):
        super().__init__()
        self.moes = torch.nn.ModuleList(moes)

    def forward(self, x):
        for moe in self.moes:
            x = x + moe(x)
        return x


def bench_moe_block(model, threads: int = 2, repeats: int = 100, warmup: int = 5, forms=FORMS) -> dict:
    """Every MoE layer of the model chained and exported alone, one token per run (a pool of 16 tokens
    cycled, so routing changes run to run): ms per token per form, and the memory floor."""
    from torch.export import Dim

    from pipeline.export import ExportError, finish, trace

    cfg = model.config
    moes = [layer.mlp for i, layer in enumerate(model.model.layers) if cfg.is_moe_layer(i)]
    chain = _MoELayers(moes)
    graph = finish(trace(chain, (torch.randn(2, 3, cfg.hidden_size),), "MoE layers", ExportError,
                         dynamic_shapes={"x": {0: Dim("batch"), 1: Dim("seq")}}).model, "moe")
    protos, lowering = _lowered(graph, forms)
    del graph
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randn(1, 1, cfg.hidden_size, generator=gen) for _ in range(16)]
    with torch.no_grad():
        ref = chain(tokens[0]).numpy()
    sessions = {form: _session(proto, threads) for form, proto in protos.items()}
    name = sessions["dynamic"].get_inputs()[0].name
    diff = {form: float(np.abs(s.run(None, {name: tokens[0].numpy()})[0] - ref).max()) for form, s in sessions.items()}
    feeds = itertools.cycle([{name: t.numpy()} for t in tokens])
    ms = _time_blocks({f: (lambda s=s: s.run(None, next(feeds))) for f, s in sessions.items()}, repeats, warmup)
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    per_layer = (cfg.n_shared_experts + cfg.num_experts_per_tok) * 3 * h * i * 4 + cfg.n_routed_experts * h * 4
    weight_bytes = per_layer * len(moes)
    gbs = read_bandwidth_gbs()
    return {
        "moe_layers": len(moes), "repeats": repeats, "tokens_cycled": len(tokens),
        "ms_per_token": {f: round(v, 3) for f, v in ms.items()},
        "speedup_vs_dynamic": {f: round(ms["dynamic"] / v, 2) for f, v in ms.items() if f != "dynamic"},
        "max_abs_diff_vs_eager": diff,
        "weight_bytes_read_per_token": weight_bytes,
        "read_bandwidth_gbs": round(gbs, 2),
        "floor_ms_per_token": round(weight_bytes / gbs / 1e6, 3),
        "lowering": lowering,
    }


def bench_moe_decode(model_name: str = "small", threads: int = 2, past_len: int = 128, repeats: int = 40,
                     warmup: int = 3, forms=FORMS, graphs: dict | None = None, fuse_attention: bool = True,
                     block: bool = True, step_forms=None) -> dict:
    """-> {"model", "threads", "past_len", "ms_per_token": {form: ms}, "speedup_vs_dynamic": {form: x},
           "max_abs_logits_diff": {form: vs dynamic}, "export_s", "lowering": {form: report counts},
           "moe_block": bench_moe_block(...) when `block`}. step_forms: the forms of the whole-step
           timing (default: `forms`, or only dynamic and ort-fused for a model past 1 GiB of fp32 weights:
           every session holds a full copy of the weights, and `medium` with three forms runs out of 24 GiB)."""
    import gc

    import models
    from passes.cleanup import cleanup
    from passes.ort_simplify import ORTSimplifyPass
    from pipeline.export import export_graphs

    model = models.load(model_name)
    cfg = model.config
    block_result = bench_moe_block(model, threads, forms=forms) if block else None
    t0 = time.perf_counter()
    graphs = graphs or export_graphs(model)  # graphs: pre-exported {"prefill", "decode"} of this model
    export_s = time.perf_counter() - t0
    decode = ir.from_proto(ir.to_proto(graphs["decode"]))
    attention = "naive"
    if fuse_attention:  # as the ort-cpu target does: absorbed MLA, so the MoE is what differs
        from passes.latent_kv_fusion import LatentKVFusionPass
        LatentKVFusionPass()(decode)
        attention = "latent-kv-fusion (matmul)"
    ORTSimplifyPass()(decode)
    cleanup(decode)
    if step_forms is None:  # each form's session holds a full copy of the weights (and ORT a second while loading)
        weight_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
        step_forms = forms if weight_bytes < 2**30 else tuple(f for f in forms if f in ("dynamic", "ort-fused"))
    protos, lowering = _lowered(decode, step_forms)

    # the cache after a past_len-token prompt (eager model: no second ORT session holding the weights)
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(0, cfg.vocab_size, (1, past_len)))
    with torch.no_grad():
        logits0, cache = model.step(ids, model.empty_cache(1))
    step = {"input_ids": np.array([[int(logits0[0, -1].argmax())]], dtype=np.int64)}
    step.update(model.cache_spec().flatten(cache))
    del model, graphs, decode, logits0, cache
    gc.collect()  # medium: keep only the serialized graphs and their sessions in memory

    sessions = {form: _session(proto, threads) for form, proto in protos.items()}
    logits = {form: sess.run(["logits"], step)[0] for form, sess in sessions.items()}
    ms = _time_blocks({f: (lambda s=s: s.run(["logits"], step)) for f, s in sessions.items()}, repeats, warmup)
    return {
        "model": model_name, "threads": threads, "past_len": past_len, "batch": 1, "repeats": repeats,
        "attention": attention, "other_passes": "ort-simplify",
        "experts": cfg.n_routed_experts, "k": cfg.num_experts_per_tok, "moe_layers": cfg.num_hidden_layers - cfg.first_k_dense_replace,
        "ms_per_token": {f: round(v, 3) for f, v in ms.items()},
        "speedup_vs_dynamic": {f: round(ms["dynamic"] / v, 2) for f, v in ms.items() if f != "dynamic"},
        "max_abs_logits_diff": {f: float(np.abs(logits[f] - logits["dynamic"]).max()) for f in ms if f != "dynamic"},
        "export_s": round(export_s, 1),
        "lowering": lowering,
        "moe_block": block_result,
    }


def format_bench_moe(r: dict) -> str:
    lines = [f"MoE decode on ORT CPU: {r['model']} ({r['experts']} experts, k={r['k']}, {r['moe_layers']} MoE layers), "
             f"batch 1, {r['threads']} threads",
             f"whole decode step (past {r['past_len']}, attention {r['attention']}, median of {r['repeats']}):"]
    for f, v in r["ms_per_token"].items():
        extra = "" if f == "dynamic" else (f"  {r['speedup_vs_dynamic'][f]:.2f}x faster, "
                                           f"max |dlogits| {r['max_abs_logits_diff'][f]:.1e}")
        lines.append(f"  {f:14s} {v:8.3f} ms/token{extra}")
    b = r.get("moe_block")
    if b:
        lines.append(f"MoE layers alone ({b['moe_layers']} chained, 1 token, median of {b['repeats']}); memory floor "
                     f"{b['floor_ms_per_token']:.3f} ms/token ({b['weight_bytes_read_per_token'] / 2**20:.1f} MiB "
                     f"at {b['read_bandwidth_gbs']:.1f} GB/s):")
        for f, v in b["ms_per_token"].items():
            extra = "" if f == "dynamic" else f"  {b['speedup_vs_dynamic'][f]:.2f}x faster"
            lines.append(f"  {f:14s} {v:8.3f} ms/token  {v / b['floor_ms_per_token']:5.2f}x floor{extra}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--step-forms", default=None,
                    help="forms of the whole-decode-step timing, comma-separated (default: all, or dynamic,ort-fused "
                         "past 1 GiB of weights)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = bench_moe_decode(a.model, a.threads, a.past_len, a.repeats, step_forms=tuple(a.step_forms.split(",")) if a.step_forms else None)
    print(json.dumps(r, indent=2) if a.json else format_bench_moe(r))


if __name__ == "__main__":
    main()
