"""The core's public stage helpers for target builders (targets/*/build.py): the build context the core
hands a target, the export and pass stages (run_graph_stages), the golden-case checks (plain, routing-aware,
quantize), the quantize helpers, and the package assembly shared by the ORT targets.

Imports no target (tests/test_layering.py): a target builder calls these; the core calls the builder.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

import models
from models.config import DeepseekConfig
from models.errors import MlamoeError
from passes import PASSES, graphs_for
from passes.cleanup import cleanup
from passes.ir_external import session_from_model
from runtime import ort_runtime
from runtime.cuda_runtime import _ORT_TYPES

from .export import export_graphs, save_graph
from .weights_file import WeightsFile, weights_section
from .golden import Golden, GoldenCase, save_golden
from .io_spec import cache_spec, graph_io
from .parity import Router, budget_for, compare, compare_routed
from passes.routing_probes import (expose_gate_logits, expose_selections, force_gate_logits, force_selections, forced_name,
                      gate_name, router_probs_name, selection_forced_name, selection_ids_name, selection_name,
                      selection_topks)
from .stages import StageRecord, StageRunner

GRAPHS = ("prefill", "decode")


@dataclasses.dataclass
class BuildContext:
    """What the core hands a target's build after the `load` stage (pipeline/compile.py)."""
    model: object  # the eager reference (models.load)
    profile: object  # the target's TargetProfile
    out: Path  # where the package will be (the staged folder is renamed there on success)
    package: Path  # the staged package folder the build fills
    runner: StageRunner
    load: StageRecord  # the load stage's record (its inputs: config and weights hashes)
    base_manifest: dict  # model, toolchain, tokenizer, quantization choice
    quant: str  # the quantization scheme (resolved: --quant, the target's default, or an FP8 checkpoint's)
    seed: int
    started: float  # time.time() at the start of the compile
    tokenizer: dict  # file name -> bytes (tokenizer/), possibly empty
    layout: str = "latent"
    gen_tokens: int = 32
    options: dict = dataclasses.field(default_factory=dict)  # the target's own options (targets.base.TargetOption)


def family_passes(model, pass_names) -> tuple[str, ...]:
    """The target's passes that apply to the model's family (models.Family.passes), in the target's order."""
    return family_passes_of(models.family_of(model), pass_names)


def skipped_passes(model, pass_names) -> dict[str, str]:
    """The target's passes that do not apply to the model's family -> why (models.Family.why_not)."""
    return skipped_passes_of(models.family_of(model), pass_names)


def family_passes_of(family, pass_names) -> tuple[str, ...]:
    return tuple(p for p in pass_names if family.applies(p))


def skipped_passes_of(family, pass_names) -> dict[str, str]:
    return {p: family.why_not(p) for p in pass_names if not family.applies(p)}


def skipped_stage(name: str, inputs: dict, why: str, **params) -> StageRecord:
    """The record of a stage left out (params "skipped": why): outputs = inputs, the reason in its notes (the
    package README lists such stages, pipeline/package_readme.py)."""
    return StageRecord(name, {**params, "skipped": why}, dict(inputs), dict(inputs), notes=[f"not run: {why}"])


def prefill_feeds(model_ir: ir.Model, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for a fresh prompt: input_ids [B, S] and every past.* input empty (past = 0)."""
    feeds = {"input_ids": np.asarray(ids, dtype=np.int64)}
    for v in model_ir.graph.inputs:
        if v.name != "input_ids":
            shape = [ids.shape[0] if i == 0 else d if isinstance(d, int) else 0 for i, d in enumerate(v.shape)]
            feeds[v.name] = np.zeros(shape, np.float32)
    return feeds


def run_cases(paths: dict[str, Path], golden: Golden, session_config: dict | None = None,
              progress=None) -> dict[str, dict]:
    """Run each golden case on ORT CPU; -> {case name: {output name: array}}. progress: a pipeline.progress.Progress
    (the case count on a terminal)."""
    so = ort_runtime.session_options(session_config or {"graph_optimization_level": "basic"})
    results, done = {}, 0
    for g in dict.fromkeys(case.graph for case in golden.cases):  # one session at a time: a session holds its
        if progress is not None:                                  # graph's weights (memory-mapped and prepacked)
            progress.update(f"loading {g} into ONNX Runtime")
        sess = ort.InferenceSession(str(paths[g]), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        for case in golden.cases:
            if case.graph != g:
                continue
            done += 1
            if progress is not None:
                progress.update("golden case", done, len(golden.cases))
            results[case.name] = dict(zip(names, sess.run(None, case.inputs)))
        del sess
    return {case.name: results[case.name] for case in golden.cases}


def check_cases(runner: StageRunner, record: StageRecord, stage: str, paths: dict[str, Path], golden: Golden,
                session_config: dict | None = None) -> None:
    results = run_cases(paths, golden, session_config, progress=runner.live)
    for case in golden.cases:
        report = compare(f"{stage}/{case.name}", case.outputs, results[case.name], logits_outputs=["logits"])
        runner.add_report(record, report)


def tokenizer_section(files: dict[str, bytes], note: str) -> dict:
    """The manifest's "tokenizer": where the files are (hashed in "files" like every file) and what they are."""
    return {"dir": "tokenizer" if files else None, "files": [f"tokenizer/{n}" for n in sorted(files)], "source": note}


def write_tokenizer(pkg: Path, files: dict[str, bytes]) -> None:
    if files:
        (pkg / "tokenizer").mkdir()
        for name, data in sorted(files.items()):
            (pkg / "tokenizer" / name).write_bytes(data)


def moe_routers(model) -> list[Router]:
    """Each MoE layer's router (in layer order, the order of the graphs' MoE nodes), for routing checks.

    DeepSeek-V4 (models/v4_moe.py Router): only its learned routers, greedy top-k of scoring_func's scores plus
    e_score_correction_bias (no groups); a hash_moe layer's experts are tid2eid[input_ids], a table lookup of the
    token id that no numerical error can change, so it has no routing decision to check (its gate's scores still
    weigh the chosen experts: that error reaches the outputs, which are judged)."""
    cfg = model.config
    if models.family_of(model).name == "v4":
        return [Router(cfg.num_experts_per_tok, cfg.scoring_func, "greedy", 1, 1,
                       layer.mlp.gate.e_score_correction_bias.detach().double().numpy())
                for layer in model.model.layers if not layer.mlp.gate.hashed]
    return [Router.of(cfg, None if layer.mlp.gate.e_score_correction_bias is None
                      else layer.mlp.gate.e_score_correction_bias.detach().double().numpy())
            for i, layer in enumerate(model.model.layers) if cfg.is_moe_layer(i)]


def check_router_sites(report, model, graph: str) -> None:
    """DeepSeek-V4, whose routers stay exported linears (moe-ort-fused does not run for it): every layer's gate,
    hash_moe layers' included (their gate reaches no TopK), must have been found as a router and kept fp32. Raises
    passes.quant_weights.QuantizationError naming the graph and the counts; nothing for other families."""
    from passes.quant_weights import QuantizationError
    if models.family_of(model).name != "v4" or report.scheme == "none":
        return
    kept = {s["weight"] for s in report.skipped if s["role"] == "router"}
    quantized = [q["weight"] for q in report.quantized if q["role"] == "router"]
    n = model.config.num_hidden_layers  # every V4 layer is a MoE layer
    if len(kept) != n or quantized:
        raise QuantizationError(
            f"--quant {report.scheme}: graph {graph!r} has {len(kept)} router gates kept fp32 and {len(quantized)} "
            f"quantized, for {n} MoE layers (hash_moe and moe): every V4 gate must be found (passes/quant_weights.py "
            "role 'router') and kept fp32")


class RoutingProbe:
    """Teacher-forced runs of lossy graphs (passes/routing_probes.py): the reference graphs (fp32, `reference_paths`)
    give each MoE layer's gate logits; the lossy graphs at `paths` run once as they are (`unforced`) and once
    with those gate logits forced, exposing their own gate logits and their MoE ops' router input. Feeds are
    cast to each graph's input dtypes (fp16 graphs take fp16 caches)."""

    def __init__(self, stage: str, paths: dict[str, Path], reference_paths: dict[str, Path], n_routers: int,
                 session_options: ort.SessionOptions):
        def session(m: Path | ir.Model):
            if isinstance(m, Path):
                return ort.InferenceSession(str(m), session_options, providers=["CPUExecutionProvider"])
            return session_from_model(m, session_options)

        self.ref, self.forced, self.plain, self.n, self.n_sel = {}, {}, {}, {}, {}
        for g in paths:
            r, f = ir.load(reference_paths[g]), ir.load(paths[g])
            r_sel, f_sel = selection_topks(r), selection_topks(f)  # before the gate edits (they cut the routers)
            self.n[g] = expose_gate_logits(r)
            if force_gate_logits(f) != self.n[g] or self.n[g] != n_routers:
                raise MlamoeError(f"{stage}: graph {g!r} has {self.n[g]} MoE routers in the reference graph and "
                                  f"{n_routers} MoE layers in the model; routing checks need one per layer")
            self.n_sel[g] = expose_selections(r, r_sel)
            if force_selections(f, f_sel) != self.n_sel[g]:
                raise MlamoeError(f"{stage}: graph {g!r} has {self.n_sel[g]} selections (TopKs outside the MoE "
                                  f"routers: the lightning indexer) in the reference graph and {len(f_sel)} in the "
                                  "lossy graph; selection checks need the same TopKs in both")
            self.ref[g], self.forced[g], self.plain[g] = session(r), session(f), session(paths[g])

    def run(self, case) -> dict:
        """-> {"reference_gates", "forced" (outputs), "actual_gates", "router_probs", "unforced" (outputs)}, the
        float outputs as float32."""
        g, n, m = case.graph, self.n[case.graph], self.n_sel[case.graph]
        ref = run_cast(self.ref[g], case.inputs)
        ref_gates = [ref[gate_name(i)].astype(np.float32) for i in range(n)]
        ref_sel = [ref[selection_name(j)].astype(np.float32) for j in range(m)]
        fres = run_cast(self.forced[g], {**case.inputs, **{forced_name(i): ref_gates[i] for i in range(n)},
                                         **{selection_forced_name(j): ref_sel[j] for j in range(m)}})
        as32 = {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in fres.items()}
        plain = {k: (v.astype(np.float32) if v.dtype == np.float16 else v)
                 for k, v in run_cast(self.plain[g], case.inputs).items()}
        selections = None if not m else {
            "reference_scores": ref_sel, "reference_ids": [ref[selection_ids_name(j)] for j in range(m)],
            "actual_scores": [as32[selection_name(j)] for j in range(m)],
            "forced_ids": [as32[selection_ids_name(j)] for j in range(m)]}
        return {"reference_gates": ref_gates, "forced": as32,
                "actual_gates": [as32[gate_name(i)] for i in range(n)],
                "router_probs": [as32[router_probs_name(i)] for i in range(n)], "unforced": plain,
                "selections": selections}


def run_cast(sess, feeds: dict) -> dict:
    """{output: array} of one run, each feed cast to the dtype the session's input declares (fp16 graphs take fp16
    caches)."""
    types = {i.name: _ORT_TYPES.get(i.type) for i in sess.get_inputs()}
    feeds = {n: (np.asarray(a).astype(types[n], copy=False) if types.get(n) is not None else a)
             for n, a in feeds.items()}
    return {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, feeds))}


def routed_reports(stage: str, paths: dict[str, Path], reference_paths: dict[str, Path], golden: Golden,
                   routers: list[Router], session_config: dict | None = None) -> list:
    """One routing-aware report per golden case (pipeline.parity.compare_routed over a RoutingProbe)."""
    so = ort_runtime.session_options(session_config or {"graph_optimization_level": "basic"})
    probe = RoutingProbe(stage, paths, reference_paths, len(routers), so)
    reports = []
    for case in golden.cases:
        r = probe.run(case)
        reports.append(compare_routed(f"{stage}/{case.name}", case.outputs, r["forced"], r["reference_gates"],
                                      r["actual_gates"], routers, logits_outputs=["logits"], unforced=r["unforced"],
                                      forced_router_probs=r["router_probs"], selections=r["selections"]))
    return reports


def check_cases_routed(runner: StageRunner, record: StageRecord, stage: str, paths: dict[str, Path],
                       reference_paths: dict[str, Path], golden: Golden, routers: list[Router],
                       session_config: dict | None = None) -> None:
    """check_cases for a lossy stage, routing-aware (routed_reports)."""
    for report in routed_reports(stage, paths, reference_paths, golden, routers, session_config):
        runner.add_report(record, report)


def check_quant_cases(runner: StageRunner, record: StageRecord, stage: str, model, paths: dict[str, Path],
                      reference_paths: dict[str, Path], golden: Golden) -> None:
    """A quantize stage's checks: routing-aware (check_cases_routed) for a model with MoE layers, against the
    fp32 graphs it quantized (`reference_paths`); plain check_cases for a dense one."""
    routers = moe_routers(model)
    if routers:
        check_cases_routed(runner, record, stage, paths, reference_paths, golden, routers)
    else:
        check_cases(runner, record, stage, paths, golden)


def assemble_package(pkg: Path, target_dir: Path, target_rec: StageRecord, runtime_file: Path, golden: Golden,
                     profile, vocab_size: int, cache: dict,
                     extra_graphs: dict[str, Path] | None = None) -> tuple[dict, dict]:
    """Save the target stage's graphs (and `extra_graphs`, {file name in onnx/: saved graph}) into onnx/ over one
    shared weights file (pipeline/weights_file.py: each distinct initializer stored once), copy the runtime to
    runtime/, write golden/; -> (the manifest's "golden" section, its "io" section, whose "weights" names the
    shared file)."""
    (pkg / "onnx").mkdir()
    graph_files = {f"{g}.onnx" for g in GRAPHS}
    with WeightsFile(pkg / "onnx") as weights:
        for g in GRAPHS:
            weights.save_file(target_dir / f"{g}.onnx")  # ORT-optimized graphs: ONNX's checker does not know them
        for name, src in (extra_graphs or {}).items():
            weights.save_file(src, name)
    for rel in target_rec.outputs:  # anything else the target stage wrote (not the graphs' own weights files)
        if rel not in graph_files and not rel.endswith(".onnx.data"):
            shutil.copyfile(target_dir / rel, pkg / "onnx" / rel)
    (pkg / "runtime").mkdir()
    shutil.copyfile(runtime_file, pkg / "runtime" / runtime_file.name)
    golden_section = save_golden(golden, pkg / "golden", pkg)
    tol = budget_for(profile.parity_stage)
    golden_section["tolerance"] = {"atol": tol.atol, "rtol": tol.rtol, "stage": profile.parity_stage}
    io = {"vocab_size": vocab_size, "cache": cache,
          "graphs": {g: {"file": f"onnx/{g}.onnx", **graph_io(pkg / "onnx" / f"{g}.onnx")} for g in GRAPHS},
          "weights": weights_section(weights, "onnx")}
    return golden_section, io


def quantize_graph(model_ir: ir.Model, scheme: str, **kw):
    from passes.quantize import quantize
    return quantize(model_ir, scheme, **kw)


def calibrate_w8a8(prefill: ir.Model, cfg: DeepseekConfig, seed: int, n: int = 4, seq: int = 32) -> dict[str, float]:
    """Static activation ranges for w8a8 from a few seeded prompts (token ids uniform over the vocabulary)."""
    from passes.quant_w8a8 import calibrate
    rng = np.random.default_rng(seed + 1)
    feeds = [prefill_feeds(prefill, rng.integers(0, cfg.vocab_size, (1, seq))) for _ in range(n)]
    return calibrate(prefill, feeds)


def reference_from_graphs(paths: dict[str, Path], golden: Golden, cfg: DeepseekConfig, layout: str,
                           session: dict) -> Golden:
    """Golden data recomputed by running `paths` (the quantized graphs) on ORT CPU with the target's
    session settings (ORT fuses Q/DQ pairs into integer kernels, which changes the numbers): what a
    quantized package must reproduce on its target."""
    results = run_cases(paths, golden, session)
    cases = [GoldenCase(c.name, c.graph, c.inputs, {k: results[c.name][k] for k in c.outputs}) for c in golden.cases]
    manifest = {"io": {"vocab_size": cfg.vocab_size, "cache": cache_spec(cfg, layout),
                       "graphs": {g: {"file": p.name, **graph_io(p)} for g, p in paths.items()}},
                "target": {"session": session}}
    root = next(iter(paths.values())).parent
    rt = ort_runtime.PackageRuntime(root, manifest=manifest)
    tokens, step_logits = rt.generate(golden.prompt, golden.tokens.shape[1])
    return Golden(cases, golden.prompt, tokens, step_logits)


def run_graph_stages(runner: StageRunner, model, load: StageRecord, golden: Golden, work: Path,
                     pass_names, layout: str, factories=None, pass_params=None,
                     skipped: dict[str, str] | None = None) -> tuple[StageRecord, Path]:
    """The export stage, then each named pass (on the graphs passes.graphs_for names), each checked
    against the golden data at the fp32 budgets. -> (last stage's record, folder of its graphs).

    factories: name -> pass factory overriding passes.PASSES (a target's variant of a pass);
    pass_params: name -> extra stage parameters (part of the cache key) for such a variant;
    skipped: pass name -> why it is left out (skipped_passes): recorded as a skipped stage after the export.
    """
    factories = {**PASSES, **(factories or {})}

    def checker(stage: str):
        return lambda d, rec: check_cases(runner, rec, stage, {g: d / f"{g}.onnx" for g in GRAPHS}, golden)

    def do_export(d: Path, rec: StageRecord) -> None:
        runner.live.update(f"tracing the prefill graph ({model.config.num_hidden_layers} layers, torch.onnx.export)")
        graphs = export_graphs(model, layout)
        for i, (g, m) in enumerate(graphs.items()):
            runner.live.update("writing graphs and weights", i + 1, len(graphs))
            save_graph(m, d / f"{g}.onnx")

    prev = runner.run("export", {"layout": layout, "exporter": "torch.onnx.export(dynamo=True)"},
                      dict(load.inputs), work / "export", do_export, checker("export"))
    prev_dir = work / "export"
    for name, why in (skipped or {}).items():
        runner.records.append(skipped_stage(f"passes/{name}", prev.outputs, why, **{"pass": name}))
        runner.progress(f"[passes/{name}] not run: {why}")
    for i, name in enumerate(pass_names):
        src_dir, dst_dir = prev_dir, work / f"pass{i}-{name}"

        def do_pass(d: Path, rec: StageRecord, name=name, src_dir=src_dir) -> None:
            wanted = graphs_for(name)
            for g, m in load_graphs(src_dir).items():
                runner.live.update(f"{name} on {g}")
                if g not in wanted:
                    for f in src_dir.glob(f"{g}.onnx*"):  # the graph and its external data, if any
                        shutil.copyfile(f, d / f.name)
                    rec.notes.append(f"{g}: left unchanged ({name} runs on {', '.join(wanted)})")
                    continue
                p = factories[name]()
                result = p(m)
                cleanup(result.model)
                save_graph(result.model, d / f"{g}.onnx")
                report = getattr(p, "report", None)
                if report is not None:
                    rec.notes.append(f"{g}: " + json.dumps(report, sort_keys=True, default=str))

        params = {"pass": name, **((pass_params or {}).get(name, {}))}
        prev = runner.run(f"passes/{name}", params, prev.outputs, dst_dir, do_pass, checker(f"passes/{name}"))
        prev_dir = dst_dir
    return prev, prev_dir


def load_graphs(folder: Path) -> dict[str, ir.Model]:
    return {g: ir.load(folder / f"{g}.onnx") for g in GRAPHS}
