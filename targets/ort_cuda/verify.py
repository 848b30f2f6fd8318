"""`mlamoe verify` for ort-cuda packages: the golden data on CUDAExecutionProvider (runtime/cuda_runtime.py)."""
from __future__ import annotations

from pathlib import Path

from .choice_forcing import explain
from .graphs import has_cuda_provider


def verify_on_gpu(root: Path, lines: list[str]) -> tuple[bool, list[str]]:
    """Golden re-run on the CUDA provider where onnxruntime-gpu is installed (and the result recorded
    in the manifest's verification), else hashes only: the CPU cannot stand in for fp16 CUDA kernels."""
    ok_gpu, reason = has_cuda_provider()
    if not ok_gpu:
        lines.append(f"skip golden re-run: {reason} (hashes only; run `mlamoe verify` on a GPU machine)")
        return True, lines
    from runtime.cuda_runtime import record_verification, verify_golden
    failures, record = verify_golden(root, explain=explain)
    lines += [f"FAIL {f}" for f in failures] or ["ok   golden data on CUDAExecutionProvider"]
    lines += [f"note {n}" for n in record["notes"]]  # near ties the GPU's rounding turned (verify_golden)
    record_verification(root, record)
    return not failures, lines
