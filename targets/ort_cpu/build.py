"""The ort-cpu build, after the core's `load` stage: export and passes (pipeline.build.run_graph_stages), the
quantize stage (--quant int8 / w8a8 / fp8: passes/quantize.py, checked routing-aware against the fp32 graphs),
the target stage (ORT's offline optimisation, checked against the golden data: eager fp32, or the quantized
graphs' own outputs), greedy generation through runtime/ort_runtime.py, and the package; with --ranks, the
expert-parallel graphs and torchrun runtime (parallel/expert_parallel.py) inside it."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

import models

from pipeline.build import (GRAPHS, BuildContext, assemble_package, calibrate_w8a8, check_cases, check_quant_cases,
                            check_router_sites,
                            family_passes, load_graphs, quantize_graph, reference_from_graphs, run_graph_stages,
                            skipped_passes, skipped_stage, write_tokenizer)
from pipeline.error_profile import write_error_profile
from pipeline.export import save_graph
from pipeline.golden import Golden, make_golden
from pipeline.io_spec import cache_spec
from pipeline.package import sha256_file, work_dir, write_manifest
from pipeline.package_readme import package_readme
from pipeline.parity import budget_for, compare, write_reports
from pipeline.stages import StageRecord, release_memory
from runtime import ort_runtime

from . import session as ort_cpu


def build_ort_cpu(ctx: BuildContext) -> None:
    model, profile, runner, load, base_manifest = ctx.model, ctx.profile, ctx.runner, ctx.load, ctx.base_manifest
    cfg, out, pkg, quant, seed, started = model.config, ctx.out, ctx.package, ctx.quant, ctx.seed, ctx.started
    layout, gen_tokens, tokenizer = ctx.layout, ctx.gen_tokens, ctx.tokenizer
    ranks, redundant, calibrate = ctx.options["ranks"], ctx.options["redundant"], ctx.options["calibrate"]
    # passes.quant_int8 options; part of the quantize stage's parameters (and cache key)
    if quant == "int4":
        quant_options = dict(ort_cpu.INT4_OPTIONS)
    else:
        quant_options = ({} if ctx.options["int8_accuracy_level"] is None
                         else {"accuracy_level": ctx.options["int8_accuracy_level"]})
    family = models.family_of(model)
    quant_options.update(family.quant_options.get(quant, {}))  # a family's own (V4: expert_tables)
    golden = make_golden(model, layout, gen_tokens=gen_tokens, seed=seed)

    with work_dir(out) as work_s:
        work = Path(work_s)

        def checker(stage: str, session: dict | None = None, reference: Golden | None = None):
            return lambda d, rec: check_cases(runner, rec, stage, {g: d / f"{g}.onnx" for g in GRAPHS},
                                              reference or golden, session)

        prev, prev_dir = run_graph_stages(runner, model, load, golden, work, family_passes(model, profile.passes),
                                          layout, skipped=skipped_passes(model, profile.passes))

        # ---- quantize ---------------------------------------------------------------------------
        expected = golden  # what the packaged graphs must reproduce
        if quant == "none":
            runner.records.append(StageRecord("quantize", {"scheme": quant}, dict(prev.outputs),
                                              dict(prev.outputs), notes=["scheme none: fp32 weights, nothing to do"]))
        else:
            src_dir, prev_dir = prev_dir, work / f"quant-{quant}"

            def do_quant(d: Path, rec: StageRecord) -> None:
                graphs = load_graphs(src_dir)
                calibration = calibrate_w8a8(graphs["prefill"], cfg, seed) if quant == "w8a8" else None
                summary = {}
                for g, m in graphs.items():
                    report = quantize_graph(m, quant, model=model, calibration=calibration, **quant_options)
                    check_router_sites(report, model, g)
                    save_graph(m, d / f"{g}.onnx")
                    summary[g] = report.to_dict()
                    rec.notes.append(f"{g}: " + report.summary())
                # for people: weight bytes before/after, and where the error enters (per linear layer)
                (d / "reports").mkdir()
                (d / "reports" / "quantization.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
                feeds = next(c.inputs for c in golden.cases if c.name == "prefill")
                write_error_profile(ir.load(src_dir / "prefill.onnx"), graphs["prefill"], quant, feeds,
                                    d / "reports" / "error_profile.csv", **quant_options)

            prev = runner.run("quantize", {"scheme": quant, **quant_options}, prev.outputs, prev_dir, do_quant,
                              lambda d, rec: check_quant_cases(runner, rec, f"quantize-{quant}", model,
                                                               {g: d / f"{g}.onnx" for g in GRAPHS},
                                                               {g: src_dir / f"{g}.onnx" for g in GRAPHS}, golden))
            expected = reference_from_graphs({g: prev_dir / f"{g}.onnx" for g in GRAPHS}, golden, cfg, layout,
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
        del rt  # its sessions hold the package's weights; the genai check below opens its own
        release_memory()
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
        genai_form = ctx.options["genai"] or "pipeline"
        if genai_form != "none":
            _genai_folder(pkg, manifest, runner, target_rec, genai_form, tokenizer)
        (pkg / "README.md").write_text(package_readme(manifest, runner.reports))
        write_manifest(pkg, manifest)
        runner.progress(f"[package] {out} ({time.time() - started:.1f} s in all)")


def _genai_folder(pkg: Path, manifest: dict, runner, target_rec: StageRecord, form: str,
                  tokenizer: dict[str, bytes]) -> None:
    """The onnxruntime-genai files, in onnx/ beside the package's graphs (targets/genai_folder.py): the graphs with
    their cache IO in genai's layout, saved over onnx/weights.data continued (WeightsFile.reopen: their weights are
    the package graphs' bytes, referenced, not stored again), genai_config.json and the tokenizer; checked by
    re-running the golden cases and greedy tokens through them on ONNX Runtime under the names genai_config.json
    gives (onnxruntime-genai itself is not run here). The manifest's io.weights then lists every graph over the
    file, genai's too."""
    from passes.genai_cache_layout import GenaiCacheLayoutError
    from pipeline.weights_file import WeightsFile, weights_section
    from targets.genai_folder import build_genai_folder, check_golden, manifest_section
    from models.errors import MlamoeError
    t = time.perf_counter()
    folder = pkg / "onnx"
    runner.progress(f"[genai] writing the onnxruntime-genai files into onnx/ ({form}) ...")
    wanted = ("prefill", "decode") if form == "pipeline" else ("prefill",)
    graphs = {g: ir.load(pkg / manifest["io"]["graphs"][g]["file"]) for g in wanted}
    shared = manifest["io"]["weights"]
    with WeightsFile.reopen(folder, [Path(g).name for g in shared["graphs"]], name=Path(shared["file"]).name,
                            inline_bytes=shared["inline_max_bytes"]) as weights:
        try:
            files = build_genai_folder(folder, graphs, manifest["model"]["config"], tokenizer, form=form,
                                       weights=weights)
        except GenaiCacheLayoutError as e:  # a cache genai's key/value pairs cannot hold: nothing written, said so
            manifest["verification"]["not_verified"].append(
                f"no onnxruntime-genai files: onnxruntime-genai cannot take this cache ({e})")
            runner.records.insert(-1, skipped_stage("genai", target_rec.outputs,
                                                    f"onnxruntime-genai cannot take this cache: {e}", form=form))
            manifest["stages"] = [r.to_dict() for r in runner.records]
            runner.progress(f"[genai] not written: {e}")
            return
    manifest["io"]["weights"] = weights_section(weights, "onnx")
    failures = check_golden(pkg, folder, manifest=manifest)
    if failures:
        raise MlamoeError(f"onnx/ (genai files): the onnxruntime-genai graphs do not reproduce the package's golden "
                          "data: " + "; ".join(failures[:3]))
    rec = StageRecord("genai", {"form": form}, dict(target_rec.outputs), seconds=round(time.perf_counter() - t, 3))
    rec.notes.append("golden cases and greedy tokens re-run through the genai graphs on ONNX Runtime under "
                     "genai_config.json's names: equal within the package's tolerance; onnxruntime-genai itself "
                     "was not run by this compile (tests/test_genai.py runs it)")
    rec.notes.append(f"genai graphs saved over onnx/{weights.name}: {weights.referenced_bytes:,} bytes referenced by "
                     f"all its graphs, {weights.stored_bytes:,} stored")
    runner.records.insert(-1, rec)
    manifest["stages"] = [r.to_dict() for r in runner.records]
    manifest["genai"] = manifest_section(pkg, folder, files)
    manifest["verification"]["verified_here"].append(
        "the onnxruntime-genai files in onnx/: their graphs reproduce the golden data and greedy tokens on ONNX Runtime")
    manifest["verification"]["not_verified"].append(
        "onnxruntime-genai was not run by this compile (tests/test_genai.py runs it where it is installed)")
