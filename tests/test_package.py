"""pipeline.package: atomic staging, manifest, deterministic tar.gz, verification, safe extraction."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from pipeline.package import (MANIFEST_SCHEMA_VERSION, PackageError, file_table, make_tarball, open_package,
                              read_manifest, safe_extract, sha256_file, staging, verify_package, write_manifest)

REPO = Path(__file__).resolve().parents[1]

FILES = {
    "README.md": b"# tiny package\n",
    "onnx/decode.onnx": bytes(range(256)) * 5,
    "onnx/prefill.onnx": b"\x08\x07" + b"prefill" * 100,
    "golden/input_ids.npy": b"\x93NUMPY" + bytes(64),
    "reports/parity.json": b'{"cosine": 0.9999}\n',
    "ascend/atc.sh": b"#!/bin/sh\natc --model=onnx/decode.onnx\n",
}
META = {"model": {"name": "tiny", "checkpoint_sha256": "0" * 64}, "target": "ort-cpu",
        "stages": [{"name": "export", "parity": {"max_abs": 1e-6}}]}


def _write_files(root: Path, files=FILES, order=None) -> None:
    for rel in order or files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(files[rel])


def _build(out: Path, force: bool = False, order=None, tar: bool = True) -> Path:
    with staging(out, force=force, archive=tar) as tmp:
        _write_files(tmp, order=order)
        write_manifest(tmp, META)
    return out


def _leftovers(parent: Path, name: str = "pkg") -> list[str]:
    return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}."))


@pytest.fixture
def pkg(tmp_path) -> Path:
    return _build(tmp_path / "dist" / "pkg")


# ---------------------------------------------------------------------------------------- staging
def test_staging_success_renames(tmp_path):
    out = tmp_path / "dist" / "pkg"
    with staging(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".pkg.partial-")
        assert not out.exists()
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    assert not tmp.exists()
    assert _leftovers(out.parent) == []
    assert os.stat(out).st_mode & 0o755 == 0o755


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_staging_exception_leaves_nothing(tmp_path, exc):
    out = tmp_path / "pkg"
    with pytest.raises(exc):
        with staging(out) as tmp:
            (tmp / "half.onnx").write_bytes(b"half")
            raise exc("stage failed")
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_existing_out_dir_refused_without_force(tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "old.txt").write_text("old")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(PackageError, match=r"exists; pass --force to replace it"):
        with staging(out):
            pytest.fail("the body must not run")
    assert sorted(os.listdir(tmp_path)) == before
    assert (out / "old.txt").read_text() == "old"


def test_force_replaces_existing(tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staging(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_force_failed_build_keeps_old_package(tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with staging(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise ValueError("parity budget exceeded")
    assert sorted(os.listdir(out)) == ["old.txt"]
    assert _leftovers(tmp_path) == []


def test_stale_partial_removed_and_build_succeeds(tmp_path):
    """Under the package lock no live build can own `.pkg.partial-*`: all of them are stale, even one
    whose pid is alive (pids are reused); another package's are left alone."""
    stale = tmp_path / ".pkg.partial-xyz"
    (stale / "onnx").mkdir(parents=True)
    (stale / "onnx" / "decode.onnx").write_bytes(b"half written")
    dead_old = tmp_path / ".pkg.old-999999999-abcd"  # pid that cannot be alive
    dead_old.mkdir()
    reused = tmp_path / f".pkg.partial-{os.getpid()}-reused"  # a live pid, but not holding the lock
    reused.mkdir()
    stale_tar = tmp_path / ".pkg.tar.gz.partial-999999999-ab"
    stale_tar.write_bytes(b"half an archive")
    other = tmp_path / ".other.partial-xyz"  # another package's partial: not ours to touch
    other.mkdir()
    with pytest.raises(PackageError, match="unfinished build"):
        verify_package(stale)
    _build(tmp_path / "pkg", tar=False)
    assert not stale.exists() and not dead_old.exists() and not reused.exists() and not stale_tar.exists()
    assert other.exists()
    assert verify_package(tmp_path / "pkg") == []


def _hold_lock(out: Path):
    """A child process holding package_lock(out) until its stdin closes."""
    child = textwrap.dedent(f"""
        import sys, types
        sys.path.insert(0, {str(REPO)!r})
        m = types.ModuleType("models"); m.__path__ = [{str(REPO / "models")!r}]; sys.modules["models"] = m
        from pipeline.package import package_lock, staging
        with package_lock({str(out)!r}), staging({str(out)!r}, archive=False) as tmp:
            (tmp / "half.onnx").write_bytes(b"being written")
            print("locked", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_concurrent_build_of_same_out_fails_clearly_and_leaves_the_live_one_alone(tmp_path):
    out = tmp_path / "pkg"
    proc = _hold_lock(out)
    try:
        live = _leftovers(tmp_path)
        assert any(n.startswith(".pkg.partial-") for n in live)
        with pytest.raises(PackageError, match=rf"another mlamoe build \(pid {proc.pid}\) is writing this package"):
            _build(out)
        from pipeline.package import clean_stale
        assert clean_stale(tmp_path) == []  # a live build's folders are not stale
        assert _leftovers(tmp_path) == live and not out.exists()
        _build(tmp_path / "other")  # another --out in the same folder is not blocked
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert [n for n in _leftovers(tmp_path) if not n.startswith(".pkg.partial-")] == []
    assert (out / "half.onnx").is_file()  # the live build finished normally
    _build(out, force=True)  # the lock is free again
    assert _leftovers(tmp_path) == [] and verify_package(out) == []


def test_clean_removes_leftovers_of_killed_builds_only(tmp_path):
    from pipeline.package import clean_stale
    for name in (".a.partial-999999999-x", ".a.partial-999999999-work-y", ".b.old-999999999-z"):
        (tmp_path / name).mkdir()
    (tmp_path / ".c.tar.gz.partial-999999999-q").write_bytes(b"x")
    (tmp_path / "keep").mkdir()
    removed = sorted(p.name for p in clean_stale(tmp_path))
    assert removed == [".a.partial-999999999-work-y", ".a.partial-999999999-x", ".b.old-999999999-z",
                       ".c.tar.gz.partial-999999999-q"]
    assert sorted(os.listdir(tmp_path)) == ["keep"]


def test_sigkill_mid_build_leaves_no_package_and_rerun_succeeds(tmp_path):
    out = tmp_path / "pkg"
    # Load models.errors without models/__init__ (which imports torch) so the child starts fast.
    child = textwrap.dedent(f"""
        import os, signal, sys, types
        sys.path.insert(0, {str(REPO)!r})
        m = types.ModuleType("models"); m.__path__ = [{str(REPO / "models")!r}]; sys.modules["models"] = m
        from pipeline.package import staging
        with staging({str(out)!r}) as tmp:
            (tmp / "decode.onnx").write_bytes(b"half written")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    assert not out.exists()
    partials = [n for n in _leftovers(tmp_path) if n != ".pkg.lock"]  # a dead holder's lock file is free
    assert len(partials) == 1 and partials[0].startswith(".pkg.partial-")  # the kill really skipped cleanup
    with pytest.raises(PackageError):
        verify_package(tmp_path / partials[0])
    _build(out, tar=False)
    assert _leftovers(tmp_path) == []
    assert verify_package(out) == []


# --------------------------------------------------------------------------------------- manifest
def test_manifest_lists_every_file_with_hash_and_size(pkg):
    manifest = json.loads((pkg / "manifest.json").read_text())
    expected = sorted(({"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                       for rel, data in FILES.items()), key=lambda e: e["path"])
    assert manifest["files"] == expected
    assert manifest["schema_version"] == MANIFEST_SCHEMA_VERSION == 1
    assert manifest["model"] == META["model"] and manifest["stages"] == META["stages"]
    assert (pkg / "manifest.json").read_text() == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    assert read_manifest(pkg) == manifest
    assert file_table(pkg) == expected
    assert sha256_file(pkg / "onnx/decode.onnx") == hashlib.sha256(FILES["onnx/decode.onnx"]).hexdigest()


def test_two_builds_are_byte_identical(tmp_path):
    a = _build(tmp_path / "one" / "pkg")
    b = _build(tmp_path / "two" / "pkg", order=list(reversed(FILES)))
    for p in (b / rel for rel in FILES):  # different mtimes must not matter
        os.utime(p, (1_000_000, 1_000_000))
    make_tarball(b, b.parent / "pkg.tar.gz")
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    ta, tb = (a.parent / "pkg.tar.gz").read_bytes(), (b.parent / "pkg.tar.gz").read_bytes()
    assert ta == tb
    assert ta[4:8] == b"\0\0\0\0" and not ta[3] & 0x08  # gzip: mtime 0, no FNAME
    with tarfile.open(a.parent / "pkg.tar.gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == "pkg" and names == sorted(names)
    assert {n for n in names} >= {f"pkg/{rel}" for rel in FILES} | {"pkg/manifest.json"}
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        assert m.mode == (0o755 if m.isdir() else 0o644)


def test_manifest_rejects_non_json_metadata(tmp_path):
    (tmp_path / "a").write_text("a")
    with pytest.raises(PackageError, match=r"stages\[0\]\.cosine"):
        write_manifest(tmp_path, {"stages": [{"cosine": float("nan")}]})
    with pytest.raises(PackageError, match="files"):
        write_manifest(tmp_path, {"files": []})
    assert not (tmp_path / "manifest.json").exists()


def test_file_table_refuses_symlink(tmp_path):
    (tmp_path / "real.onnx").write_bytes(b"x")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "real.onnx")
    with pytest.raises(PackageError, match="link.onnx: is a symlink"):
        file_table(tmp_path)


@pytest.mark.parametrize("content, match", [
    (None, "missing"),
    (b"{not json", "not valid JSON"),
    (json.dumps({"schema_version": 99, "files": []}).encode(), "schema_version is 99"),
    (json.dumps({"schema_version": 1}).encode(), "no 'files' list"),
])
def test_read_manifest_errors(tmp_path, content, match):
    if content is not None:
        (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(PackageError, match=match) as e:
        read_manifest(tmp_path)
    assert "manifest.json" in str(e.value)


# ----------------------------------------------------------------------------------- verification
def test_verify_good_folder_and_tarball(pkg):
    assert verify_package(pkg) == []
    assert verify_package(pkg.parent / "pkg.tar.gz") == []
    root, manifest, cleanup = open_package(pkg.parent / "pkg.tar.gz")
    folder = read_manifest(pkg)
    record = folder.pop("archive")  # the folder's manifest records the archive; the archived one cannot
    assert root.name == "pkg" and manifest == folder
    assert record == {"file": "pkg.tar.gz", "size": (pkg.parent / "pkg.tar.gz").stat().st_size,
                      "sha256": hashlib.sha256((pkg.parent / "pkg.tar.gz").read_bytes()).hexdigest()}
    cleanup()
    assert not root.exists()


def test_archive_rebuilt_from_the_folder_is_the_recorded_one(pkg, tmp_path):
    """make_tarball of a finished folder gives the very archive staging recorded (the folder's
    `archive` record is left out of the archived manifest), so a hand-off can be re-archived and checked."""
    again = make_tarball(pkg, tmp_path / "again.tar.gz", arcname="pkg")
    assert again.read_bytes() == (pkg.parent / "pkg.tar.gz").read_bytes()


def test_archive_check_catches_a_replaced_archive(pkg):
    from pipeline.package import archive_check
    ok, line = archive_check(pkg)
    assert ok and line.startswith("ok   archive: pkg.tar.gz")
    ok, line = archive_check(pkg.parent / "pkg.tar.gz")
    assert ok and "matches pkg/manifest.json" in line
    tar = pkg.parent / "pkg.tar.gz"
    data = bytearray(tar.read_bytes())
    data[-20] ^= 1  # inside the deflate stream's last block: the archive is no longer the recorded one
    tar.write_bytes(bytes(data))
    for p in (pkg, tar):
        ok, line = archive_check(p)
        assert not ok and "FAIL archive: pkg.tar.gz sha256" in line and "recorded in pkg/manifest.json" in line
    tar.unlink()
    ok, line = archive_check(pkg)
    assert ok and "not beside the folder" in line


def test_weights_are_stored_and_the_rest_compressed(tmp_path):
    """Large weight-like members go into the gzip stream at level 0 (random bytes do not shrink),
    the rest at level 6; the archive stays standard (tarfile and gzip read it) and exact."""
    import numpy as np
    out = tmp_path / "w"
    with staging(out) as tmp:
        (tmp / "onnx").mkdir()
        np.random.default_rng(0).standard_normal(1 << 19).astype(np.float32).tofile(tmp / "onnx" / "w.onnx.data")
        (tmp / "README.md").write_text("same line\n" * 50_000)
        write_manifest(tmp, META)
    tar = tmp_path / "w.tar.gz"
    raw = gzip.decompress(tar.read_bytes())
    weights = (out / "onnx" / "w.onnx.data").stat().st_size
    text = (out / "README.md").stat().st_size
    assert weights < tar.stat().st_size < weights + text / 50 + 64 * 1024  # weights stored, text deflated
    with tarfile.open(tar) as t:
        assert t.extractfile("w/onnx/w.onnx.data").read() == (out / "onnx" / "w.onnx.data").read_bytes()
        assert t.extractfile("w/README.md").read() == (out / "README.md").read_bytes()
    assert len(raw) % 512 == 0


def _flip(path: Path, at: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", sorted(FILES))
def test_flipped_byte_names_exactly_that_file(pkg, rel):
    _flip(pkg / rel)
    with pytest.raises(PackageError) as e:
        verify_package(pkg)
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith(f"{rel}: sha256 mismatch (expected ")
    assert "modified after packaging" in str(e.value)
    for other in set(FILES) - {rel}:
        assert other not in str(e.value)


@pytest.mark.parametrize("rel", ["onnx/decode.onnx", "reports/parity.json"])
def test_flipped_byte_in_tarball_names_that_file(pkg, tmp_path, rel):
    copy = tmp_path / "copy" / "pkg"
    copy.parent.mkdir()
    safe_extract(pkg.parent / "pkg.tar.gz", copy.parent)
    _flip(copy / rel)
    tar = make_tarball(copy, tmp_path / "tampered.tar.gz")
    with pytest.raises(PackageError) as e:
        verify_package(tar)
    assert [p.split(":")[0] for p in e.value.problems] == [rel]


def test_missing_unlisted_and_resized_files_reported(pkg):
    (pkg / "golden/input_ids.npy").unlink()
    (pkg / "onnx/extra.bin").write_bytes(b"sneaky")
    with open(pkg / "README.md", "ab") as f:
        f.write(b"appended")
    with pytest.raises(PackageError) as e:
        verify_package(pkg)
    problems = sorted(e.value.problems)
    assert len(problems) == 3
    assert problems[0].startswith("README.md: size mismatch")
    assert problems[1].startswith("golden/input_ids.npy: missing")
    assert problems[2].startswith("onnx/extra.bin: unlisted file")


# ------------------------------------------------------------------------------------- extraction
def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"evil") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = 0o755
    return ti, None


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = target
    return ti, None


def _chr(name: str) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.CHRTYPE
    ti.devmajor, ti.devminor = 1, 3
    return ti, None


@pytest.mark.parametrize("members, match", [
    ([_dir("pkg"), _file("pkg/ok"), _file("../evil")], "'../evil'"),
    ([_dir("pkg"), _file("pkg/../../evil")], "'pkg/../../evil'"),
    ([_dir("pkg"), _file("/abs/evil")], "'/abs/evil'"),
    ([_dir("pkg"), _link("pkg/evil", "/etc/passwd")], "'pkg/evil': is a symlink"),
    ([_dir("pkg"), _file("pkg/a"), _link("pkg/evil", "pkg/a", tarfile.LNKTYPE)], "'pkg/evil': is a hardlink"),
    ([_dir("pkg"), _chr("pkg/evil")], "'pkg/evil': is a device"),
    ([_dir("pkg"), _file("pkg/a"), _dir("evil"), _file("evil/b")], "exactly one top-level folder"),
    ([_file("evil")], "'evil': a file at the archive's top level"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device", "two-tops", "top-file"])
def test_safe_extract_refuses(tmp_path, members, match):
    work = tmp_path / "work"
    work.mkdir()
    tar = work / "bad.tar.gz"
    tar.write_bytes(_tar_bytes(members))
    dest = work / "dest"
    with pytest.raises(PackageError, match=match) as e:
        safe_extract(tar, dest)
    assert str(tar) in str(e.value)
    assert sorted(os.listdir(work)) == ["bad.tar.gz", "dest"]
    assert os.listdir(dest) == []  # refused before anything was written
    assert sorted(os.listdir(tmp_path)) == ["work"]
    assert not Path("/abs/evil").exists()
    with pytest.raises(PackageError):
        verify_package(tar)


def test_safe_extract_roundtrip_and_existing_root_refused(pkg, tmp_path):
    dest = tmp_path / "out"
    root = safe_extract(pkg.parent / "pkg.tar.gz", dest)
    assert root == dest / "pkg"
    assert {rel: (root / rel).read_bytes() for rel in FILES} == FILES
    assert verify_package(root) == []
    with pytest.raises(PackageError, match="already exists"):
        safe_extract(pkg.parent / "pkg.tar.gz", dest)


def test_not_a_package(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(gzip.compress(b"not a tar at all" * 50))
    with pytest.raises(PackageError, match="junk.tar.gz"):
        verify_package(junk)
    with pytest.raises(PackageError, match="does not exist"):
        verify_package(tmp_path / "nope")
    with pytest.raises(PackageError, match="manifest.json: missing"):
        verify_package(tmp_path)
    with pytest.raises(PackageError, match="inside the folder"):
        make_tarball(tmp_path, tmp_path / "x.tar.gz")


def test_save_graph_inlines_weights_loaded_from_another_files_external_data(tmp_path, monkeypatch):
    """A large graph loaded by ir.load keeps its weights as references to its .onnx.data; after a pass makes
    it small, save_graph must write the weights into the new file, not a reference to a data file that is
    not beside it (seen: medium's fp8 graphs, built from the saved fp32 graphs, failed ONNX's checker)."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from pipeline import export
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"])], "g", [h.make_tensor_value_info("x", TP.FLOAT, [1, 64])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [1, 64])], initializer=[nh.from_array(w, "w")])
    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 1000)  # 16 KiB of weights: "large"
    big = export.save_graph(ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 20)], ir_version=10)),
                            tmp_path / "a" / "m.onnx")
    assert [p.name for p in big] == ["m.onnx", "m.onnx.data"]
    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 10**9)
    small = export.save_graph(ir.load(tmp_path / "a" / "m.onnx"), tmp_path / "b" / "m.onnx")
    assert [p.name for p in small] == ["m.onnx"] and not (tmp_path / "b" / "m.onnx.data").exists()
    np.testing.assert_array_equal(nh.to_array(onnx.load(str(small[0])).graph.initializer[0]), w)


def test_manifest_pointing_outside_its_hashed_files_is_refused(pkg):
    """A damaged or edited manifest must not send verify/generate to an unchecked file or outside the package."""
    m = json.loads((pkg / "manifest.json").read_text())
    m["golden"] = {"cases": [{"inputs": {"ids": "../../outside.npy"}, "outputs": {"logits": "golden/input_ids.npy"}}]}
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match=r"golden.cases\[0\].inputs.ids = '../../outside.npy' is not one of the "
                                           r"package's hashed files"):
        verify_package(pkg)
