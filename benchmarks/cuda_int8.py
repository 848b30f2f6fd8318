"""ort-cuda packages (fp16, int8, int4 and fp8) on one GPU: accuracy against eager fp32 and decode ms/token
(not a pytest test; run on the GPU machine with onnxruntime-gpu, no torch needed).

    PYTHONPATH=/tmp/site:$PWD python3 -m benchmarks.cuda_int8 \
        --packages dist/tiny-ort-cuda.tar.gz dist/tiny-ort-cuda-int8.tar.gz --out $OUT/h200_ort_cuda_int8.json

Per package (CPU-built, benchmarks/gpu/README.md):
  verify    runtime verify_golden on CUDA (golden/ within the recorded per-output tolerances, greedy tokens);
  vs_fp32   each golden case on CUDA against eager fp32 (an fp16 package's golden/, an int8 package's
            golden/fp32/): max abs, cosine, rel euclid, KL, top-1; a quantized package judged under the
            limits its compiler recorded (quantize-<scheme> + fp16);
  greedy    tokens generated on CUDA (IOBinding) against eager fp32's greedy tokens: equal prefix;
  placement which EP ran each MatMulNBits / MoE / QMoE / MatMul / DequantizeLinear node and the nodes of the
            fp8 CUDA form (passes/quant_fp8_cuda.py; one profiled prefill + decode step);
  decode    ms per decode step (batch 1, synthetic cache of each --lengths, cache bound on the device,
            logits copied to the host), median of --repeat after warm-up;
  bytes     onnx/ file sizes (weights).
--probe-qmoe: whether this onnxruntime's CUDA QMoE runs int8 experts with fp16 activations in the raw
[E, N, K] layout (passes/quant_qmoe.py's, the CPU kernel's): one QMoE node against MoE fp16 with the
dequantized weights, both on CUDA.
--probe-int4: the same for int4's forms (targets/ort_cuda/graphs.py quantize_int4): QMoE expert_weight_bits 4 per
block of 32 with uint8 zero points and fp16 scales (weights_prepacked=0) against MoE fp16, and MatMulNBits bits 4
block 32 with zero points (fp16 A and scales) against an fp16 MatMul of the dequantized weight; each records where
ORT placed the node (a CPU fallback would be silent).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks import command_line, elapsed_logger  # noqa: E402


def _stats(ref, got, logits: bool, budget=None) -> dict:
    from pipeline.parity import Budget, compare
    b = budget or Budget(atol=math.inf, rtol=math.inf)
    rep = compare("bench", {"x": ref}, {"x": got}, logits_outputs=["x"] if logits else [], budget=b)
    o = rep.outputs[0]
    d = {"max_abs": o.max_abs, "cosine": o.cosine, "rel_euclid": o.rel_euclid}
    if logits:
        d.update(kl=o.kl, top1=o.top1_agreement)
    if budget is not None:
        d.update(passed=o.passed, reasons=o.reasons)
    return d


def _placement(rt) -> dict:
    _, past = rt.run("prefill", np.array([[1, 2, 3]]), rt.empty_cache(1))
    rt.run("decode", np.array([[4]]), past)
    placed: dict = {}
    for g, sess in rt.sessions.items():
        path = sess.end_profiling()
        events = json.loads(Path(path).read_text())
        os.remove(path)
        for e in events:
            a = e.get("args", {})
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            op = "fp8 CUDA form" if "/fp8_cuda_" in e["name"] else a.get("op_name")
            if op in ("MatMulNBits", "MoE", "QMoE", "MatMul", "FusedMatMul", "DequantizeLinear", "fp8 CUDA form"):
                key = f"{g}/{op}"
                placed.setdefault(key, {}).setdefault(a.get("provider"), 0)
                placed[key][a.get("provider")] += 1
    return placed


def bench_package(src: str, lengths: list[int], repeat: int, log) -> dict:
    from runtime.cuda_runtime import CudaPackageRuntime, verify_golden
    from pipeline.package import open_package
    from pipeline.parity import Budget
    root, manifest, cleanup = open_package(src)
    res: dict = {"package": src, "quantization": manifest["target"].get("quantization"),
                 "model": manifest["model"]["source"], "parameters": manifest["model"]["parameters"]}
    try:
        res["onnx_bytes"] = sum(p.stat().st_size for p in (root / "onnx").iterdir())
        failures, record = verify_golden(root, device="cuda")
        res["verify"] = {"passed": not failures, "failures": failures, "notes": record["notes"],
                         "providers": record["providers"], "onnxruntime": record["onnxruntime"],
                         "max_abs_diff": record["max_abs_diff"]}
        log(f"{src}: verify {'ok' if not failures else failures}")
        gold = manifest["golden"]
        ref = gold.get("fp32_reference") or gold  # eager fp32: golden/ itself for an fp16 package
        rt = CudaPackageRuntime(root, device="cuda")
        res["vs_fp32"] = {}
        for case in ref["cases"]:
            feeds = {n: np.load(root / f) for n, f in case["inputs"].items()}
            got = rt.run_numpy(case["graph"], feeds)
            for n, f in case["outputs"].items():
                if n != "logits" and not n.endswith("." + manifest["io"]["cache"]["per_layer"][0]["name"]):
                    continue
                budget = None
                lim = (ref.get("limits") or {}).get(case["name"], {}).get(n)
                if lim is not None:
                    budget = Budget(**{k: (math.inf if v is None and k in ("atol", "rtol") else v)
                                       for k, v in lim.items()})
                res["vs_fp32"][f"{case['name']}/{n}"] = _stats(np.load(root / f), got[n].astype(np.float32),
                                                               n == "logits", budget)
        g = ref["greedy"]
        want = np.load(root / g["tokens"])
        tokens, steps = rt.generate(np.load(root / g["prompt"]), want.shape[1])
        differs = np.flatnonzero((tokens != want).any(0))
        res["greedy_vs_fp32"] = {"steps": int(want.shape[1]), "equal": not differs.size,
                                 "n_equal_prefix": int(differs[0]) if differs.size else int(want.shape[1]),
                                 "tokens": tokens[0].tolist(), "fp32_tokens": want[0].tolist()}
        log(f"{src}: vs fp32 {json.dumps(res['vs_fp32'].get('prefill/logits'), default=str)}; greedy "
            f"{res['greedy_vs_fp32']['n_equal_prefix']}/{want.shape[1]}")
        res["placement"] = _placement(CudaPackageRuntime(root, device="cuda", profile=True))
        res["decode"] = {}
        for L in lengths:
            past = rt.synthetic_cache(1, L)
            ids = np.array([[7]], np.int64)
            for _ in range(5):
                rt.run("decode", ids, past)
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                rt.run("decode", ids, past)
                times.append((time.perf_counter() - t) * 1e3)
            res["decode"][str(L)] = {"median_ms": statistics.median(times), "min_ms": min(times), "repeat": repeat}
            log(f"{src}: decode @ {L}: {res['decode'][str(L)]['median_ms']:.3f} ms")
    finally:
        cleanup()
    return res


def probe_qmoe(log) -> dict:
    """CUDA QMoE int8 (raw layout, fp16 activations) vs MoE fp16 with the dequantized weights."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    from passes.quant_qmoe import quantize_experts_int8
    rng = np.random.default_rng(0)
    E, H, I, T, K = 4, 128, 128, 8, 2
    fc1 = rng.standard_normal((E, 2 * I, H), dtype=np.float32) * 0.05
    fc2 = rng.standard_normal((E, H, I), dtype=np.float32) * 0.05
    q1, s1 = quantize_experts_int8(fc1)
    q2, s2 = quantize_experts_int8(fc2)
    d1 = ((q1.astype(np.float32) - 128) * s1[..., None]).astype(np.float16)
    d2 = ((q2.astype(np.float32) - 128) * s2[..., None]).astype(np.float16)
    x = rng.standard_normal((T, H), dtype=np.float32).astype(np.float16)
    probs = rng.standard_normal((T, E), dtype=np.float32).astype(np.float16)
    common = dict(k=K, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                  activation_alpha=1.0, activation_beta=0.0)
    out = {}

    def run(op, inits, names, attrs):
        node = h.make_node(op, ["x", "probs", *names], ["y"], domain="com.microsoft", **attrs)
        g = h.make_graph([node], "probe", [h.make_tensor_value_info("x", TP.FLOAT16, [T, H]),
                                          h.make_tensor_value_info("probs", TP.FLOAT16, [T, E])],
                         [h.make_tensor_value_info("y", TP.FLOAT16, [T, H])], initializer=inits)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)], ir_version=10)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        return s.run(None, {"x": x, "probs": probs})[0].astype(np.float32)

    # MoE inputs: x, probs, fc1 weights, fc1 bias (absent), fc2 weights
    ref = run("MoE", [nh.from_array(d1, "fc1"), nh.from_array(d2, "fc2")], ["fc1", "", "fc2"], common)
    out["moe_fp16_ok"] = bool(np.isfinite(ref).all())
    for variant, extra in (("raw_weights_prepacked0", {"weights_prepacked": 0, "quant_type": "int"}),
                           ("no_prepack_attr", {})):
        try:
            inits = [nh.from_array(q1, "fc1q"), nh.from_array(s1.astype(np.float16), "fc1s"),
                     nh.from_array(q2, "fc2q"), nh.from_array(s2.astype(np.float16), "fc2s")]
            # QMoE inputs: x, probs, fc1 w, fc1 scales, fc1 bias (empty), fc2 w, fc2 scales
            names = ["fc1q", "fc1s", "", "fc2q", "fc2s"]
            node = h.make_node("QMoE", ["x", "probs", *names], ["y"], domain="com.microsoft",
                               expert_weight_bits=8, **common, **extra)
            g = h.make_graph([node], "probe", [h.make_tensor_value_info("x", TP.FLOAT16, [T, H]),
                                              h.make_tensor_value_info("probs", TP.FLOAT16, [T, E])],
                             [h.make_tensor_value_info("y", TP.FLOAT16, [T, H])], initializer=inits)
            m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)],
                             ir_version=10)
            so = ort.SessionOptions()
            so.log_severity_level = 3
            s = ort.InferenceSession(m.SerializeToString(), so,
                                     providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            y = s.run(None, {"x": x, "probs": probs})[0].astype(np.float32)
            d = np.abs(y - ref)
            out[variant] = {"ran": True, "max_abs_vs_moe_fp16": float(d.max()),
                            "ref_max_abs": float(np.abs(ref).max()),
                            "cosine": float((y * ref).sum() / (np.linalg.norm(y) * np.linalg.norm(ref) + 1e-30))}
        except Exception as e:  # noqa: BLE001 - a probe records what happened
            out[variant] = {"ran": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        log(f"qmoe probe {variant}: {out[variant]}")
    return out


def probe_int4(log) -> dict:
    """CUDA QMoE 4-bit (block 32, zero points, fp16 scales, raw layout) vs MoE fp16 with the dequantized weights,
    and MatMulNBits 4-bit (block 32, zero points, fp16) vs MatMul fp16 of the dequantized weight, on CUDA."""
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh
    from passes.quant_int4 import dequantize_int4, quantize_int4_blocks
    from passes.quant_qmoe import quantize_experts_int4
    rng = np.random.default_rng(0)
    E, H, I, T, K, BS = 8, 128, 64, 8, 2, 32  # trained-small's expert shape
    out: dict = {}

    def session(nodes, inits, ins, outs):
        g = h.make_graph(nodes, "probe", ins, outs, initializer=inits)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)], ir_version=10)
        so = ort.SessionOptions()
        so.log_severity_level, so.enable_profiling = 3, True
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])

    def placed(sess, op):
        path = sess.end_profiling()
        events = json.loads(Path(path).read_text())
        os.remove(path)
        return sorted({e["args"].get("provider") for e in events if e.get("cat") == "Node"
                       and e.get("args", {}).get("op_name") == op})

    def unpack_deq(packed, scales, zp):  # [E, N, K/2], [E, N, K/BS], [E, N, ceil(K/BS/2)] -> fp32 [E, N, K]
        e, n, half = packed.shape
        codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(e, n, 2 * half).astype(np.float32)
        z = np.stack([zp & 0xF, zp >> 4], -1).reshape(e, n, -1)[..., :scales.shape[-1]].astype(np.float32)
        return ((codes.reshape(e, n, -1, BS) - z[..., None]) * scales[..., None]).reshape(e, n, 2 * half)

    fc1 = rng.standard_normal((E, 2 * I, H), dtype=np.float32) * 0.09
    fc2 = rng.standard_normal((E, H, I), dtype=np.float32) * 0.12
    q1, s1, z1 = quantize_experts_int4(fc1, BS, False, "float16")
    q2, s2, z2 = quantize_experts_int4(fc2, BS, False, "float16")
    d1, d2 = unpack_deq(q1, s1, z1).astype(np.float16), unpack_deq(q2, s2, z2).astype(np.float16)
    x = rng.standard_normal((T, H), dtype=np.float32).astype(np.float16)
    probs = rng.standard_normal((T, E), dtype=np.float32).astype(np.float16)
    common = dict(k=K, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                  activation_alpha=1.0, activation_beta=0.0)
    io = ([h.make_tensor_value_info("x", TP.FLOAT16, [T, H]), h.make_tensor_value_info("probs", TP.FLOAT16, [T, E])],
          [h.make_tensor_value_info("y", TP.FLOAT16, [T, H])])
    feeds = {"x": x, "probs": probs}
    ref_s = session([h.make_node("MoE", ["x", "probs", "fc1", "", "fc2"], ["y"], domain="com.microsoft", **common)],
                    [nh.from_array(d1, "fc1"), nh.from_array(d2, "fc2")], *io)
    ref = ref_s.run(None, feeds)[0].astype(np.float32)
    out["moe_fp16"] = {"placed": placed(ref_s, "MoE"), "finite": bool(np.isfinite(ref).all())}
    try:
        names = ["fc1q", "fc1s", "", "fc2q", "fc2s", "", "", "", "", "fc1z", "fc2z"]
        inits = [nh.from_array(q1, "fc1q"), nh.from_array(s1.astype(np.float16), "fc1s"), nh.from_array(q2, "fc2q"),
                 nh.from_array(s2.astype(np.float16), "fc2s"), nh.from_array(z1, "fc1z"), nh.from_array(z2, "fc2z")]
        sess = session([h.make_node("QMoE", ["x", "probs", *names], ["y"], domain="com.microsoft", expert_weight_bits=4,
                                    block_size=BS, weights_prepacked=0, quant_type="int", **common)], inits, *io)
        y = sess.run(None, feeds)[0].astype(np.float32)
        out["qmoe_4bit_block32_zero_points"] = {
            "ran": True, "placed": placed(sess, "QMoE"), "max_abs_vs_moe_fp16": float(np.abs(y - ref).max()),
            "ref_max_abs": float(np.abs(ref).max()),
            "cosine": float((y * ref).sum() / (np.linalg.norm(y) * np.linalg.norm(ref) + 1e-30))}
    except Exception as e:  # noqa: BLE001 - a probe records what happened
        out["qmoe_4bit_block32_zero_points"] = {"ran": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    log(f"int4 probe QMoE: {out['qmoe_4bit_block32_zero_points']}")
    try:
        N, Kd = 384, 128
        w = rng.standard_normal((N, Kd), dtype=np.float32) * 0.1
        b, sc, zp, _ = quantize_int4_blocks(w, BS, False, "float16")
        deq = dequantize_int4(b, sc, Kd, zp.reshape(-1)).astype(np.float16)
        xin = rng.standard_normal((T, Kd), dtype=np.float32).astype(np.float16)
        io2 = ([h.make_tensor_value_info("a", TP.FLOAT16, [T, Kd])], [h.make_tensor_value_info("y", TP.FLOAT16, [T, N])])
        r = session([h.make_node("MatMul", ["a", "w"], ["y"])], [nh.from_array(np.ascontiguousarray(deq.T), "w")], *io2)
        want = r.run(None, {"a": xin})[0].astype(np.float32)
        sess = session([h.make_node("MatMulNBits", ["a", "b", "s", "z"], ["y"], domain="com.microsoft", K=Kd, N=N,
                                    bits=4, block_size=BS)],
                       [nh.from_array(b, "b"), nh.from_array(sc.reshape(-1).astype(np.float16), "s"),
                        nh.from_array(zp.reshape(-1), "z")], *io2)
        y = sess.run(None, {"a": xin})[0].astype(np.float32)
        out["matmulnbits_4bit_block32_zero_points"] = {
            "ran": True, "placed": placed(sess, "MatMulNBits"), "max_abs_vs_matmul_fp16": float(np.abs(y - want).max()),
            "ref_max_abs": float(np.abs(want).max())}
    except Exception as e:  # noqa: BLE001
        out["matmulnbits_4bit_block32_zero_points"] = {"ran": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    log(f"int4 probe MatMulNBits: {out['matmulnbits_4bit_block32_zero_points']}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packages", nargs="+", required=True)
    ap.add_argument("--lengths", default="1024")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--probe-qmoe", action="store_true")
    ap.add_argument("--probe-int4", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    t0 = time.time()
    log = elapsed_logger()

    import onnxruntime as ort
    res: dict = {"command": command_line("benchmarks.cuda_int8", argv),
                 "onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "packages": [],
                 "errors": []}
    out = Path(args.out)

    def save():
        res["wall_s"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(res, indent=2, sort_keys=True, default=str) + "\n")

    if args.probe_qmoe:
        try:
            res["qmoe_probe"] = probe_qmoe(log)
        except Exception:  # noqa: BLE001
            res["errors"].append({"qmoe_probe": traceback.format_exc()[-2000:]})
        save()
    if args.probe_int4:
        try:
            res["int4_probe"] = probe_int4(log)
        except Exception:  # noqa: BLE001
            res["errors"].append({"int4_probe": traceback.format_exc()[-2000:]})
        save()
    for src in args.packages:
        try:
            res["packages"].append(bench_package(src, [int(x) for x in args.lengths.split(",")], args.repeat, log))
        except Exception:  # noqa: BLE001
            res["errors"].append({src: traceback.format_exc()[-2000:]})
            log(res["errors"][-1])
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
