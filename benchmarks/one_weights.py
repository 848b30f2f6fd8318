"""What one weights file per package saves (issue 16 item 1's last sentence): a package folder's bytes by subfolder,
its external-data files, its .tar.gz, and the compile's wall time and peak RSS from `/usr/bin/time -v`.

Measured as (one compile per package, a fresh stage cache, so that every stage runs):

    MLAMOE_CACHE=$(mktemp -d) /usr/bin/time -v mlamoe compile --model small --target ort-cpu \\
        --out /tmp/ow/after/small-ort-cpu --force --no-cache 2> time-ort-cpu.txt
    python -m benchmarks.one_weights --label after --package /tmp/ow/after/small-ort-cpu \\
        --time-log time-ort-cpu.txt --compile-command "..." --json benchmarks/cpu_small_one_weights.json

Entries are merged into the JSON by (label, package name), so the "before" build (the commit before the change)
and the "after" build land in one file.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks import command_line


def _bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def _time_log(path: Path) -> dict:
    text = path.read_text()
    out = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["peak_rss_bytes"] = int(m.group(1)) * 1024
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        parts = [float(x) for x in m.group(1).split(":")]
        secs = 0.0
        for p in parts:
            secs = secs * 60 + p
        out["wall_seconds"] = round(secs, 2)
    return out


def measure(package: Path) -> dict:
    package = package.resolve()
    folders = {d.name: _bytes(d) for d in sorted(package.iterdir()) if d.is_dir()}
    weights = {f.relative_to(package).as_posix(): f.stat().st_size for f in sorted(package.rglob("*"))
               if f.is_file() and (f.suffix in (".data", ".onnx"))}
    tar = package.parent / f"{package.name}.tar.gz"
    return {"folder_bytes": _bytes(package), "subfolder_bytes": folders, "graph_and_weight_files": weights,
            "archive_bytes": tar.stat().st_size if tar.is_file() else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="before | after")
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--time-log", type=Path, default=None, help="the compile's /usr/bin/time -v output")
    p.add_argument("--compile-command", default=None)
    p.add_argument("--commit", default=None, help="the commit the package was built from")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    entry = {"label": args.label, "package": args.package.name, "command": command_line("benchmarks.one_weights", argv),
             **measure(args.package)}
    if args.compile_command:
        entry["compile_command"] = args.compile_command
    if args.commit:
        entry["commit"] = args.commit
    if args.time_log:
        entry["compile"] = _time_log(args.time_log)
    doc = {"entries": []}
    if args.json and args.json.is_file():
        doc = json.loads(args.json.read_text())
    doc["entries"] = [e for e in doc["entries"] if (e["label"], e["package"]) != (args.label, args.package.name)]
    doc["entries"].append(entry)
    doc["entries"].sort(key=lambda e: (e["package"], e["label"] != "before"))
    text = json.dumps(doc, indent=2, sort_keys=True)
    print(json.dumps(entry, indent=2, sort_keys=True))
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
