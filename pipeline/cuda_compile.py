"""The ort-cuda compile flow: export -> passes (checked against eager fp32 on ORT CPU, as for ort-cpu)
-> fp16 conversion (targets.ort_cuda.to_fp16) -> package. Needs no GPU: the fp16 graphs are checked
on ORT CPU against eager fp32 under BUDGETS["target-ort-cuda-fp16"] (cases and greedy tokens), each
judged by parity.compare_fp16 relative to PyTorch's own fp16 on the same inputs (pipeline.fp16_reference),
and the manifest says the package was not yet run on a GPU; `runtime/cuda_runtime.py verify-golden
--record` on a GPU machine completes it (records ORT version and providers in the manifest).

    from pipeline.cuda_compile import build_cuda_package   # from compile_package, after "load"
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from targets import ort_cuda
from targets.base import TargetProfile

from . import cuda_runtime, fp16_reference

from .golden import Golden, make_golden
from .package import make_tarball, staging, write_manifest
from .parity import FP16_RULE, compare_fp16, compare_fp16_greedy, write_reports
from .stages import StageRecord, StageRunner

GRAPHS = ("prefill", "decode")


def _moe_subgraph_router():
    # onnxruntime-gpu 1.31.1 (the CUDA build we run) has no com.microsoft.MoEGroupRouter; keep the exported
    # router (fp32 island) and feed its log-weights to com.microsoft.MoE, which every ORT build with MoE runs.
    from passes.moe_lowering import MoELoweringPass
    return MoELoweringPass("ort-fused", report_dropped=False, fused_router="subgraph")


# passes whose ort-cuda variant differs from passes.PASSES
CUDA_PASS_OVERRIDES = {"moe-ort-fused": _moe_subgraph_router}


def _fp16_cases(runner: StageRunner, rec: StageRecord, stage: str, d: Path, golden: Golden, session: dict,
                model, layout: str) -> None:
    """Golden cases through the fp16 graphs on ORT CPU (feeds cast to the graphs' dtypes), judged by
    compare_fp16 against eager fp32 relative to PyTorch fp16 on the same inputs."""
    so = cuda_runtime.session_options(session)
    sessions = {g: ort.InferenceSession(str(d / f"{g}.onnx"), so, providers=["CPUExecutionProvider"]) for g in GRAPHS}
    for case in golden.cases:
        sess = sessions[case.graph]
        types = {i.name: cuda_runtime._ORT_TYPES[i.type] for i in sess.get_inputs()}
        feeds = {n: np.asarray(a).astype(types[n], copy=False) for n, a in case.inputs.items()}
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        got = {n: got[n].astype(np.float32) for n in case.outputs}
        ref16 = fp16_reference.case_outputs(model, case.inputs, layout)
        runner.add_report(rec, compare_fp16(f"{stage}/{case.name}", case.outputs, got, ref16, logits_outputs=["logits"],
                                            reference_note=fp16_reference.NOTE))


def _fp16_tolerance(reports, stage: str) -> dict:
    """The golden section's per-output limits from the compare_fp16 reports (what `verify-golden`
    applies on the GPU: each output's atol/rtol, and the greedy near-tie allowance)."""
    cases: dict = {}
    greedy = None
    for r in reports:
        if not r.stage.startswith(f"{stage}/") or "fp16" not in r.extra:
            continue
        lims = {n: {"atol": e["limits"]["atol"], "rtol": e["limits"]["rtol"]} for n, e in r.extra["fp16"]["outputs"].items()}
        name = r.stage.split("/", 1)[1]
        if name == "greedy":
            greedy = lims.get("step_logits")
        else:
            cases[name] = lims
    return {"rule": FP16_RULE, "cases": cases, "greedy": greedy}


def cuda_cache_spec(cfg, layout: str) -> dict:
    from .compile import cache_spec
    spec = cache_spec(cfg, layout)
    spec["dtype"] = "float16"
    spec["bytes_per_token_per_layer"] = spec["values_per_token_per_layer"] * 2
    spec["bytes_per_token"] = spec["bytes_per_token_per_layer"] * cfg.num_hidden_layers
    return spec


def build_cuda_package(model, profile: TargetProfile, out: Path, *, force: bool, runner: StageRunner,
                       load: StageRecord, base_manifest: dict, seed: int, started: float, layout: str = "latent",
                       gen_tokens: int = 32) -> Path:
    """Everything after compile_package's "load" stage for target ort-cuda (quant "none" = fp16)."""
    from .compile import assemble_package, run_graph_stages

    cfg = model.config
    golden = make_golden(model, layout, gen_tokens=gen_tokens, seed=seed)
    session = ort_cuda.session_config()
    with tempfile.TemporaryDirectory(prefix="mlamoe-work-") as work_s, staging(out, force) as pkg:
        work = Path(work_s)

        prev, prev_dir = run_graph_stages(runner, model, load, golden, work, profile.passes, layout,
                                          factories=CUDA_PASS_OVERRIDES,
                                          pass_params={n: {"router": "subgraph"} for n in CUDA_PASS_OVERRIDES})
        runner.records.append(StageRecord("quantize", {"scheme": "none"}, dict(prev.outputs), dict(prev.outputs),
                                          notes=["scheme none: fp16 compute is the target stage's conversion"]))

        fp16_reports: dict[str, dict] = {}

        def do_target(d: Path, rec: StageRecord) -> None:
            for g in GRAPHS:
                r = ort_cuda.convert_graph_files(prev_dir / f"{g}.onnx", d / f"{g}.onnx")
                fp16_reports[g] = r.to_dict()
                rec.notes.append(f"{g}: fp16 " + json.dumps(r.to_dict(), sort_keys=True))
            rec.notes.append("no offline ORT optimisation: ORT applies its CUDA EP fusions at load on the GPU "
                             f"(session {session})")

        target_rec = runner.run(f"target/{profile.name}", {"target": profile.name, "precision": "fp16"},
                                prev.outputs, work / "target", do_target,
                                lambda d, rec: _fp16_cases(runner, rec, profile.parity_stage, d, golden, session,
                                                           model, layout))

        # ---- package ----------------------------------------------------------------------------------
        t = time.perf_counter()
        golden_section, io = assemble_package(pkg, work / "target", target_rec, Path(cuda_runtime.__file__), golden,
                                              profile, cfg.vocab_size, cuda_cache_spec(cfg, layout))
        manifest = {
            **base_manifest,
            "target": {"name": profile.name, "description": profile.description, "providers": list(profile.providers),
                       "provider_options": {"CUDAExecutionProvider": ort_cuda.cuda_provider_options()},
                       "session": session, "quantization": "none", "precision": "fp16",
                       "fp32_islands": ["Softmax", "RMSNorm statistics", "MoE router (gate projection to router_probs)",
                                        "TopK", "RoPE angles / cos / sin", "causal mask"],
                       "fp16_conversion": fp16_reports, "runtime": "runtime/cuda_runtime.py",
                       "io_binding": True, "cuda_graph": False, "verified_with": None},
            "io": io,
            "golden": golden_section,
        }
        rt = cuda_runtime.CudaPackageRuntime(pkg, device="cpu", manifest=manifest)
        tokens, step_logits = rt.generate(golden.prompt, golden.tokens.shape[1])
        gen = compare_fp16_greedy(f"{profile.parity_stage}/greedy", golden.tokens, golden.step_logits, tokens,
                                  step_logits, fp16_reference.forced_step_logits(model, golden.prompt, golden.tokens,
                                                                                 layout),
                                  reference_note=fp16_reference.NOTE)
        runner.add_report(target_rec, gen)
        golden_section["tolerance"].update(_fp16_tolerance(runner.reports, profile.parity_stage))
        write_reports(runner.reports, pkg / "reports")
        pkg_rec = StageRecord("package", {"tarball": True}, dict(target_rec.outputs))
        pkg_rec.seconds = round(time.perf_counter() - t, 3)
        runner.records.append(pkg_rec)
        manifest["stages"] = [r.to_dict() for r in runner.records]
        manifest["parity"] = {"passed": runner.binding_passed(), "reports": ["reports/parity.json", "reports/parity.md"]}
        manifest["verification"] = {
            "verified_here": [f"export and passes against eager fp32 PyTorch on ORT CPU (fp32 budgets)",
                              f"the fp16 graphs on ORT CPU {ort.__version__} (fp16 tensors, ops without an fp16 CPU "
                              f"kernel run in fp32 between casts) against eager fp32 within {profile.parity_stage}, "
                              "relative to PyTorch fp16 on the same inputs (README: fp16 judgement)",
                              f"greedy generation of {golden.tokens.shape[1]} tokens through runtime/cuda_runtime.py "
                              "(IOBinding code path, device cpu): " + (
                                  "equal to eager" if gen.extra["tokens"]["greedy"]["equal"]
                                  else gen.extra["tokens"]["greedy"]["reason"])],
            "not_verified": ["not yet run on a GPU: CUDAExecutionProvider kernels (fp16 GEMMs, com.microsoft.MoE) "
                             "are unchecked; run `python runtime/cuda_runtime.py verify-golden --record` on a "
                             "machine with onnxruntime-gpu"],
        }
        (pkg / "README.md").write_text(_readme(manifest, _fp16_lines(runner.reports, profile.parity_stage)))
        write_manifest(pkg, manifest)
        runner.progress(f"[package] {out} ({time.time() - started:.1f} s in all)")
    make_tarball(out, out.parent / f"{out.name}.tar.gz")
    return out


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
            line = (f"- `{r.stage}` `{o.name}`: {'PASS' if o.passed else 'FAIL'}: max abs {o.max_abs:.3g} (atol "
                    f"{lim['atol']:.3g}), cosine {o.cosine:.7g} (>= {lim['min_cosine']:.6g})")
            if ref is not None:
                line += f"; PyTorch fp16: max abs {ref['max_abs']:.3g}, cosine {ref['cosine']:.7g}"
            if "n_positions" in e:
                line += (f"; top-1 {e['top1_decisive']:.4g} on {e['n_decisive']} of {e['n_positions']} positions "
                         f"({e['n_near_ties']} near ties excluded, {e['n_near_tie_flips']} of them flipped)")
            out.append(line)
        t = r.extra.get("tokens", {}).get("greedy")
        if t is not None:
            out.append(f"- greedy: {t['n_equal_steps']} of {t['n_steps_reference']} tokens equal to eager fp32"
                       + ("" if t["equal"] else f" ({t['reason']})"))
    return out


def _readme(manifest: dict, fp16_lines: list[str]) -> str:
    m, t, io = manifest["model"], manifest["target"], manifest["io"]
    c = io["cache"]
    return "\n".join([
        f"# {m['source']} for ort-cuda", "",
        f"Compiled by mlamoe {manifest['mlamoe_version']} ({m['config']['model_type']}, {m['parameters']:,} "
        f"parameters). Target: {t['description']}.", "",
        "- `onnx/prefill.onnx`, `onnx/decode.onnx`: fp16 graphs; fp32 islands: " + ", ".join(t["fp32_islands"]) + ".",
        f"- `input_ids` int64 `[batch, seq]`; `past.{{layer}}.*` / `present.{{layer}}.*` **float16** ({c['layout']} "
        f"layout, {c['bytes_per_token']} bytes per token); `logits` float32.",
        "- `runtime/cuda_runtime.py`: greedy generation with IOBinding (the cache stays on the GPU between "
        "steps) and `verify-golden [--record]`; needs numpy + onnxruntime-gpu.",
        "- `golden/`: eager fp32 reference inputs/outputs; tolerance "
        f"atol {manifest['golden']['tolerance']['atol']} / rtol {manifest['golden']['tolerance']['rtol']} floors, "
        "per output in manifest.json (golden.tolerance.cases).", "",
        "## fp16 judgement", "",
        f"fp16 graphs vs eager fp32: {FP16_RULE}. PyTorch fp16 here is {fp16_reference.NOTE}: an independent "
        "measurement of the fp16 error this model has whatever runs it, so a deep model or a large logit scale "
        "widens the limits by what fp16 costs it, and a graph error beyond that fails. Numbers of this build "
        "(ORT CPU running the fp16 graphs):", "", *fp16_lines, "",
        "## Verification", "",
        *[f"- verified: {s}" for s in manifest["verification"]["verified_here"]],
        *[f"- **not verified**: {s}" for s in manifest["verification"]["not_verified"]], "",
    ])
