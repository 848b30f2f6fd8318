"""`mlamoe verify`: hashes first, then the golden data on the target's runtime where it exists."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.errors import MlamoeError

from .package import PackageError, archive_check, open_package, verify_package
from .parity import compare


def verify_full(path: Path, hashes_only: bool = False) -> tuple[bool, list[str]]:
    lines: list[str] = []
    try:
        verify_package(path)
    except PackageError as e:
        return False, [f"FAIL hashes: {p}" for p in (e.problems or [str(e)])]
    root, manifest, cleanup = open_package(path)
    try:
        lines.append(f"ok   hashes: {len(manifest['files'])} files match manifest.json")
        archive_ok, line = archive_check(path)
        lines.append(line)
        if not archive_ok:
            return False, lines
        if hashes_only:
            return True, lines
        target = manifest["target"]["name"]
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            lines.append("skip golden re-run: onnxruntime is not installed (hashes only)")
            return True, lines
        if target == "ascend":
            return _verify_ascend(root, manifest, lines)
        if target == "ort-cuda":
            return _verify_cuda(root, lines)
        if target != "ort-cpu":
            lines.append(f"skip golden re-run: the {target} runtime is not available here (hashes only)")
            return True, lines
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
                             budget=_budget(stage))
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
    except MlamoeError:
        raise
    finally:
        cleanup()


def _budget(stage: str):
    from .parity import budget_for
    return budget_for(stage)


def _verify_ascend(root: Path, manifest: dict, lines: list[str]) -> tuple[bool, list[str]]:
    """No NPU here: re-run the golden cases on the packaged fp32 ONNX graphs with ORT CPU (what the
    .om is built from), at the fp32 export budget. The .om itself is checked on device by the kit."""
    import json

    import onnxruntime as ort
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
                         budget=_budget("export"))
        ok &= report.passed
        lines.append(("ok   " if report.passed else "FAIL ") + f"golden {case['name']} ({case['onnx']} on ORT CPU, fp32): "
                     + (f"max abs {max(o.max_abs for o in report.outputs):.2e}" if report.passed
                        else "; ".join(report.failure_reasons())))
    om = manifest["ascend"]["om"]["status"]
    lines.append(f"note ascend .om: {om}; on the device run `python3 ascend/kit/verify_on_device.py`")
    return bool(ok), lines


def _verify_cuda(root: Path, lines: list[str]) -> tuple[bool, list[str]]:
    """Golden re-run on the CUDA provider where onnxruntime-gpu is installed (and the result recorded
    in the manifest's verification), else hashes only: the CPU cannot stand in for fp16 CUDA kernels."""
    from targets.ort_cuda import has_cuda_provider
    ok_gpu, reason = has_cuda_provider()
    if not ok_gpu:
        lines.append(f"skip golden re-run: {reason} (hashes only; run `mlamoe verify` on a GPU machine)")
        return True, lines
    from runtime.cuda_runtime import record_verification, verify_golden
    failures, record = verify_golden(root)
    lines += [f"FAIL {f}" for f in failures] or ["ok   golden data on CUDAExecutionProvider"]
    record_verification(root, record)
    return not failures, lines
