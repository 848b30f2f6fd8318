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

# Measured 2026-12-04 (issue 15 open), after the ascend stages became teacher-forced and the fp32 atol per unit of
# the output's RMS (which fixed v3-s0 ascend none: 1.09e-4 at a logit of 0.106, logits rms 3.1). Strict, so that a
# fix shows. Both are numeric with every row's routing forced (no flip at the failing steps); calibrating the static
# activation scales with 1.5x headroom made them worse (not clipping).
KNOWN_FAILURES = {
    ("v3-s0", "ascend", "w8a8"): "quantize-w8a8/ascend-static/decode-3: logits cosine 0.9645 < 0.98, KL 0.20 > 0.1 "
                                 "(teacher-forced, no routing flip at that step); the fp16 emulation of the QDQ graphs "
                                 "misses msit's thresholds at decode-0..3 too (rel euclid up to 0.20)",
    ("v2-s1", "ascend", "w8a8"): "quantize-w8a8/ascend-static/decode-2: KL 0.103 > 0.1 (teacher-forced, no routing "
                                 "flip); the fp16 emulation of the QDQ graphs misses msit's thresholds at decode-1..3 "
                                 "(rel euclid up to 0.106, KL up to 0.052)",
}


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
