"""The hand-off package: atomic staging, manifest with per-file sha256, deterministic tar.gz,
hash re-verification and safe extraction.

A package is a folder (plus a `.tar.gz` of it) whose `manifest.json` lists every other file with
its sha256 and size. Typical build:

    with staging(out_dir, force=force) as tmp:      # .{name}.partial-<pid>-XXXX beside out_dir
        ...write onnx/, golden/, reports/, README.md into tmp...
        write_manifest(tmp, meta)
    make_tarball(out_dir, out_dir.parent / f"{out_dir.name}.tar.gz")
    verify_package(out_dir)

- Nothing half-written is ever at `out_dir`: the folder is built under a temporary name in the same
  parent and renamed into place only when the `with` body finished without an exception.
- A run killed with SIGKILL leaves `.{name}.partial-<pid>-XXXX`; its name can never be mistaken for
  the package (verify refuses it) and the next `staging()` of the same name deletes it.
- Same inputs -> byte-identical manifest.json and .tar.gz (sorted keys/members, zeroed metadata).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import struct
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

from models.errors import MlamoeError

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20
_PARTIAL = ".partial-"
_OLD = ".old-"


class PackageError(MlamoeError):
    """A package cannot be built, read, extracted or verified. `problems` lists each finding."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


# --------------------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise PackageError(f"{path}: cannot be read for hashing ({e.strerror or e})") from e
    return h.hexdigest()


# --------------------------------------------------------------------------------------- staging
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    """Delete a file, symlink or folder tree; best effort."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass


def _clean_stale(parent: Path, name: str, *, owner_locked: bool = False) -> list[Path]:
    """Delete `.{name}.partial-*` / `.{name}.old-*` left by killed runs; return what was removed.

    With `owner_locked` the caller holds `.{name}.lock` (package_lock), so no live build can own any
    of them: all are stale. Without it, an entry whose pid (`.{name}.partial-<pid>-...`) is alive is
    left alone (a pid can be reused, which is why compile cleans under the lock).
    """
    removed: list[Path] = []
    try:
        entries = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        for marker in (_PARTIAL, _OLD):
            prefix = f".{name}{marker}"
            if entry.startswith(prefix):
                pid_s = entry[len(prefix):].split("-", 1)[0]
                if not owner_locked and pid_s.isdigit() and _pid_alive(int(pid_s)):
                    continue
                _remove(parent / entry)
                removed.append(parent / entry)
    return removed


# ------------------------------------------------------------------------------------ write failures
# Peak disk of a build beside --out per byte of fp32 weights, from the tiny measurement in docs/reliability.md;
# larger models have relatively less golden data, so this errs high.
_PEAK_DISK_PER_WEIGHT_BYTE = 22
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


def _note_written(e: BaseException, folder: Path) -> None:
    """On a full disk, remember how much this build had written in `folder` before it is removed."""
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        e.mlamoe_written = getattr(e, "mlamoe_written", 0) + _tree_bytes(folder)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def write_failure(e: OSError, out_dir: str | os.PathLike, weights_bytes: int | None = None) -> PackageError | None:
    """One clear error for a build whose writes failed (full disk, quota, read-only or forbidden
    folder), naming the path, the free space and what the build needs; None for other OSErrors.
    `weights_bytes` (fp32 weights of the model) sizes the estimate."""
    out_dir = Path(out_dir)
    path = e.filename or out_dir.parent  # ONNX and torch writers name no file: then the folder of --out
    if e.errno in _NO_SPACE:
        try:
            free = shutil.disk_usage(out_dir.parent if out_dir.parent.exists() else ".").free
        except OSError:
            free = None
        written = getattr(e, "mlamoe_written", None)
        parts = [f"{path}: no space left on the device ({e.strerror})"]
        if written is not None:
            parts.append(f"the build had written {_fmt_bytes(written)} when the disk filled")
        if free is not None:
            parts.append(f"{_fmt_bytes(free)} free there now")
        need = (f"; at its peak a build needs about {_fmt_bytes(_PEAK_DISK_PER_WEIGHT_BYTE * weights_bytes)} there "
                f"({_PEAK_DISK_PER_WEIGHT_BYTE}x the {_fmt_bytes(weights_bytes)} of fp32 weights: every stage's graphs in "
                "scratch, the package and its archive)") if weights_bytes else ""
        return PackageError(", ".join(parts) + need + f". Nothing was left at {out_dir}: free space or choose an "
                            "--out on a larger disk (stage scratch is written beside --out)")
    if e.errno in _NO_WRITE:
        return PackageError(f"{path}: cannot write ({e.strerror}); choose an --out in a folder you can write")
    return None


# ------------------------------------------------------------------------------------------ locking
_HELD: dict[str, tuple[int, int]] = {}  # resolved out path -> (fd, depth): the locks this process holds


def _lock_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.lock"


def _lock_owner(lock: Path) -> str:
    try:
        text = lock.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "another process"
    return f"pid {text}" if text else "another process"


@contextlib.contextmanager
def package_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold `.{name}.lock` beside `out_dir` (an exclusive flock, never waited for) for the whole build.

    A second compile into the same --out fails at once with one clear error instead of racing the
    first. The first acquisition in this process also removes staging/work folders of killed runs
    (under the lock none of them can belong to a live build). Re-entrant within one process.
    """
    out_dir = Path(out_dir)
    name = out_dir.name
    if name in ("", ".", ".."):
        raise PackageError(f"{out_dir}: not a usable package folder name; pass a path like dist/mypackage")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PackageError(f"{out_dir.parent}: cannot create the output folder ({e.strerror or e}); "
                           "choose an --out under a writable folder") from e
    key = os.path.realpath(out_dir)
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield _lock_path(out_dir)
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    lock = _lock_path(out_dir)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise PackageError(f"{lock}: cannot create the build lock ({e.strerror or e}); "
                               "choose an --out under a writable folder") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PackageError(f"{out_dir}: another mlamoe build ({_lock_owner(lock)}) is writing this package "
                               f"now (lock {lock}); wait for it to finish or choose another --out") from None
        # the lock file may have been unlinked by its previous holder between our open and flock
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _HELD[key] = (fd, 1)
        _clean_stale(out_dir.parent, name, owner_locked=True)
        _clean_stale(out_dir.parent, f"{name}.tar.gz", owner_locked=True)
        yield lock
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: a waiter re-checks the inode (loop above)
        os.close(fd)


@contextlib.contextmanager
def work_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A scratch folder for intermediate stage files, beside `out_dir` and named like a staging
    folder (`.{name}.partial-<pid>-work-...`), so that a killed run's scratch is removed by the next
    build into the same place (or `mlamoe clean`) instead of filling $TMPDIR for ever."""
    out_dir = Path(out_dir)
    with package_lock(out_dir):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_PARTIAL}{os.getpid()}-work-", dir=out_dir.parent))
        try:
            yield tmp
        except BaseException as e:
            _note_written(e, tmp)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """`mlamoe clean`: remove every staging, work, old-package and temporary-archive folder or file
    under `folder` (not recursive) whose build is not running (its lock is free)."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    names = set()
    for entry in entries:
        for marker in (_PARTIAL, _OLD):
            if entry.startswith(".") and marker in entry:
                base = entry[1:entry.index(marker)]
                names.add(base[:-len(".tar.gz")] if base.endswith(".tar.gz") else base)
    for name in sorted(names):
        try:
            with package_lock(folder / name):
                pass  # the first acquisition cleans
        except PackageError:
            continue  # a live build holds it: its folders are not stale
        candidates = [folder / e for e in entries if e.startswith((f".{name}{_PARTIAL}", f".{name}{_OLD}",
                                                                    f".{name}.tar.gz{_PARTIAL}"))]
        removed += [p for p in candidates if not (p.exists() or p.is_symlink())]
    return removed


def is_partial_name(name: str) -> bool:
    """True for the names staging() uses for unfinished builds."""
    return name.startswith(".") and (_PARTIAL in name or _OLD in name)


@contextlib.contextmanager
def staging(out_dir: str | os.PathLike, force: bool = False, archive: bool = True) -> Iterator[Path]:
    """Yield a fresh folder beside `out_dir`; on success it atomically becomes `out_dir`, and (with
    `archive`, when the body wrote a manifest) `{out_dir}.tar.gz` is built from it first and recorded
    in the folder's manifest (`archive`: file, sha256, size), then renamed into place after the folder.

    Holds package_lock(out_dir) throughout. On any exception (KeyboardInterrupt included) the
    temporary folder and archive are removed, `out_dir` is left as it was (with force, the old package
    survives a failed build) and the exception re-raised.
    """
    out_dir = Path(out_dir)
    with package_lock(out_dir):
        if (out_dir.exists() or out_dir.is_symlink()) and not force:
            raise PackageError(f"{out_dir} exists; pass --force to replace it")
        parent = out_dir.parent
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_PARTIAL}{os.getpid()}-", dir=parent))
        tar_tmp: Path | None = None
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes 0o700; the package must be readable like any folder
            yield tmp
            if archive and (tmp / MANIFEST_NAME).is_file():
                tar_tmp = parent / f".{out_dir.name}.tar.gz{_PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
                _write_tarball(tmp, tar_tmp, out_dir.name)
                record_archive(tmp, tar_tmp, f"{out_dir.name}.tar.gz")
            _install(tmp, out_dir, force)
            if tar_tmp is not None:
                os.replace(tar_tmp, parent / f"{out_dir.name}.tar.gz")
        except BaseException as e:
            _note_written(e, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if tar_tmp is not None:
                with contextlib.suppress(OSError):
                    tar_tmp.unlink()
            raise


def _install(tmp: Path, out_dir: Path, force: bool) -> None:
    aside: Path | None = None
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise PackageError(f"{out_dir} exists (created while this build ran); pass --force to replace it")
        aside = out_dir.parent / f".{out_dir.name}{_OLD}{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(out_dir, aside)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if aside is not None:
            with contextlib.suppress(OSError):
                os.replace(aside, out_dir)  # put the old package back
        raise
    if aside is not None:
        _remove(aside)


# ------------------------------------------------------------------------------------- file table
def _scan(root: Path) -> tuple[list[str], list[str], list[str]]:
    """(dirs, files, problems) under root as sorted POSIX relative paths. Symlinks and special
    files are problems; nothing is followed."""
    dirs: list[str] = []
    files: list[str] = []
    problems: list[str] = []

    def walk(d: Path, rel: str) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            problems.append(f"{rel or '.'}: cannot be listed ({e.strerror or e})")
            return
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            if e.is_symlink():
                problems.append(f"{r}: is a symlink; a package holds only regular files "
                                "(copy the target in instead)")
            elif e.is_dir(follow_symlinks=False):
                dirs.append(r)
                walk(Path(e.path), r)
            elif e.is_file(follow_symlinks=False):
                files.append(r)
            else:
                problems.append(f"{r}: is not a regular file (device, fifo or socket); remove it")

    walk(Path(root), "")
    return sorted(dirs), sorted(files), problems


def file_table(root: str | os.PathLike) -> list[dict]:
    """Every regular file under root except the top-level manifest.json, sorted by path:
    [{"path": "onnx/decode.onnx", "sha256": hex, "size": bytes}, ...]."""
    root = Path(root)
    if not root.is_dir():
        raise PackageError(f"{root}: not a folder; a package is a folder of files")
    _, files, problems = _scan(root)
    if problems:
        raise PackageError(f"{root}: cannot be packaged:\n  " + "\n  ".join(problems), problems)
    table = []
    for rel in files:
        if rel == MANIFEST_NAME:
            continue
        p = root / rel
        table.append({"path": rel, "sha256": sha256_file(p), "size": p.stat().st_size})
    return table


# --------------------------------------------------------------------------------------- manifest
def _json_problem(value, where: str) -> str | None:
    """First value that strict, deterministic JSON cannot hold, named by its key path."""
    if value is None or isinstance(value, (bool, str, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} = {value!r} (store it as null or a string)"
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where} has a non-string key {k!r} (use str keys)"
            if (p := _json_problem(v, f"{where}.{k}" if where else k)) is not None:
                return p
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if (p := _json_problem(v, f"{where}[{i}]")) is not None:
                return p
        return None
    t = type(value)
    return f"{where} is a {t.__module__}.{t.__qualname__} (convert it to int/float/str/list/dict first)"


def write_manifest(root: str | os.PathLike, meta: dict) -> dict:
    """Write root/manifest.json = {"schema_version", **meta, "files": file_table(root)} with sorted
    keys and indent 2 (deterministic); return it."""
    root = Path(root)
    if not isinstance(meta, dict):
        raise PackageError(f"manifest metadata must be a dict, got {type(meta).__name__}")
    if "files" in meta:
        raise PackageError("manifest metadata has a 'files' key; it is computed by write_manifest, drop it")
    if meta.get("schema_version", MANIFEST_SCHEMA_VERSION) != MANIFEST_SCHEMA_VERSION:
        raise PackageError(f"manifest metadata says schema_version {meta['schema_version']!r}; this version "
                           f"writes {MANIFEST_SCHEMA_VERSION}, drop the key")
    if (p := _json_problem(meta, "")) is not None:
        raise PackageError(f"{root / MANIFEST_NAME}: metadata cannot be written as JSON: {p}")
    manifest = {"schema_version": MANIFEST_SCHEMA_VERSION, **meta, "files": file_table(root)}
    _write_manifest_json(root, manifest)
    return manifest


def _write_manifest_json(root: Path, manifest: dict) -> None:
    text = _manifest_text(manifest)
    tmp = root / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, root / MANIFEST_NAME)


def _manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _archived_manifest_bytes(root: Path) -> bytes:
    """root/manifest.json as the archive holds it: without the folder's `archive` record."""
    raw = (root / MANIFEST_NAME).read_bytes()
    try:
        manifest = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(manifest, dict) or "archive" not in manifest:
        return raw
    manifest.pop("archive")
    return _manifest_text(manifest).encode("utf-8")


def record_archive(root: str | os.PathLike, tar_path: str | os.PathLike, name: str) -> dict:
    """Add `archive` {file, sha256, size} to root/manifest.json: the .tar.gz built from this folder
    (whose own manifest.json, inside the archive, has no such key: it cannot hold its own hash)."""
    root = Path(root)
    manifest = read_manifest(root)
    manifest["archive"] = {"file": name, "sha256": sha256_file(tar_path), "size": Path(tar_path).stat().st_size}
    _write_manifest_json(root, manifest)
    return manifest["archive"]


def read_manifest(root: str | os.PathLike) -> dict:
    """Load and check root/manifest.json (schema version, a "files" list)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise PackageError(f"{path}: missing; {root} is not a package (build one with `mlamoe compile`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackageError(f"{path}: not valid JSON ({e}); the file is damaged, rebuild the package") from e
    if not isinstance(manifest, dict):
        raise PackageError(f"{path}: top level is a {type(manifest).__name__}, expected an object; rebuild the package")
    version = manifest.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise PackageError(f"{path}: schema_version is {version!r}, this mlamoe reads {MANIFEST_SCHEMA_VERSION}; "
                           "rebuild the package or use the mlamoe version that built it")
    if not isinstance(manifest.get("files"), list):
        raise PackageError(f"{path}: no 'files' list; the manifest is incomplete, rebuild the package")
    return manifest


# ---------------------------------------------------------------------------------------- tarball
def make_tarball(root: str | os.PathLike, tar_path: str | os.PathLike, arcname: str | None = None) -> Path:
    """Deterministic .tar.gz of `root` (see _write_tarball), written beside tar_path under a
    temporary name, then renamed into place."""
    root = Path(root)
    tar_path = Path(tar_path)
    if tar_path.resolve().is_relative_to(root.resolve()):
        raise PackageError(f"{tar_path}: inside the folder it archives ({root}); write it beside the folder")
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(tar_path.parent, tar_path.name)  # temp archives of killed runs
    tmp = tar_path.parent / f".{tar_path.name}{_PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _write_tarball(root, tmp, arcname or root.name)
        os.replace(tmp, tar_path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tar_path


# Members whose bytes gzip cannot shrink (weights: random-looking fp32/fp16/int8/fp8) are still
# stored inside the one gzip stream, but at level 0 they cost a copy instead of minutes of deflate.
_STORED_SUFFIXES = (".onnx", ".data", ".npy", ".om", ".bin", ".safetensors")


def _write_tarball(root: Path, tmp: Path, top: str) -> None:
    """Write the deterministic .tar.gz of `root` to `tmp`: one top-level folder `top`, sorted members,
    mtime 0, uid/gid 0, no owner names, modes 0o644/0o755, gzip header without name/mtime. Weight-like
    members (_STORED_SUFFIXES) are deflated at level 0 (stored), the rest at level 6; the stream stays
    one standard gzip member that every `tar xzf` reads."""
    root = Path(root)
    if not root.is_dir():
        raise PackageError(f"{root}: not a folder; make_tarball packs a package folder")
    if not top or "/" in top or top in (".", ".."):
        raise PackageError(f"{root}: {top!r} is not usable as the archive's top-level folder name")
    dirs, files, problems = _scan(root)
    if problems:
        raise PackageError(f"{root}: cannot be archived:\n  " + "\n  ".join(problems), problems)
    members = sorted([(d, True) for d in dirs] + [(f, False) for f in files])

    def info(name: str, is_dir: bool, size: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
        ti.mode = 0o755 if is_dir else 0o644
        ti.size = size
        ti.mtime = 0
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    with open(tmp, "wb") as raw, _LevelGzip(raw) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info(top, True))
        for rel, is_dir in members:
            if is_dir:
                tar.addfile(info(f"{top}/{rel}", True))
                continue
            if rel == MANIFEST_NAME:  # as it was before record_archive: an archive cannot hold its own hash
                data = _archived_manifest_bytes(root)
                tar.addfile(info(f"{top}/{rel}", False, len(data)), io.BytesIO(data))
                continue
            with open(root / rel, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                stored = rel.endswith(_STORED_SUFFIXES) and size >= _CHUNK
                if stored:
                    gz.set_level(0)
                tar.addfile(info(f"{top}/{rel}", False, size), f)
                if stored:
                    gz.set_level(6)
    os.chmod(tmp, 0o644)


class _LevelGzip(io.RawIOBase):
    """Write-only gzip stream (RFC 1952 header without name or mtime) whose deflate level can change
    between members. Python's zlib has no deflateParams, so a level change sync-flushes the current
    raw-deflate compressor (a byte-aligned, non-final block boundary) and continues with a new one:
    the concatenation is one valid deflate stream (a new compressor only refers back into its own
    output, which any decoder's window holds), closed by the last compressor's final block."""

    def __init__(self, raw, level: int = 6):
        super().__init__()
        self._raw = raw
        self._level = level
        self._z = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9)
        self._crc = 0
        self._size = 0
        raw.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # magic, deflate, no flags, mtime 0, OS unknown

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._size

    def set_level(self, level: int) -> None:
        if level != self._level:
            self._raw.write(self._z.flush(zlib.Z_SYNC_FLUSH))
            self._z = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9)
            self._level = level

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        self._raw.write(self._z.compress(data))
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._raw.write(self._z.flush(zlib.Z_FINISH))
            self._raw.write(struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF))
        super().close()


# ------------------------------------------------------------------------------------- extraction
def _member_parts(name: str) -> list[str] | None:
    """Path components of a member name, or None if absolute / has '..'."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return parts


def safe_extract(tar_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a package archive into dest and return the package root (dest/<top folder>).

    Every member is checked before anything is written: no absolute paths, no '..', nothing that
    resolves outside dest, only regular files and folders (no links, devices, fifos), exactly one
    top-level folder. tarfile's "data" filter then runs as a second line of defence."""
    tar_path = Path(tar_path)
    dest = Path(dest)
    where = str(tar_path)
    try:
        tar = tarfile.open(tar_path, mode="r:*")
    except FileNotFoundError as e:
        raise PackageError(f"{where}: does not exist") from e
    except (tarfile.TarError, OSError, EOFError) as e:
        raise PackageError(f"{where}: not a readable .tar.gz ({e}); the archive is damaged or truncated, "
                           "copy it again") from e
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise PackageError(f"{where}: archive is damaged or truncated ({e}); copy it again") from e
        dest.mkdir(parents=True, exist_ok=True)
        dest_real = os.path.realpath(dest)
        tops: set[str] = set()
        top_dirs: set[str] = set()
        seen: set[str] = set()
        keep: list[tarfile.TarInfo] = []
        for m in members:
            bad = f"{where}: refusing member {m.name!r}"
            parts = _member_parts(m.name)
            if parts is None:
                raise PackageError(f"{bad}: absolute path or '..' component would write outside the "
                                   "destination; this archive is not a package (or was tampered with)")
            target = os.path.realpath(os.path.join(dest_real, *parts)) if parts else dest_real
            if os.path.commonpath([dest_real, target]) != dest_real:
                raise PackageError(f"{bad}: resolves outside the destination {dest}")
            if m.issym() or m.islnk():
                raise PackageError(f"{bad}: is a {'symlink' if m.issym() else 'hardlink'} (to {m.linkname!r}); "
                                   "a package holds only regular files and folders")
            if not (m.isreg() or m.isdir()):
                raise PackageError(f"{bad}: is a device, fifo or other special file; "
                                   "a package holds only regular files and folders")
            if not parts:
                continue  # the "./" entry of tars made with `tar -C dir .`
            key = "/".join(parts)
            if key in seen:
                raise PackageError(f"{bad}: appears twice in the archive; a package lists each file once")
            seen.add(key)
            tops.add(parts[0])
            if len(parts) > 1 or m.isdir():
                top_dirs.add(parts[0])
            if len(parts) == 1 and not m.isdir():
                raise PackageError(f"{bad}: a file at the archive's top level; a package archive holds "
                                   "exactly one folder")
            keep.append(m)
        if len(tops) != 1:
            found = ", ".join(sorted(tops)[:5]) or "nothing"
            raise PackageError(f"{where}: expected exactly one top-level folder, found {len(tops)} ({found}); "
                               "archive the package folder itself (make_tarball / `tar czf x.tar.gz pkg/`)")
        top = tops.pop()
        root = dest / top
        if root.exists() or root.is_symlink():
            raise PackageError(f"{root}: already exists; extract into an empty folder or remove it first")
        try:
            tar.extractall(dest, members=keep, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise PackageError(f"{where}: extraction failed ({e}); the archive is damaged or unsafe") from e
    return root


# ----------------------------------------------------------------------------------- verification
def _noop() -> None:
    pass


def open_package(path: str | os.PathLike, tmp_root: str | os.PathLike | None = None
                 ) -> tuple[Path, dict, Callable[[], None]]:
    """A package folder or .tar.gz -> (root, manifest, cleanup). An archive is safely extracted into
    a new temporary folder (under tmp_root, default $TMPDIR) that cleanup() removes. Hashes are not
    checked here: use verify_package."""
    path = Path(path)
    if is_partial_name(path.name):
        raise PackageError(f"{path}: an unfinished build left by an interrupted run, not a package; "
                           "delete it and rerun compile")
    if path.is_dir():
        return path, read_manifest(path), _noop
    if not path.exists():
        raise PackageError(f"{path}: does not exist; pass a package folder or its .tar.gz")
    if not path.is_file():
        raise PackageError(f"{path}: neither a package folder nor a .tar.gz")
    tmp = Path(tempfile.mkdtemp(prefix="mlamoe-package-", dir=tmp_root))

    def cleanup() -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        root = safe_extract(path, tmp)
        return root, read_manifest(root), cleanup
    except BaseException:
        cleanup()
        raise


def _check_files(root: Path, manifest: dict) -> list[str]:
    problems: list[str] = []
    listed: set[str] = set()
    for i, entry in enumerate(manifest["files"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)):
            problems.append(f"{MANIFEST_NAME}: files[{i}] is malformed (needs path, sha256, size); rebuild the package")
            continue
        rel, want_sha, want_size = entry["path"], entry["sha256"].lower(), entry["size"]
        parts = _member_parts(rel)
        if not parts or "/".join(parts) != rel or "\\" in rel:
            problems.append(f"{rel}: unsafe or non-normal path in {MANIFEST_NAME}; the manifest was tampered with")
            continue
        if rel in listed:
            problems.append(f"{rel}: listed twice in {MANIFEST_NAME}; rebuild the package")
            continue
        listed.add(rel)
        p = root / rel
        if p.is_symlink() or not p.exists():
            if not p.is_symlink():
                problems.append(f"{rel}: missing (listed in {MANIFEST_NAME}): the package is incomplete; "
                                "copy it again or rebuild it")
            continue  # a symlink is reported by the scan below
        if not p.is_file():
            problems.append(f"{rel}: not a regular file (listed in {MANIFEST_NAME} as one); rebuild the package")
            continue
        size = p.stat().st_size
        if size != want_size:
            problems.append(f"{rel}: size mismatch (expected {want_size} bytes, got {size}): the file was "
                            "truncated or modified after packaging")
            continue
        got = sha256_file(p)
        if got != want_sha:
            problems.append(f"{rel}: sha256 mismatch (expected {want_sha[:12]}.., got {got[:12]}..): the file "
                            "was modified after packaging")
    _, files, scan_problems = _scan(root)
    problems.extend(scan_problems)
    for rel in files:
        if rel != MANIFEST_NAME and rel not in listed:
            problems.append(f"{rel}: unlisted file (present but not in {MANIFEST_NAME}): it was added after "
                            "packaging; remove it or rebuild the package")
    return problems


_FILE_LIKE = re.compile(r"[\w.\-/]*/[\w.\-/]+|[\w.\-]+\.(npy|onnx|data|json|py|sh|txt|md)")
_NOT_REFERENCES = ("files", "stages", "model", "toolchain", "verification", "quantization_choice", "archive")
_SYMBOLS = ("io.cache",)  # shapes and length rules ("past//4"), never paths


def reference_problems(manifest: dict) -> list[str]:
    """Paths the manifest points at (golden data, graphs, runtime, ascend scripts, reports) that are not
    among its hashed files: a damaged or edited manifest must not send a reader to an unchecked file
    (or outside the package)."""
    listed = {f.get("path") for f in manifest.get("files", []) if isinstance(f, dict)}
    problems: list[str] = []

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if not (where == "" and k in _NOT_REFERENCES or f"{where}.{k}" in _SYMBOLS):
                    walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, str) and " " not in value and _FILE_LIKE.fullmatch(value) and value not in listed:
            problems.append(f"{MANIFEST_NAME}: {where} = {value!r} is not one of the package's hashed files; the "
                            "manifest was damaged or edited: copy the package again or rebuild it")

    walk(manifest, "")
    return problems


def archive_check(path: str | os.PathLike) -> tuple[bool, str]:
    """(ok, line) for the archive beside a package: a folder's manifest records its .tar.gz (name,
    sha256, size); a .tar.gz is checked against the folder beside it when that folder is there."""
    path = Path(path)
    if path.is_dir():
        folder, manifest = path, read_manifest(path)
        rec = manifest.get("archive")
        if not isinstance(rec, dict) or not isinstance(rec.get("file"), str) or "/" in rec["file"]:
            return True, "note archive: none recorded in manifest.json (built before archives were recorded)"
        tar = folder.parent / rec["file"]
    else:
        tar, folder = path, path.with_name(path.name[:-len(".tar.gz")] if path.name.endswith(".tar.gz") else path.stem)
        rec = None
        if folder.is_dir() and (folder / MANIFEST_NAME).is_file():
            with contextlib.suppress(PackageError):
                rec = read_manifest(folder).get("archive")
    if not tar.is_file():
        return True, f"note archive: {tar.name} is not beside the folder (the folder alone is a complete package)"
    got = sha256_file(tar)
    if not isinstance(rec, dict):
        return True, f"note archive: {tar.name} sha256 {got} (no folder beside it records it)"
    if got != rec.get("sha256"):
        return False, (f"FAIL archive: {tar.name} sha256 {got[:12]}.. is not the {str(rec.get('sha256'))[:12]}.. "
                       f"recorded in {folder.name}/{MANIFEST_NAME}: it was rebuilt, modified or belongs to another "
                       "build; copy the pair again")
    return True, f"ok   archive: {tar.name} sha256 {got} matches {folder.name}/{MANIFEST_NAME}"


def _weights_users(problems: list[str], manifest: dict) -> list[str]:
    """A problem with a package's shared weights file (pipeline/weights_file.py: the manifest's io.weights or
    ascend.weights) also names the graphs that read it: every one of them is damaged with it."""
    sections = [s for s in (manifest.get("io", {}).get("weights"), manifest.get("ascend", {}).get("weights"))
                if isinstance(s, dict) and isinstance(s.get("file"), str)]
    out = []
    for p in problems:
        for sec in sections:
            if p.startswith(f"{sec['file']}: ") and isinstance(sec.get("graphs"), list):
                p += (f" [the shared weights of {', '.join(map(str, sec['graphs']))}: every one of them reads it; "
                      "copy the package again or rebuild it]")
        out.append(p)
    return out


def verify_package(path: str | os.PathLike, tmp_root: str | os.PathLike | None = None) -> list[str]:
    """Re-hash every file of a package folder or .tar.gz against its manifest. Returns [] when all
    match; otherwise raises PackageError listing each problem by file (also in `.problems`)."""
    root, manifest, cleanup = open_package(path, tmp_root)
    try:
        problems = _weights_users(_check_files(root, manifest), manifest) + reference_problems(manifest)
    finally:
        cleanup()
    if problems:
        raise PackageError(f"{path}: package verification failed ({len(problems)} problem"
                           f"{'s' if len(problems) != 1 else ''}):\n  " + "\n  ".join(problems), problems)
    return []
