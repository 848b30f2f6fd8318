"""Decode latency of INT8 weight-only (MatMulNBits bits=8) vs fp32 on ONNX Runtime CPU (not a pytest test).

    python -m pipeline.benchmarks.quant [--model medium] [--threads 2] [--past 256]

Both graphs are the same exported decode graph (latent cache, batch 1, one new token per call after
`past` cached tokens); the int8 one went through passes.quant_int8.Int8WeightOnlyPass (block 128,
lm_head and router kept fp32). Figures are medians of `repeats` timed runs after `warmup` runs,
in ms per token. "int8_acc4" also sets MatMulNBits accuracy_level=4 (activations quantized to
int8 inside the kernel: faster where ORT has int8 GEMM kernels, no longer weight-only numerics).
`mlamoe bench` calls bench_int8_decode().
"""
from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=2)
def _graphs(model_name: str) -> dict[str, bytes]:
    import models
    from passes.quant_int8 import Int8WeightOnlyPass
    from pipeline.export import export_graph, specialize_decode

    decode = specialize_decode(export_graph(models.load(model_name, seed=0), "prefill"))
    out = {"fp32": ir.to_proto(decode).SerializeToString()}
    for name, level in (("int8", None), ("int8_acc4", 4)):
        g = ir.from_proto(ir.to_proto(decode))
        Int8WeightOnlyPass(accuracy_level=level)(g)
        out[name] = ir.to_proto(g).SerializeToString()
    return out


def _session(blob: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


def _feeds(sess: ort.InferenceSession, past: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, vocab, (1, 1)).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal([1, past, i.shape[2]], dtype=np.float32)
    return feeds


def _time(sess, feeds, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_int8_decode(model_name: str = "medium", threads: int = 2, past: int = 256, warmup: int = 3,
                      repeats: int = 20) -> dict:
    """-> {"model", "threads", "past", "fp32_ms", "int8_ms", "int8_acc4_ms", "speedup", "speedup_acc4",
    "weights_mb": {...}} (ms per decoded token, medians)."""
    import models
    vocab = models.load_config(model_name).vocab_size
    graphs = _graphs(model_name)
    res = {"model": model_name, "threads": threads, "past": past, "weights_mb": {}}
    for name, blob in graphs.items():
        sess = _session(blob, threads)
        res[f"{name}_ms"] = _time(sess, _feeds(sess, past, vocab), warmup, repeats)
        res["weights_mb"][name] = round(len(blob) / 2**20, 2)
        del sess
    res["speedup"] = res["fp32_ms"] / res["int8_ms"]
    res["speedup_acc4"] = res["fp32_ms"] / res["int8_acc4_ms"]
    return res


def main(argv=None) -> int:
    import argparse
    import json
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="medium")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    print(json.dumps(bench_int8_decode(args.model, args.threads, args.past, repeats=args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
