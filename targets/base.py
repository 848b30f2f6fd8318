"""What a target declares and does, the one interface the core calls (through the registry, targets/__init__.py):

    TargetProfile   the graphs it accepts, the passes it wants, the quantization schemes it runs, how its
                    runtime is configured (data)
    TargetOption    a compile option only some targets take (--soc, --ranks, --int8-accuracy-level...): the
                    CLI and compile_package check every one generically (Target.option_problems)
    Target          profile + options + validate (before any work) + build (its passes, quantization, target
                    stage, package contents and README, into the staged package folder) + verify (what
                    `mlamoe verify` re-runs for its packages) + describe (its lines of `mlamoe inspect`)

A target's build gets a pipeline.build.BuildContext (the loaded model, the stage runner, the base manifest,
the staged package folder...) and uses the core's public stage helpers (pipeline.build).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from models.errors import MlamoeError


class TargetError(MlamoeError):
    """An unknown target, or an option or value a target does not take."""


@dataclasses.dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    opset: tuple[int, int]  # accepted default-domain opset range
    passes: tuple[str, ...]  # graph passes, in order (names from passes.PASSES)
    quant_schemes: tuple[str, ...]  # accepted --quant values; the first is the default
    dynamic_shapes: bool
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    parity_stage: str = "target-ort-cpu"  # budget key in pipeline.parity.BUDGETS
    runtime_here: bool = True  # can this machine run the target's runtime (for parity)?


@dataclasses.dataclass(frozen=True)
class TargetOption:
    """A compile option (a keyword of pipeline.compile.compile_package) that only some targets take.

    It counts as given when its value differs from `default`. `flag` is its CLI flag (None: library only);
    `group` names flags that are reported together ("--ranks/--redundant"); `quant`: it applies only with
    that --quant scheme."""
    name: str
    flag: str | None
    default: object = None
    group: str | None = None
    quant: str | None = None


@dataclasses.dataclass(frozen=True)
class OptionProblem:
    """An option given to a target that does not take it (or with a --quant it does not apply to)."""
    flag: str
    message: str
    needs_quant: bool  # the problem depends on the --quant scheme (checked by compile, once it is resolved)


class Target:
    """One deployment target's whole build. Subclasses set `profile` and `options` and implement build;
    verify and describe have target-neutral defaults."""
    profile: TargetProfile
    options: tuple[TargetOption, ...] = ()

    @property
    def name(self) -> str:
        return self.profile.name

    def option(self, name: str) -> TargetOption | None:
        return next((o for o in self.options if o.name == name), None)

    def validate(self, quant: str, options: dict) -> None:
        """Before any work: raise (naming the bad value and the fix) on options this target cannot build."""

    def build(self, ctx) -> None:
        """Everything after the core's `load` stage, into ctx.package (the staged folder): the target's
        passes, quantization, target stage, package files, reports, README and manifest."""
        raise NotImplementedError

    def build_streaming(self, **kw) -> None:
        """`compile --stream` (pipeline/streaming.py build_streaming, given this target's session settings); a
        target without it is refused before any work (pipeline.streaming.refusal)."""
        raise TargetError(f"--stream does not build for --target {self.name}")

    def verify(self, root: Path, manifest: dict, lines: list[str]) -> tuple[bool, list[str]]:
        """`mlamoe verify` after the hashes: re-run the golden data where this target's runtime exists here."""
        lines.append(f"skip golden re-run: the {self.name} runtime is not available here (hashes only)")
        return True, lines

    def describe(self, manifest: dict) -> list[str]:
        """This target's own lines of `mlamoe inspect` (after model, target, toolchain and cache)."""
        return []
