"""The `ort-cpu` target: ONNX Runtime on CPU, fp32 (or int8 / w8a8 / fp8) graphs offline-optimised by ORT,
with session settings and runtime/ort_runtime.py. Its build: targets/ort_cpu/build.py (with --ranks, also
the expert-parallel graphs of parallel/); its verification: targets/ort_cpu/verify.py."""
from __future__ import annotations

from pathlib import Path

from ..base import Target, TargetError, TargetOption, TargetProfile
from .session import INT4_OPTIONS, OFFLINE_LEVEL, optimize_offline, session_config

__all__ = ["INT4_OPTIONS", "OFFLINE_LEVEL", "PROFILE", "TARGET", "optimize_offline", "session_config"]

PROFILE = TargetProfile(
    name="ort-cpu",
    description="ONNX Runtime CPUExecutionProvider, fp32, dynamic batch/sequence/cache axes",
    opset=(17, 23),
    passes=("latent-kv-fusion", "moe-ort-fused", "ort-simplify"),
    quant_schemes=("none", "int8", "int4", "w8a8", "fp8"),
    dynamic_shapes=True,
)

ACCURACY_LEVELS = (0, 4)  # MatMulNBits / QMoE accuracy_level values --int8-accuracy-level takes


class OrtCpuTarget(Target):
    profile = PROFILE
    options = (
        TargetOption("int8_accuracy_level", "--int8-accuracy-level", None, quant="int8"),
        TargetOption("ranks", "--ranks", None, group="--ranks/--redundant"),
        TargetOption("redundant", "--redundant", 0, group="--ranks/--redundant"),
        TargetOption("calibrate", None, 8),  # with --ranks: routing-statistics prompts for the partition plan
        TargetOption("genai", "--genai", None),  # the form of onnx/'s genai files (targets/genai_folder.py); None: pipeline
    )

    def validate(self, quant: str, options: dict) -> None:
        level = options["int8_accuracy_level"]
        if level is not None and level not in ACCURACY_LEVELS:
            raise TargetError(f"--int8-accuracy-level {level}: choose 0 (fp32 activations, "
                              "weight-only numerics) or 4 (int8 activations per block inside the kernels)")

    def build(self, ctx) -> None:
        from .build import build_ort_cpu
        build_ort_cpu(ctx)

    def build_streaming(self, **kw) -> None:
        from pipeline.streaming import build_streaming
        build_streaming(session=session_config(), **kw)

    def verify(self, root: Path, manifest: dict, lines: list[str]) -> tuple[bool, list[str]]:
        from .verify import verify_golden
        return verify_golden(root, manifest, lines)

    def describe(self, manifest: dict) -> list[str]:
        g = manifest.get("genai")
        if not isinstance(g, dict) or "dir" not in g:
            return []
        graphs = ", ".join(sorted(set(g.get("graphs", {}).values())))
        return [f"genai     {g['dir']}/ ({g.get('type')}: {graphs}; {g.get('config')}), over {g.get('weights')}: "
                f"onnxruntime_genai.Model('PACKAGE/{g['dir']}')"]


TARGET = OrtCpuTarget()
