"""DeepSeek-V4 through the compiler (issue 14 item 4, ort-cpu): a transformers-saved V4 checkpoint (every layer
type, hash layers, non-zero sinks / e_score_correction_bias / position biases: tests/test_models_v4.py's
hf_v4_model) compiles to an ort-cpu package that `verify` passes and whose greedy tokens and per-step logits equal
transformers' DeepseekV4ForCausalLM; injected faults make the checks fail; ascend and ort-cuda refuse V4, naming why.

Reference: transformers' no-cache `forward` over the growing sequence (teacher-forced on the package's tokens),
never the package's own golden files. `generate()` is not used: on CSA layers it disagrees with transformers' own
forward (REFERENCE.md, DeepSeek-V4).

Fast tier: the pieces the compile relies on (export Dims per length rule, golden case lengths, empty-cache fills,
genai's refusal, README cache lines, skipped-pass reasons, the ascend and ort-cuda refusals). Slow tier: the compile itself
(~3 min on 2 shared cores: the dynamo export of the V4 step dominates) and everything that reads its package.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import models
from models.errors import MlamoeError
from pipeline.compile import compile_package
from pipeline.package import PackageError, read_manifest, verify_package
from runtime import ort_runtime
from runtime.ort_runtime import PackageRuntime

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-3


def tiny_v4_spec():
    return models.load("tiny-v4").cache_spec()


# ---- fast tier: what the compile relies on --------------------------------------------------------------------
def test_export_gives_one_dim_per_length_rule_and_an_example_cache_with_every_axis_symbolic():
    from pipeline.export import example_past, length_dims
    spec = tiny_v4_spec()  # sliding_window 8 (window 7 rows), CSA m = 4, HCA m = 8
    dims = length_dims(spec, 4096)
    assert sorted(d.__name__ for d in dims.values()) == ["compressed4", "compressed8", "pending4", "pending8",
                                                         "window7"]
    past = example_past(spec)
    rows = {t.name + str(t.n): t.rows_for(past) for layer in spec.layers for t in layer if t.rule != "fixed"}
    assert min(rows.values()) >= 2, rows  # a 0- or 1-row example axis would be specialised by the exporter
    mla = models.load("tiny").cache_spec()
    assert [d.__name__ for d in length_dims(mla, 4096).values()] == ["past"] and example_past(mla) == 2


def test_golden_cases_cross_csa_and_hca_windows():
    from pipeline.golden import case_lengths
    cfg = models.load_config("tiny-v4")
    rates = sorted(set(cfg.compress_rate(i) for i in range(cfg.num_hidden_layers)) - {0})
    assert rates == [4, 8]
    prompt, chunk = case_lengths(tiny_v4_spec())
    decode_position = prompt + chunk
    assert prompt >= 2 * 8 and prompt > cfg.sliding_window  # the prefill fills the window, closes 2+ HCA entries
    for m in rates:  # the decode token is the last of a window of every rate: it closes a CSA and an HCA entry
        assert (decode_position + 1) % m == 0
    assert prompt // 4 > cfg.index_topk  # the indexer drops CSA entries in the prefill already
    assert case_lengths(models.load("tiny").cache_spec()) == (8, 4)  # MLA golden data unchanged


def test_manifest_cache_is_strict_json_and_gives_the_runtime_its_fills():
    spec = tiny_v4_spec()
    section = json.loads(json.dumps(spec.to_manifest(), allow_nan=False))  # the manifest is written allow_nan=False
    fills = ort_runtime.cache_fills(section)
    want = {f"past.{i}.{t.name}" for i, layer in enumerate(spec.layers) for t in layer if t.fill != 0}
    assert want == {f"past.{i}.{n}" for i in (1, 3) for n in ("overlap_gate", "index_overlap_gate")}
    assert set(fills) == want and all(v == -math.inf for v in fills.values())
    from runtime import cuda_runtime
    assert cuda_runtime.cache_fills(section) == fills
    assert ort_runtime.cache_fills(models.load("tiny").cache_spec().to_manifest()) == {}


def test_package_readme_describes_each_layer_kinds_cache_tensors():
    from pipeline.package_readme import cache_lines
    spec = tiny_v4_spec()
    text = "\n".join(cache_lines(json.loads(json.dumps(spec.to_manifest(), allow_nan=False)), 256))
    for i, layer in enumerate(spec.layers):
        for t in layer:
            assert f"`{t.name}`" in text
    assert "layers 1, 3:" in text and "layers 2, 4:" in text and "(empty state -inf)" in text


def test_passes_that_do_not_apply_to_v4_are_named_with_a_reason():
    from pipeline.build import family_passes, skipped_passes
    from targets.ort_cpu import PROFILE
    v4 = models.load("tiny-v4")
    assert family_passes(v4, PROFILE.passes) == ("ort-simplify",)
    why = skipped_passes(v4, PROFILE.passes)
    assert sorted(why) == ["latent-kv-fusion", "moe-ort-fused"]
    assert "latent cache" in why["latent-kv-fusion"] and "tid2eid" in why["moe-ort-fused"]
    assert skipped_passes(models.load("tiny"), PROFILE.passes) == {}


def _toy_cache_graph(inputs: list[tuple[str, list]]) -> "onnx_ir.Model":
    """A graph passing each past.* input through to present.*: only its cache IO matters to genai's layout."""
    import onnx_ir as ir
    from onnx import TensorProto, helper
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outs, nodes = [], []
    for name, shape in inputs:
        ins.append(helper.make_tensor_value_info(f"past.{name}", TensorProto.FLOAT, shape))
        outs.append(helper.make_tensor_value_info(f"present.{name}", TensorProto.FLOAT, shape))
        nodes.append(helper.make_node("Identity", [f"past.{name}"], [f"present.{name}"]))
    graph = helper.make_graph(nodes, "toy", ins, outs)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def test_genai_layout_refuses_a_cache_with_several_length_rules():
    from passes.genai_cache_layout import GenaiCacheLayoutError, GenaiCacheLayoutPass
    v4_like = _toy_cache_graph([("0.window", ["batch", "window7", 32]), ("1.window", ["batch", "window7", 32]),
                                ("1.compressed", ["batch", "compressed4", 32])])
    with pytest.raises(GenaiCacheLayoutError, match="compressed4, window7"):
        GenaiCacheLayoutPass().requires(v4_like)
    widths = _toy_cache_graph([("0.c_kv", ["batch", "past", 32]), ("1.c_kv", ["batch", "past", 16])])
    with pytest.raises(GenaiCacheLayoutError, match=r"different cache widths \[16, 32\]"):
        GenaiCacheLayoutPass().requires(widths)
    GenaiCacheLayoutPass().requires(_toy_cache_graph([("0.c_kv", ["batch", "past", 32]),
                                                      ("1.c_kv", ["batch", "past", 32])]))  # MLA-like: accepted


def test_ascend_refuses_v4_naming_why_and_leaves_nothing(tmp_path):
    out = tmp_path / "v4-ascend"
    with pytest.raises(MlamoeError) as e:
        compile_package("tiny-v4", "ascend", out, progress=lambda m: None)
    text = str(e.value)
    assert "'v4' has no fixed-shape form" in text and "no fixed-shape V4 step exists yet" in text
    assert "window / pending / compressed" in text
    assert not out.exists()


def test_ort_cuda_refuses_v4_naming_the_fp16_budget_it_missed(tmp_path):
    out = tmp_path / "v4-cuda"
    with pytest.raises(MlamoeError) as e:
        compile_package("tiny-v4", "ort-cuda", out, progress=lambda m: None)
    text = str(e.value)
    assert text.startswith("--target ort-cuda: v4 (model_type deepseek_v4) does not compile for it yet")
    assert "fp16 budget" in text and "0.069" in text and "indexer" in text and "--target ort-cpu" in text
    assert not out.exists()



@pytest.mark.parametrize("quant", ["int4", "w8a8", "fp8"])
def test_quantization_of_v4_other_than_int8_is_refused_naming_why(tmp_path, quant):
    out = tmp_path / "v4-q"
    with pytest.raises(MlamoeError) as e:
        compile_package("tiny-v4", "ort-cpu", out, quant=quant, progress=lambda m: None)
    assert str(e.value).startswith(f"--quant {quant}: v4 (model_type deepseek_v4) compiles only with --quant none, "
                                   "int8: int8 (ort-cpu) is built")
    assert "int4, w8a8 and fp8 are not built or checked for V4" in str(e.value)
    assert not out.exists()


# ---- slow tier: the compiled package -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_package(tmp_path_factory, stage_cache):
    """(transformers model, the ort-cpu package compiled from its save_pretrained folder, that folder)."""
    from test_models_v4 import hf_v4_model
    hf = hf_v4_model()
    ckpt = tmp_path_factory.mktemp("hf_v4_ckpt")
    hf.save_pretrained(ckpt)
    out = tmp_path_factory.mktemp("v4pkg") / "hf-v4-cpu"
    return hf, compile_package(str(ckpt), "ort-cpu", out, cache_dir=stage_cache, progress=lambda m: None), ckpt


@torch.no_grad()
def hf_step_logits(hf, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """transformers' no-cache forward over prompt + tokens[:-1]: the logits that choose each of `tokens`."""
    seq = torch.as_tensor(np.concatenate([prompt, tokens[:, :-1]], 1))
    return hf(input_ids=seq).logits.float()[:, prompt.shape[1] - 1:].numpy()


@pytest.mark.slow
def test_v4_package_verifies_and_records_what_it_skipped(hf_package):
    _, pkg, _ = hf_package
    assert verify_package(pkg) == []
    assert ort_runtime.verify_golden(pkg) == []
    m = read_manifest(pkg)
    stages = {s["name"]: s for s in m["stages"]}
    for name in ("passes/latent-kv-fusion", "passes/moe-ort-fused", "genai"):
        assert stages[name]["params"]["skipped"], name
    assert stages["passes/ort-simplify"]["parity"] and all(p["passed"] for p in stages["passes/ort-simplify"]["parity"])
    assert "genai" not in m and not (pkg / "onnx" / "genai_config.json").exists()
    readme = (pkg / "README.md").read_text()
    assert "Not run: `passes/moe-ort-fused`" in readme and "Not run: `genai`" in readme
    cases = {c["name"] for c in m["golden"]["cases"]}
    assert cases == {"prefill", "prefill-chunk", "decode"}
    prompt = np.load(pkg / m["golden"]["greedy"]["prompt"])
    assert prompt.shape[1] == 19  # case_lengths for window 7, m = 4 / 8 (test_golden_cases_cross_csa_and_hca_windows)


@pytest.mark.slow
def test_v4_package_greedy_tokens_and_step_logits_equal_transformers(hf_package):
    hf, pkg, _ = hf_package
    prompt = torch.randint(0, hf.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(11)).numpy()
    tokens, step_logits = PackageRuntime(pkg).generate(prompt, 40)  # to 52 tokens: 13 CSA, 6 HCA entries
    ref = hf_step_logits(hf, prompt, tokens)
    assert np.abs(step_logits - ref).max() <= TOL
    assert (ref.argmax(-1) == tokens).all()


@pytest.mark.slow
def test_mlamoe_generate_on_the_package_reproduces_transformers(hf_package):
    hf, pkg, _ = hf_package
    prompt = [3, 77, 5, 120, 9, 41, 18]
    r = subprocess.run([sys.executable, "-m", "pipeline", "generate", str(pkg), "--prompt-ids",
                        ",".join(map(str, prompt)), "--max-new-tokens", "24", "--json"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    tokens, step_logits = np.array([out["tokens"]]), np.array([out["step_logits"]], np.float32)
    ref = hf_step_logits(hf, np.array([prompt]), tokens)
    assert np.abs(step_logits - ref).max() <= TOL
    assert (ref.argmax(-1) == tokens).all()


@pytest.mark.slow
def test_an_empty_cache_without_the_gate_fill_does_not_reproduce_transformers(hf_package):
    """The -inf empty state of the CSA overlap gates matters: filled with 0 instead, the first compressed entries
    mix in a zero overlap row and the logits leave transformers'."""
    hf, pkg, _ = hf_package
    manifest = read_manifest(pkg)
    for kind in manifest["io"]["cache"]["layer_kinds"]:
        for t in kind["per_layer"]:
            t.pop("fill", None)
    prompt = torch.randint(0, hf.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(11)).numpy()
    tokens, step_logits = PackageRuntime(pkg, manifest=manifest).generate(prompt, 8)
    assert np.abs(step_logits - hf_step_logits(hf, prompt, tokens)).max() > 10 * TOL


def _break_output(path: Path, name: str, delta: float) -> None:
    """Add `delta` to graph output `name` (a broken cache update)."""
    m = onnx.load(str(path))
    for node in m.graph.node:
        for i, o in enumerate(node.output):
            if o == name:
                node.output[i] = name + ".broken"
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(delta, np.float32), name + ".delta"))
    m.graph.node.append(onnx.helper.make_node("Add", [name + ".broken", name + ".delta"], [name]))
    onnx.save(m, str(path))


@pytest.mark.slow
def test_a_broken_cache_update_in_the_graphs_fails_verify(hf_package, tmp_path):
    _, pkg, _ = hf_package
    dst = tmp_path / "pkg"
    shutil.copytree(pkg, dst)
    for g in ("prefill", "decode"):
        _break_output(dst / "onnx" / f"{g}.onnx", "present.1.compressed", 1e-2)  # layer 1: CSA
    failures = ort_runtime.verify_golden(dst)
    assert any(f.startswith("prefill/present.1.compressed") for f in failures), failures
    assert any(f.startswith("decode/present.1.compressed") for f in failures), failures
    with pytest.raises(PackageError, match=r"onnx/prefill.onnx: (size|sha256) mismatch"):
        verify_package(dst)


@pytest.mark.slow
def test_a_perturbed_golden_output_fails_verify(hf_package, tmp_path):
    _, pkg, _ = hf_package
    dst = tmp_path / "pkg"
    shutil.copytree(pkg, dst)
    f = dst / "golden" / "decode.out.present.2.compressed.npy"  # layer 2: HCA
    a = np.load(f)
    a[0, -1, 0] += 0.05
    np.save(f, a)
    failures = ort_runtime.verify_golden(dst)
    assert failures and failures[0].startswith("decode/present.2.compressed: 1 of"), failures
