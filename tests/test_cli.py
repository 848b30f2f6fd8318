"""The mlamoe CLI: bad input gives one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import models
from pipeline.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_help_lists_the_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("compile", "verify", "inspect", "generate"):
        assert cmd in r.output


@pytest.mark.parametrize("args, needle", [
    (("compile", "--model", "tiny", "--target", "nosuch"), "unknown target 'nosuch'"),
    (("compile", "--model", "nosuch", "--target", "ort-cpu"), "unknown model preset 'nosuch'"),
    (("compile", "--model", "tiny", "--target", "ort-cpu", "--quant", "fp4"), "supports none"),
    (("generate", "tiny", "--prompt-ids", "1,x"), "comma-separated integers"),
    (("generate", "tiny", "--prompt-ids", "1,99999"), "outside the vocabulary"),
])
def test_bad_arguments_give_clear_errors(args, needle, tmp_path):
    r = run(*args, *(("--out", str(tmp_path / "o")) if args[0] == "compile" else ()))
    assert r.exit_code != 0
    assert needle in r.output
    assert "Traceback" not in r.output


def test_checkpoint_dir_without_config_json(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    r = run("compile", "--model", str(tmp_path / "ckpt"), "--target", "ort-cpu", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "config.json" in r.output and "Traceback" not in r.output


def test_existing_output_refused_without_force(tmp_path):
    (tmp_path / "o").mkdir()
    r = run("compile", "--model", "tiny", "--target", "ort-cpu", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "--force" in r.output


def test_generate_json_eager_matches_models_api():
    r = run("generate", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    tokens, logits = models.greedy_generate(models.load("tiny"), [1, 2, 3], 4)
    assert got["tokens"] == tokens[0].tolist()
    assert np.allclose(np.array(got["step_logits"]), logits[0].numpy(), atol=1e-6)


def test_invalid_graph_is_reported_by_the_checker(tmp_path):
    from pipeline.export import ExportError, check_graph
    bad = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["a", "missing"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]), ir_version=10)
    path = tmp_path / "bad.onnx"
    onnx.save(bad, path)
    with pytest.raises(ExportError) as e:
        check_graph(path)
    assert "bad.onnx" in str(e.value) and "checker" in str(e.value)


def test_readme_commands_agree_with_help():
    """Every command and option `mlamoe --help` lists appears in the README's command synopsis."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    synopsis = readme[readme.index("## Commands"):]
    for name, cmd in main.commands.items():
        assert f"mlamoe {name}" in synopsis, name
        for p in cmd.params:
            for opt in p.opts:
                if opt.startswith("--") and opt != "--help":
                    assert opt in synopsis, f"mlamoe {name} {opt} missing from the README's ## Commands"
