"""Why the ascend package ships cache-length gears (docs/ascend.md, "Shapes and gears"): ORT CPU time of one
fixed-shape decode step at 4K real context, run in a 4K gear vs in a graph whose cache buffer is the full 128K
(what one static graph at --max-cache 131072, or a --dynamic_dims graph without a 4K gear, would run).

    python benchmarks/ascend_gears.py [--model small] [--batch 1] [--context 4096] [--full 131072] [--steps 5]

Writes benchmarks/cpu_<model>_ascend_gears.json (median ms per step, threads, the graphs' cache bytes)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--full", type=int, default=131072)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    import models
    from pipeline.static_export import (INDEX_DTYPE, StaticGraphSpec, export_static_graph, ort_sessions,
                                        save_static_graph, zero_inputs)
    model = models.load(a.model)
    cfg = model.config
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, M in (("gear", a.context), ("full", a.full)):
            spec = StaticGraphSpec("decode", a.batch, 1, M, "gather")
            t = time.perf_counter()
            path = save_static_graph(export_static_graph(model, spec), Path(tmp) / f"decode_{M}.onnx")
            export_s = time.perf_counter() - t
            sess = ort_sessions({"d": path}, threads=a.threads)["d"]
            feeds = zero_inputs(cfg, spec)
            rng = np.random.default_rng(0)  # the same context and token in both graphs
            for k, v in feeds.items():
                if k.startswith("past."):
                    v[:, : a.context - 1] = rng.standard_normal(v[:, : a.context - 1].shape).astype(v.dtype)
            feeds["input_ids"] = rng.integers(0, cfg.vocab_size, (a.batch, 1)).astype(INDEX_DTYPE)
            feeds["position"] = np.full((a.batch,), a.context - 1, INDEX_DTYPE)  # the last row of a 4K context
            sess.run(None, feeds)  # warm-up
            ms = []
            for _ in range(a.steps):
                t = time.perf_counter()
                out = sess.run(None, feeds)
                ms.append(1000 * (time.perf_counter() - t))
            rows[label] = {"cache_rows": M, "median_ms": round(statistics.median(ms), 2), "ms": [round(x, 2) for x in ms],
                           "cache_bytes_past": int(sum(v.nbytes for k, v in feeds.items() if k.startswith("past."))),
                           "export_s": round(export_s, 1)}
            rows[label]["logits"] = out[0].astype(np.float64)
            del sess
    diff = float(np.abs(rows["full"].pop("logits") - rows["gear"].pop("logits")).max())
    ratio = rows["full"]["median_ms"] / rows["gear"]["median_ms"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    import sys
    doc = {"command": "python benchmarks/ascend_gears.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": commit, "model": a.model, "batch": a.batch, "real_context": a.context,
           "threads": a.threads, "cpus": os.cpu_count(), "steps": a.steps,
           "what": "one fixed-shape decode step on ORT CPU at position context-1: the cache buffer sized to the gear "
                   "vs the full buffer (same real context, same tokens)",
           "results": rows, "full_over_gear": round(ratio, 2), "logits_max_abs_diff_full_vs_gear": diff,
           "note": "machine shared with other work (2 cores); logits equal at both sizes (the extra rows are masked, "
                   "only paid for)"}
    out = a.out or Path(__file__).parent / f"cpu_{a.model}_ascend_gears.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("results", "full_over_gear", "logits_max_abs_diff_full_vs_gear")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
