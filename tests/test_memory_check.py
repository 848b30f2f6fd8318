"""The memory preflight of `mlamoe compile` (pipeline/memory_check.py): a model whose estimated peak exceeds the
available memory is refused before any weight is read, with one clear line and exit code 2; tiny passes;
--ignore-memory-check skips the refusal. The available memory is faked (monkeypatched), the load is replaced by
a sentinel, so no test here compiles anything."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

import models
from models.errors import MlamoeError
from pipeline import memory_check
from pipeline.cli import main

GiB = 2 ** 30


class Reached(MlamoeError):
    pass


@pytest.fixture
def no_load(monkeypatch):
    """models.load (and with it every weight read) replaced by one that says it was reached."""
    def load(spec, *a, **k):
        raise Reached(f"reached models.load({spec})")
    monkeypatch.setattr(models, "load", load)


def fake_available(monkeypatch, n: int, source: str = "MemAvailable in /proc/meminfo (faked)"):
    monkeypatch.setattr(memory_check, "available_memory", lambda: (n, source))


def compile_(*args, tmp_path):
    return CliRunner().invoke(main, ["compile", "--target", "ort-cpu", "--out", str(tmp_path / "o"), *args])


def test_stream_estimate_is_the_largest_layers_and_refuses_past_it(monkeypatch, tmp_path, no_load):
    """--stream's estimate (pipeline/memory_check.py estimate(stream=True)) grows with the largest layer, not the layer
    count; past the available memory it refuses with its own message, before reading a weight."""
    import json
    import dataclasses
    cfg = models.load_config("deepseek-v2-lite")
    deeper = dataclasses.replace(cfg, num_hidden_layers=2 * cfg.num_hidden_layers)
    assert memory_check.estimate(deeper, stream=True).peak_bytes == memory_check.estimate(cfg, stream=True).peak_bytes
    assert memory_check.estimate(cfg, stream=True).peak_bytes < memory_check.estimate(cfg).peak_bytes / 3
    folder = tmp_path / "v2-lite-config-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    fake_available(monkeypatch, 8 * GiB)
    r = compile_("--model", str(folder), "--stream", "--quant", "int8", tmp_path=tmp_path)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    est = memory_check.estimate(cfg, stream=True)
    assert "--stream holds one decoder layer at a time" in r.output and f"{est.peak_bytes / GiB:.1f} GiB" in r.output, \
        r.output
    assert not (tmp_path / "o").exists()


def test_config_only_v2_lite_is_refused_before_loading(monkeypatch, tmp_path, no_load):
    fake_available(monkeypatch, 22 * GiB)
    r = compile_("--model", "deepseek-v2-lite", tmp_path=tmp_path)
    assert r.exit_code == 2 and "Traceback" not in r.output and "reached models.load" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.output
    msg = errors[0]
    est = memory_check.estimate(models.load_config("deepseek-v2-lite"))
    for words in ("deepseek-v2-lite", "15,706,484,224 parameters", "58.5 GiB of fp32 weights",
                  f"about {est.peak_bytes / GiB:.1f} GiB at its peak", f"{memory_check.COMPILE_FACTOR}x",
                  memory_check.MEASURED, "22.0 GiB is available (MemAvailable in /proc/meminfo (faked))",
                  "--ignore-memory-check", "compile a checkpoint folder with --stream, one layer at a time"):
        assert words in msg, (words, msg)
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_folder_with_little_memory_is_refused_without_reading_weights(monkeypatch, tmp_path):
    folder = models.save(models.load("tiny"), tmp_path / "ckpt")
    import models.checkpoint as ckpt
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda *a, **k: pytest.fail("weights were read"))
    monkeypatch.setattr(ckpt, "safe_open", lambda *a, **k: pytest.fail("weights were opened"))
    fake_available(monkeypatch, 100 * 2 ** 20)
    r = compile_("--model", str(folder), tmp_path=tmp_path)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"error: {folder}: 217,232 parameters" in r.output and "0.1 GiB is available" in r.output


def test_tiny_passes_the_check(monkeypatch, tmp_path, no_load):
    fake_available(monkeypatch, 4 * GiB)
    r = compile_("--model", "tiny", tmp_path=tmp_path)
    assert "reached models.load(tiny)" in r.output and "parameters (" not in r.output, r.output
    assert "[preflight] memory check: estimated peak 1.5 GiB, 4.0 GiB available" in r.output


def test_ignore_memory_check_skips_the_refusal(monkeypatch, tmp_path, no_load):
    fake_available(monkeypatch, 1 * GiB)
    r = compile_("--model", "deepseek-v2-lite", "--ignore-memory-check", tmp_path=tmp_path)
    assert "reached models.load(deepseek-v2-lite)" in r.output, r.output
    assert "[preflight] --ignore-memory-check: estimated peak" in r.output and "1.0 GiB available" in r.output


def test_the_fit_reproduces_its_measurements():
    """COMPILE_BASE_BYTES + COMPILE_FACTOR x fp32 bytes against the measured peaks it was fitted to."""
    import json
    from pathlib import Path
    rec = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_compile_peak_rss.json").read_text())
    assert rec["fit"]["base_bytes"] == memory_check.COMPILE_BASE_BYTES
    assert rec["fit"]["factor"] == memory_check.COMPILE_FACTOR
    for run in rec["runs"]:  # tiny, small, medium
        est = memory_check.estimate(models.load_config(run["model"]))
        assert est.fp32_bytes == run["fp32_weight_bytes"] and est.peak_bytes == run["estimate_bytes"]
        assert est.peak_bytes / run["peak_rss_bytes"] > 0.99, run["model"]  # never below what was seen
        if run["model"] in ("small", "medium"):  # the points of the fit
            assert abs(est.peak_bytes / run["peak_rss_bytes"] - 1) < 0.01, run["model"]
    # medium compiled here (6.98 GB) and must pass on a machine like this one; V2-Lite is far beyond it
    assert memory_check.estimate(models.load_config("medium")).peak_bytes < 20 * GiB
    assert memory_check.estimate(models.load_config("deepseek-v2-lite")).peak_bytes > 150 * GiB


def test_available_memory_reads_meminfo_and_a_smaller_cgroup_limit(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n")
    cg = tmp_path / "cg"
    (cg / "a" / "b").mkdir(parents=True)
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    monkeypatch.setattr(memory_check, "_MEMINFO", meminfo)
    monkeypatch.setattr(memory_check, "_PROC_CGROUP", proc)
    monkeypatch.setattr(memory_check, "_CGROUP", cg)
    assert memory_check.available_memory() == (20000000 * 1024, "MemAvailable in /proc/meminfo")
    (cg / "a" / "b" / "memory.max").write_text("max\n")
    assert memory_check.available_memory()[0] == 20000000 * 1024
    (cg / "a" / "b" / "memory.max").write_text(f"{8 * GiB}\n")
    n, source = memory_check.available_memory()
    assert n == 8 * GiB and "cgroup memory limit" in source and "memory.max" in source
    (cg / "a" / "b" / "memory.max").write_text(f"{30 * GiB}\n")  # larger than MemAvailable: MemAvailable
    assert memory_check.available_memory()[0] == 20000000 * 1024
    proc.write_text("4:memory:/x\n0::/\n")  # cgroup v1 with its "no limit" value
    (cg / "memory" / "x").mkdir(parents=True)
    (cg / "memory" / "x" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory_check.available_memory()[0] == 20000000 * 1024
    (cg / "memory" / "x" / "memory.limit_in_bytes").write_text(f"{2 * GiB}\n")
    assert memory_check.available_memory()[0] == 2 * GiB
    meminfo.write_text("MemTotal: 1 kB\n")
    proc.write_text("")
    assert memory_check.available_memory()[0] is None
    assert "available memory unknown" in memory_check.check("tiny", models.load_config("tiny"))


def test_a_path_that_is_no_folder_keeps_the_loaders_message(tmp_path):
    """The preflight reads configs as models.load does: a missing path is "not a checkpoint folder", not an
    unknown preset."""
    r = compile_("--model", str(tmp_path / "nowhere" / "ckpt"), tmp_path=tmp_path)
    assert r.exit_code == 2 and "not a checkpoint folder" in r.output and "Traceback" not in r.output, r.output


def test_load_config_tells_a_path_from_a_preset_as_load_does(tmp_path):
    """models.load_config of a missing path or a file is models.load's "not a checkpoint folder", not "unknown preset";
    an unknown bare name still is an unknown preset."""
    import models
    from models.errors import CheckpointError, ConfigError
    afile = tmp_path / "weights.safetensors"
    afile.write_bytes(b"")
    for bad in (tmp_path / "no-such-folder", afile):
        with pytest.raises(CheckpointError, match="not a checkpoint folder"):
            models.load_config(bad)
    with pytest.raises(ConfigError, match="unknown model preset"):
        models.load_config("no-such-preset")
