"""Stage runner: each stage is a function from artifacts to artifacts, recorded and cached.

A stage's record (manifest "stages") holds its parameters, the sha256 of its inputs and outputs,
tool versions, parity reports and notes. Its wall time and whether it came from the cache differ
from build to build, so they go to the build log beside the package (`NAME.build.json`), never into
the package: the same inputs give a byte-identical package and archive. Outputs that are files are cached by content:
the key hashes the stage name, parameters, input hashes, tool versions and the compiler's own
source, so an unchanged stage is restored instead of recomputed, and any change recomputes it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from .package import PackageError, sha256_file
from .parity import ParityReport
from .progress import Progress

_SOURCE_PACKAGES = ("models", "runtime", "passes", "parallel", "targets", "pipeline")


def tool_versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnx_ir
    import onnxruntime
    import onnxscript
    import torch
    return {"python": sys.version.split()[0], "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
            "onnx_ir": onnx_ir.__version__, "numpy": numpy.__version__}


def _source_hash() -> str:
    """Hash of the compiler's own Python source: a code change invalidates cached stages."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in _SOURCE_PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("MLAMOE_CACHE", Path.home() / ".cache" / "mlamoe"))


_LIBC = None
GC_ABOVE_BYTES = 2 << 30
"""release_memory runs a full garbage collection only above this resident size: with torch's exporter loaded one
costs seconds (measured 4-5 s on this machine with tiny's graphs), worth it only where there is memory to win."""


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory() -> None:
    """Hand the memory a finished step freed back to the OS: a stage's graphs, sessions and the exporter's tensors are
    garbage once it returns (onnx-ir graphs hold reference cycles, so only a collection frees them), and glibc keeps
    freed heap in its arenas, so without malloc_trim the process keeps the high-water mark of every stage (measured
    on medium: 4.67 GB after export and del, 2.74 GB after gc + malloc_trim). The collection runs above
    GC_ABOVE_BYTES only; malloc_trim is a no-op where the C library has none."""
    global _LIBC
    if _rss_bytes() > GC_ABOVE_BYTES:
        gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


@dataclasses.dataclass
class StageRecord:
    name: str
    params: dict
    inputs: dict[str, str]
    outputs: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False
    parity: list[dict] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    timings: dict = dataclasses.field(default_factory=dict)  # seconds per sub-step (build log only)

    def to_dict(self) -> dict:
        """The manifest's record: what was done and checked, nothing that varies between builds."""
        d = dataclasses.asdict(self)
        for k in _RUN_FIELDS:
            d.pop(k)
        return d


_RUN_FIELDS = ("seconds", "cached", "timings")


def write_build_log(out: Path, runner: "StageRunner", started: float, archive: bool = True) -> Path:
    """`NAME.build.json` beside the package: when it was built, how long each stage took and which
    came from the content cache (kept out of the package so that rebuilds are byte-identical)."""
    out = Path(out)
    log = {"package": out.name, "archive": f"{out.name}.tar.gz" if archive else None,
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
           "wall_seconds": round(time.time() - started, 3), "cache_dir": str(runner.cache_dir),
           "use_cache": runner.use_cache,
           "stages": [{"name": r.name, **{k: getattr(r, k) for k in _RUN_FIELDS}} for r in runner.records]}
    path = out.parent / f"{out.name}.build.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(log, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def clean_cache_tmp(cache_dir: Path) -> list[Path]:
    """Remove `.tmp-<pid>-*` folders of the stage cache whose writer is gone (an entry only becomes
    visible by one rename of a complete folder, so these are never read as entries)."""
    from .package import _pid_alive
    removed = []
    for tmp in sorted(Path(cache_dir).glob("*/.tmp-*")):
        pid = tmp.name.split("-")[1]
        if not (pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid()):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def read_build_log(package: Path) -> dict | None:
    """The build log beside a package folder, if it is there."""
    path = Path(package).parent / f"{Path(package).name}.build.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class StageRunner:
    """Runs stages in order, prints progress, keeps records, reuses cached file outputs."""

    def __init__(self, cache_dir: Path | None = None, use_cache: bool = True, progress: Callable[[str], None] | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.use_cache = use_cache
        self.records: list[StageRecord] = []
        self.reports: list[ParityReport] = []
        self.informational: set[int] = set()
        self.progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
        # the live status line (a terminal only); quiet when the caller takes the progress messages itself
        self.live = Progress() if progress is None else Progress(live=False)
        self._versions = tool_versions()
        self._source = _source_hash()

    def key(self, name: str, params: dict, inputs: dict[str, str]) -> str:
        blob = json.dumps({"stage": name, "params": params, "inputs": inputs, "tools": self._versions,
                           "source": self._source}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def run(self, name: str, params: dict, inputs: dict[str, str], out_dir: Path,
            build: Callable[[Path, StageRecord], None], check: Callable[[Path, StageRecord], None] | None = None,
            cacheable: bool = True) -> StageRecord:
        """build(out_dir, record) writes the stage's files into out_dir (and may add notes);
        check(out_dir, record) runs its parity checks.

        If a cache entry with the same key exists its files are copied into out_dir instead of
        building; the parity checks run either way, so every build re-verifies every stage.
        """
        record = StageRecord(name, params, inputs)
        key = self.key(name, params, inputs)
        entry = self.cache_dir / key[:2] / key
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if cacheable and self.use_cache and (entry / "record.json").is_file() and self._restore(entry, out_dir, name):
            record.notes, record.cached = json.loads((entry / "record.json").read_text())["notes"], True
            self.progress(f"[{name}] reused cached result ({key[:12]})")
        else:
            self.progress(f"[{name}] running ...")
            with self.live.stage(name, "building"):
                build(out_dir, record)
            release_memory()
        if check is not None:
            with self.live.stage(name, "checking"):
                check(out_dir, record)
            release_memory()
        record.outputs = {p.relative_to(out_dir).as_posix(): sha256_file(p)
                          for p in sorted(out_dir.rglob("*")) if p.is_file()}
        record.seconds = round(time.perf_counter() - start, 3)
        if cacheable and self.use_cache and not record.cached:
            self._store(entry, out_dir, record)
        self.records.append(record)
        self.progress(f"[{name}] done in {record.seconds:.1f} s")
        return record

    def _restore(self, entry: Path, out_dir: Path, name: str) -> bool:
        """Copy a cache entry's files into out_dir, each checked against the sha256 its record holds.
        A damaged entry (a file missing, truncated or changed, an unreadable record) is removed and
        reported, and the stage is rebuilt: the cache can only save time, never change a result."""
        try:
            cached = json.loads((entry / "record.json").read_text())
            outputs, _ = cached["outputs"], cached["notes"]
            for rel, want in outputs.items():
                dst = out_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(entry / "files" / rel, dst)
                if sha256_file(dst) != want:
                    raise ValueError(f"{rel}: sha256 differs from the cache record")
            return True
        except (OSError, ValueError, KeyError, TypeError, AttributeError, PackageError) as e:
            self.progress(f"[{name}] cache entry {entry} is damaged ({e}); removed, rebuilding")
            shutil.rmtree(entry, ignore_errors=True)
            for p in sorted(out_dir.rglob("*"), reverse=True):
                if p.is_file() or p.is_symlink():
                    p.unlink()
            return False

    def _store(self, entry: Path, out_dir: Path, record: StageRecord) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=entry.parent))
        try:
            for rel in record.outputs:
                dst = tmp / "files" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out_dir / rel, dst)
            (tmp / "record.json").write_text(json.dumps(
                {"outputs": record.outputs, "notes": record.notes}, sort_keys=True))
            if entry.exists():
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a cache we cannot write is not an error

    def add_report(self, record: StageRecord, report: ParityReport, binding: bool = True) -> None:
        """Attach a parity report to the stage and fail the build if it is over budget.

        binding=False records it for people (reported, never fails the build): e.g. a quantized
        package's greedy generation against fp32, whose steps diverge once one token differs.
        """
        record.parity.append({**report.to_dict(), "binding": binding})
        self.reports.append(report)
        status = "PASS" if report.passed else "FAIL" if binding else "informational, outside budget"
        worst = max((o.max_abs for o in report.outputs if o.max_abs == o.max_abs), default=0.0)
        self.progress(f"[{record.name}] parity {report.stage}: {status} (max abs {worst:.2e})")
        if binding:
            report.raise_if_failed()
        else:
            self.informational.add(id(report))

    def binding_passed(self) -> bool:
        return all(r.passed for r in self.reports if id(r) not in self.informational)

    @property
    def versions(self) -> dict[str, str]:
        return dict(self._versions)
