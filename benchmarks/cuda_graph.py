"""Decode ms/token on one GPU: today's ort-cuda decode vs the CUDA-graph decode gears vs eager PyTorch with
torch.cuda.CUDAGraph (issue 19; not a pytest test; run on the GPU machine, recipe benchmarks/gpu/cuda_graph.sh).

    PYTHONPATH=/tmp/site:$PWD python3 -m benchmarks.cuda_graph --models trained-small,small --out $OUT/h200_cuda_graph.json

Per model (built on the machine: the graphs of medium are ~1 GB fp16, more than a device call carries):
  build     the package's graphs: export -> latent-kv-fusion -> moe-ort-fused (subgraph router) -> fp16 (onnx/
            prefill.onnx, decode.onnx: what `compile --target ort-cuda` ships) and the decode gears
            (targets/ort_cuda/gears.py export_gear, save_gears: one shared weights file, pad graphs), seconds each;
  parity    greedy tokens from a prompt: the dynamic runtime vs GearDecoder (CUDA graphs on, in place), both on
            CUDA, and eager fp32 PyTorch on the GPU (equal prefix lengths);
  capture   whether ORT captures the dynamic decode graph (enable_cuda_graph on a fixed-shape binding of it): the
            error it gives, and where each gear graph's nodes ran (a profiled run without capture: nodes off the
            CUDA EP break capture);
  decode    ms per token at each gear G (position G-1, so the cache holds G-1 rows plus the new one), median of
            --repeat after warm-up, the logits copied to the host in every form:
              ort_dynamic       today's package: CudaPackageRuntime.run("decode") on a synthetic cache of G-1 rows
              ort_gear_graph    GearDecoder.step, CUDA graph replayed, in place (the package's default)
              ort_gear_nograph  the same gear graph and bindings without capture (what the capture itself saves)
              ort_gear_pingpong CUDA graphs, two buffer sets (--pingpong)
              torch_graph       models/static_lm.py StaticCausalLM (the same fixed-shape form; fp16 weights, router and
                                softmax fp32) captured with torch.cuda.CUDAGraph, the present copied back into the
                                static past buffers inside the graph
              torch_eager       the same module without the graph
  floor     bytes one decode token must read (all non-expert weights, one embedding row, k of E routed experts,
            fp16; plus the G attended cache rows, fp16) / 4.8 TB/s, and each form's ratio to it.
Writes one JSON file (saved after every section; a model already in it is replaced, others kept) with the raw
numbers and the command line. The built graphs stay in --work/<model> (build.json marks them done): a second call on
the same machine reuses them. --cpu-smoke runs the code paths on ORT CPU without a GPU (no capture, no torch).
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
from benchmarks.cuda import HBM_BYTES_PER_S  # noqa: E402
from benchmarks.cuda import _median_ms as _timed  # noqa: E402


def _median_ms(fn, repeat: int, sync=None) -> dict:
    return _timed(fn, repeat, warmup=5, sync=sync)  # 5 warm-up runs: the first replays of a capture


def build(model, work: Path, gear_list, log, before: bool = False) -> dict:
    """onnx/{prefill,decode}.onnx as the ort-cuda package has them, and the gears (module doc). before: also the
    gears without the kernel-count fusions (gears.convert_gear fuse=False, from the same traced step) in
    onnx_before/ (their own weights file; the pad graphs are onnx/'s): benchmarks/cuda_gear_profile.py."""
    import onnx_ir as ir
    import onnx
    from models.static_lm import static_cache_spec
    from passes import PASSES, graphs_for
    from passes.cleanup import cleanup
    from passes.moe_lowering import MoELoweringPass
    from pipeline.export import export_graphs, save_graph
    from targets.ort_cuda import gears, to_fp16
    d = work / "onnx"
    marker = work / "build.json"
    if marker.is_file() and json.loads(marker.read_text()).get("gears") == list(gear_list) and \
            json.loads(marker.read_text()).get("before", False) >= before:
        info = json.loads(marker.read_text())
        info["reused"] = True  # a previous call on this machine built them (a call that timed out, run again)
        log(f"reusing the graphs built in {work}")
        return info
    d.mkdir(parents=True, exist_ok=True)
    info: dict = {"gears": list(gear_list), "before": before}
    t = time.perf_counter()
    graphs = export_graphs(model, "latent")
    for g in graphs_for("latent-kv-fusion"):
        PASSES["latent-kv-fusion"]()(graphs[g])
        cleanup(graphs[g])
    for g in ("prefill", "decode"):
        MoELoweringPass("ort-fused", report_dropped=False, fused_router="subgraph")(graphs[g])
        cleanup(graphs[g])
        to_fp16(graphs[g])
        save_graph(graphs[g], d / f"{g}.onnx")
    del graphs
    info["dynamic_s"] = round(time.perf_counter() - t, 1)
    log(f"dynamic graphs {info['dynamic_s']} s")
    t = time.perf_counter()
    gm, gb = {}, {}
    for G in gear_list:
        traced = gears.trace_gear(model, G)
        if before:
            mb, rep = gears.convert_gear(ir.from_proto(ir.to_proto(traced)), G, fuse=False)
            gb[gears.gear_name(G)] = mb
            info[f"gear_{G}_before"] = rep.to_dict()
        m, rep = gears.convert_gear(traced, G)
        gm[gears.gear_name(G)] = m
        info[f"gear_{G}"] = rep.to_dict()
    gears.save_gears(gm, d)
    del gm
    if before:
        (work / "onnx_before").mkdir(exist_ok=True)
        gears.save_gears(gb, work / "onnx_before")
    del gb
    spec = static_cache_spec(model.config)
    names = spec.input_names()
    for G in gear_list:
        onnx.save_model(gears.pad_graph(names, gears.cache_widths(spec, names), G), str(d / f"{gears.pad_name(G)}.onnx"))
    info["gears_s"] = round(time.perf_counter() - t, 1)
    info["gear_weights_bytes"] = (d / gears.WEIGHTS_FILE).stat().st_size
    info["cache_bytes"] = {str(G): gears.gear_memory(spec, G) for G in gear_list}
    log(f"gears {info['gears_s']} s")
    marker.write_text(json.dumps(info, sort_keys=True))
    return info


def manifest_for(cfg, gear_list, session, folder: str = "onnx") -> dict:
    """folder: where the gear graphs are (onnx, or build(before=True)'s onnx_before); the rest is onnx/."""
    from targets.ort_cuda import gears
    return {"io": {"vocab_size": cfg.vocab_size,
                   "graphs": {g: {"file": f"onnx/{g}.onnx"} for g in ("prefill", "decode")},
                   "decode_gears": {"gears": list(gear_list), "batch": gears.GEAR_BATCH,
                                    "graphs": {str(G): {"file": f"{folder}/{gears.gear_name(G)}.onnx",
                                                        "pad_file": f"onnx/{gears.pad_name(G)}.onnx"}
                                               for G in gear_list}}},
            "target": {"session": session}}


def capture_probe(work: Path, rt, gear_list) -> dict:
    """Does ORT capture the dynamic decode graph? Where do the gear graphs' nodes run? (module doc)"""
    import onnxruntime as ort
    from runtime.cuda_runtime import cuda_provider_options, session_options
    out: dict = {}
    try:
        so = session_options(rt.manifest["target"]["session"])
        s = ort.InferenceSession(str(work / "onnx" / "decode.onnx"), so, providers=[
            ("CUDAExecutionProvider", {**cuda_provider_options(), "enable_cuda_graph": "1"})])
        past = rt.synthetic_cache(1, 64)
        b = s.io_binding()
        b.bind_ortvalue_input("input_ids", rt.to_device(np.array([[7]], np.int64)))
        for n, v in past.items():
            b.bind_ortvalue_input(n, v)
        for o in s.get_outputs():  # preallocated at the shapes this step gives: fixed addresses, as capture needs
            shape = [1, 1, rt.vocab_size] if o.name == "logits" else [1, 65, int(o.shape[-1])]
            dt = np.float32 if o.type == "tensor(float)" else np.float16
            b.bind_ortvalue_output(o.name, ort.OrtValue.ortvalue_from_shape_and_type(shape, dt, "cuda", 0))
        for _ in range(3):
            s.run_with_iobinding(b)
        out["dynamic_decode"] = {"captured": True, "note": "ran 3 times with enable_cuda_graph (shapes fixed by the binding)"}
    except Exception as e:
        out["dynamic_decode"] = {"captured": False, "error": str(e).strip().splitlines()[0][:600]}
    try:
        from targets.ort_cuda import gears
        so = session_options(rt.manifest["target"]["session"], profile=True)
        so.profile_file_prefix = str(work / "gearprof")
        G = gear_list[0]
        s = ort.InferenceSession(str(work / "onnx" / f"{gears.gear_name(G)}.onnx"), so,
                                 providers=[("CUDAExecutionProvider", cuda_provider_options()), "CPUExecutionProvider"])
        feeds = {"input_ids": np.array([[7]], np.int32), "position": np.array([G // 2], np.int32)}
        for i in s.get_inputs():
            if i.name.startswith("past."):
                feeds[i.name] = np.zeros(i.shape, np.float16)
        for _ in range(3):
            s.run(None, feeds)
        prof = json.loads(Path(s.end_profiling()).read_text())
        by_ep: dict = {}
        us: dict = {}
        for ev in prof:
            a = ev.get("args", {})
            if ev.get("cat") == "Node" and "provider" in a and ev["name"].endswith("_kernel_time"):
                key = f"{a['provider']}:{a.get('op_name')}"
                by_ep[key] = by_ep.get(key, 0) + 1
                us[key] = us.get(key, 0) + ev.get("dur", 0)
        out["gear_nodes_by_provider_op_3runs"] = dict(sorted(by_ep.items()))
        out["gear_kernel_us_by_provider_op_3runs"] = dict(sorted(us.items(), key=lambda kv: -kv[1]))
        out["gear_nodes_off_cuda"] = {k: v for k, v in by_ep.items() if not k.startswith("CUDAExecutionProvider")}
    except Exception:
        out["gear_profile_error"] = traceback.format_exc()[-1500:]
    return out


def torch_static(model, G: int, dev, repeat: int, eager: bool = True) -> dict:
    """StaticCausalLM (fp16) at cache G: eager (unless eager=False) and torch.cuda.CUDAGraph (module doc)."""
    import copy

    import torch
    from models.static_lm import StaticCausalLM, static_cache_spec
    m16 = copy.deepcopy(model).cpu()  # built on the CPU: StaticCausalLM makes its rope tables with torch.arange there
    w = StaticCausalLM(m16, 1, G, "gather").to(dev).half().eval()
    spec = static_cache_spec(model.config)
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = spec.static_shapes(1, G)
    past = [torch.randn(s, device=dev, dtype=torch.float16, generator=gen) for _ in range(spec.num_layers) for s in shapes]
    ids = torch.full((1, 1), 7, dtype=torch.int32, device=dev)
    pos = torch.full((1,), G - 1, dtype=torch.int32, device=dev)
    host_ids = torch.full((1, 1), 7, dtype=torch.int32).pin_memory()
    out: dict = {}
    run_eager = eager

    def step():
        o = w(ids, pos, *past)
        for p, n in zip(past, o[1:]):
            p.copy_(n)
        return o[0]

    with torch.no_grad():
        def eager():
            ids.copy_(host_ids, non_blocking=True)
            pos.fill_(G - 1)
            return step()[:, -1].float().cpu()
        if run_eager:
            out["torch_eager"] = _median_ms(eager, repeat, sync=torch.cuda.synchronize)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()

        def replay():
            ids.copy_(host_ids, non_blocking=True)
            pos.fill_(G - 1)
            graph.replay()
            return logits[:, -1].float().cpu()
        out["torch_graph"] = _median_ms(replay, repeat, sync=torch.cuda.synchronize)
    del graph, w, m16, past
    torch.cuda.empty_cache()
    return out


def weight_bytes(path: Path, cfg) -> dict:
    from benchmarks.cuda import weight_bytes as wb
    return wb(path, cfg)


def run_model(name: str, args, log, res: dict, save) -> dict:
    import torch

    import models
    from runtime.cuda_runtime import CudaPackageRuntime, GearDecoder
    from targets.ort_cuda import session_config
    res.update({"model": name, "errors": []})
    torch.manual_seed(0)
    model = models.load(name, seed=0)
    cfg = model.config
    res["parameters"] = cfg.param_count()
    gear_list = tuple(int(x) for x in args.gears.split(","))
    work = Path(args.work) / Path(name).name
    res["build"] = build(model, work, gear_list, log)
    save()
    t = time.perf_counter()
    device = "cpu" if args.cpu_smoke else "cuda"
    rt = CudaPackageRuntime(work, device=device, manifest=manifest_for(cfg, gear_list, session_config()))
    res["session_load_s"] = {"dynamic": round(time.perf_counter() - t, 1)}
    res["providers"] = rt.providers
    decoders = {}  # each form on its own, so that one the CUDA EP refuses leaves the others measured
    graph = not args.cpu_smoke  # --cpu-smoke: the script's code paths on ORT CPU (no CUDA graphs there)
    for form, kw in (("ort_gear_graph", {"cuda_graph": graph}), ("ort_gear_nograph", {"cuda_graph": False}),
                     *((("ort_gear_pingpong", {"cuda_graph": graph, "inplace": False}),) if args.pingpong else ())):
        t = time.perf_counter()
        try:
            decoders[form] = GearDecoder(rt, **kw)
            res["session_load_s"][form] = round(time.perf_counter() - t, 1)
        except Exception:
            res["errors"].append(f"{form} sessions: " + traceback.format_exc())
    dec = decoders.get("ort_gear_graph") or decoders.get("ort_gear_nograph")
    dev = torch.device(device)
    # ---- parity: greedy tokens ----------------------------------------------------------------------------
    try:
        prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, args.parity_prompt))
        t_dyn, s_dyn = rt.generate(prompt, args.steps)
        t_gear, s_gear = dec.generate(prompt, args.steps)
        t_again, _ = dec.generate(prompt, args.steps)
        t_dyn_again, _ = rt.generate(prompt, args.steps)  # is the dynamic path itself repeatable?
        with torch.no_grad():
            md = model.to(dev)
            ids = torch.tensor(prompt, device=dev)
            cache = [tuple(x.to(dev) for x in layer) for layer in md.empty_cache(1, "latent")]
            toks = []
            for _ in range(args.steps):
                lg, cache = md.step(ids, cache, "latent")
                ids = lg[:, -1].float().argmax(-1, keepdim=True)
                toks.append(ids.cpu())
            model = md.cpu()
        t_ref = torch.cat(toks, 1).numpy()

        def prefix(a, b):
            neq = (a != b).any(0)
            return int(np.argmax(neq)) if neq.any() else int(a.shape[1])
        res["parity"] = {"gear_form": next(k for k, v in decoders.items() if v is dec),
                         "gear_tokens_equal_dynamic": bool(np.array_equal(t_gear, t_dyn)),
                         "gear_replay_again_equal": bool(np.array_equal(t_again, t_gear)),
                         "dynamic_again_equal": bool(np.array_equal(t_dyn_again, t_dyn)),
                         "equal_prefix_gear_vs_gear_again": prefix(t_gear, t_again),
                         "equal_prefix_gear_vs_dynamic": prefix(t_gear, t_dyn),
                         "equal_prefix_dynamic_vs_eager_fp32": prefix(t_dyn, t_ref),
                         "equal_prefix_gear_vs_eager_fp32": prefix(t_gear, t_ref),
                         "max_abs_step_logits_gear_vs_dynamic": float(np.abs(s_gear - s_dyn).max()),
                         "steps": args.steps, "gears_used": sorted(dec.state)}
        log(f"{name} parity {res['parity']}")
    except Exception:
        res["errors"].append("parity: " + traceback.format_exc())
    # ---- decode ms/token --------------------------------------------------------------------------------
    wb = weight_bytes(work / "onnx" / "decode.onnx", cfg)
    res["weight_bytes_fp16_graph"] = wb
    per_row = res["build"]["cache_bytes"][str(gear_list[0])] // gear_list[0]
    res["decode"] = {}
    tok = np.array([7])
    save()
    for G in gear_list:
        row: dict = {"gear": G, "position": G - 1}
        L = G - 1
        try:
            past = rt.synthetic_cache(1, L)
            ids1 = np.array([[7]], np.int64)
            row["ort_dynamic"] = _median_ms(lambda: rt.run("decode", ids1, past), args.repeat)
            del past
        except Exception:
            res["errors"].append(f"ort_dynamic {G}: " + traceback.format_exc())
        for form, d in decoders.items():
            try:
                d.synthetic(L)
                row[form] = _median_ms(lambda: d.step(tok, L), args.repeat)
            except Exception:
                res["errors"].append(f"{form} {G}: " + traceback.format_exc())
        try:
            if not args.cpu_smoke:
                row.update(torch_static(model, G, dev, args.repeat))
        except Exception:
            res["errors"].append(f"torch {G}: " + traceback.format_exc())
        floor = (wb["active_per_token"] + G * per_row) / HBM_BYTES_PER_S * 1e3
        row["floor_ms"] = floor
        row["bytes_per_token"] = {"weights": wb["active_per_token"], "cache": G * per_row}
        for k in list(row):
            if isinstance(row[k], dict) and "median_ms" in row[k]:
                row[f"ratio_{k}_to_floor"] = row[k]["median_ms"] / floor
        if "ort_dynamic" in row and "ort_gear_graph" in row:
            row["speedup_gear_graph_vs_dynamic"] = row["ort_dynamic"]["median_ms"] / row["ort_gear_graph"]["median_ms"]
        res["decode"][str(G)] = row
        save()
        log(f"{name} G={G}: " + json.dumps({k: (v["median_ms"] if isinstance(v, dict) and "median_ms" in v else v)
                                            for k, v in row.items() if not k.startswith("bytes")}))
    del decoders, dec
    # last: a failed capture attempt must not disturb the timings above
    res["capture"] = {} if args.cpu_smoke else capture_probe(work, rt, gear_list)
    log(f"{name} capture {json.dumps(res['capture'])[:800]}")
    del rt
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="trained-small,small,medium")
    ap.add_argument("--gears", default="1024,8192,32768")
    ap.add_argument("--parity-prompt", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--pingpong", action="store_true", help="also time the two-buffer-set form")
    ap.add_argument("--work", default="/tmp/cuda_graph_work")
    ap.add_argument("--out", required=True)
    ap.add_argument("--also-save", default=None, help="a second copy of the JSON, written at every save (e.g. on the "
                    "machine, for the next call to start from)")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the code paths on ORT CPU (no GPU; numbers meaningless)")
    args = ap.parse_args(argv)
    t0 = time.time()
    log = elapsed_logger()
    out = Path(args.out)
    import onnx
    import onnxruntime as ort
    import torch
    res: dict = {"command": command_line("benchmarks.cuda_graph", argv), "models": {}, "errors": [],
                 "env": {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
                         "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    if out.is_file():  # one file across several calls (one model per call for medium)
        prev = json.loads(out.read_text())
        res["models"] = prev.get("models", {})
    log(json.dumps(res["env"]))
    torch.backends.cuda.matmul.allow_tf32 = False
    def save():
        res["wall_s"] = round(time.time() - t0, 1)
        text = json.dumps(res, indent=2, sort_keys=True, default=str) + "\n"
        out.write_text(text)
        if args.also_save:
            Path(args.also_save).parent.mkdir(parents=True, exist_ok=True)
            Path(args.also_save).write_text(text)

    for name in args.models.split(","):
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
