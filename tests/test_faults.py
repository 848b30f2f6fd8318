"""Faults a deployment pipeline meets: rebuilds that must give the same archive, compiles killed at
any point, two compiles racing for one --out, a disk that fills up, a damaged stage cache.

References: the first build's bytes (a rebuild must reproduce them), `verify_package` (hashes) and
the golden re-run of `mlamoe verify`, the filesystem itself (what is left behind).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.compile import compile_package
from pipeline.package import PackageError, read_manifest, verify_package
from pipeline.verify import verify_full

REPO = Path(__file__).resolve().parent.parent
QUIET = {"progress": lambda m: None}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _leftovers(parent: Path, name: str) -> list[str]:
    """What a build of `name` may leave beside it besides the package, its archive and build log."""
    keep = {name, f"{name}.tar.gz", f"{name}.build.json"}
    return sorted(e for e in os.listdir(parent) if e.startswith((name, f".{name}")) and e not in keep)


@pytest.fixture(scope="module")
def cache_dir(stage_cache):
    return stage_cache


def test_ascend_rebuild_gives_the_same_archive(tmp_path, cache_dir):
    """Two builds of the tiny ascend package, the second recomputing every stage: every file and the
    .tar.gz are byte-identical, and the folder's manifest records the archive's sha256."""
    a = compile_package("tiny", "ascend", tmp_path / "a" / "tiny", cache_dir=cache_dir, **QUIET)
    b = compile_package("tiny", "ascend", tmp_path / "b" / "tiny", use_cache=False, **QUIET)
    files = lambda r: {p.relative_to(r).as_posix(): _sha(p) for p in sorted(r.rglob("*")) if p.is_file()}  # noqa: E731
    assert files(a) == files(b)
    tar_a, tar_b = a.parent / "tiny.tar.gz", b.parent / "tiny.tar.gz"
    assert _sha(tar_a) == _sha(tar_b) == read_manifest(b)["archive"]["sha256"]
    ok, lines = verify_full(tar_b)
    assert ok and any(line.startswith("ok   archive: tiny.tar.gz") for line in lines), lines


def _compile_cli(out: Path, cache: Path, *extra) -> subprocess.Popen:
    env = {**os.environ, "MLAMOE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "compile", "--model", "tiny", "--target", "ort-cpu",
                             "--out", str(out), *extra], cwd=REPO, env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _kill_at(out: Path, cache: Path, marker: str, delay: float) -> list[str]:
    """Start a compile, SIGKILL it `delay` s after its progress prints `marker`; return what it printed."""
    # a stage restored from the cache prints no "running": recompute when the marker is a stage start
    proc = _compile_cli(out, cache, "--force", *(("--no-cache",) if "running" in marker else ()))
    seen, deadline = [], time.time() + 300
    for line in proc.stderr:
        seen.append(line)
        if marker in line or time.time() > deadline:
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert any(marker in line for line in seen), seen
    return seen


@pytest.mark.parametrize("marker,delay", [("[package]", 0.0)])
def test_killed_compile_then_rerun_leaves_no_staging_and_a_correct_package(tmp_path, cache_dir, marker, delay):
    """kill -9 mid-passes and at the very end (while the archive is written and the folder renamed),
    then compile again: no staging/scratch folder or temporary archive is left, and the package the
    second compile made verifies (hashes, archive, golden data). The stage cache survives the kill."""
    out = tmp_path / "tiny"
    _kill_at(out, cache_dir, marker, delay)
    # whatever the kill left (a package or not), its scratch is named for cleaning, never taken for a package
    for name in _leftovers(tmp_path, "tiny"):
        assert name.startswith((".tiny.partial-", ".tiny.tar.gz.partial-", ".tiny.lock")), name
    rerun = _compile_cli(out, cache_dir, "--force")
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert _leftovers(tmp_path, "tiny") == []
    ok, lines = verify_full(out)
    assert ok and any(line.startswith("ok   archive:") for line in lines), lines


@pytest.mark.slow
@pytest.mark.parametrize("marker,delay", [("[load]", 0.5), ("[export] running", 2.0), ("[passes/moe-ort-fused] running", 0.3), ("[export] done", 0.0),
                                          ("[passes/latent-kv-fusion] done", 0.1), ("[target/ort-cpu] running", 0.2),
                                          ("[package]", 0.05), ("[package]", 0.2)])
def test_killed_compile_at_more_points(tmp_path, cache_dir, marker, delay):
    test_killed_compile_then_rerun_leaves_no_staging_and_a_correct_package(tmp_path, cache_dir, marker, delay)


def test_two_compiles_racing_for_one_out_give_one_package_and_one_clear_error(tmp_path, cache_dir):
    """Started together into the same --out: one builds the package, the other stops at once with one
    clear line naming the other build; nothing of the loser mixes into the winner's package."""
    out = tmp_path / "tiny"
    first = _compile_cli(out, cache_dir, "--no-cache")  # every stage recomputed: the second starts mid-build
    for line in first.stderr:  # it holds the lock from before loading the model
        if "[load]" in line:
            break
    second = _compile_cli(out, cache_dir)
    _, err2 = second.communicate(timeout=300)
    _, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1
    assert second.returncode == 2
    errors = [line for line in err2.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "another mlamoe build (pid" in errors[0] and "Traceback" not in err2, err2
    assert verify_full(out)[0] and _leftovers(tmp_path, "tiny") == []


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: a real filesystem that fills up (needs root and mount; skipped otherwise)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode}); the injected "
                    "ENOSPC test of the slow tier covers the error path there")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_gives_one_clear_error_and_leaves_nothing(small_disk, cache_dir):
    out = small_disk / "dist" / "tiny"
    with pytest.raises(PackageError) as e:
        compile_package("tiny", "ort-cpu", out, cache_dir=cache_dir, **QUIET)
    msg = str(e.value)
    assert "no space left on the device" in msg and str(small_disk) in msg, msg
    assert "the build had written" in msg and "free there now" in msg and "a build needs about" in msg, msg
    assert msg.startswith(f"{small_disk}/dist") and f"Nothing was left at {out}" in msg
    assert os.listdir(out.parent) == []  # no package, no archive, no staging or scratch folder, no lock


@pytest.mark.slow
def test_injected_enospc_while_archiving_fails_clearly(tmp_path, cache_dir, monkeypatch):
    """The same failure injected at the last write (the archive), for machines that cannot mount."""
    import pipeline.package as package

    def full(root, tmp, top):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setattr(package, "_write_tarball", full)
    out = tmp_path / "dist" / "tiny"
    with pytest.raises(PackageError, match=r"no space left on the device .* the build had written \d"):
        compile_package("tiny", "ort-cpu", out, cache_dir=cache_dir, **QUIET)
    assert os.listdir(out.parent) == []


def test_damaged_cache_entry_is_rebuilt_not_trusted(tmp_path, cache_dir):
    """A stage-cache file changed after it was stored (disk fault, a kill during an old non-atomic
    write) is detected on read: the entry is dropped, the stage rebuilt, the package the same."""
    import shutil
    cache = tmp_path / "cache"
    compile_package("tiny", "ort-cpu", tmp_path / "warm" / "tiny", cache_dir=cache_dir, **QUIET)
    shutil.copytree(cache_dir, cache)  # the run's cache, damaged only here
    first = compile_package("tiny", "ort-cpu", tmp_path / "a" / "tiny", cache_dir=cache, **QUIET)
    files = sorted(p for p in cache.rglob("files/*.onnx*") if p.is_file())
    assert files
    for victim in files:  # the run's cache holds other models' entries too: damage every graph in it
        victim.write_bytes(victim.read_bytes()[:-7] + b"damaged")
    stale = cache / "ab" / f".tmp-999999999-x"  # a writer killed mid-store: never read as an entry
    (stale / "files").mkdir(parents=True)
    messages: list[str] = []
    again = compile_package("tiny", "ort-cpu", tmp_path / "b" / "tiny", cache_dir=cache, progress=messages.append)
    assert any("is damaged" in m and "rebuilding" in m for m in messages), messages
    assert _sha(first.parent / "tiny.tar.gz") == _sha(again.parent / "tiny.tar.gz")
    log = json.loads((again.parent / "tiny.build.json").read_text())
    assert [s["name"] for s in log["stages"] if s["cached"]] == []  # every damaged entry rebuilt, none trusted
    from pipeline.stages import clean_cache_tmp
    assert clean_cache_tmp(cache) == [stale] and not stale.exists()
    verify_package(again)
