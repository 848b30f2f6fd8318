"""Decode latency of an ort-cpu package's graph: fp32 vs `--quant int8` (and int4), on ONNX Runtime CPU (not a pytest test).

    python -m benchmarks.quant [--model medium] [--threads 2] [--past 256] [--repeats 20] [--raw] [--int4]

What is timed is what an ort-cpu package ships: the exported decode graph after the target's passes
(latent-kv-fusion, moe-ort-fused: routed experts in com.microsoft.MoE, V3 router in MoEGroupRouter),
quantized as `compile --quant int8` does, optimised offline by ORT at the target's level
(targets/ort_cpu.optimize_offline) and run with the package's session settings
(targets/ort_cpu.session_config, `threads` intra-op threads). Variants:
  fp32       no quantization
  int8       MatMulNBits bits=8 (blocks of 128) + QMoE int8 per output channel: weight-only numerics
             (fp32 activations); the default of `--quant int8`
  int8_acc4  `--int8-accuracy-level 4`: MatMulNBits accuracy_level=4 + QMoE int8 per block of 128:
             activations quantized to int8 per token per block inside the kernels (not weight-only)
`--int4` (bench_quant_decode(..., INT4_VARIANTS)) adds passes/quant_int4.py (MatMulNBits bits=4, RTN with
zero points, QMoE 4-bit experts per block):
  int4_b32       block 32, accuracy_level 0: fp32 activations (weight-only numerics)
  int4_b32_acc4  block 32, accuracy_level 4: int8 activations per block inside the kernels (ORT GenAI's CPU form)
  int4_b128_acc4 block 128, accuracy_level 4
  int4_b32_acc4_attn8  as int4_b32_acc4 with the attention linears int8 (attention_bits=8)
and, per variant, the decode logits against fp32's on the same feeds (cosine, KL of the next-token
distribution, top-1 agreement: one token, so 0 or 1).
lm_head, router gate, embeddings and norms stay fp32 in every variant. Batch 1, one new token after
`past` cached tokens (random cache values: they do not change the cost). Figures are medians of
`repeats` timed runs in ms per token, in blocks per variant, alternating order (see _time_blocks). `raw=True` also times the raw exported decode graph (naive attention, the
exported per-expert loop) fp32 vs int8, the previous, not-shipped comparison.
`mlamoe bench --suite quant` calls bench_int8_decode().
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

# name -> (scheme, quantize options), None for fp32
VARIANTS = {"fp32": None, "int8": ("int8", {}), "int8_acc4": ("int8", {"accuracy_level": 4})}
INT4_VARIANTS = {**VARIANTS, "int4_b32": ("int4", {"block_size": 32}),
                 "int4_b32_acc4": ("int4", {"block_size": 32, "accuracy_level": 4}),
                 "int4_b128_acc4": ("int4", {"block_size": 128, "accuracy_level": 4}),
                 "int4_b32_acc4_attn8": ("int4", {"block_size": 32, "accuracy_level": 4, "attention_bits": 8})}


def _ort_cpu_decode(model) -> ir.Model:
    """The decode graph as the ort-cpu target builds it: export, then the target's passes that run on decode."""
    from passes import PASSES, graphs_for
    from passes.cleanup import cleanup
    from pipeline.export import export_graphs
    from targets.ort_cpu import PROFILE
    decode = export_graphs(model)["decode"]
    for name in PROFILE.passes:
        if "decode" in graphs_for(name):
            PASSES[name]()(decode)
            cleanup(decode)
    return decode


def _build(decode: ir.Model, variants: dict, folder: Path, offline: bool = True) -> dict[str, dict]:
    """Save `decode` once, then per variant: load it (weights memory-mapped from the saved file), quantize,
    save, ORT-optimise offline -> {name: {"path", "weights_mb", "ops"}}. Peak memory stays near one graph."""
    from passes.quant_weights import initializer_bytes
    from passes.quantize import quantize
    from pipeline.export import save_graph
    from targets.ort_cpu import optimize_offline
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "decode.fp32.onnx"
    save_graph(decode, base)
    out = {}
    for name, variant in variants.items():
        m = ir.load(base)
        if variant is not None:
            scheme, options = variant
            quantize(m, scheme, **options)
        ops: dict[str, int] = {}
        for n in m.graph:
            if n.domain == "com.microsoft":
                ops[n.op_type] = ops.get(n.op_type, 0) + 1
        info = {"weights_mb": round(initializer_bytes(m.graph) / 2**20, 2), "ops": ops}
        if variant is None:
            src = base
        else:
            src = folder / f"{name}.src.onnx"
            save_graph(m, src)
        del m
        gc.collect()
        if offline:
            dst = folder / f"{name}.onnx"
            optimize_offline(src, dst)
            info["path"] = dst
        else:
            info["path"] = src
        out[name] = info
    return out


def _feeds(sess: ort.InferenceSession, past: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, vocab, (1, 1)).astype(np.int64)
        elif i.shape[1] == "past" or not isinstance(i.shape[1], int):  # latent cache [batch, past, width]
            feeds[i.name] = rng.standard_normal([1, past, i.shape[2]], dtype=np.float32)
        else:  # expanded cache [batch, heads, past, width]
            feeds[i.name] = rng.standard_normal([1, i.shape[1], past, i.shape[3]], dtype=np.float32)
    return feeds


def _time_blocks(built: dict, threads: int, past: int, vocab: int, warmup: int, repeats: int,
                 rounds: int = 2) -> dict[str, float]:
    """Median ms per run of each variant, timed in blocks: every round runs each variant `warmup` untimed
    then repeats/rounds timed runs, the order reversed every round (A B C, C B A, ...), so slow drift of
    the machine's load hits the variants alike. Not run by run: each session has its own intra-op thread
    pool, whose threads keep spinning for a while after a run and steal the cores from the next session
    (on 2 cores every variant slows when alternated run by run; figures: docs/benchmarks.md)."""
    from runtime.ort_runtime import session_options
    from targets.ort_cpu import session_config
    so = session_options(session_config(threads))
    sessions = {n: ort.InferenceSession(str(b["path"]), so, providers=["CPUExecutionProvider"]) for n, b in built.items()}
    feeds = {n: _feeds(s, past, vocab) for n, s in sessions.items()}
    times: dict[str, list] = {n: [] for n in sessions}
    order = list(sessions)
    for r in range(rounds):
        for n in (order if r % 2 == 0 else order[::-1]):
            s = sessions[n]
            for _ in range(warmup):
                s.run(["logits"], feeds[n])
            for _ in range(max(1, repeats // rounds)):
                t = time.perf_counter()
                s.run(["logits"], feeds[n])
                times[n].append((time.perf_counter() - t) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def _logits_vs_fp32(built: dict, threads: int, past: int, vocab: int) -> dict[str, dict]:
    """Each variant's decode logits against fp32's on the same feeds: cosine, KL(fp32 || variant), top-1."""
    from runtime.ort_runtime import session_options
    from targets.ort_cpu import session_config
    so = session_options(session_config(threads))
    out, ref = {}, None
    for n, b in built.items():
        s = ort.InferenceSession(str(b["path"]), so, providers=["CPUExecutionProvider"])
        y = s.run(["logits"], _feeds(s, past, vocab))[0].reshape(-1).astype(np.float64)
        del s
        if ref is None:
            ref = y
            continue
        lr, lq = ref - ref.max(), y - y.max()
        lr, lq = lr - np.log(np.exp(lr).sum()), lq - np.log(np.exp(lq).sum())
        out[n] = {"cosine": round(float(ref @ y / (np.linalg.norm(ref) * np.linalg.norm(y))), 6),
                  "kl": round(float((np.exp(lr) * (lr - lq)).sum()), 6), "top1": int(ref.argmax() == y.argmax())}
    return out


def bench_int8_decode(model_name: str = "medium", threads: int = 2, past: int = 256, warmup: int = 3,
                      repeats: int = 20, raw: bool = False) -> dict:
    """The int8 comparison (VARIANTS); see bench_quant_decode."""
    return bench_quant_decode(model_name, threads, past, warmup, repeats, raw)


def bench_quant_decode(model_name: str = "medium", threads: int = 2, past: int = 256, warmup: int = 3,
                       repeats: int = 20, raw: bool = False, variants: dict | None = None, rounds: int = 2) -> dict:
    """-> {"model", "threads", "past", "graph", "ms_per_token": {variant: ms}, "speedup_vs_fp32": {variant: x},
    "weights_mb": {variant: MB}, "contrib_ops": {variant: {op: count}}, ["raw_graph": the same for the raw
    exported decode graph]} (ms per decoded token, medians). Also the flat keys fp32_ms, int8_ms,
    int8_acc4_ms, speedup, speedup_acc4 of the earlier version of this benchmark."""
    import models
    from pipeline.export import export_graph, specialize_decode
    model = models.load(model_name, seed=0)
    vocab = model.config.vocab_size
    res = {"model": model_name, "threads": threads, "past": past, "batch": 1, "repeats": repeats,
           "graph": "ort-cpu package decode graph (latent-kv-fusion + moe-ort-fused, ORT offline 'extended', "
                    "session settings of targets/ort_cpu.session_config)"}
    with tempfile.TemporaryDirectory(prefix="mlamoe-bench-quant-") as tmp:
        decode = _ort_cpu_decode(model)
        raw_decode = specialize_decode(export_graph(model, "prefill")) if raw else None
        del model
        variants = VARIANTS if variants is None else variants
        built = _build(decode, variants, Path(tmp))
        del decode
        gc.collect()
        load = os.getloadavg()
        ms = _time_blocks(built, threads, past, vocab, warmup, repeats, rounds)
        res.update(_summary(ms, built), rounds=rounds, load_avg_1m_before_after=[round(load[0], 2),
                                                                             round(os.getloadavg()[0], 2)])
        if any(v is not None and v[0] == "int4" for v in variants.values()):
            res["variants"] = {n: (None if v is None else {"scheme": v[0], **v[1]}) for n, v in variants.items()}
            res["logits_vs_fp32"] = _logits_vs_fp32(built, threads, past, vocab)
        if raw:
            rb = _build(raw_decode, VARIANTS, Path(tmp) / "raw",
                        offline=False)
            del raw_decode
            gc.collect()
            res["raw_graph"] = {"graph": "raw exported decode graph (naive attention, per-expert loop), no passes",
                                **_summary(_time_blocks(rb, threads, past, vocab, warmup, repeats), rb)}
    ms, sp = res["ms_per_token"], res["speedup_vs_fp32"]
    res.update(fp32_ms=ms["fp32"], int8_ms=ms.get("int8"), int8_acc4_ms=ms.get("int8_acc4"),
               speedup=sp.get("int8"), speedup_acc4=sp.get("int8_acc4"))
    return res


def _summary(ms: dict, built: dict) -> dict:
    return {"ms_per_token": {n: round(v, 3) for n, v in ms.items()},
            "speedup_vs_fp32": {n: round(ms["fp32"] / v, 3) for n, v in ms.items() if n != "fp32"},
            "weights_mb": {n: b["weights_mb"] for n, b in built.items()},
            "contrib_ops": {n: b["ops"] for n, b in built.items()}}


def format_bench_quant(r: dict) -> str:
    lines = [f"{'INT8/INT4' if 'logits_vs_fp32' in r else 'INT8'} decode on ORT CPU: {r['model']}, batch 1, past {r['past']}, {r['threads']} threads, "
             f"median of {r['repeats']}", f"  {r['graph']}"]
    for part in [r] + ([r["raw_graph"]] if "raw_graph" in r else []):
        if part is not r:
            lines.append(f"  {part['graph']}")
        for n, v in part["ms_per_token"].items():
            x = "" if n == "fp32" else f"  {part['speedup_vs_fp32'][n]:.2f}x vs fp32"
            c = part.get("logits_vs_fp32", {}).get(n)
            c = f"  logits cosine {c['cosine']:.5f} KL {c['kl']:.5f}" if c else ""
            lines.append(f"    {n:14s} {v:9.3f} ms/token  weights {part['weights_mb'][n]:9.2f} MB{x}{c}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="medium")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--raw", action="store_true", help="also time the raw exported decode graph")
    ap.add_argument("--int4", action="store_true", help="also the int4 variants (INT4_VARIANTS)")
    ap.add_argument("--variants", nargs="+", help="only these variants (fp32 always): names of INT4_VARIANTS")
    ap.add_argument("--rounds", type=int, default=2, help="timing blocks per variant, order reversed each round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    variants = INT4_VARIANTS if args.int4 else None
    if args.variants:
        unknown = set(args.variants) - set(INT4_VARIANTS)
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(INT4_VARIANTS)}")
        variants = {n: v for n, v in INT4_VARIANTS.items() if n == "fp32" or n in args.variants}
    r = bench_quant_decode(args.model, args.threads, args.past, repeats=args.repeats, raw=args.raw,
                           variants=variants, rounds=args.rounds)
    print(json.dumps(r, indent=2, sort_keys=True, default=str) if args.json else format_bench_quant(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
