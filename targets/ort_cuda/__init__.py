"""The `ort-cuda` target: ONNX Runtime on NVIDIA GPUs (CUDAExecutionProvider), fp16 graphs with fp32 islands
(or int8 / int4 / fp8 weights), an fp16 latent cache and runtime/cuda_runtime.py (IOBinding). Its graphs and settings:
targets/ort_cuda/graphs.py (re-exported here); its build: targets/ort_cuda/build.py; its verification:
targets/ort_cuda/verify.py."""
from __future__ import annotations

from pathlib import Path

from ..base import Target, TargetOption, TargetProfile
from .graphs import (CUDA_QMOE_INT4_BLOCKS, CUDA_QMOE_INTER_MULTIPLE, FP8_OPTIONS, INT4_BLOCK_SIZES, INT4_OPTIONS,
                     INT8_OPTIONS, Fp16Report, convert_graph_files, cuda_provider_options, cuda_qmoe_int4_problem,
                     graph_dtypes, has_cuda_provider, providers, quantize_fp8, quantize_int4, quantize_int8,
                     session_config, to_fp16)

__all__ = ["CUDA_QMOE_INT4_BLOCKS", "CUDA_QMOE_INTER_MULTIPLE", "FP8_OPTIONS", "INT4_BLOCK_SIZES", "INT4_OPTIONS",
           "INT8_OPTIONS", "PROFILE", "TARGET", "Fp16Report", "convert_graph_files", "cuda_provider_options",
           "cuda_qmoe_int4_problem", "graph_dtypes", "has_cuda_provider", "providers", "quantize_fp8", "quantize_int4",
           "quantize_int8", "session_config", "to_fp16"]

PROFILE = TargetProfile(
    name="ort-cuda",
    description="ONNX Runtime CUDAExecutionProvider (CPU fallback), fp16 with fp32 softmax/RMSNorm/router, "
                "fp16 latent cache, dynamic batch/sequence/cache axes, IOBinding runtime",
    opset=(17, 23),
    passes=("latent-kv-fusion", "moe-ort-fused"),
    # "none" = fp16 compute; int8 = MatMulNBits 8-bit weights; int4 = MatMulNBits 4-bit (block 32, zero points) and
    # QMoE 4-bit experts; fp8 = E4M3 128x128-block weights; fp16 compute
    quant_schemes=("none", "int8", "int4", "fp8"),
    dynamic_shapes=True,
    providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    parity_stage="target-ort-cuda-fp16",
    runtime_here=False,  # the CUDA EP needs a GPU; the fp16 graphs are checked on ORT CPU here
)


class OrtCudaTarget(Target):
    profile = PROFILE
    # --decode-gears 1024,8192: fixed-shape CUDA-graph decode gears beside the dynamic graphs (targets/ort_cuda/gears.py)
    options = (TargetOption("decode_gears", "--decode-gears", None, quant="none"),)

    def validate(self, quant: str, options: dict) -> None:
        from .gears import parse_gears
        parse_gears(options.get("decode_gears"))

    def build(self, ctx) -> None:
        from .build import build_cuda_package
        build_cuda_package(ctx)

    def describe(self, manifest: dict) -> list[str]:
        gi = manifest.get("io", {}).get("decode_gears")
        if not gi:
            return []
        mem = ", ".join(f"{g}: {gi['graphs'][str(g)]['cache_bytes'] / 2**20:.2f} MiB" for g in gi["gears"])
        return [f"decode gears (CUDA graphs): {gi['gears']}, batch {gi['batch']}, fp16 cache per gear {mem}; weights "
                f"{gi['weights_file']} ({gi['weights_bytes'] / 2**20:.2f} MiB, shared by the gear graphs)"]

    def verify(self, root: Path, manifest: dict, lines: list[str]) -> tuple[bool, list[str]]:
        from .verify import verify_on_gpu
        return verify_on_gpu(root, lines)


TARGET = OrtCudaTarget()
