"""The ort-cuda build, after the core's `load` stage: export -> passes (checked against eager fp32 on ORT CPU,
as for ort-cpu) -> fp16 conversion (targets/ort_cuda/graphs.py to_fp16) -> package. Needs no GPU: the fp16 graphs are checked
on ORT CPU against eager fp32 under BUDGETS["target-ort-cuda-fp16"] (cases and greedy tokens), each
judged by parity.compare_fp16 relative to PyTorch's own fp16 on the same inputs (pipeline.fp16_reference),
and the manifest says the package was not yet run on a GPU; `runtime/cuda_runtime.py verify-golden
--record` on a GPU machine completes it (records ORT version and providers in the manifest).

`--quant int8` (targets/ort_cuda/graphs.py INT8_OPTIONS): a quantize stage (MatMulNBits 8-bit, fp16-exact scales;
checked on ORT CPU with fp32 activations against eager fp32 under BUDGETS["quantize-int8"]) before the fp16
conversion; the fp16 int8 graphs are judged against eager fp32 by compare_fp16 with quant_budget (BUDGETS
["target-ort-cuda-int8"]). golden/ then holds those graphs' own outputs on ORT CPU (what the GPU must reproduce,
within the fp16 limits), golden/fp32/ the eager fp32 reference with the int8 limits (the GPU test re-judges
the CUDA outputs against it).

`--quant int4` (targets/ort_cuda/graphs.py INT4_OPTIONS) is built the same way: the quantize stage (quantize_int4:
MatMulNBits 4-bit block 32 with zero points, attention linears 8-bit, QMoE 4-bit experts where CUDA takes them, all
scales fp16-exact; checked with fp32 activations under BUDGETS["quantize-int4"]), the fp16 graphs judged under
BUDGETS["target-ort-cuda-int4"] (quantize-int4 plus the fp16 limits).

`--quant fp8` (targets/ort_cuda/graphs.py FP8_OPTIONS) is built the same way: the quantize stage (passes/quant_fp8.py
then the CUDA form of passes/quant_fp8_cuda.py, checked with fp32 activations under BUDGETS["quantize-fp8"]),
the fp16 graphs judged under BUDGETS["target-ort-cuda-fp8"] (quantize-fp8 plus the fp16 limits).

    targets.ort_cuda.TARGET.build(ctx) -> build_cuda_package(ctx)   # pipeline/compile.py, after "load"
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from passes.fp16_rounding import rounding_twin
from pipeline import fp16_reference
from pipeline.build import (GRAPHS, BuildContext, RoutingProbe, assemble_package, check_quant_cases, family_passes,
                            moe_routers, run_cast, run_graph_stages, skipped_passes, write_tokenizer)
from pipeline.error_profile import write_error_profile
from pipeline.export import save_graph
from pipeline.golden import Golden, GoldenCase, choice_margins, make_golden, save_choice_margins, save_golden
from pipeline.io_spec import cache_spec
from pipeline.package import work_dir, write_manifest
from pipeline.parity import (BUDGETS, FP16_RULE, QUANT_FP16_RULE, compare_fp16, compare_fp16_greedy,
                             compare_fp16_routed, write_reports)
from pipeline.stages import StageRecord, StageRunner
from runtime import cuda_runtime

from . import gears as gears_mod
from .choice_forcing import record_case_choices
from . import graphs as ort_cuda


def _moe_subgraph_router():
    # onnxruntime-gpu 1.31.1 (the CUDA build we run) has no com.microsoft.MoEGroupRouter; keep the exported
    # router (fp32 island) and feed its log-weights to com.microsoft.MoE, which every ORT build with MoE runs.
    from passes.moe_lowering import MoELoweringPass
    return MoELoweringPass("ort-fused", report_dropped=False, fused_router="subgraph")


# passes whose ort-cuda variant differs from passes.PASSES
CUDA_PASS_OVERRIDES = {"moe-ort-fused": _moe_subgraph_router}
PROFILE_STAGE = "target-ort-cuda-fp16"  # the fp16 floors (BUDGETS), whatever the quantization
QUANT_STAGES = {"int8": "target-ort-cuda-int8", "int4": "target-ort-cuda-int4",
                "fp8": "target-ort-cuda-fp8"}  # judgement against eager fp32
INT8_STAGE = QUANT_STAGES["int8"]
INT8_EXPERTS_NOTE = {
    "channel": ("routed experts are com.microsoft.QMoE int8, one fp16 scale per expert output channel, raw layout "
                "(weights_prepacked=0), experts' activations fp16 (weight-only numerics), where moe_intermediate is a "
                f"multiple of {ort_cuda.CUDA_QMOE_INTER_MULTIPLE} (CUDA QMoE's requirement), else fp16 "
                "com.microsoft.MoE"),
    "none": "routed experts stay fp16 com.microsoft.MoE"}
INT4_EXPERTS_NOTE = ("routed experts are com.microsoft.QMoE 4-bit (expert_weight_bits 4, blocks of 32 along K with "
                     "zero points, fp16 scales, raw layout weights_prepacked=0, experts' activations fp16: weight-only "
                     f"numerics) where hidden and moe_intermediate are multiples of {ort_cuda.CUDA_QMOE_INTER_MULTIPLE} "
                     "(CUDA QMoE's requirement), else fp16 com.microsoft.MoE")
FP8_EXPERTS_NOTE = ("routed experts are fp16 com.microsoft.MoE (ORT has no FP8 MoE kernel): an FP8 checkpoint's "
                    "expert weights are dequantized, then rounded to fp16")


def _fp16_cases(runner: StageRunner, rec: StageRecord, *args, **kw) -> None:
    for report in fp16_case_reports(*args, **kw):
        runner.add_report(rec, report)


def fp16_case_reports(stage: str, d: Path, golden: Golden, session: dict, model, layout: str, reference_dir: Path,
                      quant_budget=None, results: dict | None = None) -> list:
    """Golden cases through the fp16 graphs on ORT CPU (their rounding twins: every fp16 tensor rounded, which ORT
    CPU's cast elision would otherwise skip; feeds cast to the graphs' dtypes), judged by
    compare_fp16 against eager fp32 relative to PyTorch fp16 on the same inputs (with quant_budget: a
    quantized graph, its budget added to the fp16 limits). A model with MoE layers is judged routing-aware
    (parity.compare_fp16_routed): the fp16 graphs compute with the gate logits of the fp32 graphs in
    `reference_dir` forced, their own routing flips judged apart. results: filled with {case: outputs} (fp32,
    the graphs routing by themselves: what the GPU must reproduce)."""
    so = cuda_runtime.session_options(session)
    routers = moe_routers(model)
    with tempfile.TemporaryDirectory(prefix="mlamoe-fp16-twin-") as tmp:
        twins = {}
        for g in GRAPHS:  # what ORT CPU runs: the fp16 graphs with every fp16 tensor rounded (passes/fp16_rounding.py)
            twins[g] = Path(tmp) / f"{g}.onnx"
            save_graph(rounding_twin(ir.load(d / f"{g}.onnx")), twins[g])
        probe = RoutingProbe(stage, twins, {g: reference_dir / f"{g}.onnx" for g in GRAPHS}, len(routers),
                             so) if routers else None
        sessions = {} if probe is not None else {
            g: ort.InferenceSession(str(twins[g]), so, providers=["CPUExecutionProvider"]) for g in GRAPHS}
        return _fp16_case_reports(stage, golden, model, layout, routers, probe, sessions, quant_budget, results)


def _fp16_case_reports(stage, golden, model, layout, routers, probe, sessions, quant_budget, results) -> list:
    reports = []
    for case in golden.cases:
        ref16 = fp16_reference.case_outputs(model, case.inputs, layout)
        kw = dict(logits_outputs=["logits"], budget=BUDGETS[PROFILE_STAGE], reference_note=fp16_reference.NOTE,
                  quant_budget=quant_budget)
        if probe is not None:
            r = probe.run(case)
            got = {n: r["unforced"][n] for n in case.outputs}
            report = compare_fp16_routed(f"{stage}/{case.name}", case.outputs, r["forced"], r["reference_gates"],
                                         r["actual_gates"], routers, ref16, unforced=r["unforced"],
                                         forced_router_probs=r["router_probs"], selections=r["selections"], **kw)
        else:
            got = run_cast(sessions[case.graph], case.inputs)
            got = {n: got[n].astype(np.float32) for n in case.outputs}
            report = compare_fp16(f"{stage}/{case.name}", case.outputs, got, ref16, **kw)
        if results is not None:
            results[case.name] = got
        reports.append(report)
    return reports


def _fp16_tolerance(reports, stage: str) -> dict:
    """The golden section's per-output limits from the compare_fp16 reports (what `verify-golden`
    applies on the GPU: each output's atol/rtol, and the greedy near-tie allowance): the fp16 part of the
    limits (for an int8 package, golden/ holds the int8 graphs' own outputs: the GPU reproduces them up
    to fp16 error)."""
    cases: dict = {}
    greedy = None
    for r in reports:
        if not r.stage.startswith(f"{stage}/") or "fp16" not in r.extra:
            continue
        lims = {n: {"atol": lim["atol"], "rtol": lim["rtol"]} for n, e in r.extra["fp16"]["outputs"].items()
                for lim in [e.get("fp16_limits") or e["limits"]]}
        name = r.stage.split("/", 1)[1]
        if name.startswith("gear"):  # the decode gears' own checks (gear{G}-decode, gears-greedy): build-time only
            continue
        if name == "greedy":
            greedy = lims.get("step_logits")
        else:
            cases[name] = lims
    return {"rule": FP16_RULE, "cases": cases, "greedy": greedy}


def _choice_limits(reports, stage: str) -> dict:
    """The golden tolerance's "choices": per kind of discrete choice (routing, selection), the largest margin the
    build's routing-aware judgements let a flip have (parity's FLIP_MARGIN_FACTOR x 2 x the most the stage moved those
    scores, the records' allowed_margin), summed over the quantize stage and the fp16 judgement `stage` for a quantized
    package (eager fp32 -> quantized graph -> fp16 on the GPU). verify_golden on the GPU compares the golden greedy
    trajectory's fp32 margins (golden.choice_margins) with these."""
    per_stage: dict[str, dict[str, float]] = {}
    for r in reports:
        top = r.stage.split("/", 1)[0]
        record = r.extra.get("routing") if isinstance(r.extra, dict) else None
        if not record or not (top == stage or top.startswith("quantize-")):
            continue
        lim = per_stage.setdefault(top, {"routing": 0.0, "selection": 0.0})
        for layer in record.get("layers", []):
            lim["routing"] = max(lim["routing"], float(layer.get("allowed_margin") or 0.0))
        for sel in (record.get("selection") or {}).get("selections", []):
            lim["selection"] = max(lim["selection"], float(sel.get("allowed_margin") or 0.0))
    return {k: sum(v[k] for v in per_stage.values()) for k in ("routing", "selection")}


def cuda_cache_spec(cfg, layout: str) -> dict:
    """The manifest's io.cache with the fp16 graphs' byte counts (models/cache.py's to_manifest is fp32)."""
    spec = cache_spec(cfg, layout)
    spec["dtype"] = "float16"
    if "layer_kinds" in spec:  # a per-layer spec: every byte count halves
        for kind in spec["layer_kinds"]:
            kind["bytes_per_token"] /= 2
            kind["bounded_bytes_per_batch_row"] //= 2
        spec["bytes_per_token"] /= 2
        spec["bounded_bytes_per_batch_row"] //= 2
        return spec
    spec["bytes_per_token_per_layer"] = spec["values_per_token_per_layer"] * 2
    spec["bytes_per_token"] = spec["bytes_per_token_per_layer"] * cfg.num_hidden_layers
    return spec


def build_cuda_package(ctx: BuildContext) -> None:
    """Everything after the core's "load" stage for target ort-cuda (quant "none" = fp16, "int8", "fp8")."""
    model, profile, runner, load, quant, seed = ctx.model, ctx.profile, ctx.runner, ctx.load, ctx.quant, ctx.seed
    out, pkg, started, layout, gen_tokens, tokenizer = (ctx.out, ctx.package, ctx.started, ctx.layout,
                                                        ctx.gen_tokens, ctx.tokenizer)
    base_manifest = ctx.base_manifest
    if quant not in profile.quant_schemes:
        raise ValueError(f"ort-cuda: quant {quant!r} not in {profile.quant_schemes}")
    quantized = quant != "none"
    stage = QUANT_STAGES[quant] if quantized else profile.parity_stage  # the judgement against eager fp32
    quant_budget = BUDGETS[f"quantize-{quant}"] if quantized else None
    options = {"int8": ort_cuda.INT8_OPTIONS, "int4": ort_cuda.INT4_OPTIONS, "fp8": ort_cuda.FP8_OPTIONS}.get(quant, {})
    cfg = model.config
    golden = make_golden(model, layout, gen_tokens=gen_tokens, seed=seed)
    session = ort_cuda.session_config()
    with work_dir(out) as work_s:
        work = Path(work_s)

        prev, prev_dir = run_graph_stages(runner, model, load, golden, work, family_passes(model, profile.passes),
                                          layout, factories=CUDA_PASS_OVERRIDES,
                                          pass_params={n: {"router": "subgraph"} for n in CUDA_PASS_OVERRIDES},
                                          skipped=skipped_passes(model, profile.passes))
        fp32_dir = prev_dir  # the fp32 graphs after the passes: the routing reference of the fp16 judgement
        if not quantized:
            runner.records.append(StageRecord("quantize", {"scheme": "none"}, dict(prev.outputs), dict(prev.outputs),
                                              notes=["scheme none: fp16 compute is the target stage's conversion"]))
        else:
            src_dir, prev_dir = prev_dir, work / f"quant-{quant}"

            def do_quant(d: Path, rec: StageRecord) -> None:
                import onnx_ir as ir

                summary = {}
                graphs = {}
                for g in GRAPHS:
                    m = graphs[g] = ir.load(src_dir / f"{g}.onnx")
                    report = (ort_cuda.quantize_int8(m) if quant == "int8" else ort_cuda.quantize_int4(m)
                              if quant == "int4" else ort_cuda.quantize_fp8(m, model))
                    save_graph(m, d / f"{g}.onnx")
                    summary[g] = report.to_dict()
                    rec.notes.append(f"{g}: " + report.summary())
                    rec.notes.extend(f"{g}: {n}" for n in report.notes)
                if quant == "int8":
                    rec.notes.append("checked here with fp32 activations (the same q and scales: MatMulNBits fp32 on "
                                     "ORT CPU); the target stage converts to fp16 (scales stored fp16 exactly)")
                    rec.notes.append(INT8_EXPERTS_NOTE[ort_cuda.INT8_OPTIONS["experts"]])
                elif quant == "int4":
                    rec.notes.append("checked here with fp32 activations (the same 4-bit codes, zero points and fp16-exact "
                                     "scales: MatMulNBits / QMoE fp32 on ORT CPU, accuracy_level 0, weight-only); the "
                                     "target stage converts to fp16 (scales stored fp16 exactly)")
                    rec.notes.append(INT4_EXPERTS_NOTE)
                else:
                    rec.notes.append("checked here with fp32 activations (the CUDA form, fp8 weights dequantized in "
                                     "fp32); the target stage rounds each dequantized weight once to fp16")
                    rec.notes.append(FP8_EXPERTS_NOTE)
                (d / "reports").mkdir()
                (d / "reports" / "quantization.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
                # where the error enters, per linear layer: the fp32-activation graphs (fp16 comes on top)
                feeds = next(c.inputs for c in golden.cases if c.name == "prefill")
                write_error_profile(ir.load(src_dir / "prefill.onnx"), graphs["prefill"], quant, feeds,
                                    d / "reports" / "error_profile.csv", **options)

            prev = runner.run("quantize", {"scheme": quant, **options}, prev.outputs, prev_dir, do_quant,
                              lambda d, rec: check_quant_cases(runner, rec, f"quantize-{quant}", model,
                                                               {g: d / f"{g}.onnx" for g in GRAPHS},
                                                               {g: src_dir / f"{g}.onnx" for g in GRAPHS}, golden))

        fp16_reports: dict[str, dict] = {}
        cpu_results: dict[str, dict] = {}

        def do_target(d: Path, rec: StageRecord) -> None:
            for g in GRAPHS:
                r = ort_cuda.convert_graph_files(prev_dir / f"{g}.onnx", d / f"{g}.onnx")
                fp16_reports[g] = r.to_dict()
                rec.notes.append(f"{g}: fp16 " + json.dumps(r.to_dict(), sort_keys=True))
            rec.notes.append("no offline ORT optimisation: ORT applies its CUDA EP fusions at load on the GPU "
                             f"(session {session})")

        target_rec = runner.run(f"target/{profile.name}", {"target": profile.name, "precision": "fp16", "quant": quant},
                                prev.outputs, work / "target", do_target,
                                lambda d, rec: _fp16_cases(runner, rec, stage, d, golden, session, model, layout,
                                                           fp32_dir, quant_budget=quant_budget, results=cpu_results))

        # ---- greedy generation through the runtime (IOBinding code path, device cpu) ----------------------
        t = time.perf_counter()
        tdir = work / "target"
        rt = cuda_runtime.CudaPackageRuntime(
            tdir, device="cpu", manifest={"io": {"vocab_size": cfg.vocab_size, "cache": cuda_cache_spec(cfg, layout),
                                                 "graphs": {g: {"file": f"{g}.onnx"} for g in GRAPHS}},
                                          "target": {"session": session}})
        tokens, step_logits = rt.generate(golden.prompt, golden.tokens.shape[1])
        del rt
        gen = compare_fp16_greedy(f"{stage}/greedy", golden.tokens, golden.step_logits, tokens, step_logits,
                                  fp16_reference.forced_step_logits(model, golden.prompt, golden.tokens, layout),
                                  reference_note=fp16_reference.NOTE, quant_budget=quant_budget,
                                  budget=BUDGETS[PROFILE_STAGE])
        # a quantized package's greedy tokens against eager fp32 are information (random-weight presets: a
        # routing near tie flipped by quantization diverges the rest), as for ort-cpu's quantized packages
        runner.add_report(target_rec, gen, binding=not quantized)
        gear_info = None
        gear_list = gears_mod.parse_gears(ctx.options.get("decode_gears"), cfg.max_position_embeddings)
        if gear_list:
            gear_info = _gear_stage(runner, model, load, golden, work, gear_list, stage, session, layout, tokens)
        expected = golden  # what the packaged graphs must reproduce on the GPU
        if quantized:
            expected = Golden([GoldenCase(c.name, c.graph, c.inputs, {k: cpu_results[c.name][k] for k in c.outputs})
                               for c in golden.cases], golden.prompt, tokens, step_logits)

        # ---- package ----------------------------------------------------------------------------------
        gear_graphs = {} if gear_info is None else {
            f"{gears_mod.gear_name(g)}.onnx": work / "gears" / f"{gears_mod.gear_name(g)}.onnx" for g in gear_info["gears"]}
        golden_section, io = assemble_package(pkg, tdir, target_rec, Path(cuda_runtime.__file__), expected,
                                              profile, cfg.vocab_size, cuda_cache_spec(cfg, layout),
                                              extra_graphs=gear_graphs)
        golden_section["tolerance"].update(_fp16_tolerance(runner.reports, stage))
        margins = choice_margins(model, expected.prompt, expected.tokens)
        if any(a.size for a in margins.values()):
            golden_section["tolerance"]["choices"] = _choice_limits(runner.reports, stage)
            golden_section["greedy"]["choice_margins"] = save_choice_margins(margins, pkg / "golden", pkg)
            record_case_choices(pkg, golden_section, {g: spec["file"] for g, spec in io["graphs"].items()})
        if gear_info is not None:
            io["decode_gears"] = _package_gears(pkg, work / "gears", gear_info, io["weights"])
        if quantized:
            if (prev_dir / "reports").is_dir():
                shutil.copytree(prev_dir / "reports", pkg / "reports")
            ref = save_golden(golden, pkg / "golden" / "fp32", pkg)
            ref["stage"], ref["rule"] = stage, QUANT_FP16_RULE
            ref["limits"] = {r.stage.split("/", 1)[1]: {n: e["limits"] for n, e in r.extra["fp16"]["outputs"].items()}
                             for r in runner.reports if r.stage.startswith(f"{stage}/") and "fp16" in r.extra}
            ref["note"] = (f"eager fp32 PyTorch outputs; the {quant} package is judged against them with these limits "
                           f"(quantize-{quant} budget + fp16 limits; elementwise and top-1 not judged)")
            golden_section["fp32_reference"] = ref
        manifest = {
            **base_manifest,
            "target": {"name": profile.name, "description": profile.description, "providers": list(profile.providers),
                       "provider_options": {"CUDAExecutionProvider": ort_cuda.cuda_provider_options()},
                       "session": session, "quantization": quant, "precision": "fp16",
                       **({"quantization_options": dict(options),
                           "routed_experts": (INT8_EXPERTS_NOTE[ort_cuda.INT8_OPTIONS["experts"]] if quant == "int8"
                                              else INT4_EXPERTS_NOTE if quant == "int4" else FP8_EXPERTS_NOTE),
                           "routed_expert_ops": _op_counts(pkg / "onnx" / "decode.onnx", ("QMoE", "MoE"))}
                          if quantized else {}),
                       "fp32_islands": ["Softmax", "RMSNorm statistics", "MoE router (gate projection to router_probs)",
                                        "TopK", "RoPE angles / cos / sin", "causal mask"],
                       "fp16_conversion": fp16_reports, "runtime": "runtime/cuda_runtime.py",
                       "io_binding": True, "cuda_graph": gear_info is not None, "verified_with": None},
            "io": io,
            "golden": golden_section,
        }
        write_reports(runner.reports, pkg / "reports")
        pkg_rec = StageRecord("package", {"tarball": True}, dict(target_rec.outputs))
        pkg_rec.seconds = round(time.perf_counter() - t, 3)
        runner.records.append(pkg_rec)
        manifest["stages"] = [r.to_dict() for r in runner.records]
        manifest["parity"] = {"passed": runner.binding_passed(), "reports": ["reports/parity.json", "reports/parity.md"]}
        greedy = gen.extra["tokens"]["greedy"]
        if not quantized:
            verified = [f"export and passes against eager fp32 PyTorch on ORT CPU (fp32 budgets)",
                        f"the fp16 graphs on ORT CPU {ort.__version__} (fp16 tensors, ops without an fp16 CPU "
                        f"kernel run in fp32 between casts) against eager fp32 within {profile.parity_stage}, "
                        "relative to PyTorch fp16 on the same inputs (README: fp16 judgement)",
                        f"greedy generation of {golden.tokens.shape[1]} tokens through runtime/cuda_runtime.py "
                        "(IOBinding code path, device cpu): " + (
                            "equal to eager" if greedy["equal"] else greedy["reason"])]
            not_verified = ["not yet run on a GPU: CUDAExecutionProvider kernels (fp16 GEMMs, com.microsoft.MoE) "
                            "are unchecked; run `python runtime/cuda_runtime.py verify-golden --record` on a "
                            "machine with onnxruntime-gpu"]
        elif quant == "int8":
            verified = ["export and passes against eager fp32 PyTorch on ORT CPU (fp32 budgets)",
                        "the int8 graphs with fp32 activations (the same int8 weights and scales) against eager fp32 "
                        "within quantize-int8 (cosine/KL/rel euclid; elementwise not judged)",
                        f"the fp16 int8 graphs (MatMulNBits bits 8, fp16 activations and scales) on ORT CPU "
                        f"{ort.__version__} against eager fp32 within {INT8_STAGE} (quantize-int8 budget plus the fp16 "
                        "limits from PyTorch fp16 on the same inputs; README: int8 judgement)",
                        f"greedy generation of {golden.tokens.shape[1]} tokens through runtime/cuda_runtime.py "
                        f"(IOBinding code path, device cpu): {greedy['n_equal_steps']} of {greedy['n_steps_reference']} "
                        "tokens equal to eager fp32 (information; golden/ holds these graphs' own tokens)"]
            not_verified = ["not yet run on a GPU: CUDAExecutionProvider kernels (MatMulNBits 8-bit and QMoE int8 "
                            "with fp16 activations, fp16 GEMMs) are unchecked; the GPU run completes "
                            "verification: `python runtime/cuda_runtime.py verify-golden --record` on a machine with "
                            "onnxruntime-gpu (reproduces golden/, the int8 graphs' ORT CPU outputs, within the fp16 "
                            "limits); golden/fp32/ holds eager fp32 and the int8 limits to judge the GPU against",
                            "the accuracy of int8 on this model's real task: random-weight presets say nothing about it; "
                            "see the trained-small figures in the repository README"]
        elif quant == "int4":
            verified = ["export and passes against eager fp32 PyTorch on ORT CPU (fp32 budgets)",
                        "the int4 graphs with fp32 activations (the same 4-bit codes, zero points and fp16-exact scales; "
                        "attention and dense-layer MLP linears 8-bit) against eager fp32 within quantize-int4 (cosine/KL/rel euclid; "
                        "elementwise not judged)",
                        f"the fp16 int4 graphs (MatMulNBits bits 4 block {ort_cuda.INT4_OPTIONS['block_size']} with "
                        "uint8 zero points and bits 8 for attention and the dense-layer MLP, QMoE 4-bit where present, fp16 activations and "
                        f"scales) on ORT CPU {ort.__version__} against eager fp32 within {stage} (quantize-int4 budget "
                        "plus the fp16 limits from PyTorch fp16 on the same inputs; README: int4 judgement)",
                        f"greedy generation of {golden.tokens.shape[1]} tokens through runtime/cuda_runtime.py "
                        f"(IOBinding code path, device cpu): {greedy['n_equal_steps']} of {greedy['n_steps_reference']} "
                        "tokens equal to eager fp32 (information; golden/ holds these graphs' own tokens)"]
            not_verified = ["not yet run on a GPU: CUDAExecutionProvider kernels (MatMulNBits 4-bit with zero points "
                            "and 8-bit, QMoE 4-bit block-wise with fp16 activations, fp16 GEMMs) are unchecked; the GPU "
                            "run completes verification: `mlamoe verify` (or `python runtime/cuda_runtime.py "
                            "verify-golden --record`) on a machine with onnxruntime-gpu (reproduces golden/, the int4 "
                            "graphs' ORT CPU outputs, within the fp16 limits); golden/fp32/ holds eager fp32 and the "
                            "int4 limits to judge the GPU against (benchmarks/gpu/int4_cuda.sh)",
                            "speed on the GPU against the fp16 and int8 packages: not measured at build time "
                            "(benchmarks/gpu/int4_cuda.sh measures decode ms/token)",
                            "the accuracy of int4 on this model's real task: random-weight presets say nothing about it; "
                            "see the trained-small figures in the repository README"]
        else:
            verified = ["export and passes against eager fp32 PyTorch on ORT CPU (fp32 budgets)",
                        "the fp8 graphs with fp32 activations (E4M3 128x128-block weights, dequantized by per-tensor "
                        "DequantizeLinear x block scales) against eager fp32 within quantize-fp8 (cosine/KL/rel "
                        "euclid; elementwise not judged)",
                        f"the fp16 fp8 graphs (each weight dequantized in fp32, rounded once to fp16, fp16 GEMMs) on "
                        f"ORT CPU {ort.__version__} against eager fp32 within {stage} (quantize-fp8 budget plus the "
                        "fp16 limits from PyTorch fp16 on the same inputs; README: fp8 judgement)",
                        f"greedy generation of {golden.tokens.shape[1]} tokens through runtime/cuda_runtime.py "
                        f"(IOBinding code path, device cpu): {greedy['n_equal_steps']} of {greedy['n_steps_reference']} "
                        "tokens equal to eager fp32 (information; golden/ holds these graphs' own tokens)"]
            not_verified = ["not yet run on a GPU: CUDAExecutionProvider kernels (fp8 DequantizeLinear, fp16 GEMMs, "
                            "com.microsoft.MoE) are unchecked; the GPU run completes verification: `python "
                            "runtime/cuda_runtime.py verify-golden --record` on a machine with onnxruntime-gpu "
                            "(reproduces golden/, the fp8 graphs' ORT CPU outputs, within the fp16 limits); "
                            "golden/fp32/ holds eager fp32 and the fp8 limits to judge the GPU against",
                            "speed: every weight is dequantized on every run before an fp16 GEMM (no FP8 GEMM in ORT); "
                            "fp8 saves weight memory, it is not expected to be faster than fp16",
                            "the accuracy of fp8 on this model's real task: random-weight presets say nothing about it; "
                            "see the trained-small figures in the repository README"]
        if gear_info is not None:
            gi = io["decode_gears"]
            verified.append(f"decode gears {gi['gears']} (fixed-shape fp16 graphs, onnx/decode_g*.onnx) on ORT CPU: the "
                            f"golden decode case through every gear (its fp16 rounding twin) against eager fp32 within "
                            f"{profile.parity_stage} (the whole gear buffer: rows after the written one must stay zero; "
                            "routing-aware: the fp32 traced step's gate logits and any indexer selection scores forced, "
                            "flips judged apart), and greedy generation "
                            "through runtime/cuda_runtime.py GearDecoder (dynamic prefill, pad into the gear, in-place "
                            f"row writes, gear switches at {gi['greedy_check'].get('gears_used')}): "
                            + ("equal to the dynamic runtime's tokens" if gi["greedy_check"].get("equal_to_dynamic")
                               else "DIFFERENT from the dynamic runtime's tokens (see reports)"))
            not_verified.append("CUDA graph capture and replay of the decode gears (enable_cuda_graph) and the in-place "
                                "binding on the CUDA EP: run `mlamoe verify` on a GPU (greedy through the gears too) "
                                "and benchmarks/gpu/cuda_graph.sh for their speed")
        manifest["verification"] = {"verified_here": verified, "not_verified": not_verified}
        write_tokenizer(pkg, tokenizer or {})
        (pkg / "README.md").write_text(_readme(manifest, _fp16_lines(runner.reports, stage)))
        write_manifest(pkg, manifest)
        runner.progress(f"[package] {out} ({time.time() - started:.1f} s in all)")


REFERENCE_DIR = "fp32"  # the gear stage's fp32 traced steps (check_gear_decode's routing reference)


class _GearCase:
    """One batch row of the golden decode case as a gear's feeds (RoutingProbe.run's case)."""

    def __init__(self, inputs: dict):
        self.graph, self.inputs = "gear", inputs


def check_gear_decode(path: Path, gear: int, case, ref16: dict, names: list[str], stage: str, session: dict,
                      model=None, reference: Path | None = None):
    """The golden decode case through one gear graph on ORT CPU, each batch row alone (the gears are batch 1) at its
    position P, its cache padded with zero rows to the gear: logits and the whole present buffer (rows 0..P against
    eager fp32's present, rows after P must stay zero) judged by compare_fp16 relative to PyTorch fp16. What runs is
    the gear's rounding twin (passes/fp16_rounding.py: every fp16 tensor rounded, which ORT CPU's cast elision would
    otherwise skip), as for the dynamic graphs. With `model` (a MoE model) and `reference` (the gear's fp32 traced
    step, gears.trace_gear) the judgement is routing-aware as the dynamic graphs' (compare_fp16_routed over
    pipeline/build.py RoutingProbe): the reference's gate logits and indexer scores forced into the gear, the gear's
    own routing and selection flips judged apart; the unforced outputs are recorded. -> report."""
    from models.static_lm import MASK_VALUE
    P = int(case.inputs[names[0]].shape[1])
    outs = [n.replace("past.", "present.", 1) for n in names]
    so = cuda_runtime.session_options(session)
    routers = moe_routers(model) if model is not None and reference is not None else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlamoe-gear-twin-") as tmp:
        twin = Path(tmp) / path.name
        save_graph(rounding_twin(ir.load(path)), twin)
        probe = RoutingProbe(stage, {"gear": twin}, {"gear": reference}, len(routers), so) if routers else None
        sess = None if probe else ort.InferenceSession(str(twin), so, providers=["CPUExecutionProvider"])
        for b in range(case.inputs["input_ids"].shape[0]):
            feeds = {"input_ids": case.inputs["input_ids"][b:b + 1].astype(np.int32),
                     "position": np.array([P], np.int32)}
            for n in names:
                a = np.zeros((1, gear, case.inputs[n].shape[2]), np.float32)
                a[:, :P] = case.inputs[n][b:b + 1]
                feeds[n] = a
            rows.append(probe.run(_GearCase(feeds)) if probe else {"unforced": run_cast(sess, feeds)})
        del probe, sess

    def padded(a):
        z = np.zeros(a.shape[:1] + (gear,) + a.shape[2:], np.float32)
        z[:, :a.shape[1]] = a
        return z

    def cat(run: str) -> dict:
        return {o: np.concatenate([r[run][o] for r in rows]).astype(np.float32) for o in ["logits", *outs]}
    expected = {"logits": case.outputs["logits"], **{o: padded(case.outputs[o]) for o in outs}}
    ref = {"logits": ref16["logits"], **{o: padded(ref16[o]) for o in outs},
           **{k: v for k, v in ref16.items() if k.startswith("routing.")}}
    kw = dict(logits_outputs=["logits"], budget=BUDGETS[PROFILE_STAGE], reference_note=fp16_reference.NOTE)
    if not routers:
        return compare_fp16(stage, expected, cat("unforced"), ref, **kw)
    per_layer = {k: [np.concatenate([r[k][i] for r in rows]) for i in range(len(routers))]
                 for k in ("reference_gates", "actual_gates", "router_probs")}
    selections = None
    if rows[0]["selections"] is not None:
        selections = {k: [np.concatenate([r["selections"][k][j] for r in rows])
                          for j in range(len(rows[0]["selections"][k]))] for k in rows[0]["selections"]}
        # the fixed-shape step masks the keys after the position with MASK_VALUE (finite, exact in both graphs),
        # the dynamic graphs with -inf: masked keys are left out of the selection's judgement as there
        selections["reference_scores"] = [np.where(s == MASK_VALUE, -np.inf, s) for s in selections["reference_scores"]]
    return compare_fp16_routed(stage, expected, cat("forced"), per_layer["reference_gates"], per_layer["actual_gates"],
                               routers, ref, unforced=cat("unforced"), forced_router_probs=per_layer["router_probs"],
                               selections=selections, **kw)


def _gear_stage(runner: StageRunner, model, load: StageRecord, golden: Golden, work: Path, gear_list, stage: str,
                session: dict, layout: str, dynamic_tokens) -> dict:
    """The decode gears (targets/ort_cuda/gears.py) as stage target/ort-cuda-gears: export + fp16 + in-place
    row write per gear, one shared weights file, a pad graph per gear (and the fp32 traced step per gear in fp32/,
    not packaged); checked on ORT CPU: the golden decode case through every gear (each batch row at its position,
    the cache padded with zeros to the gear) against eager fp32 with the fp16 judgement, routing- and
    selection-aware as the dynamic graphs (check_gear_decode), and greedy
    generation through runtime/cuda_runtime.py GearDecoder (dynamic prefill, then the gears, switching gear where
    the position reaches one) against eager fp32's tokens. -> what the package records."""
    from models.static_lm import static_cache_spec
    cfg = model.config
    need = golden.prompt.shape[1] + golden.tokens.shape[1] - 1  # positions the golden greedy run decodes at
    if max(gear_list) <= need - 1:
        raise gears_mod.GearError(f"--decode-gears {','.join(map(str, gear_list))}: the largest gear must hold the "
                                  f"golden greedy generation (prompt {golden.prompt.shape[1]} + "
                                  f"{golden.tokens.shape[1]} tokens: positions up to {need - 1}); add a gear > {need - 1}")
    spec = static_cache_spec(cfg)
    names = spec.input_names()
    reports: dict[int, dict] = {}

    def do_gears(d: Path, rec: StageRecord) -> None:
        graphs = {}
        for g in gear_list:
            runner.live.update(f"tracing decode gear {g}")
            m = gears_mod.trace_gear(model, g)
            # the fp32 step as traced: the routing / selection reference of the check (not packaged)
            save_graph(ir.from_proto(ir.to_proto(m)), d / REFERENCE_DIR / f"{gears_mod.gear_name(g)}.onnx")
            m, rep = gears_mod.convert_gear(m, g)
            graphs[gears_mod.gear_name(g)] = m
            rec.notes.append(f"gear {g}: {rep.cache_writes} cache writes as in-place row ScatterND; "
                             f"{rep.rmsnorm_div} RMSNorms spelled x / Sqrt (ORT fuses each into "
                             f"SimplifiedLayerNormalization), {rep.rotary_fused} RoPEs as com.microsoft.RotaryEmbedding; "
                             "fp16 " + json.dumps(rep.fp16, sort_keys=True))
        gears_mod.save_gears(graphs, d)
        widths = gears_mod.cache_widths(spec, names)
        import onnx
        for g in gear_list:
            onnx.save_model(gears_mod.pad_graph(names, widths, g), str(d / f"{gears_mod.pad_name(g)}.onnx"))

    def check(d: Path, rec: StageRecord) -> None:
        case = next(c for c in golden.cases if c.name == "decode")
        ref16 = fp16_reference.case_outputs(model, case.inputs, layout)
        P = int(case.inputs[names[0]].shape[1])
        outs = [n.replace("past.", "present.", 1) for n in names]
        for g in gear_list:
            if P >= g:
                rec.notes.append(f"gear {g}: the golden decode case's position {P} does not fit; case not run")
                continue
            rep = check_gear_decode(d / f"{gears_mod.gear_name(g)}.onnx", g, case, ref16, names,
                                    f"{stage}/gear{g}-decode", session, model=model,
                                    reference=d / REFERENCE_DIR / f"{gears_mod.gear_name(g)}.onnx")
            runner.add_report(rec, rep)
        manifest = {"io": {"vocab_size": cfg.vocab_size,
                           "graphs": {g: {"file": f"target/{g}.onnx"} for g in GRAPHS},
                           "decode_gears": {"gears": list(gear_list), "batch": gears_mod.GEAR_BATCH,
                                            "graphs": {str(g): {"file": f"gears/{gears_mod.gear_name(g)}.onnx",
                                                                "pad_file": f"gears/{gears_mod.pad_name(g)}.onnx"}
                                                       for g in gear_list}}},
                    "target": {"session": session}}
        rt = cuda_runtime.CudaPackageRuntime(work, device="cpu", manifest=manifest)
        dec = cuda_runtime.GearDecoder(rt)
        tokens, step_logits = dec.generate(golden.prompt, golden.tokens.shape[1])
        switched = sorted(dec.state)
        del dec, rt
        gen = compare_fp16_greedy(f"{stage}/gears-greedy", golden.tokens, golden.step_logits, tokens, step_logits,
                                  fp16_reference.forced_step_logits(model, golden.prompt, golden.tokens, layout),
                                  reference_note=fp16_reference.NOTE, budget=BUDGETS[PROFILE_STAGE])
        runner.add_report(rec, gen)
        same = bool(np.array_equal(tokens, dynamic_tokens))
        rec.notes.append(f"greedy through GearDecoder (ORT CPU, in place, gears used {switched}): "
                         f"{'equal to' if same else 'DIFFERENT from'} the dynamic runtime's tokens")
        reports["greedy"] = {"gears_used": switched, "equal_to_dynamic": same}

    rec = runner.run("target/ort-cuda-gears", {"gears": list(gear_list), "batch": gears_mod.GEAR_BATCH,
                                               "form": "static-gather MoE, in-place ScatterND row write, fp16",
                                               "check": "rounding twin, routing and selection forced from the fp32 "
                                                        f"traced step ({REFERENCE_DIR}/)"},
                     dict(load.inputs), work / "gears", do_gears, check)
    return {"gears": list(gear_list), "record": rec, "spec": spec, "names": names, **reports}


def _package_gears(pkg: Path, gear_dir: Path, info: dict, weights: dict) -> dict:
    """Copy the pad graphs into onnx/ (assemble_package saved the gear graphs over the package's weights file);
    -> the manifest's io.decode_gears section."""
    from pipeline.io_spec import graph_io
    for g in info["gears"]:
        rel = f"{gears_mod.pad_name(g)}.onnx"
        shutil.copyfile(gear_dir / rel, pkg / "onnx" / rel)
    spec = info["spec"]
    graphs = {}
    for g in info["gears"]:
        f = f"onnx/{gears_mod.gear_name(g)}.onnx"
        graphs[str(g)] = {"file": f, "pad_file": f"onnx/{gears_mod.pad_name(g)}.onnx",
                          "cache_bytes": gears_mod.gear_memory(spec, g), **graph_io(pkg / f)}
    return {"gears": info["gears"], "batch": gears_mod.GEAR_BATCH, "graphs": graphs,
            "weights_file": weights["file"], "weights_bytes": weights["bytes"],
            "cache_write": "in place: present.* bound to the past.* buffers, one ScatterND row per cache tensor",
            "cuda_graph": "enable_cuda_graph per gear session (runtime/cuda_runtime.py GearDecoder)",
            "prefill": "the dynamic onnx/prefill.onnx, its cache padded into the gear on the device (pad graph)",
            "greedy_check": info.get("greedy", {})}


def _gear_lines(io: dict) -> list[str]:
    """The package README's decode-gears section (empty without gears)."""
    gi = io.get("decode_gears")
    if not gi:
        return []
    mib = 1024 * 1024
    return ["## Decode gears (CUDA graphs)", "",
            f"`onnx/decode_g{{G}}.onnx` for G in {gi['gears']}: fixed-shape fp16 decode graphs (batch {gi['batch']}, "
            "`input_ids` int32 [1, 1], `position` int32 [1], `past.*`/`present.*` fp16 [1, G, w], `logits` fp32 "
            "[1, 1, V]) over a cache preallocated at G rows; the step writes its row in place (one ScatterND per cache "
            "tensor, present bound to the same buffer as past), the MoE is the static-gather form, so that ONNX Runtime "
            "can capture each gear as a CUDA graph (not checked here: see Verification). The gears and the dynamic graphs share one "
            f"weights file, `{gi['weights_file']}` ({gi['weights_bytes'] / mib:.2f} MiB; each gear session holds its own "
            "device copy of the weights). `onnx/pad_g{G}.onnx` pads a cache into gear G on the device (after the dynamic prefill, "
            "and at a gear switch).", "",
            "| gear (cache rows) | preallocated fp16 cache |", "|---|---|",
            *[f"| {g} | {gi['graphs'][str(g)]['cache_bytes'] / mib:.2f} MiB ({gi['graphs'][str(g)]['cache_bytes']:,} bytes) |"
              for g in gi["gears"]], "",
            "Run: `python runtime/cuda_runtime.py generate --prompt-ids 1,2,3` (on the GPU the gears are used when the "
            "generation fits the largest; `--gears` / `--no-gears` choose): the prompt through "
            "`onnx/prefill.onnx`, then the smallest gear longer than it, switching up a gear when the position reaches "
            "one; a position past the largest gear is an error). Buffers of a gear are allocated on first use and kept "
            "(a captured graph holds their addresses): the cache memory is the sum over the gears used.", ""]


def _op_counts(path: Path, ops) -> dict:
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    return {op: sum(n.op_type == op for n in m.graph.node) for op in ops}


def _fp16_lines(reports, stage: str) -> list[str]:
    """The package README's account of each compare_fp16 report: limits, the fp16 reference, near ties."""
    out = []
    for r in reports:
        if not r.stage.startswith(f"{stage}/") or "fp16" not in r.extra:
            continue
        cache = [o for o in r.outputs if o.name.startswith("present.")]
        if cache:
            worst = max(cache, key=lambda o: o.max_abs or 0.0)
            out.append(f"- `{r.stage}` cache outputs (present.*): {sum(o.passed for o in cache)} of {len(cache)} pass, "
                       f"worst max abs {worst.max_abs:.3g} (`{worst.name}`), worst cosine "
                       f"{min(o.cosine for o in cache):.7g}")
        for o in r.outputs:
            e = r.extra["fp16"]["outputs"].get(o.name)
            if e is None or o.name.startswith("present."):
                continue
            lim, ref = e["limits"], e["fp16_reference"]
            atol = "not judged" if lim["atol"] is None else f"atol {lim['atol']:.3g}"
            line = (f"- `{r.stage}` `{o.name}`: {'PASS' if o.passed else 'FAIL'}: max abs {o.max_abs:.3g} ({atol}), "
                    f"cosine {o.cosine:.7g} (>= {lim['min_cosine']:.6g})")
            if lim.get("max_kl") is not None and o.kl is not None:
                line += f", KL {o.kl:.3g} (<= {lim['max_kl']:.3g})"
            if lim.get("max_rel_euclid") is not None and o.rel_euclid is not None:
                line += f", rel euclid {o.rel_euclid:.3g} (<= {lim['max_rel_euclid']:.3g})"
            if ref is not None:
                line += f"; PyTorch fp16: max abs {ref['max_abs']:.3g}, cosine {ref['cosine']:.7g}"
            if "n_positions" in e:
                line += (f"; top-1 {e['top1_decisive']:.4g} on {e['n_decisive']} of {e['n_positions']} positions "
                         f"({e['n_near_ties']} near ties excluded, {e['n_near_tie_flips']} of them flipped)")
            out.append(line)
        t = r.extra.get("tokens", {}).get("greedy")
        if t is not None:
            out.append(f"- greedy: {t['n_equal_steps']} of {t['n_steps_reference']} tokens equal to eager fp32"
                       + ("" if t["equal"] else f" ({t['reason']})") + ("" if t["binding"] else " (information)"))
    return out


def _readme(manifest: dict, fp16_lines: list[str]) -> str:
    m, t, io = manifest["model"], manifest["target"], manifest["io"]
    c = io["cache"]
    q = t["quantization"]
    what = {"int8": ("linear layers except lm_head and the router gate are `com.microsoft.MatMulNBits` (bits 8, fp16 "
                     "scales rounded before quantizing)"),
            "int4": ("linear layers except lm_head and the router gate are `com.microsoft.MatMulNBits` (bits 4, RTN, "
                     "blocks along K with uint8 zero points, fp16 scales rounded before quantizing; the attention "
                     "linears and the MLP of the dense layers before the first MoE layer bits 8, symmetric, blocks of "
                     "128); fp16 activations (weight-only: CUDA's MatMulNBits "
                     "dequantizes in the kernel)"),
            "fp8": ("linear layers except lm_head and the router gate hold float8e4m3fn weights with fp32 128x128 "
                    "block scales (DeepSeek-V3's format; an FP8 checkpoint's own bytes), dequantized on every run by "
                    "a per-tensor `DequantizeLinear` x block scales in fp32, rounded once to fp16 for the fp16 GEMM "
                    "(weight-only; no FP8 GEMM in ORT)")}
    return "\n".join([
        f"# {m['source']} for ort-cuda", "",
        f"Compiled by mlamoe {manifest['mlamoe_version']} ({m['config']['model_type']}, {m['parameters']:,} "
        f"parameters). Target: {t['description']}.", "",
        "- `onnx/prefill.onnx`, `onnx/decode.onnx`: fp16 graphs; fp32 islands: " + ", ".join(t["fp32_islands"]) + ".",
        f"- `input_ids` int64 `[batch, seq]`; `past.{{layer}}.*` / `present.{{layer}}.*` **float16** ({c['layout']} "
        f"layout, {c['bytes_per_token']} bytes per token); `logits` float32.",
        "- `runtime/cuda_runtime.py`: greedy generation with IOBinding (the cache stays on the GPU between "
        "steps) and `verify-golden [--record]`; needs numpy + onnxruntime-gpu.",
        *(["- `golden/`: eager fp32 reference inputs/outputs; tolerance "
           f"atol {manifest['golden']['tolerance']['atol']} / rtol {manifest['golden']['tolerance']['rtol']} floors, "
           "per output in manifest.json (golden.tolerance.cases).", ""] if q == "none" else
          [f"- `golden/`: inputs and the {q} fp16 graphs' own outputs and greedy tokens on ORT CPU (what the GPU "
           "must reproduce, within the fp16 limits per output in manifest.json golden.tolerance.cases); "
           f"`golden/fp32/`: eager fp32 outputs, with the {q} limits in golden.fp32_reference.limits.",
           f"- {q}: {'; '.join(f'{k} {v}' for k, v in t['quantization_options'].items())}: {what[q]}; "
           f"{t['routed_experts']} (this model's decode graph: "
           + ", ".join(f"{v} {k}" for k, v in t["routed_expert_ops"].items()) + "); embeddings, norms, lm_head fp16, "
           "router fp32.",
           "- `reports/quantization.json` (weight bytes before/after per layer), `reports/error_profile.csv` (and "
           ".png where matplotlib is installed): per linear layer, the error of the fp32-activation quantized graph "
           "against fp32 on the prefill case (the fp16 error comes on top).", "",
           f"## {q} judgement", "",
           f"{q} fp16 graphs vs eager fp32: {QUANT_FP16_RULE}. The quantization part is BUDGETS['quantize-{q}'] "
           f"(a random-weight model's routing near ties, flipped by {q}, make elementwise and top-1 rules say "
           "nothing); the fp16 part is the fp16 judgement's limits: each max(floor, 4 x the error of "
           f"{fp16_reference.NOTE}). Numbers of this build (ORT CPU running the {q} fp16 graphs):", "",
           *fp16_lines, ""]),
        *(["## fp16 judgement", "",
           f"fp16 graphs vs eager fp32: {FP16_RULE}. PyTorch fp16 here is {fp16_reference.NOTE}: an independent "
           "measurement of the fp16 error this model has whatever runs it, so a deep model or a large logit scale "
           "widens the limits by what fp16 costs it, and a graph error beyond that fails. Numbers of this build "
           "(ORT CPU running the fp16 graphs):", "", *fp16_lines, ""] if q == "none" else []),
        *_gear_lines(io),
        "## Verification", "",
        *[f"- verified: {s}" for s in manifest["verification"]["verified_here"]],
        *[f"- **not verified**: {s}" for s in manifest["verification"]["not_verified"]], "",
    ])
