"""The ort-cuda compile flow: export -> passes (checked against eager fp32 on ORT CPU, as for ort-cpu)
-> fp16 conversion (targets.ort_cuda.to_fp16) -> package. Needs no GPU: the fp16 graphs are checked
on ORT CPU against eager fp32 under BUDGETS["target-ort-cuda-fp16"] (cases and greedy tokens), and
the manifest says the package was not yet run on a GPU; `runtime/cuda_runtime.py verify-golden
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

from . import cuda_runtime

from .golden import Golden, make_golden
from .package import make_tarball, staging, write_manifest
from .parity import compare, write_reports
from .stages import StageRecord, StageRunner

GRAPHS = ("prefill", "decode")


def _moe_subgraph_router():
    # onnxruntime-gpu 1.31.1 (the CUDA build we run) has no com.microsoft.MoEGroupRouter; keep the exported
    # router (fp32 island) and feed its log-weights to com.microsoft.MoE, which every ORT build with MoE runs.
    from passes.moe_lowering import MoELoweringPass
    return MoELoweringPass("ort-fused", report_dropped=False, fused_router="subgraph")


# passes whose ort-cuda variant differs from passes.PASSES
CUDA_PASS_OVERRIDES = {"moe-ort-fused": _moe_subgraph_router}


def _fp16_cases(runner: StageRunner, rec: StageRecord, stage: str, d: Path, golden: Golden, session: dict) -> None:
    """Golden cases through the fp16 graphs on ORT CPU (feeds cast to the graphs' dtypes)."""
    so = cuda_runtime.session_options(session)
    sessions = {g: ort.InferenceSession(str(d / f"{g}.onnx"), so, providers=["CPUExecutionProvider"]) for g in GRAPHS}
    for case in golden.cases:
        sess = sessions[case.graph]
        types = {i.name: cuda_runtime._ORT_TYPES[i.type] for i in sess.get_inputs()}
        feeds = {n: np.asarray(a).astype(types[n], copy=False) for n, a in case.inputs.items()}
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        got = {n: got[n].astype(np.float32) for n in case.outputs}
        runner.add_report(rec, compare(f"{stage}/{case.name}", case.outputs, got, logits_outputs=["logits"]))


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
                                lambda d, rec: _fp16_cases(runner, rec, profile.parity_stage, d, golden, session))

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
        gen = compare(f"{profile.parity_stage}/greedy", {"step_logits": golden.step_logits},
                      {"step_logits": step_logits}, logits_outputs=["step_logits"])
        gen.add_tokens("greedy", golden.tokens, tokens)
        runner.add_report(target_rec, gen)
        write_reports(runner.reports, pkg / "reports")
        pkg_rec = StageRecord("package", {"tarball": True}, dict(target_rec.outputs))
        pkg_rec.seconds = round(time.perf_counter() - t, 3)
        runner.records.append(pkg_rec)
        manifest["stages"] = [r.to_dict() for r in runner.records]
        manifest["parity"] = {"passed": runner.binding_passed(), "reports": ["reports/parity.json", "reports/parity.md"]}
        manifest["verification"] = {
            "verified_here": [f"export and passes against eager fp32 PyTorch on ORT CPU (fp32 budgets)",
                              f"the fp16 graphs on ORT CPU {ort.__version__} (fp16 tensors, ops without an fp16 CPU "
                              f"kernel run in fp32 between casts) against eager fp32 within {profile.parity_stage}",
                              f"greedy generation of {golden.tokens.shape[1]} tokens through runtime/cuda_runtime.py "
                              "(IOBinding code path, device cpu) equal to eager"],
            "not_verified": ["not yet run on a GPU: CUDAExecutionProvider kernels (fp16 GEMMs, com.microsoft.MoE) "
                             "are unchecked; run `python runtime/cuda_runtime.py verify-golden --record` on a "
                             "machine with onnxruntime-gpu"],
        }
        (pkg / "README.md").write_text(_readme(manifest))
        write_manifest(pkg, manifest)
        runner.progress(f"[package] {out} ({time.time() - started:.1f} s in all)")
    make_tarball(out, out.parent / f"{out.name}.tar.gz")
    return out


def _readme(manifest: dict) -> str:
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
        f"{manifest['golden']['tolerance']}.", "",
        "## Verification", "",
        *[f"- verified: {s}" for s in manifest["verification"]["verified_here"]],
        *[f"- **not verified**: {s}" for s in manifest["verification"]["not_verified"]], "",
    ])
