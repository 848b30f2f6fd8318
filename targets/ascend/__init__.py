"""The `ascend` target: Huawei Ascend NPUs through CANN's ATC (ONNX -> .om).

Modules: profile (what ATC accepts), checker (graph vs profile), static_export (fixed-shape graphs
from the eager model), atc (build_om.sh + running atc), emulation (fp16 numerics on ORT CPU),
quant (W8A8 QDQ), flow (the build's steps, in order), build (the target stage and package around
flow), verify (`mlamoe verify` for its packages), kit/ (the on-device verification kit shipped in the
package). TARGET is what the registry (targets/__init__.py) holds.
"""
from __future__ import annotations

from pathlib import Path

from ..base import Target, TargetOption
from .profile import DEFAULT_PRECISION, DEFAULT_SOC, PROFILE, make_profile


class AscendTarget(Target):
    profile = PROFILE
    options = (
        TargetOption("soc", "--soc", None),
        TargetOption("precision", "--precision", None),
        TargetOption("require_om", "--require-om", False),
        # serving shapes (targets/ascend/shapes.py): checked against the model and the soc's HBM after load
        TargetOption("batch", "--batch", None),
        TargetOption("max_cache", "--max-cache", None),
        TargetOption("cache_gears", "--cache-gears", None),
        TargetOption("prefill_buckets", "--prefill-buckets", None),
    )

    def validate(self, quant: str, options: dict) -> None:
        # a bad --soc / --precision / scheme / shape value fails before any work (the bounds that need the
        # model, max_position_embeddings and HBM, right after load: shapes.resolve_shapes)
        from .shapes import check_batch, parse_ints
        make_profile(options["soc"] or DEFAULT_SOC, options["precision"] or DEFAULT_PRECISION, quant)
        check_batch(options.get("batch"))
        mc = options.get("max_cache")
        if mc is not None and (not isinstance(mc, int) or mc < 2):
            from .shapes import AscendShapeError
            raise AscendShapeError(f"--max-cache {mc}: must be an integer >= 2 (cache rows, i.e. tokens)")
        parse_ints(options.get("cache_gears"), "--cache-gears")
        parse_ints(options.get("prefill_buckets"), "--prefill-buckets")

    def build(self, ctx) -> None:
        from .build import build_ascend_package
        build_ascend_package(ctx)

    def verify(self, root: Path, manifest: dict, lines: list[str]) -> tuple[bool, list[str]]:
        from .verify import verify_golden
        return verify_golden(root, manifest, lines)

    def describe(self, manifest: dict) -> list[str]:
        a = manifest["ascend"]
        out = [f"ascend    {a['soc_version']}, {a['precision']}, opset {a['opset']}, om: {a['om']['status']}"]
        sh = a.get("shapes")
        if sh:
            mem = ", ".join(f"{m['gear']}: {m['resident_bytes'] / 1e9:.2f} GB" for m in sh["hbm"]["per_gear"])
            out.append(f"          gears {sh['gears']} (batch {sh['batch']}, buckets {sh['prefill_buckets']}, chunk "
                       f"{sh['chunk']}; verified here: gear {sh['verified_gear']}); HBM estimate per gear {mem}")
        for g, spec in a["graphs"].items():
            out.append(f"          {g}: {spec['file']} batch {spec['batch']} seq {spec['seq']} cache {spec['max_cache']} "
                       f"MoE {spec['moe_form']}")
        return out


TARGET = AscendTarget()
