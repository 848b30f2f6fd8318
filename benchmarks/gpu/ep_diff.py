"""Where does the CUDA EP part from ORT CPU? Node-by-node diff of a package graph on the two providers.

A debug copy of the graph exposes every typed node output; the same feeds run on CPUExecutionProvider and
CUDAExecutionProvider and each value is compared in graph order (floats: max |cuda - cpu| / max |cpu|; integer outputs
such as TopK indices: the share of elements that differ, and whether each row holds the same set). The first values
over --tol name the op that parts the two.

The CPU side runs HERE (onnxruntime 1.32): onnxruntime-gpu 1.31.1's own CPU EP returned zeros from com.microsoft.MoE
on fp16 inputs (measured 2026-12-04 on the H200, tiny-v32's fp16 package), so it is no reference.

    python -m benchmarks.gpu.ep_diff feeds PKG --feeds F            # HERE: greedy on ORT CPU, each step's feeds in F
    python -m benchmarks.gpu.ep_diff cuda PKG --feeds F --dump D    # THERE: golden cases' values and the greedy steps'
                                                                    # logits on CUDA; the first step whose top-1
                                                                    # differs from CPU's dumped whole
    python -m benchmarks.gpu.ep_diff compare PKG --feeds F --dump D # HERE: the same on ORT CPU, value by value
    python -m benchmarks.gpu.ep_diff levels PKG                     # THERE: the golden cases at each optimization level
    python -m benchmarks.gpu.ep_diff choices PKG --dump D --provider cuda|cpu   # THERE and HERE: the golden cases
        through the package graph with only its choices exposed (routers' gate logits, the indexer's scores and ids:
        passes/routing_probes.py), D/choices_{case}_{provider}.npz; `choices-compare PKG --dump D` HERE
Prints a report; --json PATH writes it too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir


def debug_graph(path: Path) -> tuple[Path, list[tuple[str, str, str]]]:
    """A copy of `path` beside it (so its external data resolves) with every typed node output a graph output;
    -> (copy, [(value, op_type, node name)] in graph order)."""
    model = ir.load(path)
    present = {v.name for v in model.graph.outputs}
    order = []
    for node in model.graph:
        for v in node.outputs:
            if v.name and v.type is not None and v.name not in present:
                model.graph.outputs.append(v)
                present.add(v.name)
            if v.name:
                order.append((v.name, node.op_type, node.name or ""))
    out = path.parent / f".epdiff.{path.name}"
    ir.save(model, out)
    return out, order


def _compare(a: np.ndarray, b: np.ndarray) -> dict:
    if a.shape != b.shape:
        return {"shape": [list(a.shape), list(b.shape)], "bad": True}
    if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        differ = a != b
        rec = {"differ": float(differ.mean()) if a.size else 0.0}
        if a.ndim and differ.any():
            rec["same_sets"] = bool((np.sort(a, -1) == np.sort(b, -1)).all())
        rec["bad"] = bool(differ.any())
        return rec
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    fin = np.isfinite(a64) & np.isfinite(b64)
    if not np.array_equal(np.isfinite(a64), np.isfinite(b64)):
        return {"nonfinite_differ": int((np.isfinite(a64) != np.isfinite(b64)).sum()), "bad": True}
    d = np.abs(a64 - b64)[fin]
    scale = float(np.abs(a64[fin]).max()) if fin.any() else 0.0
    rel = float(d.max()) / (scale + 1e-12) if d.size else 0.0
    return {"max_abs": float(d.max()) if d.size else 0.0, "scale": scale, "rel": rel}


def run_values(path: Path, feeds: dict, provider: str) -> tuple[dict, list[tuple[str, str, str]]]:
    """Every typed value of `path`'s graph (debug_graph) on `provider` for `feeds`; -> ({value: array}, order)."""
    import onnxruntime as ort
    dbg, order = debug_graph(path)
    try:
        providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
        s = ort.InferenceSession(str(dbg), providers=providers)
        types = {i.name: i.type for i in s.get_inputs()}
        cast = {n: (a.astype(np.float16) if types.get(n) == "tensor(float16)" else a) for n, a in feeds.items()}
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, cast))), order
    finally:
        for f in dbg.parent.glob(f"{dbg.name}*"):
            f.unlink()


def node_diff(reference: dict, actual: dict, order, tol: float, limit: int = 25) -> dict:
    """Values of `actual` (CUDA EP) against `reference` (ORT CPU) in graph order: those over `tol`."""
    parted = []
    for name, op, node in order:
        if name not in reference or name not in actual:
            continue
        rec = _compare(reference[name], actual[name])
        if rec.get("bad") or rec.get("rel", 0.0) > tol:
            parted.append({"value": name, "op": op, "node": node, **rec})
    return {"values_compared": sum(1 for n, _, _ in order if n in reference and n in actual), "tol": tol,
            "n_parted": len(parted), "first_parted": parted[:limit],
            "logits": _compare(reference["logits"], actual["logits"]) if "logits" in reference else None}


def golden_case(root: Path, name: str) -> tuple[Path, dict]:
    manifest = json.loads((root / "manifest.json").read_text())
    case = next((c for c in manifest["golden"]["cases"] if c["name"] == name), None)
    if case is None:
        raise SystemExit(f"no golden case {name!r}: {[c['name'] for c in manifest['golden']['cases']]}")
    graph = manifest["io"]["graphs"][case["graph"]]["file"]
    return root / graph, {n: np.load(root / f) for n, f in case["inputs"].items()}


def greedy_feeds(root: Path, folder: Path) -> None:
    """HERE (ORT CPU): greedy from the golden prompt; each call's feeds and logits into folder/step_{i}.npz."""
    from runtime.cuda_runtime import CudaPackageRuntime
    manifest = json.loads((root / "manifest.json").read_text())
    gen = manifest["golden"]["greedy"]
    prompt = np.load(root / gen["prompt"])
    n = np.load(root / gen["tokens"]).shape[1]
    cpu = CudaPackageRuntime(root, device="cpu")
    past, ids, graph = cpu.empty_cache(prompt.shape[0]), prompt.astype(np.int64), "prefill"
    folder.mkdir(parents=True, exist_ok=True)
    for step in range(n):
        feeds = {"input_ids": ids, **{k: v.numpy() for k, v in past.items()}}
        logits, past = cpu.run(graph, ids, past)
        np.savez_compressed(folder / f"step_{step}.npz", graph=np.array(graph), logits=logits, **feeds)
        ids = logits[:, -1].astype(np.float32).argmax(-1)[:, None].astype(np.int64)
        graph = "decode"


def _graph_file(root: Path, graph: str) -> Path:
    manifest = json.loads((root / "manifest.json").read_text())
    return root / manifest["io"]["graphs"][graph]["file"]


def cuda_dump(root: Path, feeds_dir: Path | None, cases: list[str], out: Path) -> dict:
    """THERE (CUDA EP): every value of each golden case into out/cuda_{case}.npz; with feeds_dir, the greedy steps'
    logits on CUDA against ORT CPU's, and every value of the first step whose top-1 differs (out/cuda_greedy.npz)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for c in cases:
        path, feeds = golden_case(root, c)
        values, _ = run_values(path, feeds, "CUDAExecutionProvider")
        np.savez_compressed(out / f"cuda_{c}.npz", **values)
    if feeds_dir is not None:
        import onnxruntime as ort
        sessions: dict = {}
        steps = []
        for i in range(len(list(feeds_dir.glob("step_*.npz")))):
            z = np.load(feeds_dir / f"step_{i}.npz")
            graph = str(z["graph"])
            feeds = {k: z[k] for k in z.files if k not in ("graph", "logits")}
            if graph not in sessions:
                sessions[graph] = ort.InferenceSession(str(_graph_file(root, graph)),
                                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            s = sessions[graph]
            types = {x.name: x.type for x in s.get_inputs()}
            cast = {n: (a.astype(np.float16) if types.get(n) == "tensor(float16)" else a) for n, a in feeds.items()}
            got = s.run(["logits"], cast)[0][:, -1].astype(np.float64)
            ref = z["logits"][:, -1].astype(np.float64)
            top = np.sort(ref, -1)[:, -2:]
            steps.append({"step": i, "graph": graph, "max_abs": float(np.abs(got - ref).max()),
                          "top1_equal": bool((got.argmax(-1) == ref.argmax(-1)).all()),
                          "cpu_margin": float((top[:, 1] - top[:, 0]).min())})
            if not steps[-1]["top1_equal"] and "first_difference" not in summary:
                summary["first_difference"] = i
                values, _ = run_values(_graph_file(root, graph), feeds, "CUDAExecutionProvider")
                np.savez_compressed(out / "cuda_greedy.npz", step=np.array(i), **values)
        summary["steps"] = steps
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def levels(root: Path, cases: list[str]) -> dict:
    """THERE: each golden case through the package's own graph (no debug outputs) on the CUDA EP with the package's
    provider options, at every graph optimization level; -> per level and output, max |got - golden| and the elements
    outside the golden tolerance (a fusion that only `all` applies shows as a level that alone fails)."""
    import onnxruntime as ort
    from runtime.cuda_runtime import cuda_provider_options
    manifest = json.loads((root / "manifest.json").read_text())
    tol = manifest["golden"]["tolerance"]
    report = {}
    runs = [(lv, "") for lv in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")]
    runs += [("ORT_ENABLE_ALL", v) for v in ("repeat", "no-mem-reuse", "deterministic")]  # buffer reuse / atomics suspects
    for level, variant in runs:
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.log_severity_level = 3
        if variant == "no-mem-reuse":
            so.enable_mem_reuse = so.enable_mem_pattern = False
        if variant == "deterministic":
            so.use_deterministic_compute = True
        for c in cases:
            case = next(x for x in manifest["golden"]["cases"] if x["name"] == c)
            path, feeds = golden_case(root, c)
            sess = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", cuda_provider_options()),
                                                                   "CPUExecutionProvider"])
            types = {i.name: i.type for i in sess.get_inputs()}
            cast = {n: (a.astype(np.float16) if types.get(n) == "tensor(float16)" else a) for n, a in feeds.items()}
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, cast)))
            rec = {}
            for n, f in case["outputs"].items():
                ref = np.load(root / f).astype(np.float64)
                d = np.abs(got[n].astype(np.float64) - ref)
                lim = (tol.get("cases") or {}).get(c, {}).get(n, tol)
                bad = int(((d > lim["atol"]) & (d > lim["rtol"] * np.abs(ref))).sum())
                if bad or n == "logits":
                    rec[n] = {"max_abs": float(d.max()), "outside": bad}
            report[f"{level}{' ' + variant if variant else ''} {c}"] = rec
    return report


def choices(root: Path, cases: list[str], out: Path, provider: str) -> dict:
    """The golden cases through the package graph with only its discrete choices added as outputs (expose_gate_logits,
    expose_selections): the least change to the graph that still shows which choice a device makes differently."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    from passes.routing_probes import expose_gate_logits, expose_selections, selection_topks
    from runtime.cuda_runtime import cuda_provider_options
    out.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    prov = [("CUDAExecutionProvider", cuda_provider_options()), "CPUExecutionProvider"] if provider == "cuda" \
        else ["CPUExecutionProvider"]
    report = {}
    for c in cases:
        path, feeds = golden_case(root, c)
        model = ir.from_proto(onnx.load(str(path), load_external_data=False))
        topks = selection_topks(model)
        n_gates = expose_gate_logits(model)
        n_sel = expose_selections(model, topks)
        probed = path.with_name(path.stem + ".choices.onnx")
        onnx.save(ir.to_proto(model), str(probed))
        sess = ort.InferenceSession(str(probed), so, providers=prov)
        types = {i.name: i.type for i in sess.get_inputs()}
        cast = {n: (a.astype(np.float16) if types.get(n) == "tensor(float16)" else a) for n, a in feeds.items()}
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, cast)))
        np.savez_compressed(out / f"choices_{c}_{provider}.npz", **got)
        report[c] = {"gates": n_gates, "selections": n_sel, "outputs": len(got)}
    return report


def choices_compare(root: Path, cases: list[str], dump: Path) -> dict:
    """HERE: CUDA's exposed choices against ORT CPU's (both from `choices`), and each against the golden outputs."""
    manifest = json.loads((root / "manifest.json").read_text())
    report = {}
    for c in cases:
        cpu, gpu = (dict(np.load(dump / f"choices_{c}_{p}.npz")) for p in ("cpu", "cuda"))
        case = next(x for x in manifest["golden"]["cases"] if x["name"] == c)
        rec = {"golden": {}}
        for n, f in case["outputs"].items():
            ref = np.load(root / f).astype(np.float64)
            rec["golden"][n] = {p: float(np.abs(v[n].astype(np.float64) - ref).max()) for p, v in (("cpu", cpu), ("cuda", gpu))}
        for n in sorted(cpu):
            if not (n.startswith("routing.") or n.startswith("selection.")):
                continue
            a, b = cpu[n].astype(np.float64), gpu[n].astype(np.float64)
            if n.endswith(".ids"):
                sa, sb = np.sort(a, -1), np.sort(b, -1)
                rows = np.argwhere((sa != sb).any(-1)).tolist()
                rec[n] = {"rows_with_other_ids": rows[:20], "n": len(rows)}
            else:
                fin = np.isfinite(a) & np.isfinite(b)
                d = np.where(fin, np.abs(a - b), 0.0)
                top = np.sort(np.where(np.isfinite(a), a, -np.inf), -1)[..., ::-1]
                k = min(2, top.shape[-1] - 1)
                rec[n] = {"max_abs": float(d.max()), "shape": list(a.shape),
                          "inf_mismatch": int((np.isfinite(a) != np.isfinite(b)).sum()),
                          "argmax_rows_differ": int((a.argmax(-1) != b.argmax(-1)).sum()),
                          "min_top2_gap_cpu": float(np.nanmin(top[..., 0] - top[..., k])) if k > 0 else None}
        report[c] = rec
    return report


def compare_dump(root: Path, feeds_dir: Path | None, cuda: Path, tol: float) -> dict:
    """HERE (ORT CPU): the same graphs on the same feeds, every value against the CUDA dump."""
    report = {}
    for f in sorted(cuda.glob("cuda_*.npz")):
        name = f.stem[len("cuda_"):]
        got = dict(np.load(f))
        if name == "greedy":
            step = int(got.pop("step"))
            z = np.load(feeds_dir / f"step_{step}.npz")
            path, feeds = _graph_file(root, str(z["graph"])), {k: z[k] for k in z.files if k not in ("graph", "logits")}
            name = f"greedy step {step}"
        else:
            path, feeds = golden_case(root, name)
        ref, order = run_values(path, feeds, "CPUExecutionProvider")
        report[name] = node_diff(ref, got, order, tol)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["feeds", "cuda", "compare", "levels", "choices", "choices-compare"])
    ap.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("package")
    ap.add_argument("--feeds", help="folder of greedy step feeds (mode feeds writes it)")
    ap.add_argument("--cases", default="prefill-chunk,decode")
    ap.add_argument("--dump", help="folder of the CUDA dump (mode cuda writes it, compare reads it)")
    ap.add_argument("--tol", type=float, default=2e-2)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    root = Path(a.package)
    feeds = Path(a.feeds) if a.feeds else None
    if a.mode == "feeds":
        greedy_feeds(root, feeds)
        return 0
    cases = [c for c in a.cases.split(",") if c]
    if a.mode == "levels":
        report = levels(root, cases)
    elif a.mode == "choices":
        report = choices(root, cases, Path(a.dump), a.provider)
    elif a.mode == "choices-compare":
        report = choices_compare(root, cases, Path(a.dump))
    elif a.mode == "cuda":
        report = cuda_dump(root, feeds, [c for c in a.cases.split(",") if c], Path(a.dump))
    else:
        report = compare_dump(root, feeds, Path(a.dump), a.tol)
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
