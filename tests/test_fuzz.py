"""Fuzzing what nobody writes by hand: randomly corrupted checkpoints (safetensors headers and payloads,
config.json, model.safetensors.index.json) and packages (manifest.json, ONNX protobufs).

Every outcome must be success with correct results or one clear error (an MlamoeError in the API,
exit 2 with one `error:` line in the CLI): never a traceback, a hang, a write outside the folders
under test, or memory growing past a bound. The fast suite runs a seeded, bounded number of cases
(hypothesis, derandomized); `make test-slow` runs many more.

References: safetensors' own reader for what a payload holds (a load that succeeds must give the
tensors the file holds), the unmutated package's golden verification.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models
from models.errors import MlamoeError
from pipeline.cli import main

FAST = settings(max_examples=100, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=3000, derandomize=False, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
SLOW_PACKAGES = settings(SLOW, max_examples=500)  # each case runs verify, inspect and generate
CASE_SECONDS = 60  # a case that takes longer is a hang
RSS_GROWTH_LIMIT = 1 << 30  # bytes of peak-RSS growth over the whole run


@contextlib.contextmanager
def time_limit(seconds: int):
    def hang(signum, frame):
        raise AssertionError(f"case did not finish within {seconds} s (a hang)")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _listing(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ mutations
def _mutate_bytes(data: bytes, draw_ops, lo: int = 0, hi: int | None = None) -> bytes:
    """Apply (kind, position, value) byte edits within data[lo:hi]."""
    buf = bytearray(data)
    hi = len(buf) if hi is None else min(hi, len(buf))
    for kind, pos, value in draw_ops:
        if hi <= lo:
            break
        i = lo + pos % (hi - lo)
        if kind == "flip":
            buf[i] ^= 1 << (value % 8)
        elif kind == "set":
            buf[i] = value % 256
        elif kind == "truncate":
            del buf[i:]
            hi = min(hi, len(buf))
        elif kind == "insert":
            buf[i:i] = bytes([value % 256]) * (1 + value % 7)
        elif kind == "delete":
            del buf[i:i + 1 + value % 7]
            hi = min(hi, len(buf))
    return bytes(buf)


byte_ops = st.lists(st.tuples(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]),
                              st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=4)

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 40), 1 << 40),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                      st.lists(st.integers(-3, 300), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _json_paths(v, prefix + (i,))


def _json_edit(obj, path, action, value):
    """Replace, delete or retype the value at `path` (a copy is returned)."""
    obj = json.loads(json.dumps(obj))
    if not path:
        return value if action != "delete" else {}
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if action == "delete":
        if isinstance(parent, dict):
            parent.pop(last)
        else:
            parent.pop(last)
    elif action == "stringify":
        parent[last] = json.dumps(parent[last])
    else:
        parent[last] = value
    return obj


json_mutation = st.tuples(st.integers(0, 1 << 20), st.sampled_from(["replace", "delete", "stringify"]), json_leaf)


def _apply_json_mutation(obj, mutation):
    index, action, value = mutation
    paths = list(_json_paths(obj))
    path = paths[index % len(paths)]
    return _json_edit(obj, path, action, value)


# ---------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """tiny saved as one file and as shards with an index (real-format names, fp32)."""
    root = tmp_path_factory.mktemp("fuzz-ckpt")
    model = models.load("tiny")
    one = models.save(model, root / "one")
    sharded = models.save(model, root / "sharded", max_shard_bytes=200_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    return {"one": one, "sharded": sharded}


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _check_loaded_against_files(model, folder: Path) -> None:
    """A load that succeeded must hold what the files hold (safetensors' own reader)."""
    from safetensors.numpy import load_file
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    seen = 0
    for f in _safetensors_files(folder):
        for name, arr in load_file(f).items():
            if name in state and state[name].shape == arr.shape:
                assert np.array_equal(state[name], arr.astype(np.float32), equal_nan=True), name
                seen += 1
    assert seen > 0


def _load_case(src: Path, work: Path, target: str, ops=None, jmut=None, region: str = "any") -> None:
    case = work / "case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(src, case)
    before_outside = sorted(os.listdir(work))
    if target == "config":
        cfg = json.loads((case / "config.json").read_text())
        (case / "config.json").write_text(json.dumps(_apply_json_mutation(cfg, jmut)))
    elif target == "config-bytes":
        p = case / "config.json"
        p.write_bytes(_mutate_bytes(p.read_bytes(), ops))
    elif target == "index":
        p = case / "model.safetensors.index.json"
        if p.is_file():
            p.write_text(json.dumps(_apply_json_mutation(json.loads(p.read_text()), jmut)))
    else:  # a safetensors file: its 8-byte length, its JSON header or its payload
        files = _safetensors_files(case)
        p = files[ops[0][1] % len(files)]
        data = p.read_bytes()
        header_end = 8 + struct.unpack("<Q", data[:8])[0]
        lo, hi = {"length": (0, 8), "header": (8, header_end), "payload": (header_end, len(data))}[target]
        p.write_bytes(_mutate_bytes(data, ops, lo, hi))
    with time_limit(CASE_SECONDS):
        try:
            model = models.load(case)
        except MlamoeError as e:
            assert str(e).strip() and "\n  File " not in str(e)
            return
        _check_loaded_against_files(model, case)
        with torch.no_grad():
            logits, _ = model.step(torch.tensor([[1, 2, 3]]), model.empty_cache(1))
        assert logits.shape[-1] == model.config.vocab_size
    assert sorted(os.listdir(work)) == before_outside  # nothing written beside the checkpoint


targets_st = st.sampled_from(["config", "config-bytes", "index", "length", "header", "header", "payload"])


def _checkpoint_property(checkpoints, tmp_path_factory, cfg):
    work = tmp_path_factory.mktemp("fuzz-load")
    start = _peak_rss()
    counts: dict[str, int] = {}

    @cfg
    @given(kind=st.sampled_from(["one", "sharded"]), target=targets_st, ops=byte_ops, jmut=json_mutation)
    def prop(kind, target, ops, jmut):
        _load_case(checkpoints[kind], work, target, ops, jmut)
        counts[target] = counts.get(target, 0) + 1

    prop()
    assert _peak_rss() - start < RSS_GROWTH_LIMIT
    return counts


def test_fuzzed_checkpoints_load_correctly_or_fail_clearly(checkpoints, tmp_path_factory):
    counts = _checkpoint_property(checkpoints, tmp_path_factory, FAST)
    assert sum(counts.values()) >= 20


@pytest.mark.slow
def test_fuzzed_checkpoints_long_run(checkpoints, tmp_path_factory):
    counts = _checkpoint_property(checkpoints, tmp_path_factory, SLOW)
    print(f"\ncheckpoint fuzz cases: {counts}")


# ------------------------------------------------------------------------------------- packages
@pytest.fixture(scope="module")
def package(tmp_path_factory, stage_cache):
    from pipeline.compile import compile_package
    out = tmp_path_factory.mktemp("fuzz-pkg") / "tiny"
    return compile_package("tiny", "ort-cpu", out, cache_dir=stage_cache, progress=lambda m: None, gen_tokens=4)


def _rehash(root: Path, rel: str) -> None:
    """Make the manifest agree with a mutated file, so the case reaches past the hash check."""
    manifest = json.loads((root / "manifest.json").read_text())
    for f in manifest["files"]:
        if f["path"] == rel:
            f["sha256"] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
            f["size"] = (root / rel).stat().st_size
    manifest.pop("archive", None)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback
        raise AssertionError(f"mlamoe {' '.join(args)} raised {type(r.exception).__name__}: {r.exception}\n"
                             + "".join(traceback.format_exception(r.exception)) + r.output)
    assert "Traceback" not in r.output, r.output
    if r.exit_code == 2:
        assert [line for line in r.output.splitlines() if line.startswith("error: ")], r.output
    return r.exit_code, r.output


def _package_case(src: Path, work: Path, target: str, ops, jmut, rehash: bool) -> int:
    case = work / "case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(src, case)
    if target == "manifest":
        manifest = json.loads((case / "manifest.json").read_text())
        (case / "manifest.json").write_text(json.dumps(_apply_json_mutation(manifest, jmut)))
    elif target == "manifest-bytes":
        p = case / "manifest.json"
        p.write_bytes(_mutate_bytes(p.read_bytes(), ops))
    else:
        rel = f"onnx/{target}.onnx"
        p = case / rel
        p.write_bytes(_mutate_bytes(p.read_bytes(), ops))
        if rehash:
            _rehash(case, rel)
    outside = sorted(os.listdir(work))
    with time_limit(CASE_SECONDS):
        code, out = _cli("verify", str(case))
        assert code in (0, 1, 2), out
        if code == 0:  # everything it checked passed: then the package really reproduces its golden data
            assert "ok   greedy generation" in out or "skip" in out, out
        _cli("inspect", str(case))
        _cli("generate", str(case), "--prompt-ids", "1,2,3", "--max-new-tokens", "2")
    assert sorted(os.listdir(work)) == outside  # nothing written beside the package
    return code


def _package_property(package, tmp_path_factory, cfg):
    work = tmp_path_factory.mktemp("fuzz-verify")
    start = _peak_rss()
    outcomes: dict[tuple[str, int], int] = {}

    @cfg
    @given(target=st.sampled_from(["manifest", "manifest-bytes", "decode", "prefill"]), ops=byte_ops,
           jmut=json_mutation, rehash=st.booleans())
    def prop(target, ops, jmut, rehash):
        code = _package_case(package, work, target, ops, jmut, rehash)
        outcomes[(target, code)] = outcomes.get((target, code), 0) + 1

    prop()
    assert _peak_rss() - start < RSS_GROWTH_LIMIT
    return outcomes


def test_fuzzed_packages_verify_or_fail_clearly(package, tmp_path_factory):
    code, out = _cli("verify", str(package))
    assert code == 0, out  # the unmutated package is good: the fuzz starts from a verified package
    outcomes = _package_property(package, tmp_path_factory, FAST)
    assert sum(outcomes.values()) >= 20
    assert any(code != 0 for (_, code) in outcomes)  # the mutations were not all harmless


@pytest.mark.slow
def test_fuzzed_packages_long_run(package, tmp_path_factory):
    outcomes = _package_property(package, tmp_path_factory, SLOW_PACKAGES)
    print(f"\npackage fuzz outcomes (target, exit code): {outcomes}")
