"""`mlamoe compile`: load -> export -> passes -> quantize -> target -> package, each stage checked.

The package is assembled in a temporary folder beside --out and renamed into place only when
every stage has passed its parity budget, so an interrupted or failed compile leaves nothing at
the output path.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import models
from models.checkpoint import weights_sha256
from models.config import DeepseekConfig
from models.errors import MlamoeError
from models.tokenizer import package_tokenizer
from passes import PASSES, graphs_for
from passes.cleanup import cleanup
from targets import get_profile
from targets import ort_cpu
from targets.base import TargetProfile

from runtime import ort_runtime
from .export import export_graphs, save_graph
from .golden import Golden, make_golden, save_golden
from .package import package_lock, sha256_file, staging, work_dir, write_failure, write_manifest
from .package_readme import random_weights_note
from .parity import Router, budget_for, compare, compare_routed, write_reports
from .stages import StageRecord, StageRunner, write_build_log

GRAPHS = ("prefill", "decode")
VERSION = "0.1.0"


class CompileError(MlamoeError):
    pass


def config_sha256(cfg: DeepseekConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_hf_dict(), sort_keys=True).encode()).hexdigest()


def graph_io(path: Path) -> dict:
    """Names, dtypes and (symbolic) shapes of a saved graph's inputs and outputs."""
    m = onnx.load(str(path), load_external_data=False)

    def spec(v) -> dict:
        t = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]}

    return {"inputs": [spec(v) for v in m.graph.input], "outputs": [spec(v) for v in m.graph.output],
            "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import}}


def cache_spec(cfg, layout: str) -> dict:
    """The manifest's io.cache section: the model family's cache spec (models/cache.py)."""
    return models.family_for(cfg.model_type).cache_spec(cfg, layout).to_manifest()


def family_passes(model, pass_names) -> tuple[str, ...]:
    """The target's passes that apply to the model's family (models.Family.passes), in the target's order."""
    family = models.family_of(model)
    return tuple(p for p in pass_names if family.applies(p))


def run_cases(paths: dict[str, Path], golden: Golden, session_config: dict | None = None) -> dict[str, dict]:
    """Run each golden case on ORT CPU; -> {case name: {output name: array}}."""
    so = ort_runtime.session_options(session_config or {"graph_optimization_level": "basic"})
    sessions = {g: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for g, p in paths.items()}
    results = {}
    for case in golden.cases:
        sess = sessions[case.graph]
        names = [o.name for o in sess.get_outputs()]
        results[case.name] = dict(zip(names, sess.run(None, case.inputs)))
    return results


def check_cases(runner: StageRunner, record: StageRecord, stage: str, paths: dict[str, Path], golden: Golden,
                session_config: dict | None = None) -> None:
    results = run_cases(paths, golden, session_config)
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
    """Each MoE layer's router (in layer order, the order of the graphs' MoE nodes), for routing checks."""
    cfg = model.config
    return [Router.of(cfg, None if layer.mlp.gate.e_score_correction_bias is None
                      else layer.mlp.gate.e_score_correction_bias.detach().double().numpy())
            for i, layer in enumerate(model.model.layers) if cfg.is_moe_layer(i)]


def routed_reports(stage: str, paths: dict[str, Path], reference_paths: dict[str, Path], golden: Golden,
                   routers: list[Router], session_config: dict | None = None) -> list:
    """One routing-aware report per golden case (pipeline.parity.compare_routed): the reference graphs (fp32,
    `reference_paths`) give each MoE layer's gate logits; the lossy graphs at `paths` run once as they are
    (recorded) and once with those gate logits forced (judged), exposing their own."""
    from .routing import expose_gate_logits, force_gate_logits, forced_name, gate_name
    so = ort_runtime.session_options(session_config or {"graph_optimization_level": "basic"})

    def session(m: ir.Model):
        return ort.InferenceSession(ir.to_proto(m).SerializeToString(), so, providers=["CPUExecutionProvider"])

    def run(sess, feeds) -> dict:
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))

    plain, ref, forced, n_layers = {}, {}, {}, {}
    for g in paths:
        r, f = ir.load(reference_paths[g]), ir.load(paths[g])
        n_layers[g] = expose_gate_logits(r)
        if force_gate_logits(f) != n_layers[g] or n_layers[g] != len(routers):
            raise MlamoeError(f"{stage}: graph {g!r} has {n_layers[g]} MoE routers in the reference graph and "
                              f"{len(routers)} MoE layers in the model; routing checks need one per layer")
        ref[g], forced[g] = session(r), session(f)
        plain[g] = ort.InferenceSession(str(paths[g]), so, providers=["CPUExecutionProvider"])
    reports = []
    for case in golden.cases:
        n = n_layers[case.graph]
        ref_gates = [run(ref[case.graph], case.inputs)[gate_name(i)] for i in range(n)]
        fres = run(forced[case.graph], {**case.inputs, **{forced_name(i): ref_gates[i] for i in range(n)}})
        reports.append(compare_routed(f"{stage}/{case.name}", case.outputs, fres, ref_gates,
                                      [fres[gate_name(i)] for i in range(n)], routers, logits_outputs=["logits"],
                                      unforced=run(plain[case.graph], case.inputs)))
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
                     profile: TargetProfile, vocab_size: int, cache: dict) -> tuple[dict, dict]:
    """Copy the target stage's graphs to onnx/, the runtime to runtime/, write golden/;
    -> (the manifest's "golden" section, its "io" section)."""
    (pkg / "onnx").mkdir()
    for rel in target_rec.outputs:
        shutil.copyfile(target_dir / rel, pkg / "onnx" / rel)
    (pkg / "runtime").mkdir()
    shutil.copyfile(runtime_file, pkg / "runtime" / runtime_file.name)
    golden_section = save_golden(golden, pkg / "golden", pkg)
    tol = budget_for(profile.parity_stage)
    golden_section["tolerance"] = {"atol": tol.atol, "rtol": tol.rtol, "stage": profile.parity_stage}
    io = {"vocab_size": vocab_size, "cache": cache,
          "graphs": {g: {"file": f"onnx/{g}.onnx", **graph_io(pkg / "onnx" / f"{g}.onnx")} for g in GRAPHS}}
    return golden_section, io


def quantize_graph(model_ir: ir.Model, scheme: str, **kw):
    from passes.quantize import quantize
    return quantize(model_ir, scheme, **kw)


def _calibrate(prefill: ir.Model, cfg: DeepseekConfig, seed: int, n: int = 4, seq: int = 32) -> dict[str, float]:
    """Static activation ranges for w8a8 from a few seeded prompts (token ids uniform over the vocabulary)."""
    from passes.quant_w8a8 import calibrate
    from .quant_eval import prefill_feeds
    rng = np.random.default_rng(seed + 1)
    feeds = [prefill_feeds(prefill, rng.integers(0, cfg.vocab_size, (1, seq))) for _ in range(n)]
    return calibrate(prefill, feeds)


def _reference_from_graphs(paths: dict[str, Path], golden: Golden, cfg: DeepseekConfig, layout: str,
                           session: dict) -> Golden:
    """Golden data recomputed by running `paths` (the quantized graphs) on ORT CPU with the target's
    session settings (ORT fuses Q/DQ pairs into integer kernels, which changes the numbers): what a
    quantized package must reproduce on its target."""
    from .golden import GoldenCase
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
                     pass_names, layout: str, factories=None, pass_params=None) -> tuple[StageRecord, Path]:
    """The export stage, then each named pass (on the graphs passes.graphs_for names), each checked
    against the golden data at the fp32 budgets. -> (last stage's record, folder of its graphs).

    factories: name -> pass factory overriding passes.PASSES (a target's variant of a pass);
    pass_params: name -> extra stage parameters (part of the cache key) for such a variant.
    """
    factories = {**PASSES, **(factories or {})}

    def checker(stage: str):
        return lambda d, rec: check_cases(runner, rec, stage, {g: d / f"{g}.onnx" for g in GRAPHS}, golden)

    def do_export(d: Path, rec: StageRecord) -> None:
        for g, m in export_graphs(model, layout).items():
            save_graph(m, d / f"{g}.onnx")

    prev = runner.run("export", {"layout": layout, "exporter": "torch.onnx.export(dynamo=True)"},
                      dict(load.inputs), work / "export", do_export, checker("export"))
    prev_dir = work / "export"
    for i, name in enumerate(pass_names):
        src_dir, dst_dir = prev_dir, work / f"pass{i}-{name}"

        def do_pass(d: Path, rec: StageRecord, name=name, src_dir=src_dir) -> None:
            wanted = graphs_for(name)
            for g, m in _load_graphs(src_dir).items():
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


def _load_graphs(folder: Path) -> dict[str, ir.Model]:
    return {g: ir.load(folder / f"{g}.onnx") for g in GRAPHS}


def _default_quant(requested: str | None, quant: str, fp8_checkpoint: bool, profile: TargetProfile
                   ) -> tuple[str, str | None]:
    """(scheme, why or None). Without --quant an FP8 checkpoint keeps its own FP8 weights (bytes passed
    through) on a target with an fp8 scheme, and is dequantized (saying so) on one without."""
    if requested is not None or not fp8_checkpoint:
        return quant, None
    if "fp8" in profile.quant_schemes:
        experts = (" (the routed experts excepted: inside com.microsoft.MoE they are dequantized, ORT has no "
                   "FP8 MoE kernel)" if "moe-ort-fused" in profile.passes else "")
        return "fp8", ("FP8 checkpoint and no --quant: packaged as --quant fp8, the checkpoint's own E4M3 bytes and "
                       f"scales passed through{experts}")
    return quant, (f"FP8 checkpoint and no --quant: target {profile.name} has no fp8 scheme (it supports "
                   f"{', '.join(profile.quant_schemes)}), so the FP8 weights are dequantized and packaged as "
                   f"--quant {quant}")


def compile_package(model_spec: str, target: str, out: str | Path, **options) -> Path:
    """Build the package for `target` at `out` (and `out`.tar.gz beside it); see _compile_package for
    the options. Holds the package lock for the whole build (a second compile into the same --out
    fails at once), and turns a full disk or an unwritable folder into one clear error."""
    out = Path(out)
    try:
        with package_lock(out):
            return _compile_package(model_spec, target, out, **options)
    except OSError as e:
        failure = write_failure(e, out, _fp32_weight_bytes(model_spec))
        if failure is None:
            raise
        raise failure from e


def _fp32_weight_bytes(model_spec: str) -> int | None:
    try:
        return 4 * models.load_config(model_spec).param_count()
    except Exception:  # only sizes an error message
        return None


def _compile_package(model_spec: str, target: str, out: str | Path, *, force: bool = False, quant: str | None = None,
                    seed: int = 0, cache_dir: Path | None = None, use_cache: bool = True,
                    layout: str | None = None, gen_tokens: int = 32, progress=None, soc: str | None = None,
                    precision: str | None = None, require_om: bool = False, ranks: int | None = None,
                    redundant: int = 0, calibrate: int = 8, int8_accuracy_level: int | None = None) -> Path:
    model_spec = models.resolve(model_spec)
    profile: TargetProfile = get_profile(target)
    requested_quant = quant
    quant = quant or profile.quant_schemes[0]  # until the checkpoint is loaded: an FP8 one may change it
    if quant not in profile.quant_schemes:
        raise CompileError(f"--quant {quant}: target {target!r} supports {', '.join(profile.quant_schemes)}")
    if profile.name == "ascend":
        from targets.ascend.profile import make_profile
        make_profile(soc or "Ascend910B3", precision or "mixed_float16", quant)  # a bad --soc fails before any work
    quant_options = {}  # passes.quant_int8 options; part of the quantize stage's parameters (and cache key)
    if int8_accuracy_level is not None:
        if quant != "int8" or profile.name != "ort-cpu":
            raise CompileError(f"--int8-accuracy-level applies to --quant int8 on --target ort-cpu, not "
                               f"--quant {quant} on {profile.name}")
        if int8_accuracy_level not in (0, 4):
            raise CompileError(f"--int8-accuracy-level {int8_accuracy_level}: choose 0 (fp32 activations, "
                               "weight-only numerics) or 4 (int8 activations per block inside the kernels)")
        quant_options["accuracy_level"] = int8_accuracy_level
    out = Path(out)
    if out.exists() and not force:
        raise CompileError(f"{out}: exists; pass --force to replace it (or choose another --out)")
    runner = StageRunner(cache_dir, use_cache, progress)
    started = time.time()

    # ---- load ---------------------------------------------------------------------------------
    t = time.perf_counter()
    model = models.load(model_spec, seed=seed)
    cfg = model.config
    layout = layout or models.family_of(model).cache_layouts[0]  # the family's default cache layout
    kind = "checkpoint" if Path(model_spec).is_dir() else "preset"
    load = StageRecord("load", {"model": str(model_spec) if kind == "preset" else Path(model_spec).name,
                                "kind": kind, "seed": seed if kind == "preset" else None,
                                "attention": model.attention},
                       {"config": config_sha256(cfg), "weights": weights_sha256(model)})
    fp8_checkpoint = getattr(model, "checkpoint", None) is not None and bool(model.checkpoint.fp8_names)
    if fp8_checkpoint:
        load.notes.append(f"{len(model.checkpoint.fp8_names)} FP8 e4m3 weights dequantized to fp32 for the reference")
    quant, quant_why = _default_quant(requested_quant, quant, fp8_checkpoint, profile)
    if quant_why:
        load.notes.append(quant_why)
        runner.progress(f"[load] {quant_why}")
    load.notes.append(f"{cfg.param_count():,} parameters; eager reference is fp32 PyTorch")
    tokenizer, tokenizer_note = package_tokenizer(model_spec, cfg.vocab_size)
    load.notes.append(f"tokenizer: {tokenizer_note}")
    load.seconds = round(time.perf_counter() - t, 3)
    runner.records.append(load)
    runner.progress(f"[load] {model_spec}: {cfg.param_count():,} parameters")
    base_manifest = {
        "mlamoe_version": VERSION,
        "model": {"source": load.params["model"], "kind": kind, "seed": load.params["seed"],
                  "config": cfg.to_hf_dict(), "config_sha256": load.inputs["config"],
                  "weights_sha256": load.inputs["weights"], "parameters": cfg.param_count()},
        "toolchain": runner.versions,
        "tokenizer": tokenizer_section(tokenizer, tokenizer_note),
        "quantization_choice": {"requested": requested_quant, "scheme": quant, "fp8_checkpoint": fp8_checkpoint,
                                "why": quant_why or ("--quant " + quant if requested_quant else
                                                     f"the target's default ({quant})")},
    }
    if profile.name == "ascend":
        return _compile_ascend(model, profile, out, force, runner, load, base_manifest, seed, started,
                               soc or "Ascend910B3", precision or "mixed_float16", require_om, quant, tokenizer=tokenizer)
    if profile.name == "ort-cuda":
        from .cuda_compile import build_cuda_package
        return build_cuda_package(model, profile, out, force=force, runner=runner, load=load,
                                  base_manifest=base_manifest, seed=seed, started=started,
                                  layout=layout, gen_tokens=gen_tokens, quant=quant, tokenizer=tokenizer)
    golden = make_golden(model, layout, gen_tokens=gen_tokens, seed=seed)

    with work_dir(out) as work_s, staging(out, force) as pkg:
        work = Path(work_s)

        def checker(stage: str, session: dict | None = None, reference: Golden | None = None):
            return lambda d, rec: check_cases(runner, rec, stage, {g: d / f"{g}.onnx" for g in GRAPHS},
                                              reference or golden, session)

        prev, prev_dir = run_graph_stages(runner, model, load, golden, work, family_passes(model, profile.passes),
                                          layout)

        # ---- quantize ---------------------------------------------------------------------------
        expected = golden  # what the packaged graphs must reproduce
        if quant == "none":
            runner.records.append(StageRecord("quantize", {"scheme": quant}, dict(prev.outputs),
                                              dict(prev.outputs), notes=["scheme none: fp32 weights, nothing to do"]))
        else:
            src_dir, prev_dir = prev_dir, work / f"quant-{quant}"

            def do_quant(d: Path, rec: StageRecord) -> None:
                graphs = _load_graphs(src_dir)
                calibration = _calibrate(graphs["prefill"], cfg, seed) if quant == "w8a8" else None
                summary = {}
                for g, m in graphs.items():
                    report = quantize_graph(m, quant, model=model, calibration=calibration, **quant_options)
                    save_graph(m, d / f"{g}.onnx")
                    summary[g] = report.to_dict()
                    rec.notes.append(f"{g}: " + report.summary())
                # for people: weight bytes before/after, and where the error enters (per linear layer)
                (d / "reports").mkdir()
                (d / "reports" / "quantization.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
                from .error_profile import write_error_profile
                feeds = next(c.inputs for c in golden.cases if c.name == "prefill")
                write_error_profile(ir.load(src_dir / "prefill.onnx"), graphs["prefill"], quant, feeds,
                                    d / "reports" / "error_profile.csv")

            prev = runner.run("quantize", {"scheme": quant, **quant_options}, prev.outputs, prev_dir, do_quant,
                              lambda d, rec: check_quant_cases(runner, rec, f"quantize-{quant}", model,
                                                               {g: d / f"{g}.onnx" for g in GRAPHS},
                                                               {g: src_dir / f"{g}.onnx" for g in GRAPHS}, golden))
            expected = _reference_from_graphs({g: prev_dir / f"{g}.onnx" for g in GRAPHS}, golden, cfg, layout,
                                              ort_cpu.session_config())

        # ---- target -----------------------------------------------------------------------------
        session = ort_cpu.session_config()

        def do_target(d: Path, rec: StageRecord) -> None:
            for g in GRAPHS:
                ort_cpu.optimize_offline(prev_dir / f"{g}.onnx", d / f"{g}.onnx")
            rec.notes.append(f"graphs optimised offline by onnxruntime {ort.__version__} at level "
                             f"'{ort_cpu.OFFLINE_LEVEL}'; sessions use {session}")

        target_rec = runner.run(f"target/{profile.name}", {"target": profile.name, "offline_level": ort_cpu.OFFLINE_LEVEL},
                                prev.outputs, work / "target", do_target,
                                checker(profile.parity_stage, session, reference=expected))

        # ---- package ----------------------------------------------------------------------------
        t = time.perf_counter()
        if quant != "none":
            shutil.copytree(prev_dir / "reports", pkg / "reports")
        golden_section, io = assemble_package(pkg, work / "target", target_rec, Path(ort_runtime.__file__), expected,
                                              profile, cfg.vocab_size, cache_spec(cfg, layout))
        manifest = {
            **base_manifest,
            "target": {"name": profile.name, "description": profile.description, "providers": list(profile.providers),
                       "session": session, "quantization": quant, "runtime": "runtime/ort_runtime.py",
                       **({"quantization_options": quant_options} if quant_options else {})},
            "io": io,
            "golden": golden_section,
        }
        # greedy generation from the packaged graphs must equal the reference, token for token
        # (eager for fp32 packages; the quantize stage's graphs for quantized ones)
        rt = ort_runtime.PackageRuntime(pkg, manifest=manifest)
        tokens, step_logits = rt.generate(expected.prompt, expected.tokens.shape[1])
        gen_report = compare(f"{profile.parity_stage}/greedy", {"step_logits": expected.step_logits},
                             {"step_logits": step_logits}, logits_outputs=["step_logits"])
        gen_report.add_tokens("greedy", expected.tokens, tokens)
        runner.add_report(target_rec, gen_report)
        if quant != "none":  # accuracy of the quantized package against eager fp32, for people
            acc = compare(f"info/{quant}-greedy-vs-fp32", {"step_logits": golden.step_logits},
                          {"step_logits": step_logits}, logits_outputs=["step_logits"],
                          budget=budget_for(f"quantize-{quant}"))
            acc.add_tokens("greedy-vs-fp32", golden.tokens, tokens)
            runner.add_report(target_rec, acc, binding=False)
        write_reports(runner.reports, pkg / "reports")
        pkg_rec = StageRecord("package", {"tarball": True}, dict(target_rec.outputs))
        pkg_rec.seconds = round(time.perf_counter() - t, 3)
        runner.records.append(pkg_rec)
        manifest["stages"] = [r.to_dict() for r in runner.records]
        manifest["parity"] = {"passed": runner.binding_passed(), "reports": ["reports/parity.json",
                                                                                          "reports/parity.md"]}
        if quant == "none":
            verified = [f"every stage's outputs against the eager PyTorch reference on ORT CPU "
                        f"({len(runner.reports)} parity reports, all within budget)",
                        f"greedy generation of {golden.tokens.shape[1]} tokens equal to eager, token for token"]
            not_verified = []
        else:
            verified = [f"export and passes against eager fp32 PyTorch (fp32 budgets); the {quant} graphs against eager "
                        f"fp32 within the quantize-{quant} budget (cosine/KL; elementwise not judged)",
                        "the packaged (ORT-optimised) graphs reproduce the quantized graphs' outputs and greedy tokens "
                        "(golden/ holds the quantized graphs' outputs)"]
            not_verified = [f"the accuracy of {quant} on this model's real task: random-weight presets say nothing about "
                            "it; see reports/parity.md (greedy-vs-fp32) and the trained-small figures in the README"]
        manifest["verification"] = {"verified_here": verified, "not_verified": not_verified}
        if ranks:  # expert-parallel graphs + torchrun runtime, inside this package (so its files are hashed)
            from parallel.expert_parallel import build_ep_package, calibration_prompts
            t = time.perf_counter()
            runner.progress(f"[expert-parallel] {ranks} ranks, {redundant} redundant replicas per layer ...")
            build_ep_package(model, pkg / "expert_parallel", ranks, redundant=redundant,
                             calibration=calibration_prompts(cfg, calibrate, seed=seed) if calibrate else None,
                             model_hash=load.inputs["weights"])
            ep = StageRecord("expert-parallel", {"ranks": ranks, "redundant": redundant, "calibration_prompts": calibrate},
                             dict(load.inputs), seconds=round(time.perf_counter() - t, 3))
            ep.outputs = {p.relative_to(pkg).as_posix(): sha256_file(p)
                          for p in sorted((pkg / "expert_parallel").rglob("*")) if p.is_file()}
            ep.notes.append("parity of the partitioned runtime is tested (tests/test_expert_parallel.py), not "
                            "re-run by compile: it needs torchrun with one process per rank")
            runner.records.insert(-1, ep)
            manifest["stages"] = [r.to_dict() for r in runner.records]
            manifest["expert_parallel"] = {"dir": "expert_parallel", "ranks": ranks, "redundant": redundant,
                                           "plan": "expert_parallel/partition.json",
                                           "launch": "bash expert_parallel/launch.sh --prompt-ids 1,2,3"}
            manifest["verification"]["not_verified"].append(
                "the expert-parallel graphs were not run by this compile (see expert_parallel/launch.sh)")
        write_tokenizer(pkg, tokenizer)
        from .package_readme import package_readme
        (pkg / "README.md").write_text(package_readme(manifest, runner.reports))
        write_manifest(pkg, manifest)
        runner.progress(f"[package] {out} ({time.time() - started:.1f} s in all)")
    write_build_log(out, runner, started)
    return out


def _compile_ascend(model, profile: TargetProfile, out: Path, force: bool, runner: StageRunner, load: StageRecord,
                    base_manifest: dict, seed: int, started: float, soc: str, precision: str, require_om: bool,
                    quant: str = "none", tokenizer: dict[str, bytes] | None = None) -> Path:
    """The ascend flow (targets/ascend/flow.py): static-shape graphs, profile check, fp32 and fp16-emulated
    parity, the atc build script (run when atc is installed) and the on-device kit; with quant "w8a8" the
    graphs are W8A8 QDQ (targets/ascend/quant.py), judged against eager under the quantize-w8a8 budget."""
    from targets.ascend.flow import build_ascend
    with staging(out, force) as pkg:
        rec = StageRecord(f"target/{profile.name}", {"soc_version": soc, "precision": precision,
                                                     "require_om": require_om, "quant": quant}, dict(load.inputs))
        t = time.perf_counter()
        build = build_ascend(model, pkg, soc_version=soc, precision_mode=precision, require_om=require_om,
                             seed=seed, progress=runner.progress, quant=quant)
        for r in build.reports:
            runner.add_report(rec, r)
        rec.timings = dict(build.seconds)
        for g, qr in build.quant_reports.items():
            rec.notes.append(f"{g}: w8a8: {len(qr['quantized'])} weights quantized, linear bytes "
                             f"{qr['linear_bytes_before']:,} -> {qr['linear_bytes_after']:,} ({qr['linear_ratio']:.4f}x)")
        rec.notes.append(build.atc.status)
        rec.seconds = round(time.perf_counter() - t, 3)
        rec.outputs = {p.relative_to(pkg).as_posix(): sha256_file(p) for p in sorted((pkg / "onnx").rglob("*"))
                       if p.is_file()}
        runner.records.append(rec)
        write_reports(runner.reports, pkg / "reports")
        runner.records.append(StageRecord("package", {"tarball": True}, dict(rec.outputs)))
        manifest = {
            **base_manifest,
            "target": {"name": profile.name, "description": profile.description, "quantization": quant,
                       "soc_version": soc, "precision": precision},
            "ascend": build.manifest,
            "stages": [r.to_dict() for r in runner.records],
            "parity": {"passed": runner.binding_passed(),
                       "reports": ["reports/parity.json", "reports/parity.md"]},
            "verification": build.manifest["verification"],
        }
        m = base_manifest["model"]
        head = (f"# {m['source']} for Huawei Ascend ({soc})\n\nCompiled by mlamoe {VERSION} from a {m['kind']} "
                f"({m['config']['model_type']}, {m['parameters']:,} parameters; weights sha256 "
                f"`{m['weights_sha256'][:16]}…`). ATC status: **{build.atc.status}**.\n\n"
                f"**Judged:** fp16 emulation on ONNX Runtime CPU against the fp32 static graphs "
                f"{build.judged}.{random_weights_note(m['kind'])}\n\n")
        write_tokenizer(pkg, tokenizer or {})
        (pkg / "README.md").write_text(head + build.readme)
        write_manifest(pkg, manifest)
        runner.progress(f"[package] {out} ({time.time() - started:.1f} s in all); {build.atc.status}")
    write_build_log(out, runner, started)
    return out
