"""ONNX Runtime GenAI: the genai folder of an ort-cpu package (passes/genai_cache_layout.py,
targets/genai_config.py, targets/genai_folder.py).

References, each independent of the code under test:
  - the package's own prefill graph on ONNX Runtime, fed the same state in its own layout (the rewritten
    graph must compute the same logits and the same new state: it only moves the cache's IO);
  - `mlamoe generate PACKAGE --prompt ... --json` (the package runtime) for the tokens and logits that
    onnxruntime-genai 0.18 produces from the genai folder. onnxruntime-genai lives in its own
    environment (it cannot share one with the compiler's onnxruntime): MLAMOE_GENAI_PYTHON when set
    (only it), else .venv-genai/bin/python in the repository, else /work/genai-venv/bin/python; the
    tests that need it skip with the reason where none imports onnxruntime_genai (docs/genai.md: how
    to make one).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from passes.genai_cache_layout import GenaiCacheLayoutError, GenaiCacheLayoutPass, join_state, layout_of, split_state
from pipeline.compile import compile_package
from pipeline.package import verify_package
from pipeline.weights_file import WEIGHTS_FILE, external_files
from targets.genai_config import genai_config
from targets.genai_folder import check_golden, from_package, manifest_section

REPO = Path(__file__).resolve().parents[1]
TRAINED = REPO / "models" / "trained" / "trained-small"
RUNNER = Path(__file__).resolve().parent / "genai_generate.py"
LOGITS_ATOL = 1e-4  # genai and the package runtime run the same graph on the same ORT: float noise only


def _genai_python() -> tuple[str | None, str]:
    tried = []
    given = os.environ.get("MLAMOE_GENAI_PYTHON")  # when set, the only one tried
    for cand in [given] if given is not None else [str(REPO / ".venv-genai" / "bin" / "python"),
                                                    "/work/genai-venv/bin/python"]:
        tried.append(cand)
        if Path(cand).is_file():
            r = subprocess.run([cand, "-c", "import onnxruntime_genai as og; print(og.__version__)"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                return cand, r.stdout.strip()
    return None, ("onnxruntime-genai is not installed in its own environment (tried " + ", ".join(tried) +
                  "): python3.11 -m venv .venv-genai && .venv-genai/bin/pip install onnxruntime-genai==0.18.0")


GENAI_PYTHON, GENAI_NOTE = _genai_python()
needs_genai = pytest.mark.skipif(GENAI_PYTHON is None, reason=GENAI_NOTE)


def _session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, feeds: dict) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, stage_cache):
    out = tmp_path_factory.mktemp("genai")
    pkg = compile_package("tiny", "ort-cpu", out / "tiny", cache_dir=stage_cache, progress=lambda m: None)
    from_package(pkg, out / "tiny-genai")
    from_package(pkg, out / "tiny-genai-single", form="single")
    return pkg, out / "tiny-genai"


@pytest.fixture(scope="module")
def tiny_single(tiny):
    return tiny[0], tiny[1].parent / "tiny-genai-single"


GRAPHS = (("prefill", "genai_prefill.onnx", (2, 5, 4), (1, 0, 7), (1, 9, 1)),
          ("decode", "genai_decode.onnx", (2, 5, 1), (1, 0, 1)))


def _random_state(sess: ort.InferenceSession, batch: int, past: int, seq: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 256, (batch, seq), dtype=np.int64)
        else:
            feeds[i.name] = rng.standard_normal((batch, past, i.shape[2])).astype(np.float32)
    return feeds


@pytest.mark.parametrize("graph", GRAPHS, ids=[g[0] for g in GRAPHS])
def test_rewritten_graph_computes_what_the_package_graph_computes(tiny, graph):
    pkg, genai = tiny
    name, filename, *shapes = graph
    ref, new = _session(pkg / "onnx" / f"{name}.onnx"), _session(genai / filename)
    layout = layout_of(ir.load(genai / filename))
    for batch, past, seq in shapes:
        feeds = _random_state(ref, batch, past, seq)
        want = _run(ref, feeds)
        got = _run(new, {"input_ids": feeds["input_ids"], **split_state(layout, feeds)})
        assert np.abs(got["logits"] - want["logits"]).max() <= 1e-6, (batch, past, seq)
        present = join_state(layout, got)
        assert sorted(present) == sorted(n for n in want if n.startswith("present."))
        for name, arr in present.items():
            assert arr.shape == want[name].shape and np.abs(arr - want[name]).max() <= 1e-6, name


def test_layout_is_one_key_value_pair_per_layer_of_half_the_latent_row(tiny):
    pkg, genai = tiny
    before = {i.name: i for i in onnx.load(pkg / "onnx" / "prefill.onnx", load_external_data=False).graph.input}
    model = ir.load(genai / "genai_prefill.onnx")
    layout = layout_of(model)
    inputs = {v.name: v for v in model.graph.inputs}
    assert not any(n.startswith("past.") for n in inputs)  # every state tensor went into the pair
    for spec in layout["layers"]:
        i = spec["layer"]
        widths = [before[f"past.{i}.{e['name']}"].type.tensor_type.shape.dim[2].dim_value for e in spec["entries"]]
        assert [e["width"] for e in spec["entries"]] == widths
        for name in (layout["key_names"] % i, layout["value_names"] % i):
            shape = inputs[name].shape
            assert len(shape) == 4 and shape[1] == 1 and shape[3] == spec["head_size"]
        # the size of the cache is kept: 2 * H = the row's width (plus one pad value when it is odd)
        assert 2 * spec["head_size"] == sum(widths) + spec["pad"] and spec["pad"] in (0, 1)


def test_genai_config_describes_the_rewritten_graphs(tiny, tiny_single):
    pkg, genai = tiny
    cfg = json.loads((genai / "genai_config.json").read_text())
    model = ir.load(genai / "genai_prefill.onnx")
    manifest = json.loads((pkg / "manifest.json").read_text())
    dec = cfg["model"]["decoder"]
    assert cfg["model"]["type"] == "decoder-pipeline" and "filename" not in dec
    (prompt,), (token_gen,) = (list(d.values()) for d in dec["pipeline"])
    assert (prompt["filename"], prompt["run_on_prompt"], prompt["run_on_token_gen"]) == ("genai_prefill.onnx", True, False)
    assert (token_gen["filename"], token_gen["run_on_prompt"], token_gen["run_on_token_gen"]) == (
        "genai_decode.onnx", False, True)
    for spec in (prompt, token_gen):
        g = onnx.load(genai / spec["filename"], load_external_data=False).graph
        assert spec["inputs"] == [i.name for i in g.input] and spec["outputs"] == [o.name for o in g.output]
    single = json.loads((tiny_single[1] / "genai_config.json").read_text())
    assert single["model"]["type"] == "decoder" and (tiny_single[1] / single["model"]["decoder"]["filename"]).is_file()
    assert {k: v for k, v in single["model"]["decoder"].items() if k != "filename"} == {
        k: v for k, v in dec.items() if k != "pipeline"}
    values = {v.name: v for v in [*model.graph.inputs, *model.graph.outputs]}
    names = set(values)
    for i in range(dec["num_hidden_layers"]):
        for t in (dec["inputs"]["past_key_names"], dec["inputs"]["past_value_names"],
                  dec["outputs"]["present_key_names"], dec["outputs"]["present_value_names"]):
            assert values[t % i].shape[3] == dec["head_size"] and values[t % i].shape[1] == 1
    assert dec["num_hidden_layers"] == sum(n.startswith("past_key_values.") for n in names) // 2
    assert dec["inputs"]["input_ids"] in names and dec["outputs"]["logits"] in names
    assert dec["num_key_value_heads"] == 1
    assert cfg["model"]["vocab_size"] == manifest["io"]["vocab_size"]
    assert cfg["model"]["context_length"] == manifest["model"]["config"]["max_position_embeddings"]
    assert cfg["search"]["do_sample"] is False and cfg["search"]["num_beams"] == 1
    for f in manifest["tokenizer"]["files"]:
        assert (genai / Path(f).name).read_bytes() == (pkg / f).read_bytes()


def test_swapped_halves_break_the_comparison(tiny):
    """Fault: key and value fed the wrong way round (a config naming them swapped) must not pass."""
    pkg, genai = tiny
    ref, new = _session(pkg / "onnx" / "prefill.onnx"), _session(genai / "genai_prefill.onnx")
    layout = layout_of(ir.load(genai / "genai_prefill.onnx"))
    feeds = _random_state(ref, 1, 6, 3)
    want = _run(ref, feeds)
    state = split_state(layout, feeds)
    swapped = {}
    for spec in layout["layers"]:
        k, v = layout["key_names"] % spec["layer"], layout["value_names"] % spec["layer"]
        swapped[k], swapped[v] = state[v], state[k]
    got = _run(new, {"input_ids": feeds["input_ids"], **swapped})
    assert np.abs(got["logits"] - want["logits"]).max() > 1e-2


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def _swap_config_names(folder: Path) -> None:
    cfg = json.loads((folder / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    dec["inputs"]["past_key_names"], dec["inputs"]["past_value_names"] = (
        dec["inputs"]["past_value_names"], dec["inputs"]["past_key_names"])
    (folder / "genai_config.json").write_text(json.dumps(cfg))


def test_genai_graphs_reproduce_the_packages_golden_data(tiny, tiny_single, tmp_path):
    """The build-time check (no onnxruntime-genai needed): golden cases and greedy tokens through the
    genai graphs, bound by the config's names; a config naming key and value swapped fails it."""
    pkg, genai = tiny
    assert check_golden(pkg, genai) == [] and check_golden(pkg, tiny_single[1]) == []
    bad = _copy(genai, tmp_path / "bad")
    _swap_config_names(bad)
    failures = check_golden(pkg, bad)
    assert any(f.startswith("prefill-chunk/logits") for f in failures), failures
    assert any("greedy generation" in f for f in failures), failures


def test_manifest_section_names_the_folder_and_the_graphs(tiny):
    pkg, genai = tiny
    sec = manifest_section(genai.parent, genai)
    assert sec["dir"] == genai.name and sec["type"] == "decoder-pipeline"
    assert sec["graphs"] == {"prefill": f"{genai.name}/genai_prefill.onnx", "decode": f"{genai.name}/genai_decode.onnx"}
    assert sec["files"] == sorted(f"{genai.name}/{f}" for f in ("genai_config.json", "genai_prefill.onnx",
                                                               "genai_decode.onnx", "weights.data"))
    head = json.loads((genai / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    assert sec["cache"]["shape"] == ["batch", 1, "seq", head]


def test_package_keeps_one_copy_of_the_weights_for_both_runtimes(tiny, tmp_path, stage_cache):
    """The compile's genai files live in onnx/ over the package's one weights file: it is byte for byte the
    file of a package without them (--genai none), every genai graph references only it, the archive holds
    one weights file, and the package verifies."""
    pkg, _ = tiny
    folder = pkg / "onnx"
    none = compile_package("tiny", "ort-cpu", tmp_path / "none", cache_dir=stage_cache, progress=lambda m: None,
                           genai="none")
    assert sorted(p.name for p in (none / "onnx").iterdir()) == ["decode.onnx", "prefill.onnx", WEIGHTS_FILE]
    assert (folder / WEIGHTS_FILE).read_bytes() == (none / "onnx" / WEIGHTS_FILE).read_bytes()
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["io"]["weights"]["bytes"] == (folder / WEIGHTS_FILE).stat().st_size
    assert set(manifest["genai"]["files"]) >= {"onnx/genai_config.json", "onnx/genai_prefill.onnx",
                                               "onnx/genai_decode.onnx", f"onnx/{WEIGHTS_FILE}"}
    for g in ("prefill", "decode"):
        refs = external_files(folder / f"genai_{g}.onnx")
        assert list(refs) == [WEIGHTS_FILE] and refs == external_files(folder / f"{g}.onnx"), g
    assert [p.name for p in pkg.rglob("*.data")] == [WEIGHTS_FILE]
    import tarfile
    with tarfile.open(pkg.parent / f"{pkg.name}.tar.gz") as tar:
        assert [t.name for t in tar.getmembers() if t.name.endswith(".data")] == [f"{pkg.name}/onnx/{WEIGHTS_FILE}"]
    assert verify_package(pkg) == []
    assert check_golden(pkg, folder) == []


def test_single_form_compiles_into_onnx_over_the_same_file(tiny, tmp_path, stage_cache):
    """--genai single: onnx/genai_model.onnx beside the package graphs, the same weights file."""
    pkg, _ = tiny
    single = compile_package("tiny", "ort-cpu", tmp_path / "single", cache_dir=stage_cache, progress=lambda m: None,
                             genai="single")
    m = json.loads((single / "manifest.json").read_text())
    assert m["genai"]["type"] == "decoder" and m["genai"]["graphs"] == {"prefill": "onnx/genai_model.onnx",
                                                                        "decode": "onnx/genai_model.onnx"}
    assert m["io"]["weights"]["graphs"] == ["onnx/prefill.onnx", "onnx/decode.onnx", "onnx/genai_model.onnx"]
    assert (single / "onnx" / WEIGHTS_FILE).read_bytes() == (pkg / "onnx" / WEIGHTS_FILE).read_bytes()
    assert check_golden(single, single / "onnx") == [] and verify_package(single) == []


def test_genai_files_never_overwrite_or_enter_a_package(tiny, tmp_path):
    from pipeline.weights_file import WeightsFile
    from targets.genai_folder import build_genai_folder
    pkg, _ = tiny
    with pytest.raises(ValueError, match="inside the package"):
        from_package(pkg, pkg / "genai")
    with pytest.raises(ValueError, match="inside the package"):
        from_package(pkg, pkg)
    # a shared folder that already holds genai files: refused before anything is written
    copy = tmp_path / "pkg"
    import shutil
    shutil.copytree(pkg, copy)
    before = {p.name: p.read_bytes() for p in (copy / "onnx").iterdir()}
    manifest = json.loads((copy / "manifest.json").read_text())
    graphs = {g: ir.load(copy / "onnx" / f"{g}.onnx") for g in ("prefill", "decode")}
    with WeightsFile.reopen(copy / "onnx", ["prefill.onnx", "decode.onnx"]) as w, \
            pytest.raises(ValueError, match=r"genai_config.json.*would overwrite"):
        build_genai_folder(copy / "onnx", graphs, manifest["model"]["config"], {}, weights=w)
    assert {p.name: p.read_bytes() for p in (copy / "onnx").iterdir()} == before


def _odd_graph() -> ir.Model:
    """A stand-in family: per layer states "a" [B, S, 3] and "b" [B, S, 4] (an odd row of 7), each
    appended a slice of x; y = every present state summed over the sequence."""
    from onnx import TensorProto, helper
    T = TensorProto
    inputs = [helper.make_tensor_value_info("x", T.FLOAT, ["batch", "seq", 7])]
    outputs = [helper.make_tensor_value_info("y", T.FLOAT, ["batch", 14])]
    inits = [helper.make_tensor(n, T.INT64, [1], [v]) for n, v in (("c0", 0), ("c1", 1), ("c2", 2), ("c3", 3),
                                                                    ("c7", 7))]
    nodes, sums = [], []
    for layer in range(2):
        for name, lo, hi, w in (("a", "c0", "c3", 3), ("b", "c3", "c7", 4)):
            past, present = f"past.{layer}.{name}", f"present.{layer}.{name}"
            inputs.append(helper.make_tensor_value_info(past, T.FLOAT, ["batch", "past", w]))
            outputs.append(helper.make_tensor_value_info(present, T.FLOAT, ["batch", "past+seq", w]))
            nodes += [helper.make_node("Slice", ["x", lo, hi, "c2"], [f"new.{layer}.{name}"]),
                      helper.make_node("Concat", [past, f"new.{layer}.{name}"], [present], axis=1),
                      helper.make_node("ReduceSum", [present, "c1"], [f"sum.{layer}.{name}"], keepdims=0)]
            sums.append(f"sum.{layer}.{name}")
    nodes.append(helper.make_node("Concat", sums, ["y"], axis=-1))
    graph = helper.make_graph(nodes, "odd", inputs, outputs, inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def test_any_state_names_and_an_odd_row_width(tmp_path):
    """The pass reads the states from the graph (no family's names) and pads an odd row by one value."""
    model = _odd_graph()
    ref_path, new_path = tmp_path / "ref.onnx", tmp_path / "new.onnx"
    ir.save(model, ref_path)
    GenaiCacheLayoutPass()(model)
    ir.save(model, new_path)
    layout = layout_of(model)
    assert [s["head_size"] for s in layout["layers"]] == [4, 4] and [s["pad"] for s in layout["layers"]] == [1, 1]
    ref, new = _session(ref_path), _session(new_path)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 3, 7)).astype(np.float32)}
    for layer in range(2):
        feeds[f"past.{layer}.a"] = rng.standard_normal((2, 5, 3)).astype(np.float32)
        feeds[f"past.{layer}.b"] = rng.standard_normal((2, 5, 4)).astype(np.float32)
    want = _run(ref, feeds)
    got = _run(new, {"x": feeds["x"], **split_state(layout, feeds)})
    assert np.array_equal(got["y"], want["y"])
    for name, arr in join_state(layout, got).items():
        assert np.array_equal(arr, want[name]), name
    for spec in layout["layers"]:  # the pad column stays zero
        assert not got[layout["present_value_names"] % spec["layer"]][..., -1].any()


def test_graph_without_cache_inputs_is_refused():
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(GenaiCacheLayoutError, match="no cache inputs"):
        GenaiCacheLayoutPass()(ir.from_proto(helper.make_model(g)))


def test_config_writer_refuses_a_graph_the_pass_did_not_rewrite(tiny):
    pkg, _ = tiny
    with pytest.raises(KeyError):
        genai_config({"max_position_embeddings": 8}, ir.load(pkg / "onnx" / "prefill.onnx"))


# -- onnxruntime-genai itself ------------------------------------------------------------------------

def genai_generate(folder: Path, prompt: str, n: int) -> dict:
    r = subprocess.run([GENAI_PYTHON, str(RUNNER), str(folder), "--prompt", prompt, "--max-new-tokens", str(n)],
                       capture_output=True, text=True, timeout=300, cwd=str(folder))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def mlamoe_generate(pkg: Path, prompt: str, n: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "pipeline", "generate", str(pkg), "--prompt", prompt,
                        "--max-new-tokens", str(n), "--json"], capture_output=True, text=True, timeout=300,
                       cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def assert_same_generation(got: dict, want: dict, eos: list[int]) -> None:
    """genai stops at an end-of-sequence id, `mlamoe generate` does not: compare up to it."""
    n = len(got["tokens"])
    assert got["tokens"] == want["tokens"][:n], (got["tokens"], want["tokens"])
    assert n == len(want["tokens"]) or got["tokens"][-1] in eos
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(got["step_logits"], want["step_logits"][:n]))
    assert diff <= LOGITS_ATOL, diff
    # the text: equal where it is valid UTF-8. Bytes that are not (a random model's output) are
    # replaced differently: `tokenizers` gives one U+FFFD per bad byte, genai's decoder (onnxruntime-
    # extensions) fewer (docs/genai.md)
    if n == len(want["tokens"]) and "\ufffd" not in want["text"]:
        assert got["text"] == want["text"]


def _eos(pkg: Path) -> list[int]:
    cfg = json.loads((pkg / "manifest.json").read_text())["model"]["config"]
    e = cfg.get("eos_token_id")
    return [] if e is None else list(e) if isinstance(e, list) else [e]


@needs_genai
@pytest.mark.parametrize("form", ["pipeline", "single"])
@pytest.mark.parametrize("prompt", ["def main():", "import os\nimport sys\n\nclass", "d"])
def test_genai_generates_the_package_runtimes_tokens_on_tiny(tiny, tiny_single, prompt, form):
    """A one-token prompt ("d") runs on the decode graph in the pipeline form (genai's prompt step is
    one of more than one token)."""
    pkg, genai = tiny if form == "pipeline" else tiny_single
    got, want = genai_generate(genai, prompt, 24), mlamoe_generate(pkg, prompt, 24)
    assert got["prompt_ids"] == list(prompt.encode("utf-8"))  # byte-level tokenizer through genai's own
    assert_same_generation(got, want, _eos(pkg))


@needs_genai
def test_genai_runs_the_packages_own_onnx_folder(tiny):
    """onnxruntime_genai.Model("PACKAGE/onnx"): the compile's files, beside the package's own graphs."""
    pkg, _ = tiny
    got, want = genai_generate(pkg / "onnx", "def main():", 24), mlamoe_generate(pkg, "def main():", 24)
    assert_same_generation(got, want, _eos(pkg))


@needs_genai
def test_genai_fault_swapped_cache_names_change_the_logits(tiny, tmp_path):
    """A genai_config.json naming key and value the wrong way round runs, but the check catches it."""
    pkg, genai = tiny
    bad = _copy(genai, tmp_path / "bad")
    _swap_config_names(bad)
    got, want = genai_generate(bad, "def main():", 8), mlamoe_generate(pkg, "def main():", 8)
    with pytest.raises(AssertionError):
        assert_same_generation(got, want, _eos(pkg))


@needs_genai
def test_genai_fault_a_wrong_token_gen_graph_changes_the_tokens(tiny, tmp_path):
    """The pipeline really runs genai_decode.onnx for the generated tokens: with its logits negated the
    first token (from genai_prefill.onnx) still agrees and the next ones do not."""
    pkg, genai = tiny
    bad = _copy(genai, tmp_path / "bad")
    m = onnx.load(bad / "genai_decode.onnx")
    for node in m.graph.node:
        node.output[:] = ["logits.inner" if o == "logits" else o for o in node.output]
    m.graph.node.append(onnx.helper.make_node("Neg", ["logits.inner"], ["logits"]))
    onnx.save(m, bad / "genai_decode.onnx")
    got, want = genai_generate(bad, "def main():", 6), mlamoe_generate(pkg, "def main():", 6)
    assert got["tokens"][0] == want["tokens"][0] and got["tokens"][1:] != want["tokens"][1:]


@needs_genai
@pytest.mark.skipif(not (TRAINED / "model.safetensors").is_file(),
                    reason="models/trained/trained-small not built (python -m models.train_small)")
def test_genai_on_trained_small_equals_mlamoe_generate(tmp_path, stage_cache):
    """The issue's check: trained-small's ort-cpu package, "def main():", 16 new tokens, greedy."""
    pkg = compile_package("trained-small", "ort-cpu", tmp_path / "ts", cache_dir=stage_cache, progress=lambda m: None)
    want = mlamoe_generate(pkg, "def main():", 16)
    for form in ("pipeline", "single"):
        if form == "pipeline":  # the files compile wrote into the package's onnx/ (hashed there like every file)
            genai = pkg / "onnx"
        else:
            genai = tmp_path / f"ts-genai-{form}"
            from_package(pkg, genai, form=form)
        assert check_golden(pkg, genai) == [], form
        got = genai_generate(genai, "def main():", 16)
        assert got["tokens"] == want["tokens"] and len(got["tokens"]) == 16, form
        assert_same_generation(got, want, _eos(pkg))
