#!/usr/bin/env python3
"""Verify the package's .om files on an Ascend host against the golden data (numpy only).

Run from the package root (or pass --package) after `bash ascend/build_om.sh`:

    python3 ascend/kit/verify_on_device.py [--device 0] [--cases prefill_s16,decode] [--backend auto|ais_bench|msit]

For every golden case (golden/ascend/cases.json): feeds the inputs, in the graph's input order, to
ascend/om/<graph>.om through ais_bench's `InferSession(device_id, om).infer(feeds)` (fallback: a
`msit benchmark --om-model ... -i a.npy,b.npy -o DIR --outfmt NPY` subprocess), then compares every
output with the expected (eager PyTorch fp32) one using msit's accuracy thresholds:
cosine similarity > 0.99, relative Euclidean distance < 0.05, and for logits the mean
KL(softmax(expected) || softmax(actual)) over positions < 0.005. Exits 0 when all pass, 1 otherwise,
2 when no runtime is available. For per-op debugging it prints the `msit debug compare` command.
Needs only numpy and the CANN runtime (+ ais_bench or msit); nothing from the mlamoe repository.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MIN_COSINE = 0.99
MAX_REL_EUCLID = 0.05
MAX_KL = 0.005


def cosine(a: np.ndarray, r: np.ndarray) -> float:
    a, r = a.astype(np.float64).ravel(), r.astype(np.float64).ravel()
    na, nr = np.linalg.norm(a), np.linalg.norm(r)
    if na == 0 and nr == 0:
        return 1.0
    if na == 0 or nr == 0:
        return 0.0
    return float(a @ r / (na * nr))


def rel_euclid(a: np.ndarray, r: np.ndarray) -> float:
    a, r = a.astype(np.float64).ravel(), r.astype(np.float64).ravel()
    nr = np.linalg.norm(r)
    d = np.linalg.norm(a - r)
    if nr == 0:
        return 0.0 if d == 0 else float("inf")
    return float(d / nr)


def mean_kl(ref_logits: np.ndarray, act_logits: np.ndarray) -> float:
    r = ref_logits.astype(np.float64).reshape(-1, ref_logits.shape[-1])
    a = act_logits.astype(np.float64).reshape(-1, act_logits.shape[-1])
    lr = r - r.max(-1, keepdims=True)
    lr = lr - np.log(np.exp(lr).sum(-1, keepdims=True))
    la = a - a.max(-1, keepdims=True)
    la = la - np.log(np.exp(la).sum(-1, keepdims=True))
    return float((np.exp(lr) * (lr - la)).sum(-1).mean())


def judge(name: str, expected: np.ndarray, actual: np.ndarray, is_logits: bool) -> dict:
    row = {"output": name, "passed": True, "reasons": []}
    if expected.shape != actual.shape:
        row.update(passed=False, reasons=[f"shape {actual.shape} != expected {expected.shape}"])
        return row
    if not np.isfinite(actual.astype(np.float64)).all():
        row["passed"] = False
        row["reasons"].append("non-finite values in the OM output")
    row["cosine"] = cosine(actual, expected)
    row["rel_euclid"] = rel_euclid(actual, expected)
    if not row["cosine"] > MIN_COSINE:
        row["passed"] = False
        row["reasons"].append(f"cosine {row['cosine']:.6f} <= {MIN_COSINE}")
    if not row["rel_euclid"] < MAX_REL_EUCLID:
        row["passed"] = False
        row["reasons"].append(f"rel euclid {row['rel_euclid']:.4g} >= {MAX_REL_EUCLID}")
    if is_logits:
        row["kl"] = mean_kl(expected, actual)
        row["top1"] = float((expected.reshape(-1, expected.shape[-1]).argmax(-1)
                             == actual.reshape(-1, actual.shape[-1]).argmax(-1)).mean())
        if not row["kl"] < MAX_KL:
            row["passed"] = False
            row["reasons"].append(f"KL {row['kl']:.4g} >= {MAX_KL}")
    return row


# ------------------------------------------------------------------------------------ backends
def run_ais_bench(om: Path, feeds: list[np.ndarray], device: int) -> list[np.ndarray]:
    from ais_bench.infer.interface import InferSession  # CANN's ais_bench wheel
    session = InferSession(device, str(om))
    try:
        return [np.asarray(o) for o in session.infer(feeds)]
    finally:
        free = getattr(session, "free_resource", None)
        if free:
            free()


def run_msit(om: Path, input_files: list[Path], device: int, n_outputs: int) -> list[np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="verify-om-") as tmp:
        cmd = ["msit", "benchmark", "--om-model", str(om), "-i", ",".join(str(p) for p in input_files),
               "-o", tmp, "--outfmt", "NPY", "--device", str(device)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        files = [p for p in Path(tmp).rglob("*.npy")]

        def index(p: Path) -> int:
            m = re.search(r"_(\d+)\.npy$", p.name)
            return int(m.group(1)) if m else 0

        files.sort(key=index)
        if len(files) != n_outputs:
            raise RuntimeError(f"msit benchmark wrote {len(files)} .npy outputs, expected {n_outputs}: {files}")
        return [np.load(p) for p in files]


def pick_backend(choice: str) -> str | None:
    if choice in ("auto", "ais_bench"):
        try:
            import ais_bench.infer.interface  # noqa: F401
            return "ais_bench"
        except ImportError:
            if choice == "ais_bench":
                return None
    if choice in ("auto", "msit") and shutil.which("msit"):
        return "msit"
    return None


def compare_command(root: Path, case: dict, out_dir: str = "ascend/compare") -> str:
    """The msit per-op comparison (ONNX on CPU vs the OM on the NPU) for one golden case."""
    inputs = ",".join(case["inputs"][n] for n in case["input_order"])
    return (f"msit debug compare -gm {case['onnx']} -om {case['om']} -i {inputs} "
            f"-o {out_dir}/{case['name']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--package", default=None, help="package root (default: two levels above this file)")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--backend", choices=("auto", "ais_bench", "msit"), default="auto")
    ap.add_argument("--report", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    root = Path(args.package) if args.package else Path(__file__).resolve().parents[2]
    spec = json.loads((root / "golden" / "ascend" / "cases.json").read_text())
    cases = spec["cases"]
    if args.cases:
        want = set(args.cases.split(","))
        cases = [c for c in cases if c["name"] in want]
    backend = pick_backend(args.backend)
    if backend is None:
        print("no Ascend runtime: install ais_bench (CANN tools) or msit, and source set_env.sh", file=sys.stderr)
        return 2
    results, ok = [], True
    for case in cases:
        om = root / case["om"]
        if not om.is_file():
            print(f"[{case['name']}] {case['om']} missing: run `bash ascend/build_om.sh` first", file=sys.stderr)
            ok = False
            continue
        files = [root / case["inputs"][n] for n in case["input_order"]]
        feeds = [np.load(p) for p in files]
        if backend == "ais_bench":
            outs = run_ais_bench(om, feeds, args.device)
        else:
            outs = run_msit(om, files, args.device, len(case["output_order"]))
        for name, actual in zip(case["output_order"], outs):
            expected = np.load(root / case["outputs"][name])
            row = judge(name, expected, np.asarray(actual).reshape(expected.shape) if np.asarray(actual).size
                        == expected.size else np.asarray(actual), name in case.get("logits_outputs", ["logits"]))
            row["case"] = case["name"]
            results.append(row)
            ok &= row["passed"]
            extra = f" KL {row['kl']:.3g} top1 {row['top1']:.3f}" if "kl" in row else ""
            print(f"[{case['name']}] {name}: {'PASS' if row['passed'] else 'FAIL'} cosine {row.get('cosine', float('nan')):.6f} "
                  f"rel_euclid {row.get('rel_euclid', float('nan')):.3g}{extra} {'; '.join(row['reasons'])}")
        if not all(r["passed"] for r in results if r["case"] == case["name"]):
            print(f"  per-op debugging: {compare_command(root, case)}")
    if args.report:
        Path(args.report).write_text(json.dumps({"passed": ok, "backend": backend, "results": results}, indent=2))
    print("ALL PASS" if ok else "FAILED", f"({len(results)} outputs, thresholds: cosine > {MIN_COSINE}, "
          f"rel euclid < {MAX_REL_EUCLID}, KL < {MAX_KL})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
