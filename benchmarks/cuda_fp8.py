"""ort-cuda `--quant fp8` vs fp16 on one GPU: decode ms/token, GPU memory, agreement (not a pytest test;
run on the GPU machine: it exports the model there, as benchmarks.cuda does).

    PYTHONPATH=/tmp/site:$PWD python3 -m benchmarks.cuda_fp8 --model medium --out $OUT/h200_fp8.json

Builds the ort-cuda decode graph once in fp32 (export -> latent-kv-fusion -> moe-ort-fused with the subgraph
router, benchmarks.cuda.build_graphs), then two forms of it: fp16 (targets.ort_cuda.to_fp16) and
fp8 (targets.ort_cuda.quantize_fp8, then to_fp16: what `compile --target ort-cuda --quant fp8` packages).
Per form, one after the other in this process (the previous session destroyed first):
  memory   this process's GPU memory (nvidia-smi) after the session is created and has run the decode steps
           at every length, minus the figure before it (the CUDA context is created first by a one-node session
           kept alive, so neither form's figure includes it);
  decode   ms per decode step (batch 1, synthetic cache of each --lengths, bound on the device, logits copied
           to the host), median of --repeat: both sessions alive, timed in blocks alternated between the forms
           (benchmarks.time_blocks), because the device's speed drifts between runs;
  bytes    initializer bytes by dtype in the graph file.
Agreement: prefill logits of one random prompt (--prompt-len tokens, fresh cache) of four graphs on CUDA against
  the fp32 graph's: fp16, fp8 with fp32 activations (the quantize stage's graph: fp8 error alone), fp8 (what
  is packaged); cosine, max abs, top-1 agreement. On a random-weight model this says how far each form
  moves the outputs (routing near ties included), not accuracy, which is judged on trained-small (README).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks import command_line, elapsed_logger, time_blocks  # noqa: E402


def gpu_mib() -> float | None:
    """This process's GPU memory in MiB (nvidia-smi), 0 before it has a CUDA context; None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(mib)
    return 0.0


def cuda_context(device: str):
    """A one-node session run once on `device` (kept alive by the caller): creates the CUDA context."""
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper as h
    g = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "ctx", [h.make_tensor_value_info("x", TP.FLOAT, [1])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [1])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=10)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    s = ort.InferenceSession(m.SerializeToString(),
                             providers=providers)
    s.run(None, {"x": np.zeros(1, np.float32)})
    return s


def _agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    a, b = ref.reshape(-1, ref.shape[-1]).astype(np.float64), got.reshape(-1, got.shape[-1]).astype(np.float64)
    return {"cosine": float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))),
            "max_abs": float(np.abs(a - b).max()), "top1": float((a.argmax(-1) == b.argmax(-1)).mean())}


def bytes_by_dtype(path: Path) -> dict:
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    out: dict = {}
    for t in m.graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        n = int(np.prod(t.dims)) if t.dims else 1
        out[name] = out.get(name, 0) + n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="medium")
    ap.add_argument("--lengths", default="1024,8192")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--work", default="/tmp/ortcuda_fp8")
    ap.add_argument("--device", default="cuda", help="cpu: the same code path on ORT CPU (a smoke test)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    t0 = time.time()
    log = elapsed_logger()
    import onnx_ir as ir
    import onnxruntime as ort

    import models
    from benchmarks.cuda import build_graphs
    from runtime.cuda_runtime import CudaPackageRuntime
    from pipeline.export import save_graph
    from targets import ort_cuda
    res: dict = {"command": command_line("benchmarks.cuda_fp8", argv), "model": args.model,
                 "onnxruntime": ort.__version__, "errors": [], "forms": {}}
    out = Path(args.out)

    def save():
        res["wall_s"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(res, indent=2, sort_keys=True, default=str) + "\n")

    model = models.load(args.model, seed=0)
    cfg = model.config
    res["parameters"] = cfg.param_count()
    work = Path(args.work)
    (work / "fp16" / "onnx").mkdir(parents=True, exist_ok=True)
    res["build"] = build_graphs(model, work / "fp16" / "onnx", "subgraph", log)  # fp32 copies in work/fp16/fp32
    (work / "fp32").mkdir(exist_ok=True)
    if not (work / "fp32" / "onnx").exists():
        (work / "fp32" / "onnx").symlink_to(work / "fp16" / "fp32")
    t = time.perf_counter()
    for g in ("prefill", "decode"):
        m = ir.load(work / "fp16" / "fp32" / f"{g}.onnx")
        rep = ort_cuda.quantize_fp8(m, model)
        save_graph(m, work / "fp8-fp32act" / "onnx" / f"{g}.onnx")
        ort_cuda.to_fp16(m)
        save_graph(m, work / "fp8" / "onnx" / f"{g}.onnx")
        res["build"][f"fp8_{g}"] = {"linear_ratio": rep.linear_ratio, "summary": rep.summary(), "notes": rep.notes}
    res["build"]["fp8_s"] = round(time.perf_counter() - t, 1)
    del model
    gc.collect()
    log(f"fp8 graphs {res['build']['fp8_s']} s")
    save()
    lengths = [int(x) for x in args.lengths.split(",")]
    manifest = {"io": {"vocab_size": cfg.vocab_size,
                       "graphs": {g: {"file": f"onnx/{g}.onnx"} for g in ("prefill", "decode")}},
                "target": {"session": ort_cuda.session_config()}}
    ctx = cuda_context(args.device)  # noqa: F841 - keeps the CUDA context alive for the memory figures
    res["gpu_mib_cuda_context"] = gpu_mib()
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, args.prompt_len), dtype=np.int64)
    prefill = {}
    for form in ("fp32", "fp16", "fp8-fp32act", "fp8"):
        try:
            rt = CudaPackageRuntime(work / form, device=args.device, manifest=manifest)
            prefill[form] = np.asarray(rt.run("prefill", prompt, rt.empty_cache(1))[0], np.float32)
            del rt
            gc.collect()
        except Exception:  # noqa: BLE001 - a benchmark records what happened
            res["errors"].append({f"prefill {form}": traceback.format_exc()[-3000:]})
            log(res["errors"][-1])
    if "fp32" in prefill:
        res["prefill_vs_fp32_graph"] = {f: _agreement(prefill["fp32"], v) for f, v in prefill.items() if f != "fp32"}
        log(f"prefill logits vs the fp32 graph: {res['prefill_vs_fp32_graph']}")
    save()
    logits = {}
    ids = np.array([[7]], np.int64)
    for form in ("fp16", "fp8"):
        try:
            gc.collect()
            base = gpu_mib()
            t = time.perf_counter()
            rt = CudaPackageRuntime(work / form, device=args.device, manifest=manifest)
            r = {"session_s": round(time.perf_counter() - t, 1), "providers": rt.providers,
                 "bytes": bytes_by_dtype(work / form / "onnx" / "decode.onnx"), "gpu_mib_before": base, "decode": {}}
            for L in lengths:
                past = rt.synthetic_cache(1, L)
                lg, _ = rt.run("decode", ids, past)
                if L == lengths[0]:
                    logits[form] = np.asarray(lg, np.float32)
                for _ in range(5):
                    rt.run("decode", ids, past)
                del past
            r["gpu_mib_after_decode"] = gpu_mib()
            r["gpu_mib_delta"] = (None if base is None or r["gpu_mib_after_decode"] is None
                                  else r["gpu_mib_after_decode"] - base)
            log(f"{form}: GPU memory {base} -> {r['gpu_mib_after_decode']} MiB")
            res["forms"][form] = r
            del rt
        except Exception:  # noqa: BLE001 - a benchmark records what happened
            res["errors"].append({form: traceback.format_exc()[-3000:]})
            log(res["errors"][-1])
        save()
    # decode timing with both sessions alive, in blocks alternated between the forms (time_blocks): this
    # machine's decode time drifts between runs by more than the fp8/fp16 difference (docs/benchmarks.md), so
    # the forms are timed side by side in one run
    try:
        rts = {f: CudaPackageRuntime(work / f, device=args.device, manifest=manifest) for f in ("fp16", "fp8")}
        for L in lengths:
            caches = {f: rt.synthetic_cache(1, L) for f, rt in rts.items()}
            times = time_blocks({f: (lambda rt=rt, c=caches[f]: rt.run("decode", ids, c)) for f, rt in rts.items()},
                                repeats=args.repeat, warmup=5)
            for f, ts in times.items():
                res["forms"].setdefault(f, {}).setdefault("decode", {})[str(L)] = {
                    "median_ms": statistics.median(ts), "min_ms": min(ts), "repeat": len(ts),
                    "timing": "time_blocks: blocks of each form alternated over 4 rounds"}
            log(f"decode @ {L}: " + ", ".join(f"{f} {statistics.median(ts):.3f} ms" for f, ts in times.items()))
            del caches
        del rts
    except Exception:  # noqa: BLE001
        res["errors"].append({"decode timing": traceback.format_exc()[-3000:]})
        log(res["errors"][-1])
    save()
    if len(logits) == 2:
        a, b = logits["fp16"].ravel().astype(np.float64), logits["fp8"].ravel().astype(np.float64)
        res["fp8_vs_fp16_decode_logits"] = {"cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
                                            "max_abs": float(np.abs(a - b).max()),
                                            "top1_equal": bool(a.argmax() == b.argmax()), "cache_len": lengths[0]}
    if len(res["forms"]) == 2:
        f16, f8 = res["forms"]["fp16"], res["forms"]["fp8"]
        res["ratios_fp8_over_fp16"] = {
            "decode_ms": {L: f8["decode"][L]["median_ms"] / f16["decode"][L]["median_ms"] for L in f16["decode"]},
            "gpu_mib_delta": (f8["gpu_mib_delta"] / f16["gpu_mib_delta"]
                              if f8.get("gpu_mib_delta") and f16.get("gpu_mib_delta") else None),
            "gpu_mib_after_decode": (f8["gpu_mib_after_decode"] / f16["gpu_mib_after_decode"]
                                     if f8.get("gpu_mib_after_decode") and f16.get("gpu_mib_after_decode") else None),
            "weight_bytes": sum(f8["bytes"].values()) / sum(f16["bytes"].values())}
        log(f"fp8/fp16: {res['ratios_fp8_over_fp16']}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
