"""`mlamoe verify` for ort-cpu packages: the golden cases and greedy generation re-run through the package's
own runtime (runtime/ort_runtime.py) on ORT CPU, within the budget its manifest names."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.parity import budget_for, compare


def verify_golden(root: Path, manifest: dict, lines: list[str]) -> tuple[bool, list[str]]:
    from runtime.ort_runtime import PackageRuntime
    rt = PackageRuntime(root, manifest=manifest)
    golden = manifest["golden"]
    stage = golden["tolerance"]["stage"]
    ok = True
    for case in golden["cases"]:
        feeds = {n: np.load(root / f) for n, f in case["inputs"].items()}
        sess = rt.sessions[case["graph"]]
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        ref = {n: np.load(root / f) for n, f in case["outputs"].items()}
        report = compare(f"verify/{case['name']}", ref, got, logits_outputs=["logits"],
                         budget=budget_for(stage))
        ok &= report.passed
        lines.append(("ok   " if report.passed else "FAIL ") + f"golden {case['name']}: " +
                     (f"max abs {max(o.max_abs for o in report.outputs):.2e}" if report.passed
                      else "; ".join(report.failure_reasons())))
    gen = golden["greedy"]
    want = np.load(root / gen["tokens"])
    tokens, _ = rt.generate(np.load(root / gen["prompt"]), want.shape[1])
    same = np.array_equal(tokens, want)
    ok &= same or not gen.get("must_match", True)
    lines.append(("ok   " if same else "FAIL ") + f"greedy generation: {want.shape[1]} tokens "
                 + ("equal to the golden tokens" if same else "differ from the golden tokens"))
    return bool(ok), lines
