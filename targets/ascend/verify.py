"""`mlamoe verify` for ascend packages. No NPU here: the golden cases re-run on the packaged ONNX graphs
(what the .om is built from) with ORT CPU; the .om itself is checked on the device by the kit."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.parity import budget_for, compare


def verify_golden(root: Path, manifest: dict, lines: list[str]) -> tuple[bool, list[str]]:
    """No NPU here: re-run the golden cases on the packaged fp32 ONNX graphs with ORT CPU (what the
    .om is built from), at the fp32 export budget. The .om itself is checked on device by the kit."""
    cases = json.loads((root / manifest["ascend"]["kit"]["golden"]).read_text())["cases"]
    ok = True
    sessions: dict[str, ort.InferenceSession] = {}
    for case in cases:
        if case["onnx"] not in sessions:
            sessions[case["onnx"]] = ort.InferenceSession(str(root / case["onnx"]), providers=["CPUExecutionProvider"])
        sess = sessions[case["onnx"]]
        feeds = {n: np.load(root / f) for n, f in case["inputs"].items()}
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        ref = {n: np.load(root / f) for n, f in case["outputs"].items()}
        report = compare(f"verify/{case['name']}", ref, got, logits_outputs=case.get("logits_outputs", ["logits"]),
                         budget=budget_for("export"))
        ok &= report.passed
        lines.append(("ok   " if report.passed else "FAIL ") + f"golden {case['name']} ({case['onnx']} on ORT CPU, fp32): "
                     + (f"max abs {max(o.max_abs for o in report.outputs):.2e}" if report.passed
                        else "; ".join(report.failure_reasons())))
    om = manifest["ascend"]["om"]["status"]
    lines.append(f"note ascend .om: {om}; on the device run `python3 ascend/kit/verify_on_device.py`")
    return bool(ok), lines
