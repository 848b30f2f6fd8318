"""Where a captured decode gear's time goes, and what the kernel-count fusions save (issue 19; not a pytest test; run
on the GPU machine, recipe benchmarks/gpu/cuda_graph.sh `profile` / `profile-medium`).

    PYTHONPATH=/tmp/site:$PWD python3 -m benchmarks.cuda_gear_profile --models trained-small,small \\
        --out $OUT/h200_cuda_gear_profile.json

Per model, built on the machine by benchmarks/cuda_graph.py build(before=True): the dynamic graphs (today's ort-cuda
package), the gears as compiled now (onnx/: targets/ort_cuda/gears.py convert_gear, fusions on) and the same traced
steps without the fusions (onnx_before/: convert_gear fuse=False, what the gears were before):
  nodes     per gear variant (first gear), ORT's profiler on an uncaptured run: nodes per step by provider:op after
            ORT's own graph optimizations (what the session executes; SimplifiedLayerNormalization there is ORT's
            SimplifiedLayerNormFusion firing);
  kernels   per variant, CUPTI through torch.profiler (it records the kernels of every library in the process, ORT's
            included), captured graph replayed and uncaptured: kernels per step, the GPU time they add up to, the top
            kernels by time and by count; a captured step's wall time minus its kernels' time is what the launches and
            the gaps between kernels cost;
  decode    ms/token at each gear G (position G-1; median of --repeat, the logits copied to the host each step, as
            benchmarks/cuda_graph.py): ort_dynamic, ort_gear_graph (fusions), ort_gear_graph_before (no fusions),
            with --torch torch_graph (StaticCausalLM fp16 with torch.cuda.CUDAGraph), and the ratios;
  parity    greedy tokens from a prompt through the dynamic runtime, both gear variants, and eager fp32 on the GPU;
  determinism  (--determinism) --generations greedy generations through the gears (first variant) with the dynamic
            prefill (GearDecoder's default) and with prefill="gears" (the prompt token by token through the gears):
            how many distinct token sequences each gives; and run-to-run bit equality: the dynamic prefill twice, the dynamic decode twice, a gear
            step twice (captured and uncaptured, the same cache and position), and, per graph, an uncaptured copy with
            every intermediate value as an output run twice: the nodes whose outputs differ (first ones in graph
            order), to locate a non-deterministic kernel.
--sections picks among nodes, kernels, parity, decode; --variants among the two gear folders. Writes one JSON (saved
after each section; models already in it kept).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks import command_line, elapsed_logger  # noqa: E402
from benchmarks.cuda_graph import _median_ms, build, manifest_for, torch_static  # noqa: E402

VARIANTS = {"ort_gear_graph": "onnx", "ort_gear_graph_before": "onnx_before"}


def ort_nodes(path: Path, session_cfg: dict, gear: int, device: str) -> dict:
    """Nodes per step by provider:op from ORT's profiler (uncaptured, after ORT's optimizations)."""
    import onnxruntime as ort
    from runtime.cuda_runtime import cuda_provider_options, session_options
    so = session_options(session_cfg, profile=True)
    so.profile_file_prefix = str(path.parent / f"prof_{path.stem}")
    prov = [("CUDAExecutionProvider", cuda_provider_options()), "CPUExecutionProvider"] if device == "cuda" \
        else ["CPUExecutionProvider"]
    s = ort.InferenceSession(str(path), so, providers=prov)
    feeds = {"input_ids": np.array([[7]], np.int32), "position": np.array([gear - 1], np.int32)}
    for i in s.get_inputs():
        if i.name.startswith("past."):
            feeds[i.name] = np.zeros(i.shape, np.float16)
    runs = 3
    for _ in range(runs):
        s.run(None, feeds)
    prof = json.loads(Path(s.end_profiling()).read_text())
    by: dict = {}
    for ev in prof:
        a = ev.get("args", {})
        if ev.get("cat") == "Node" and "provider" in a and ev["name"].endswith("_kernel_time"):
            key = f"{a['provider'].replace('ExecutionProvider', '')}:{a.get('op_name')}"
            by[key] = by.get(key, 0) + 1
    by = {k: v / runs for k, v in sorted(by.items(), key=lambda kv: -kv[1])}
    return {"nodes_per_step": sum(by.values()), "by_provider_op": by}


def cupti_kernels(step, steps: int = 20) -> dict:
    """Kernels per step and their GPU time from CUPTI (torch.profiler), over `steps` calls of step()."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) * 1e3 / steps
    kern: dict = {}
    first, last = None, None
    for e in p.events():
        if "CUDA" not in str(getattr(e, "device_type", "")):
            continue
        us = float(e.time_range.elapsed_us())
        first = e.time_range.start if first is None else min(first, e.time_range.start)
        last = e.time_range.end if last is None else max(last, e.time_range.end)
        k = kern.setdefault(e.name, [0, 0.0])
        k[0] += 1
        k[1] += us
    memcpy = {n: v for n, v in kern.items() if "memcpy" in n.lower() or "memset" in n.lower()}
    kernels = {n: v for n, v in kern.items() if n not in memcpy}
    n = sum(v[0] for v in kernels.values()) / steps
    us = sum(v[1] for v in kernels.values()) / steps

    def short(name):
        return name if len(name) <= 120 else name[:117] + "..."
    top_t = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]
    top_n = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return {"kernels_per_step": n, "kernel_us_per_step": us, "mean_kernel_us": us / n if n else None,
            "wall_ms_per_step_profiled": wall, "distinct_kernels": len(kernels),
            "gpu_span_ms_per_step": None if first is None else (last - first) / 1e3 / steps,
            "memcpy_per_step": {short(k): [v[0] / steps, v[1] / steps] for k, v in memcpy.items()},
            "top_by_time": [[short(k), v[0] / steps, round(v[1] / steps, 2)] for k, v in top_t],
            "top_by_count": [[short(k), v[0] / steps, round(v[1] / steps, 2)] for k, v in top_n]}


def debug_diff(path: Path, feeds: dict, device: str, out_dir: Path) -> dict:
    """A copy of graph `path` with every intermediate value as an output (same folder: the external weights resolve),
    run twice uncaptured on the same feeds: the values that differ bitwise, first ones in graph order."""
    import onnx
    import onnxruntime as ort
    from runtime.cuda_runtime import cuda_provider_options
    m = onnx.load(str(path), load_external_data=False)
    have = {o.name for o in m.graph.output}
    order = []  # every node output in graph (topological) order, the graph's own outputs at their producer
    for n in m.graph.node:
        for o in n.output:
            if o:
                order.append((o, n.op_type, n.name))
                if o not in have:
                    m.graph.output.append(onnx.ValueInfoProto(name=o))
    dbg = path.parent / f"{path.stem}.debug.onnx"
    onnx.save_model(m, str(dbg))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    prov = [("CUDAExecutionProvider", cuda_provider_options()), "CPUExecutionProvider"] if device == "cuda" \
        else ["CPUExecutionProvider"]
    s = ort.InferenceSession(str(dbg), so, providers=prov)
    names = [o.name for o in s.get_outputs()]
    a = s.run(names, feeds)
    b = s.run(names, feeds)
    differ = []
    info = {n: (op, nn) for n, op, nn in order}
    for name, x, y in zip(names, a, b):
        if x.dtype.kind == "f":
            same = np.array_equal(x, y, equal_nan=True)
        else:
            same = np.array_equal(x, y)
        if not same:
            op, nn = info.get(name, ("graph output", name))
            d = float(np.nanmax(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.dtype.kind == "f" else None
            differ.append({"value": name, "op": op, "node": nn, "max_abs": d})
    pos = {n: i for i, (n, _, _) in enumerate(order)}
    differ.sort(key=lambda r: pos.get(r["value"], len(pos)))  # the first one: its inputs all equal, its output not
    # (the runs of 2026-12-04 sorted the graph's own outputs first: h200_cuda_gear_profile.json's first_differing
    # lists them before the first differing intermediate)
    dbg.unlink()
    return {"values": len(names), "differ": len(differ), "first_differing": differ[:12],
            "ops_differing": sorted({r["op"] for r in differ})}


def run_model(name: str, args, log, res: dict, save) -> None:
    import torch

    import models
    from runtime.cuda_runtime import CudaPackageRuntime, GearDecoder
    from targets.ort_cuda import gears, session_config
    res.update({"model": name, "errors": []})
    torch.manual_seed(0)
    model = models.load(name, seed=0)
    cfg = model.config
    gear_list = tuple(int(x) for x in args.gears.split(","))
    work = Path(args.work) / Path(name).name
    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    sections = set(args.sections.split(","))
    res["sections"], res["variants"] = sorted(sections), list(variants)
    res["build"] = build(model, work, gear_list, log, before="ort_gear_graph_before" in variants)
    save()
    if args.build_only:  # a first call on the machine (medium: the build alone is ~7 min); the next call reuses it
        return
    device = "cpu" if args.cpu_smoke else "cuda"
    rt = CudaPackageRuntime(work, device=device, manifest=manifest_for(cfg, gear_list, session_config()))
    specs = {v: manifest_for(cfg, gear_list, session_config(), folder)["io"]["decode_gears"]
             for v, folder in variants.items()}
    graph = not args.cpu_smoke

    def decoder(variant, cuda_graph=graph, prefill="dynamic"):
        keep = rt.manifest["io"]["decode_gears"]
        rt.manifest["io"]["decode_gears"] = specs[variant]
        try:
            return GearDecoder(rt, cuda_graph=cuda_graph, prefill=prefill)
        finally:
            rt.manifest["io"]["decode_gears"] = keep
    decs = {}
    for v in variants:
        try:
            decs[v] = decoder(v)
        except Exception:
            res["errors"].append(f"{v} sessions: " + traceback.format_exc())
    G0 = gear_list[0]
    # ---- nodes (ORT profiler) -----------------------------------------------------------------------------------
    res["nodes"] = {}
    for v, folder in (variants.items() if "nodes" in sections else ()):
        try:
            res["nodes"][v] = ort_nodes(work / folder / f"{gears.gear_name(G0)}.onnx", session_config(), G0, device)
            log(f"{name} {v} nodes/step {res['nodes'][v]['nodes_per_step']}")
        except Exception:
            res["errors"].append(f"nodes {v}: " + traceback.format_exc())
    save()
    # ---- kernels (CUPTI) ----------------------------------------------------------------------------------------
    tok = np.array([7])
    res["kernels"] = {}
    if not args.cpu_smoke and "kernels" in sections:
        for v, d in decs.items():
            for form, dd in ((v, d), (v.replace("graph", "nograph"), None)):
                try:
                    if dd is None:
                        dd = decoder(v, cuda_graph=False)
                    dd.synthetic(G0 - 1)
                    res["kernels"][form] = cupti_kernels(lambda: dd.step(tok, G0 - 1))
                    log(f"{name} {form} kernels/step {res['kernels'][form]['kernels_per_step']} "
                        f"GPU us/step {res['kernels'][form]['kernel_us_per_step']:.1f}")
                except Exception:
                    res["errors"].append(f"kernels {form}: " + traceback.format_exc())
        save()
    # ---- parity -------------------------------------------------------------------------------------------------
    def prefix(a, b):
        neq = (a != b).any(0)
        return int(np.argmax(neq)) if neq.any() else int(a.shape[1])
    try:
        if "parity" not in sections:
            raise StopIteration
        prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, args.parity_prompt))
        toks = {"dynamic": rt.generate(prompt, args.steps)[0]}
        for v, d in decs.items():
            toks[v] = d.generate(prompt, args.steps)[0]
            toks[v + "_again"] = d.generate(prompt, args.steps)[0]
        toks["dynamic_again"] = rt.generate(prompt, args.steps)[0]
        if not args.cpu_smoke:
            with torch.no_grad():
                md = model.to("cuda")
                ids = torch.tensor(prompt, device="cuda")
                cache = [tuple(x.to("cuda") for x in layer) for layer in md.empty_cache(1, "latent")]
                out = []
                for _ in range(args.steps):
                    lg, cache = md.step(ids, cache, "latent")
                    ids = lg[:, -1].float().argmax(-1, keepdim=True)
                    out.append(ids.cpu())
                model = md.cpu()
                del cache
            toks["eager_fp32"] = torch.cat(out, 1).numpy()

        keys = list(toks)
        res["parity"] = {"steps": args.steps,
                         "equal_prefix": {f"{a}|{b}": prefix(toks[a], toks[b]) for i, a in enumerate(keys)
                                          for b in keys[i + 1:]}}
        log(f"{name} parity {json.dumps(res['parity'])}")
    except StopIteration:
        pass
    except Exception:
        res["errors"].append("parity: " + traceback.format_exc())
    save()
    # ---- determinism --------------------------------------------------------------------------------------------
    if args.determinism:
        det: dict = {}
        res["determinism"] = det
        try:  # repeated generations: the dynamic prefill (GearDecoder's default) vs prefill="gears"
            prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, args.parity_prompt))
            det["generations"] = {}
            v0 = next(iter(variants))
            for mode in ("dynamic", "gears"):
                dd = decoder(v0, prefill=mode)
                seqs = [dd.generate(prompt, args.steps)[0] for _ in range(args.generations)]
                det["generations"][mode] = {"variant": v0, "runs": len(seqs), "steps": args.steps,
                                            "distinct_token_sequences": len({q.tobytes() for q in seqs}),
                                            "equal_prefix_to_first": [prefix(seqs[0], q) for q in seqs[1:]]}
                del dd
            log(f"{name} generations {json.dumps(det['generations'])}")
            save()
        except Exception:
            res["errors"].append("generations: " + traceback.format_exc())
        try:
            prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, args.parity_prompt))
            empty = rt.empty_cache(1)
            a = rt.run("prefill", prompt, empty)
            b = rt.run("prefill", prompt, rt.empty_cache(1))
            det["prefill_logits_equal"] = bool(np.array_equal(a[0], b[0]))
            det["prefill_logits_max_abs"] = float(np.abs(a[0].astype(np.float64) - b[0]).max())
            past = rt.synthetic_cache(1, 63)
            ids1 = np.array([[7]], np.int64)
            x, y = rt.run("decode", ids1, past)[0], rt.run("decode", ids1, past)[0]
            det["dynamic_decode_logits_equal"] = bool(np.array_equal(x, y))
            det["dynamic_decode_max_abs"] = float(np.abs(x.astype(np.float64) - y).max())
            for v, d in decs.items():
                for form, dd in ((v, d), (v.replace("graph", "nograph"), decoder(v, cuda_graph=False))):
                    dd.synthetic(G0 - 1)
                    l1 = dd.step(tok, G0 - 1).copy()
                    l2 = dd.step(tok, G0 - 1).copy()  # idempotent: the same row rewritten from the same inputs
                    det[f"{form}_step_twice_equal"] = bool(np.array_equal(l1, l2))
                    det[f"{form}_step_twice_max_abs"] = float(np.abs(l1.astype(np.float64) - l2).max())
            log(f"{name} determinism {json.dumps(det)}")
            save()
            rng = np.random.default_rng(0)
            feeds = {"input_ids": np.array([[7]], np.int32), "position": np.array([G0 // 2], np.int32)}
            import onnxruntime as ort
            probe = ort.InferenceSession(str(work / "onnx" / f"{gears.gear_name(G0)}.onnx"),
                                         providers=["CPUExecutionProvider"])
            for i in probe.get_inputs():
                if i.name.startswith("past."):
                    z = rng.standard_normal(i.shape).astype(np.float16)
                    z[:, G0 // 2:] = 0
                    feeds[i.name] = z
            del probe
            det["gear_nodes_twice"] = debug_diff(work / "onnx" / f"{gears.gear_name(G0)}.onnx", feeds, device,
                                                 work)
            log(f"{name} gear nodes twice {json.dumps(det['gear_nodes_twice'])[:1500]}")
            save()
            pf = {"input_ids": prompt.astype(rt.input_types.get("prefill", {}).get("input_ids", np.int64))}
            for n, val in rt.empty_cache(1).items():
                pf[n] = val.numpy() if hasattr(val, "numpy") else np.asarray(val)
            det["prefill_nodes_twice"] = debug_diff(work / "onnx" / "prefill.onnx", pf, device, work)
            log(f"{name} prefill nodes twice {json.dumps(det['prefill_nodes_twice'])[:1500]}")
        except Exception:
            res["errors"].append("determinism: " + traceback.format_exc())
        save()
    # ---- decode ms/token ----------------------------------------------------------------------------------------
    res["decode"] = {}
    for G in (gear_list if "decode" in sections else ()):
        row: dict = {"gear": G, "position": G - 1}
        L = G - 1
        try:
            past = rt.synthetic_cache(1, L)
            ids1 = np.array([[7]], np.int64)
            row["ort_dynamic"] = _median_ms(lambda: rt.run("decode", ids1, past), args.repeat)
            del past
        except Exception:
            res["errors"].append(f"ort_dynamic {G}: " + traceback.format_exc())
        for v, d in decs.items():
            try:
                d.synthetic(L)
                row[v] = _median_ms(lambda: d.step(tok, L), args.repeat)
            except Exception:
                res["errors"].append(f"{v} {G}: " + traceback.format_exc())
        if args.torch and not args.cpu_smoke:
            try:
                row["torch_graph"] = torch_static(model, G, torch.device("cuda"), args.repeat, eager=False)["torch_graph"]
            except Exception:
                res["errors"].append(f"torch {G}: " + traceback.format_exc())
        ms = {k: v["median_ms"] for k, v in row.items() if isinstance(v, dict) and "median_ms" in v}
        if "ort_dynamic" in ms:
            for v in variants:
                if v in ms:
                    row[f"speedup_{v}_vs_dynamic"] = ms["ort_dynamic"] / ms[v]
        if "ort_gear_graph" in ms and "ort_gear_graph_before" in ms:
            row["speedup_fusions"] = ms["ort_gear_graph_before"] / ms["ort_gear_graph"]
        res["decode"][str(G)] = row
        save()
        log(f"{name} G={G}: " + json.dumps({k: round(v, 3) for k, v in ms.items()}))
    del decs, rt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="trained-small,small")
    ap.add_argument("--gears", default="1024,8192,32768")
    ap.add_argument("--parity-prompt", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--torch", action="store_true", help="also time torch fp16 + CUDAGraph (StaticCausalLM)")
    ap.add_argument("--determinism", action="store_true", help="run-to-run bit equality probes (module doc)")
    ap.add_argument("--work", default="/tmp/cuda_graph_work")
    ap.add_argument("--out", required=True)
    ap.add_argument("--also-save", default=None)
    ap.add_argument("--sections", default="nodes,kernels,parity,decode", help="which of nodes,kernels,parity,decode "
                    "to run (--determinism adds its probes)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="gear variants: " + ",".join(VARIANTS))
    ap.add_argument("--generations", type=int, default=4, help="--determinism: generations per prefill mode")
    ap.add_argument("--build-only", action="store_true", help="build the graphs into --work and stop")
    ap.add_argument("--cpu-smoke", action="store_true", help="the code paths on ORT CPU (numbers meaningless)")
    args = ap.parse_args(argv)
    t0 = time.time()
    log = elapsed_logger()
    out = Path(args.out)
    import onnx
    import onnxruntime as ort
    import torch
    res: dict = {"command": command_line("benchmarks.cuda_gear_profile", argv), "models": {}, "errors": [],
                 "env": {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
                         "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    if out.is_file():
        res["models"] = json.loads(out.read_text()).get("models", {})
        res["earlier_commands"] = json.loads(out.read_text()).get("earlier_commands", []) + [
            json.loads(out.read_text()).get("command")]
    log(json.dumps(res["env"]))
    torch.backends.cuda.matmul.allow_tf32 = False

    def save():
        res["wall_s"] = round(time.time() - t0, 1)
        text = json.dumps(res, indent=2, sort_keys=True, default=str) + "\n"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        if args.also_save:
            Path(args.also_save).parent.mkdir(parents=True, exist_ok=True)
            Path(args.also_save).write_text(text)
    for name in args.models.split(","):
        if args.build_only and name in res["models"]:
            continue  # the measured record of an earlier call stays
        res["models"][name] = {}
        try:
            run_model(name, args, log, res["models"][name], save)
        except Exception:
            res["errors"].append(f"{name}: " + traceback.format_exc())
            log(f"{name} failed: {traceback.format_exc()[-800:]}")
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
