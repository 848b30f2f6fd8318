"""Peak RSS and wall time of `mlamoe compile --stream` (issue 16) against the layer count, and against the whole-model
compile of the same checkpoint, each run under `/usr/bin/time -v` in its own process.

    python -m benchmarks.stream_peak_rss --out benchmarks/cpu_stream_peak_rss.json \\
        RUN [RUN ...]          RUN = CHECKPOINT_DIR:QUANT[:whole]   (":whole": without --stream, the baseline)

Writes one record per run: the command, /usr/bin/time's peak RSS and wall clock, and from the build log the
layer-by-layer part's peak (`layerwise` stage) and the end-to-end checks' (`stitched`), the weights file's size and
the per-layer sub-step seconds. Checkpoints: `python -m benchmarks.synth_checkpoint --config medium --layers N`.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _time_v(stderr: str) -> dict:
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", stderr)
    status = re.search(r"Exit status: (\d+)", stderr)
    return {"peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None, "wall_clock": wall.group(1) if wall else None,
            "exit_status": int(status.group(1)) if status else None}


def run(checkpoint: Path, quant: str, whole: bool, scratch: Path) -> dict:
    out = scratch / f"{checkpoint.name}-{quant}-{'whole' if whole else 'stream'}"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "pipeline.cli", "compile", "--model", str(checkpoint),
           "--target", "ort-cpu", "--quant", quant, "--out", str(out), "--no-archive", "--no-cache", "--force"]
    if not whole:
        cmd.append("--stream")
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    rec = {"checkpoint": str(checkpoint), "quant": quant, "stream": not whole,
           "command": " ".join(cmd[2:]).replace(sys.executable, "python"), **_time_v(p.stderr),
           "seconds": round(time.time() - t, 1)}
    cfg = json.loads((checkpoint / "config.json").read_text())
    rec["layers"] = cfg["num_hidden_layers"]
    if p.returncode:
        rec["error"] = p.stderr.strip().splitlines()[-20:]
        return rec
    log = json.loads((scratch / f"{out.name}.build.json").read_text())
    stages = {s["name"]: s for s in log.get("stages", [])}
    for name in ("layerwise", "stitched"):
        if name in stages and "peak_rss_bytes" in stages[name].get("timings", {}):
            rec[f"{name}_peak_rss_bytes"] = stages[name]["timings"]["peak_rss_bytes"]
    if "layerwise" in stages:
        rec["per_layer"] = {k: v for k, v in stages["layerwise"]["timings"].items() if k.startswith("layer")}
    weights = out / "onnx" / "weights.data"
    rec["weights_file_bytes"] = weights.stat().st_size if weights.exists() else None
    rec["package_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out, ignore_errors=True)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="CHECKPOINT_DIR:QUANT[:whole]")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--scratch", type=Path, default=None, help="where packages are built (default: a temp folder)")
    args = ap.parse_args(argv)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="stream-rss-"))
    records = []
    for spec in args.runs:
        parts = spec.split(":")
        records.append(run(Path(parts[0]), parts[1] if len(parts) > 1 else "none", parts[2:] == ["whole"], scratch))
        print(json.dumps({k: v for k, v in records[-1].items() if k != "per_layer"}), flush=True)
        args.out.write_text(json.dumps({"what": __doc__.splitlines()[0], "runs": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
