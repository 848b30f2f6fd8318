"""End to end (slow tier): every quantization scheme of every target compiles the randomized transformers
checkpoints of tests/test_routing_parity.py (weights x3, non-zero e_score_correction_bias, 4 groups keep 2),
its lossy stages judged routing-aware: numeric error under teacher-forced routing, flips reported apart.

    pytest -m slow tests/test_routing_parity_compile.py      # ~25 compiles on 2 cores
"""
from __future__ import annotations

import json

import pytest

from pipeline.compile import compile_package
from pipeline.parity import ParityError
from targets import ort_cpu, ort_cuda
from targets.ascend.profile import QUANT_SCHEMES as ASCEND_SCHEMES
from test_routing_parity import CHECKPOINTS, randomized_checkpoint

pytestmark = pytest.mark.slow

CASES = ([("ort-cpu", q) for q in ort_cpu.PROFILE.quant_schemes]
         + [("ort-cuda", q) for q in ort_cuda.PROFILE.quant_schemes]
         + [("ascend", q) for q in ASCEND_SCHEMES])

# (case): reason. Empty since 2026-12-04: ascend w8a8 on v3-s0 / v2-s1 failed its quantize stage at a decode step
# (teacher-forced, no routing flip) until the accuracy fallback (targets/ascend/quant.py FALLBACK_MAX_SITES);
# benchmarks/cpu_ascend_w8a8_x3_sensitivity.json has the per-site measurements. Strict, so that a fix shows.
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    randomized_checkpoint(request.param, folder)
    return request.param, folder


@pytest.mark.parametrize("target,quant", CASES, ids=[f"{t}-{q}" for t, q in CASES])
def test_every_scheme_of_every_target_compiles_routing_aware(checkpoint, target, quant, tmp_path, request):
    name, checkpoint = checkpoint
    why = KNOWN_FAILURES.get((name, target, quant))
    if why:
        request.applymarker(pytest.mark.xfail(reason=why, strict=True, raises=ParityError))
    options = {"quant": quant} if quant != "none" else {}
    if target == "ascend":
        options["soc"] = "Ascend910B3"
    pkg = compile_package(str(checkpoint), target, tmp_path / "pkg", progress=lambda m: None, **options)
    manifest = json.loads((pkg / "manifest.json").read_text())
    binding = [p for st in manifest["stages"] for p in st.get("parity", []) if p.get("binding", True)]
    assert binding and all(p["passed"] for p in binding), [p["stage"] for p in binding if not p["passed"]]
    stages = json.loads((pkg / "reports" / "parity.json").read_text())["stages"]
    lossy = [s for s in stages if s["stage"].split("/")[0].startswith(("quantize-", "target-ort-cuda"))
             and not s["stage"].endswith("/greedy")]
    if target != "ascend" and (quant != "none" or target == "ort-cuda"):
        assert lossy and all("routing" in s["extra"] for s in lossy), [s["stage"] for s in lossy]
        for s in lossy:
            rt = s["extra"]["routing"]
            assert rt["forced_routing_checked"] and rt["n_decisions"] > 0
            print(s["stage"], rt["summary"])
    if target == "ascend":
        emul = [s for s in stages if s["stage"].startswith("ascend-fp16-emulation/")]
        assert emul and all("routing" in s["extra"] for s in emul)
