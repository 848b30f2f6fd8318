"""The per-layer error profile of a quantized graph (reports/error_profile.csv + .png in quantized packages):
for each linear site, the weight's relative error and the site output's error vs the fp32 graph.

Used by the quantize stage of every target (ort-cpu, ort-cuda, ascend) and by pipeline.quant_eval.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx_ir as ir


def _weight_error(w_oi: np.ndarray, scheme: str, options: dict) -> float:
    import torch
    if scheme == "int8":
        from passes.quant_int8 import quantize_int8_blocks
        q, s, z, _ = quantize_int8_blocks(w_oi, options.get("block_size", 128), options.get("symmetric", True),
                                          options.get("scale_dtype", "float32"))
        d = ((q.astype(np.float32) - z[..., None]) * s[..., None]).reshape(w_oi.shape[0], -1)[:, :w_oi.shape[1]]
    elif scheme == "int4":  # attention_bits / dense_mlp_bits 8 sites are int8: their error is smaller than this bound
        from passes.quant_int4 import dequantize_int4, quantize_int4_blocks
        b, s, zp, _ = quantize_int4_blocks(w_oi, options.get("block_size", 32), options.get("symmetric", False),
                                           options.get("scale_dtype", "float32"))
        d = dequantize_int4(b, s, w_oi.shape[1], None if options.get("symmetric", False) else zp)
    elif scheme == "fp8":
        from models.checkpoint import fp8_block_dequantize, fp8_block_quantize
        d = fp8_block_dequantize(*fp8_block_quantize(torch.from_numpy(w_oi.copy()))).numpy()
    elif scheme == "w8a8":
        from passes.quant_w8a8 import quantize_per_channel
        q, s = quantize_per_channel(w_oi)
        d = q.astype(np.float32) * s[:, None]
    else:
        return 0.0
    return float(np.linalg.norm(d - w_oi) / max(np.linalg.norm(w_oi), 1e-30))


def error_profile(fp32_ir: ir.Model, quant_ir: ir.Model, scheme: str, feeds: dict, threads: int = 1,
                  **options) -> list[dict]:
    """Per linear site (graph order): weight relative error and the site output's error vs fp32, with
    the quantized graph's own upstream error included (so a reader sees where error enters and grows)."""
    from passes.quant_weights import DEFAULT_EXCLUDE, find_linear_sites, session_with_outputs
    sites = find_linear_sites(fp32_ir.graph)
    names = [s.node.outputs[0].name for s in sites]
    ref = dict(zip(names + ["logits"], session_with_outputs(fp32_ir, names, threads).run(names + ["logits"], feeds)))
    qnames = {v.name for n in quant_ir.graph for v in n.outputs}
    present = [n for n in names if n in qnames]
    act = dict(zip(present + ["logits"], session_with_outputs(quant_ir, present, threads).run(present + ["logits"], feeds)))
    rows = []
    for i, s in enumerate(sites):
        row = {"index": i, "node": s.node.name, "weight": s.weight.name, "role": s.role,
               "out_features": s.out_features, "in_features": s.in_features, "weight_rel_error": _weight_error(s.weight_oi, scheme, options) if s.role not in DEFAULT_EXCLUDE else 0.0}
        r, a = ref[names[i]], act.get(names[i])
        if a is not None and a.shape != r.shape:  # a routed expert: routing sent it other tokens
            row["note"] = f"token count differs ({r.shape[0]} fp32 vs {a.shape[0]}): routing changed"
            a = None
        r = r.astype(np.float64).ravel()
        if a is not None:
            a = a.astype(np.float64).ravel()
            nr = np.linalg.norm(r)
            row["output_rel_euclid"] = float(np.linalg.norm(a - r) / nr) if nr else 0.0
            row["output_cosine"] = float(a @ r / (np.linalg.norm(a) * nr)) if nr and np.linalg.norm(a) else 1.0
        rows.append(row)
    r, a = ref["logits"].astype(np.float64).ravel(), act["logits"].astype(np.float64).ravel()
    rows.append({"index": len(sites), "node": "logits", "weight": "", "role": "output", "out_features": "",
                 "in_features": "", "weight_rel_error": "",
                 "output_rel_euclid": float(np.linalg.norm(a - r) / np.linalg.norm(r)),
                 "output_cosine": float(a @ r / (np.linalg.norm(a) * np.linalg.norm(r)))})
    return rows


PROFILE_COLUMNS = ["index", "node", "weight", "role", "out_features", "in_features", "weight_rel_error",
                   "output_rel_euclid", "output_cosine", "note"]


def write_error_profile(fp32_ir: ir.Model, quant_ir: ir.Model, scheme: str, feeds: dict, path: str | Path,
                        threads: int = 1, png: bool = True, **options) -> Path:
    """Write the per-layer error profile CSV (and a PNG beside it when matplotlib is installed)."""
    rows = error_profile(fp32_ir, quant_ir, scheme, feeds, threads, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, PROFILE_COLUMNS, lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    if png:
        plot_error_profile(rows, path.with_suffix(".png"), title=f"{scheme}: per-layer error")
    return path


def plot_error_profile(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """PNG of output rel. error per linear site; None (nothing written) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xs = [r["index"] for r in rows if isinstance(r.get("output_rel_euclid"), float)]
    ys = [r["output_rel_euclid"] for r in rows if isinstance(r.get("output_rel_euclid"), float)]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(xs, ys, marker=".")
    ax.set_xlabel("linear site (graph order)")
    ax.set_ylabel("output rel. euclid vs fp32")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
