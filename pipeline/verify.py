"""`mlamoe verify`: hashes first, then the golden data on the target's runtime where it exists
(the target's own check: targets.base.Target.verify, found through the registry)."""
from __future__ import annotations

from pathlib import Path

import targets
from models.errors import MlamoeError

from .package import PackageError, archive_check, open_package, verify_package


def verify_full(path: Path, hashes_only: bool = False) -> tuple[bool, list[str]]:
    lines: list[str] = []
    try:
        verify_package(path)
    except PackageError as e:
        return False, [f"FAIL hashes: {p}" for p in (e.problems or [str(e)])]
    root, manifest, cleanup = open_package(path)
    try:
        lines.append(f"ok   hashes: {len(manifest['files'])} files match manifest.json")
        archive_ok, line = archive_check(path)
        lines.append(line)
        if not archive_ok:
            return False, lines
        if hashes_only:
            return True, lines
        name = manifest["target"]["name"]
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            lines.append("skip golden re-run: onnxruntime is not installed (hashes only)")
            return True, lines
        target = targets.find(name)
        if target is None:
            lines.append(f"skip golden re-run: the {name} runtime is not available here (hashes only)")
            return True, lines
        return target.verify(root, manifest, lines)
    except MlamoeError:
        raise
    finally:
        cleanup()
