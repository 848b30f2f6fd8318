"""Expert-parallel packages: per-rank ONNX graphs cut at every MoE layer, for runtime/ep_runtime.py.

`build_ep_package(model, out, ranks, ...)` writes a folder that `torchrun` runs on `ranks` processes
(gloo on CPU, NCCL on GPUs): every rank runs the replicated "segment" graphs (embedding, attention,
router, shared experts, dense layers, final norm and lm_head) on its slice of the batch, and its own
routed experts for every MoE layer on the tokens the other ranks dispatch to it
(runtime/ep_runtime.py documents the runtime, dispatch/combine and failure handling).

How the model is cut. With MoE layers m_0 < m_1 < ... < m_{M-1}, there are M + 1 segment graphs:

  segment 0    input_ids, past.{0..m_0}.*            -> embedding, dense layers 0..m_0-1, then the
                                                        first half of MoE layer m_0: h += attention,
                                                        x = post_attention_layernorm(h), router, shared
  segment j    h, shared, routed, past.{m_{j-1}+1..m_j}.* -> h + (routed + shared) (the combine, in the
                                                        eager model's order), dense layers, first half
                                                        of MoE layer m_j
  segment M    h, shared, routed, past.{after m_{M-1}}.* -> combine, any dense layers left, final norm,
                                                        lm_head -> logits

  Inputs h, shared [batch, seq, hidden] and routed [batch, seq, hidden] (the routed experts' sum).
  Outputs of segments 0..M-1: h_out [batch, seq, hidden] (the residual after attention), x [tokens, hidden]
  (the normed MoE input, tokens = batch * seq), topk_weights [tokens, k] fp32 (routed_scaling_factor
  included), topk_ids [tokens, k] int64, shared [batch, seq, hidden] (zeros when the model has no shared
  experts; named shared_out), present.{i}.{name} for the segment's layers (the family's cache spec, default layout; positions are
  past + arange(seq), past read from the first cache input, as in the single-device graphs).
  Every segment is traced once from the eager model's own submodules (torch.onnx.export, dynamo, no
  expert loop inside; about 3.5 s each for tiny, mostly the exporter's fixed cost) and is identical on
  every rank.

  Expert graphs, one per (rank, MoE layer), built directly with onnx-ir from the weights (no export):
  inputs x [rows, hidden] fp32, slot [rows] int64 (index into the rank's local experts of that layer, in
  the order of partition.json's rank_experts), weight [rows] fp32; output y [rows, hidden] =
  weight * down(silu(gate x) * up x) of the slot's expert: per-row Gather of the stacked local weights and
  batched MatMul (the static-gather form, compute proportional to the rows received). A row is one
  (token, chosen expert) pair; the runtime sums the rows of a token back.

Package layout (everything the runtime needs; the runtime file is a copy, runnable without this repo):
  ep_manifest.json       schema, model identity (model_hash = weights sha256, config_hash), config
                         summary, ranks, backend hint, segments [{file, layers, moe_layer, inputs,
                         outputs}], experts {rank: {layer: {file, experts}}}, files {path: sha256}
  routing_stats.json     tokens per expert per MoE layer of the calibration run (when the plan used one)
  partition.json         the plan (parallel/partition.py schema); the runtime checks it against the
                         manifest (model hash, ranks, every expert covered, each rank's expert graph
                         holding exactly the plan's experts) before any process group starts
  graphs/segment{j}.onnx replicated graphs
  graphs/rank{r}/experts.layer{L}.onnx
  runtime/ep_runtime.py  the runtime
  launch.sh              torchrun --nproc_per_node <ranks> runtime/ep_runtime.py --package <dir> "$@"

Command line:
  python -m parallel.expert_parallel build --model tiny --ranks 4 --redundant 2 --calibrate 8 --out DIR
      (load for the plan: --plan partition.json | --stats routing_stats.json | --calibrate N prompts |
      uniform; memory in the plan counted at 4 bytes/param, the package's fp32 weights)
  DIR/launch.sh --prompt-ids 1,2,3 --max-new-tokens 16 --json
  torchrun --nproc_per_node 4 -m parallel.expert_parallel run --package DIR ...   (same, repo runtime)
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch.export import Dim

from models.cache import CacheSpec
from models.decoder import DeepseekForCausalLM
from models.errors import MlamoeError
from models.family import family_for
from models.rope import rope_cos_sin
from pipeline.export import finish, trace
from runtime import ep_runtime

from .partition import (PartitionError, config_hash, load_plan, load_routing_stats, moe_layers, plan_partition,
                        routing_stats, save_plan, save_routing_stats, validate_plan)

SCHEMA_VERSION = 1
OPSET = 20


class ExpertParallelBuildError(MlamoeError):
    pass


# ---- segments --------------------------------------------------------------------------------------
def cache_spec(cfg) -> CacheSpec:
    """The cache the segment graphs carry: the family's default layout."""
    family = family_for(cfg.model_type)
    return family.cache_spec(cfg, family.cache_layouts[0])


def segment_layers(cfg) -> list[dict]:
    """[{layers: [cache layers], moe_layer: int | None, first: bool}] for the M + 1 segments."""
    moe = moe_layers(cfg)
    if not moe:
        raise ExpertParallelBuildError("the model has no MoE layer: expert parallelism needs routed experts")
    segs, start = [], 0
    for m in moe:
        segs.append({"layers": list(range(start, m + 1)), "moe_layer": m, "first": start == 0})
        start = m + 1
    segs.append({"layers": list(range(start, cfg.num_hidden_layers)), "moe_layer": None, "first": False})
    return segs


class Segment(torch.nn.Module):
    """One segment of the cut model (module docstring), traced by the exporter."""

    def __init__(self, model: DeepseekForCausalLM, layers: list[int], moe_layer: int | None, first: bool):
        super().__init__()
        self.model, self.layers, self.moe_layer, self.first = model, layers, moe_layer, first
        self.cache = cache_spec(model.config)

    def forward(self, *args):
        m, cfg = self.model, self.model.config
        if self.first:
            h = m.model.embed_tokens(args[0])
            past_flat = args[1:]
        else:
            h, shared, routed = args[:3]
            h = h + (routed + shared)  # eager MoE: out = routed + shared; h + out
            past_flat = args[3:]
        B, S = h.shape[0], h.shape[1]
        presents = []
        if self.layers:
            past_len = self.cache.length(self.cache.group(past_flat))
            positions = torch.arange(S) + past_len
            cos, sin = rope_cos_sin(positions, m.rope_inv_freq, m.rope_factor)
            keys = torch.arange(past_len + S)
            mask = torch.where(keys[None, :] <= positions[:, None], 0.0, float("-inf"))
            absorbed = m.attention == "absorbed"
        layout = self.cache.layout
        for i, past in zip(self.layers, self.cache.group(past_flat)):
            layer = m.model.layers[i]
            if i != self.moe_layer:
                h, p = layer(h, cos, sin, mask, m.softmax_scale, past, layout, absorbed)
            else:
                a, p = layer.self_attn(layer.input_layernorm(h), cos, sin, mask, m.softmax_scale, past, layout,
                                       absorbed)
                h = h + a
            presents += list(p)
        if self.moe_layer is None:
            return (m.lm_head(m.model.norm(h)).float(), *presents)
        moe = m.model.layers[self.moe_layer].mlp
        x = m.model.layers[self.moe_layer].post_attention_layernorm(h).reshape(B * S, cfg.hidden_size)
        w, idx = moe.gate(x)
        shared = moe.shared_experts(x) if moe.shared_experts is not None else torch.zeros_like(x)
        return (h, x, w, idx, shared.reshape(B, S, cfg.hidden_size), *presents)


def segment_io(cfg, seg: dict) -> tuple[list[str], list[str]]:
    cache_in = cache_spec(cfg).input_names(seg["layers"])
    cache_out = [n.replace("past.", "present.", 1) for n in cache_in]
    ins = (["input_ids"] if seg["first"] else ["h", "shared", "routed"]) + cache_in
    outs = (["logits"] if seg["moe_layer"] is None else ["h_out", "x", "topk_weights", "topk_ids", "shared_out"]) + cache_out
    return ins, outs


def _example(model: DeepseekForCausalLM, seg: dict, batch: int = 2, seq: int = 3, past: int = 2):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    if seg["first"]:
        head = [torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)]
    else:
        head = [torch.randn(batch, seq, cfg.hidden_size, generator=g) for _ in range(3)]
    caches = [torch.randn(shape, generator=g) for _ in seg["layers"]
              for shape in cache_spec(cfg).symbolic_shapes(batch, past)]
    return tuple(head + caches)


def export_segment(model: DeepseekForCausalLM, seg: dict, index: int) -> ir.Model:
    cfg = model.config
    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=1, max=cfg.max_position_embeddings)
    past = Dim("past", min=0, max=cfg.max_position_embeddings)
    ins, outs = segment_io(cfg, seg)
    head = [{0: batch, 1: seq}] if seg["first"] else [{0: batch, 1: seq}] * 3
    dynamic = {"args": tuple(head + [{0: batch, t.grows: past} for _ in seg["layers"] for t in cache_spec(cfg).tensors])}
    wrapper = Segment(model, seg["layers"], seg["moe_layer"], seg["first"]).eval()
    program = trace(wrapper, _example(model, seg), f"segment {index}", ExpertParallelBuildError,
                    dynamic_shapes=dynamic, input_names=ins, output_names=outs, opset_version=OPSET)
    return finish(program.model, f"segment{index}")


def export_segments(model: DeepseekForCausalLM) -> list[ir.Model]:
    """The M + 1 replicated segment graphs (the family's default cache layout)."""
    return [export_segment(model, seg, j) for j, seg in enumerate(segment_layers(model.config))]


# ---- expert graphs (onnx-ir, from the weights) -------------------------------------------------------
def expert_graph(model: DeepseekForCausalLM, layer: int, experts: list[int], name: str = "experts") -> ir.Model:
    """(x [rows, h], slot [rows] int64, weight [rows]) -> y [rows, h] for the given local experts."""
    cfg = model.config
    mods = model.model.layers[layer].mlp.experts
    f32 = ir.DataType.FLOAT
    # W^T stacks so that x @ W^T is the Linear: gate/up [n, h, I], down [n, I, h]
    stacks = {k: np.ascontiguousarray(np.stack([getattr(mods[e], k).weight.detach().numpy().T for e in experts]))
              for k in ("gate_proj", "up_proj", "down_proj")}
    x = ir.Value(name="x", shape=ir.Shape(["rows", cfg.hidden_size]), type=ir.TensorType(f32))
    slot = ir.Value(name="slot", shape=ir.Shape(["rows"]), type=ir.TensorType(ir.DataType.INT64))
    wt = ir.Value(name="weight", shape=ir.Shape(["rows"]), type=ir.TensorType(f32))
    inits = {}
    for k, a in stacks.items():
        inits[k] = ir.Value(name=f"{k}_t", shape=ir.Shape(a.shape), type=ir.TensorType(f32),
                            const_value=ir.tensor(a.astype(np.float32), name=f"{k}_t"))
    axis1 = ir.Value(name="axis1", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(np.array([1], np.int64), name="axis1"))
    nodes = []

    def op(op_type, *inputs, **attrs):
        n = ir.node(op_type, list(inputs), attributes=attrs or None)
        nodes.append(n)
        return n.outputs[0]

    x3 = op("Unsqueeze", x, axis1)                      # [rows, 1, h]
    g = op("MatMul", x3, op("Gather", inits["gate_proj"], slot, axis=0))   # [rows, 1, I]
    u = op("MatMul", x3, op("Gather", inits["up_proj"], slot, axis=0))
    a = op("Mul", op("Mul", g, op("Sigmoid", g)), u)    # silu(g) * u
    d = op("MatMul", a, op("Gather", inits["down_proj"], slot, axis=0))    # [rows, 1, h]
    y = op("Mul", op("Squeeze", d, axis1), op("Unsqueeze", wt, axis1))
    y.name = "y"
    y.shape, y.type = ir.Shape(["rows", cfg.hidden_size]), ir.TensorType(f32)
    graph = ir.Graph([x, slot, wt], [y], nodes=nodes, initializers=[*inits.values(), axis1],
                     opset_imports={"": OPSET}, name=name)
    return ir.Model(graph, ir_version=10, producer_name="mlamoe")


# ---- package -----------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _io_spec(m: ir.Model) -> dict:
    def spec(v):
        return {"name": v.name, "dtype": v.dtype.name.lower() if v.dtype is not None else None,
                "shape": [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None}
    return {"inputs": [spec(v) for v in m.graph.inputs], "outputs": [spec(v) for v in m.graph.outputs]}


def model_hash_of(model) -> str:
    from models.checkpoint import weights_sha256
    return weights_sha256(model)


LAUNCH_SH = """#!/usr/bin/env bash
# Expert-parallel run of this package on {ranks} processes (one per rank; gloo on CPU, --backend nccl on GPUs).
# Usage: ./launch.sh --prompt-ids 1,2,3 --max-new-tokens 16 [--json] [--backend nccl] [--timeout 60]
# Several hosts: run torchrun on each with --nnodes/--node-rank/--master-addr (torchrun --help).
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
exec "${{TORCHRUN:-torchrun}}" --nproc_per_node {ranks} --max-restarts 0 "$HERE/runtime/ep_runtime.py" --package "$HERE" "$@"
"""


def calibration_prompts(cfg, n: int = 8, seq: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Seeded random prompts (token ids uniform over the vocabulary) for `routing_stats`."""
    rng = np.random.default_rng(seed + 7)
    return [rng.integers(0, cfg.vocab_size, (1, seq)) for _ in range(n)]


def build_ep_package(model: DeepseekForCausalLM, out, ranks: int | None = None, *, plan: dict | None = None,
                     redundant: int = 0, load=None, calibration=None, segments: list[ir.Model] | None = None,
                     model_hash: str | None = None, backend: str = "gloo", force: bool = False) -> Path:
    """Write an expert-parallel package (module docstring) for `ranks` ranks.

    plan: a partition plan to use (validated against the model); default `plan_partition(cfg, ranks,
    redundant, load)`. load: expected tokens per expert ([n_moe_layers, E]); or calibration: token
    batches to measure it with `routing_stats` (saved as routing_stats.json in the package).
    segments: already exported segment graphs (`export_segments(model)`), reused when building several
    packages of one model. Plan errors are raised before anything is written.
    """
    from pipeline.export import save_graph
    cfg = model.config
    model_hash = model_hash or model_hash_of(model)
    counts = None
    if calibration is not None and plan is None and load is None:
        counts = routing_stats(model, calibration)
        load = counts
    if plan is None:
        if ranks is None:
            raise ExpertParallelBuildError("build_ep_package: give ranks or a plan")
        plan = plan_partition(cfg, ranks, redundant, load=load, model_hash=model_hash, bytes_per_param=4)
    elif plan.get("model_hash") == plan.get("config_hash"):
        # a plan from the config alone (`mlamoe plan`): checked against the config, then bound to these weights
        plan = dict(validate_plan(plan, cfg), model_hash=model_hash)
    plan = validate_plan(plan, cfg, model_hash)
    if ranks is not None and plan["ranks"] != ranks:
        raise PartitionError(f"the plan is for {plan['ranks']} ranks, not {ranks}")
    ranks = plan["ranks"]
    out = Path(out)
    if out.exists():
        if not force:
            raise ExpertParallelBuildError(f"{out} exists (use force=True to replace it)")
        shutil.rmtree(out)
    (out / "graphs").mkdir(parents=True)
    segs = segment_layers(cfg)
    segments = segments if segments is not None else export_segments(model)
    if len(segments) != len(segs):
        raise ExpertParallelBuildError(f"{len(segments)} segment graphs given, the model needs {len(segs)}")
    seg_entries = []
    for j, (seg, g) in enumerate(zip(segs, segments)):
        rel = f"graphs/segment{j}.onnx"
        save_graph(g, out / rel)
        seg_entries.append({"file": rel, "layers": seg["layers"], "moe_layer": seg["moe_layer"],
                            "first": seg["first"], **_io_spec(g)})
    experts = {}
    for r in range(ranks):
        experts[str(r)] = {}
        for L in plan["layers"]:
            held = L["rank_experts"][r]
            rel = f"graphs/rank{r}/experts.layer{L['layer']}.onnx"
            save_graph(expert_graph(model, L["layer"], held, name=f"rank{r}_layer{L['layer']}"), out / rel)
            experts[str(r)][str(L["layer"])] = {"file": rel, "experts": list(held)}
    save_plan(plan, out / "partition.json")
    if counts is not None:
        save_routing_stats(out / "routing_stats.json", counts, model_hash)
    runtime = out / "runtime"
    runtime.mkdir()
    shutil.copyfile(Path(ep_runtime.__file__), runtime / "ep_runtime.py")
    launch = out / "launch.sh"
    launch.write_text(LAUNCH_SH.format(ranks=ranks))
    launch.chmod(0o755)
    files = {p.relative_to(out).as_posix(): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "expert-parallel",
        "model_hash": model_hash,
        "config_hash": config_hash(cfg),
        "model": {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
                  "num_hidden_layers": cfg.num_hidden_layers, "n_routed_experts": cfg.n_routed_experts,
                  "num_experts_per_tok": cfg.num_experts_per_tok, "moe_layers": moe_layers(cfg)},
        "ranks": ranks,
        "backend": backend,
        "cache": cache_spec(cfg).to_manifest(),
        "segments": seg_entries,
        "experts": experts,
        "files": files,
    }
    (out / "ep_manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


# ---- command line ------------------------------------------------------------------------------------
def build_command(model_spec: str, out, ranks: int, redundant: int = 0, stats_path=None, plan_path=None,
                  calibrate: int = 0, seed: int = 0, backend: str = "gloo", force: bool = False) -> tuple[Path, str]:
    """`build`: a preset / checkpoint -> expert-parallel package. -> (package path, summary text).

    Load for the plan: --plan (a partition.json, validated), else --stats (routing statistics), else
    --calibrate N (N seeded random prompts of 32 tokens through the eager model), else uniform.
    """
    import models
    from .partition import format_plan
    model = models.load(model_spec, seed=seed)
    cfg = model.config
    mh = model_hash_of(model)
    plan = load_plan(plan_path, cfg, mh) if plan_path else None
    load = load_routing_stats(stats_path) if stats_path else None
    calib = calibration_prompts(cfg, calibrate, seed=seed) if calibrate and plan is None and load is None else None
    path = build_ep_package(model, out, ranks if plan is None else None, plan=plan, redundant=redundant, load=load,
                            calibration=calib, model_hash=mh, backend=backend, force=force)
    plan = json.loads((path / "partition.json").read_text())
    text = (f"expert-parallel package: {path}\n{format_plan(plan)}\n"
            f"run: {path / 'launch.sh'} --prompt-ids 1,2,3 --max-new-tokens 16 --json")
    return path, text


def main(argv=None) -> int:
    import argparse
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # torchrun --nproc_per_node N -m parallel.expert_parallel run --package DIR ...
        from runtime.ep_runtime import main as run_main
        return run_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m parallel.expert_parallel",
                                description="build: write an expert-parallel package; run: see runtime/ep_runtime.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--model", required=True, help="preset or checkpoint folder")
    b.add_argument("--ranks", type=int, required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--redundant", type=int, default=0)
    b.add_argument("--stats", default=None, help="routing statistics (.npy / routing_stats.json)")
    b.add_argument("--plan", default=None, help="an existing partition.json for this model")
    b.add_argument("--calibrate", type=int, default=0, help="measure the load on N seeded random prompts")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    b.add_argument("--force", action="store_true")
    sub.add_parser("run", help="(handled above) arguments of runtime/ep_runtime.py")
    args = p.parse_args(argv)
    try:
        _, text = build_command(args.model, args.out, args.ranks, args.redundant, args.stats, args.plan,
                                args.calibrate, args.seed, args.backend, args.force)
    except MlamoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
