"""One weights file per package (pipeline/weights_file.py).

References, independent of the code under test: graphs saved the ordinary way (ir.save, weights inline) run on
ONNX Runtime for the outputs; the eager model's parameters (models.load, torch) for the bytes one copy of the
weights takes; the raw bytes of the files for sharing, alignment and damage.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import models
from pipeline.compile import compile_package
from pipeline.package import PackageError, verify_package
from pipeline.weights_file import ALIGN, ALIGN_THRESHOLD, INLINE_BYTES, WEIGHTS_FILE, WeightsFile, external_files

REPO = Path(__file__).resolve().parent.parent
N = 256  # 256 x 256 fp32 weights (256 KiB: aligned to a page), a 1 KiB bias (inline)


def _graph(weights: dict[str, np.ndarray], name: str) -> ir.Model:
    """x [1, N] -> x @ W0 @ W1 ... + bias: one MatMul per weight, a small bias kept inline."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, N]))
    inits, nodes, cur = [], [], x
    for wname, w in weights.items():
        v = ir.Value(name=wname, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(w.shape),
                     const_value=ir.tensor(w, name=wname))
        inits.append(v)
        node = ir.node("MatMul", [cur, v])
        nodes.append(node)
        cur = node.outputs[0]
    bias = np.linspace(-1, 1, N, dtype=np.float32)
    b = ir.Value(name="bias", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([N]),
                 const_value=ir.tensor(bias, name="bias"))
    inits.append(b)
    add = ir.node("Add", [cur, b])
    nodes.append(add)
    add.outputs[0].name = "y"
    add.outputs[0].dtype = ir.DataType.FLOAT
    add.outputs[0].shape = ir.Shape([1, N])
    g = ir.Graph([x], [add.outputs[0]], nodes=nodes, initializers=inits, opset_imports={"": 18}, name=name)
    return ir.Model(g, ir_version=10)


def _weights(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((N, N)) / 16).astype(np.float32)


def _run(path: Path) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": np.linspace(0, 1, N, dtype=np.float32)[None]})[0]


def _graphs():
    a, b, c = _weights(1), _weights(2), _weights(3)
    # "second" holds a under another name, b under its own, and c only it has
    return {"first.onnx": _graph({"wa": a, "wb": b}, "first"), "second.onnx": _graph({"a_renamed": a, "wb": b, "wc": c}, "second")}


def test_shared_file_stores_each_distinct_tensor_once_and_graphs_compute_as_inline(tmp_path):
    ref = {}
    for f, m in _graphs().items():  # the ordinary save: every weight inside its own .onnx
        ir.save(m, tmp_path / f"inline-{f}")
        ref[f] = _run(tmp_path / f"inline-{f}")
    shared = tmp_path / "shared"
    with WeightsFile(shared) as w:
        for f, m in _graphs().items():
            w.save(m, f)
    assert [p.name for p in w.files] == ["first.onnx", "second.onnx", WEIGHTS_FILE]
    one = N * N * 4
    assert (shared / WEIGHTS_FILE).stat().st_size < 3 * one + 3 * ALIGN  # a, b, c: three tensors, not five
    assert w.referenced_bytes == 5 * one
    for f in ref:
        np.testing.assert_array_equal(_run(shared / f), ref[f])
        assert external_files(shared / f) == {WEIGHTS_FILE: (2 if f == "first.onnx" else 3) * one}
    protos = {f: onnx.load(str(shared / f), load_external_data=False) for f in ref}
    offsets = {f: {t.name: int({e.key: e.value for e in t.external_data}["offset"]) for t in p.graph.initializer
                   if t.data_location == onnx.TensorProto.EXTERNAL} for f, p in protos.items()}
    assert offsets["first.onnx"]["wa"] == offsets["second.onnx"]["a_renamed"]  # same bytes, other name: shared
    assert offsets["first.onnx"]["wb"] == offsets["second.onnx"]["wb"]
    assert len(set(offsets["second.onnx"].values())) == 3
    # large tensors start on a page (ORT can map them in place); the small bias stays inside each .onnx
    assert all(o % ALIGN == 0 for f in offsets for o in offsets[f].values()) and one > ALIGN_THRESHOLD
    for p in protos.values():
        bias = next(t for t in p.graph.initializer if t.name == "bias")
        assert bias.data_location != onnx.TensorProto.EXTERNAL and N * 4 <= INLINE_BYTES


def test_same_graphs_give_byte_identical_files(tmp_path):
    for d in ("a", "b"):
        with WeightsFile(tmp_path / d) as w:
            for f, m in _graphs().items():
                w.save(m, f)
    for f in ("first.onnx", "second.onnx", WEIGHTS_FILE):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_resaving_graphs_loaded_from_a_shared_file_streams_them_into_a_new_one(tmp_path):
    """save_file: a graph whose weights are external data (memory-mapped by ir.load) is written to another
    folder's shared file; the old folder can go."""
    with WeightsFile(tmp_path / "src") as w:
        for f, m in _graphs().items():
            w.save(m, f)
    ref = {f: _run(tmp_path / "src" / f) for f in ("first.onnx", "second.onnx")}
    with WeightsFile(tmp_path / "dst") as w2:
        for f in ref:
            w2.save_file(tmp_path / "src" / f)
    shutil.rmtree(tmp_path / "src")
    for f in ref:
        np.testing.assert_array_equal(_run(tmp_path / "dst" / f), ref[f])


def test_graph_outside_the_folder_is_refused(tmp_path):
    from pipeline.weights_file import WeightsFileError
    with WeightsFile(tmp_path / "w") as w, pytest.raises(WeightsFileError, match="beside its weights file"):
        w.save(_graphs()["first.onnx"], "sub/first.onnx")


def test_reopen_appends_byte_identically_to_one_session(tmp_path):
    """A later step continues a closed file: the same bytes as saving every graph in one session."""
    third = lambda: _graph({"c_again": _weights(3), "wd": _weights(4)}, "third")
    with WeightsFile(tmp_path / "one") as one:
        for f, m in _graphs().items():
            one.save(m, f)
        one.save(third(), "third.onnx")
    with WeightsFile(tmp_path / "two") as w:
        for f, m in _graphs().items():
            w.save(m, f)
    before = (tmp_path / "two" / WEIGHTS_FILE).read_bytes()
    ref = {f: _run(tmp_path / "two" / f) for f in ("first.onnx", "second.onnx")}
    with WeightsFile.reopen(tmp_path / "two", ["first.onnx", "second.onnx"]) as w2:
        assert w2.referenced_bytes == w.referenced_bytes == 5 * N * N * 4 and w2.stored_bytes == len(before)
        w2.save(third(), "third.onnx")
    assert [p.name for p in w2.files] == ["first.onnx", "second.onnx", "third.onnx", WEIGHTS_FILE]
    assert w2.referenced_bytes == one.referenced_bytes == 7 * N * N * 4
    for f in ("first.onnx", "second.onnx", "third.onnx", WEIGHTS_FILE):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    data = (tmp_path / "two" / WEIGHTS_FILE).read_bytes()
    assert data[:len(before)] == before  # nothing written moved: the earlier graphs still compute
    for f in ref:
        np.testing.assert_array_equal(_run(tmp_path / "two" / f), ref[f])
    # c was there: only d was appended
    assert len(data) - len(before) < N * N * 4 + ALIGN


def test_reopen_shares_the_bytes_of_graphs_loaded_from_the_same_file(tmp_path):
    """The genai case: graphs loaded from the folder (weights memory-mapped from the file being appended to),
    rewritten and saved beside it under other names: no weight is stored again."""
    with WeightsFile(tmp_path) as w:
        for f, m in _graphs().items():
            w.save(m, f)
    size = (tmp_path / WEIGHTS_FILE).stat().st_size
    ref = {f: _run(tmp_path / f) for f in ("first.onnx", "second.onnx")}
    with WeightsFile.reopen(tmp_path, ["first.onnx", "second.onnx"]) as w2:
        for f in ref:
            w2.save(ir.load(tmp_path / f), f"copy_{f}")
    assert (tmp_path / WEIGHTS_FILE).stat().st_size == size
    for f in ref:
        np.testing.assert_array_equal(_run(tmp_path / f"copy_{f}"), ref[f])
        np.testing.assert_array_equal(_run(tmp_path / f), ref[f])
        assert external_files(tmp_path / f"copy_{f}") == external_files(tmp_path / f)


def test_reopen_refuses_what_it_cannot_continue(tmp_path):
    from pipeline.weights_file import WeightsFileError
    with pytest.raises(WeightsFileError, match="no weights file"):
        WeightsFile.reopen(tmp_path / "none", [])
    with WeightsFile(tmp_path / "a", name="other.data") as w:
        w.save(_graphs()["first.onnx"], "first.onnx")
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(WeightsFileError, match="is in 'other.data'"):
        WeightsFile.reopen(tmp_path / "a", ["first.onnx"])
    with WeightsFile(tmp_path / "b") as w:
        w.save(_graphs()["first.onnx"], "first.onnx")
    raw = (tmp_path / "b" / WEIGHTS_FILE).read_bytes()
    (tmp_path / "b" / WEIGHTS_FILE).write_bytes(raw[:len(raw) // 2])
    with pytest.raises(WeightsFileError, match="past the end"):
        WeightsFile.reopen(tmp_path / "b", ["first.onnx"])
    assert (tmp_path / "b" / WEIGHTS_FILE).stat().st_size == len(raw) // 2  # refused: nothing truncated or written


# ------------------------------------------------------------------------------------------------- packages
@pytest.fixture(scope="module")
def packages(tmp_path_factory, stage_cache):
    out = tmp_path_factory.mktemp("one-weights")
    return {t: compile_package("tiny", t, out / f"tiny-{t}", cache_dir=stage_cache, progress=lambda m: None)
            for t in ("ort-cpu", "ascend")}


def _param_bytes(name: str) -> int:
    m = models.load(name)
    return sum(p.numel() * p.element_size() for p in m.parameters())


@pytest.mark.parametrize("target", ["ort-cpu", "ascend"])
def test_package_holds_one_weights_file_of_about_one_copy(packages, target):
    pkg = Path(packages[target])
    manifest = json.loads((pkg / "manifest.json").read_text())
    params = _param_bytes("tiny")  # fp32, from the eager model
    graphs = sorted((pkg / "onnx").glob("*.onnx"))
    assert len(graphs) >= 2
    data = sorted(p.name for p in (pkg / "onnx").glob("*.data"))
    assert data == [WEIGHTS_FILE]
    stored = (pkg / "onnx" / WEIGHTS_FILE).stat().st_size
    referenced = 0
    for g in graphs:
        refs = external_files(g)
        assert list(refs) == [WEIGHTS_FILE], g.name  # every graph over the one file, none over its own
        assert refs[WEIGHTS_FILE] >= 0.95 * params, g.name  # each graph still has (about) all the weights
        referenced += refs[WEIGHTS_FILE]
    # separate files would hold len(graphs) copies; the shared file about one. ascend keeps the routed experts in
    # two layouts (decode's gathered tables, the buckets' dense ones), which bytes-only sharing cannot merge.
    limit = 1.10 if target == "ort-cpu" else 1.6
    assert 0.95 * params <= stored <= limit * params, (stored, params)
    assert referenced >= (len(graphs) - 0.1) * params
    section = manifest["io"]["weights"] if target == "ort-cpu" else manifest["ascend"]["weights"]
    assert section["file"] == f"onnx/{WEIGHTS_FILE}" and section["bytes"] == stored
    assert sorted(section["graphs"]) == sorted(f"onnx/{g.name}" for g in graphs)


def test_ort_cpu_genai_graphs_share_the_packages_file(packages):
    """The onnxruntime-genai graphs are in onnx/ over the package's weights file: no second copy anywhere."""
    pkg = Path(packages["ort-cpu"])
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["genai"]["dir"] == "onnx" and not (pkg / "genai").exists()
    assert [p.relative_to(pkg).as_posix() for p in pkg.rglob("*.data")] == [f"onnx/{WEIGHTS_FILE}"]
    for g in manifest["genai"]["graphs"].values():
        assert list(external_files(pkg / g)) == [WEIGHTS_FILE], g
        assert g in manifest["io"]["weights"]["graphs"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("target", ["ort-cpu", "ascend"])
def test_damaged_weights_file_is_caught_naming_it(packages, tmp_path, target, damage):
    pkg = tmp_path / "pkg"
    shutil.copytree(packages[target], pkg)
    data = pkg / "onnx" / WEIGHTS_FILE
    raw = bytearray(data.read_bytes())
    if damage == "truncate":
        data.write_bytes(bytes(raw[:len(raw) // 2]))
        want = f"onnx/{WEIGHTS_FILE}: size mismatch"
    else:
        raw[len(raw) // 3] ^= 0x01
        data.write_bytes(bytes(raw))
        want = f"onnx/{WEIGHTS_FILE}: sha256 mismatch"
    with pytest.raises(PackageError) as e:
        verify_package(pkg)
    problem = next((p for p in e.value.problems if p.startswith(want)), None)
    assert problem is not None, e.value.problems
    graphs = sorted(f"onnx/{g.name}" for g in (pkg / "onnx").glob("*.onnx"))
    assert all(g in problem for g in graphs), problem  # the graphs that read it are named too
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", str(pkg)], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode != 0 and want in r.stdout + r.stderr, r.stdout + r.stderr


def test_in_memory_graph_over_a_shared_file_runs_and_copies(tmp_path):
    """A graph loaded from a shared file runs from bytes (session_from_model tells ORT the folder: without it ORT
    refuses) and copy_model keeps its weights while the copy's types are its own."""
    from passes.ir_external import copy_model, session_from_model
    with WeightsFile(tmp_path / "w") as w:
        for f, m in _graphs().items():
            w.save(m, f)
    want = _run(tmp_path / "w" / "first.onnx")
    m = ir.load(tmp_path / "w" / "first.onnx")
    x = {"x": np.linspace(0, 1, N, dtype=np.float32)[None]}
    with pytest.raises(Exception, match="[Ee]xternal data"):
        ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session_from_model(m).run(None, x)[0], want)
    c = copy_model(m)
    assert isinstance(c.graph.initializers["wa"].const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(session_from_model(c).run(None, x)[0], want)
    c.graph.outputs[0].dtype = ir.DataType.FLOAT16
    assert m.graph.outputs[0].dtype == ir.DataType.FLOAT
