"""The family's fixed-shape graphs (models/static_lm.py StaticCausalLM) as ONNX, shared by the targets that
ship fixed-shape graphs (ascend: ATC-ready decode + prefill buckets; ort-cuda: CUDA-graph decode gears): graph specs,
IO names, zero inputs, the trace (torch.onnx.export, dynamo, no dynamic shapes), onnx's opset conversion (default
opset 18, what ATC takes), node names from the torch module scopes, and StaticRunner (the graphs on ORT CPU as a
device would run them). The form's decisions (int32 ids/position, mask from the position, Where writes, RoPE
tables, static MoE) are documented in models/static_lm.py.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from models.cache import CacheSpec
from models.static_lm import StaticCausalLM, StaticExportError, static_cache_spec

STATIC_OPSET = 18  # the default opset of the static graphs (ATC's)
INDEX_DTYPE = np.int32


@dataclasses.dataclass(frozen=True)
class StaticGraphSpec:
    """One fixed-shape graph: name (decode, prefill_s16, ...), batch B, sequence S, cache M."""

    name: str
    batch: int
    seq: int
    max_cache: int
    moe_form: str

    @property
    def kind(self) -> str:
        return "decode" if self.seq == 1 else "prefill"


def graph_specs(batch: int, max_cache: int, buckets: tuple[int, ...]) -> list[StaticGraphSpec]:
    """decode (S=1, MoE gather form) + one prefill graph per bucket (MoE dense form)."""
    if batch < 1:
        raise StaticExportError(f"batch {batch}: must be >= 1")
    if max_cache < 2:
        raise StaticExportError(f"max_cache {max_cache}: must be >= 2")
    bad = [b for b in buckets if not (isinstance(b, int) and 1 < b <= max_cache)]
    if bad:
        raise StaticExportError(f"prefill buckets {bad}: each must be an integer in 2..max_cache ({max_cache}); "
                                "a bucket longer than the cache cannot be written into it")
    if len(set(buckets)) != len(buckets):
        raise StaticExportError(f"prefill buckets {list(buckets)}: duplicates")
    specs = [StaticGraphSpec("decode", batch, 1, max_cache, "gather")]
    specs += [StaticGraphSpec(f"prefill_s{b}", batch, b, max_cache, "dense") for b in sorted(buckets)]
    return specs



def input_names(cache: CacheSpec) -> list[str]:
    return ["input_ids", "position"] + cache.input_names()


def output_names(cache: CacheSpec) -> list[str]:
    return ["logits"] + cache.output_names()


# ------------------------------------------------------------------------------------ inputs
def zero_inputs(cfg, spec: StaticGraphSpec) -> dict[str, np.ndarray]:
    """Inputs of the right names/dtypes/shapes: position 0, empty (zero) caches."""
    B, S, M = spec.batch, spec.seq, spec.max_cache
    feeds = {"input_ids": np.zeros((B, S), INDEX_DTYPE), "position": np.zeros((B,), INDEX_DTYPE)}
    feeds.update(static_cache_spec(cfg).static_empty(B, M))
    return feeds


def _example_args(cfg, spec: StaticGraphSpec):
    g = torch.Generator().manual_seed(0)
    feeds = zero_inputs(cfg, spec)
    ids = torch.randint(0, cfg.vocab_size, (spec.batch, spec.seq), generator=g, dtype=torch.int32)
    pos = torch.full((spec.batch,), 1 if spec.seq == 1 else 0, dtype=torch.int32)
    past = [torch.randn(v.shape, generator=g) for k, v in feeds.items() if k.startswith("past.")]
    return (ids, pos, *past)


# ------------------------------------------------------------------------------------ export
def convert_opset(model_ir: ir.Model, target: int = STATIC_OPSET) -> ir.Model:
    """onnx's version converter (default domain) -> onnx-ir model; fails with the converter's text."""
    from onnx import version_converter
    proto = ir.to_proto(model_ir)
    current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if current == target:
        return model_ir
    try:
        converted = version_converter.convert_version(proto, target)
    except Exception as e:  # the converter raises RuntimeError / ConvertError with the op at fault
        raise StaticExportError(f"onnx version converter {current} -> {target} failed: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    onnx.checker.check_model(converted)
    return ir.from_proto(converted)


def name_nodes_by_scope(model_ir: ir.Model) -> None:
    """Prefix each node's name with the torch module it came from ("layers.1.router.1/topk"...),
    from the exporter's name-scope metadata, so names survive later passes and read well in ATC's
    logs, the keep_dtype list and msit's per-op comparison."""
    import ast
    for node in model_ir.graph.all_nodes():
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if not scopes:
            continue
        try:
            path = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            continue
        module = ".".join(p for p in path[:-1] if p)
        if module.startswith("model.model."):
            module = module[len("model."):]
        elif module.startswith("model."):
            module = module[len("model."):]
        if module and not (node.name or "").startswith(module + "/"):
            node.name = f"{module}/{node.name}"



def export_static_graph(model, spec: StaticGraphSpec, opset: int = STATIC_OPSET,
                        verbose: bool = False) -> ir.Model:
    """Trace one fixed-shape graph (opset 20 from the exporter), fold it, convert it to `opset`."""
    from passes.cleanup import cleanup
    from pipeline.export import finish, trace
    cfg = model.config
    wrapper = StaticCausalLM(model, spec.seq, spec.max_cache, spec.moe_form).eval()
    args = _example_args(cfg, spec)
    program = trace(wrapper, args, f"the static {spec.name} graph", StaticExportError, verbose,
                    input_names=input_names(wrapper.cache), output_names=output_names(wrapper.cache))
    m = program.model
    name_nodes_by_scope(m)
    m = cleanup(m)
    m = finish(convert_opset(m, opset), spec.name)
    m.doc_string = (f"mlamoe ascend static graph {spec.name}: batch {spec.batch}, seq {spec.seq}, "
                    f"max_cache {spec.max_cache}, moe {spec.moe_form}")
    return m


def export_static_graphs(model, batch: int = 1, max_cache: int = 256,
                         buckets: tuple[int, ...] = (16, 64), opset: int = STATIC_OPSET) -> dict[str, tuple[StaticGraphSpec, ir.Model]]:
    """decode + one prefill graph per bucket: {name: (spec, model)}."""
    return {s.name: (s, export_static_graph(model, s, opset)) for s in graph_specs(batch, max_cache, tuple(buckets))}


def save_static_graph(model_ir: ir.Model, path: Path) -> Path:
    """Save with all weights inline (the static graphs of the presets are far below 2 GB; larger
    ones go to `<name>.onnx.data` like pipeline.export.save_graph, which ATC reads from beside it)."""
    from pipeline.export import save_graph
    save_graph(model_ir, Path(path))
    return Path(path)


# ------------------------------------------------------------------------------------ running
class StaticRunner:
    """Runs the static graphs on ORT (CPU) like a device would: prefill a (right-padded) prompt in
    the smallest bucket that holds it, then decode one token at a time, caches kept as [B, G, .].

    With cache-length gears (decode graphs at several cache lengths G, targets/ascend/shapes.py) every step runs
    the smallest gear whose cache holds it (decode: G >= position + 1; prefill: G >= position + bucket), the cache
    moved into that gear's buffers (zero rows appended) when it outgrows its own. A prompt longer than the
    largest bucket C runs as C-token chunks, each at position = its start (the mask and RoPE rows come from
    `position` inside the graph), the last one right-padded to the smallest bucket that holds it."""

    def __init__(self, sessions: dict, specs: dict[str, StaticGraphSpec], cfg, float_dtype=np.float32):
        self.sessions, self.specs, self.cfg, self.float_dtype = sessions, specs, cfg, float_dtype
        decodes = sorted((s for s in specs.values() if s.kind == "decode"), key=lambda s: s.max_cache)
        if not decodes:
            raise StaticExportError("StaticRunner: no decode graph among the specs")
        self.decode_by_gear = {s.max_cache: s for s in decodes}
        self.gears = sorted(self.decode_by_gear)
        self.decode_spec = specs.get("decode", decodes[0])
        self.buckets = sorted((s for s in specs.values() if s.kind == "prefill" and s.max_cache == self.gears[0]),
                              key=lambda s: s.seq)
        self.prefills = sorted((s for s in specs.values() if s.kind == "prefill"), key=lambda s: (s.max_cache, s.seq))
        self.chunk = max((s.seq for s in self.prefills), default=0)
        self._cache_spec = static_cache_spec(cfg)

    def empty_cache(self) -> dict[str, np.ndarray]:
        feeds = zero_inputs(self.cfg, self.decode_spec)
        return {k: v.astype(self.float_dtype) for k, v in feeds.items() if k.startswith("past.")}

    def cache_rows(self, cache: dict) -> int:
        t = self._cache_spec.tensors[0]
        return cache[f"past.0.{t.name}"].shape[t.grows]

    def to_gear(self, cache: dict, gear: int) -> dict:
        """The cache in gear `gear`'s buffers: rows 0..G_old-1 kept, zero rows appended (never shrunk)."""
        rows = self.cache_rows(cache)
        if rows == gear:
            return cache
        if rows > gear:
            raise StaticExportError(f"cache of {rows} rows cannot move down to gear {gear}")
        out = {}
        by_name = {t.name: t for t in self._cache_spec.tensors}
        for k, v in cache.items():
            t = by_name[k.split(".", 2)[2]]
            pad = [(0, 0)] * v.ndim
            pad[t.grows] = (0, gear - rows)
            out[k] = np.pad(v, pad)
        return out

    def _run(self, name: str, ids: np.ndarray, position: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
        sess = self.sessions[name]
        feeds = {"input_ids": ids.astype(INDEX_DTYPE), "position": position.astype(INDEX_DTYPE), **cache}
        outs = sess.run(None, feeds)
        names = [o.name for o in sess.get_outputs()]
        res = dict(zip(names, outs))
        present = {k.replace("present.", "past.", 1): v for k, v in res.items() if k.startswith("present.")}
        return res["logits"], present

    def _prefill_graph(self, n: int, start: int, rows: int) -> StaticGraphSpec:
        """The smallest gear >= the cache's rows (then the smallest bucket) holding n tokens written at start."""
        for s in self.prefills:
            if s.max_cache >= rows and s.seq >= n and start + s.seq <= s.max_cache:
                return s
        raise StaticExportError(f"prefill of {n} tokens at position {start}: no prefill graph holds it (buckets "
                                f"{sorted({s.seq for s in self.prefills})} at gears {self.gears}; a chunk needs "
                                "position + bucket <= gear)")

    def prefill(self, prompt: np.ndarray, cache: dict | None = None, start: int = 0):
        """prompt [B, L] -> logits [B, L, V] (padding dropped), cache with rows start..start+L-1 (in the gear that
        holds the last chunk); L > the largest bucket runs in chunks (class doc)."""
        B, L = prompt.shape
        if not self.prefills:
            raise StaticExportError("no prefill graph")
        cache = self.empty_cache() if cache is None else cache
        logits = []
        done = 0
        while done < L:
            n = min(self.chunk, L - done)
            spec = self._prefill_graph(n, start + done, self.cache_rows(cache))
            cache = self.to_gear(cache, spec.max_cache)
            ids = np.zeros((B, spec.seq), INDEX_DTYPE)
            ids[:, :n] = prompt[:, done:done + n]
            out, cache = self._run(spec.name, ids, np.full((B,), start + done, INDEX_DTYPE), cache)
            logits.append(out[:, :n])
            done += n
        return (logits[0] if len(logits) == 1 else np.concatenate(logits, 1)), cache

    def decode(self, token: np.ndarray, position: int, cache: dict):
        B = token.shape[0]
        fitting = [g for g in self.gears if g >= max(position + 1, self.cache_rows(cache))]
        if not fitting:
            raise StaticExportError(f"decode position {position} is past the cache length {self.gears[-1]}")
        spec = self.decode_by_gear[fitting[0]]
        cache = self.to_gear(cache, spec.max_cache)
        return self._run(spec.name, token.reshape(B, 1), np.full((B,), position, INDEX_DTYPE), cache)

    def generate(self, prompt: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Greedy: -> tokens [B, n] int64, step_logits [B, n, V] fp32 (as models.greedy_generate)."""
        logits, cache = self.prefill(prompt)
        pos = prompt.shape[1]
        tokens, steps = [], []
        last = logits[:, -1].astype(np.float32)
        for i in range(n):
            tok = last.argmax(-1)
            tokens.append(tok)
            steps.append(last)
            if i == n - 1:
                break
            logits, cache = self.decode(tok, pos, cache)
            last = logits[:, -1].astype(np.float32)
            pos += 1
        return np.stack(tokens, 1).astype(np.int64), np.stack(steps, 1)


def ort_sessions(paths: dict[str, Path], threads: int = 1) -> dict:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return {n: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for n, p in paths.items()}
