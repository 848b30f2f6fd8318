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
InsertCastTransformer then runs that op in fp32 between Casts, and between two such ops it drops
the casts, so a chain of them computes in fp32 without rounding in between (measured,
tests/test_fp16_rounding.py). The emulation therefore rounds less than the NPU does (cube units
accumulate in fp32 and write every tensor as fp16). Its rounding twin (passes/fp16_rounding.py,
every fp16 tensor rounded explicitly; what the ort-cuda check runs) is not used here yet (see docs/ascend.md
"What is unverified").

`emulate(...)` compares the fp16 graphs with eager fp32 on a prompt prefilled in a bucket, several
decode steps (each fed the emulated cache) and greedy generation, under
BUDGETS["ascend-fp16-emulation"] (cosine >= 0.99, KL <= 0.005, rel euclid <= 0.05); greedy token
agreement is recorded (informational under this budget, as msit has no top-1 rule).

Routing-aware judging, teacher-forced (pipeline/parity.py ROUTED_RULE, as for every lossy stage). MoE routing is a
discrete choice (TopK over router scores): where two candidates' fp32 scores nearly tie, fp16 rounding of the hidden
state can pick the other expert set for that token, after which the token's state legitimately diverges. msit's
thresholds are for numeric error, so such a flip must be neither judged as one nor hidden. So the fp16 graphs run as
comparison-only copies whose every MoE layer's gate logits (and DeepSeek-V3.2's indexer scores) are graph inputs, fed
at each run from the fp32 static graphs run on the same tokens with their own cache (ForcedRunner): the fp16 graph
computes with the reference's expert choices everywhere, and msit's thresholds judge every row (prefill positions,
decode steps, greedy steps). Each report also judges the fp16 graphs' own routing on those rows (their gate logits,
still outputs, through the checkpoint's router; parity._judge_routing): flips within the budget's share of
(position, MoE layer) decisions, each at an fp32 margin within 2 x 2 x the layer's router-score error where its choice
agreed, and, given the reference's gate logits, the graph's router picks the reference's experts. The gate logits are
judged as outputs too. Greedy generation as deployed (the graphs routing by themselves) is recorded beside it
(extra["unforced_greedy"]: tokens equal to the reference's, the flips before the first divergence).
`quant_parity` judges the W8A8 QDQ graphs against eager the same way.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from passes.ir_external import copy_model
from pipeline.build import run_cast
from pipeline.export import save_graph
from passes import routing_probes as probes
from pipeline.parity import (MAX_FLIPPED_FRACTION, ParityReport, RoutedReport, Router, _judge_routing,
                             _judge_selections, _with_selection, budget_for, compare, selection_outputs)

from .static_export import MASK_VALUE, INDEX_DTYPE, StaticGraphSpec, StaticRunner, ort_sessions, static_cache_spec

STAGE = "ascend-fp16-emulation"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def to_fp16(model: ir.Model, keep_fp32: set[str] | list[str]) -> ir.Model:
    """A copy of `model` computing in fp16 except the nodes named in keep_fp32 (see module doc)."""
    m = copy_model(model)
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
        save_graph(m16, p, check=False)
        out[name] = p
    return out


# ------------------------------------------------------------------------------------ routing
# Teacher-forced routing (pipeline/parity.py ROUTED_RULE, the rule of every lossy stage): the lossy graphs are
# comparison-only copies whose MoE gate logits (passes/routing_probes.py force_gate_logits: the fixed-shape form's
# routers) and indexer scores (force_selections) are graph inputs, fed at every run from the fp32 static graphs run
# on the same tokens with their own cache. The lossy graph then routes and selects as the reference does at every
# position, so its numeric error is judged on every row; its own gate logits (still outputs) say which decisions it
# would have flipped, judged apart by parity's routing judgement.
_REFERENCE = "reference|"  # cache keys of the reference's own trajectory inside a ForcedRunner's cache


def _masked(scores: np.ndarray) -> np.ndarray:
    """The static graphs mask invisible keys with MASK_VALUE (a finite fp16 floor); -inf for the selection judge."""
    return np.where(scores <= MASK_VALUE, -np.inf, scores.astype(np.float64))


def _present(res: dict, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k.replace("present.", "past.", 1): v for k, v in res.items() if k.startswith("present.")}


@dataclasses.dataclass
class ForcedCall:
    """One run of a lossy graph beside the reference: per MoE layer the reference's gate logits, the lossy graph's
    own and the router scores its expert TopK read ([B, S, E], padding rows included); per selection the
    reference's scores and ids, the lossy graph's own scores and the ids its TopK picked (None without an
    indexer)."""

    graph: str
    position: np.ndarray  # [B], position of the first row
    seq: int
    reference_gates: list[np.ndarray]
    actual_gates: list[np.ndarray]
    router_probs: list[np.ndarray]
    selections: dict[str, list[np.ndarray]] | None = None

    def rows(self, n_valid: int) -> list[list[int]]:
        """[batch row, absolute position] of the first n_valid rows of each batch row, in gate-row order."""
        return [[b, int(self.position[b]) + s] for b in range(self.position.shape[0]) for s in range(n_valid)]


class ForcedRunner(StaticRunner):
    """A StaticRunner over lossy graphs prepared by :func:`forced_graphs` whose every run first runs the reference
    graphs (fp32, gate logits and selections exposed) on the same tokens with the reference's own cache (kept under
    `reference|` keys of this runner's cache), then the lossy graph with the reference's gate logits and indexer
    scores fed in (``force``; without it the lossy graph routes and selects by itself, its gate logits still
    compared). Every run appends a ForcedCall to `calls`; prefill / decode / generate return what StaticRunner's
    do."""

    def __init__(self, sessions: dict, specs: dict[str, StaticGraphSpec], cfg, reference: dict,
                 n_routers: dict[str, int], n_selections: dict[str, int], force: bool = True):
        super().__init__(sessions, specs, cfg)
        self.reference, self.n_routers, self.n_selections, self.force = reference, n_routers, n_selections, force
        self.calls: list[ForcedCall] = []

    def empty_cache(self) -> dict[str, np.ndarray]:
        cache = super().empty_cache()
        return {**cache, **{_REFERENCE + k: v.copy() for k, v in cache.items()}}

    def _run(self, name: str, ids: np.ndarray, position: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
        own = {k: v for k, v in cache.items() if not k.startswith(_REFERENCE)}
        theirs = {k[len(_REFERENCE):]: v for k, v in cache.items() if k.startswith(_REFERENCE)}
        if len(theirs) != len(own):
            raise ValueError("ForcedRunner: the cache lacks the reference's rows (start from its empty_cache())")
        feeds = {"input_ids": ids.astype(INDEX_DTYPE), "position": position.astype(INDEX_DTYPE)}
        ref = run_cast(self.reference[name], {**feeds, **theirs})
        n, m = self.n_routers.get(name, 0), self.n_selections.get(name, 0)
        forced = {} if not self.force else {
            **{probes.forced_name(i): ref[probes.gate_name(i)] for i in range(n)},
            **{probes.selection_forced_name(j): ref[probes.selection_name(j)] for j in range(m)}}
        res = run_cast(self.sessions[name], {**feeds, **own, **forced})
        B, S = ids.shape

        def rows(x):
            return np.asarray(x, np.float64).reshape(B, S, -1)
        call = ForcedCall(name, position.astype(np.int64).copy(), S,
                          [rows(ref[probes.gate_name(i)]) for i in range(n)],
                          [rows(res[probes.gate_name(i)]) for i in range(n)],
                          [rows(res[probes.router_probs_name(i)]) for i in range(n)] if self.force else [])
        if m:
            scores = [_masked(ref[probes.selection_name(j)]) for j in range(m)]
            call.selections = {
                "reference_scores": scores,
                "reference_ids": [ref[probes.selection_ids_name(j)] for j in range(m)],
                "actual_scores": [np.where(r == -np.inf, -np.inf, res[probes.selection_name(j)].astype(np.float64))
                                  for j, r in enumerate(scores)],
                "forced_ids": [res[probes.selection_ids_name(j)] for j in range(m)] if self.force else None}
        self.calls.append(call)
        return np.asarray(res["logits"], np.float32), {**_present(res), **_present(ref, _REFERENCE)}


def forced_graphs(pairs, folder: Path, tag: str):
    """From (name, fp32 ir.Model, lossy ir.Model) triples, taken one at a time (a lazy iterable keeps one pair in
    memory), comparison-only copies saved in folder: the reference (gate logits and selections exposed), the lossy
    graph forced (its gate logits and indexer scores read from graph inputs) and unforced (the same only exposed).
    -> (forced paths, unforced paths, reference paths, MoE routers per graph, selections per graph)."""
    pf, pu, pr, nr, ns = {}, {}, {}, {}, {}
    for name, m32, mact in pairs:
        sel32 = probes.selection_topks(m32)  # before the gate edits (they cut the routers)
        nr[name] = probes.expose_gate_logits(m32)
        ns[name] = probes.expose_selections(m32, sel32)
        for force, paths in ((False, pu), (True, pf)):
            m = copy_model(mact) if not force else mact
            sel = probes.selection_topks(m)
            if len(sel) != ns[name]:
                raise ValueError(f"{name}: the fp32 graph has {ns[name]} indexer TopK nodes, the {tag} graph {len(sel)}")
            n_act = probes.force_gate_logits(m) if force else probes.expose_gate_logits(m)
            (probes.force_selections if force else probes.expose_selections)(m, sel)
            if n_act != nr[name]:
                raise ValueError(f"{name}: the fp32 graph has {nr[name]} MoE routers, the {tag} graph {n_act}")
            paths[name] = folder / f"{name}.{tag}.{'forced' if force else 'unforced'}.onnx"
            save_graph(m, paths[name], check=False)  # its own copy of the weights: folder is not the package's onnx/
        pr[name] = folder / f"{name}.fp32.routing.onnx"
        save_graph(m32, pr[name], check=False)
    return pf, pu, pr, nr, ns


def forced_runners(cfg, specs: dict, pairs, folder: Path, tag: str) -> tuple[ForcedRunner, ForcedRunner]:
    """(forced runner, unforced runner) over the lossy graphs of `pairs` (forced_graphs), sharing the reference
    sessions; the unforced one runs the lossy graph as shipped, its gate logits and selections exposed (greedy
    generation as deployed, its flips recorded)."""
    pf, pu, pr, nr, ns = forced_graphs(pairs, folder, tag)
    ref = ort_sessions(pr)
    return (ForcedRunner(ort_sessions(pf), specs, cfg, ref, nr, ns),
            ForcedRunner(ort_sessions(pu), specs, cfg, ref, nr, ns, force=False))


def selection_budget(stage: str):
    """The stage's budget for the indexer's scores: its cosine, rel euclid and KL recorded but not judged."""
    return dataclasses.replace(budget_for(stage), max_rel_euclid=None, max_kl=None)


def _stack(calls: list[tuple[ForcedCall, int]]):
    """Per MoE layer, the calls' valid gate rows stacked [N, E] (reference, actual, forced router scores) and the
    rows' [batch row, absolute position] labels."""
    n = len(calls[0][0].reference_gates)
    out = []
    for field in ("reference_gates", "actual_gates", "router_probs"):
        per = [np.concatenate([getattr(c, field)[i][:, :v].reshape(-1, getattr(c, field)[i].shape[-1])
                               for c, v in calls]) for i in range(n)] if getattr(calls[0][0], field) else None
        out.append(per)
    labels = [r for c, v in calls for r in c.rows(v)]
    return out[0], out[1], out[2], labels


def _selections(calls: list[tuple[ForcedCall, int]]) -> dict[str, list[np.ndarray]] | None:
    """The calls' valid selection rows, each selection's as [queries, ...] (parity._judge_selections)."""
    sel = [(c.selections, v) for c, v in calls if c.selections]
    if not sel:
        return None
    out = {}
    for k in sel[0][0]:
        if sel[0][0][k] is None:
            out[k] = None
            continue
        out[k] = [np.concatenate([np.asarray(s[k][j])[:, :v].reshape(-1, np.shape(s[k][j])[-1]) for s, v in sel])
                  for j in range(len(sel[0][0][k]))]
    return out


def _judge(stage: str, ref: dict, act: dict, logits_outputs: list[str], calls: list[tuple[ForcedCall, int]] | None,
           routers: list[Router] | None) -> ParityReport:
    """compare() of every row (the lossy run teacher-forced), plus the routing judgement of the calls' gate logits
    (parity's _judge_routing: flips of the lossy graph's own routing, each a near tie; the forced router
    reproduces the reference's choice) and, with an indexer, of its selections. Without calls: plain compare()."""
    if not calls:
        return compare(stage, ref, act, logits_outputs=logits_outputs)
    base = compare(stage, ref, act, logits_outputs=logits_outputs)
    outputs = list(base.outputs)
    record = None
    if calls[0][0].reference_gates:
        if routers is None or len(routers) != len(calls[0][0].reference_gates):
            raise ValueError(f"{stage}: {len(calls[0][0].reference_gates)} MoE routers in the graphs, "
                             f"{'no' if routers is None else len(routers)} routers given")
        rg, ag, probs, labels = _stack(calls)
        gates, record = _judge_routing(base.budget, rg, ag, routers, probs, labels=labels)
        outputs += gates
    selections = _selections(calls)
    if selections is not None:
        # the indexer's own scores are judged as outputs too: under forcing they no longer reach the logits, and a
        # stage that broke them would otherwise only widen its own allowed flip margin. By direction (cosine), not by
        # msit's rel euclid: their one consumer is the TopK, whose flips the margin rule judges (docs/v32.md)
        sel_ref, sel_act = selection_outputs(selections)
        outputs += compare(stage, sel_ref, sel_act, budget=selection_budget(stage)).outputs
        share = base.budget.max_flipped_fraction
        sel = _judge_selections(selections, MAX_FLIPPED_FRACTION if share is None else share)
        record = _with_selection(record or {"rule": "no MoE router", "summary": "no MoE router", "flips": [],
                                            "reasons": [], "n_decisions": 0, "n_flips": 0}, sel)
    if record is None:
        return base
    return RoutedReport(stage=base.stage, budget=base.budget, outputs=outputs, extra={**base.extra, "routing": record})


def _unforced_greedy(calls: list[tuple[ForcedCall, int]], tokens: np.ndarray, ref_tokens: np.ndarray,
                     routers: list[Router] | None) -> dict:
    """Information on greedy generation as deployed (the lossy graph routing by itself; calls: its runs with their
    valid rows, _valid_calls): its tokens against the reference's, and its routing flips (own gate logits vs the
    fp32 graphs' on the same tokens) up to the first token divergence (step i's logits come from call i)."""
    agree = int((ref_tokens == tokens).all(0).cumprod().sum())
    out = {"n_equal_steps": agree, "n_steps": int(ref_tokens.shape[1]),
           "first_divergence": None if agree == ref_tokens.shape[1] else agree, "flips_before": []}
    if routers and calls and calls[0][0].reference_gates:
        rg, ag, _, labels = _stack(calls[:agree + 1])
        _, rec = _judge_routing(None, rg, ag, routers, labels=labels)
        out["flips_before"] = [{"layer": f["layer"], "position": f["position"][1], "batch": f["position"][0],
                                "margin": f["margin"]} for f in rec["flips"]]
        out["n_decisions"] = rec["n_decisions"]
    return out


# ------------------------------------------------------------------------------------ runs
def emulate(model, graphs: dict[str, tuple[StaticGraphSpec, Path]], keep_fp32: dict[str, list[str]],
            prompt_len: int | None = None, decode_steps: int = 4, gen_tokens: int = 16, seed: int = 0,
            work: Path | None = None, stage: str = STAGE, routing_aware: bool = True,
            routers: list[Router] | None = None) -> list[ParityReport]:
    """fp16 emulation vs `model` (eager fp32, or a StaticGraphReference): reports for the prefill (logits + cache
    rows), each decode step and greedy generation (tokens recorded), under BUDGETS[stage].

    routing_aware: the fp16 twins run teacher-forced (forced_runners: the fp32 static graphs' gate logits and
    indexer scores fed in), so msit's thresholds judge every row; the fp16 graphs' own routing is judged apart
    (compare_runs). `routers`: each MoE layer's router (pipeline.build.moe_routers of the checkpoint; taken from
    `model` when it is the eager model)."""
    specs = {n: s for n, (s, _) in graphs.items()}
    with tempfile.TemporaryDirectory(prefix="mlamoe-emul-") as tmp:
        folder = Path(work) if work else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if routing_aware:
            pairs = ((name, m32, to_fp16(m32, keep_fp32.get(name, [])))
                     for name, (_, path) in graphs.items() for m32 in [ir.load(path)])
            runner, unforced = forced_runners(model.config, specs, pairs, folder, "fp16")
        else:
            p16 = {}
            for name, (_, path) in graphs.items():
                p16[name] = folder / f"{name}.fp16.onnx"
                save_graph(to_fp16(ir.load(path), keep_fp32.get(name, [])), p16[name], check=False)
            runner, unforced = StaticRunner(ort_sessions(p16), specs, model.config), None
        return compare_runs(model, runner, stage, prompt_len, decode_steps, gen_tokens, seed, unforced=unforced,
                            routers=routers)


def quant_parity(model, fp32_graphs: dict[str, tuple[StaticGraphSpec, Path]],
                 graphs: dict[str, tuple[StaticGraphSpec, Path]], stage: str, prompt_len: int | None = None,
                 decode_steps: int = 4, gen_tokens: int = 16, seed: int = 0,
                 routers: list[Router] | None = None) -> list[ParityReport]:
    """The quantized static graphs on ORT CPU vs eager, teacher-forced as the fp16 emulation is: comparison-only
    copies of the quantized graphs read the gate logits and indexer scores of the fp32 static graphs they came
    from, run on the same trajectory, so the stage's budget judges every row; the quantized graphs' own routing is
    judged apart (compare_runs)."""
    specs = {n: s for n, (s, _) in graphs.items()}
    with tempfile.TemporaryDirectory(prefix="mlamoe-quant-routing-") as tmp:
        pairs = ((name, ir.load(fp32_graphs[name][1]), ir.load(path)) for name, (_, path) in graphs.items())
        runner, unforced = forced_runners(model.config, specs, pairs, Path(tmp), "quant")
        return compare_runs(model, runner, stage, prompt_len, decode_steps, gen_tokens, seed, unforced=unforced,
                            routers=routers)


def static_parity(model, graphs: dict[str, tuple[StaticGraphSpec, Path]], stage: str = "export/ascend-static",
                  prompt_len: int | None = None, decode_steps: int = 4, gen_tokens: int = 16,
                  seed: int = 0) -> list[ParityReport]:
    """The fp32 static graphs on ORT CPU vs eager (the `export` fp32 budget: greedy tokens binding)."""
    specs = {n: s for n, (s, _) in graphs.items()}
    runner = StaticRunner(ort_sessions({n: p for n, (_, p) in graphs.items()}), specs, model.config)
    return compare_runs(model, runner, stage, prompt_len, decode_steps, gen_tokens, seed)


def make_prompt(cfg, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """The prompt compare_runs uses: [batch, length] token ids from torch.Generator(seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


def _valid_calls(runner: ForcedRunner, mark: int, L: int) -> list[tuple[ForcedCall, int]]:
    """The runner's calls since `mark`, each with its number of valid rows (prefill chunks of an L-token prompt
    from position 0: the rows before L; decode: 1)."""
    out = []
    for c in runner.calls[mark:]:
        kind = runner.specs[c.graph].kind
        out.append((c, 1 if kind == "decode" else min(c.seq, L - int(c.position.min()))))
    return out


@torch.no_grad()
def compare_runs(model, runner: StaticRunner, stage: str, prompt_len: int | None = None, decode_steps: int = 4,
                 gen_tokens: int = 16, seed: int = 0, unforced: ForcedRunner | None = None,
                 routers: list[Router] | None = None) -> list[ParityReport]:
    """`model` vs `runner` on one prompt: prefill in the smallest bucket (prompt = 3/4 of it by default, so padding
    is exercised), `decode_steps` steps each fed the runner's own cache, then greedy generation of `gen_tokens`
    tokens.

    With a ForcedRunner (teacher-forced: every run routes and selects as the fp32 static graphs do on the same
    tokens), every row is judged under the stage's budget and each report also judges the lossy graph's own
    routing on those rows (parity's rule: flips within the stage's share of (position, MoE layer) decisions, each
    at a reference margin the stage's router-score error can overturn; given the reference's gate logits the
    router picks the reference's experts), and its indexer selections alike. `unforced` (the same graphs routing
    by themselves): greedy generation as deployed, recorded in the greedy report (extra["unforced_greedy"]: tokens
    equal to the reference's, flips before the first divergence), not judged."""
    specs = runner.specs
    cfg = model.config
    dec = specs["decode"]
    buckets = sorted(s.seq for s in specs.values() if s.kind == "prefill")
    L = prompt_len or max(1, (3 * buckets[0]) // 4)
    prompt = make_prompt(cfg, dec.batch, L, seed)
    B = dec.batch
    forced = isinstance(runner, ForcedRunner)
    if forced and routers is None and hasattr(model, "model"):
        from pipeline.build import moe_routers
        routers = moe_routers(model)
    reference = ("the fp32 W8A8 QDQ graphs on ORT CPU" if isinstance(model, StaticGraphReference)
                 else "eager PyTorch fp32")

    def calls_since(mark: int):
        return _valid_calls(runner, mark, L) if forced else None

    def judged(name: str, ref: dict, act: dict, outputs: list[str], calls) -> ParityReport:
        rep = _judge(f"{stage}/{name}", ref, act, outputs, calls, routers)
        rep.extra["reference"] = reference
        return rep

    reports = []
    cache_spec = static_cache_spec(cfg)
    ref_logits, cache = model.step(prompt, model.empty_cache(B, cache_spec.layout), cache_spec.layout)
    mark = len(runner.calls) if forced else 0
    logits, c16 = runner.prefill(prompt.numpy())
    ref = {"logits": ref_logits.numpy()}
    act = {"logits": logits}
    # cache rows 0..L-1 are the ones this prefill wrote (rows L.. hold the bucket's padding)
    for i, layer in enumerate(cache):
        for t, a in zip(cache_spec.tensors, layer):
            ref[f"present.{i}.{t.name}"] = a.numpy()
            act[f"present.{i}.{t.name}"] = c16[f"past.{i}.{t.name}"][t.rows(0, L)]
    reports.append(judged("prefill", ref, act, ["logits"], calls_since(mark)))
    tok = ref_logits[:, -1].argmax(-1, keepdim=True)
    pos = L
    for step in range(decode_steps):
        if pos >= dec.max_cache:
            break
        ref_logits, cache = model.step(tok, cache, cache_spec.layout)
        mark = len(runner.calls) if forced else 0
        logits, c16 = runner.decode(tok.numpy(), pos, c16)
        reports.append(judged(f"decode-{step}", {"logits": ref_logits.numpy()}, {"logits": logits}, ["logits"],
                              calls_since(mark)))
        tok = ref_logits[:, -1].argmax(-1, keepdim=True)
        pos += 1
    from models.generation import greedy_generate
    n = min(gen_tokens, dec.max_cache - L)
    ref_tokens, ref_steps = greedy_generate(model, prompt, n, cache_spec.layout)
    mark = len(runner.calls) if forced else 0
    tokens, steps = runner.generate(prompt.numpy(), n)
    # the runner's own greedy logits are compared up to the first token mismatch (after it the
    # two trajectories see different tokens and are no longer comparable); step i's logits come from call i
    agree = int((ref_tokens.numpy() == tokens).all(0).cumprod().sum())
    upto = max(agree, 1)
    gcalls = calls_since(mark)
    rep = judged("greedy", {"step_logits": ref_steps.numpy()[:, :upto]}, {"step_logits": steps[:, :upto]},
                 ["step_logits"], None if gcalls is None else gcalls[:upto])
    rep.add_tokens("greedy", ref_tokens.numpy(), tokens)
    if unforced is not None:
        mark = len(unforced.calls)
        own, _ = unforced.generate(prompt.numpy(), n)
        rep.extra["unforced_greedy"] = _unforced_greedy(_valid_calls(unforced, mark, L), own, ref_tokens.numpy(),
                                                        routers)
    reports.append(rep)
    return reports


def _routing_flips_text(flips: list[dict]) -> str:
    if len(flips) <= 3:
        return "; ".join(f"position {f['position'][1]}" + (f" (row {f['position'][0]})" if f["position"][0] else "")
                         + f" layer {f['layer']}: fp32 margin {f['margin']:.2g} <= {f['allowed']:.2g}" for f in flips)
    return (f"fp32 margins <= {max(f['margin'] for f in flips):.2g}, each within what the stage's router-score error "
            "moves")


def describe(reports: list[ParityReport], stage: str = STAGE) -> str:
    """The README's account of the teacher-forced `stage` reports (the fp16 emulation by default), e.g. "against
    eager PyTorch fp32, with the fp32 graphs' expert choices forced: meets msit's thresholds on all 12 prefill
    positions, 4 of 4 decode steps and 16 greedy steps; its own routing: ...; greedy tokens ..."."""
    emul = {r.stage.rsplit("/", 1)[-1]: r for r in reports if r.stage.startswith(stage + "/")}
    pre = emul.get("prefill")
    if pre is None or "routing" not in pre.extra:
        return "meets msit's thresholds"
    decodes = [r for k, r in emul.items() if k.startswith("decode-")]
    greedy = emul.get("greedy")
    batch = pre.outputs[0].shape[0] if pre.outputs and pre.outputs[0].shape else 1
    n_pre = pre.outputs[0].shape[1] if pre.outputs and len(pre.outputs[0].shape) > 1 else 0
    unit = "positions" if batch == 1 else f"tokens ({batch} batch rows)"
    forced = "expert choices" + (" and indexer selections" if "selection" in pre.extra["routing"] else "")
    text = (f"against {pre.extra.get('reference', 'the reference')}, with the fp32 graphs' {forced} forced "
            f"(teacher-forced: every row judged): {'meets' if pre.passed else 'FAILS'} msit's thresholds on all "
            f"{n_pre * batch} prefill {unit}, {sum(r.passed for r in decodes)} of {len(decodes)} decode steps")
    if greedy is not None:
        t = greedy.extra.get("tokens", {}).get("greedy", {})
        text += (f" and {'the' if greedy.passed else 'NOT the'} greedy steps' logits; greedy tokens equal for "
                 f"{t.get('n_equal_steps', '?')} of {t.get('n_steps_reference', '?')} steps")
    judged = [r for r in [pre, *decodes] if "n_decisions" in r.extra["routing"]]
    flips = [f for r in judged for f in r.extra["routing"]["flips"]]
    n = sum(r.extra["routing"]["n_decisions"] for r in judged)
    text += ("; its own routing (the fp16 graphs' gate logits on the same inputs): " if stage == STAGE
             else "; its own routing: ")
    text += (f"no expert choice differs from the fp32 graphs' in {n} (position, MoE layer) decisions" if not flips
             else f"{len(flips)} of {n} (position, MoE layer) decisions flipped, each a near tie "
                  f"({_routing_flips_text(flips)})")
    u = greedy.extra.get("unforced_greedy") if greedy is not None else None
    if u is not None:
        text += f"; as deployed (routing by itself) greedy tokens equal for {u['n_equal_steps']} of {u['n_steps']} steps"
        if u["first_divergence"] is not None:
            before = sorted({f["position"] for f in u["flips_before"]})
            text += (f" (first divergence at step {u['first_divergence']}, after the routing flip"
                     f"{'s' * (len(before) > 1)} at position{'s' * (len(before) > 1)} {', '.join(map(str, before))})"
                     if before else f" (first divergence at step {u['first_divergence']}, with no routing flip "
                                    "before it)")
    return text


class StaticGraphReference:
    """A reference with the eager model's interface (config, empty_cache, step: what compare_runs,
    greedy_generate and kit.golden_cases call) computed by fixed-shape graphs on ORT CPU: the fp32
    W8A8 QDQ graphs, against which the fp16 emulation of those same graphs is judged (the quantization
    error itself is judged separately, QDQ graphs vs eager, under BUDGETS["quantize-w8a8"])."""

    def __init__(self, runner: StaticRunner):
        self.runner, self.config = runner, runner.cfg

    def cache_spec(self, layout: str | None = None):
        return static_cache_spec(self.config)

    def empty_cache(self, batch: int, layout: str | None = None, dtype=torch.float32):
        return self.cache_spec().empty(batch, dtype)

    def step(self, input_ids, past, layout: str | None = None):
        ids = torch.as_tensor(input_ids).numpy()
        B, S = ids.shape
        spec = self.cache_spec()
        T = spec.length(past)
        cache = self.runner.empty_cache()
        for i, layer in enumerate(past):
            for t, a in zip(spec.tensors, layer):
                cache[f"past.{i}.{t.name}"][t.rows(0, T)] = a.numpy()
        if S == 1:
            logits, cache = self.runner.decode(ids[:, 0], T, cache)
        else:
            logits, cache = self.runner.prefill(ids, cache, start=T)
        present = [tuple(torch.from_numpy(np.ascontiguousarray(cache[f"past.{i}.{t.name}"][t.rows(0, T + S)]))
                         for t in spec.tensors)
                   for i in range(self.config.num_hidden_layers)]
        return torch.from_numpy(np.ascontiguousarray(logits[:, :S], dtype=np.float32)), present


def static_reference(graphs: dict[str, tuple[StaticGraphSpec, Path]], cfg) -> StaticGraphReference:
    specs = {n: s for n, (s, _) in graphs.items()}
    return StaticGraphReference(StaticRunner(ort_sessions({n: p for n, (_, p) in graphs.items()}), specs, cfg))
