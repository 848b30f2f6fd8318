"""ort-cuda's graphs and settings (ONNX Runtime on NVIDIA GPUs, CUDAExecutionProvider): fp16 graphs with fp32
islands, an fp16 latent cache, the int8 / int4 / fp8 quantize helpers, CUDA EP session settings.
Building needs no GPU; the runtime is runtime/cuda_runtime.py.

fp16 conversion (`to_fp16`, onnx-ir only, no onnxconverter-common). Which nodes compute in fp16 is
decided by structure, never by names:

- *activation* values are the float values that depend on the token stream: the embedding lookup
  (Gather of a float initializer by the graph input input_ids), the past-cache graph inputs, and
  every float output of a node with an activation float input. Nodes touching no activation (RoPE
  angles and cos/sin from positions, the causal mask) stay fp32 and are cast where they meet fp16;
- of the activation nodes, these stay fp32 ("islands", their float inputs cast to fp32):
    * Softmax / LogSoftmax (attention probabilities);
    * the RMSNorm statistics: Pow, ReduceMean, the Add of eps after ReduceMean, Sqrt, Reciprocal and
      the Mul/Div by the reciprocal (x.float() * rsqrt(mean(x^2) + eps), then cast: exactly the eager
      RMSNorm's own fp32 section; the weight Mul runs in fp16 as `weight * x.to(dtype)` does);
    * the MoE router: every node on the path from the gate projection (a MatMul/Gemm by a constant
      weight, included) to the router_probs input of com.microsoft.MoE / QMoE (MoEGroupRouter, TopK, ...),
      so expert choice is made on fp32 scores; MoE itself runs in fp16 (experts' weights fp16) with
      the fp32 router's log-scores cast to fp16 (the non-selected experts are -inf, so the
      selection cannot change in the cast);
    * every other TopK with its scores back to the projections that feed them (the "topk-selection" island,
      _selection_nodes): DeepSeek-V3.2's lightning indexer (wq_b, wk, k_norm, RoPE, weights_proj, the weighted
      ReLU scores over the whole key cache, its past rows cast from the fp16 cache), so the keys each query
      attends to are chosen on fp32 scores; a second discrete choice like expert choice (check_router_fp32
      refuses an fp16 one, SelectionPrecisionError);
    * TopK anywhere;
- every other activation node computes in fp16: float initializers it reads are stored fp16 (one
  fp16 copy where an fp32 island reads the same initializer), Cast-to-float becomes Cast-to-fp16;
- a Transpose outside the activations whose input is computed at run time and whose consumers all compute
  in fp16 (the fp8 weights dequantized on every run) runs after the cast, in fp16: bit-identical, and ORT then
  fuses it into the consumer's FusedMatMul;
- graph IO: the cache inputs/outputs (past.* / present.*) are fp16 (half the cache memory and the
  bytes read per decode step); logits stay fp32 (a Cast before the output).

ORT CPU runs such graphs too (its InsertCastTransformer runs ops lacking an fp16 CPU kernel in fp32
between Casts; every fp16 tensor is still rounded to fp16), which is how the package is checked
against eager fp32 on a machine without a GPU (budget target-ort-cuda-fp16, judged by parity.compare_fp16
relative to PyTorch's own fp16 on the same inputs).

INT8 (`--quant int8`, INT8_OPTIONS): before the fp16 conversion, passes/quant_int8.py turns every
linear layer but lm_head and the router gate into com.microsoft.MatMulNBits (bits 8, symmetric, blocks
of up to 128 along K) with scale_dtype "float16": each block's scale is rounded to fp16 before q is
computed, so `to_fp16` (which stores the scales of these fp16-activation nodes as fp16, the type the
CUDA kernel requires: MatMulNBits' scales share the type of its input A) changes no dequantized weight.
The quantize stage is checked on ORT CPU as an fp32-activation graph (the "fp32 twin": same q, same
scales) against eager fp32 under BUDGETS["quantize-int8"]; the fp16 int8 graphs then run on ORT CPU,
whose MatMulNBits has an fp16 kernel (x86: fp16 converted to fp32 around an fp32 GEMM), judged against
eager fp32 by compare_fp16 with quant_budget (BUDGETS["target-ort-cuda-int8"]: the quantize-int8 budget
and the fp16 limits added at worst case). Routed experts (INT8_OPTIONS["experts"] "channel") become
com.microsoft.QMoE int8 with one fp16 scale per expert output channel, raw [E, N, K] layout
(weights_prepacked=0: onnxruntime-gpu 1.31.1's CUDA QMoE reads it; without that attribute it expects
CUTLASS-prepacked weights and computes garbage, measured), no router_weights input (passes/quant_qmoe.py),
where the CUDA kernel takes the shape (moe_intermediate a multiple of CUDA_QMOE_INTER_MULTIPLE); other MoE
layers stay fp16 com.microsoft.MoE, recorded in the quantize report's skipped list (tiny: all of them).

INT4 (`--quant int4`, INT4_OPTIONS, `quantize_int4`): as INT8, with passes/quant_int4.py: MatMulNBits bits 4 (RTN,
blocks of 32 along K, or 128 with quantize_int4(block_size=128), uint8 zero points: the asymmetric scheme of ort-cpu)
with scale_dtype "float16" (each scale rounded to fp16 before its zero point and codes are computed, so to_fp16
changes no dequantized weight); the attention linears MatMulNBits bits 8 (symmetric, blocks of 128) as on ort-cpu; no
accuracy_level (CUDA's MatMulNBits keeps fp16 activations; ORT CPU's check at level 0 computes the same weight-only
numbers). Routed experts become com.microsoft.QMoE expert_weight_bits 4 per block with packed uint8 zero points
(fc1/fc2_zero_points, inputs 11/12) and fp16 scales, raw layout (weights_prepacked=0), no router_weights, where
onnxruntime-gpu's CUDA QMoE takes the shape (cuda_qmoe_int4_problem: hidden and moe_intermediate multiples of 64, a
block in 32/64/128: its zero points need blocks >= 32, and per-channel 4-bit takes no zero points); others stay fp16
MoE (tiny: moe_intermediate 32; trained-small and larger: QMoE). Checked as INT8: the fp32-activation twin under
BUDGETS["quantize-int4"], the fp16 graphs under BUDGETS["target-ort-cuda-int4"].

FP8 (`--quant fp8`, FP8_OPTIONS): passes/quant_fp8.py (DeepSeek-V3's E4M3 128x128 blocks; an FP8
checkpoint's own bytes and scales pass through) then passes/quant_fp8_cuda.py, which rewrites each
blocked DequantizeLinear (onnxruntime-gpu 1.31.1's CUDA EP fails on it at run time, measured) as a
per-tensor one times the block scales in fp32; to_fp16 then rounds each dequantized weight once to fp16
for the fp16 GEMM. Weight-only: activations stay fp16 (ORT has no FP8 GEMM), the weights are dequantized
on every run (fp8 bytes resident: a memory saving, not a speed-up). Routed experts inside
com.microsoft.MoE are fp16 (no FP8 MoE kernel). Checked as for int8: the fp32-activation graph of the
same form under BUDGETS["quantize-fp8"], the fp16 graphs under BUDGETS["target-ort-cuda-fp8"].
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from models.errors import MlamoeError
from passes.fp16_rounding import infer_dtypes
from passes.graph_utils import is_projection

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
CACHE_PREFIXES = ("past.", "present.")
_RMS_OPS = {"Pow", "ReduceMean", "Sqrt", "Reciprocal"}
_ALWAYS_FP32 = {"Softmax", "LogSoftmax", "TopK", "MoEGroupRouter"}
_GATE_SCORERS = {"Sigmoid", "Softmax"}  # what scores a MoE gate projection's logits (models/moe.py Router)
_FP16_MAX = float(np.finfo(np.float16).max)


# onnxruntime-gpu 1.31.1's CUDA QMoE (int weight-only): "requires inter_size to be a multiple of 64 (the
# interleaved-weight K tile)" (its error on the H200 for tiny's moe_intermediate 32; 64 and 128 run)
CUDA_QMOE_INTER_MULTIPLE = 64
# `--quant int8` for this target (passes.quant_int8.Int8WeightOnlyPass options; module doc)
INT8_OPTIONS = {"block_size": 128, "symmetric": True, "experts": "channel", "scale_dtype": "float16"}


# `--quant int4` for this target (passes.quant_int4.Int4WeightOnlyPass options; module doc). block_size 32 as on
# ort-cpu (targets/ort_cpu/session.py INT4_OPTIONS; 128 is the other block quantize_int4 takes), zero points
# (asymmetric, the CPU default), the attention linears 8-bit (what brought trained-small's top-1 past 95% on
# ort-cpu), no accuracy_level: the CUDA kernels keep fp16 activations (weight-only), and the fp16 graphs' ORT CPU
# check then computes the same weight-only numbers. experts "block": QMoE 4-bit per block, where CUDA takes it.
INT4_OPTIONS = {"block_size": 32, "symmetric": False, "attention_bits": 8, "dense_mlp_bits": 8, "experts": "block",
                "scale_dtype": "float16"}
INT4_BLOCK_SIZES = (32, 128)
# onnxruntime-gpu 1.31.1's CUDA QMoE (strings of libonnxruntime_providers_cuda.so): "QMoE asymmetric zero_points
# are currently supported only when block_size >= 32"; "QMoE row-wise quantization (block_size <= 0) does not
# support zero_points"; hidden_size and inter_size multiples of 64 ("the interleaved-weight K tile"); scales "must
# match the activation type (FP16/BF16)". ONNX Runtime GenAI's model builder: "CUDA block-wise QMoE supports
# 32/64/128 only".
CUDA_QMOE_INT4_BLOCKS = (32, 64, 128)


# `--quant fp8` for this target (what the manifest records; the scheme itself has no options here)
FP8_OPTIONS = {"weights": "float8e4m3fn, 128x128 blocks, fp32 scale_inv", "activations": "fp16 (weight-only)",
               "form": "per-tensor DequantizeLinear x block scales (passes/quant_fp8_cuda.py)",
               "experts": "fp16 com.microsoft.MoE"}


def quantize_fp8(model: ir.Model, eager=None):
    """`--quant fp8` on an fp32 ort-cuda graph, in place (before to_fp16): passes.quant_fp8 (with `eager`,
    the loaded model, an FP8 checkpoint's bytes pass through), then the CUDA form. -> the QuantReport."""
    from passes.quant_fp8_cuda import Fp8CudaFormPass
    from passes.quant_weights import initializer_bytes, record
    from passes.quantize import quantize
    report = quantize(model, "fp8", model=eager)
    form = Fp8CudaFormPass()
    form(model)
    report.notes.append(f"{form.rewritten} blocked fp8 DequantizeLinear rewritten as per-tensor DequantizeLinear x "
                        "block scales (onnxruntime-gpu's CUDA EP has no blocked fp8 DequantizeLinear)")
    report.weights_bytes_after = initializer_bytes(model.graph)
    record(model, report)
    return report


def quantize_int8(model: ir.Model):
    """`--quant int8` on an fp32 ort-cuda graph, in place (before to_fp16): linear layers -> MatMulNBits
    (passes.quant_int8, fp16-exact scales), routed experts -> QMoE (passes.quant_qmoe, per channel, fp16-exact
    scales, no router_weights input) unless INT8_OPTIONS["experts"] is "none". -> the QuantReport."""
    from passes.quant_qmoe import QMoEPass
    from passes.quant_weights import DEFAULT_EXCLUDE, initializer_bytes, record
    from passes.quantize import quantize
    opts = dict(INT8_OPTIONS)
    experts = opts.pop("experts")
    report = quantize(model, "int8", experts="none", **opts)
    if experts != "none":
        keep = {}  # MoE nodes the CUDA QMoE kernel cannot run: they stay fp16 MoE
        for node in model.graph:
            fc1 = node.inputs[2] if node.op_type == "MoE" and len(node.inputs) > 2 else None
            if fc1 is not None and fc1.shape is not None and int(fc1.shape[1]) // 2 % CUDA_QMOE_INTER_MULTIPLE:
                keep[node.name] = int(fc1.shape[1]) // 2
        QMoEPass(experts, opts["block_size"], None, DEFAULT_EXCLUDE + tuple(keep), report,
                 scale_dtype=opts["scale_dtype"], router_weights=False)(model)
        report.skipped = [s for s in report.skipped if s["node"] not in keep] + [
            {"node": n, "weight": "", "role": "routed_experts",
             "reason": f"moe_intermediate {i} is not a multiple of {CUDA_QMOE_INTER_MULTIPLE}: onnxruntime-gpu 1.31.1's "
                       "CUDA QMoE refuses it (measured); kept fp16 com.microsoft.MoE"} for n, i in keep.items()]
        report.weights_bytes_after = initializer_bytes(model.graph)
        record(model, report)
    return report


def cuda_qmoe_int4_problem(hidden: int, inter: int, block_size: int) -> tuple[int | None, str | None]:
    """(the QMoE 4-bit block for an MoE of this hidden / moe_intermediate, None) where onnxruntime-gpu's CUDA QMoE
    takes it with zero points, else (None, why not): hidden and inter multiples of CUDA_QMOE_INTER_MULTIPLE, the
    block (the largest power of two <= block_size dividing both, as passes/quant_qmoe.py picks it) in
    CUDA_QMOE_INT4_BLOCKS."""
    from passes.quant_qmoe import qmoe_block_size
    for name, dim in (("hidden", hidden), ("moe_intermediate", inter)):
        if dim % CUDA_QMOE_INTER_MULTIPLE:
            return None, (f"{name} {dim} is not a multiple of {CUDA_QMOE_INTER_MULTIPLE}: onnxruntime-gpu's CUDA QMoE "
                          "refuses it (the interleaved-weight K tile); kept fp16 com.microsoft.MoE")
    bs = qmoe_block_size(hidden, inter, block_size)
    if bs not in CUDA_QMOE_INT4_BLOCKS:
        return None, (f"no QMoE block in {CUDA_QMOE_INT4_BLOCKS} <= {block_size} divides hidden {hidden} and "
                      f"moe_intermediate {inter} (CUDA QMoE takes zero points only with blocks >= 32); kept fp16 "
                      "com.microsoft.MoE")
    return bs, None


def quantize_int4(model: ir.Model, block_size: int | None = None):
    """`--quant int4` on an fp32 ort-cuda graph, in place (before to_fp16): linear layers -> MatMulNBits 4-bit
    (passes.quant_int4, zero points, fp16-exact scales; attention linears 8-bit), routed experts -> QMoE 4-bit per
    block with zero points and fp16-exact scales, raw layout (weights_prepacked=0), no router_weights input, where
    onnxruntime-gpu's CUDA QMoE takes the shape (cuda_qmoe_int4_problem), else fp16 MoE. block_size: 32
    (INT4_OPTIONS) or 128. -> the QuantReport."""
    from passes.quant_qmoe import QMoEPass
    from passes.quant_weights import DEFAULT_EXCLUDE, QuantizationError, initializer_bytes, record
    from passes.quantize import quantize
    opts = dict(INT4_OPTIONS)
    if block_size is not None:
        if block_size not in INT4_BLOCK_SIZES:
            raise QuantizationError(f"ort-cuda int4 block_size {block_size!r}: one of {INT4_BLOCK_SIZES}")
        opts["block_size"] = block_size
    experts = opts.pop("experts")
    report = quantize(model, "int4", experts="none", **opts)
    keep, blocks = {}, {}  # MoE nodes the CUDA QMoE kernel cannot run (they stay fp16 MoE), and the others' block
    for node in model.graph:
        if node.op_type != "MoE" or len(node.inputs) < 3 or node.inputs[2] is None or node.inputs[2].shape is None:
            continue
        _, two_i, hidden = (int(d) for d in node.inputs[2].shape)
        bs, why = cuda_qmoe_int4_problem(hidden, two_i // 2, opts["block_size"])
        if why:
            keep[node.name] = why
        else:
            blocks.setdefault(bs, []).append(node.name)
    others = tuple(keep) + tuple(n for b in blocks for n in blocks[b])
    for bs, names in blocks.items():  # one pass per block (the pass picks the block from its block_size)
        QMoEPass(experts, bs, None, DEFAULT_EXCLUDE + tuple(n for n in others if n not in names), report,
                 scale_dtype=opts["scale_dtype"], router_weights=False, bits=4, symmetric=opts["symmetric"])(model)
    report.skipped = [s for s in report.skipped if s["node"] not in others] + [
        {"node": n, "weight": "", "role": "routed_experts", "reason": why} for n, why in keep.items()]
    report.notes.append("routed experts: QMoE expert_weight_bits 4 per block with zero points, fp16 scales, raw layout "
                        "(weights_prepacked=0), fp16 activations (weight-only), where CUDA QMoE takes the shape")
    report.weights_bytes_after = initializer_bytes(model.graph)
    record(model, report)
    return report


def session_config() -> dict:
    """Session settings recorded in the manifest (read by ort_runtime.session_options)."""
    return {"graph_optimization_level": "all", "intra_op_num_threads": 0, "inter_op_num_threads": 1}


def cuda_provider_options(device_id: int = 0) -> dict:
    """CUDAExecutionProvider options: the BFC arena grows by what is asked (the cache grows one token
    per step), cuDNN conv search is irrelevant here, TF32 off (fp16 graph; keep fp32 islands exact),
    the default stream is used so IOBinding copies and kernels are ordered."""
    return {"device_id": str(device_id), "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1", "use_tf32": "0"}


def providers(device_id: int = 0) -> list:
    return [("CUDAExecutionProvider", cuda_provider_options(device_id)), "CPUExecutionProvider"]


# ---- fp16 conversion ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Fp16Report:
    fp16_nodes: int = 0
    fp32_nodes: int = 0
    islands: dict = dataclasses.field(default_factory=dict)  # reason -> count of activation nodes kept fp32
    casts_inserted: int = 0
    initializers_fp16: int = 0
    initializers_fp32: int = 0
    fp16_copies: int = 0
    weight_bytes_fp16: int = 0
    weight_bytes_fp32: int = 0
    transposes_fp16: int = 0  # computed (not constant) Transposes feeding only fp16 nodes, moved after the cast
    gathers_fp16: int = 0  # fixed_shape: Gathers of float tables (and their reshapes) feeding only fp16 nodes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_const(v: ir.Value | None) -> bool:
    return v is not None and (v.const_value is not None or v.is_initializer())


def _router_region(moe: ir.Node) -> list[ir.Node]:
    """The nodes of a MoE op's router: from its router_probs input back to (and including) the gate projection,
    through every input (the expert choice reaches the weights only as TopK indices, the group choice only as a
    mask), but not into what Shape/Size read (the shape of the hidden state is not the router)."""
    return _region_back_to_gate(moe.inputs[1] if len(moe.inputs) > 1 else None)


def _region_back_to_gate(start: ir.Value | None) -> list[ir.Node]:
    """The nodes from `start` back to (and including) the projections of the hidden state that feed it
    (passes.graph_utils.is_projection; for a router, the gate projection): _router_region's walk, and the selection region's."""
    out, seen = [], set()
    stack = [start] if start is not None else []
    while stack:
        v = stack.pop()
        p = v.producer()
        if p is None or id(p) in seen:
            continue
        seen.add(id(p))
        out.append(p)
        if p.op_type in ("Shape", "Size"):
            continue
        if is_projection(p):
            continue  # the gate projection (or an indexer projection): stop here
        stack.extend(i for i in p.inputs if i is not None and not _is_const(i))
    return out


def _static_router_topks(graph: ir.Graph) -> list[ir.Node]:
    """The fixed-shape form's router TopKs (models/static_lm.py StaticRouter has no MoE node: its group and expert
    choices are TopKs over the gate's scores): every TopK whose scores reach, walking back (_region_back_to_gate),
    a gate projection, i.e. a projection whose output is scored by Sigmoid / Softmax (the DeepSeekMoE gate,
    models/moe.py). Other TopKs (the lightning indexer's, whose projections feed LayerNorm / Reshape / Mul) are
    selections (_selection_nodes)."""
    out = []
    for t in graph:
        if t.op_type == "TopK" and any(is_projection(p) and any(u.op_type in _GATE_SCORERS
                                                                for u, _ in p.outputs[0].uses())
                                       for p in _region_back_to_gate(t.inputs[0])):
            out.append(t)
    return out


def _router_nodes(graph: ir.Graph, from_topk: bool = False) -> set[int]:
    """Nodes of every MoE op's router (_router_region); with from_topk (the fixed-shape form), also every router
    TopK (_static_router_topks) with its scores back to the gate projection."""
    out = {id(n) for moe in graph if moe.op_type in ("MoE", "QMoE") for n in _router_region(moe)}
    if from_topk:
        for t in _static_router_topks(graph):
            out |= {id(t)} | {id(n) for n in _region_back_to_gate(t.inputs[0])}
    return out


def _selection_nodes(graph: ir.Graph, router: set[int]) -> set[int]:
    """Every TopK outside the MoE routers (`router`: _router_nodes) with its scores back to the projections that
    feed them (_region_back_to_gate): a second discrete choice, made on fp32 scores as expert choice is. In
    DeepSeek-V3.2 this is the lightning indexer (models/indexer.py): wq_b, wk, the k_norm LayerNorm, RoPE,
    weights_proj, the weighted ReLU scores over the whole key cache (its past rows cast from the fp16 cache) and
    the TopK of the index_topk keys each query attends to."""
    out: set[int] = set()
    for t in graph:
        if t.op_type == "TopK" and id(t) not in router:
            out |= {id(n) for n in _region_back_to_gate(t.inputs[0])}
    return out


def _routing_weight_nodes(nodes: list[ir.Node], router: set[int], act: set[int]) -> set[int]:
    """The fixed-shape form's routing weights (models/static_lm.py StaticRouter: the chosen experts' scores picked by
    one-hot products, normalised and scaled): in graph order, every activation node whose activation inputs all come
    from router nodes (the scores) or from non-activation nodes (the one-hot of the TopK indices), at least one from
    the router; the first node that also reads the experts' output (the combining Mul) is where they stop, cast to
    fp16 there. MatMul/Gemm never join (a projection of the hidden state is not a routing weight)."""
    out: set[int] = set()
    for n in nodes:
        if id(n) in router or id(n) not in act or n.op_type in ("MatMul", "Gemm"):
            continue
        srcs = [i.producer() for i in n.inputs if i is not None and i.dtype in (F32, F16) and not _is_const(i)]
        if any(p is None for p in srcs):
            continue  # reads a graph input (the cache): not the router
        from_router = [id(p) in router or id(p) in out for p in srcs]
        if any(from_router) and all(r or id(p) not in act for r, p in zip(from_router, srcs)):
            out.add(id(n))
    return out


def _rms_nodes(graph: ir.Graph) -> set[int]:
    out: set[int] = set()
    for node in graph:
        if node.op_type in _RMS_OPS:
            out.add(id(node))
        elif node.op_type == "Add" and any(i is not None and i.producer() is not None
                                           and i.producer().op_type == "ReduceMean" for i in node.inputs):
            out.add(id(node))
        elif node.op_type in ("Mul", "Div") and any(i is not None and i.producer() is not None
                                                    and i.producer().op_type in ("Reciprocal", "Sqrt")
                                                    for i in node.inputs):
            out.add(id(node))
    return out


def _activation_nodes(graph: ir.Graph) -> set[int]:
    """Nodes with an activation float input, or the embedding lookup (see module doc)."""
    act_values: set[int] = set()
    for v in graph.inputs:
        if v.name.startswith("past.") and v.dtype in (F32, F16):
            act_values.add(id(v))
    nodes: set[int] = set()
    for node in graph:  # topological order
        emb = (node.op_type == "Gather" and _is_const(node.inputs[0]) and node.inputs[0].dtype == F32
               and node.inputs[1] is not None and node.inputs[1].is_graph_input())
        if emb or any(i is not None and id(i) in act_values for i in node.inputs):
            nodes.add(id(node))
            for o in node.outputs:
                if o.dtype in (F32, F16):
                    act_values.add(id(o))
    return nodes


def _transpose_for_fp16(node: ir.Node, want: dict, act: set) -> bool:
    """A Transpose outside the activations whose input is computed at run time (e.g. a weight dequantized on
    every run, passes/quant_fp8_cuda.py) and whose every consumer computes in fp16: transposing after the cast
    to fp16 is bit-identical, moves half the bytes, and lets ORT fuse the Transpose into the consumer's
    FusedMatMul (a Cast in between prevents that). Constant inputs are left alone (ORT folds those)."""
    if node.op_type != "Transpose" or id(node) in act or want.get(id(node)) == F16:
        return False
    x, y = node.inputs[0], node.outputs[0]
    if x is None or x.producer() is None or _is_const(x) or y.is_graph_output() or x.dtype != F32:
        return False
    uses = list(y.uses())
    return bool(uses) and all(want.get(id(u)) == F16 and u.op_type != "Cast" for u, _ in uses)


def _gather_for_fp16(node: ir.Node, want: dict, act: set) -> bool:
    """A data-movement node outside the activations (Gather of a float initializer by computed indices, or a
    Reshape / Squeeze / Unsqueeze / Transpose of such a node's output) whose every consumer computes in fp16:
    moving the rows after rounding them is bit-identical to rounding after the move, halves the bytes moved,
    and stores the table once, in fp16 (the fixed-shape form's static-gather MoE picks the chosen experts'
    weights this way, models/static_lm.py). Used by to_fp16(fixed_shape=True)."""
    if node.op_type not in ("Gather", "Reshape", "Squeeze", "Unsqueeze", "Transpose") or id(node) in act \
            or want.get(id(node)) == F16:
        return False
    x, y = node.inputs[0], node.outputs[0]
    if x is None or x.dtype != F32 or y.is_graph_output():
        return False
    if node.op_type == "Gather":
        if not (_is_const(x) and x.is_initializer()):
            return False
    elif x.producer() is None or _is_const(x):
        return False
    uses = list(y.uses())
    return bool(uses) and all(want.get(id(u)) == F16 and u.op_type != "Cast" for u, _ in uses)


def to_fp16(model: ir.Model, cache_fp16: bool = True, fixed_shape: bool = False) -> Fp16Report:
    """Rewrite `model` in place to compute in fp16 with fp32 islands (module doc). -> report.

    fixed_shape: the graph is the family's fixed-shape form (models/static_lm.py; targets/ort_cuda/gears.py):
    its router (gate projection -> TopK, no MoE node: _static_router_topks) and routing weights stay fp32
    (_router_nodes(from_topk), _routing_weight_nodes; checked by check_router_fp32(fixed_shape)), its other TopKs
    (V3.2's indexer selection) get the topk-selection island as in the dynamic graphs, and the static-gather MoE's
    expert tables are gathered in fp16 (_gather_for_fp16). Off, nothing changes for the dynamic graphs."""
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    infer_dtypes(model)
    g = model.graph
    g.sort()
    nodes = list(g)
    act = _activation_nodes(g)
    islands = {"softmax/topk/router-op": {id(n) for n in nodes if n.op_type in _ALWAYS_FP32},
               "rmsnorm": _rms_nodes(g), "moe-router": _router_nodes(g, from_topk=True) if fixed_shape else _router_nodes(g)}
    if fixed_shape:
        islands["moe-router"] |= _routing_weight_nodes(nodes, islands["moe-router"], act)
    islands["topk-selection"] = _selection_nodes(g, islands["moe-router"])
    report = Fp16Report()
    want: dict[int, ir.DataType] = {}
    for n in nodes:
        keep = [r for r, s in islands.items() if id(n) in s]
        if id(n) in act and not keep:
            want[id(n)] = F16
        else:
            want[id(n)] = F32
            if id(n) in act:
                report.islands[keep[0]] = report.islands.get(keep[0], 0) + 1
    for n in reversed(nodes):  # consumers before producers: chains of Transposes follow their consumers
        if _transpose_for_fp16(n, want, act):
            want[id(n)] = F16
            report.transposes_fp16 += 1
        elif fixed_shape and _gather_for_fp16(n, want, act):
            want[id(n)] = F16
            report.gathers_fp16 += 1
    report.fp16_nodes = sum(d == F16 for d in want.values())
    report.fp32_nodes = len(nodes) - report.fp16_nodes

    # cache graph inputs become fp16
    if cache_fp16:
        for v in g.inputs:
            if v.name.startswith("past.") and v.dtype == F32:
                v.dtype = F16

    # initializers: fp16 where fp16 nodes read them (a separate fp16 copy when fp32 nodes read them too)
    for v in list(g.initializers.values()):
        if v.dtype != F32 or v.const_value is None:
            continue
        users = list(v.uses())
        half = [(u, i) for u, i in users if want.get(id(u)) == F16]
        if not half:
            report.initializers_fp32 += 1
            report.weight_bytes_fp32 += v.const_value.nbytes
            continue
        arr = v.const_value.numpy()
        a16 = np.where(np.isfinite(arr), np.clip(arr, -_FP16_MAX, _FP16_MAX), arr).astype(np.float16)
        report.weight_bytes_fp16 += a16.nbytes
        if len(half) == len(users):
            v.const_value = ir.tensor(a16, name=v.name)
            v.dtype = F16
            report.initializers_fp16 += 1
        else:
            copy = ir.Value(name=f"{v.name}__fp16", type=ir.TensorType(F16), shape=v.shape,
                            const_value=ir.tensor(a16, name=f"{v.name}__fp16"))
            g.register_initializer(copy)
            for u, i in half:
                u.replace_input_with(i, copy)
            report.fp16_copies += 1
            report.weight_bytes_fp32 += v.const_value.nbytes

    casts: dict[tuple[int, ir.DataType], ir.Value] = {}

    def cast_of(v: ir.Value, to: ir.DataType, before: ir.Node) -> ir.Value:
        key = (id(v), to)
        if key not in casts:
            tag = "fp16" if to == F16 else "fp32"
            node = ir.node("Cast", [v], attributes={"to": to}, name=f"{v.name}/cuda_cast_{tag}")
            node.outputs[0].name = f"{v.name}__{tag}"
            node.outputs[0].dtype, node.outputs[0].shape = to, v.shape
            p = v.producer()
            if p is not None:
                g.insert_after(p, node)
            else:
                g.insert_before(nodes[0], node)
            casts[key] = node.outputs[0]
            report.casts_inserted += 1
        return casts[key]

    for node in nodes:
        dt = want[id(node)]
        if node.op_type == "Cast":
            to = node.attributes["to"].as_int()
            if dt == F16 and to == F32:
                node.attributes["to"] = ir.AttrInt64("to", F16)
                node.outputs[0].dtype = F16
            continue  # a Cast takes any input type
        for i, v in enumerate(node.inputs):
            if v is not None and v.dtype in (F32, F16) and v.dtype != dt:
                if node.op_type == "Pow" and i == 1:
                    continue  # the exponent may have its own type
                node.replace_input_with(i, cast_of(v, dt, node))
        for o in node.outputs:
            if o.dtype in (F32, F16) and node.op_type not in ("Shape", "Size"):
                o.dtype = dt

    # graph outputs: cache fp16 (or fp32), everything else (logits) fp32
    for i, out in enumerate(list(g.outputs)):
        target = F16 if (cache_fp16 and out.name.startswith("present.")) else F32
        if out.dtype in (F32, F16) and out.dtype != target:
            name = out.name
            out.name = f"{name}__{'fp16' if out.dtype == F16 else 'fp32'}"
            cast = ir.node("Cast", [out], attributes={"to": target}, name=f"{name}/cuda_output_cast")
            cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = name, target, out.shape
            g.append(cast)
            g.outputs[i] = cast.outputs[0]
            report.casts_inserted += 1
    common_passes.RemoveUnusedNodesPass()(model)
    g.sort()
    check_router_fp32(g, fixed_shape=fixed_shape)
    return report


class RouterPrecisionError(MlamoeError):
    pass


class SelectionPrecisionError(RouterPrecisionError):
    """A TopK outside the MoE routers (the lightning indexer's) scored in fp16."""


def check_router_fp32(graph: ir.Graph, fixed_shape: bool = False) -> None:
    """to_fp16's postcondition: every MoE op's router (_router_region: the choice scores, group and expert top-k,
    routing weights, back to the gate projection) computes in fp32, cast to fp16 only where the MoE op reads it;
    so does every other TopK's scoring back to its projections (_selection_nodes: the lightning indexer).
    Checked on the graph itself, since ORT CPU cannot show a router lost to fp16 numerically: its
    InsertCastTransformer runs chains of fp16 ops that lack CPU fp16 kernels in fp32 without rounding between them
    (measured: docs/ort-cuda.md)."""
    for moe in graph:
        if moe.op_type not in ("MoE", "QMoE"):
            continue
        for p in _router_region(moe):
            if p.op_type not in ("Cast", "Shape", "Size") and any(o.dtype == F16 for o in p.outputs):
                raise RouterPrecisionError(
                    f"ort-cuda fp16 conversion: {moe.op_type} node {moe.name!r}'s router computes in fp16 at "
                    f"{p.op_type} {p.name!r} (output {p.outputs[0].name!r}); expert choice must be made on fp32 scores "
                    "(the router island of targets/ort_cuda/graphs.py to_fp16)")
    if fixed_shape:  # the fixed-shape form's router: each router TopK's scores back to the gate projection
        for t in _static_router_topks(graph):
            for p in _region_back_to_gate(t.inputs[0]):
                if p.op_type not in ("Cast", "Shape", "Size") and any(o.dtype == F16 for o in p.outputs):
                    raise RouterPrecisionError(
                        f"ort-cuda fp16 conversion (fixed-shape form): TopK {t.name!r}'s scores are computed in fp16 "
                        f"at {p.op_type} {p.name!r}; expert choice must be made on fp32 scores")
    router = _router_nodes(graph, from_topk=fixed_shape)
    for t in graph:  # every other TopK (the lightning indexer's): its scores back to the projections
        if t.op_type != "TopK" or id(t) in router:
            continue
        for p in _region_back_to_gate(t.inputs[0]):
            if p.op_type not in ("Cast", "Shape", "Size") and any(o.dtype == F16 for o in p.outputs):
                raise SelectionPrecisionError(
                    f"ort-cuda fp16 conversion: TopK {t.name!r} (a selection outside the MoE routers: DeepSeek-V3.2's "
                    f"lightning indexer picks the keys each query attends to) has its scores computed in fp16 at "
                    f"{p.op_type} {p.name!r} (output {p.outputs[0].name!r}); the selection must be made on fp32 scores "
                    "from fp32 projections (the topk-selection island of targets/ort_cuda/graphs.py to_fp16)")


def convert_graph_files(src: Path, dst: Path, cache_fp16: bool = True) -> Fp16Report:
    """Load an fp32 graph file, convert it (to_fp16) and save it with pipeline.export.save_graph."""
    from pipeline.export import save_graph
    m = ir.load(src)
    report = to_fp16(m, cache_fp16=cache_fp16)
    save_graph(m, dst)
    return report


def graph_dtypes(path: Path) -> dict[str, str]:
    """{input/output name: numpy dtype name} of a saved graph (what a runtime must feed)."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for v in list(m.graph.input) + list(m.graph.output):
        out[v.name] = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
    return out


def has_cuda_provider() -> tuple[bool, str]:
    """(True, "") when this onnxruntime has the CUDA EP and a GPU answers; else (False, reason)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return False, f"onnxruntime not importable: {e}"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu "
                       "in a separate environment; see benchmarks/gpu/README.md)")
    return True, ""
