"""Decode/prefill latency of the MLA attention forms on ONNX Runtime CPU (not a pytest test).

    python -m benchmarks.latent_kv [--model small] [--lengths 1024,8192,32768] [--threads 2]

Forms timed (all graphs exported from the same eager model, batch 1, fp32):
  (a) expanded  per-head K/V cache export (`export_graphs(model, layout="expanded")`)
  (b) latent    latent cache (models/mla.py cache_spec), naive graph: kv_b_proj re-expands the whole cache per step
  (c) fused     latent cache after LatentKVFusionPass: form "matmul" (the default) and "attention"
                (ONNX opset-23 Attention, one KV head)
Prefill: a fresh `prompt_len`-token prompt (past = 0) through the naive latent graph and the fused ones.
Every figure is the median (and the min) of `repeats` timed runs after `warmup` runs, in ms per call
(decode: one token per call); each form runs in a block of calls, blocks in alternating order
(benchmarks.time_blocks). `mlamoe bench` calls bench_decode_forms().
"""
from __future__ import annotations

import functools
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

from benchmarks import time_blocks  # noqa: E402

DECODE_FORMS = ("expanded", "latent", "fused_matmul", "fused_attention")


@functools.lru_cache(maxsize=4)
def _graphs(model_name: str) -> dict[str, bytes]:
    """Serialized graphs per form: {"<form>.decode": bytes, "<form>.prefill": bytes}."""
    import models
    from passes.latent_kv_fusion import LatentKVFusionPass
    from pipeline.export import export_graphs

    model = models.load(model_name, seed=0)
    out: dict[str, bytes] = {}
    latent = export_graphs(model, layout="latent")
    for graph in ("decode", "prefill"):
        out[f"latent.{graph}"] = ir.to_proto(latent[graph]).SerializeToString()
        for form in ("matmul", "attention"):
            g = ir.from_proto(ir.to_proto(latent[graph]))
            LatentKVFusionPass(form)(g)
            out[f"fused_{form}.{graph}"] = ir.to_proto(g).SerializeToString()
    del latent
    expanded = export_graphs(model, layout="expanded")
    out["expanded.decode"] = ir.to_proto(expanded["decode"]).SerializeToString()
    out["expanded.prefill"] = ir.to_proto(expanded["prefill"]).SerializeToString()
    return out


def _session(blob: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


def _feeds(sess: ort.InferenceSession, seq: int, past: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, vocab, (1, seq)).astype(np.int64)
        else:  # [batch, past, width] (latent) or [batch, H, past, width] (expanded)
            shape = [1] + [past if not isinstance(d, int) else d for d in i.shape[1:]]
            feeds[i.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def _interleaved(sessions: dict, feeds: dict, warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """{form: (median ms, min ms)}, timed by benchmarks.time_blocks (blocks in alternating order)."""
    rounds = 2 if repeats < 8 else 4
    times = time_blocks({f: (lambda s=s, f=f: s.run(None, feeds[f])) for f, s in sessions.items()},
                        repeats, warmup, rounds)
    return {form: (statistics.median(ts), min(ts)) for form, ts in times.items()}


def bench_decode_forms(model_name: str = "small", cache_lengths=(1024, 8192, 32768), threads: int = 2,
                       prompt_len: int = 512, warmup: int = 2, repeats: int = 7,
                       forms=DECODE_FORMS) -> dict:
    """Decode ms/token per form and cache length, prefill ms per form, cache bytes per token per layer.

    Returns {"model", "threads", "cache_lengths", "decode_ms": {form: {length: median ms}},
    "decode_min_ms": {form: {length: min ms}}, "speedup_fused_vs_latent": {length: x} (medians),
    "prefill_ms": {form: median ms}, "prefill_min_ms", "prompt_len",
    "cache_bytes_per_token_per_layer": {"latent": n, "expanded": n} (fp32), "ort_version"}.
    """
    import models
    cfg = models.load_config(model_name)
    blobs = _graphs(model_name)
    sessions = {form: _session(blobs[f"{form}.decode"], threads) for form in forms}
    decode: dict[str, dict[int, float]] = {form: {} for form in forms}
    decode_min: dict[str, dict[int, float]] = {form: {} for form in forms}
    for length in cache_lengths:
        feeds = {form: _feeds(sess, 1, int(length), cfg.vocab_size) for form, sess in sessions.items()}
        for form, (med, low) in _interleaved(sessions, feeds, warmup, repeats).items():
            decode[form][int(length)], decode_min[form][int(length)] = med, low
        del feeds
    del sessions
    pre_forms = [f for f in ("latent", "fused_matmul", "fused_attention") if f in forms or f == "latent"]
    sessions = {form: _session(blobs[f"{form}.prefill"], threads) for form in pre_forms}
    feeds = {form: _feeds(sess, prompt_len, 0, cfg.vocab_size) for form, sess in sessions.items()}
    pre = _interleaved(sessions, feeds, 1, max(3, repeats // 2))
    del sessions, feeds
    speed = {}
    if "latent" in decode and "fused_matmul" in decode:
        speed = {n: decode["latent"][n] / decode["fused_matmul"][n] for n in decode["latent"]}
    return {
        "model": model_name, "threads": threads, "cache_lengths": [int(n) for n in cache_lengths],
        "decode_ms": decode, "decode_min_ms": decode_min, "speedup_fused_vs_latent": speed,
        "prefill_ms": {k: v[0] for k, v in pre.items()}, "prefill_min_ms": {k: v[1] for k, v in pre.items()},
        "prompt_len": prompt_len,
        "cache_bytes_per_token_per_layer": {"latent": cfg.latent_cache_width * 4,
                                            "expanded": cfg.expanded_cache_width * 4},
        "ort_version": ort.__version__,
    }


def format_table(result: dict) -> str:
    lengths = result["cache_lengths"]
    head = "| form | " + " | ".join(f"past {n // 1024}K ms/token" for n in lengths) + " |"
    lines = [f"decode, {result['model']}, ORT {result['ort_version']} CPU, {result['threads']} threads, batch 1",
             head, "|" + "---|" * (len(lengths) + 1)]
    label = {"expanded": "(a) expanded per-head cache", "latent": "(b) latent, unfused",
             "fused_matmul": "(c) latent, fused (matmul)", "fused_attention": "(c') latent, fused (Attention op)"}
    for form, row in result["decode_ms"].items():
        low = result["decode_min_ms"][form]
        lines.append(f"| {label.get(form, form)} | "
                     + " | ".join(f"{row[n]:.1f} (min {low[n]:.1f})" for n in lengths) + " |")
    if result["speedup_fused_vs_latent"]:
        lines.append("| speedup (b)/(c) | " + " | ".join(f"{result['speedup_fused_vs_latent'][n]:.1f}x"
                                                       for n in lengths) + " |")
    lines.append("")
    lines.append(f"prefill of a {result['prompt_len']}-token prompt (past 0): "
                 + ", ".join(f"{k} {v:.1f} ms (min {result['prefill_min_ms'][k]:.1f})"
                             for k, v in result["prefill_ms"].items()))
    c = result["cache_bytes_per_token_per_layer"]
    lines.append(f"cache bytes per token per layer (fp32): latent {c['latent']}, expanded {c['expanded']}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--lengths", default="1024,8192,32768")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    args = ap.parse_args()
    res = bench_decode_forms(args.model, tuple(int(x) for x in args.lengths.split(",")), args.threads,
                             prompt_len=args.prompt_len)
    print(format_table(res))
