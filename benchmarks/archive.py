"""What the hand-off archive costs: writing a package's .tar.gz with every member deflated at level 6
(the archive before weights were stored) against make_tarball (weight-like members stored, the rest at
level 6), on a package folder already built. Also checks both archives hold the same bytes.

    python -m benchmarks.archive dist/small-ort-cpu [--json benchmarks/cpu_small_archive.json]
"""
from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks import command_line
from pipeline.package import make_tarball


def _all_level6(root: Path, tar_path: Path) -> None:
    with tarfile.open(tar_path, "w:gz", compresslevel=6) as tar:
        tar.add(root, arcname=root.name)


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("package", type=Path)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    root = args.package.resolve()
    folder_bytes = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    result = {"command": command_line("benchmarks.archive", argv), "package": root.name,
              "folder_bytes": folder_bytes}
    with tempfile.TemporaryDirectory() as tmp:
        forms = {"all_deflate6": lambda t: _all_level6(root, t),
                 "weights_stored": lambda t: make_tarball(root, t, arcname=root.name)}
        for name, write in forms.items():
            t = Path(tmp) / f"{name}.tar.gz"
            start = time.perf_counter()
            write(t)
            result[name] = {"seconds": round(time.perf_counter() - start, 3), "bytes": t.stat().st_size}
        a, b = (_members(Path(tmp) / f"{n}.tar.gz") for n in forms)
        # the manifest differs by the folder's archive record only (left out of make_tarball's copy)
        result["same_members"] = sorted(a) == sorted(b) and all(
            a[k] == b[k] for k in a if not k.endswith("/manifest.json"))
    result["speedup"] = round(result["all_deflate6"]["seconds"] / result["weights_stored"]["seconds"], 2)
    result["size_ratio"] = round(result["weights_stored"]["bytes"] / result["all_deflate6"]["bytes"], 4)
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
