"""The target-builder interface (targets/base.py) and its registry (targets/__init__.py): every target is a
Target found by name, target-only options are checked by one rule with the messages the CLI always gave,
and the core builds, verifies and inspects a target it has never heard of through that interface alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import targets
from pipeline.build import BuildContext, write_tokenizer
from pipeline.cli import main
from pipeline.compile import CompileError, compile_package
from pipeline.package import write_manifest
from pipeline.stages import StageRecord
from targets.base import Target, TargetOption, TargetProfile


def test_registry_holds_one_target_per_profile():
    assert set(targets.TARGETS) == {"ort-cpu", "ort-cuda", "ascend"}
    for name, t in targets.TARGETS.items():
        assert isinstance(t, Target) and t.name == name and targets.get_profile(name) is t.profile
    assert targets.DEFAULT in targets.TARGETS
    assert targets.find("nosuch") is None
    with pytest.raises(targets.TargetError, match=r"unknown target 'nosuch': choose one of ort-cpu, ascend, ort-cuda"):
        targets.get("nosuch")


NONE_GIVEN = {"soc": None, "precision": None, "require_om": False, "ranks": None, "redundant": 0,
              "int8_accuracy_level": None}


@pytest.mark.parametrize("target, quant, given, messages", [
    ("ort-cpu", "none", {"soc": "Ascend910B3"}, ["--soc applies to --target ascend only"]),
    ("ort-cuda", "none", {"precision": "fp16", "require_om": True},
     ["--precision applies to --target ascend only", "--require-om applies to --target ascend only"]),
    ("ascend", "none", {"ranks": 2, "redundant": 1}, ["--ranks/--redundant apply to --target ort-cpu"]),
    ("ascend", "none", {"int8_accuracy_level": 4},
     ["--int8-accuracy-level applies to --quant int8 on --target ort-cpu, not --quant none on ascend"]),
    ("ort-cpu", "fp8", {"int8_accuracy_level": 4},
     ["--int8-accuracy-level applies to --quant int8 on --target ort-cpu, not --quant fp8 on ort-cpu"]),
    ("ort-cpu", "int8", {"int8_accuracy_level": 4, "ranks": 2, "redundant": 1}, []),
    ("ascend", "w8a8", {"soc": "Ascend910B3", "precision": "fp16", "require_om": True}, []),
    ("ort-cuda", "none", NONE_GIVEN, []),  # defaults are not "given"
])
def test_option_problems(target, quant, given, messages):
    assert [p.message for p in targets.option_problems(target, quant, given)] == messages


def test_unknown_option_is_named():
    with pytest.raises(targets.TargetError, match=r"unknown compile option 'sco'.*soc"):
        targets.option_problems("ascend", "none", {"sco": "x"})


@pytest.mark.parametrize("args, needle", [
    (("--target", "ort-cpu", "--soc", "Ascend910B3"), "--soc applies to --target ascend only"),
    (("--target", "ort-cuda", "--require-om"), "--require-om applies to --target ascend only"),
    (("--target", "ascend", "--ranks", "2"), "--ranks/--redundant apply to --target ort-cpu"),
    (("--target", "ascend", "--int8-accuracy-level", "4"),
     "--int8-accuracy-level applies to --quant int8 on --target ort-cpu, not --quant none on ascend"),
    (("--target", "ort-cpu", "--quant", "int8", "--int8-accuracy-level", "2"), "--int8-accuracy-level 2: choose 0"),
    (("--target", "ascend", "--soc", "Ascend999"), "unknown soc_version 'Ascend999'"),
])
def test_cli_refuses_target_only_options_before_any_work(args, needle, tmp_path):
    r = CliRunner().invoke(main, ["compile", "--model", "tiny", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_compile_package_checks_options_too(tmp_path):
    with pytest.raises(CompileError, match="--soc applies to --target ascend only"):
        compile_package("tiny", "ort-cpu", tmp_path / "o", soc="Ascend910B3")
    assert not (tmp_path / "o").exists()


class _ToyTarget(Target):
    """A target the core has never heard of: writes one file and a manifest, verifies by reading it."""
    profile = TargetProfile(name="toy", description="a test target", opset=(17, 23), passes=(),
                            quant_schemes=("none",), dynamic_shapes=True)
    options = (TargetOption("colour", "--colour", None),)

    def __init__(self):
        self.contexts: list[BuildContext] = []

    def validate(self, quant, options):
        if options["colour"] == "plaid":
            raise targets.TargetError("--colour plaid: choose red or blue")

    def build(self, ctx):
        self.contexts.append(ctx)
        (ctx.package / "toy.txt").write_text(f"{ctx.options['colour']}\n")
        write_tokenizer(ctx.package, ctx.tokenizer)  # the base manifest's "tokenizer" names these files
        ctx.runner.records.append(StageRecord("target/toy", {}, dict(ctx.load.inputs)))
        write_manifest(ctx.package, {**ctx.base_manifest,
                                     "target": {"name": "toy", "description": self.profile.description,
                                                "quantization": ctx.quant},
                                     "stages": [r.to_dict() for r in ctx.runner.records]})

    def verify(self, root, manifest, lines):
        ok = (root / "toy.txt").read_text() == "red\n"
        lines.append(("ok   " if ok else "FAIL ") + "toy.txt")
        return ok, lines

    def describe(self, manifest):
        return ["toy       one file"]


def test_core_builds_verifies_and_inspects_an_unknown_target(tmp_path, monkeypatch):
    toy = _ToyTarget()
    monkeypatch.setitem(targets.TARGETS, "toy", toy)
    with pytest.raises(CompileError, match="--soc applies to --target ascend only"):
        compile_package("tiny", "toy", tmp_path / "bad", soc="x")
    with pytest.raises(targets.TargetError, match="--colour plaid"):
        compile_package("tiny", "toy", tmp_path / "bad", colour="plaid")
    with pytest.raises(CompileError, match="--colour applies to --target toy only"):
        compile_package("tiny", "ort-cpu", tmp_path / "bad", colour="red")
    assert toy.contexts == []  # all refused before any work

    out = compile_package("tiny", "toy", tmp_path / "pkg", colour="red", use_cache=False, progress=lambda m: None)
    assert out == tmp_path / "pkg" and (out / "toy.txt").read_text() == "red\n"
    (ctx,) = toy.contexts
    assert ctx.quant == "none" and ctx.options == {"colour": "red"} and ctx.out == out
    assert ctx.package != out  # the build filled the staged folder; the core renamed it into place
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["load", "target/toy"]
    assert Path(str(out) + ".tar.gz").is_file()

    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0 and "ok   toy.txt" in r.output, r.output
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "toy       one file" in r.output, r.output
    (out / "toy.txt").write_text("blue\n")  # the hashes catch it before the target's check runs
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 1 and "FAIL hashes" in r.output
