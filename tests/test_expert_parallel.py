"""Expert-parallel packages and runtime (parallel/expert_parallel.py, runtime/ep_runtime.py) on tiny.

Partitioned runs start real processes on gloo (torchrun, or by hand where a test needs the ranks to
outlive a dead peer) and are compared with the single-device run (world size 1, in-process) and the
eager model: logits within 1e-4, greedy tokens identical over 32 steps.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from runtime import ep_runtime
from runtime.ep_runtime import EPError, ExpertParallelRuntime, load_package
from parallel.expert_parallel import (build_ep_package, calibration_prompts, export_segments, expert_graph,
                                      model_hash_of)
from parallel.partition import PartitionError, plan_partition

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
STEPS = 32
# 3 prompts: 2 ranks split the batch 2/1; on 4 ranks one rank has no row and only serves experts
PROMPTS = np.array([[1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4], [200, 17, 3, 250, 64, 128]], dtype=np.int64)
PROMPT_ARG = ";".join(",".join(map(str, r)) for r in PROMPTS)


@pytest.fixture(scope="module")
def tiny():
    return models.load("tiny")


@pytest.fixture(scope="module")
def packages(tiny, tmp_path_factory):
    """{ranks: package}: 1 rank; 2 ranks (uniform plan); 4 ranks with 2 redundant replicas on a measured load."""
    root = tmp_path_factory.mktemp("ep")
    segs = export_segments(tiny)
    mh = model_hash_of(tiny)
    calib = calibration_prompts(tiny.config, 4, 16)
    return {1: build_ep_package(tiny, root / "r1", 1, segments=segs, model_hash=mh),
            2: build_ep_package(tiny, root / "r2", 2, segments=segs, model_hash=mh),
            4: build_ep_package(tiny, root / "r4", 4, redundant=2, calibration=calib, segments=segs, model_hash=mh)}


@pytest.fixture(scope="module")
def eager(tiny):
    tokens, logits = models.greedy_generate(tiny, PROMPTS, STEPS)
    return tokens.numpy(), logits.numpy()


@pytest.fixture(scope="module")
def single(packages):
    return ExpertParallelRuntime(packages[1]).generate(PROMPTS, STEPS)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_by_hand(package, ranks: int, args: list[str], fail: str) -> list[subprocess.Popen]:
    """Ranks as plain processes (no torchrun agent to stop the survivors): they must notice on their own."""
    port = _free_port()
    return [subprocess.Popen([PY, "-m", "runtime.ep_runtime", "--package", str(package), *args], cwd=REPO,
                             env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(port), MLAMOE_EP_FAIL=fail),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(ranks)]


# ---- graphs ----------------------------------------------------------------------------------------
def test_expert_graph_matches_eager_experts(tiny, tmp_path):
    import onnx_ir as ir
    import onnxruntime as ort
    experts = [5, 0, 3]
    path = tmp_path / "e.onnx"
    ir.save(expert_graph(tiny, 1, experts), path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, tiny.config.hidden_size)).astype(np.float32)
    slot = rng.integers(0, len(experts), 7)
    w = rng.random(7).astype(np.float32)
    y = sess.run(None, {"x": x, "slot": slot, "weight": w})[0]
    mods = tiny.model.layers[1].mlp.experts
    with torch.no_grad():
        ref = np.stack([mods[experts[s]](torch.from_numpy(x[i])).numpy() * w[i] for i, s in enumerate(slot)])
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_package_layout(packages):
    root = packages[4]
    man, plan = load_package(root, 4)
    assert (root / "launch.sh").stat().st_mode & 0o111 and "--nproc_per_node 4" in (root / "launch.sh").read_text()
    assert (root / "runtime" / "ep_runtime.py").is_file() and (root / "routing_stats.json").is_file()
    assert [s["moe_layer"] for s in man["segments"]] == [1, 2, None]
    for L in plan["layers"]:
        assert sum(len(h) for h in L["rank_experts"]) == 8 + 2
        for r, held in enumerate(L["rank_experts"]):
            assert man["experts"][str(r)][str(L["layer"])]["experts"] == held


# ---- parity ----------------------------------------------------------------------------------------
def test_single_device_matches_eager(single, eager, packages):
    tokens, logits = single
    np.testing.assert_array_equal(tokens, eager[0])
    assert np.abs(logits - eager[1]).max() <= 1e-4
    t1, l1 = ExpertParallelRuntime(packages[1]).generate(PROMPTS[0], 4)  # one prompt, list form
    np.testing.assert_array_equal(t1, eager[0][:1, :4])


@pytest.mark.parametrize("ranks", [2, 4])
def test_partitioned_run_matches_single_device(ranks, packages, single, eager, tmp_path):
    out = tmp_path / "res.npz"
    args = ["--prompt-ids", PROMPT_ARG, "--max-new-tokens", str(STEPS), "--timeout", "30", "--json", "--out", str(out)]
    if ranks == 2:  # the package's own launch script (and its copy of the runtime)
        cmd = [str(packages[2] / "launch.sh"), *args]
    else:
        cmd = [TORCHRUN, "--nproc_per_node", "4", "--max-restarts", "0", "-m", "runtime.ep_runtime",
               "--package", str(packages[4]), *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(TORCHRUN=TORCHRUN), capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = np.load(out)
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    gap_single = float(np.abs(res["step_logits"] - single[1]).max())
    gap_eager = float(np.abs(res["step_logits"] - eager[1]).max())
    print(f"\n{ranks} ranks (gloo): {time.perf_counter() - t:.1f} s wall, generate {d['seconds']} s; max |logits - "
          f"single device| {gap_single:.2e}, vs eager {gap_eager:.2e}")
    np.testing.assert_array_equal(res["tokens"], single[0])
    np.testing.assert_array_equal(res["tokens"], eager[0])
    assert gap_single <= 1e-4 and gap_eager <= 1e-4
    assert d["ranks"] == ranks and [p["tokens"] for p in d["prompts"]] == single[0].tolist()
    np.testing.assert_allclose(np.array(d["prompts"][0]["step_logits"], np.float32), res["step_logits"][0], rtol=0, atol=0)
    # every (token, expert) pair ran exactly once, on a rank holding the expert
    _, plan = load_package(packages[ranks], ranks)
    tokens_seen = PROMPTS.shape[0] * (PROMPTS.shape[1] + STEPS - 1)
    for L in plan["layers"]:
        rows = d["expert_rows"][str(L["layer"])]
        assert sum(n for by in rows.values() for n in by.values()) == tokens_seen * 2  # k = 2
        for e, by in rows.items():
            assert all(int(e) in L["rank_experts"][int(r)] for r in by)
            if ranks == 4 and L["replicas"][int(e)] > 1 and sum(by.values()) >= 4:
                assert len(by) == L["replicas"][int(e)] and min(by.values()) > 0, (L["layer"], e, by)


# ---- failures --------------------------------------------------------------------------------------
def test_dead_rank_makes_the_others_fail_fast(packages):
    """Rank 2 of 4 exits after step 3: every other rank stops with an error naming rank 2, no hang."""
    t = time.perf_counter()
    procs = _spawn_by_hand(packages[4], 4, ["--prompt-ids", PROMPT_ARG, "--max-new-tokens", str(STEPS),
                                            "--timeout", "20"], fail="2:3")
    outs = [p.communicate(timeout=60) for p in procs]
    took = time.perf_counter() - t
    print(f"\nrank 2 died after step 3; all ranks gone after {took:.1f} s (timeout 20 s)")
    assert procs[2].returncode == 3
    for r in (0, 1, 3):
        err = outs[r][1]
        assert procs[r].returncode == 1, err[-2000:]
        line = next(x for x in err.splitlines() if x.startswith("error: "))
        assert f"rank {r}:" in line and "rank 2 exited" in line and "step 4" in line, line
        assert outs[r][0] == ""  # no result printed
    assert took < 20  # a closed connection is noticed at once, well inside the timeout


def test_hung_rank_is_named_after_the_timeout(packages):
    procs = _spawn_by_hand(packages[2], 2, ["--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--timeout", "3"],
                           fail="1:2:hang")
    try:
        t = time.perf_counter()
        out, err = procs[0].communicate(timeout=40)
        took = time.perf_counter() - t
    finally:
        procs[1].kill()
        procs[1].communicate()
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    print(f"\n{line}\n(rank 0 gone after {took:.1f} s)")
    assert procs[0].returncode == 1
    assert "rank 1 stopped responding (last seen at step 2; this rank is at step 3)" in line
    assert "timeout 3s" in line


def test_torchrun_stops_the_job_when_a_rank_dies(packages):
    t = time.perf_counter()
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--max-restarts", "0", "-m", "runtime.ep_runtime",
                           "--package", str(packages[2]), "--prompt-ids", "1,2,3", "--max-new-tokens", "8",
                           "--timeout", "20"], cwd=REPO, env=_env(MLAMOE_EP_FAIL="1:1:5"), capture_output=True,
                          text=True, timeout=60)
    took = time.perf_counter() - t
    assert proc.returncode != 0
    assert "exitcode  : 5" in proc.stderr and "rank      : 1" in proc.stderr, proc.stderr[-3000:]
    assert took < 20


def _tampered(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    plan = json.loads((dst / "partition.json").read_text())
    edit(plan)
    (dst / "partition.json").write_text(json.dumps(plan))
    return dst


@pytest.mark.parametrize("case", ["stale", "uncovered", "edited", "world"])
def test_plan_errors_before_any_process_group(case, packages, tmp_path, monkeypatch, capsys):
    def stale(p):
        p["model_hash"] = "0" * 64

    def uncovered(p):
        p["layers"][0]["rank_experts"][0] = [e for e in p["layers"][0]["rank_experts"][0] if e != 0] or [1]
        for h in p["layers"][0]["rank_experts"][1:]:
            h[:] = [e for e in h if e != 0] or [1]

    def edited(p):
        p["layers"][1]["rank_experts"][0], p["layers"][1]["rank_experts"][1] = \
            p["layers"][1]["rank_experts"][1], p["layers"][1]["rank_experts"][0]

    edits = {"stale": stale, "uncovered": uncovered, "edited": edited, "world": lambda p: None}
    pkg = _tampered(packages[2], tmp_path / "pkg", edits[case])
    want = {"stale": "stale partition plan", "uncovered": "does not cover every expert: layer 1 has no rank for "
            "experts [0]", "edited": "the plan was changed after the package was built",
            "world": "runs on exactly 2 ranks"}[case]
    with pytest.raises(EPError, match=want.replace("[", r"\[").replace("]", r"\]")):
        load_package(pkg, 3 if case == "world" else 2)
    # the CLI: a world of 2 (3 for "world") whose rendezvous port nobody serves: reaching
    # init_process_group would block for the timeout; the check must answer first
    monkeypatch.setenv("WORLD_SIZE", "3" if case == "world" else "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    t = time.perf_counter()
    rc = ep_runtime.main(["--package", str(pkg), "--prompt-ids", "1,2", "--max-new-tokens", "2", "--timeout", "30"])
    assert rc == 2 and time.perf_counter() - t < 5
    assert want in capsys.readouterr().err


def test_build_rejects_a_plan_for_another_model(tiny, tmp_path):
    other = plan_partition(models.load_config("tiny-v2"), 2)
    with pytest.raises(PartitionError, match="stale partition plan"):
        build_ep_package(tiny, tmp_path / "x", plan=other, segments=[])
    assert not (tmp_path / "x").exists()
    with pytest.raises(PartitionError, match="8 routed experts"):
        build_ep_package(tiny, tmp_path / "y", 9, segments=[])
    foreign = dict(plan_partition(tiny.config, 2), model_hash="f" * 64)  # same config, other weights
    with pytest.raises(PartitionError, match="stale partition plan"):
        build_ep_package(tiny, tmp_path / "z", plan=foreign, segments=[])


def test_config_only_plan_is_bound_to_the_weights(tiny, tmp_path):
    """A `mlamoe plan` plan (config hash as its model hash) builds, and the package records the weights hash."""
    import onnx_ir as ir
    from parallel.expert_parallel import segment_layers
    plan = plan_partition(tiny.config, 2)
    dummy = [ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 20}, name=f"s{j}"), ir_version=10)
             for j in range(len(segment_layers(tiny.config)))]
    pkg = build_ep_package(tiny, tmp_path / "p", plan=plan, segments=dummy)
    man, got = load_package(pkg, 2)
    assert got["model_hash"] == man["model_hash"] == model_hash_of(tiny) != plan["model_hash"]
    assert [L["rank_experts"] for L in got["layers"]] == [L["rank_experts"] for L in plan["layers"]]
