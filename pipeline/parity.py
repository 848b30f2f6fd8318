"""Parity: the one comparator every stage uses, its budgets, and its reports.

A stage produces ``actual`` outputs for the same inputs a trusted ``reference`` saw (eager PyTorch,
the previous stage's ONNX, fp32 before quantization, ...). :func:`compare` checks that both have
the same output names and shapes and computes, per output, the statistics deployment people read.
It then judges them against the stage's :class:`Budget` from the one table :data:`BUDGETS`.

What is computed (all in float64, whatever the arrays' dtypes):

- Polygraphy's rule: an element fails only if ``|a - r| > atol`` AND ``|a - r| > rtol * |r|``;
  ``n_failing`` counts such elements plus every non-finite mismatch (below). Any failing element
  fails the output. With ``atol_per_rms`` (the fp32 budgets) atol is multiplied by the reference
  output's RMS where that exceeds 1 (over its finite elements).
- ``max_abs`` / ``mean_abs``: of ``|a - r|``.
- ``max_rel`` / ``mean_rel``: of ``|a - r| / max(|r|, REL_FLOOR)``. ``REL_FLOOR`` (1e-6, absolute)
  only avoids division by zero; near-zero references make these numbers large, which is why they
  are reported but never judged (the Polygraphy rule is what judges elementwise error).
- ``cosine``: ``<a, r> / (||a|| ||r||)`` over the flattened output; 1.0 when both are all zero,
  0.0 when exactly one is.
- ``rel_euclid``: ``||a - r||_2 / ||r||_2`` (msit's relative Euclidean distance); 0.0 when both
  are zero, inf when only the reference is.
- For outputs named in ``logits_outputs`` (vocabulary on the last axis): ``top1_agreement``, the
  fraction of positions (all leading axes flattened) whose argmax agrees, and ``kl``, the mean
  over positions of ``KL(softmax(ref) || softmax(actual))`` from log-softmax in float64.

Non-finite values: the error statistics above (max/mean abs/rel, cosine, rel_euclid) are taken over
the positions where both arrays are finite; an empty set gives the values of perfect agreement
(0 errors, cosine 1). Non-finite values are judged separately: a position where either side is
non-finite is a mismatch unless both hold the same value (same-signed inf, or NaN in both); such
mismatches count in ``n_failing``. ``nan_or_inf`` is True when ``actual`` is non-finite where the
reference is finite. ``top1_agreement``/``kl`` use the full arrays (a NaN there shows as NaN).

Limits are inclusive: an output passes when ``cosine >= min_cosine``, ``kl <= max_kl``,
``top1 >= min_top1``, ``rel_euclid <= max_rel_euclid`` (msit writes ``cosine > 0.99``; equality
has measure zero). A NaN statistic always fails its limit. ``max_kl`` and ``min_top1`` apply only
to logits outputs; ``min_cosine`` and ``max_rel_euclid`` to every output.

Reports: :meth:`ParityReport.to_dict` (JSON-safe; non-finite floats become the strings "NaN",
"Infinity", "-Infinity"), :meth:`ParityReport.to_markdown`, and :func:`write_reports`, which
writes ``parity.json`` and ``parity.md`` deterministically (sorted keys, floats rounded to
``JSON_SIGNIFICANT_DIGITS`` significant digits). Pass/fail is always decided on unrounded numbers.

fp16 targets (:func:`compare_fp16`, BUDGETS["target-ort-cuda-fp16"]): the budget's limits are floors,
each widened to FP16_REFERENCE_FACTOR x the error an independent fp16 run (PyTorch autocast, see
pipeline/fp16_reference.py) shows against the same fp32 reference on the same inputs; top-1 is judged
only where the reference's top-1/top-2 margin is beyond what those limits let two logits move (near
ties are excluded and listed), and greedy tokens (:func:`compare_fp16_greedy`) are binding up to such
a near tie.

This module uses numpy only (no torch), so every stage and ``mlamoe verify`` can import it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import MlamoeError

__all__ = [
    "BUDGETS",
    "Budget",
    "JSON_SIGNIFICANT_DIGITS",
    "OutputStats",
    "ParityError",
    "ParityReport",
    "REL_FLOOR",
    "FP16_REFERENCE_FACTOR",
    "Fp16Report",
    "budget_for",
    "compare",
    "compare_fp16",
    "compare_routed",
    "compare_fp16_routed",
    "RoutedFp16Report",
    "route",
    "Router",
    "RoutedReport",
    "compare_fp16_greedy",
    "fp16_limits",
    "near_ties",
    "quant_fp16_limits",
    "write_reports",
]

REL_FLOOR = 1e-6
"""Absolute floor on |reference| in the denominator of max_rel / mean_rel (avoids x/0)."""

JSON_SIGNIFICANT_DIGITS = 6
"""Significant digits of every float in parity.json (fixed formatting, byte-stable files)."""

SCHEMA_VERSION = 1


class ParityError(MlamoeError):
    """A stage's outputs are outside its parity budget. ``report`` holds the full numbers."""

    def __init__(self, message: str, report: ParityReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Budget:
    """What a stage may change in its outputs (see the module docstring for the exact rules)."""

    atol: float
    rtol: float  # Polygraphy rule: an element fails only if |a-r| > atol AND |a-r| > rtol*|r|
    min_cosine: float | None = None  # per output
    max_kl: float | None = None  # mean KL(ref || actual) of next-token softmax, logits outputs only
    min_top1: float | None = None  # top-1 agreement fraction, logits outputs only
    max_rel_euclid: float | None = None  # ||a-r||_2 / ||r||_2 (msit's relative Euclidean distance)
    max_flipped_fraction: float | None = None  # routing flips per (position, MoE layer) decision (compare_routed)
    atol_per_rms: bool = False  # atol is per unit of the output's RMS where that exceeds 1 (fp32 rounding scales)

    def describe(self) -> str:
        """One line, e.g. ``atol 0.0001, rtol 0.001, cosine >= 0.99999, top-1 >= 1.0``."""
        atol = f"atol {self.atol!r}" + (" x max(1, output rms)" if self.atol_per_rms else "")
        parts = ([atol, f"rtol {self.rtol!r}"] if math.isfinite(self.atol) else ["elementwise not judged"])
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine!r}")
        if self.max_rel_euclid is not None:
            parts.append(f"rel euclid <= {self.max_rel_euclid!r}")
        if self.min_top1 is not None:
            parts.append(f"top-1 >= {self.min_top1!r}")
        if self.max_kl is not None:
            parts.append(f"KL <= {self.max_kl!r}")
        if self.max_flipped_fraction is not None:
            parts.append(f"routing flips <= {self.max_flipped_fraction:.0%}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, float | None]:
        """None for a limit that is not judged (including an infinite atol/rtol)."""
        return {f.name: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


# fp32 stages change only the order of float32 operations (export tracing, graph rewrites, ORT CPU
# kernels, splitting experts across ranks): errors stay at accumulated-rounding level, so argmax
# must not move at all. Elementwise atol/rtol already bound KL and rel euclid far below anything
# meaningful, so those are reported but not separately limited. Rounding error grows with the size of
# the terms summed, not of the result: an element near zero of an output whose values are ~10 carries
# the absolute error of its neighbours (measured: 1.09e-4 at a logit of 0.106 among logits of rms 3.1,
# fp32 static graphs of a x3-scaled checkpoint), so atol is per unit of the output's RMS above 1.
_FP32 = Budget(atol=1e-4, rtol=1e-3, min_cosine=0.99999, min_top1=1.0, atol_per_rms=True)

BUDGETS: dict[str, Budget] = {
    "export": _FP32,  # ORT CPU running the exported graphs vs eager PyTorch
    # --stream (pipeline/streaming.py): one decoder layer's graphs (after the passes) vs the eager layer on recorded
    # inputs, and the graphs stitched from the layers vs the eager model computed layer by layer (quantized: vs
    # their own layers chained, the same graphs)
    "layer": _FP32,
    "chained": _FP32,  # the golden cases through each layer's graphs in turn (ORT) vs eager, end to end
    "stitched": _FP32,
    # --stream --quant int8: one quantized layer's own contribution (h_out - h) and cache rows against the eager
    # layer's, teacher-forced in MoE layers; the same cosine / rel euclid limits as the whole model's logits
    # The share of routing flips is judged per golden case over all layers (pipeline/streaming.py pooled_flips, as a
    # whole-model report pools its MoE layers): one layer's 16 prompt decisions are too few for a share of 10%;
    # each flip's margin is judged in its layer.
    "layer-int8": Budget(atol=math.inf, rtol=math.inf, min_cosine=0.99, max_rel_euclid=0.15, max_flipped_fraction=1.0),
    "passes": _FP32,  # after every pass, vs the graph before it (fusions are exact rewrites)
    # Quantized graphs vs eager fp32, inside `compile`. The packages we build in CI have random
    # weights: one near-tie routing decision flipped by quantization moves that token's logits by
    # O(1), so elementwise rules and top-1 say nothing there (they are reported, not judged). These
    # budgets catch gross errors (a wrong scale, a transposed or unquantized-but-rescaled weight gives
    # cosine << 0.9); each scheme's exactness is tested against numpy, and its accuracy (perplexity,
    # top-1) is judged on the trained-small model (tests/test_quant_trained.py), where it means
    # something. rel euclid ~ sqrt(2 (1 - cos)) for equal norms, so the pairs below are consistent.
    # FP8 gets the loosest bound: E4M3 keeps 3 mantissa bits, and a tiny model's weights are each a
    # single 128x128 block sharing one scale.
    # Judged routing-aware (compare_routed): cosine/KL/rel euclid with the reference's routing forced, so
    # they measure the weights' rounding, not a near-tie expert choice; flips are judged on their own
    # (share of decisions, and each at a reference margin the stage's router-score error can overturn).
    # Randomized transformers checkpoints with weights x3 (tests/test_routing_parity.py) have logits ~3x
    # a trained model's per layer, and KL grows with the logit scale: W8A8's activation rounding and FP8's
    # 3 mantissa bits (a tiny model's weights are each a single 128x128 block sharing one scale) reach
    # KL 0.075 / 0.27 there under forced routing, and FP8 moves router scores enough to overturn up to a
    # third of the (near-tie) decisions. The injected faults of that test (scales x2, a dropped block)
    # give cosine < 0.5 and KL > 4.
    "quantize-int8": Budget(atol=math.inf, rtol=math.inf, min_cosine=0.99, max_kl=0.05, max_rel_euclid=0.15,
                            max_flipped_fraction=0.10),
    # INT4 (MatMulNBits 4-bit RTN, QMoE 4-bit experts): 16 levels per block, ~16x int8's weight error, so
    # the same shape with fp8-like limits; tests/test_quant_int4.py measures tiny against them and shows
    # wrong quantizers (swapped nibbles, expert scales x2, scales one block off) fail them.
    "quantize-int4": Budget(atol=math.inf, rtol=math.inf, min_cosine=0.94, max_kl=0.1, max_rel_euclid=0.35,
                            max_flipped_fraction=0.45),
    "quantize-w8a8": Budget(atol=math.inf, rtol=math.inf, min_cosine=0.98, max_kl=0.1, max_rel_euclid=0.2,
                            max_flipped_fraction=0.20),
    "quantize-fp8": Budget(atol=math.inf, rtol=math.inf, min_cosine=0.95, max_kl=0.4, max_rel_euclid=0.32,
                           max_flipped_fraction=0.35),
    "target-ort-cpu": _FP32,  # the packaged session config on ORT CPU, fp32
    # ORT CUDA fp16 graphs vs eager fp32, judged by compare_fp16 (not compare): these are the floors.
    # fp16 (11-bit significand, unit roundoff 4.9e-4) with fp32 accumulation gives ~1e-3 relative
    # error after a few layers; a fixed floor cannot know a model's depth, logit scale or how close
    # its router's decisions are, so each error limit is widened to FP16_REFERENCE_FACTOR times what
    # PyTorch's own fp16 (autocast, router kept fp32 as the graphs keep it) shows against eager fp32
    # on the same inputs: an independent measurement of the fp16 error this model has anyway.
    # (the measured ratio of the graphs' error to autocast's: docs/benchmarks.md). top-1 is 1.0 on the positions where
    # fp32's top-1/top-2 margin exceeds what the elementwise limits let two logits move (near ties
    # are excluded and listed); greedy tokens must be equal up to such a near tie.
    # Routing flips (compare_fp16_routed): at most 10% of (position, MoE layer) decisions, each a near tie.
    "target-ort-cuda-fp16": Budget(
        atol=2e-2, rtol=2e-2, min_cosine=0.9998, max_kl=1e-3, min_top1=1.0, max_rel_euclid=0.02,
        max_flipped_fraction=0.10
    ),
    # ORT CUDA int8 (MatMulNBits 8-bit weights, fp16 activations) vs eager fp32, judged by
    # compare_fp16(..., quant_budget=BUDGETS["quantize-int8"]): the graph carries two independent
    # errors, int8 weight rounding (the quantize-int8 budget's shape: cosine/KL/rel euclid only, no
    # elementwise or top-1 rule, for the random-weight routing near ties described above) and fp16
    # (the target-ort-cuda-fp16 limits, widened by PyTorch's own fp16 error on the same inputs).
    # quant_fp16_limits adds them at worst case (norms of two perturbations add): this entry is the
    # shape of the result before the fp16 part is known (the quantize-int8 limits themselves).
    "target-ort-cuda-int8": Budget(atol=math.inf, rtol=math.inf, min_cosine=0.99, max_kl=0.05, max_rel_euclid=0.15,
                                   max_flipped_fraction=0.10),
    # ORT CUDA int4 (MatMulNBits 4-bit with zero points and QMoE 4-bit experts, fp16 scales and activations), the
    # same rule with the quantize-int4 budget as its quantization part.
    "target-ort-cuda-int4": Budget(atol=math.inf, rtol=math.inf, min_cosine=0.94, max_kl=0.1, max_rel_euclid=0.35,
                                   max_flipped_fraction=0.45),
    # ORT CUDA fp8 (E4M3 128x128-block weights dequantized to fp16, fp16 activations), the same rule with
    # the quantize-fp8 budget as its quantization part.
    "target-ort-cuda-fp8": Budget(atol=math.inf, rtol=math.inf, min_cosine=0.95, max_kl=0.4, max_rel_euclid=0.32,
                                  max_flipped_fraction=0.35),
    # Ascend fp16 emulated on ORT: judged by msit's own accuracy thresholds alone (REFERENCE.md 3):
    # cosine > 0.99, relative Euclidean distance < 0.05, KL < 0.005, per output tensor. msit has no
    # elementwise or top-1 rule, so atol/rtol are not binding here (the numbers are still reported).
    # Routing flips (targets/ascend/emulation.py, teacher-forced as every lossy stage): at most this share of the
    # (position, MoE layer) decisions, each a near tie by ROUTED_RULE.
    "ascend-fp16-emulation": Budget(
        atol=math.inf, rtol=math.inf, min_cosine=0.99, max_kl=0.005, max_rel_euclid=0.05, max_flipped_fraction=0.10
    ),
    "partition": _FP32,  # per-rank expert graphs recombined vs the unpartitioned graph
}


def budget_for(stage: str) -> Budget:
    """The budget of ``stage``: ``BUDGETS[stage]``, else that of the part before the first "/"
    (so ``"passes/fuse-latent-kv"`` reports under its own name with the ``passes`` budget)."""
    if stage in BUDGETS:
        return BUDGETS[stage]
    head = stage.split("/", 1)[0]
    if head in BUDGETS:
        return BUDGETS[head]
    known = ", ".join(sorted(BUDGETS))
    raise ValueError(f"no parity budget for stage {stage!r}; known stages: {known} "
                     "(a 'STAGE/detail' name uses STAGE's budget), or pass budget= explicitly")


@dataclass
class OutputStats:
    """Statistics of one output. Numbers are None when not computable (missing output, shape
    mismatch) and top1_agreement/kl are None for outputs not declared as logits."""

    name: str
    shape: tuple[int, ...] | None  # actual's shape (reference's when actual lacks the output)
    dtype: str | None  # actual's dtype (reference's when actual lacks the output)
    max_abs: float | None = None
    mean_abs: float | None = None
    max_rel: float | None = None
    mean_rel: float | None = None
    cosine: float | None = None
    rel_euclid: float | None = None
    n_failing: int = 0
    n_elements: int = 0
    top1_agreement: float | None = None
    kl: float | None = None
    nan_or_inf: bool = False
    passed: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": None if self.shape is None else [int(d) for d in self.shape],
            "dtype": self.dtype,
            "n_elements": int(self.n_elements),
            "n_failing": int(self.n_failing),
            "max_abs": _json_float(self.max_abs),
            "mean_abs": _json_float(self.mean_abs),
            "max_rel": _json_float(self.max_rel),
            "mean_rel": _json_float(self.mean_rel),
            "cosine": _json_float(self.cosine),
            "rel_euclid": _json_float(self.rel_euclid),
            "top1_agreement": _json_float(self.top1_agreement),
            "kl": _json_float(self.kl),
            "nan_or_inf": bool(self.nan_or_inf),
            "passed": bool(self.passed),
            "reasons": list(self.reasons),
        }


@dataclass
class ParityReport:
    """The outcome of one comparison. ``passed`` is True when every output passed and every
    token comparison that the budget makes binding (see :meth:`add_tokens`) passed."""

    stage: str
    budget: Budget
    outputs: list[OutputStats] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and all(
            t["passed"] for t in self.extra.get("tokens", {}).values()
        )

    def add_tokens(self, name: str, reference_tokens: Any, actual_tokens: Any) -> dict[str, Any]:
        """Record a token-for-token comparison (e.g. greedy generation) under
        ``extra["tokens"][name]``; returns the record.

        Tokens are 1-D ``[steps]`` or 2-D ``[batch, steps]``; a step mismatches when any batch row
        differs there, and a length difference mismatches at the shorter length. The record holds
        ``equal``, ``first_mismatch`` (step index or None), ``n_steps_reference``/``_actual``,
        ``n_equal_steps`` (agreeing prefix), ``binding`` and ``passed``. Tokens are binding only
        when the budget demands exact top-1 agreement (``min_top1 == 1.0``); otherwise a
        mismatch is recorded for the reader but does not fail the report (quantized/fp16 stages
        may legitimately diverge after a near-tie, and then stay diverged).
        """
        tokens = self.extra.setdefault("tokens", {})
        if name in tokens:
            raise ValueError(f"tokens {name!r} already recorded in the {self.stage!r} report")
        ref = _as_token_matrix(reference_tokens, "reference_tokens")
        act = _as_token_matrix(actual_tokens, "actual_tokens")
        n_ref, n_act = ref.shape[1], act.shape[1]
        first: int | None = None
        detail = ""
        if ref.shape[0] != act.shape[0]:
            first = 0
            detail = f"batch {ref.shape[0]} in reference vs {act.shape[0]} in actual"
        else:
            n = min(n_ref, n_act)
            differs = np.flatnonzero((ref[:, :n] != act[:, :n]).any(axis=0))
            if differs.size:
                first = int(differs[0])
                row = int(np.flatnonzero(ref[:, first] != act[:, first])[0])
                where = f"row {row}, " if ref.shape[0] > 1 else ""
                detail = (f"{where}reference token {int(ref[row, first])}, "
                          f"actual {int(act[row, first])}")
            elif n_ref != n_act:
                first = n
                detail = f"reference has {n_ref} steps, actual {n_act}"
        binding = self.budget.min_top1 is not None and self.budget.min_top1 >= 1.0
        record: dict[str, Any] = {
            "equal": first is None,
            "first_mismatch": first,
            "n_steps_reference": int(n_ref),
            "n_steps_actual": int(n_act),
            "n_equal_steps": int(min(n_ref, n_act) if first is None else first),
            "binding": bool(binding),
            "passed": bool(first is None or not binding),
            "reason": None,
        }
        if first is not None:
            record["reason"] = (
                f"tokens {name!r} differ: first mismatch at step {first} ({detail}); "
                f"{record['n_equal_steps']} of {n_ref} reference steps equal"
                + ("" if binding else " (informational: budget min_top1 < 1.0)")
            )
        tokens[name] = record
        return record

    def failure_reasons(self) -> list[str]:
        """Every reason this report fails, each prefixed by what it is about."""
        out = [f"output {o.name!r}: {r}" for o in self.outputs if not o.passed for r in o.reasons]
        out += [t["reason"] for t in self.extra.get("tokens", {}).values() if not t["passed"]]
        return out

    def raise_if_failed(self) -> ParityReport:
        """Raise :class:`ParityError` naming the stage, each failing output and its numbers."""
        if self.passed:
            return self
        lines = [f"parity failed at stage {self.stage!r} (budget: {self.budget.describe()}):"]
        for o in self.outputs:
            if not o.passed:
                lines.append(f"  output {o.name!r} {_shape_str(o.shape)}: " + "; ".join(o.reasons))
        for t in self.extra.get("tokens", {}).values():
            if not t["passed"]:
                lines.append(f"  {t['reason']}")
        raise ParityError("\n".join(lines), report=self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (Python floats; non-finite floats as strings), fixed key order."""
        return {
            "stage": self.stage,
            "passed": self.passed,
            "budget": self.budget.to_dict(),
            "outputs": [o.to_dict() for o in self.outputs],
            "extra": _jsonable(self.extra),
        }

    def to_markdown(self) -> str:
        b = self.budget
        lines = [
            f"### Stage `{self.stage}`: {'PASS' if self.passed else 'FAIL'}",
            "",
            f"Budget: {b.describe()}.",
            "",
            "| output | shape | max abs | mean abs | max rel | cosine | rel euclid | top-1 | KL | pass |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for o in self.outputs:
            lines.append("| " + " | ".join([
                f"`{o.name}`",
                _shape_str(o.shape),
                _md(o.max_abs, ".2e"),
                _md(o.mean_abs, ".2e"),
                _md(o.max_rel, ".2e"),
                _md_vs(o.cosine, b.min_cosine, 6),
                _md_vs(o.rel_euclid, b.max_rel_euclid, 3),
                _md_vs(o.top1_agreement, b.min_top1, 4),
                _md_vs(o.kl, b.max_kl, 3),
                "PASS" if o.passed else "FAIL",
            ]) + " |")
        if not self.outputs:
            lines.append("| (no outputs) | | | | | | | | | |")
        tokens = self.extra.get("tokens", {})
        if tokens:
            lines += ["", "| tokens | steps (ref/actual) | equal | first mismatch | pass |",
                      "|---|---|---|---|---|"]
            for name, t in tokens.items():
                fm = "-" if t["first_mismatch"] is None else str(t["first_mismatch"])
                lines.append(f"| `{name}` | {t['n_steps_reference']}/{t['n_steps_actual']} | "
                             f"{'yes' if t['equal'] else 'no'} | {fm} | "
                             f"{'PASS' if t['passed'] else 'FAIL'} |")
        notes = [f"- `{o.name}`: {r}" for o in self.outputs for r in o.reasons]
        notes += [f"- {t['reason']}" for t in tokens.values() if t["reason"]]
        if notes:
            lines += ["", "Reasons:", ""] + notes
        return "\n".join(lines) + "\n"


def compare(
    stage: str,
    reference: Mapping[str, Any],
    actual: Mapping[str, Any],
    *,
    logits_outputs: Iterable[str] = (),
    budget: Budget | None = None,
) -> ParityReport:
    """Compare ``actual`` outputs with ``reference`` under ``budget`` (default: the stage's).

    Outputs are reported in the reference's order, then any output only ``actual`` has. A missing
    or extra output, a shape mismatch or a non-numeric array is a failing output with a reason,
    not an exception. A name in ``logits_outputs`` that the reference lacks is a caller error
    (ValueError). Empty dicts give a report with no outputs, which passes (useful for reports
    holding only :meth:`ParityReport.add_tokens` results).
    """
    if budget is None:
        budget = budget_for(stage)
    logits = set(logits_outputs)
    unknown = sorted(logits - set(reference))
    if unknown:
        raise ValueError(f"logits_outputs {unknown} are not reference outputs "
                         f"(reference has {sorted(reference)})")
    outputs: list[OutputStats] = []
    for name, ref in reference.items():
        ref = np.asarray(ref)
        if name not in actual:
            outputs.append(OutputStats(
                name=name, shape=tuple(ref.shape), dtype=str(ref.dtype), n_elements=int(ref.size),
                reasons=[f"missing from actual outputs (reference has shape {_shape_str(ref.shape)})"],
            ))
            continue
        outputs.append(_compare_one(name, ref, np.asarray(actual[name]), budget, name in logits))
    for name, act in actual.items():
        if name not in reference:
            act = np.asarray(act)
            outputs.append(OutputStats(
                name=name, shape=tuple(act.shape), dtype=str(act.dtype), n_elements=int(act.size),
                reasons=["not a reference output (actual has it, reference does not)"],
            ))
    return ParityReport(stage=stage, budget=budget, outputs=outputs)


# --------------------------------------------------------------------------------------------
# fp16 judgement (BUDGETS["target-ort-cuda-fp16"])

FP16_REFERENCE_FACTOR = 4.0
"""compare_fp16 widens each error limit to this many times the independent fp16 reference's own
error on the same inputs. The graphs round more tensors to fp16 than autocast does (the residual
stream, norm outputs and the cache; autocast casts only matmul inputs): measured 2.0x autocast's max
abs on trained-small (H200), so 4 leaves 2x on top of that; it never tightens the budget's floors."""

_UNJUDGED = Budget(atol=math.inf, rtol=math.inf)


def fp16_limits(budget: Budget, reference_error: OutputStats | None) -> Budget:
    """``budget`` with each error limit widened to FP16_REFERENCE_FACTOR x ``reference_error`` (the
    fp16 reference vs the fp32 reference, same output); unchanged when there is none, or when the
    reference itself went non-finite (then it says nothing about fp16 error)."""
    r = reference_error
    if r is None or r.nan_or_inf or r.max_abs is None or not all(
            math.isfinite(x) for x in (r.max_abs, r.cosine, r.rel_euclid)):
        return budget
    f = FP16_REFERENCE_FACTOR
    return dataclasses.replace(
        budget,
        atol=max(budget.atol, f * r.max_abs),
        min_cosine=None if budget.min_cosine is None else min(budget.min_cosine, 1.0 - f * (1.0 - r.cosine)),
        max_rel_euclid=None if budget.max_rel_euclid is None else max(budget.max_rel_euclid, f * r.rel_euclid),
        max_kl=(budget.max_kl if budget.max_kl is None or r.kl is None or not math.isfinite(r.kl)
                else max(budget.max_kl, f * r.kl)),
    )


def quant_fp16_limits(quant: Budget, fp16: Budget) -> Budget:
    """Limits for graphs that are both quantized (error budget ``quant``) and computed in fp16 (limits
    ``fp16``, already widened by :func:`fp16_limits`), judged against the same fp32 reference.

    The two errors are separate perturbations e_q, e_f of the reference r, so at worst their norms add
    (triangle inequality): rel euclid <= rel_q + rel_f. For a small perturbation 1 - cosine ~
    |e_perp|^2 / (2 |r|^2), so sqrt(1 - cosine) adds the same way: 1 - cos <= (sqrt(1-cos_q) +
    sqrt(1-cos_f))^2; KL is quadratic in a small logit perturbation, so sqrt(KL) adds: KL <=
    (sqrt(KL_q) + sqrt(KL_f))^2. Elementwise (atol/rtol) and top-1 follow the quantization budget (there:
    not judged). A limit either side leaves unset stays unset."""
    def add_sqrt(a, b):
        return None if a is None or b is None else (math.sqrt(a) + math.sqrt(b)) ** 2

    cos = None if quant.min_cosine is None or fp16.min_cosine is None else \
        1.0 - add_sqrt(max(0.0, 1.0 - quant.min_cosine), max(0.0, 1.0 - fp16.min_cosine))
    rel = None if quant.max_rel_euclid is None or fp16.max_rel_euclid is None else quant.max_rel_euclid + fp16.max_rel_euclid
    return Budget(atol=quant.atol, rtol=quant.rtol, min_cosine=cos, max_kl=add_sqrt(quant.max_kl, fp16.max_kl),
                  min_top1=quant.min_top1, max_rel_euclid=rel, max_flipped_fraction=quant.max_flipped_fraction)


def near_ties(reference_logits: Any, budget: Budget) -> tuple[np.ndarray, np.ndarray]:
    """Per position (leading axes flattened): the reference's top-1 minus top-2 logit, and how far
    apart the two may move within ``budget``'s elementwise rule (max(atol, rtol*|r|) each). A
    position whose margin is at most that is a near tie: fp16 error inside the budget can flip it."""
    r = np.asarray(reference_logits, dtype=np.float64)
    v = r.shape[-1] if r.ndim else 0
    rr = r.reshape(-1, v) if v else r.reshape(-1, 1)
    if v < 2:
        return np.full(rr.shape[0], np.inf), np.zeros(rr.shape[0])
    top = np.partition(rr, -2, axis=-1)[:, -2:]
    t2, t1 = top[:, 0], top[:, 1]
    allowed = np.maximum(budget.atol, budget.rtol * np.abs(t1)) + np.maximum(budget.atol, budget.rtol * np.abs(t2))
    return t1 - t2, allowed


@dataclass
class Fp16Report(ParityReport):
    """A ParityReport from :func:`compare_fp16`: each output judged under its own limits
    (extra["fp16"]["outputs"][name]["limits"]), top-1 over decisive positions only, and greedy
    tokens (:meth:`add_tokens` with ``reference_step_logits``) binding up to a near tie."""

    def add_tokens(self, name: str, reference_tokens: Any, actual_tokens: Any,
                   reference_step_logits: Any = None, logits_output: str = "step_logits") -> dict[str, Any]:
        """As ParityReport.add_tokens (binding: the budget's min_top1 is 1.0); with
        ``reference_step_logits`` ([B, N, V], the fp32 logits that chose each reference token) a first
        mismatch at a step whose fp32 margin is a near tie under ``logits_output``'s limits passes,
        recorded as ``near_tie``; the tokens after it are then informational."""
        record = super().add_tokens(name, reference_tokens, actual_tokens)
        d = record["first_mismatch"]
        if d is None or reference_step_logits is None:
            return record
        steps = np.asarray(reference_step_logits)
        ref = _as_token_matrix(reference_tokens, "reference_tokens")
        act = _as_token_matrix(actual_tokens, "actual_tokens")
        if steps.ndim == 2:
            steps = steps[None]
        if ref.shape[0] != act.shape[0] or d >= min(ref.shape[1], act.shape[1]) or d >= steps.shape[1]:
            return record
        e = self.extra.get("fp16", {}).get("outputs", {}).get(logits_output, {})
        lim = e.get("fp16_limits") or e.get("limits")  # near ties: under the fp16 part of the limits
        b = self.budget if lim is None else Budget(atol=_limit(lim["atol"]), rtol=_limit(lim["rtol"]))
        rows = np.flatnonzero(ref[:, d] != act[:, d])
        margin, allowed = near_ties(steps[rows, d], b)
        tie = bool(np.all(margin <= allowed))
        record["near_tie"] = {"step": int(d), "margin": float(margin.max()), "allowed": float(allowed.min()),
                              "is_near_tie": tie}
        if tie:
            record["passed"] = True
            record["reason"] += (f"; step {d} is a near tie (fp32 top-1/top-2 margin {margin.max():.3g} <= "
                                 f"{allowed.min():.3g} that the limits let two logits move): later tokens informational")
        else:
            record["reason"] += (f"; not a near tie (fp32 top-1/top-2 margin {margin.max():.3g} > "
                                 f"{allowed.min():.3g})")
        return record

    def to_markdown(self) -> str:
        text = super().to_markdown()
        rec = self.extra.get("fp16")
        if not rec:
            return text
        lines = ["", f"fp16 judgement: {rec['rule']}"]
        for name, e in rec["outputs"].items():
            lim, ref = e["limits"], e["fp16_reference"]
            line = ("- `{}`: limits ".format(name) + ("elementwise not judged" if lim["atol"] is None
                                                         else f"atol {lim['atol']:.3g}") + ", cosine >= " + (
                "-" if lim["min_cosine"] is None else f"{lim['min_cosine']:.6g}"))
            if lim.get("max_kl") is not None and "fp16_limits" in e and e["fp16_limits"] != lim:
                line += f", KL <= {lim['max_kl']:.3g}, rel euclid <= {lim.get('max_rel_euclid') or 0:.3g} (int8 + fp16)"
            if ref is not None:
                line += (f" (fp16 reference vs fp32: max abs {ref['max_abs']:.3g}, cosine {ref['cosine']:.7g}, "
                         f"top-1 {ref['top1_agreement'] if ref['top1_agreement'] is not None else '-'})")
            if "n_positions" in e:
                line += (f"; top-1 on {e['n_decisive']} of {e['n_positions']} positions (near ties excluded: "
                         f"{e['n_near_ties']}, of which {e['n_near_tie_flips']} flipped)")
            lines.append(line)
        return text + "\n".join(lines) + "\n"


def _limit(x: Any) -> float:
    return math.inf if x is None else float(x)


FP16_RULE = (f"each error limit is max(floor, {FP16_REFERENCE_FACTOR:g} x PyTorch fp16's own error vs eager fp32 "
             "on the same inputs); top-1 must agree wherever fp32's top-1/top-2 margin exceeds what the "
             "elementwise limits let two logits move (near ties are excluded and listed)")


QUANT_FP16_RULE = ("quantized fp16 graph vs eager fp32: each limit combines the quantization budget with the fp16 "
                   "limits (" + FP16_RULE + ") at worst case: rel euclid adds, sqrt(1 - cosine) and sqrt(KL) add; "
                   "elementwise error and top-1 are not judged (as for the quantization budget)")


def compare_fp16(
    stage: str,
    reference: Mapping[str, Any],
    actual: Mapping[str, Any],
    fp16_reference: Mapping[str, Any] | None = None,
    *,
    logits_outputs: Iterable[str] = (),
    budget: Budget | None = None,
    reference_note: str | None = None,
    quant_budget: Budget | None = None,
) -> Fp16Report:
    """fp16 ``actual`` vs fp32 ``reference``, judged relative to ``fp16_reference`` (an independent
    fp16 run of the same inputs, e.g. PyTorch autocast; None: the budget's floors alone):

    - per output, the limits are :func:`fp16_limits` of the budget and the fp16 reference's error;
    - top-1 (logits outputs): positions whose reference margin is a :func:`near_ties` near tie under
      those limits are excluded and listed; the rest must agree to ``budget.min_top1``;
    - everything else as :func:`compare` (missing/extra outputs, shapes, non-finite values).

    ``quant_budget`` (a quantized fp16 graph, e.g. ort-cuda int8): each output is judged under
    :func:`quant_fp16_limits` of ``quant_budget`` and the fp16 limits above (recorded as "limits"; the
    fp16 part alone as "fp16_limits"); top-1 follows ``quant_budget`` (near ties are listed under the
    fp16 limits, for information), and so does the report's budget (tokens binding or not).
    """
    budget = budget or budget_for(stage)
    logits = set(logits_outputs)
    base = compare(stage, reference, actual, logits_outputs=logits_outputs, budget=budget)
    record: dict[str, Any] = {"rule": FP16_RULE, "factor": FP16_REFERENCE_FACTOR,
                              "reference": None if fp16_reference is None else (reference_note or "fp16 reference"),
                              "outputs": {}}
    outputs = []
    for o in base.outputs:
        name = o.name
        if name not in reference or name not in actual or o.shape != np.shape(reference[name]) \
                or o.shape is None or any(r.startswith("not numeric") for r in o.reasons):
            outputs.append(o)
            continue
        ref, act = np.asarray(reference[name]), np.asarray(actual[name])
        is_logits = name in logits
        ref_err = None
        if fp16_reference is not None and name in fp16_reference \
                and np.shape(fp16_reference[name]) == ref.shape:
            ref_err = _compare_one(name, ref, np.asarray(fp16_reference[name]), _UNJUDGED, is_logits)
        lim16 = lim = fp16_limits(budget, ref_err)
        if quant_budget is not None:
            lim = quant_fp16_limits(quant_budget, lim16)
        stats = _compare_one(name, ref, act, dataclasses.replace(lim, min_top1=None), is_logits)
        entry: dict[str, Any] = {"limits": lim.to_dict(), "fp16_limits": lim16.to_dict(),
                                 "fp16_reference": None if ref_err is None else {
                                     k: v for k, v in ref_err.to_dict().items()
                                     if k in ("max_abs", "mean_abs", "cosine", "rel_euclid", "kl", "top1_agreement",
                                              "n_failing", "nan_or_inf")}}
        if is_logits and stats.top1_agreement is not None:
            v = ref.shape[-1]
            margin, allowed = near_ties(ref, lim16)
            agree = np.argmax(ref.reshape(-1, v), -1) == np.argmax(act.reshape(-1, v), -1)
            tie = margin <= allowed
            n_dec = int(np.count_nonzero(~tie))
            bad = np.flatnonzero(~tie & ~agree)
            lead = ref.shape[:-1]

            def where(i: int) -> list[int]:
                return [int(x) for x in np.unravel_index(int(i), lead)]

            entry.update({
                "n_positions": int(tie.size), "n_decisive": n_dec, "n_near_ties": int(np.count_nonzero(tie)),
                "n_near_tie_flips": int(np.count_nonzero(tie & ~agree)),
                "top1_decisive": 1.0 if n_dec == 0 else (n_dec - bad.size) / n_dec,
                "near_ties": [{"position": where(i), "margin": float(margin[i]), "allowed": float(allowed[i]),
                               "flipped": bool(not agree[i])} for i in np.flatnonzero(tie)[:32]],
            })
            if lim.min_top1 is not None and not entry["top1_decisive"] >= lim.min_top1:
                i = int(bad[0])
                stats.reasons.append(
                    f"top-1 differs at {bad.size} of {n_dec} positions that are not near ties (first at "
                    f"{where(i)}: fp32 top-1/top-2 margin {margin[i]:.3g} > {allowed[i]:.3g} the limits let two "
                    f"logits move); top-1 on them {_fmt_vs(entry['top1_decisive'], lim.min_top1)} < {lim.min_top1!r}")
                stats.passed = False
        record["outputs"][name] = entry
        outputs.append(stats)
    if quant_budget is not None:
        record["rule"] = QUANT_FP16_RULE
        budget = quant_budget
    return Fp16Report(stage=stage, budget=budget, outputs=outputs, extra={"fp16": record})


def compare_fp16_greedy(stage: str, reference_tokens: Any, reference_steps: Any, actual_tokens: Any,
                        actual_steps: Any, fp16_reference_steps: Any = None,
                        reference_note: str | None = None, quant_budget: Budget | None = None,
                        budget: Budget | None = None) -> Fp16Report:
    """Greedy generation under compare_fp16: step logits [B, N, V] compared up to and including the
    first token mismatch (after it the two runs see different tokens), then the tokens, binding up to
    a near tie. ``fp16_reference_steps``: the fp16 reference's logits along the reference's tokens."""
    ref_t = _as_token_matrix(reference_tokens, "reference_tokens")
    act_t = _as_token_matrix(actual_tokens, "actual_tokens")
    n = min(ref_t.shape[1], act_t.shape[1])
    differs = np.flatnonzero((ref_t[:, :n] != act_t[:, :n]).any(0)) if ref_t.shape[0] == act_t.shape[0] else [0]
    upto = int(differs[0]) + 1 if len(differs) else n
    cut = {"step_logits": np.asarray(reference_steps)[:, :upto]}
    fp16 = None if fp16_reference_steps is None else {"step_logits": np.asarray(fp16_reference_steps)[:, :upto]}
    rep = compare_fp16(stage, cut, {"step_logits": np.asarray(actual_steps)[:, :upto]}, fp16,
                       logits_outputs=["step_logits"], reference_note=reference_note, quant_budget=quant_budget,
                       budget=budget)
    rep.extra["fp16"]["greedy_steps_compared"] = upto
    rep.add_tokens("greedy", ref_t, act_t, reference_step_logits=reference_steps)
    return rep


def write_reports(reports: Sequence[ParityReport], folder: Path) -> tuple[Path, Path]:
    """Write ``folder/parity.json`` and ``folder/parity.md``; returns their paths.

    Deterministic: sorted keys, two-space indent, every float rounded to
    ``JSON_SIGNIFICANT_DIGITS`` significant digits, so the same numbers give byte-identical files.
    Each file is written to a temporary name and renamed into place (never half-written).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA_VERSION, "stages": [_round_floats(r.to_dict()) for r in reports]}
    text = json.dumps(doc, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=True) + "\n"
    n_pass = sum(r.passed for r in reports)
    overall = "PASS" if n_pass == len(reports) else "FAIL"
    md = [
        "# Parity report",
        "",
        f"Overall: **{overall}** ({n_pass} of {len(reports)} stages passed)",
        "",
    ]
    for r in reports:
        md += [r.to_markdown()]
    json_path, md_path = folder / "parity.json", folder / "parity.md"
    _write_atomic(json_path, text)
    _write_atomic(md_path, "\n".join(md))
    return json_path, md_path


# --------------------------------------------------------------------------------------------
# internals


def _compare_one(name: str, ref: np.ndarray, act: np.ndarray, budget: Budget,
                 is_logits: bool) -> OutputStats:
    stats = OutputStats(name=name, shape=tuple(act.shape), dtype=str(act.dtype),
                        n_elements=int(act.size))
    if ref.shape != act.shape:
        stats.reasons.append(f"shape {_shape_str(act.shape)} differs from reference "
                             f"{_shape_str(ref.shape)}")
        return stats
    try:
        r = ref.astype(np.float64)
        a = act.astype(np.float64)
    except (TypeError, ValueError) as e:
        stats.reasons.append(f"not numeric (reference {ref.dtype}, actual {act.dtype}): {e}")
        return stats

    finite_r, finite_a = np.isfinite(r), np.isfinite(a)
    both = finite_r & finite_a
    with np.errstate(invalid="ignore", over="ignore"):
        same = (a == r) | (np.isnan(a) & np.isnan(r))
    nonfinite_mismatch = ~both & ~same
    new_nonfinite = int(np.count_nonzero(finite_r & ~finite_a))
    stats.nan_or_inf = new_nonfinite > 0

    rf, af = r[both], a[both]
    d = np.abs(af - rf)
    if d.size:
        rel = d / np.maximum(np.abs(rf), REL_FLOOR)
        stats.max_abs, stats.mean_abs = float(d.max()), float(d.mean())
        stats.max_rel, stats.mean_rel = float(rel.max()), float(rel.mean())
    else:
        stats.max_abs = stats.mean_abs = stats.max_rel = stats.mean_rel = 0.0
    stats.cosine = _cosine(af, rf)
    stats.rel_euclid = _rel_euclid(af, rf)

    atol, scale = budget.atol, 1.0
    if budget.atol_per_rms and rf.size:
        scale = max(1.0, float(np.sqrt(np.mean(rf * rf))))
        atol = budget.atol * scale
    with np.errstate(invalid="ignore"):  # rtol inf (elementwise not judged) x a zero reference: nan, not failing
        fails = (d > atol) & (d > budget.rtol * np.abs(rf))
    n_poly = int(np.count_nonzero(fails))
    stats.n_failing = n_poly + int(np.count_nonzero(nonfinite_mismatch))

    n_agree = n_pos = 0
    if is_logits:
        if r.ndim == 0:
            stats.reasons.append("declared as logits but is a scalar (needs a vocabulary axis)")
        else:
            stats.top1_agreement, n_agree, n_pos = _top1(r, a)
            stats.kl = _mean_kl(r, a)

    # ---- judge
    if stats.nan_or_inf:
        stats.reasons.append(f"{new_nonfinite} non-finite values (NaN/Inf) in actual where the "
                             f"reference is finite, of {stats.n_elements} elements")
    other_nonfinite = int(np.count_nonzero(nonfinite_mismatch)) - new_nonfinite
    if other_nonfinite:
        stats.reasons.append(f"{other_nonfinite} elements where the reference is non-finite "
                             f"and actual differs, of {stats.n_elements} elements")
    if n_poly:
        worst_flat = int(np.argmax(np.where(fails, d, -1.0)))
        pos = np.flatnonzero(both)[worst_flat]
        idx = tuple(int(i) for i in np.unravel_index(pos, r.shape))
        stats.reasons.append(
            f"max_abs {float(d[worst_flat]):.2e} exceeds atol {budget.atol!r}"
            + (f" x rms {scale:.3g}" if scale != 1.0 else "") + f" at {n_poly} of "
            f"{stats.n_elements} elements (Polygraphy rule: |a-r| > atol and > rtol*|r|, "
            f"rtol {budget.rtol!r}); worst at index {idx}: reference {float(rf[worst_flat]):.6g}, "
            f"actual {float(af[worst_flat]):.6g}")
    if budget.min_cosine is not None and not (stats.cosine >= budget.min_cosine):
        stats.reasons.append(
            f"cosine {_fmt_vs(stats.cosine, budget.min_cosine)} < {budget.min_cosine!r}")
    if budget.max_rel_euclid is not None and not (stats.rel_euclid <= budget.max_rel_euclid):
        stats.reasons.append(f"rel_euclid {_fmt_vs(stats.rel_euclid, budget.max_rel_euclid)} "
                             f"> {budget.max_rel_euclid!r}")
    if stats.top1_agreement is not None and budget.min_top1 is not None \
            and not (stats.top1_agreement >= budget.min_top1):
        stats.reasons.append(
            f"top-1 agreement {_fmt_vs(stats.top1_agreement, budget.min_top1)} "
            f"({n_agree} of {n_pos} positions) < {budget.min_top1!r}")
    if stats.kl is not None and budget.max_kl is not None and not (stats.kl <= budget.max_kl):
        stats.reasons.append(f"KL {_fmt_vs(stats.kl, budget.max_kl)} > {budget.max_kl!r}")
    stats.passed = not stats.reasons
    return stats


def _cosine(a: np.ndarray, r: np.ndarray) -> float:
    na, nr = float(np.linalg.norm(a)), float(np.linalg.norm(r))
    if na == 0.0 and nr == 0.0:
        return 1.0
    if na == 0.0 or nr == 0.0:
        return 0.0
    # Normalise first: avoids overflow of the product for large-magnitude outputs.
    c = float(np.dot(a / na, r / nr))
    return max(-1.0, min(1.0, c))


def _rel_euclid(a: np.ndarray, r: np.ndarray) -> float:
    num, den = float(np.linalg.norm(a - r)), float(np.linalg.norm(r))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _top1(r: np.ndarray, a: np.ndarray) -> tuple[float, int, int]:
    v = r.shape[-1]
    rr, aa = r.reshape(-1, v), a.reshape(-1, v)
    n_pos = rr.shape[0]
    if n_pos == 0 or v == 0:
        return 1.0, 0, n_pos
    agree = int(np.count_nonzero(np.argmax(rr, axis=-1) == np.argmax(aa, axis=-1)))
    return agree / n_pos, agree, n_pos


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _mean_kl(r: np.ndarray, a: np.ndarray) -> float:
    v = r.shape[-1]
    rr, aa = r.reshape(-1, v), a.reshape(-1, v)
    if rr.shape[0] == 0 or v == 0:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        lr, la = _log_softmax(rr), _log_softmax(aa)
        p = np.exp(lr)
        terms = np.where(p > 0, p * (lr - la), 0.0)  # 0 * log(0/q) = 0
        per_pos = np.maximum(terms.sum(axis=-1), 0.0)  # clamp rounding below 0; NaN stays NaN
    return float(per_pos.mean())


def _as_token_matrix(tokens: Any, what: str) -> np.ndarray:
    t = np.asarray(tokens)
    if t.ndim == 1:
        t = t[None, :]
    if t.ndim != 2:
        raise ValueError(f"{what} must be [steps] or [batch, steps], got shape {t.shape}")
    if t.size and not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"{what} must be integer token ids, got dtype {t.dtype}")
    return t.astype(np.int64)


def _shape_str(shape: Sequence[int] | None) -> str:
    if shape is None:
        return "-"
    return "[" + "x".join(str(int(d)) for d in shape) + "]"


def _fmt_vs(value: float, limit: float, min_digits: int = 3) -> str:
    """``value`` with the fewest significant digits (>= min_digits) that keep it on the same
    side of ``limit`` (so "cosine 0.9999899 < 0.99999", not "cosine 1 < 0.99999")."""
    if not math.isfinite(value):
        return str(value)

    def side(x: float) -> int:
        return (x > limit) - (x < limit)

    for p in range(min_digits, 18):
        s = f"{value:.{p}g}"
        if side(float(s)) == side(value):
            return s
    return repr(value)


def _md(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _md_vs(value: float | None, limit: float | None, min_digits: int) -> str:
    if value is None:
        return "-"
    if limit is None:
        return f"{value:.{min_digits}g}"
    return _fmt_vs(value, limit, min_digits)


def _json_float(x: float | None) -> float | str | None:
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def _jsonable(obj: Any) -> Any:
    """Turn numpy scalars/arrays, tuples and non-finite floats into plain JSON values."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _json_float(float(obj))
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"parity report extra holds a {type(obj).__name__}, not JSON-serialisable")


def _round_floats(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _round_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round_floats(v) for v in obj]
    if isinstance(obj, float):
        return float(f"{obj:.{JSON_SIGNIFICANT_DIGITS}g}")
    return obj


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8", newline="\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------------
# routing-aware comparison of lossy stages

MAX_FLIPPED_FRACTION = 0.10
"""Default share of (position, MoE layer) routing decisions a lossy stage may flip (a budget's
max_flipped_fraction overrides it): rare near ties are expected,
a router that drifts on many tokens is not. One flip is always allowed (a decode step of a batch of two
has only a handful of decisions); its margin is judged regardless."""

FLIP_MARGIN_FACTOR = 2.0
"""A flip is a near tie when the reference's margin is at most this x the movement the stage's error
gives the decision (2 x the layer's largest router-score error under teacher-forced routing, taken over the
positions whose choice agreed: a flipped position's own scores moved by at least half its margin)."""

ROUTED_RULE = ("numeric error judged with the reference's routing forced (teacher-forced: the lossy graph reads "
               "the reference's gate logits); routing flips judged on the lossy graph's own gate logits: at most "
               "the budget's share of (position, layer) decisions (one flip always allowed), and none whose reference margin "
               f"exceeds {FLIP_MARGIN_FACTOR:g} x what the layer's router-score error (where its choice agreed) can "
               "move")


@dataclass(frozen=True)
class Router:
    """One MoE layer's routing rule (models/moe.py Router), for computing ids and margins in numpy."""

    k: int  # num_experts_per_tok
    scoring_func: str = "sigmoid"  # or "softmax", or "sqrtsoftplus" (DeepSeek-V4: sqrt(softplus(x)))
    topk_method: str = "noaux_tc"  # or "group_limited_greedy", "greedy"
    n_group: int = 1
    topk_group: int = 1
    e_score_correction_bias: np.ndarray | None = None

    @classmethod
    def of(cls, cfg: Any, bias: Any = None) -> Router:
        return cls(cfg.num_experts_per_tok, cfg.scoring_func, cfg.topk_method, cfg.n_group or 1,
                   cfg.topk_group or 1, None if bias is None else np.asarray(bias, np.float64))

    def choice_scores(self, gate_logits: np.ndarray) -> np.ndarray:
        x = np.asarray(gate_logits, np.float64).reshape(-1, np.shape(gate_logits)[-1])
        if self.scoring_func == "sigmoid":
            s = 1.0 / (1.0 + np.exp(-x))
        elif self.scoring_func == "sqrtsoftplus":
            s = np.sqrt(np.logaddexp(0.0, x))
        elif self.scoring_func != "softmax":
            raise ValueError(f"Router scoring_func {self.scoring_func!r}: sigmoid, softmax or sqrtsoftplus")
        else:
            e = np.exp(x - x.max(-1, keepdims=True))
            s = e / e.sum(-1, keepdims=True)
        return s if self.e_score_correction_bias is None else s + self.e_score_correction_bias


def route(router: Router, gate_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(expert ids [N, k] as sorted sets, margin [N]) of gate logits [..., E]. The margin is how far the
    decision is from changing, in choice-score units: the k-th minus (k+1)-th choice score among the kept
    groups, and, with groups, the kept group's score minus the best dropped one (halved for noaux_tc,
    whose group score sums two choice scores)."""
    c = router.choice_scores(gate_logits)
    n, e = c.shape
    grouped = router.topk_method != "greedy" and router.n_group > 1
    group_margin = np.full(n, np.inf)
    if grouped:
        g = c.reshape(n, router.n_group, -1)
        gs = (np.sort(g, -1)[..., -2:].sum(-1) if router.topk_method == "noaux_tc" else g.max(-1))
        order = np.argsort(-gs, -1, kind="stable")
        keep = np.zeros_like(gs, bool)
        np.put_along_axis(keep, order[:, :router.topk_group], True, -1)
        if router.topk_group < router.n_group:
            srt = -np.sort(-gs, -1)
            group_margin = srt[:, router.topk_group - 1] - srt[:, router.topk_group]
            if router.topk_method == "noaux_tc":
                group_margin = group_margin / 2
        c = np.where(np.repeat(keep, e // router.n_group, -1), c, -np.inf)
    ids = np.sort(np.argsort(-c, -1, kind="stable")[:, :router.k], -1)
    srt = -np.sort(-c, -1)
    with np.errstate(invalid="ignore"):
        expert_margin = (srt[:, router.k - 1] - srt[:, router.k]) if e > router.k else np.full(n, np.inf)
    expert_margin = np.where(np.isfinite(expert_margin), expert_margin, np.inf)
    return ids, np.minimum(expert_margin, group_margin)


class RoutedReport(ParityReport):
    """A report whose outputs were judged under teacher-forced routing; it also fails on
    extra["routing"]["reasons"] (too many flips, or a flip at a margin the stage's error cannot explain)."""

    def _routing_reasons(self) -> list[str]:
        return list(self.extra.get("routing", {}).get("reasons", []))

    @property
    def passed(self) -> bool:
        return super().passed and not self._routing_reasons()

    def failure_reasons(self) -> list[str]:
        return super().failure_reasons() + [f"routing: {r}" for r in self._routing_reasons()]

    def raise_if_failed(self) -> ParityReport:
        if self.passed:
            return self
        lines = [f"parity failed at stage {self.stage!r} (budget: {self.budget.describe()}; {ROUTED_RULE}):"]
        lines += [f"  {r}" for r in self.failure_reasons()]
        raise ParityError("\n".join(lines), report=self)

    def to_markdown(self) -> str:
        text = super().to_markdown()
        rt = self.extra.get("routing")
        if not rt:
            return text
        lines = ["", f"Routing ({rt['rule']}): {rt['summary']}", ""]
        lines += [f"- flip: {_routing_flip_text(f)}" for f in rt["flips"]]
        lines += [f"- selection flip: {_selection_flip_text(f)}" for f in rt.get("selection", {}).get("flips", [])]
        lines += [f"- routing: {r}" for r in rt["reasons"]]
        return text + "\n".join(lines) + "\n"


def _routing_flip_text(f: dict) -> str:
    return (f"layer {f['layer']} position {f['position']}: experts {f['experts_reference']} -> {f['experts_actual']}"
            f" (reference margin {f['margin']:.3g}, the stage's error moves it up to {f['allowed']:.3g})")


FORCED_TIE_MARGIN = 1e-5
"""Under forced routing the lossy graph's router reads the reference's gate logits, so an fp32 router picks the
reference's experts exactly: a different choice is only allowed where the reference's own margin is at fp32
rounding level (this, in choice-score units). Anything else is a router that does not compute what the
checkpoint's does (e.g. its fp32 island lost to fp16, or its bias dropped)."""


def _judge_routing(budget: Budget | None, reference_gates: Sequence[np.ndarray], actual_gates: Sequence[np.ndarray],
                   routers: Sequence[Router], forced_router_probs: Sequence[np.ndarray] | None = None,
                   max_flipped_fraction: float | None = None,
                   labels: Sequence[Any] | None = None) -> tuple[list[OutputStats], dict[str, Any]]:
    """The routing part of a routed comparison: (the gate logits judged as outputs under ``budget``; none when
    ``budget`` is None, the caller judging them, the extra["routing"] record with its failure reasons).
    The share of flips allowed: ``max_flipped_fraction``, else ``budget``'s, else MAX_FLIPPED_FRACTION. ``forced_router_probs``: per layer, what the lossy graph's
    MoE op read as router_probs in the forced run (its expert choice given the reference's gate logits).
    ``labels``: what a flip's "position" is, per row of the flattened leading axes (e.g. [batch row, absolute
    position] where the gates of several runs are stacked); else the index into the gates' leading axes."""
    if not (len(reference_gates) == len(actual_gates) == len(routers)):
        raise ValueError(f"{len(reference_gates)} reference gate logits, {len(actual_gates)} actual, "
                         f"{len(routers)} routers: one of each per MoE layer")
    if forced_router_probs is not None and len(forced_router_probs) != len(routers):
        raise ValueError(f"{len(forced_router_probs)} forced router_probs for {len(routers)} MoE layers")
    outputs, flips, reasons, n_dec, per_layer, not_reproduced = [], [], [], 0, [], []
    for layer, (rg, ag, router) in enumerate(zip(reference_gates, actual_gates, routers)):
        rg, ag = np.asarray(rg, np.float64), np.asarray(ag, np.float64)
        if rg.shape != ag.shape:
            raise ValueError(f"MoE layer {layer}: gate logits {list(ag.shape)} vs reference {list(rg.shape)}")
        lead = rg.shape[:-1]
        if labels is not None and len(labels) != int(np.prod(lead)):
            raise ValueError(f"{len(labels)} labels for {int(np.prod(lead))} gate rows")

        def where(i: int) -> Any:
            return labels[int(i)] if labels is not None else [int(x) for x in np.unravel_index(int(i), lead)]
        # the gate logits are judged as outputs too: a router the stage breaks would otherwise widen its own
        # allowed margin (the movement below is measured on them)
        if budget is not None:
            outputs.append(_compare_one(f"routing.{layer}.gate_logits", rg, ag, budget, False))
        ids_r, margin = route(router, rg)
        ids_a, _ = route(router, ag)
        err = np.abs(router.choice_scores(ag) - router.choice_scores(rg))
        differ = (ids_r != ids_a).any(-1)
        # the stage's error where its choice agreed: a flipped row moved its own scores by at least half its margin,
        # so counting it would excuse any margin
        agreed = err[~differ] if (~differ).any() else err
        moved = float(np.max(agreed)) if agreed.size else 0.0
        allowed = FLIP_MARGIN_FACTOR * 2 * moved
        flipped = np.flatnonzero(differ)
        n_dec += ids_r.shape[0]
        entry = {"layer": layer, "max_score_error": moved, "allowed_margin": allowed,
                 "n_flips": int(flipped.size), "min_reference_margin": float(margin.min()) if margin.size else None}
        for i in flipped:
            f = {"layer": layer, "position": where(i),
                 "experts_reference": ids_r[i].tolist(), "experts_actual": ids_a[i].tolist(),
                 "margin": float(margin[i]), "allowed": allowed}
            flips.append(f)
            if not f["margin"] <= allowed:
                reasons.append(f"{_routing_flip_text(f)}: not a near tie")
        if forced_router_probs is not None:
            probs = np.asarray(forced_router_probs[layer], np.float64).reshape(-1, rg.shape[-1])
            if probs.shape[0] != ids_r.shape[0]:
                raise ValueError(f"MoE layer {layer}: forced router_probs {list(np.shape(forced_router_probs[layer]))}"
                                 f" vs gate logits {list(rg.shape)}")
            ids_f = np.sort(np.argsort(-probs, -1, kind="stable")[:, :router.k], -1)
            differ = np.flatnonzero((ids_f != ids_r).any(-1))
            bad = differ[margin[differ] > FORCED_TIE_MARGIN]
            entry["forced_not_reproduced"] = int(differ.size)
            for i in bad[:4]:
                not_reproduced.append(
                    f"layer {layer} position {where(i)}: given the reference's "
                    f"gate logits, the graph's router chose experts {ids_f[i].tolist()}, the reference's router "
                    f"{ids_r[i].tolist()} (reference margin {margin[i]:.3g} > {FORCED_TIE_MARGIN:g}): the router does "
                    "not compute the checkpoint's routing (is it still fp32, with its bias and groups?)")
            if bad.size > 4:
                not_reproduced.append(f"layer {layer}: {bad.size - 4} more positions whose forced routing differs")
        per_layer.append(entry)
    reasons += not_reproduced
    share = len(flips) / n_dec if n_dec else 0.0
    max_share = (max_flipped_fraction if max_flipped_fraction is not None
                 else budget.max_flipped_fraction if budget is not None and budget.max_flipped_fraction is not None
                 else MAX_FLIPPED_FRACTION)
    if share > max_share and len(flips) > 1:
        reasons.append(f"routing flipped at {len(flips)} of {n_dec} (position, layer) decisions "
                       f"({100 * share:.1f}% > {100 * max_share:g}%)")
    summary = ("no routing flip" if not flips else
               f"{len(flips)} of {n_dec} (position, layer) decisions flipped, all near ties" if not reasons else
               f"{len(flips)} of {n_dec} (position, layer) decisions flipped")
    record: dict[str, Any] = {"rule": ROUTED_RULE, "summary": summary, "n_decisions": n_dec,
                              "n_flips": len(flips), "flipped_share": share, "layers": per_layer,
                              "flips": flips[:64], "reasons": reasons,
                              "max_flipped_fraction": max_share, "flip_margin_factor": FLIP_MARGIN_FACTOR,
                              "forced_routing_checked": forced_router_probs is not None,
                              "forced_tie_margin": FORCED_TIE_MARGIN}
    return outputs, record


SELECTION_RULE = ("selections (TopKs outside the MoE routers: DeepSeek-V3.2's lightning indexer picking the keys each "
                  "query attends to) judged like routing: numeric error with the reference's scores forced into the "
                  "TopK; flips judged on the lossy graph's own scores: at most the budget's share of (query, selection) "
                  f"decisions (one flip always allowed), none whose reference margin (k-th minus (k+1)-th score) exceeds "
                  f"{FLIP_MARGIN_FACTOR:g} x 2 x the selection's largest score error where its choice agreed; given the "
                  "reference's scores the "
                  "TopK must pick the reference's keys")


def _finite_pair(ref: np.ndarray, act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scores where the reference is finite; both 0 where the reference is masked (-inf): the causal mask is
    the same constant in both graphs, an actual non-finite value where the reference is finite stays and fails."""
    keep = np.isfinite(ref)
    return np.where(keep, ref, 0.0), np.where(keep, act, 0.0)


def selection_outputs(selections: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """({name: reference scores}, {name: actual scores}) of the selections, masked entries zeroed (_finite_pair):
    judged as outputs, so that a stage that breaks the indexer cannot widen its own allowed flip margin."""
    if not selections:
        return {}, {}
    ref, act = {}, {}
    for j, (r, a) in enumerate(zip(selections["reference_scores"], selections["actual_scores"])):
        ref[f"selection.{j}.scores"], act[f"selection.{j}.scores"] = _finite_pair(
            np.asarray(r, np.float64), np.asarray(a, np.float64))
    return ref, act


def top_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """Sorted top-k ids per row [N, k] of scores [N, T] (equal scores: the lower id, as ONNX TopK and
    models/indexer.py pick)."""
    return np.sort(np.argsort(-scores, -1, kind="stable")[:, :k], -1)


def selection_margin(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row of scores [N, T]: the k-th minus the (k+1)-th largest score (inf where fewer than k + 1 keys are
    visible): how far a top-k selection is from changing."""
    srt = -np.sort(-scores, -1)
    with np.errstate(invalid="ignore"):
        margin = srt[:, k - 1] - srt[:, k] if scores.shape[-1] > k else np.full(scores.shape[0], np.inf)
    return np.where(np.isfinite(margin), margin, np.inf)


def _judge_selections(selections: Mapping[str, Any] | None, max_share: float) -> dict[str, Any] | None:
    """The selection record (SELECTION_RULE) of a forced run: selections from pipeline/build.py RoutingProbe.run
    ("reference_scores", "reference_ids", "actual_scores", "forced_ids", one per selection [..., T] / [..., k])."""
    if not selections:
        return None
    flips, reasons, per, n_dec = [], [], [], 0
    for j, (rs, rids, acs, fids) in enumerate(zip(selections["reference_scores"], selections["reference_ids"],
                                                   selections["actual_scores"], selections["forced_ids"])):
        rs, acs = np.asarray(rs, np.float64), np.asarray(acs, np.float64)
        if rs.shape != acs.shape:
            raise ValueError(f"selection {j}: scores {list(acs.shape)} vs reference {list(rs.shape)}")
        lead, T, k = rs.shape[:-1], rs.shape[-1], int(np.shape(rids)[-1])
        r2, a2 = rs.reshape(-1, T), acs.reshape(-1, T)
        ids_r, ids_a = top_ids(r2, k), top_ids(a2, k)
        ref_ids = np.sort(np.asarray(rids).reshape(-1, k), -1)
        margin = selection_margin(r2, k)
        differ = (ids_r != ids_a).any(-1)
        fin = np.isfinite(r2) & (~differ[:, None] if (~differ).any() else True)  # error where the choice agreed
        with np.errstate(invalid="ignore"):  # -inf - -inf at the masked keys, dropped by `fin`
            moved = float(np.max(np.abs(a2 - r2)[fin])) if fin.any() else 0.0
        allowed = FLIP_MARGIN_FACTOR * 2 * moved
        flipped = np.flatnonzero(differ)
        n_dec += r2.shape[0]
        entry = {"selection": j, "k": k, "keys": T, "max_score_error": moved, "allowed_margin": allowed,
                 "n_flips": int(flipped.size), "min_reference_margin": float(margin.min()) if margin.size else None}
        for i in flipped:
            f = {"selection": j, "query": [int(x) for x in np.unravel_index(int(i), lead)],
                 "keys_reference": ids_r[i].tolist(), "keys_actual": ids_a[i].tolist(),
                 "margin": float(margin[i]), "allowed": allowed}
            flips.append(f)
            if not f["margin"] <= allowed:
                reasons.append(f"{_selection_flip_text(f)}: not a near tie")
        if fids is not None:
            forced = np.sort(np.asarray(fids).reshape(-1, k), -1)
            bad = np.flatnonzero((forced != ref_ids).any(-1) & (margin > FORCED_TIE_MARGIN))
            entry["forced_not_reproduced"] = int(bad.size)
            for i in bad[:4]:
                reasons.append(f"selection {j} query {[int(x) for x in np.unravel_index(int(i), lead)]}: given the "
                               f"reference's scores the graph's TopK picked keys {forced[i].tolist()}, the reference "
                               f"{ref_ids[i].tolist()} (reference margin {margin[i]:.3g})")
        per.append(entry)
    share = len(flips) / n_dec if n_dec else 0.0
    if share > max_share and len(flips) > 1:
        reasons.append(f"selection flipped at {len(flips)} of {n_dec} (query, selection) decisions "
                       f"({100 * share:.1f}% > {100 * max_share:g}%)")
    summary = ("no selection flip" if not flips else
               f"{len(flips)} of {n_dec} (query, selection) decisions flipped, all near ties" if not reasons else
               f"{len(flips)} of {n_dec} (query, selection) decisions flipped")
    return {"rule": SELECTION_RULE, "summary": summary, "n_decisions": n_dec, "n_flips": len(flips),
            "flipped_share": share, "selections": per, "flips": flips[:64], "reasons": reasons,
            "max_flipped_fraction": max_share}


def _selection_flip_text(f: dict) -> str:
    return (f"selection {f['selection']} query {f['query']}: keys {f['keys_reference']} -> {f['keys_actual']} "
            f"(reference margin {f['margin']:.3g}, the stage's error moves it up to {f['allowed']:.3g})")


def _with_selection(record: dict, selection: dict | None) -> dict:
    """The routing record with the selection record beside it; its failure reasons join the routing's (prefixed)."""
    if selection is not None:
        record["selection"] = selection
        record["reasons"] = list(record["reasons"]) + [f"selection: {r}" for r in selection["reasons"]]
        if selection["reasons"] and record["summary"].endswith("all near ties"):
            record["summary"] = record["summary"][:-len(", all near ties")]
        record["summary"] += f"; {selection['summary']}"
    return record


def _unforced_record(stage: str, reference: Mapping[str, Any], unforced: Mapping[str, Any],
                     logits_outputs: Iterable[str], budget: Budget) -> dict[str, Any]:
    info = compare(stage, reference, {k: v for k, v in unforced.items() if k in reference},
                   logits_outputs=logits_outputs, budget=budget)
    return {o.name: {"cosine": o.cosine, "rel_euclid": o.rel_euclid, "kl": o.kl,
                     "top1_agreement": o.top1_agreement} for o in info.outputs}


def compare_routed(stage: str, reference: Mapping[str, Any], forced: Mapping[str, Any],
                   reference_gates: Sequence[np.ndarray], actual_gates: Sequence[np.ndarray],
                   routers: Sequence[Router], *, logits_outputs: Iterable[str] = (),
                   budget: Budget | None = None, unforced: Mapping[str, Any] | None = None,
                   forced_router_probs: Sequence[np.ndarray] | None = None,
                   selections: Mapping[str, Any] | None = None) -> RoutedReport:
    """Routing-aware comparison of a lossy stage.

    reference: the reference's outputs; forced: the lossy graph's outputs with the reference's gate logits
    forced (passes/routing_probes.py force_gate_logits); reference_gates / actual_gates: per MoE layer, the
    reference's gate logits and the lossy graph's own (from the forced run: every earlier layer routed as the
    reference did, so each flip is the stage's own decision at that layer) [..., E]; routers: per layer.
    Outputs are judged as :func:`compare` judges them (on ``forced``); ``unforced`` outputs (the lossy graph
    routing by itself) are compared too and recorded, not judged. ``forced_router_probs`` (per layer, the
    MoE op's router_probs input in the forced run): the experts it selects must be the reference's wherever
    the reference's margin is above FORCED_TIE_MARGIN. ``selections`` (pipeline/build.py RoutingProbe.run: the
    forced run of a graph with TopKs outside the routers, the lightning indexer's): their scores are judged as
    outputs, their flips as SELECTION_RULE says (_judge_selections).
    """
    sel_ref, sel_act = selection_outputs(selections)
    base = compare(stage, {**reference, **sel_ref}, {**{k: v for k, v in forced.items() if k in reference}, **sel_act},
                   logits_outputs=logits_outputs, budget=budget)
    gates, record = _judge_routing(base.budget, reference_gates, actual_gates, routers, forced_router_probs)
    share = base.budget.max_flipped_fraction if base.budget.max_flipped_fraction is not None else MAX_FLIPPED_FRACTION
    record = _with_selection(record, _judge_selections(selections, share))
    if unforced is not None:
        record["unforced"] = _unforced_record(stage, reference, unforced, logits_outputs, base.budget)
    return RoutedReport(stage=stage, budget=base.budget, outputs=base.outputs + gates, extra={"routing": record})


class RoutedFp16Report(RoutedReport, Fp16Report):
    """A :class:`Fp16Report` judged under teacher-forced routing, with the routing record of RoutedReport."""


def compare_fp16_routed(stage: str, reference: Mapping[str, Any], forced: Mapping[str, Any],
                        reference_gates: Sequence[np.ndarray], actual_gates: Sequence[np.ndarray],
                        routers: Sequence[Router], fp16_reference: Mapping[str, Any] | None = None, *,
                        logits_outputs: Iterable[str] = (), budget: Budget | None = None,
                        reference_note: str | None = None, quant_budget: Budget | None = None,
                        unforced: Mapping[str, Any] | None = None,
                        forced_router_probs: Sequence[np.ndarray] | None = None,
                        selections: Mapping[str, Any] | None = None) -> RoutedFp16Report:
    """:func:`compare_fp16` of the forced run (the fp16 graph computing with the reference's gate logits) plus
    the routing judgement of :func:`compare_routed`. The gate logits are outputs of the fp16 judgement (their
    limits widened by ``fp16_reference``'s gate logits ``routing.{i}.gate_logits``, where it has them)."""
    gates_ref = {f"routing.{i}.gate_logits": np.asarray(g) for i, g in enumerate(reference_gates)}
    gates_act = {f"routing.{i}.gate_logits": np.asarray(g) for i, g in enumerate(actual_gates)}
    sel_ref, sel_act = selection_outputs(selections)
    base = compare_fp16(stage, {**reference, **gates_ref, **sel_ref},
                        {**{k: v for k, v in forced.items() if k in reference}, **gates_act, **sel_act}, fp16_reference,
                        logits_outputs=logits_outputs, budget=budget, reference_note=reference_note,
                        quant_budget=quant_budget)
    _, record = _judge_routing(None, reference_gates, actual_gates, routers, forced_router_probs,
                               base.budget.max_flipped_fraction)
    share = base.budget.max_flipped_fraction if base.budget.max_flipped_fraction is not None else MAX_FLIPPED_FRACTION
    record = _with_selection(record, _judge_selections(selections, share))
    if unforced is not None:
        record["unforced"] = _unforced_record(stage, reference, unforced, logits_outputs, _UNJUDGED)
    return RoutedFp16Report(stage=stage, budget=base.budget, outputs=base.outputs,
                            extra={**base.extra, "routing": record})
