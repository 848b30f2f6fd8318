"""Export stage: an eager model -> ONNX `prefill` and `decode` graphs (torch.onnx.export, dynamo).

Graph IO (per layer i; the tensors, shapes and layouts are the family's cache spec, models/cache.py):
  inputs : input_ids int64 [batch, seq] (decode: [batch, 1]),
           past.{i}.{name} for each tensor of the layout's spec, its growing axis dynamic
  outputs: logits fp32 [batch, seq, vocab], present.{i}.{name}: past.{i}.{name} after this step.
Positions are past + arange(seq): a fresh prompt passes empty caches (past = 0).

The growing axes get one torch.export Dim per length rule of the spec (models/cache.py): "past" for every
append tensor (the uniform MLA specs: one Dim, as always), and for per-layer specs one per window(n),
pending(m) and compressed(m) rule, since those lengths are different functions of the tokens seen.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from pathlib import Path

import onnx_ir as ir
import torch
from torch.export import Dim

from models.errors import MlamoeError
from models.family import family_of
from passes.cleanup import cleanup

GRAPHS = ("prefill", "decode")
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"
# Past the protobuf limit weights must live in external data; we switch a little earlier.
EXTERNAL_DATA_THRESHOLD = int(1.5 * 2**30)
PAST = "past"  # the Dim of append-rule cache axes (the uniform specs' only one)
MAX_PAST = 2**20


class ExportError(MlamoeError):
    pass


class CausalLMGraph(torch.nn.Module):
    """Flat-tensor wrapper the exporter traces: (input_ids, *past) -> (logits, *present), the cache
    tensors layer-major in the spec's order."""

    def __init__(self, model, layout: str):
        super().__init__()
        self.model, self.layout = model, layout
        self.spec = model.cache_spec(layout)

    def forward(self, input_ids, *past):
        logits, present = self.model.step(input_ids, self.spec.group(past), self.layout)
        return (logits, *[t for layer in present for t in layer])


def length_dims(spec, max_len: int) -> dict[tuple[str, int], Dim]:
    """One Dim per (rule, n) of the spec's growing axes: append -> "past" (at most max_len), window(n) ->
    "window{n}" (at most n rows), pending(m) -> "pending{m}", compressed(m) -> "compressed{m}". The pending
    Dims are left unbounded above: with their true bound m - 1 the exporter specialised an example at m - 1
    to that size (tests/test_models_v4_export.py)."""
    dims: dict[tuple[str, int], Dim] = {}
    for layer in spec.layers:
        for t in layer:
            key = (t.rule, t.n)
            if t.rule == "fixed" or key in dims:
                continue
            name = PAST if t.rule == "append" else f"{t.rule}{t.n}"
            dims[key] = Dim(name, min=0, max=t.n if t.rule == "window" else max_len)
    return dims


def example_past(spec, smallest: int = 2) -> int:
    """Tokens seen by the example cache: the fewest (>= smallest) giving every growing axis at least 2 rows, so
    the exporter keeps each one symbolic (a 0- or 1-sized example axis is specialised). Uniform specs: 2."""
    tensors = [t for layer in spec.layers for t in layer if t.rule != "fixed"]
    for past in range(smallest, MAX_PAST):
        if all(t.rows_for(past) >= 2 for t in tensors):
            return past
    raise ExportError(f"no example cache length below {MAX_PAST} gives every cache axis 2 rows or more")


def dynamic_shapes(spec, graph: str, max_seq: int) -> dict:
    """The exporter's dynamic_shapes: batch everywhere, seq on prefill's input_ids, each growing axis its rule's
    Dim (length_dims), fixed tensors only batch; max_seq (the context length) bounds seq and the unbounded Dims."""
    batch = Dim("batch", min=1, max=1024)
    dims = length_dims(spec, max_seq)
    ids = {0: batch} if graph == "decode" else {0: batch, 1: Dim("seq", min=1, max=max_seq)}
    return {"input_ids": ids,
            "past": tuple({0: batch} if t.rule == "fixed" else {0: batch, t.grows: dims[(t.rule, t.n)]}
                          for layer in spec.layers for t in layer)}


def example_inputs(model, graph: str, layout: str, batch: int = 2, seq: int = 3, past: int | None = None):
    """Inputs to trace with. Sizes avoid 0/1 so the exporter keeps those axes symbolic; past: tokens seen by the
    example cache (default example_past of the layout's spec)."""
    past = example_past(model.cache_spec(layout)) if past is None else past
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1 if graph == "decode" else seq), generator=g)
    cache = model.empty_cache(batch, layout)
    with torch.no_grad():
        _, cache = model.step(torch.randint(0, model.config.vocab_size, (batch, past), generator=g), cache, layout)
    return (ids, *[t for layer in cache for t in layer])


def export_graph(model, graph: str, layout: str | None = None, verbose: bool = False) -> ir.Model:
    """Trace one graph and return it as an onnx-ir model (opset 20, fp32); layout: the family's default
    cache layout unless given."""
    if graph not in GRAPHS:
        raise ExportError(f"unknown graph {graph!r}: expected one of {GRAPHS}")
    layouts = family_of(model).cache_layouts
    layout = layout or layouts[0]
    if layout not in layouts:
        raise ExportError(f"unknown cache layout {layout!r}: expected one of {layouts}")
    spec = model.cache_spec(layout)
    dynamic = dynamic_shapes(spec, graph, model.config.max_position_embeddings)
    args = example_inputs(model, graph, layout)
    wrapper = CausalLMGraph(model, layout).eval()
    program = trace(wrapper, args, f"the {graph} graph ({layout} cache)", ExportError, verbose,
                    dynamic_shapes=dynamic, input_names=["input_ids", *spec.input_names()],
                    output_names=["logits", *spec.output_names()])
    return finish(program.model, graph)


def trace(wrapper: torch.nn.Module, args: tuple, what: str, error: type[MlamoeError], verbose: bool = False,
          **export_kw):
    """torch.onnx.export (dynamo, no exporter optimizer) with its chatter silenced; an exporter failure
    becomes `error` naming `what` and the exporter's summary line (its own messages run to pages)."""
    sink = io.StringIO()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(sink)
    try:
        with quiet, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            logging.getLogger("torch").setLevel(logging.ERROR)
            return torch.onnx.export(wrapper, args, dynamo=True, optimize=False, verbose=False, **export_kw)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"torch.onnx.export failed for {what}: {first}") from e


def finish(model_ir: ir.Model, name: str) -> ir.Model:
    """Cleanup, graph name and producer fields every exported graph gets; the exporter's per-node stack traces
    (source paths and line numbers of this checkout) are dropped, so a graph does not depend on where the
    repository lives or on an edit that only moves lines."""
    model_ir = cleanup(model_ir)
    for node in ir.traversal.RecursiveGraphIterator(model_ir.graph):
        node.metadata_props.pop(STACK_TRACE_KEY, None)
    model_ir.graph.name = name
    model_ir.producer_name = "mlamoe"
    model_ir.producer_version = ""
    return model_ir


def specialize_decode(prefill: ir.Model) -> ir.Model:
    """The decode graph: the prefill graph with input_ids fixed to [batch, 1].

    Exporting the same function twice costs as much again (the MoE expert loop dominates export
    time); specialising the traced prefill graph gives the same computation for one new token.
    """
    decode = ir.from_proto(ir.to_proto(prefill))
    ids = decode.graph.inputs[0]
    if ids.name != "input_ids" or ids.shape is None or len(ids.shape) != 2:
        raise ExportError("specialize_decode: the first graph input must be input_ids [batch, seq]")
    ids.shape = ir.Shape([ids.shape[0], 1])
    for out in decode.graph.outputs:  # the dims the exporter named after seq ("past + seq" -> "past + 1")
        if out.shape is not None:
            out.shape = ir.Shape([_seq_is_one(d) for d in out.shape])
    decode.graph.name = "decode"
    return cleanup(decode)


def _seq_is_one(dim):
    name = str(dim)
    if name == "seq":
        return 1
    return re.sub(r"\bseq\b", "1", name) if re.search(r"\bseq\b", name) else dim


def export_graphs(model, layout: str | None = None) -> dict[str, ir.Model]:
    """Both graphs, prefill traced once and decode specialised from it."""
    prefill = export_graph(model, "prefill", layout)
    return {"prefill": prefill, "decode": specialize_decode(prefill)}


def weights_bytes(model_ir: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model_ir.graph.initializers.values() if v.const_value is not None)


def save_graph(model_ir: ir.Model, path: Path, check: bool = True) -> list[Path]:
    """Save a graph on its own; weights go to `<name>.onnx.data` beside it when the model is large. A graph whose
    weights are references into another folder's data file (a package graph over its shared weights file,
    pipeline/weights_file.py) gets its own copy here. A package's graphs share one file: pipeline.weights_file.
    check: ONNX's checker on the saved file (off for graphs of ops only ONNX Runtime knows).

    Returns the files written (the .onnx and, if any, its external data file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = weights_bytes(model_ir) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    if not external:
        # weights still referring to another file's external data (a large graph loaded by ir.load, made
        # small by a pass) would be written as references relative to `path`: read them in first
        ir.external_data.load_to_model(model_ir)
    if (path.parent / data_name).exists():
        os.remove(path.parent / data_name)
    ir.save(model_ir, path, external_data=data_name if external else None)
    if check:
        check_graph(path)
    return [path] + ([path.parent / data_name] if external else [])


def check_graph(path: Path) -> None:
    """ONNX's checker on a saved graph (by path, so external data and >2 GB models work)."""
    import onnx
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        first = str(e).strip().splitlines()[0]
        raise ExportError(f"{path}: the graph fails ONNX's checker: {first}") from None
