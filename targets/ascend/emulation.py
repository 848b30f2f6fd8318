"""Ascend precision emulation on ORT CPU: the ATC-ready graphs run in fp16 (softmax, RMSNorm and the
MoE router kept in fp32, as `--keep_dtype` asks ATC), compared with eager fp32 by msit's thresholds.

`to_fp16(model, keep_fp32)` rewrites a graph on onnx-ir, without onnxconverter-common:
- every node outside the keep set computes in fp16: its float inputs are cast to fp16, its float
  outputs are fp16, float Constants / ConstantOfShape values and Cast-to-float targets become fp16;
- nodes in the keep set (node names from static_export.fp32_island_nodes, the same list written
  to ascend/keep_dtype/<g>.cfg) compute in fp32: their float inputs are cast to fp32;
- float initializers used by any fp16 node are stored as fp16 (weights as ATC stores them), those
  used only by fp32 nodes stay fp32;
- graph inputs and outputs keep their fp32 dtype (Casts at the boundary), like an OM built without
  --input_fp16_nodes, so the same feeds drive both.
ORT CPU has no fp16 kernel for several of these ops (MatMul/Gemm among them on x86); its
InsertCastTransformer then runs that op in fp32 between Casts. Every fp16 tensor is still rounded
to fp16 between ops, which is what the NPU does (cube units accumulate in fp32 and write fp16).

`emulate(...)` compares the fp16 graphs with eager fp32 on a prompt prefilled in a bucket, several
decode steps (each fed the emulated cache) and greedy generation, under
BUDGETS["ascend-fp16-emulation"] (cosine >= 0.99, KL <= 0.005, rel euclid <= 0.05); greedy token
agreement is recorded (informational under this budget, as msit has no top-1 rule).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from pipeline.parity import ParityReport, compare

from .static_export import StaticGraphSpec, StaticRunner, ort_sessions

STAGE = "ascend-fp16-emulation"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def to_fp16(model: ir.Model, keep_fp32: set[str] | list[str]) -> ir.Model:
    """A copy of `model` computing in fp16 except the nodes named in keep_fp32 (see module doc)."""
    m = ir.from_proto(ir.to_proto(model))
    keep = set(keep_fp32)
    g = m.graph
    nodes = list(g)
    want = {id(n): (ir.DataType.FLOAT if n.name in keep else ir.DataType.FLOAT16) for n in nodes}

    # initializers: fp16 when any fp16 node uses them
    for v in list(g.initializers.values()):
        if v.dtype != ir.DataType.FLOAT or v.const_value is None:
            continue
        if any(want[id(user)] == ir.DataType.FLOAT16 for user, _ in v.uses()):
            v.const_value = ir.tensor(v.const_value.numpy().astype(np.float16), name=v.name)
            v.dtype = ir.DataType.FLOAT16

    casts: dict[tuple[int, ir.DataType], ir.Value] = {}

    def cast_of(v: ir.Value, to: ir.DataType, before: ir.Node) -> ir.Value:
        key = (id(v), to)
        if key not in casts:
            node = ir.node("Cast", [v], attributes={"to": to},
                           name=f"{v.name}/emulation_cast_{'fp16' if to == ir.DataType.FLOAT16 else 'fp32'}")
            node.outputs[0].name = f"{v.name}__{'fp16' if to == ir.DataType.FLOAT16 else 'fp32'}"
            node.outputs[0].dtype = to
            node.outputs[0].shape = v.shape
            g.insert_before(before, node)
            casts[key] = node.outputs[0]
        return casts[key]

    for node in nodes:
        dt = want[id(node)]
        for i, v in enumerate(node.inputs):
            if v is not None and v.dtype in _FLOATS and v.dtype != dt:
                node.replace_input_with(i, cast_of(v, dt, node))
        if dt == ir.DataType.FLOAT16:
            if node.op_type == "Cast" and node.attributes["to"].value == ir.DataType.FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT16)
            if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
                t = node.attributes["value"].value
                if t.dtype == ir.DataType.FLOAT:
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(t.numpy().astype(np.float16)))
            for o in node.outputs:
                if o.dtype == ir.DataType.FLOAT:
                    o.dtype = ir.DataType.FLOAT16
        else:  # fp32 island: a Cast to float / float constants stay fp32
            for o in node.outputs:
                if o.dtype == ir.DataType.FLOAT16 and node.op_type not in ("Cast",):
                    o.dtype = ir.DataType.FLOAT

    # graph outputs stay fp32
    for i, out in enumerate(list(g.outputs)):
        if out.dtype == ir.DataType.FLOAT16:
            name = out.name
            out.name = f"{name}__fp16"
            cast = ir.node("Cast", [out], attributes={"to": ir.DataType.FLOAT}, name=f"{name}/emulation_output_cast")
            cast.outputs[0].name = name
            cast.outputs[0].dtype = ir.DataType.FLOAT
            cast.outputs[0].shape = out.shape
            g.append(cast)
            g.outputs[i] = cast.outputs[0]
    m.graph.name = f"{model.graph.name}_fp16_emulation"
    return m


def emulation_graphs(graphs: dict[str, tuple[StaticGraphSpec, Path]], keep_fp32: dict[str, list[str]],
                     folder: Path) -> dict[str, Path]:
    """Write the fp16 twin of every graph into folder; -> {name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (_, path) in graphs.items():
        m16 = to_fp16(ir.load(path), keep_fp32.get(name, []))
        p = folder / f"{name}.fp16.onnx"
        ir.save(m16, p)
        out[name] = p
    return out


def emulate(model, graphs: dict[str, tuple[StaticGraphSpec, Path]], keep_fp32: dict[str, list[str]],
            prompt_len: int | None = None, decode_steps: int = 4, gen_tokens: int = 16, seed: int = 0,
            work: Path | None = None, stage: str = STAGE) -> list[ParityReport]:
    """fp16 emulation vs eager fp32: reports for the prefill (logits + cache rows), each decode step
    and greedy generation (tokens recorded), under BUDGETS[stage]."""
    specs = {n: s for n, (s, _) in graphs.items()}
    with tempfile.TemporaryDirectory(prefix="mlamoe-emul-") as tmp:
        paths = emulation_graphs(graphs, keep_fp32, Path(work) if work else Path(tmp))
        runner = StaticRunner(ort_sessions(paths), specs, model.config)
        return compare_runs(model, runner, stage, prompt_len, decode_steps, gen_tokens, seed)


def static_parity(model, graphs: dict[str, tuple[StaticGraphSpec, Path]], stage: str = "export/ascend-static",
                  prompt_len: int | None = None, decode_steps: int = 4, gen_tokens: int = 16,
                  seed: int = 0) -> list[ParityReport]:
    """The fp32 static graphs on ORT CPU vs eager (the `export` fp32 budget: greedy tokens binding)."""
    specs = {n: s for n, (s, _) in graphs.items()}
    runner = StaticRunner(ort_sessions({n: p for n, (_, p) in graphs.items()}), specs, model.config)
    return compare_runs(model, runner, stage, prompt_len, decode_steps, gen_tokens, seed)


@torch.no_grad()
def compare_runs(model, runner: StaticRunner, stage: str, prompt_len: int | None = None, decode_steps: int = 4,
                 gen_tokens: int = 16, seed: int = 0) -> list[ParityReport]:
    """Eager vs `runner` on one prompt: prefill in the smallest bucket (prompt = 3/4 of it by
    default, so padding is exercised), `decode_steps` steps each fed the runner's own cache, then
    greedy generation of `gen_tokens` tokens."""
    specs = runner.specs
    cfg = model.config
    dec = specs["decode"]
    buckets = sorted(s.seq for s in specs.values() if s.kind == "prefill")
    L = prompt_len or max(1, (3 * buckets[0]) // 4)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (dec.batch, L), generator=g)
    reports = []
    ref_logits, cache = model.step(prompt, model.empty_cache(dec.batch))
    logits, c16 = runner.prefill(prompt.numpy())
    ref = {"logits": ref_logits.numpy()}
    act = {"logits": logits}
    for i, (ck, pe) in enumerate(cache):
        ref[f"present.{i}.c_kv"], act[f"present.{i}.c_kv"] = ck.numpy(), c16[f"past.{i}.c_kv"][:, :L]
        ref[f"present.{i}.k_pe"], act[f"present.{i}.k_pe"] = pe.numpy(), c16[f"past.{i}.k_pe"][:, :L]
    reports.append(compare(f"{stage}/prefill", ref, act, logits_outputs=["logits"]))
    tok = ref_logits[:, -1].argmax(-1, keepdim=True)
    pos = L
    for step in range(decode_steps):
        if pos >= dec.max_cache:
            break
        ref_logits, cache = model.step(tok, cache)
        logits, c16 = runner.decode(tok.numpy(), pos, c16)
        reports.append(compare(f"{stage}/decode-{step}", {"logits": ref_logits.numpy()}, {"logits": logits},
                               logits_outputs=["logits"]))
        tok = ref_logits[:, -1].argmax(-1, keepdim=True)
        pos += 1
    from models.generation import greedy_generate
    n = min(gen_tokens, dec.max_cache - L)
    ref_tokens, ref_steps = greedy_generate(model, prompt, n)
    tokens, steps = runner.generate(prompt.numpy(), n)
    # the runner's own greedy logits are compared up to the first token mismatch (after it the
    # two trajectories see different tokens and are no longer comparable)
    agree = int((ref_tokens.numpy() == tokens).all(0).cumprod().sum())
    upto = max(agree, 1)
    rep = compare(f"{stage}/greedy", {"step_logits": ref_steps.numpy()[:, :upto]},
                  {"step_logits": steps[:, :upto]}, logits_outputs=["step_logits"])
    rep.add_tokens("greedy", ref_tokens.numpy(), tokens)
    reports.append(rep)
    return reports
