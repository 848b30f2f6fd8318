"""Where int4's error comes from on tests/test_routing_parity.py's randomized x3 checkpoints (not a pytest test).

    python -m benchmarks.int4_sensitivity [--json]

For each checkpoint (v3-s0, v2-s1), the ort-cpu fp32 graphs are quantized with the int4 form of
targets/ort_cpu/session.py before dense_mlp_bits (block 32, accuracy_level 4, attention 8-bit) and with one role
or tensor set kept fp32 or 8-bit, then judged as the quantize stage judges them (pipeline.build.routed_reports:
logits under teacher-forced routing; budget quantize-int4: cosine >= 0.94, KL <= 0.1). `bug_check`: the same
graph at accuracy_level 0 against the fp32 graph with every quantized weight replaced by a numpy RTN written
here (asymmetric int4 per block of 32, symmetric int8 per block), unforced logits: equal means the error is RTN's.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

BEFORE = {"block_size": 32, "accuracy_level": 4, "attention_bits": 8}  # ort-cpu INT4_OPTIONS before dense_mlp_bits
DEFAULT_EXCLUDE = ["lm_head", "router", "indexer"]


def _variants(dense_weights: list[str]) -> dict[str, dict]:
    return {
        "int4 form before (attention 8-bit)": dict(BEFORE),
        "routed experts fp32": dict(BEFORE, experts="none"),
        "every MLP linear fp32 (dense + shared)": dict(BEFORE, exclude=DEFAULT_EXCLUDE + ["mlp"]),
        "shared experts fp32": dict(BEFORE, exclude=DEFAULT_EXCLUDE + ["*shared_experts*"]),
        "dense-layer MLP fp32": dict(BEFORE, exclude=DEFAULT_EXCLUDE + dense_weights),
        "dense-layer gate/up fp32": dict(BEFORE, exclude=DEFAULT_EXCLUDE + dense_weights[:2]),
        "dense-layer down fp32": dict(BEFORE, exclude=DEFAULT_EXCLUDE + dense_weights[2:]),
        "block 16": dict(BEFORE, block_size=16),
        "symmetric": dict(BEFORE, symmetric=True),
        "dense-layer MLP 8-bit (dense_mlp_bits 8: the form now)": dict(BEFORE, dense_mlp_bits=8),
        "dense_mlp_bits 8, accuracy_level 0": dict(BEFORE, dense_mlp_bits=8, accuracy_level=None),
    }


def _rtn4(w: np.ndarray, bs: int) -> np.ndarray:
    n, k = w.shape
    nb = -(-k // bs)
    p = np.zeros((n, nb * bs), np.float32)
    p[:, :k] = w
    b = p.reshape(n, nb, bs)
    lo, hi = np.minimum(b.min(-1), 0), np.maximum(b.max(-1), 0)
    s = ((hi - lo) / np.float32(15)).astype(np.float32)
    roundf = lambda x: np.sign(x) * np.floor(np.abs(x) + 0.5)  # noqa: E731  C's roundf: half away from zero
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(s == 0, 0, np.clip(roundf(-lo / s), 0, 15))
        inv = np.where(s == 0, 0, np.float32(1) / s).astype(np.float32)
        q = np.where(s[..., None] == 0, zp[..., None], np.clip(roundf(b * inv[..., None] + zp[..., None]), 0, 15))
    return ((q - zp[..., None]) * s[..., None]).reshape(n, -1)[:, :k]


def _sym8(w: np.ndarray, bs: int) -> np.ndarray:
    n, k = w.shape
    nb = -(-k // bs)
    p = np.zeros((n, nb * bs), np.float32)
    p[:, :k] = w
    b = p.reshape(n, nb, bs)
    s = np.abs(b).max(-1) / np.float32(127)
    q = np.clip(np.rint(b / np.where(s == 0, 1, s)[..., None]), -127, 127)
    return (q * s[..., None]).reshape(n, -1)[:, :k]


def _cos(a, b) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def bug_check(folder: Path, model, feeds: dict) -> dict:
    import onnx_ir as ir

    from passes.quant_weights import find_linear_sites, session_with_outputs
    from passes.quantize import quantize
    q = ir.load(folder / "prefill.onnx")
    quantize(q, "int4", model=model, **dict(BEFORE, accuracy_level=None))
    form = {n.name.rsplit(".int", 1)[0]: (n.attributes["bits"].value, n.attributes["block_size"].value)
            for n in q.graph if n.op_type == "MatMulNBits"}
    fq = ir.load(folder / "prefill.onnx")
    for s in find_linear_sites(fq.graph):
        if s.node.name in form:
            bits, bs = form[s.node.name]
            d = (_rtn4 if bits == 4 else _sym8)(s.weight_oi, bs).astype(np.float32)
            s.weight.const_value = ir.tensor(np.ascontiguousarray(d if s.weight_is_oi else d.T), name=s.weight.name)
    ref = session_with_outputs(ir.load(folder / "prefill.onnx"), [], 1).run(["logits"], feeds)[0]
    a_fq = session_with_outputs(fq, [], 1).run(["logits"], feeds)[0]
    a_q = session_with_outputs(q, [], 1).run(["logits"], feeds)[0]
    return {"graph_vs_numpy_rtn_max_abs": float(np.abs(a_fq - a_q).max()), "graph_vs_numpy_rtn_cosine": _cos(a_q, a_fq),
            "fp32_vs_graph_cosine_unforced": _cos(ref, a_q), "n_sites": len(form)}


def sensitivity(names=("v3-s0", "v2-s1")) -> dict:
    import onnx_ir as ir

    from passes.quant_int4 import leading_dense_mlp
    from passes.quant_weights import find_linear_sites
    from passes.quantize import quantize
    from pipeline.build import moe_routers, routed_reports
    from pipeline.export import save_graph
    from pipeline.golden import make_golden
    from targets import ort_cpu
    from test_routing_parity import fp32_graphs, randomized_checkpoint
    out = {}
    for name in names:
        base = Path(tempfile.mkdtemp(prefix=f"mlamoe-int4-sens-{name}-"))
        model = randomized_checkpoint(name, base / "ckpt")
        folder = fp32_graphs(model, ort_cpu.PROFILE.passes, base / "fp32")
        golden = make_golden(model, "latent", gen_tokens=2)
        g = ir.load(folder / "prefill.onnx")
        dense_ids = leading_dense_mlp(g.graph)
        dense = [s.weight.name for s in find_linear_sites(g.graph) if id(s.node) in dense_ids]
        rows = {}
        for label, opts in _variants(dense).items():
            paths = {}
            for gname in ("prefill", "decode"):
                m = ir.load(folder / f"{gname}.onnx")
                quantize(m, "int4", model=model, **opts)
                paths[gname] = base / f"{len(rows)}-{gname}.onnx"
                save_graph(m, paths[gname])
            cases = {}
            for r in routed_reports("quantize-int4", paths, {k: folder / f"{k}.onnx" for k in paths}, golden,
                                    moe_routers(model)):
                o = next(x for x in r.outputs if x.name == "logits")
                cases[r.stage.split("/")[-1]] = {"forced_cosine": o.cosine, "forced_kl": o.kl,
                                                 "forced_rel_euclid": o.rel_euclid, "flips": r.extra["routing"]["n_flips"],
                                                 "passed": r.passed}
            rows[label] = {"options": {k: v for k, v in opts.items()}, "cases": cases,
                           "passed": all(c["passed"] for c in cases.values())}
        feeds = next(c.inputs for c in golden.cases if c.name == "prefill")
        out[name] = {"dense_mlp_weights": dense, "variants": rows, "bug_check": bug_check(folder, model, feeds)}
    return out


def main(argv=None) -> int:
    import argparse
    import json
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = sensitivity()
    if args.json:
        print(json.dumps(r, indent=2, default=float))
        return 0
    for name, v in r.items():
        print(name, "dense MLP weights:", v["dense_mlp_weights"], "bug check:", v["bug_check"])
        for label, row in v["variants"].items():
            print(f"  {label:58s} " + "; ".join(f"{c} cos {x['forced_cosine']:.4f} KL {x['forced_kl']:.4f}"
                                                  for c, x in row["cases"].items()) + ("  pass" if row["passed"] else "  FAIL"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
