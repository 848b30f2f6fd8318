"""DeepSeek-V3.2 decode on ONNX Runtime CPU: sparse (top-k) attention against dense MLA, same weights (not a test).

    python -m benchmarks.v32_sparse [--model small-v32] [--lengths 8192,32768,131072] [--threads 2] [--out FILE]
    mlamoe bench --model small-v32 --suite v32-sparse [--cache-lengths ...]

Graphs timed (batch 1, fp32, one new token per call, a random cache of the given length):
  sparse  the V3.2 decode graph after LatentKVFusionPass: the indexer (plain ONNX ops over its T cached keys, TopK)
          then absorbed MLA over the index_topk GatherND'ed c_kv/k_pe rows (form "topk-gather")
  dense   the same model without the indexer (a DeepSeek-V3 config with the same dimensions, the V3.2 state dict
          minus the indexer's weights), exported and fused by the same pass: V3's absorbed decode over all T rows
Both graphs are otherwise the same model (MoE, norms, projections): the ratio is what the top-k selection buys.
Those two dynamic graphs return present = past + the new row (the IO contract of the dynamic graphs), so every step
copies the whole cache. With `static` (the default) two more forms are timed in the same blocks:
  sparse-static, dense-static  the family's fixed-shape decode (models/static_lm.py; V3.2: models/v32_static.py, the
          dense twin: models/mla_static.py) exported with its cache preallocated at the cache length, position at the
          last row, the row write made an in-place ScatterND (passes/static_cache_write.py) and present.* bound to
          past.*'s buffer through IOBinding: the step writes one row per cache tensor (checked: exactly one row
          changes), the decode a serving loop over a preallocated cache runs.
Medians (and mins) of `repeats` calls after warm-up, the forms in alternating blocks (benchmarks.time_blocks).
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

from benchmarks import time_blocks  # noqa: E402

FORMS = ("sparse", "dense")
STATIC_FORMS = ("sparse-static", "dense-static")


def dense_twin(model):
    """The V3.2 model's weights as a DeepSeek-V3 model (no indexer): dense MLA over every cached token."""
    import torch
    from models.checkpoint import empty_model
    from models.config import DeepseekConfig
    cfg = model.config
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DeepseekConfig) if f.init}
    fields["model_type"] = "deepseek_v3"
    v3 = empty_model(DeepseekConfig(**fields).validate("dense twin of " + cfg.model_type))
    state = {k: v for k, v in model.state_dict().items() if ".indexer." not in k}
    missing, unexpected = v3.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rope_inv_freq" not in k]:
        raise RuntimeError(f"dense twin: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        v3.rope_inv_freq.copy_(model.rope_inv_freq)
    return v3.eval()


def decode_graphs(model_name: str) -> tuple[dict[str, bytes], dict[str, list]]:
    """{form: serialized fused decode graph}, {form: the pass's report}."""
    import models
    from passes.latent_kv_fusion import LatentKVFusionPass
    from pipeline.export import export_graphs
    model = models.load(model_name, seed=0)
    blobs, reports = {}, {}
    for form, m in (("sparse", model), ("dense", dense_twin(model))):
        g = export_graphs(m, layout="latent")["decode"]
        p = LatentKVFusionPass()
        p(g)
        blobs[form], reports[form] = ir.to_proto(g).SerializeToString(), p.report
        del g
        gc.collect()
    return blobs, reports


def static_decode(model, length: int, threads: int):
    """(run(), rows changed by one call) for the fixed-shape decode of `model` with its cache preallocated at
    `length` rows (module docstring): random cache, the token at position length - 1, present bound to past."""
    from passes.static_cache_write import StaticCacheWritePass
    from pipeline.static_export import StaticGraphSpec, export_static_graph
    g = export_static_graph(model, StaticGraphSpec("decode", 1, 1, length, "gather"))
    write = StaticCacheWritePass()
    write(g)
    if write.rewritten == 0 or write.skipped:
        raise RuntimeError(f"static decode at {length}: cache write not rewritten in place ({write.skipped})")
    sess = _session(ir.to_proto(g).SerializeToString(), threads)
    del g
    rng = np.random.default_rng(0)
    io, bufs = sess.io_binding(), {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            a = rng.integers(0, model.config.vocab_size, (1, 1)).astype(np.int32)
        elif i.name == "position":
            a = np.array([length - 1], np.int32)
        else:
            a = rng.standard_normal(i.shape, dtype=np.float32)
        bufs[i.name] = a
        io.bind_cpu_input(i.name, a)
    for o in sess.get_outputs():
        if o.name.startswith("present."):
            a = bufs["past." + o.name[len("present."):]]
            io.bind_output(o.name, "cpu", 0, np.float32, list(a.shape), a.ctypes.data)
        else:
            io.bind_output(o.name, "cpu")
    before = {k: v.copy() for k, v in bufs.items() if k.startswith("past.")}
    sess.run_with_iobinding(io)
    changed = max(int((bufs[k] != v).any(axis=-1).sum()) for k, v in before.items())
    del before

    def run():
        sess.run_with_iobinding(io)
    run.keep = (sess, io, bufs)  # the buffers the binding points at live as long as the callable
    return run, changed


def _session(blob: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


def _feeds(sess: ort.InferenceSession, past: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, vocab, (1, 1)).astype(np.int64)
        else:  # [batch, past, width]
            feeds[i.name] = rng.standard_normal((1, past, i.shape[2]), dtype=np.float32)
    return feeds


def _append_nodes(blob: bytes) -> set[str]:
    """Names of the Concat nodes writing a present.* output (the cache append: past rows copied + the new row)."""
    import onnx
    return {n.name for n in onnx.load_from_string(blob).graph.node
            if n.op_type == "Concat" and any(o.startswith("present.") for o in n.output)}


def append_share_ms(blob: bytes, feeds: dict, threads: int, runs: int = 3) -> tuple[float, float]:
    """(ms per call in the cache-append Concats, ms per call in all kernels), from ORT's profiler (a separate
    profiled session, `runs` calls after one warm-up; kernel times only, so a little below the wall time)."""
    import json
    import os
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = "/tmp/mlamoe-v32-sparse-profile"
    sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, feeds)
    path = sess.end_profiling()
    events = json.loads(Path(path).read_text())
    os.unlink(path)
    names = _append_nodes(blob)
    seen: set[str] = set()
    total = append = 0.0
    for e in events:  # each node's first kernel event is the warm-up call's: dropped
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        if node not in seen:
            seen.add(node)
            continue
        total += e["dur"] / 1e3 / runs
        append += e["dur"] / 1e3 / runs if node in names else 0.0
    return append, total


def bench_v32_sparse(model_name: str = "small-v32", cache_lengths=(8192, 32768, 131072), threads: int = 2,
                     warmup: int = 2, repeats: int = 8, profile: bool = True, static: bool = True) -> dict:
    """Decode ms/token per form and cache length, and dense/sparse per length (medians). profile: also the ms per
    call spent in the cache-append Concats (present = past + the new row: a copy of the whole cache each step,
    the graph IO contract of every family) against all kernels, from ORT's profiler (which inflates the many small
    kernels' times: "all_kernels" exceeds the wall time; the append Concats are a few large copies, so their
    profiled time is taken as is and subtracted from the wall medians for dense_over_sparse_without_cache_append)."""
    import models
    cfg = models.load_config(model_name)
    t0 = time.perf_counter()
    blobs, reports = decode_graphs(model_name)
    export_s = time.perf_counter() - t0
    sessions = {form: _session(blobs[form], threads) for form in FORMS}
    forms = FORMS + (STATIC_FORMS if static else ())
    med: dict[str, dict[int, float]] = {f: {} for f in forms}
    append: dict[str, dict[int, float]] = {f: {} for f in FORMS}
    kernels: dict[str, dict[int, float]] = {f: {} for f in FORMS}
    low: dict[str, dict[int, float]] = {f: {} for f in forms}
    rows_written: dict[str, dict[int, int]] = {f: {} for f in STATIC_FORMS}
    static_export_s = 0.0
    if static:
        import models
        sparse_model = models.load(model_name, seed=0)
        twins = {"sparse-static": sparse_model, "dense-static": dense_twin(sparse_model)}
    for n in cache_lengths:
        feeds = {f: _feeds(s, int(n), cfg.vocab_size) for f, s in sessions.items()}
        run = {f: (lambda s=s, f=f: s.run(None, feeds[f])) for f, s in sessions.items()}
        if static:
            t0 = time.perf_counter()
            for f, m in twins.items():
                run[f], rows_written[f][int(n)] = static_decode(m, int(n), threads)
            static_export_s += time.perf_counter() - t0
        times = time_blocks(run, repeats, warmup, 2)
        for f, ts in times.items():
            med[f][int(n)], low[f][int(n)] = statistics.median(ts), min(ts)
        del run
        gc.collect()
        if profile:
            for f in FORMS:
                append[f][int(n)], kernels[f][int(n)] = append_share_ms(blobs[f], feeds[f], threads)
        del feeds
        gc.collect()
    extra = {}
    if static:
        extra = {
            "static_dense_over_sparse": {n: med["dense-static"][n] / med["sparse-static"][n] for n in med["sparse"]},
            "best_dense_over_best_sparse": {
                n: min(med["dense"][n], med["dense-static"][n]) / min(med["sparse"][n], med["sparse-static"][n])
                for n in med["sparse"]},
            "static_rows_written_per_step": rows_written, "static_export_s": static_export_s}
    return {**extra,
        "model": model_name, "threads": threads, "cache_lengths": [int(n) for n in cache_lengths],
        "index_topk": cfg.index_topk, "decode_ms": med, "decode_min_ms": low,
        "dense_over_sparse": {n: med["dense"][n] / med["sparse"][n] for n in med["sparse"]},
        "profile_ms": {"cache_append_concat": append, "all_kernels": kernels},
        "dense_over_sparse_without_cache_append": {
            n: (med["dense"][n] - append["dense"][n]) / (med["sparse"][n] - append["sparse"][n])
            for n in append["sparse"]},
        "pass_forms": {f: sorted({e.get("form") for e in r}) for f, r in reports.items()},
        "cache_values_per_token_per_layer": {"sparse": cfg.latent_cache_width + cfg.index_head_dim,
                                             "dense": cfg.latent_cache_width},
        "export_and_fuse_s": export_s, "ort_version": ort.__version__,
    }


def format_table(r: dict) -> str:
    lengths = r["cache_lengths"]
    lines = [f"decode, {r['model']} (index_topk {r['index_topk']}), ORT {r['ort_version']} CPU, {r['threads']} threads, "
             "batch 1, ms/token (median, min)",
             "| form | " + " | ".join(f"past {n // 1024}K" for n in lengths) + " |", "|" + "---|" * (len(lengths) + 1)]
    label = {"sparse": "sparse: indexer + absorbed MLA over top-k gathered rows",
             "dense": "dense: absorbed MLA over all T rows (V3 twin)",
             "sparse-static": "sparse, fixed-shape, cache written in place",
             "dense-static": "dense, fixed-shape, cache written in place"}
    for f in [f for f in FORMS + STATIC_FORMS if f in r["decode_ms"]]:
        lines.append(f"| {label[f]} | " + " | ".join(f"{r['decode_ms'][f][n]:.1f} ({r['decode_min_ms'][f][n]:.1f})"
                                                     for n in lengths) + " |")
    lines.append("| dense / sparse | " + " | ".join(f"{r['dense_over_sparse'][n]:.2f}x" for n in lengths) + " |")
    if "static_dense_over_sparse" in r:
        lines.append("| dense / sparse, fixed-shape in place | " + " | ".join(
            f"{r['static_dense_over_sparse'][n]:.2f}x" for n in lengths) + " |")
        lines.append("| fastest dense / fastest sparse | " + " | ".join(
            f"{r['best_dense_over_best_sparse'][n]:.2f}x" for n in lengths) + " |")
    prof = r.get("profile_ms", {}).get("cache_append_concat", {})
    if prof.get("sparse"):
        for f in FORMS:
            lines.append(f"| {f}: of which cache-append Concat (profiler) | " + " | ".join(
                f"{prof[f][n]:.1f}" for n in lengths) + " |")
        lines.append("| dense / sparse, wall minus the cache append | " + " | ".join(
            f"{r['dense_over_sparse_without_cache_append'][n]:.2f}x" for n in lengths) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import json
    from benchmarks import command_line
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-v32")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args()
    res = bench_v32_sparse(args.model, tuple(int(x) for x in args.lengths.split(",")), args.threads,
                           repeats=args.repeats)
    print(format_table(res))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command_line("benchmarks.v32_sparse"), "v32_sparse": res,
                                              "machine": "this 2-core / 24 GiB CPU machine (shared)"},
                                             indent=1, sort_keys=True) + "\n")
