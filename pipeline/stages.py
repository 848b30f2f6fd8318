"""Stage runner: each stage is a function from artifacts to artifacts, recorded and cached.

A stage's record (manifest "stages") holds its parameters, the sha256 of its inputs and outputs,
tool versions, wall time, parity reports and notes. Outputs that are files are cached by content:
the key hashes the stage name, parameters, input hashes, tool versions and the compiler's own
source, so an unchanged stage is restored instead of recomputed, and any change recomputes it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from .package import sha256_file
from .parity import ParityReport

_SOURCE_PACKAGES = ("models", "pipeline", "passes", "targets")


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class StageRunner:
    """Runs stages in order, prints progress, keeps records, reuses cached file outputs."""

    def __init__(self, cache_dir: Path | None = None, use_cache: bool = True, progress: Callable[[str], None] | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.use_cache = use_cache
        self.records: list[StageRecord] = []
        self.reports: list[ParityReport] = []
        self.informational: set[int] = set()
        self.progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
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
        if cacheable and self.use_cache and (entry / "record.json").is_file():
            cached = json.loads((entry / "record.json").read_text())
            for rel in cached["outputs"]:
                dst = out_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(entry / "files" / rel, dst)
            record.notes, record.cached = cached["notes"], True
            self.progress(f"[{name}] reused cached result ({key[:12]})")
        else:
            self.progress(f"[{name}] running ...")
            build(out_dir, record)
        if check is not None:
            check(out_dir, record)
        record.outputs = {p.relative_to(out_dir).as_posix(): sha256_file(p)
                          for p in sorted(out_dir.rglob("*")) if p.is_file()}
        record.seconds = round(time.perf_counter() - start, 3)
        if cacheable and self.use_cache and not record.cached:
            self._store(entry, out_dir, record)
        self.records.append(record)
        self.progress(f"[{name}] done in {record.seconds:.1f} s")
        return record

    def _store(self, entry: Path, out_dir: Path, record: StageRecord) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
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
