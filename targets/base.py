"""What a target declares: the graphs it accepts, the passes it wants, the quantization schemes it
runs, how its runtime is configured, and how it packages."""
from __future__ import annotations

import dataclasses


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
