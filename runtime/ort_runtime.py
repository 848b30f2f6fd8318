"""Run a compiled package with ONNX Runtime: prefill + decode loop with the cache kept between steps.

Self-contained on purpose (numpy + onnxruntime only): every ORT package ships a copy of this file
as runtime/ort_runtime.py, so the receiving team can load, run and re-verify the package without
the compiler's repository.

    python runtime/ort_runtime.py generate --prompt-ids 1,2,3 --max-new-tokens 8
    python runtime/ort_runtime.py verify-golden
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
_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def session_options(config: dict):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[config.get("graph_optimization_level", "all")])
    if config.get("intra_op_num_threads"):
        so.intra_op_num_threads = int(config["intra_op_num_threads"])
    so.inter_op_num_threads = int(config.get("inter_op_num_threads", 1))
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    for key, value in config.get("config_entries", {}).items():  # e.g. {"session.disable_prepacking": "1"}
        so.add_session_config_entry(key, str(value))
    return so


def cache_fills(cache: dict) -> dict[str, float]:
    """{past.{layer}.{name}: fill} for the cache tensors whose empty state is not 0 (the manifest's io.cache:
    per-layer specs list each layer kind's tensors, a "fill" given as a number or "inf" / "-inf")."""
    kinds = cache.get("layer_kinds")
    if not kinds:
        return {}
    return {f"past.{i}.{t['name']}": float(t["fill"]) for i, k in enumerate(cache["layer_kind_of"])
            for t in kinds[k]["per_layer"] if "fill" in t}


class PackageRuntime:
    """Greedy generation from a package's prefill/decode graphs on ONNX Runtime."""

    def __init__(self, package_dir, providers=None, threads: int | None = None, graphs: dict | None = None,
                 manifest: dict | None = None):
        import onnxruntime as ort
        self.root = Path(package_dir)
        self.manifest = manifest or json.loads((self.root / "manifest.json").read_text())
        io = self.manifest["io"]
        self.layout = io["cache"]["layout"]
        self.cache_spec = io["cache"]
        self.vocab_size = io["vocab_size"]
        cfg = dict(self.manifest["target"].get("session", {}))
        if threads:
            cfg["intra_op_num_threads"] = threads
        self.providers = providers or self.manifest["target"].get("providers", ["CPUExecutionProvider"])
        files = graphs or {g: spec["file"] for g, spec in io["graphs"].items()}
        self.sessions = {g: ort.InferenceSession(str(self.root / f), session_options(cfg), providers=self.providers)
                         for g, f in files.items()}
        self.past_names = [i["name"] for i in io["graphs"]["decode"]["inputs"] if i["name"] != "input_ids"]

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """Every past.* input before the first token: each growing (symbolic) axis at 0 rows, fixed axes at their
        size, filled with the manifest's fill value for that tensor (io.cache; 0 unless it gives one)."""
        fills = cache_fills(self.cache_spec)
        out = {}
        for name in self.past_names:
            shape = [batch if d == "batch" else d if isinstance(d, int) else 0 for d in self._shape_of(name)]
            out[name] = np.full(shape, fills.get(name, 0.0), dtype=np.float32)
        return out

    def _shape_of(self, name: str) -> list:
        for spec in self.manifest["io"]["graphs"]["decode"]["inputs"]:
            if spec["name"] == name:
                return spec["shape"]
        raise KeyError(name)

    def outputs(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One run of `graph` on named inputs -> its named outputs."""
        sess = self.sessions[graph]
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))

    def run(self, graph: str, input_ids: np.ndarray, past: dict[str, np.ndarray]):
        """-> logits [B, S, V], present cache (named past.* for feeding the next step)."""
        res = self.outputs(graph, {"input_ids": np.asarray(input_ids, dtype=np.int64), **past})
        present = {n.replace("present.", "past.", 1): v for n, v in res.items() if n.startswith("present.")}
        return res["logits"], present

    def generate(self, prompt_ids, max_new_tokens: int):
        """-> tokens [B, N] int64, step_logits [B, N, V] float32 (the logits that chose each token)."""
        ids = np.asarray(prompt_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        past = self.empty_cache(ids.shape[0])
        tokens, logits_steps = [], []
        graph = "prefill"
        for _ in range(max_new_tokens):
            logits, past = self.run(graph, ids, past)
            last = logits[:, -1].astype(np.float32)
            ids = last.argmax(-1)[:, None].astype(np.int64)
            tokens.append(ids)
            logits_steps.append(last)
            graph = "decode"
        if not tokens:
            return np.zeros((ids.shape[0], 0), np.int64), np.zeros((ids.shape[0], 0, self.vocab_size), np.float32)
        return np.concatenate(tokens, 1), np.stack(logits_steps, 1)


def verify_golden(package_dir, providers=None, runtime: PackageRuntime | None = None) -> list[str]:
    """Re-run the golden inputs; return a list of failures ([] = all within the recorded tolerances).

    The numbers are checked with Polygraphy's rule (|a-r| <= atol or <= rtol*|r|) at the tolerances
    the package recorded for its target stage, plus exact greedy-token equality when required.
    runtime: what runs the graphs (default: this package's PackageRuntime).
    """
    root = Path(package_dir)
    rt = runtime or PackageRuntime(root, providers=providers)
    golden = rt.manifest["golden"]
    failures = []
    for case in golden["cases"]:
        feeds = {n: np.load(root / f) for n, f in case["inputs"].items()}
        got = rt.outputs(case["graph"], feeds)
        tol = golden["tolerance"]
        for n, f in case["outputs"].items():
            ref = np.load(root / f)
            diff = np.abs(got[n].astype(np.float64) - ref)
            bad = (diff > tol["atol"]) & (diff > tol["rtol"] * np.abs(ref))
            if bad.any() or got[n].shape != ref.shape:
                failures.append(f"{case['name']}/{n}: {int(bad.sum())} of {ref.size} elements outside atol "
                                f"{tol['atol']} / rtol {tol['rtol']} (max abs {diff.max():.3g})")
    gen = golden.get("greedy")
    if gen:
        prompt = np.load(root / gen["prompt"])
        want = np.load(root / gen["tokens"])
        tokens, _ = rt.generate(prompt, want.shape[1])
        if gen.get("must_match", True) and not np.array_equal(tokens, want):
            step = int(np.argmax((tokens != want).any(0)))
            failures.append(f"greedy generation differs from the golden tokens at step {step}")
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", default=str(Path(__file__).resolve().parent.parent))
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--prompt-ids", required=True)
    g.add_argument("--max-new-tokens", type=int, default=16)
    sub.add_parser("verify-golden")
    args = p.parse_args(argv)
    if args.cmd == "generate":
        rt = PackageRuntime(args.package)
        t = time.perf_counter()
        tokens, _ = rt.generate([int(x) for x in args.prompt_ids.split(",")], args.max_new_tokens)
        print(json.dumps({"tokens": tokens[0].tolist(), "seconds": round(time.perf_counter() - t, 3)}))
        return 0
    failures = verify_golden(args.package)
    print("\n".join(failures) if failures else "golden data: all outputs within tolerance, greedy tokens equal")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
