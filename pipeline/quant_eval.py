"""Honest accuracy of a quantization scheme: held-out perplexity, top-1 agreement, KL, per-layer error profile.

    python -m pipeline.quant_eval models/trained/trained-small --scheme int8 w8a8 fp8 [--csv-dir reports/]
    python -m pipeline.quant_eval models/trained/trained-small --package dist/trained-small-ort-cuda-fp8

--package: a compiled package's prefill graph as shipped (e.g. ort-cuda's fp16 graphs, int8 or fp8), run on
ORT CPU against the fp32 exported graph of the same checkpoint, over the same held-out windows: what the
package costs in perplexity, whatever its scheme and precision (ORT CPU rounds fp16 tensors as a GPU does;
its kernels' accumulation order differs).

Measured on a model whose outputs mean something (models/trained/trained-small, trained by
models.train_small on the Python standard library; held-out = files it never saw). Both sides run the
exported prefill graph on ONNX Runtime CPU, fp32 graph vs the quantized graph, over the same
held-out windows, so the figures isolate the quantization. W8A8 is calibrated on the corpus's
calibration split (different files again).

Targets (issue 6): perplexity increase int8 <= 1%, w8a8 <= 3%, fp8 <= 2%; top-1 agreement >= 97% for int8.
(issue 18) int4 <= 3% and top-1 >= 95%.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .build import prefill_feeds
from .error_profile import write_error_profile

TARGETS = {"int8": {"max_ppl_increase": 0.01, "min_top1": 0.97},
           "int4": {"max_ppl_increase": 0.03, "min_top1": 0.95},
           "w8a8": {"max_ppl_increase": 0.03},
           "fp8": {"max_ppl_increase": 0.02}}


RAW = "raw"  # the exported graph; any other `graph` names a target, whose passes run on it


@functools.lru_cache(maxsize=4)
def _exported(model_dir: str, graph: str = RAW) -> tuple[bytes, object]:
    """(serialized fp32 prefill graph, eager model) of a checkpoint folder, exported once per process.

    graph "raw": the exported graph (every routed expert a MatMul: a scheme quantizes all of them);
    a target's name (e.g. ort-cpu): after that target's passes that run on prefill (ort-cpu's
    moe-ort-fused: experts in com.microsoft.MoE, which int8 turns into QMoE and the other schemes leave
    fp32), i.e. what that target's package ships."""
    from targets import PROFILES, get_profile
    if graph != RAW and graph not in PROFILES:
        raise ValueError(f"graph {graph!r}: choose one of {', '.join((RAW, *PROFILES))}")
    if graph != RAW:
        from passes import PASSES, graphs_for
        from passes.cleanup import cleanup
        blob, model = _exported(model_dir, RAW)
        m = ir.from_proto(__import__("onnx").load_from_string(blob))
        for name in get_profile(graph).passes:
            if "prefill" in graphs_for(name):
                PASSES[name]()(m)
                cleanup(m)
        return ir.to_proto(m).SerializeToString(), model
    import models
    from pipeline.export import export_graph
    model = models.load(model_dir)
    return ir.to_proto(export_graph(model, "prefill")).SerializeToString(), model


def _session(model_ir: ir.Model, threads: int, extra_outputs=()):
    from passes.quant_weights import session_with_outputs
    return session_with_outputs(model_ir, extra_outputs, threads)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def heldout_agreement(run_ref, run_other, fp32_ir: ir.Model, heldout: np.ndarray, batch: int = 8) -> dict:
    """Next-token perplexity of two prefill graphs (run_*(feeds) -> logits) over held-out windows [N, seq+1],
    their top-1 agreement and KL(ref || other) per token."""
    nll_ref = nll_other = agree = kl = 0.0
    n_tok = 0
    for i in range(0, len(heldout), batch):
        x = heldout[i:i + batch]
        feeds = prefill_feeds(fp32_ir, x[:, :-1])
        lr, lo = _log_softmax(run_ref(feeds)), _log_softmax(run_other(feeds))
        tgt = x[:, 1:, None]
        nll_ref -= np.take_along_axis(lr, tgt, -1).sum()
        nll_other -= np.take_along_axis(lo, tgt, -1).sum()
        agree += (lr.argmax(-1) == lo.argmax(-1)).sum()
        kl += (np.exp(lr) * (lr - lo)).sum()
        n_tok += tgt.size
    ppl_ref, ppl_other = math.exp(nll_ref / n_tok), math.exp(nll_other / n_tok)
    return {"heldout_tokens": int(n_tok), "ppl_fp32": float(ppl_ref), "ppl_other": float(ppl_other),
            "ppl_increase": ppl_other / ppl_ref - 1, "top1_agreement": float(agree / n_tok), "kl": float(kl / n_tok)}


def quantized_graph(fp32_ir: ir.Model, scheme: str, model=None, calibration_ids: np.ndarray | None = None,
                    threads: int = 1, **options):
    """(quantized copy of `fp32_ir`, QuantReport). W8A8 calibrates on `calibration_ids` windows first."""
    from passes.quant_w8a8 import calibrate
    from passes.quantize import quantize
    q = ir.from_proto(ir.to_proto(fp32_ir))
    cal = None
    if scheme == "w8a8" and calibration_ids is not None:
        cal = calibrate(q, [prefill_feeds(q, calibration_ids[i:i + 8]) for i in range(0, len(calibration_ids), 8)],
                        threads=threads)
    return q, quantize(q, scheme, model=model, calibration=cal, **options)


def evaluate_quantized(model_dir: str | Path, scheme: str, *, n_windows: int = 64, seq: int = 128,
                       threads: int = 1, profile_csv: str | Path | None = None, graph: str = RAW,
                       **options) -> dict:
    """Held-out perplexity fp32 vs `scheme`, top-1 agreement, KL, sizes; optionally the per-layer CSV.

    Returns {scheme, ppl_fp32, ppl_quant, ppl_increase, top1_agreement, kl, linear_ratio, weights bytes,
    targets, passed, ...}. `options` go to the scheme's pass (e.g. block_size, accuracy_level for int8).
    graph: "raw" (the exported graph) or a target's name (as that target's package ships it; see _exported).
    """
    from models.train_small import windows
    blob, model = _exported(str(Path(model_dir).resolve()), graph)
    fp32 = ir.from_proto(__import__("onnx").load_from_string(blob))
    heldout = windows("heldout", n_windows, seq + 1)
    cal_ids = windows("calibration", 32, seq) if scheme == "w8a8" else None
    quant, rep = quantized_graph(fp32, scheme, model=model, calibration_ids=cal_ids, threads=threads, **options)
    s_ref, s_q = _session(fp32, threads), _session(quant, threads)
    m = heldout_agreement(lambda f: s_ref.run(["logits"], f)[0], lambda f: s_q.run(["logits"], f)[0], fp32, heldout)
    m["ppl_quant"] = m.pop("ppl_other")
    res = {"scheme": scheme, "options": options, "graph": graph, "model": str(model_dir), **m,
           "linear_ratio": rep.linear_ratio,
           "linear_bytes_before": rep.linear_bytes_before, "linear_bytes_after": rep.linear_bytes_after,
           "weights_bytes_before": rep.weights_bytes_before, "weights_bytes_after": rep.weights_bytes_after,
           "n_quantized": len(rep.quantized), "notes": rep.notes}
    t = TARGETS.get(scheme, {})
    res["targets"] = t
    res["passed"] = bool(res["ppl_increase"] <= t.get("max_ppl_increase", math.inf)
                     and res["top1_agreement"] >= t.get("min_top1", 0.0))
    if profile_csv is not None:
        feeds = prefill_feeds(fp32, heldout[:8, :-1])
        res["profile_csv"] = str(write_error_profile(fp32, quant, scheme, feeds, profile_csv, threads=threads))
    return res


def evaluate_package(package: str | Path, model_dir: str | Path, *, n_windows: int = 64, seq: int = 128,
                     threads: int = 1) -> dict:
    """Held-out perplexity of a package's prefill graph (folder or .tar.gz) vs the fp32 exported graph of
    `model_dir` (the checkpoint it was compiled from: checked against the manifest's weights hash)."""
    import onnxruntime as ort

    from models.train_small import windows
    from runtime.cuda_runtime import _ORT_TYPES
    from pipeline.package import PackageError, open_package
    from models.checkpoint import weights_sha256
    root, manifest, cleanup = open_package(package)
    try:
        blob, model = _exported(str(Path(model_dir).resolve()), RAW)
        if manifest["model"]["weights_sha256"] != weights_sha256(model):
            raise PackageError(f"{package}: compiled from other weights than {model_dir} (manifest model.weights_sha256 "
                               f"{manifest['model']['weights_sha256'][:12]}...): evaluate it with its own checkpoint")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        graph = manifest["io"]["graphs"]["prefill"]["file"]
        s_pkg = ort.InferenceSession(str(root / graph), so, providers=["CPUExecutionProvider"])
        types = {i.name: _ORT_TYPES[i.type] for i in s_pkg.get_inputs()}
        fp32 = ir.from_proto(__import__("onnx").load_from_string(blob))
        s_ref = _session(fp32, threads)
        m = heldout_agreement(
            lambda f: s_ref.run(["logits"], f)[0],
            lambda f: s_pkg.run(["logits"], {n: a.astype(types[n]) for n, a in f.items()})[0],
            fp32, windows("heldout", n_windows, seq + 1))
    finally:
        cleanup()
    t = manifest["target"]
    m["ppl_package"] = m.pop("ppl_other")
    res = {"package": str(package), "target": t["name"], "quantization": t.get("quantization"),
           "precision": t.get("precision", "fp32"), "model": str(model_dir), **m,
           "run_on": f"onnxruntime {ort.__version__} CPU"}
    targets = TARGETS.get(res["quantization"], {})
    res["targets"] = targets
    res["passed"] = bool(res["ppl_increase"] <= targets.get("max_ppl_increase", math.inf)
                         and res["top1_agreement"] >= targets.get("min_top1", 0.0))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="held-out accuracy of quantization schemes")
    ap.add_argument("model_dir")
    ap.add_argument("--scheme", nargs="+", default=["int8", "w8a8", "fp8"])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--csv-dir", default=None)
    from targets import PROFILES
    ap.add_argument("--graph", choices=(RAW, *PROFILES), default=RAW,
                    help="raw: the exported graph; a target: after its passes (ort-cpu: experts in MoE/QMoE)")
    ap.add_argument("--int8-accuracy-level", type=int, default=None, help="int8: MatMulNBits/QMoE accuracy_level")
    ap.add_argument("--package", nargs="+", default=None,
                    help="evaluate these compiled packages (folder or .tar.gz) of model_dir instead of --scheme")
    args = ap.parse_args(argv)
    if args.package:
        for p in args.package:
            print(json.dumps(evaluate_package(p, args.model_dir, n_windows=args.windows)))
        return 0
    for s in args.scheme:
        csv_path = Path(args.csv_dir) / f"error_profile_{s}.csv" if args.csv_dir else None
        opts = {"accuracy_level": args.int8_accuracy_level} if s == "int8" and args.int8_accuracy_level is not None else {}
        print(json.dumps(evaluate_quantized(args.model_dir, s, n_windows=args.windows, profile_csv=csv_path,
                                            graph=args.graph, **opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
