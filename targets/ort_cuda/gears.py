"""ort-cuda decode gears: fixed-shape fp16 decode graphs that ONNX Runtime can capture as CUDA graphs (issue 19).

A decode gear of length G is the family's fixed-shape step (models/static_lm.py StaticCausalLM, traced by
pipeline/static_export.py: the form the Ascend target ships too) for one token over a cache preallocated at G rows:

    inputs : input_ids int32 [B, 1], position int32 [B] (= tokens already cached), past.{i}.* fp16 [B, G, w]
    outputs: logits fp32 [B, 1, V], present.{i}.* fp16 [B, G, w] (= past with row `position` written)

Every shape is fixed, the attention mask and RoPE rows come from `position` inside the graph (no Shape ops, no
growing Concat), and the MoE is the static-gather form (per token, Gather the top-k experts' stacked weights by
the router's indices, then batched MatMuls: fixed launches, no data-dependent grid as com.microsoft.MoE's
expert-count scan and per-expert GEMM loop). That is what CUDA-graph capture needs: fixed shapes, fixed device
addresses (the runtime binds every input and output once, runtime/cuda_runtime.py GearDecoder) and no host
synchronisation inside the step.

The graph is then:
- (convert_gear fuse=True, the default) given fewer kernels, since a captured step is launch-bound (its time is about
  kernels x a couple of microseconds; docs/ort-cuda.md "Where a captured step's time goes"): each RMSNorm spelled
  x / Sqrt(...) (passes/ort_simplify.py rmsnorm-div) so that ORT's SimplifiedLayerNormFusion turns the 9-node fp16
  chain, both Casts included, into one SimplifiedLayerNormalization on the CUDA EP (the saved graph stays standard
  ONNX, and its rounding twin rounds more than the fused kernel), and each interleaved MLA RoPE as one
  com.microsoft.RotaryEmbedding (passes/rotary_fusion.py); medium on the H200: 1414 -> 804 kernels a step;
- converted to fp16 by to_fp16(fixed_shape=True): fp32 islands as for the dynamic graphs (softmax, RMSNorm
  statistics, TopK, DeepSeek-V3.2's indexer selection: the `topk-selection` island), the router's gate projection ->
  TopK path kept fp32 (structural: the walk back from each router TopK's scores to the Sigmoid/Softmax-scored gate
  MatMul), and the gathered expert tables stored and moved in fp16 (bit-identical); check_router_fp32 (router:
  RouterPrecisionError, indexer: SelectionPrecisionError) is run on the finished gear graph;
- passed through passes/matmul_broadcast.py: MatMuls whose right operand is broadcast over the batch (the
  attention against the [1, 1, G, r] cache for H heads, the gathered experts against the token) get a 2-D right
  operand, so ORT's CUDA MatMul runs one strided-batched GEMM instead of cublasGemmBatched over pointer arrays it
  copies from pinned host memory on every call (copies a captured graph would replay from released buffers);
- passed through passes/static_cache_write.py: the Where that writes the new row over the whole buffer becomes a
  ScatterND of one row, whose CUDA / CPU kernels skip the copy of `past` when `present` is bound to the same buffer:
  the runtime binds them to one buffer per gear, so a step writes one row per cache tensor (no ping-pong pair).

All gears share one external weights file with the package's dynamic graphs (onnx/weights.data,
pipeline/weights_file.py): every initializer identical in bytes across the graphs is stored once and referenced
at its offset by each graph (across the gears only the gear-sized tables, RoPE cos/sin [G, rope/2] and the
row-index column [G, 1], differ). ONNX Runtime reads
each session's initializers from that file; on the GPU each gear session still holds its own device copy of the
weights (the README's memory line says so).

A gear switch and the step from the dynamic prefill into a gear use a tiny `pad` graph per gear
(onnx/pad_g{G}.onnx: Pad of each cache tensor [B, L, w] -> [B, G, w], L dynamic, on the device).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from models.errors import MlamoeError

GEAR_BATCH = 1
WEIGHTS_FILE = "decode_gears.onnx.data"  # the gear stage's own folder; in the package: onnx/weights.data


class GearError(MlamoeError):
    pass


def parse_gears(value, max_positions: int | None = None) -> tuple[int, ...]:
    """"1024,8192" (or a sequence of ints) -> sorted unique gears; a clear error for anything else."""
    if value is None or value == "" or value == ():
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        gears = [int(str(x).strip()) for x in items]
    except ValueError:
        raise GearError(f"--decode-gears {value!r}: expected comma-separated integers, e.g. 1024,8192,32768") from None
    bad = [g for g in gears if g < 2]
    if bad:
        raise GearError(f"--decode-gears {value!r}: each gear (a cache length) must be >= 2, got {bad}")
    if len(set(gears)) != len(gears):
        raise GearError(f"--decode-gears {value!r}: duplicate gears")
    if max_positions is not None and max(gears) > max_positions:
        raise GearError(f"--decode-gears {value!r}: gear {max(gears)} exceeds the model's max_position_embeddings "
                        f"{max_positions}")
    return tuple(sorted(gears))


def gear_name(gear: int) -> str:
    return f"decode_g{gear}"


def pad_name(gear: int) -> str:
    return f"pad_g{gear}"


@dataclasses.dataclass
class GearReport:
    gear: int
    fp16: dict
    cache_writes: int
    skipped: list
    matmuls_right_2d: int  # passes/matmul_broadcast.py: batch-broadcast right operands made 2-D
    rmsnorm_div: int = 0  # passes/ort_simplify.py rmsnorm-div: RMSNorms ORT's SimplifiedLayerNormFusion then fuses
    rotary_fused: int = 0  # passes/rotary_fusion.py: interleaved RoPEs as com.microsoft.RotaryEmbedding

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def trace_gear(model, gear: int, batch: int = GEAR_BATCH) -> ir.Model:
    """The fp32 fixed-shape decode step of one gear, as traced (before convert_gear): the routing and selection
    reference of the gear check (targets/ort_cuda/build.py check_gear_decode)."""
    from pipeline.static_export import StaticGraphSpec, export_static_graph
    return export_static_graph(model, StaticGraphSpec(gear_name(gear), batch, 1, gear, "gather"))


def export_gear(model, gear: int, batch: int = GEAR_BATCH, fuse: bool = True) -> tuple[ir.Model, GearReport]:
    """The fp16 decode graph of one gear (module doc)."""
    return convert_gear(trace_gear(model, gear, batch), gear, batch, fuse=fuse)


def convert_gear(m: ir.Model, gear: int, batch: int = GEAR_BATCH, fuse: bool = True) -> tuple[ir.Model, GearReport]:
    """trace_gear's graph -> the gear's fp16 graph, in place (module doc): (fuse) the kernel-count fusions, fp16
    with the router and selection fp32 islands, the in-place row write, 2-D right operands; check_router_fp32 on the
    result (the passes after the conversion must not move a router or indexer node into fp16). fuse=False: the
    graph as before the fusions (benchmarks/cuda_gear_profile.py measures both)."""
    from passes.matmul_broadcast import MatMulBroadcastPass
    from passes.ort_simplify import ORTSimplifyPass
    from passes.rotary_fusion import RotaryFusionPass
    from passes.static_cache_write import StaticCacheWritePass

    from .graphs import check_router_fp32, to_fp16
    rms = rope = 0
    if fuse:
        simp = ORTSimplifyPass()
        simp(m)
        rms = simp.report.get("rmsnorm-div", 0)
        rot = RotaryFusionPass()
        rot(m)
        rope = rot.rewritten
    fp16 = to_fp16(m, fixed_shape=True)
    write = StaticCacheWritePass()
    write(m)
    if write.rewritten == 0 or write.skipped:
        raise GearError(f"gear {gear}: the cache write was not rewritten as a row ScatterND "
                        f"({write.rewritten} rewritten, skipped: {write.skipped})")
    bcast = MatMulBroadcastPass()
    bcast(m)
    check_router_fp32(m.graph, fixed_shape=True)
    m.doc_string = (f"mlamoe ort-cuda decode gear {gear}: batch {batch}, cache {gear} rows preallocated, "
                    "row written in place (ScatterND), static-gather MoE, fp16")
    return m, GearReport(gear, fp16.to_dict(), write.rewritten, write.skipped, bcast.rewritten, rms, rope)


def save_gears(graphs: dict[str, ir.Model], folder: Path, weights_file: str = WEIGHTS_FILE) -> list[Path]:
    """Save the gear graphs into `folder` over one shared external weights file (pipeline/weights_file.py: each
    distinct initializer stored once, referenced by offset from every gear) -> files written."""
    from pipeline.weights_file import save_graphs
    return save_graphs(folder, {f"{name}.onnx": m for name, m in graphs.items()}, name=weights_file)


def pad_graph(input_names: list[str], widths: list[int], gear: int, batch: int = GEAR_BATCH) -> onnx.ModelProto:
    """Pad each cache tensor src [B, L, w] (L dynamic, fp16) to [B, gear, w] with zero rows (module doc).
    Inputs are named as the cache's past.* names, outputs `gear.*` (past. replaced)."""
    from onnx import TensorProto, helper
    nodes, inits = [], [helper.make_tensor("gear_len", TensorProto.INT64, [1], [gear]),
                        helper.make_tensor("zeros2", TensorProto.INT64, [2], [0, 0]),
                        helper.make_tensor("zero1", TensorProto.INT64, [1], [0]),
                        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
                        helper.make_tensor("two", TensorProto.INT64, [1], [2])]
    ins, outs = [], []
    for i, (n, w) in enumerate(zip(input_names, widths)):
        ins.append(helper.make_tensor_value_info(n, TensorProto.FLOAT16, [batch, "length", w]))
        out = "gear." + n.split(".", 1)[1]
        outs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT16, [batch, gear, w]))
        nodes += [helper.make_node("Shape", [n], [f"shape_{i}"], start=1, end=2),
                  helper.make_node("Sub", ["gear_len", f"shape_{i}"], [f"extra_{i}"]),
                  helper.make_node("Concat", ["zeros2", "zero1", "zero1", f"extra_{i}", "zero1"], [f"pads_{i}"],
                                   axis=0),
                  helper.make_node("Pad", [n, f"pads_{i}"], [out], mode="constant")]
    g = helper.make_graph(nodes, pad_name(gear), ins, outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10, producer_name="mlamoe")
    onnx.checker.check_model(m, full_check=True)
    return m


def cache_widths(cache_spec, names: list[str]) -> list[int]:
    """The last dim of each past.* tensor of the family's static layout."""
    shapes = cache_spec.static_shapes(1, 2)
    by_name = {f"past.{i}.{n}": s[-1] for i in range(cache_spec.num_layers) for n, s in zip(cache_spec.names, shapes)}
    return [int(by_name[n]) for n in names]


def gear_memory(cache_spec, gear: int, batch: int = GEAR_BATCH) -> int:
    """Bytes of one gear's preallocated fp16 cache (every layer, every tensor)."""
    shapes = cache_spec.static_shapes(batch, gear)
    return int(sum(np.prod(s) for s in shapes) * 2 * cache_spec.num_layers)
