"""Run an ort-cuda package with ONNX Runtime's CUDA provider, the latent cache kept on the GPU.

Self-contained on purpose (numpy + onnxruntime-gpu only): every ort-cuda package ships a copy of
this file as runtime/cuda_runtime.py.

    python runtime/cuda_runtime.py generate --prompt-ids 1,2,3 --max-new-tokens 8
    python runtime/cuda_runtime.py verify-golden [--record]   # on a GPU machine; --record writes the
                                                               # result into manifest.json
    python runtime/cuda_runtime.py verify-golden --device cpu  # same graphs on ORT CPU (slow)
    python runtime/cuda_runtime.py generate --gears --prompt-ids 1,2,3   # through the CUDA-graph gears (the default on
                                                                         # cuda when the package has them; --no-gears)

IOBinding. Each call binds input_ids from host memory (8 bytes a token), the past cache as the
OrtValues the previous call produced (device memory, never copied to the host), and binds every
present.* output to the device: ORT allocates it from its CUDA arena. The next step feeds those
OrtValues back as past.*; the previous step's buffers are released when their OrtValues are dropped,
so the arena reuses them. Only the logits go to the host (bound to "cpu": ORT copies [B, V] floats
after the last kernel) for the greedy argmax.

Why allocate per step rather than preallocate a max-length cache and slice: the exported graph
appends with Concat(past, new) -> present, which always writes a new [B, past+1, w] tensor (ORT cannot
alias an output to an input of a Concat), so a preallocated buffer would still be copied into every
step. Sharing one buffer (ORT's past_present_share_buffer) exists only for its GroupQueryAttention /
MultiHeadAttention contrib ops, which do not express MLA's latent attention. The per-step cost of the
Concat is one read and one write of the cache, on the device.

CUDA graphs (enable_cuda_graph) cannot capture the dynamic decode graph: ORT captures one graph for fixed
input/output shapes and addresses, and its past/present shapes grow by one token every call (and
com.microsoft.MoE's launches are data-dependent). Packages compiled with --decode-gears carry fixed-shape decode
gears for that (GearDecoder below: a cache preallocated per gear, written in place, every input and output
bound once, one captured graph per gear; the prompt still runs through the dynamic prefill).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}


def cuda_provider_options(device_id: int = 0) -> dict:
    # kept equal to targets.ort_cuda.cuda_provider_options (this file must not import the compiler)
    return {"device_id": str(device_id), "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1", "use_tf32": "0"}


def session_options(config: dict, profile: bool = False):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[config.get("graph_optimization_level", "all")])
    if config.get("intra_op_num_threads"):
        so.intra_op_num_threads = int(config["intra_op_num_threads"])
    so.inter_op_num_threads = int(config.get("inter_op_num_threads", 1))
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.enable_profiling = profile
    return so


def cuda_available() -> bool:
    import onnxruntime as ort
    return "CUDAExecutionProvider" in ort.get_available_providers()


def cache_fills(cache: dict) -> dict[str, float]:
    """{past.{layer}.{name}: fill} for the cache tensors whose empty state is not 0 (the manifest's io.cache:
    per-layer specs list each layer kind's tensors, a "fill" given as a number or "inf" / "-inf"); the same
    function as runtime/ort_runtime.py's (each runtime ships alone)."""
    kinds = cache.get("layer_kinds")
    if not kinds:
        return {}
    return {f"past.{i}.{t['name']}": float(t["fill"]) for i, k in enumerate(cache["layer_kind_of"])
            for t in kinds[k]["per_layer"] if "fill" in t}


class CudaPackageRuntime:
    """Greedy generation from an ort-cuda package's graphs with IOBinding (module doc).

    device: "cuda" (default when the CUDA EP is present) or "cpu" (the same code path on ORT CPU).
    """

    def __init__(self, package_dir, device: str | None = None, device_id: int = 0, manifest: dict | None = None,
                 graphs: dict | None = None, profile: bool = False):
        import onnxruntime as ort
        self.ort = ort
        self.root = Path(package_dir)
        self.manifest = manifest or json.loads((self.root / "manifest.json").read_text())
        io = self.manifest["io"]
        self.vocab_size = io["vocab_size"]
        self.device = device or ("cuda" if cuda_available() else "cpu")
        self.device_id = device_id
        if self.device == "cuda":
            providers = [("CUDAExecutionProvider", cuda_provider_options(device_id)), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.provider_request = providers
        cfg = dict(self.manifest["target"].get("session", {}))
        self.graph_files = graphs or {g: spec["file"] for g, spec in io["graphs"].items()}
        files = self.graph_files
        self.sessions = {g: ort.InferenceSession(str(self.root / f), session_options(cfg, profile), providers=providers)
                         for g, f in files.items()}
        self.providers = self.sessions["decode"].get_providers()
        if self.device == "cuda" and "CUDAExecutionProvider" not in self.providers:
            raise RuntimeError(f"CUDAExecutionProvider did not load (providers: {self.providers})")
        dec = self.sessions["decode"]
        self.input_types = {g: {i.name: _ORT_TYPES[i.type] for i in s.get_inputs()} for g, s in self.sessions.items()}
        self.input_shapes = {i.name: i.shape for i in dec.get_inputs()}
        self.past_names = [i.name for i in dec.get_inputs() if i.name != "input_ids"]
        self.present_names = {g: [o.name for o in s.get_outputs() if o.name.startswith("present.")]
                              for g, s in self.sessions.items()}

    # ---- cache ------------------------------------------------------------------------------------------
    def to_device(self, array: np.ndarray, dtype=None):
        arr = np.ascontiguousarray(array if dtype is None else np.asarray(array).astype(dtype, copy=False))
        return self.ort.OrtValue.ortvalue_from_numpy(arr, self.device, self.device_id)

    def empty_cache(self, batch: int) -> dict:
        """past.* OrtValues on the device before the first token: growing (symbolic) axes at 0 rows, fixed axes at
        their size, filled with the manifest's fill value for that tensor (io.cache; 0 unless it gives one)."""
        fills = cache_fills(self.manifest["io"].get("cache", {}))
        out = {}
        for name in self.past_names:
            shape = [batch if d == "batch" else 0 if isinstance(d, str) else d for d in self.input_shapes[name]]
            out[name] = self.to_device(np.full(shape, fills.get(name, 0.0), self.input_types["decode"][name]))
        return out

    def cache_from_numpy(self, cache: dict[str, np.ndarray]) -> dict:
        return {n: self.to_device(a, self.input_types["decode"][n]) for n, a in cache.items()}

    def synthetic_cache(self, batch: int, length: int, seed: int = 0) -> dict:
        """A random cache of `length` tokens on the device (decode timing depends on length, not values)."""
        rng = np.random.default_rng(seed)
        out = {}
        for name in self.past_names:
            shape = [batch if d == "batch" else length if isinstance(d, str) else d for d in self.input_shapes[name]]
            out[name] = self.to_device(rng.standard_normal(shape, dtype=np.float32), self.input_types["decode"][name])
        return out

    # ---- one call -----------------------------------------------------------------------------------------
    def run(self, graph: str, input_ids, past: dict, logits_on: str = "cpu"):
        """-> logits (numpy when logits_on == "cpu", else a device OrtValue), present cache as device
        OrtValues keyed past.* (to feed the next step)."""
        sess = self.sessions[graph]
        b = sess.io_binding()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64)))
        for name, v in past.items():
            b.bind_ortvalue_input(name, v)
        if logits_on == "cpu":
            b.bind_output("logits", "cpu")
        else:
            b.bind_output("logits", self.device, self.device_id)
        names = self.present_names[graph]
        for n in names:
            b.bind_output(n, self.device, self.device_id)
        sess.run_with_iobinding(b)
        outs = b.get_outputs()
        logits = outs[0].numpy() if logits_on == "cpu" else outs[0]
        present = {n.replace("present.", "past.", 1): v for n, v in zip(names, outs[1:])}
        return logits, present

    def generate(self, prompt_ids, max_new_tokens: int):
        """-> tokens [B, N] int64, step_logits [B, N, V] float32 (the logits that chose each token)."""
        ids = np.asarray(prompt_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        past = self.empty_cache(ids.shape[0])
        tokens, steps = [], []
        graph = "prefill"
        for _ in range(max_new_tokens):
            logits, past = self.run(graph, ids, past)
            last = logits[:, -1].astype(np.float32)
            ids = last.argmax(-1)[:, None].astype(np.int64)
            tokens.append(ids)
            steps.append(last)
            graph = "decode"
        if not tokens:
            return np.zeros((ids.shape[0], 0), np.int64), np.zeros((ids.shape[0], 0, self.vocab_size), np.float32)
        return np.concatenate(tokens, 1), np.stack(steps, 1)

    def run_numpy(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Plain session.run with feeds cast to the graph's input dtypes (golden data is fp32)."""
        sess = self.sessions[graph]
        types = self.input_types[graph]
        cast = {n: np.asarray(a).astype(types[n], copy=False) for n, a in feeds.items()}
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, cast)))


class GearDecoder:
    """Decode through the package's fixed-shape gears (manifest io.decode_gears; targets/ort_cuda/gears.py), each
    a graph over a cache preallocated at G rows, bound once through IOBinding and, on the CUDA EP, captured as a
    CUDA graph (provider option enable_cuda_graph) and replayed every step.

    Per gear, allocated on first use and kept for the runtime's life (a captured graph holds their addresses):
    the cache buffers past.* [B, G, w] fp16, input_ids int32 [B, 1], position int32 [B] and logits fp32 [B, 1, V],
    all on the device. A step writes the token and the position into their buffers (OrtValue.update_inplace: 4
    bytes each, host to device), runs (replays), and copies the logits to the host for the argmax.

    inplace (default): present.* is bound to the same buffers as past.*; the gear graph's ScatterND (passes/
    static_cache_write.py) then writes only the new row, so one buffer set per gear. inplace=False: two buffer
    sets per gear (step t reads A writes B, step t+1 reads B writes A), two captured graphs (run option
    gpu_graph_id 0 / 1), each step copying the whole cache once: the fallback should an ONNX Runtime build refuse
    or break the aliasing (on an ONNX Runtime without PR 32121 the second capture in one session may recycle the
    first's pinned staging blocks: docs/ort-cuda.md). The step is idempotent (it overwrites row `position` only), so
    ORT's extra warm-up executions of a capturing Run() change nothing.

    The prompt runs through the dynamic prefill graph (any length); its present cache (device OrtValues) is padded
    into the smallest gear longer than the prompt by the gear's pad graph (on the device, once); when the position
    reaches the gear's length the cache is padded into the next gear the same way. A position past the largest
    gear is an error naming the gears (compile with a longer one).

    prefill="gears": the prompt runs token by token through the gears instead (from a zeroed gear, the same step as
    decode; a prompt of P tokens costs P steps). What it is for: on the H200 the gear step was bit-identical run to
    run (every intermediate value, captured and not), the dynamic prefill was not (ORT's CUDA com.microsoft.MoE gives
    other low bits from run to run; docs/ort-cuda.md), so two generations through the dynamic prefill may start from
    different caches and, at a near tie, give other tokens. Repeated generations with prefill="gears" have not yet
    run on a GPU (benchmarks/gpu/cuda_graph.sh determinism)."""

    def __init__(self, rt: "CudaPackageRuntime", cuda_graph: bool | None = None, inplace: bool = True,
                 prefill: str = "dynamic"):
        if prefill not in ("dynamic", "gears"):
            raise ValueError(f"prefill {prefill!r}: 'dynamic' (the prefill graph) or 'gears' (the prompt token by token)")
        self.prefill = prefill
        spec = rt.manifest["io"].get("decode_gears")
        if not spec:
            raise RuntimeError(f"{rt.root}: this package has no decode gears (compile with --decode-gears)")
        ort = rt.ort
        self.rt, self.inplace = rt, inplace
        self.gears = sorted(int(g) for g in spec["gears"])
        self.batch = int(spec["batch"])
        self.cuda_graph = (rt.device == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and rt.device != "cuda":
            raise RuntimeError("CUDA graphs need device cuda (the CPU EP has none)")
        cfg = dict(rt.manifest["target"].get("session", {}))
        self.files = {int(g): spec["graphs"][str(g)] for g in self.gears}
        if rt.device == "cuda":
            opts = cuda_provider_options(rt.device_id)
            graph_opts = {**opts, "enable_cuda_graph": "1" if self.cuda_graph else "0"}
            dec_providers = [("CUDAExecutionProvider", graph_opts)]  # capture needs every node on the CUDA EP
            pad_providers = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
        else:
            dec_providers = pad_providers = ["CPUExecutionProvider"]
        self.sessions = {g: ort.InferenceSession(str(rt.root / f["file"]), session_options(cfg), providers=dec_providers)
                         for g, f in self.files.items()}
        self.pads = {g: ort.InferenceSession(str(rt.root / f["pad_file"]), session_options(cfg), providers=pad_providers)
                     for g, f in self.files.items()}
        dec = self.sessions[self.gears[0]]
        self.past_names = [i.name for i in dec.get_inputs() if i.name.startswith("past.")]
        self.widths = {i.name: int(i.shape[-1]) for i in dec.get_inputs() if i.name.startswith("past.")}
        self.vocab_size = rt.vocab_size
        self.state: dict[int, dict] = {}
        self.gear = None  # the gear in use
        self.parity = 0  # ping-pong: which buffer set the next step reads

    # ---- buffers and bindings (once per gear) ----------------------------------------------------------------
    def _alloc(self, shape, dtype):
        return self.rt.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.rt.device, self.rt.device_id)

    def _state(self, gear: int) -> dict:
        if gear in self.state:
            return self.state[gear]
        B = self.batch
        st = {"ids": self._alloc([B, 1], np.int32), "pos": self._alloc([B], np.int32),
              "logits": self._alloc([B, 1, self.vocab_size], np.float32),
              "sets": [{n: self._alloc([B, gear, self.widths[n]], np.float16) for n in self.past_names}
                       for _ in range(1 if self.inplace else 2)]}
        sess = self.sessions[gear]
        st["bindings"], st["run_options"] = [], []
        for k in range(len(st["sets"])):
            read, write = st["sets"][k], st["sets"][k if self.inplace else 1 - k]
            b = sess.io_binding()
            b.bind_ortvalue_input("input_ids", st["ids"])
            b.bind_ortvalue_input("position", st["pos"])
            for n in self.past_names:
                b.bind_ortvalue_input(n, read[n])
                b.bind_ortvalue_output(n.replace("past.", "present.", 1), write[n])
            b.bind_ortvalue_output("logits", st["logits"])
            ro = self.rt.ort.RunOptions()
            if self.cuda_graph:
                ro.add_run_config_entry("gpu_graph_id", str(k))
            st["bindings"].append(b)
            st["run_options"].append(ro)
        self.state[gear] = st
        return st

    def gear_for(self, position: int) -> int:
        fit = [g for g in self.gears if g > position]
        if not fit:
            raise RuntimeError(f"decode position {position} needs a cache longer than the largest gear "
                               f"{self.gears[-1]} (gears {self.gears}); compile with a longer --decode-gears")
        return fit[0]

    def load(self, cache: dict, length: int) -> int:
        """Pad a cache of `length` rows (device OrtValues keyed past.*, e.g. the prefill's present) into the gear
        that holds position `length`, on the device. -> that gear."""
        gear = self.gear_for(length)
        st = self._state(gear)
        target = st["sets"][0]
        pad = self.pads[gear]
        b = pad.io_binding()
        for n in self.past_names:
            b.bind_ortvalue_input(n, cache[n])
            b.bind_ortvalue_output("gear." + n.split(".", 1)[1], target[n])
        pad.run_with_iobinding(b)
        self.gear, self.parity = gear, 0
        return gear

    def current_cache(self) -> dict:
        """The cache buffers the next step reads (device OrtValues keyed past.*)."""
        return self.state[self.gear]["sets"][self.parity]

    def step(self, token, position: int, logits_on: str = "cpu"):
        """One token per row at `position` -> logits [B, V] (numpy) or the device OrtValue [B, 1, V]."""
        if position >= self.gear:
            self.load(self.current_cache(), self.gear)  # the next gear up, padded on the device
        st = self.state[self.gear]
        B = self.batch
        st["ids"].update_inplace(np.ascontiguousarray(np.asarray(token, np.int32).reshape(B, 1)))
        st["pos"].update_inplace(np.full((B,), position, np.int32))
        k = self.parity
        self.sessions[self.gear].run_with_iobinding(st["bindings"][k], st["run_options"][k])
        if not self.inplace:
            self.parity = 1 - k
        return st["logits"].numpy()[:, 0] if logits_on == "cpu" else st["logits"]

    def generate(self, prompt_ids, max_new_tokens: int):
        """Greedy as CudaPackageRuntime.generate (the dynamic prefill, then the gears) -> tokens [B, N] int64,
        step_logits [B, N, V] float32."""
        ids = np.asarray(prompt_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.shape[0] != self.batch:
            raise RuntimeError(f"prompt batch {ids.shape[0]}: the decode gears are built for batch {self.batch}")
        if max_new_tokens <= 0:
            return np.zeros((ids.shape[0], 0), np.int64), np.zeros((ids.shape[0], 0, self.vocab_size), np.float32)
        if self.prefill == "gears":  # class doc: the prompt through the gear step, from a zeroed first gear
            gear = self.gear_for(0)
            st = self._state(gear)
            for n in self.past_names:
                st["sets"][0][n].update_inplace(np.zeros((self.batch, gear, self.widths[n]), np.float16))
            self.gear, self.parity = gear, 0
            for t in range(ids.shape[1]):
                last = self.step(ids[:, t], t).astype(np.float32)
            position = ids.shape[1]
        else:
            logits, present = self.rt.run("prefill", ids, self.rt.empty_cache(ids.shape[0]))
            position = ids.shape[1]
            last = logits[:, -1].astype(np.float32)
            if max_new_tokens > 1:
                self.load(present, position)
            del present
        tokens, steps = [last.argmax(-1)], [last]
        for _ in range(max_new_tokens - 1):
            last = self.step(tokens[-1], position).astype(np.float32)
            tokens.append(last.argmax(-1))
            steps.append(last)
            position += 1
        return np.stack(tokens, 1).astype(np.int64), np.stack(steps, 1)

    def synthetic(self, length: int, seed: int = 0) -> int:
        """A random cache of `length` rows in the gear holding position `length` (decode timing). -> the gear."""
        rng = np.random.default_rng(seed)
        cache = {n: self.rt.to_device(rng.standard_normal((self.batch, length, self.widths[n]), dtype=np.float32),
                                      np.float16) for n in self.past_names}
        return self.load(cache, length)


def verify_golden(package_dir, device: str | None = None, explain=None) -> tuple[list[str], dict]:
    """Re-run the golden inputs; -> (failures, record). [] = all outputs within the recorded tolerances
    (|a-r| <= atol or <= rtol*|r|; per output from golden.tolerance.cases where the compiler recorded
    them: its fp16 limits) and the greedy tokens equal, or differing first at a near tie (the golden
    fp32 top-1/top-2 margin at most what the greedy limits let two logits move, or a router / indexer choice of
    that step within the build's flip margin). A failing case whose recorded choices, forced, reproduce it and
    whose choice scores moved only by rounding is a near tie too: explain(rt, root, case, feeds, tol, judge) ->
    (a near tie, why) does that re-run (`mlamoe verify` passes targets/ort_cuda/choice_forcing.py's; this file, shipped
    in the package, does not import the passes it needs). Near ties are record["notes"], not failures. `record` says
    where it ran."""
    import onnxruntime as ort
    root = Path(package_dir)
    rt = CudaPackageRuntime(root, device=device)
    golden = rt.manifest["golden"]
    tol = golden["tolerance"]
    failures, notes, worst = [], [], {}
    for case in golden["cases"]:
        feeds = {n: np.load(root / f) for n, f in case["inputs"].items()}
        bad = _case_failures(root, case, rt.run_numpy(case["graph"], feeds), tol, worst)
        if bad and case.get("choices"):  # a near tie the GPU's rounding turned, or a fault
            if explain is None:
                bad.append(f"{case['name']}: its recorded choices were not forced (`mlamoe verify` re-runs the case "
                           f"with them and calls a near tie that the GPU's rounding turned a note)")
            else:
                tie, why = explain(rt, root, case, feeds, tol, lambda got, c=case: _case_failures(root, c, got, tol))
                if tie:
                    notes.append(f"{case['name']}: {'; '.join(bad)}; {why}")
                    continue
                bad.append(f"{case['name']}: {why}")
        failures += bad
    gen = golden.get("greedy")
    if gen:
        prompt = np.load(root / gen["prompt"])
        want = np.load(root / gen["tokens"])
        runs = [("greedy generation", lambda: rt.generate(prompt, want.shape[1]))]
        if rt.manifest["io"].get("decode_gears"):  # the same tokens through the CUDA-graph decode gears
            runs.append(("greedy generation through the decode gears",
                         lambda: GearDecoder(rt).generate(prompt, want.shape[1])))
        for what, produce in runs:
            try:
                tokens, _ = produce()
            except Exception as e:  # e.g. a capture the CUDA EP refuses: a failure naming it, not a crash
                failures.append(f"{what}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
                continue
            if np.array_equal(tokens, want):
                continue
            step = int(np.argmax((tokens != want).any(0)))
            lim = tol.get("greedy")
            tie = ""
            if lim and gen.get("step_logits"):
                top = np.sort(np.load(root / gen["step_logits"])[:, step].astype(np.float64), -1)[:, -2:]
                margin = float((top[:, 1] - top[:, 0]).max())
                allowed = float((np.maximum(lim["atol"], lim["rtol"] * np.abs(top)).sum(-1)).min())
                tie = (f" (a near tie: fp32 margin {margin:.3g} <= {allowed:.3g})" if margin <= allowed
                       else f" (fp32 margin {margin:.3g} > {allowed:.3g}: not a near tie)")
            record_tie = tie.startswith(" (a near tie")
            if not record_tie:
                choice = _choice_near_tie(root, gen, tol.get("choices"), step)
                if choice:
                    tie, record_tie = tie.replace(": not a near tie)", f"; {choice})") if tie else f" ({choice})", True
            msg = f"{what} differs from the golden tokens at step {step}{tie}"
            if gen.get("must_match", True) and not record_tie:
                failures.append(msg)
            else:
                notes.append(msg)
    record = {"device": rt.device, "onnxruntime": ort.__version__, "providers": rt.providers,
              "passed": not failures, "failures": failures, "notes": notes, "max_abs_diff": worst,
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return failures, record


def _case_failures(root: Path, case: dict, got: dict, tol: dict, worst: dict | None = None) -> list[str]:
    """The golden case's outputs `got` against its golden outputs under the recorded tolerances; -> failure messages
    (worst: filled with each output's max abs difference)."""
    failures = []
    for n, f in case["outputs"].items():
        ref = np.load(root / f).astype(np.float64)
        g = got[n].astype(np.float64)
        if g.shape != ref.shape:
            failures.append(f"{case['name']}/{n}: shape {g.shape} != {ref.shape}")
            continue
        diff = np.abs(g - ref)
        if worst is not None:
            worst[f"{case['name']}/{n}"] = float(diff.max()) if diff.size else 0.0
        lim = (tol.get("cases") or {}).get(case["name"], {}).get(n, tol)
        bad = (diff > lim["atol"]) & (diff > lim["rtol"] * np.abs(ref))
        if bad.any():
            failures.append(f"{case['name']}/{n}: {int(bad.sum())} of {ref.size} elements outside atol "
                            f"{lim['atol']:.3g} / rtol {lim['rtol']:.3g} (max abs {diff.max():.3g})")
    return failures


def _choice_near_tie(root: Path, gen: dict, limits: dict | None, step: int) -> str | None:
    """A discrete choice (a MoE router's expert choice, DeepSeek-V3.2's indexer selection) of golden greedy step
    `step` whose fp32 margin (golden greedy.choice_margins, per step and layer) is within the margin the build's
    routing-aware judgement let a flip have (golden tolerance "choices"): a near tie that the GPU's own rounding may
    turn, so that this step's token may differ without a fault. Only the diverging step's own choices count (a flip
    at an earlier step that left its token alone does not excuse a later divergence). -> its description, or None."""
    files = gen.get("choice_margins") or {}
    for kind, what in (("selection", "indexer selection"), ("routing", "router")):
        limit = (limits or {}).get(kind)
        if not limit or kind not in files:
            continue
        m = np.load(root / files[kind])
        if step >= m.shape[0] or not m.shape[1]:
            continue
        layer = int(np.argmin(m[step]))
        if m[step, layer] <= limit:
            return (f"a near tie of the {what} at that step (its layer {layer}: fp32 margin {m[step, layer]:.3g} <= "
                    f"{limit:.3g}, what the build measured the stage moving those scores)")
    return None


def record_verification(package_dir, record: dict) -> None:
    """Write a GPU verification record into manifest.json (verification.gpu)."""
    path = Path(package_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    ver = manifest.setdefault("verification", {})
    if record["device"] == "cuda":
        ver["gpu"] = record
        ver["not_verified"] = [s for s in ver.get("not_verified", []) if not s.startswith("not yet run on a GPU")]
        manifest["target"]["verified_with"] = {"onnxruntime": record["onnxruntime"], "providers": record["providers"]}
    else:
        ver.setdefault("cpu_reruns", []).append(record)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", default=str(Path(__file__).resolve().parent.parent))
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--prompt-ids", required=True)
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--gears", action="store_true", help="decode through the package's CUDA-graph decode gears (the "
                   "default on cuda when the package has gears and the generation fits the largest one)")
    g.add_argument("--no-gears", action="store_true", help="decode with the dynamic decode graph")
    v = sub.add_parser("verify-golden")
    v.add_argument("--record", action="store_true", help="write the result into manifest.json")
    args = p.parse_args(argv)
    if args.cmd == "generate":
        rt = CudaPackageRuntime(args.package, device=args.device)
        t = time.perf_counter()
        prompt = [int(x) for x in args.prompt_ids.split(",")]
        gi = rt.manifest["io"].get("decode_gears")
        fits = bool(gi) and len(prompt) + args.max_new_tokens - 1 < max(gi["gears"])
        use = args.gears or (not args.no_gears and rt.device == "cuda" and fits)
        gen = GearDecoder(rt).generate if use else rt.generate
        tokens, _ = gen(prompt, args.max_new_tokens)
        print(json.dumps({"tokens": tokens[0].tolist(), "seconds": round(time.perf_counter() - t, 3),
                          "providers": rt.providers, "decode": "gears" if use else "dynamic"}))
        return 0
    failures, record = verify_golden(args.package, args.device)
    if args.record:
        record_verification(args.package, record)
    print("\n".join(failures) if failures else
          f"golden data: all outputs within tolerance, greedy tokens equal"
          f"{' up to the near ties noted' if record['notes'] else ''} ({record['device']}, "
          f"onnxruntime {record['onnxruntime']}, {record['providers']})")
    for n in record["notes"]:
        print(f"note: {n}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
