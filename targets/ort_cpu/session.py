"""ort-cpu's ONNX Runtime settings: the offline optimisation that writes the package's graphs, and the session
settings recorded in the manifest (read by runtime/ort_runtime.py)."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

# Offline optimisation level: "extended" fusions are portable across CPUs (unlike the layout
# transforms of ORT_ENABLE_ALL, which ORT applies again at load time anyway).
OFFLINE_LEVEL = "extended"

# --quant int4 on ort-cpu (passes/quant_int4.py): block 32, int8 activations inside the kernels (ORT CPU's fast
# path), the attention linears MatMulNBits 8-bit: the form that met both trained-small targets
# (docs/quantization.md, benchmarks/cpu_trained_small_int4_accuracy.json); the dense layers' MLP 8-bit
# (docs/quantization.md#int4-mixed-precision)
INT4_OPTIONS = {"block_size": 32, "accuracy_level": 4, "attention_bits": 8, "dense_mlp_bits": 8}


def session_config(threads: int | None = None) -> dict:
    return {"graph_optimization_level": "all", "intra_op_num_threads": threads or 0, "inter_op_num_threads": 1}


def optimize_offline(src: Path, dst: Path) -> None:
    """Let ORT apply its graph optimisations once and save the result (the package's graphs)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    if (src.parent / (src.name + ".data")).exists():
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
