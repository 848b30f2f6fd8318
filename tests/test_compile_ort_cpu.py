"""Compiler core on ORT CPU: tiny/tiny-v2/transformers checkpoints compile to verified packages.

References: the eager PyTorch model (models/), recomputed here independently of the package's own
golden files, and ONNX Runtime running the packaged graphs through the package's runtime.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from pipeline.compile import compile_package
from runtime.ort_runtime import PackageRuntime
from pipeline.package import PackageError, read_manifest, verify_package

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache_dir(stage_cache):
    return stage_cache


@pytest.fixture(scope="module")
def packages(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("pkgs")
    return {name: compile_package(name, "ort-cpu", out / name, cache_dir=cache_dir, progress=lambda m: None)
            for name in ("tiny", "tiny-v2")}


def _feeds(cache, prefix="past"):
    return {f"{prefix}.{i}.{n}": t.numpy() for i, (c, k) in enumerate(cache) for n, t in (("c_kv", c), ("k_pe", k))}


@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])
def test_prefill_logits_and_present_cache_match_eager(packages, name):
    model = models.load(name)
    rt = PackageRuntime(packages[name])
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(7))
    ref_logits, ref_present = model.step(ids, model.empty_cache(3))
    logits, present = rt.run("prefill", ids.numpy(), rt.empty_cache(3))
    assert np.abs(logits - ref_logits.numpy()).max() <= 1e-4
    for name_, arr in _feeds(ref_present).items():
        assert np.abs(present[name_] - arr).max() <= 1e-5, name_
    # decode one token on top of that cache
    nxt = ids[:, -1:]
    ref_d, _ = model.step(nxt, ref_present)
    got_d, _ = rt.run("decode", nxt.numpy(), present)
    assert np.abs(got_d - ref_d.numpy()).max() <= 1e-4


@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])
def test_greedy_generation_32_tokens_identical_to_eager(packages, name):
    model = models.load(name)
    prompt = [5, 17, 99, 3, 42]
    ref_tokens, ref_logits = models.greedy_generate(model, prompt, 32)
    tokens, logits = PackageRuntime(packages[name]).generate(prompt, 32)
    assert tokens.tolist() == ref_tokens.tolist()
    assert np.abs(logits - ref_logits.numpy()).max() <= 1e-4


def test_package_layout_and_manifest(packages):
    root = packages["tiny"]
    for rel in ("manifest.json", "README.md", "onnx/prefill.onnx", "onnx/decode.onnx", "runtime/ort_runtime.py",
                "reports/parity.json", "reports/parity.md"):
        assert (root / rel).is_file(), rel
    assert (root.parent / "tiny.tar.gz").is_file()
    m = read_manifest(root)
    cfg = models.load("tiny").config
    assert m["io"]["cache"]["values_per_token_per_layer"] == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert m["io"]["cache"]["bytes_per_token_per_layer"] == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    decode_inputs = {i["name"]: i for i in m["io"]["graphs"]["decode"]["inputs"]}
    assert decode_inputs["input_ids"]["shape"] == ["batch", 1]
    assert decode_inputs["past.0.c_kv"]["shape"] == ["batch", "past", cfg.kv_lora_rank]
    stage_names = [s["name"] for s in m["stages"]]
    assert stage_names[0] == "load" and stage_names[1] == "export" and stage_names[-1] == "package"
    assert any(n.startswith("passes/") for n in stage_names) and "quantize" in stage_names
    for s in m["stages"]:
        if s["name"] not in ("load", "quantize", "package", "genai"):
            assert s["parity"] and all(p["passed"] for p in s["parity"]), s["name"]
    # the onnxruntime-genai files, in onnx/ over its one weights file: their check re-runs the golden data and fails
    # the build on a difference
    assert m["genai"]["dir"] == "onnx" and m["genai"]["type"] == "decoder-pipeline"
    assert m["genai"]["config"] == "onnx/genai_config.json" and (root / m["genai"]["config"]).is_file()
    assert not (root / "genai").exists()
    assert m["genai"]["weights"] == m["io"]["weights"]["file"] == "onnx/weights.data"
    assert set(m["genai"]["graphs"].values()) == {"onnx/genai_prefill.onnx", "onnx/genai_decode.onnx"}
    assert m["io"]["weights"]["graphs"] == ["onnx/prefill.onnx", "onnx/decode.onnx", "onnx/genai_prefill.onnx",
                                            "onnx/genai_decode.onnx"]
    assert {m["io"]["graphs"][g]["file"] for g in ("prefill", "decode")} == {"onnx/prefill.onnx", "onnx/decode.onnx"}
    assert set(m["genai"]["files"]) <= {f["path"] for f in m["files"]}
    assert {"onnx/genai_config.json", "onnx/genai_prefill.onnx", "onnx/tokenizer.json"} <= set(m["genai"]["files"])
    readme = (root / "README.md").read_text()
    assert "`onnx/genai_config.json`" in readme and "og.Model('onnx')" in readme and "no second copy" in readme
    from pipeline.inspect import describe
    assert "genai     onnx/ (decoder-pipeline: onnx/genai_decode.onnx, onnx/genai_prefill.onnx" in describe(m)
    listed = {f["path"] for f in m["files"]}
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk


def test_package_runtime_runs_without_the_repository(packages, tmp_path):
    """The shipped runtime needs only numpy + onnxruntime: run it from a copy, outside the repo."""
    dst = tmp_path / "handoff"
    shutil.copytree(packages["tiny"], dst)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-I", str(dst / "runtime" / "ort_runtime.py"), "--package", str(dst),
                        "verify-golden"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "within tolerance" in r.stdout


@pytest.mark.parametrize("rel", ["onnx/decode.onnx", "golden/prefill.in.input_ids.npy", "README.md",
                                 "runtime/ort_runtime.py", "reports/parity.json"])
def test_flipped_byte_makes_verify_fail_naming_the_file(packages, tmp_path, rel):
    dst = tmp_path / "pkg"
    shutil.copytree(packages["tiny"], dst)
    target = dst / rel
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(PackageError) as e:
        verify_package(dst)
    assert rel in str(e.value)
    from pipeline.verify import verify_full
    ok, lines = verify_full(dst)
    assert not ok and any(rel in line for line in lines)


def test_verify_passes_on_folder_and_tarball(packages):
    from pipeline.verify import verify_full
    for p in (packages["tiny"], packages["tiny"].parent / "tiny.tar.gz"):
        ok, lines = verify_full(p)
        assert ok, lines
        assert any("greedy generation" in line for line in lines)


def test_two_builds_are_byte_identical(packages, tmp_path):
    """A second build with no stage cache recomputes everything and gives the same bytes: every file
    of the folder (manifest and README included) and the .tar.gz, whose sha256 the manifest records.
    Run times and cache hits go to the build log beside the package, the one thing that differs."""
    again = compile_package("tiny", "ort-cpu", tmp_path / "tiny", use_cache=False, progress=lambda m: None)
    first, second = packages["tiny"], again

    def tree(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = tree(first), tree(second)
    assert sorted(a) == sorted(b) and [p for p in a if a[p] != b[p]] == []
    tar_a, tar_b = (p.parent / "tiny.tar.gz" for p in (first, second))
    assert tar_a.read_bytes() == tar_b.read_bytes()
    assert read_manifest(second)["archive"]["sha256"] == hashlib.sha256(tar_b.read_bytes()).hexdigest()
    log = json.loads((second.parent / "tiny.build.json").read_text())
    assert [s["name"] for s in log["stages"]] == [s["name"] for s in read_manifest(second)["stages"]]
    assert all(s["cached"] is False and s["seconds"] >= 0 for s in log["stages"])


def test_transformers_checkpoint_compiles(hf_checkpoints, tmp_path, cache_dir):
    hf, path = hf_checkpoints["v3"]
    pkg = compile_package(str(path), "ort-cpu", tmp_path / "hf", cache_dir=cache_dir, progress=lambda m: None)
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        ref = hf(input_ids=prompt).logits.numpy()
    rt = PackageRuntime(pkg)
    logits, _ = rt.run("prefill", prompt.numpy(), rt.empty_cache(1))
    assert np.abs(logits - ref).max() <= 1e-4
    assert read_manifest(pkg)["model"]["kind"] == "checkpoint"


def test_killed_compile_leaves_nothing_and_rerun_succeeds(tmp_path, cache_dir):
    out = tmp_path / "killed"
    env = {**os.environ, "MLAMOE_CACHE": str(tmp_path / "fresh-cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "compile", "--model", "tiny", "--target", "ort-cpu",
                             "--out", str(out)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stderr:  # kill it in the middle of the export stage
        if "[export] running" in line or time.time() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert not (tmp_path / "killed.tar.gz").exists()
    pkg = compile_package("tiny", "ort-cpu", out, cache_dir=cache_dir, progress=lambda m: None)
    verify_package(pkg)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".killed")] == []


def test_int8_package_reproduces_its_quantized_graphs_and_reports_the_error(tmp_path, cache_dir):
    """--quant int8: MatMulNBits in the package, golden = the quantized graphs' outputs (verify passes),
    fp32 accuracy reported, weight bytes before/after and the per-layer error profile in reports/."""
    import json

    import onnx
    from pipeline.verify import verify_full
    pkg = compile_package("tiny", "ort-cpu", tmp_path / "q", quant="int8", cache_dir=cache_dir,
                          progress=lambda m: None)
    ops = {n.op_type for n in onnx.load(str(pkg / "onnx" / "decode.onnx")).graph.node}
    assert "MatMulNBits" in ops
    ok, lines = verify_full(pkg)
    assert ok, lines
    q = json.loads((pkg / "reports" / "quantization.json").read_text())
    assert q["decode"]["weights_bytes_after"] < q["decode"]["weights_bytes_before"]
    assert (pkg / "reports" / "error_profile.csv").read_text().count("\n") > 10
    m = read_manifest(pkg)
    assert m["target"]["quantization"] == "int8"
    # the fp32 comparison is recorded but not binding; the binding stages all passed
    target = next(s for s in m["stages"] if s["name"] == "target/ort-cpu")
    assert any(not p["binding"] for p in target["parity"]) and m["parity"]["passed"]


def test_package_carries_the_tokenizer_and_generates_text_like_eager(packages):
    """tiny (vocab 256) gets the byte-level tokenizer: in tokenizer/, hashed in the manifest, and
    `generate PKG --prompt` prints the eager model's greedy continuation of the prompt's bytes."""
    import json as _json

    from click.testing import CliRunner

    from models.tokenizer import byte_level_files
    from pipeline.cli import main
    pkg = packages["tiny"]
    m = read_manifest(pkg)
    listed = {f["path"] for f in m["files"]}
    assert m["tokenizer"]["files"] == ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
    assert set(m["tokenizer"]["files"]) <= listed
    for name, data in byte_level_files().items():
        assert (pkg / "tokenizer" / name).read_bytes() == data
    for source in (pkg, pkg.parent / "tiny.tar.gz"):
        r = CliRunner().invoke(main, ["generate", str(source), "--prompt", "def f(x):", "--max-new-tokens", "6",
                                      "--json"])
        assert r.exit_code == 0, r.output
        got = _json.loads(r.output)
        tokens, _ = models.greedy_generate(models.load("tiny"), list(b"def f(x):"), 6)
        assert got["tokens"] == tokens[0].tolist()
        assert got["text"] == bytes(got["tokens"]).decode("utf-8", errors="replace")
