"""The ascend build, after the core's `load` stage: one `target/ascend` stage running targets/ascend/flow.py
(static-shape graphs, profile check, fp32 and fp16-emulated parity, the atc build script, run when atc is
installed, and the on-device kit; with --quant w8a8 the graphs are W8A8 QDQ, targets/ascend/quant.py,
judged against eager under the quantize-w8a8 budget), then the package's reports, manifest and README."""
from __future__ import annotations

import time

from pipeline.build import BuildContext, write_tokenizer
from pipeline.package import sha256_file, write_manifest
from pipeline.package_readme import random_weights_note
from pipeline.parity import write_reports
from pipeline.stages import StageRecord

from .flow import build_ascend
from .profile import DEFAULT_PRECISION, DEFAULT_SOC


def build_ascend_package(ctx: BuildContext) -> None:
    profile, runner, load, base_manifest = ctx.profile, ctx.runner, ctx.load, ctx.base_manifest
    model, out, pkg, quant, seed, started, tokenizer = (ctx.model, ctx.out, ctx.package, ctx.quant, ctx.seed,
                                                        ctx.started, ctx.tokenizer)
    soc = ctx.options["soc"] or DEFAULT_SOC
    precision = ctx.options["precision"] or DEFAULT_PRECISION
    require_om = ctx.options["require_om"]
    shape_opts = {k: ctx.options.get(k) for k in ("batch", "max_cache", "cache_gears", "prefill_buckets")}
    rec = StageRecord(f"target/{profile.name}", {"soc_version": soc, "precision": precision,
                                                 "require_om": require_om, "quant": quant, **shape_opts},
                      dict(load.inputs))
    t = time.perf_counter()
    build = build_ascend(model, pkg, soc_version=soc, precision_mode=precision, require_om=require_om,
                         seed=seed, progress=runner.progress, quant=quant, batch=shape_opts["batch"],
                         max_cache=shape_opts["max_cache"], gears=shape_opts["cache_gears"],
                         buckets=shape_opts["prefill_buckets"])
    rec.params["shapes"] = {"batch": build.shapes.batch, "max_cache": build.shapes.max_cache,
                            "gears": list(build.shapes.gears), "prefill_buckets": list(build.shapes.buckets)}
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
    m, version = base_manifest["model"], base_manifest["mlamoe_version"]
    head = (f"# {m['source']} for Huawei Ascend ({soc})\n\nCompiled by mlamoe {version} from a {m['kind']} "
            f"({m['config']['model_type']}, {m['parameters']:,} parameters; weights sha256 "
            f"`{m['weights_sha256'][:16]}…`). ATC status: **{build.atc.status}**.\n\n"
            f"**Judged:** fp16 emulation on ONNX Runtime CPU {build.judged}.{random_weights_note(m['kind'])}\n\n")
    write_tokenizer(pkg, tokenizer or {})
    (pkg / "README.md").write_text(head + build.readme)
    write_manifest(pkg, manifest)
    runner.progress(f"[package] {out} ({time.time() - started:.1f} s in all); {build.atc.status}")
