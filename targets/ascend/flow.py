"""The ascend target's build, in order, writing into a package folder (the compiler calls this
between its `load` stage and `package`; every step can also be called on its own):

    1. profile      make_profile(soc, precision)               unknown soc / mode -> AscendProfileError
    2. export       static_export.export_static_graph per spec -> onnx/<graph>.onnx (opset 18, static)
    3. check        checker.check_or_raise per graph           -> AscendCheckError listing violations
    4. parity fp32  emulation.static_parity                    budget "export" (1e-4, greedy binding)
    5. emulation    emulation.emulate (fp16, keep_dtype islands) budget "ascend-fp16-emulation" (msit),
                    routing-aware: positions whose expert choice flipped on an fp32 near-tie are
                    excluded from the thresholds and reported (emulation.compare_runs)
    6. build files  atc.write_build                             ascend/build_om.sh, keep_dtype, atc_config.json
    7. atc          atc.run_atc(require_om)                     .om in ascend/om/ or "om not built: atc not found"
    8. kit          kit.write_golden + kit.install_kit          golden/ascend/, ascend/kit/verify_on_device.py

`build_ascend` returns an AscendBuild: the parity reports (fp32 then fp16), the manifest section,
the README section and the ATC result. It raises on a failed check, a failed parity budget or an
ATC failure (with ATC's error text); a missing atc is not an error unless require_om.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from pipeline.parity import ParityReport

from . import atc as atc_mod
from . import checker, emulation, kit
from .profile import DEFAULT_PRECISION, DEFAULT_SOC, AscendProfile, make_profile
from .static_export import (TARGET_OPSET, StaticGraphSpec, export_static_graph, fp32_island_nodes,
                            graph_specs, save_static_graph)

DEFAULT_BATCH = 1
DEFAULT_MAX_CACHE = 256
DEFAULT_BUCKETS = (16, 64)


@dataclasses.dataclass
class AscendBuild:
    profile: AscendProfile
    specs: list[StaticGraphSpec]
    reports: list[ParityReport]
    atc: atc_mod.AtcResult
    manifest: dict
    readme: str
    seconds: dict


def default_shapes(cfg) -> tuple[int, int, tuple[int, ...]]:
    """(batch, max_cache, buckets) fitting the model: M = min(256, max_position_embeddings)."""
    M = min(DEFAULT_MAX_CACHE, cfg.max_position_embeddings)
    buckets = tuple(b for b in DEFAULT_BUCKETS if b <= M) or (M,)
    return DEFAULT_BATCH, M, buckets


def build_ascend(model, package_dir: Path, *, soc_version: str = DEFAULT_SOC, precision_mode: str = DEFAULT_PRECISION,
                 batch: int | None = None, max_cache: int | None = None, buckets: tuple[int, ...] | None = None,
                 require_om: bool = False, atc: str | None = None, external_weight: int = 0,
                 gen_tokens: int = 16, seed: int = 0, progress=print) -> AscendBuild:
    package_dir = Path(package_dir)
    profile = make_profile(soc_version, precision_mode)  # fails first on a bad soc / mode
    db, dm, dbk = default_shapes(model.config)
    specs = graph_specs(batch or db, max_cache or dm, tuple(buckets or dbk))
    seconds = {}

    t = time.perf_counter()
    graphs: dict[str, tuple[StaticGraphSpec, Path]] = {}
    keep: dict[str, list[str]] = {}
    for spec in specs:
        m = export_static_graph(model, spec)
        path = save_static_graph(m, package_dir / "onnx" / f"{spec.name}.onnx")
        graphs[spec.name] = (spec, path)
        keep[spec.name] = [n for names in fp32_island_nodes(m).values() for n in names]
        progress(f"[ascend] exported {spec.name}: batch {spec.batch}, seq {spec.seq}, cache {spec.max_cache}, "
                 f"{len(m.graph)} nodes")
    seconds["export"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    for name, (_, path) in graphs.items():
        checker.check_or_raise(path, profile, what=f"onnx/{name}.onnx")
    seconds["check"] = round(time.perf_counter() - t, 3)
    progress(f"[ascend] profile check passed ({profile.describe()})")

    t = time.perf_counter()
    reports = emulation.static_parity(model, graphs, gen_tokens=gen_tokens, seed=seed)
    reports += emulation.emulate(model, graphs, keep, gen_tokens=gen_tokens, seed=seed)
    for r in reports:
        r.raise_if_failed()
    seconds["parity"] = round(time.perf_counter() - t, 3)
    progress(f"[ascend] parity: {len(reports)} reports passed (fp32 static graphs, fp16 emulation)")

    agraphs = [atc_mod.atc_graph(package_dir, f"onnx/{n}.onnx", n, keep_fp32=keep[n]) for n in graphs]
    build_section = atc_mod.write_build(package_dir, agraphs, profile, external_weight)
    t = time.perf_counter()
    result = atc_mod.run_atc(package_dir, require_om=require_om, atc=atc)
    seconds["atc"] = round(time.perf_counter() - t, 3)
    progress(f"[ascend] {result.status}")

    cases = kit.write_golden(model, specs, package_dir, seed)
    kit_path = kit.install_kit(package_dir)
    import json
    atc_config = json.loads((package_dir / atc_mod.CONFIG).read_text())
    verified_here = [
        f"every graph passes the ascend profile checker ({profile.describe()})",
        "the fp32 static graphs on ONNX Runtime CPU match eager PyTorch (atol 1e-4) on a bucketed prefill, "
        f"decode steps and {gen_tokens}-token greedy generation",
        f"fp16 emulation (softmax/RMSNorm/router kept fp32 as in keep_dtype) {emulation.describe(reports)}",
    ]
    not_verified = ["that ATC accepts the graphs and builds the .om (run `bash ascend/build_om.sh`)"
                    if result.status != atc_mod.STATUS_BUILT else "",
                    "the .om's numerics on the NPU (run `python3 ascend/kit/verify_on_device.py`)",
                    "performance on the NPU"]
    not_verified = [x for x in not_verified if x]
    readme = kit.kit_readme(atc_config, cases, result.status, verified_here, not_verified)
    manifest = {
        "soc_version": profile.soc_version,
        "precision": f"{profile.precision_flag}={profile.precision_mode}",
        "opset": TARGET_OPSET,
        "graphs": {s.name: {"file": f"onnx/{s.name}.onnx", "kind": s.kind, "batch": s.batch, "seq": s.seq,
                            "max_cache": s.max_cache, "moe_form": s.moe_form,
                            "checker": checker.summary(graphs[s.name][1])} for s in specs},
        "io": {"input_ids": "int32 [B, S]", "position": "int32 [B]",
               "cache": "past.{i}.c_kv fp32 [B, M, kv_lora_rank], past.{i}.k_pe fp32 [B, M, rope] -> present.{i}.*"},
        "build": build_section,
        "om": {"status": result.status, "files": result.om_files, "log": result.log},
        "kit": {"verify": kit_path, "golden": f"{kit.GOLDEN_DIR}/cases.json"},
        "verification": {"verified_here": verified_here, "not_verified": not_verified},
    }
    return AscendBuild(profile, specs, reports, result, manifest, readme, seconds)
