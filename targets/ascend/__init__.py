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
    )

    def validate(self, quant: str, options: dict) -> None:
        # a bad --soc / --precision / scheme fails before any work
        make_profile(options["soc"] or DEFAULT_SOC, options["precision"] or DEFAULT_PRECISION, quant)

    def build(self, ctx) -> None:
        from .build import build_ascend_package
        build_ascend_package(ctx)

    def verify(self, root: Path, manifest: dict, lines: list[str]) -> tuple[bool, list[str]]:
        from .verify import verify_golden
        return verify_golden(root, manifest, lines)

    def describe(self, manifest: dict) -> list[str]:
        a = manifest["ascend"]
        out = [f"ascend    {a['soc_version']}, {a['precision']}, opset {a['opset']}, om: {a['om']['status']}"]
        for g, spec in a["graphs"].items():
            out.append(f"          {g}: {spec['file']} batch {spec['batch']} seq {spec['seq']} cache {spec['max_cache']} "
                       f"MoE {spec['moe_form']}")
        return out


TARGET = AscendTarget()
