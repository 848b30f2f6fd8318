"""pipeline.parity: each number checked against an independent (hand or loop) computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from models.errors import MlamoeError
from pipeline.parity import (
    BUDGETS,
    REL_FLOOR,
    Budget,
    OutputStats,
    ParityError,
    ParityReport,
    compare,
    write_reports,
)

LOOSE = Budget(atol=1e-4, rtol=1e-3)  # elementwise rule only


def one(report: ParityReport, name: str = "y") -> OutputStats:
    (stats,) = [o for o in report.outputs if o.name == name]
    return stats


# ---------------------------------------------------------------- Polygraphy rule and abs/rel


def test_polygraphy_rule_needs_both_atol_and_rtol_exceeded():
    ref = np.array([1.0, 100.0, 0.0, 2.0], dtype=np.float32)
    act = np.array([
        1.0 + 5e-5,  # within atol
        100.05,  # beyond atol (5e-2 > 1e-4) but within rtol (5e-2 < 1e-3 * 100 = 0.1)
        0.0,  # exact
        2.0,  # exact
    ], dtype=np.float32)
    s = one(compare("export", {"y": ref}, {"y": act}, budget=LOOSE))
    assert s.n_failing == 0 and s.passed and s.reasons == []
    assert s.n_elements == 4

    act_bad = act.copy()
    act_bad[3] = 2.01  # 1e-2 > atol 1e-4 and 1e-2 > rtol*2 = 2e-3: fails
    s = one(compare("export", {"y": ref}, {"y": act_bad}, budget=LOOSE))
    assert s.n_failing == 1 and not s.passed
    (reason,) = s.reasons
    assert "Polygraphy" in reason and "1 of 4 elements" in reason and "atol 0.0001" in reason
    assert "index (3,)" in reason


def test_fp32_atol_scales_with_the_outputs_rms_above_one():
    """The fp32 budgets' atol is per unit of the output's RMS (> 1): rounding of large terms lands on a near-zero
    element of a large-scale output (the measured case: 1.09e-4 at a logit of 0.106, logits rms 3.1) without
    failing, while the same absolute error on a unit-scale output, or 10x it on the large one, still fails."""
    fp32 = BUDGETS["export"]
    assert fp32.atol_per_rms and "x max(1, output rms)" in fp32.describe()
    rng = np.random.default_rng(0)
    big = rng.normal(0, 3.1, (12, 128))
    big[7, 13] = 0.106443
    rms = float(np.sqrt(np.mean(big ** 2)))
    act = big.copy()
    act[7, 13] += 1.09e-4
    assert one(compare("export", {"y": big}, {"y": act})).passed
    act[7, 13] = 0.106443 + 10 * 1.09e-4  # a real error at that scale
    s = one(compare("export", {"y": big}, {"y": act}))
    assert not s.passed and f"x rms {rms:.3g}" in s.reasons[0]
    unit = rng.normal(0, 0.5, (12, 128))  # rms < 1: atol stays 1e-4
    unit[7, 13] = 0.05
    act = unit.copy()
    act[7, 13] += 1.09e-4
    s = one(compare("export", {"y": unit}, {"y": act}))
    assert not s.passed and "x rms" not in s.reasons[0]


def test_abs_and_rel_statistics_by_hand():
    ref = np.array([[2.0, -4.0], [0.0, 1.0]])
    act = np.array([[2.5, -4.0], [0.001, 0.5]])
    s = one(compare("export", {"y": ref}, {"y": act}, budget=Budget(atol=10.0, rtol=0.0)))
    # |a-r| = 0.5, 0, 0.001, 0.5
    assert s.max_abs == pytest.approx(0.5)
    assert s.mean_abs == pytest.approx((0.5 + 0 + 0.001 + 0.5) / 4)
    # rel = 0.5/2, 0/4, 0.001/REL_FLOOR (|ref| = 0 is floored), 0.5/1
    rels = [0.25, 0.0, 0.001 / REL_FLOOR, 0.5]
    assert s.max_rel == pytest.approx(max(rels))
    assert s.mean_rel == pytest.approx(sum(rels) / 4)
    assert s.shape == (2, 2) and s.dtype == "float64" and s.passed


# ---------------------------------------------------------------- cosine, rel euclid


def test_cosine_identical_orthogonal_opposite():
    x = np.array([1.0, 0.0])
    y = np.array([0.0, 1.0])
    assert one(compare("export", {"y": x}, {"y": x}, budget=LOOSE)).cosine == pytest.approx(1.0)
    assert one(compare("export", {"y": x}, {"y": y}, budget=LOOSE)).cosine == pytest.approx(0.0)
    assert one(compare("export", {"y": x}, {"y": -x}, budget=LOOSE)).cosine == pytest.approx(-1.0)
    # 45 degrees, by hand: cos = 1/sqrt(2)
    s = one(compare("export", {"y": x}, {"y": np.array([3.0, 3.0])},
                    budget=Budget(atol=100.0, rtol=0.0, min_cosine=0.99)))
    assert s.cosine == pytest.approx(1 / math.sqrt(2))
    assert not s.passed and s.reasons == ["cosine 0.707 < 0.99"]


def test_cosine_reason_does_not_round_to_the_limit():
    ref = np.array([1.0, 0.0])
    theta = math.acos(0.9999899)
    act = np.array([math.cos(theta), math.sin(theta)])
    s = one(compare("export", {"y": ref}, {"y": act},
                    budget=Budget(atol=1.0, rtol=0.0, min_cosine=0.99999)))
    assert not s.passed
    assert s.reasons == ["cosine 0.9999899 < 0.99999"]


def test_rel_euclid_by_hand():
    ref = np.array([3.0, 4.0])  # ||r|| = 5
    act = np.array([3.0, 4.5])  # ||a-r|| = 0.5
    s = one(compare("export", {"y": ref}, {"y": act},
                    budget=Budget(atol=1.0, rtol=0.0, max_rel_euclid=0.05)))
    assert s.rel_euclid == pytest.approx(0.1)
    assert not s.passed and s.reasons == ["rel_euclid 0.1 > 0.05"]


def test_all_zero_outputs_agree():
    z = np.zeros((2, 3), dtype=np.float32)
    s = one(compare("export", {"y": z}, {"y": z}))
    assert s.cosine == 1.0 and s.rel_euclid == 0.0 and s.max_abs == 0.0 and s.passed


# ---------------------------------------------------------------- logits: top-1 and KL


def test_top1_agreement_over_flattened_positions():
    ref = np.array([[[0.0, 1.0, 0.0], [5.0, 0.0, 0.0]],
                    [[0.0, 0.0, 2.0], [1.0, 3.0, 2.0]]])  # argmax 1, 0, 2, 1
    act = np.array([[[0.0, 1.0, 0.5], [5.0, 0.0, 0.0]],
                    [[3.0, 0.0, 2.0], [1.0, 3.0, 2.0]]])  # argmax 1, 0, 0, 1
    s = one(compare("export", {"logits": ref}, {"logits": act},
                    logits_outputs=["logits"],
                    budget=Budget(atol=10.0, rtol=0.0, min_top1=1.0)), "logits")
    assert s.top1_agreement == pytest.approx(0.75)
    assert not s.passed
    assert s.reasons == ["top-1 agreement 0.75 (3 of 4 positions) < 1.0"]


def _kl_by_loops(ref, act):
    total = 0.0
    for rrow, arow in zip(ref, act):
        zr = sum(math.exp(v) for v in rrow)
        za = sum(math.exp(v) for v in arow)
        kl = 0.0
        for vr, va in zip(rrow, arow):
            p, q = math.exp(vr) / zr, math.exp(va) / za
            kl += p * math.log(p / q)
        total += kl
    return total / len(ref)


def test_kl_zero_for_identical_and_matches_hand_value():
    ref = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    act = [[1.0, 2.0, 2.0], [0.0, 1.0, 0.0]]
    r, a = np.array(ref, dtype=np.float32), np.array(act, dtype=np.float32)
    same = one(compare("export", {"l": r}, {"l": r}, logits_outputs=["l"]), "l")
    assert same.kl == 0.0 and same.top1_agreement == 1.0 and same.passed

    s = one(compare("export", {"l": r}, {"l": a}, logits_outputs=["l"],
                    budget=Budget(atol=10.0, rtol=0.0, max_kl=0.005)), "l")
    expected = _kl_by_loops(ref, act)
    assert expected > 0.005
    assert s.kl == pytest.approx(expected, rel=1e-12)
    assert not s.passed and len(s.reasons) == 1 and s.reasons[0].startswith("KL ")
    assert s.reasons[0].endswith("> 0.005")


def test_kl_is_stable_for_large_logits():
    r = np.array([[1000.0, 0.0, -1000.0]])
    a = np.array([[1000.0, 1.0, -1000.0]])
    s = one(compare("export", {"l": r}, {"l": a}, logits_outputs=["l"],
                    budget=Budget(atol=10.0, rtol=0.0)), "l")
    assert math.isfinite(s.kl) and s.kl >= 0.0


def test_non_logits_outputs_have_no_top1_or_kl():
    x = np.ones((2, 3))
    s = one(compare("export", {"y": x}, {"y": x}))
    assert s.top1_agreement is None and s.kl is None


# ---------------------------------------------------------------- NaN / Inf


def test_nan_in_actual_is_detected_and_fails():
    ref = np.array([1.0, 2.0, 3.0])
    act = np.array([1.0, np.nan, 3.0])
    s = one(compare("export", {"y": ref}, {"y": act}))
    assert s.nan_or_inf and not s.passed and s.n_failing == 1
    assert any("1 non-finite" in r for r in s.reasons)
    # statistics come from the finite positions
    assert s.max_abs == 0.0


def test_matching_non_finite_values_are_not_failures():
    ref = np.array([1.0, -np.inf, np.nan])
    act = np.array([1.0, -np.inf, np.nan])
    s = one(compare("export", {"y": ref}, {"y": act}))
    assert not s.nan_or_inf and s.n_failing == 0 and s.passed


def test_inf_in_actual_logits_fails():
    r = np.array([[0.0, 1.0, 2.0]])
    a = np.array([[0.0, np.inf, 2.0]])
    s = one(compare("export", {"l": r}, {"l": a}, logits_outputs=["l"]), "l")
    assert s.nan_or_inf and not s.passed


# ---------------------------------------------------------------- structure


def test_shape_mismatch_missing_and_extra_outputs_are_failures():
    ref = {"a": np.zeros((2, 3)), "b": np.zeros(4)}
    act = {"a": np.zeros((3, 2)), "c": np.zeros(1)}
    report = compare("export", ref, act)
    assert not report.passed
    assert [o.name for o in report.outputs] == ["a", "b", "c"]
    a, b, c = report.outputs
    assert not a.passed and a.reasons == ["shape [3x2] differs from reference [2x3]"]
    assert not b.passed and "missing from actual" in b.reasons[0]
    assert not c.passed and "not a reference output" in c.reasons[0]


def test_budget_defaults_to_stage_and_unknown_stage_is_an_error():
    r = compare("ascend-fp16-emulation", {}, {})
    assert r.budget is BUDGETS["ascend-fp16-emulation"] and r.passed
    assert compare("passes/fuse-latent-kv", {}, {}).budget is BUDGETS["passes"]
    with pytest.raises(ValueError, match="no parity budget"):
        compare("nonsense", {}, {})
    with pytest.raises(ValueError, match="logits_outputs"):
        compare("export", {"y": np.zeros(1)}, {"y": np.zeros(1)}, logits_outputs=["z"])


def test_raise_if_failed_names_stage_output_and_numbers():
    ok = compare("export", {"y": np.ones(3)}, {"y": np.ones(3)})
    assert ok.raise_if_failed() is ok
    bad = compare("quantize-int8", {"y": np.array([3.0, 4.0])}, {"y": np.array([3.0, 5.0])})
    with pytest.raises(ParityError) as e:
        bad.raise_if_failed()
    assert isinstance(e.value, MlamoeError)
    msg = str(e.value)
    assert "'quantize-int8'" in msg and "'y'" in msg
    assert "rel_euclid 0.2 > 0.15" in msg  # ||(0,1)|| / ||(3,4)|| = 0.2; quantize-int8 allows 0.15
    assert e.value.report is bad


# ---------------------------------------------------------------- budgets table


def test_budgets_table():
    assert set(BUDGETS) == {
        "export", "passes", "quantize-int8", "quantize-int4", "quantize-w8a8", "quantize-fp8", "target-ort-cpu",
        "target-ort-cuda-fp16", "target-ort-cuda-int8", "target-ort-cuda-int4", "target-ort-cuda-fp8",
        "ascend-fp16-emulation", "partition", "layer", "chained", "stitched", "layer-int8",
    }
    msit = BUDGETS["ascend-fp16-emulation"]
    assert (msit.min_cosine, msit.max_kl, msit.max_rel_euclid) == (0.99, 0.005, 0.05)
    for stage in ("export", "passes", "target-ort-cpu", "partition", "layer", "chained", "stitched"):
        b = BUDGETS[stage]
        assert (b.atol, b.rtol, b.min_cosine, b.min_top1) == (1e-4, 1e-3, 0.99999, 1.0)
    for b in BUDGETS.values():
        assert b.atol > 0 and b.rtol > 0


# ---------------------------------------------------------------- tokens


def test_add_tokens_mismatch_fails_with_first_step():
    r = compare("export", {}, {})
    rec = r.add_tokens("greedy", [5, 6, 7, 8], [5, 6, 9, 8])
    assert rec["first_mismatch"] == 2 and not rec["equal"] and rec["n_equal_steps"] == 2
    assert not r.passed
    assert "step 2" in rec["reason"] and "reference token 7, actual 9" in rec["reason"]
    with pytest.raises(ParityError, match="step 2"):
        r.raise_if_failed()
    with pytest.raises(ValueError, match="already recorded"):
        r.add_tokens("greedy", [1], [1])


def test_add_tokens_equal_and_length_and_batch():
    r = compare("export", {}, {})
    assert r.add_tokens("same", np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]])["equal"]
    assert r.passed
    rec = r.add_tokens("short", [1, 2, 3], [1, 2])
    assert rec["first_mismatch"] == 2 and not r.passed
    rec = compare("export", {}, {}).add_tokens("b", [[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 0, 6]])
    assert rec["first_mismatch"] == 1 and "row 1" in rec["reason"]


def test_add_tokens_informational_when_budget_allows_top1_flips():
    r = compare("quantize-int8", {}, {})  # no top-1 limit: tokens are informational
    rec = r.add_tokens("greedy", [1, 2, 3], [1, 4, 4])
    assert rec["first_mismatch"] == 1 and not rec["binding"] and rec["passed"]
    assert r.passed


# ---------------------------------------------------------------- reports


def _reports():
    ok = compare("export", {"logits": np.array([[0.0, 1.0, 2.0]]), "kv": np.ones((2, 2))},
                 {"logits": np.array([[0.0, 1.0, 2.00001]]), "kv": np.ones((2, 2))},
                 logits_outputs=["logits"])
    ok.add_tokens("greedy", [1, 2], [1, 2])
    bad = compare("ascend-fp16-emulation", {"y": np.array([1.0, 2.0])},
                  {"y": np.array([1.0, np.nan])})
    return [ok, bad]


def test_to_dict_is_strict_json_and_markdown_has_table():
    ok, bad = _reports()
    for r in (ok, bad):
        json.dumps(r.to_dict(), allow_nan=False)
    d = bad.to_dict()
    assert list(d) == ["stage", "passed", "budget", "outputs", "extra"]
    assert d["passed"] is False and d["outputs"][0]["nan_or_inf"] is True
    assert d["outputs"][0]["rel_euclid"] == 0.0  # the finite position agrees
    md = ok.to_markdown()
    assert "| output | shape | max abs | mean abs | max rel | cosine | rel euclid | top-1 | KL | pass |" in md
    assert "`logits`" in md and "PASS" in md
    assert "non-finite" in bad.to_markdown()


def test_write_reports_deterministic_and_round_trips(tmp_path):
    write_reports(_reports(), tmp_path / "a")
    write_reports(_reports(), tmp_path / "b")
    for name in ("parity.json", "parity.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    text = (tmp_path / "a" / "parity.json").read_text()

    def no_constants(c):
        raise AssertionError(f"non-standard JSON constant {c}")

    doc = json.loads(text, parse_constant=no_constants)
    assert doc["schema"] == 1
    assert [s["stage"] for s in doc["stages"]] == ["export", "ascend-fp16-emulation"]
    assert [s["passed"] for s in doc["stages"]] == [True, False]
    assert json.dumps(doc, sort_keys=True, indent=2) + "\n" == text
    assert doc["stages"][0]["extra"]["tokens"]["greedy"]["equal"] is True
    md = (tmp_path / "a" / "parity.md").read_text()
    assert md.startswith("# Parity report")
    assert "**FAIL** (1 of 2 stages passed)" in md
    assert "### Stage `export`: PASS" in md and "### Stage `ascend-fp16-emulation`: FAIL" in md
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- fp16 judgement (compare_fp16)


def _logits(seed: int = 0, shape=(1, 6, 40), scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape) * scale


def test_fp16_limits_widen_to_factor_times_reference_error_never_tighten():
    from pipeline.parity import FP16_REFERENCE_FACTOR, compare, fp16_limits
    ref = _logits()
    base = BUDGETS["target-ort-cuda-fp16"]
    small = compare("x", {"y": ref}, {"y": ref + 1e-4}, budget=base).outputs[0]
    assert fp16_limits(base, small) == base  # 4 x 1e-4 < every floor
    big = compare("x", {"y": ref}, {"y": ref + 0.05}, budget=base).outputs[0]
    lim = fp16_limits(base, big)
    assert lim.atol == pytest.approx(FP16_REFERENCE_FACTOR * 0.05)
    assert lim.min_cosine == pytest.approx(1 - FP16_REFERENCE_FACTOR * (1 - big.cosine))
    assert lim.max_rel_euclid == pytest.approx(FP16_REFERENCE_FACTOR * big.rel_euclid)
    assert (lim.rtol, lim.min_top1) == (base.rtol, base.min_top1)
    nan = compare("x", {"y": ref}, {"y": ref * np.nan}, budget=base).outputs[0]
    assert fp16_limits(base, nan) == base  # a non-finite reference says nothing


def test_near_ties_margin_against_what_the_elementwise_rule_lets_move():
    from pipeline.parity import Budget, near_ties
    b = Budget(atol=0.1, rtol=0.01)
    margin, allowed = near_ties(np.array([[5.0, 4.95, 0.0], [5.0, 1.0, 0.0]]), b)
    np.testing.assert_allclose(margin, [0.05, 4.0])
    np.testing.assert_allclose(allowed, [0.2, 0.2])  # max(0.1, 0.05) + max(0.1, 0.0495 or 0.01)


def test_compare_fp16_excludes_near_tie_flips_from_top1_and_lists_them():
    from pipeline.parity import compare_fp16
    ref = _logits()
    ref[0, 2, :2] = [9.0, 9.01]
    act = ref + 1e-3
    act[0, 2, :2] = [9.01, 9.0]  # flipped on a near tie: passes, listed
    rep = compare_fp16("target-ort-cuda-fp16/x", {"logits": ref}, {"logits": act}, logits_outputs=["logits"])
    assert rep.passed, rep.failure_reasons()
    e = rep.extra["fp16"]["outputs"]["logits"]
    assert e["n_near_tie_flips"] == 1 and [0, 2] in [t["position"] for t in e["near_ties"] if t["flipped"]]
    assert e["top1_decisive"] == 1.0 and rep.outputs[0].top1_agreement < 1.0
    assert "near ties excluded" in rep.to_markdown()


def test_compare_fp16_fails_a_decisive_top1_flip_even_within_widened_limits():
    from pipeline.parity import compare_fp16
    ref = _logits()
    ref[0, 3, :2] = [9.0, 7.0]  # margin 2: decisive under any limit below ~1
    act = ref.copy()
    act[0, 3, :2] = [7.0, 9.0]
    fp16 = ref + 0.1  # the reference's own error widens atol to 0.4, not enough for a margin of 2
    rep = compare_fp16("target-ort-cuda-fp16/x", {"logits": ref}, {"logits": act}, {"logits": fp16},
                       logits_outputs=["logits"])
    assert not rep.passed
    assert any("not near ties" in r and "[0, 3]" in r for r in rep.failure_reasons())


def test_compare_fp16_relative_to_the_fp16_reference():
    from pipeline.parity import compare_fp16
    ref = _logits()
    act = ref + 0.05  # over the 0.02 floor
    assert not compare_fp16("target-ort-cuda-fp16/x", {"logits": ref}, {"logits": act},
                            logits_outputs=["logits"]).passed
    ok = compare_fp16("target-ort-cuda-fp16/x", {"logits": ref}, {"logits": act}, {"logits": ref - 0.03},
                      logits_outputs=["logits"])  # PyTorch fp16 errs by 0.03: limit 0.12
    assert ok.passed, ok.failure_reasons()
    assert ok.extra["fp16"]["outputs"]["logits"]["limits"]["atol"] == pytest.approx(0.12)
    worse = compare_fp16("target-ort-cuda-fp16/x", {"logits": ref}, {"logits": ref + 0.2}, {"logits": ref - 0.03},
                         logits_outputs=["logits"])
    assert not worse.passed  # 0.2 > 4 x 0.03
    missing = compare_fp16("target-ort-cuda-fp16/x", {"logits": ref}, {}, logits_outputs=["logits"])
    assert not missing.passed and "missing" in missing.failure_reasons()[0]


def test_compare_fp16_greedy_binding_up_to_a_near_tie():
    from pipeline.parity import compare_fp16_greedy
    steps = _logits(shape=(1, 4, 40))
    steps[0, 2, :2] = [9.0, 9.005]  # the reference chose token 1 at step 2, token 0 nearly tied
    ref_tokens = steps.argmax(-1)
    act_tokens = ref_tokens.copy()
    act_tokens[0, 2:] = [0, 7]
    act_steps = steps.copy()
    act_steps[0, 2, :2] = [9.005, 9.0]
    rep = compare_fp16_greedy("target-ort-cuda-fp16/greedy", ref_tokens, steps, act_tokens, act_steps)
    t = rep.extra["tokens"]["greedy"]
    assert rep.passed and t["binding"] and t["near_tie"]["is_near_tie"] and "near tie" in t["reason"]
    assert rep.extra["fp16"]["greedy_steps_compared"] == 3
    steps[0, 2, :2] = [6.0, 9.0]  # a decisive step: the mismatch fails
    bad = compare_fp16_greedy("target-ort-cuda-fp16/greedy", steps.argmax(-1), steps, act_tokens, steps)
    assert not bad.passed and "not a near tie" in bad.extra["tokens"]["greedy"]["reason"]
