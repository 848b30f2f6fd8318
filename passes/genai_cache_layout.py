"""Cache IO in the layout ONNX Runtime GenAI allocates: one 4-D key/value pair per layer.

onnxruntime-genai's DefaultKeyValueCache (src/models/kv_cache.cpp) gives every layer exactly two
cache tensors, named from genai_config.json's past_key_names / past_value_names ("%d" = layer), both
of shape [batch, num_key_value_heads, seq, head_size] (the heads and width may differ between layers,
read from the key input, but never between a layer's key and its value), and feeds each step's
present_* outputs back as the next step's past. A package graph instead carries per layer any number
of 3-D state tensors past.{i}.{name} [batch, past, width_j] with their own widths (the family's cache
spec; the compiler's MLA families: the latent row and the shared rope key).

This pass keeps the computation and the cache's size: per layer the state row (all widths
concatenated, in input order; W values per token) is laid out as one row of 2*H values (H = ceil(W/2),
one zero pad when W is odd) and carried as key = its first half and value = its second half, each
[batch, 1, past, H]. Inside the graph the two halves are concatenated, squeezed and sliced back into
the original past tensors; the original present tensors are concatenated (padded), unsqueezed and
split into present key/value. Nothing else changes: the original nodes compute the same values from
the same inputs.

The layout (per layer: the state names, widths and offsets in the row, H, pad) is written as JSON to
the model's metadata_props under METADATA_KEY, so that a reader (genai_config.json's writer, a test)
needs no knowledge of the family's cache names.
"""
from __future__ import annotations

import json
import re

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

METADATA_KEY = "mlamoe.genai_cache_layout"
KEY_NAMES = "past_key_values.%d.key"
VALUE_NAMES = "past_key_values.%d.value"
PRESENT_KEY_NAMES = "present.%d.key"
PRESENT_VALUE_NAMES = "present.%d.value"

_STATE = re.compile(r"^(past|present)\.(\d+)\.(.+)$")


class GenaiCacheLayoutError(ir.passes.PreconditionError):
    """The graph's cache IO does not have the shape this pass rewrites."""


def cache_entries(graph: ir.Graph) -> dict[int, list[tuple[str, ir.Value, ir.Value]]]:
    """{layer: [(state name, past input, present output), ...]} in the graph's input order."""
    outs = {v.name: v for v in graph.outputs}
    layers: dict[int, list[tuple[str, ir.Value, ir.Value]]] = {}
    for v in graph.inputs:
        m = _STATE.match(v.name or "")
        if not m or m.group(1) != "past":
            continue
        layer, name = int(m.group(2)), m.group(3)
        present = outs.get(f"present.{layer}.{name}")
        if present is None:
            raise GenaiCacheLayoutError(f"cache input {v.name} has no output present.{layer}.{name}")
        layers.setdefault(layer, []).append((name, v, present))
    if not layers:
        raise GenaiCacheLayoutError("the graph has no cache inputs past.{layer}.{name}")
    return dict(sorted(layers.items()))


def _width(v: ir.Value) -> int:
    shape = v.shape
    if shape is None or len(shape) != 3 or not isinstance(shape[2], int):
        raise GenaiCacheLayoutError(f"{v.name}: want a 3-D [batch, seq, width] cache tensor with a static "
                                    f"width, got shape {shape}")
    return shape[2]


class GenaiCacheLayoutPass(ir.passes.InPlacePass):
    """Per layer: past.{i}.* / present.{i}.* -> one key/value pair [batch, 1, seq, ceil(W/2)]."""

    def __init__(self, key_names: str = KEY_NAMES, value_names: str = VALUE_NAMES,
                 present_key_names: str = PRESENT_KEY_NAMES, present_value_names: str = PRESENT_VALUE_NAMES):
        super().__init__()
        self.names = (key_names, value_names, present_key_names, present_value_names)

    def requires(self, model: ir.Model) -> None:
        layers = cache_entries(model.graph)
        dtypes = {e[1].dtype for entries in layers.values() for e in entries}
        if len(dtypes) != 1:
            raise GenaiCacheLayoutError(f"cache tensors of several dtypes {sorted(map(str, dtypes))}: one "
                                        "key/value pair per layer carries one dtype")
        for entries in layers.values():
            for _, past, present in entries:
                if _width(past) != _width(present):
                    raise GenaiCacheLayoutError(f"{past.name} and {present.name} differ in width")
        axes = {past.shape[1] for entries in layers.values() for _, past, _ in entries}
        grows = sorted(str(d) for d in axes if not isinstance(d, int))
        fixed = sorted(d for d in axes if isinstance(d, int))
        if len(grows) != 1 or fixed:
            raise GenaiCacheLayoutError(
                f"the cache inputs' lengths (axis 1) are {', '.join(grows) or 'none symbolic'}"
                + (f" and fixed {', '.join(map(str, fixed))}" if fixed else "") + ": onnxruntime-genai keeps one "
                "key/value pair per layer, all growing by one row per token, so every cache tensor must share one "
                "growing axis")
        widths = sorted({sum(_width(past) for _, past, _ in entries) for entries in layers.values()})
        if len(widths) != 1:
            raise GenaiCacheLayoutError(f"layers hold different cache widths {widths}: onnxruntime-genai's "
                                        "key/value pairs have one head size for every layer")

    def ensures(self, model: ir.Model) -> None:
        graph, layout = model.graph, layout_of(model)
        names = {v.name for v in [*graph.inputs, *graph.outputs]}
        pairs = {layout[k] % spec["layer"] for spec in layout["layers"]
                 for k in ("key_names", "value_names", "present_key_names", "present_value_names")}
        if pairs - names:
            raise ir.passes.PostconditionError(f"key/value pairs missing from the graph's IO: {sorted(pairs - names)}")
        left = sorted(n for n in names - pairs if _STATE.match(n or ""))
        if left:
            raise ir.passes.PostconditionError(f"cache tensors left in the old layout: {left}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        layers = cache_entries(graph)
        new_nodes: list[ir.Node] = []
        consts: dict[str, ir.Value] = {}

        def const(name: str, array) -> ir.Value:
            if name not in consts:
                array = np.asarray(array, dtype=np.int64)
                value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.INT64),
                                 const_value=ir.tensor(array, name=name))
                graph.register_initializer(value)
                consts[name] = value
            return consts[name]

        def node(op: str, inputs, attrs=None, name=None, num_outputs=1) -> ir.Node:
            n = ir.node(op, inputs, attributes=attrs or None, num_outputs=num_outputs, name=name)
            new_nodes.append(n)
            return n

        layout = {"key_names": self.names[0], "value_names": self.names[1],
                  "present_key_names": self.names[2], "present_value_names": self.names[3], "layers": []}
        axis1 = const("genai_cache.axis1", [1])
        axis2 = const("genai_cache.axis2", [2])
        new_inputs, new_outputs, old_inputs, old_outputs = [], [], set(), set()
        for layer, entries in layers.items():
            widths = [_width(p) for _, p, _ in entries]
            total = sum(widths)
            half = (total + 1) // 2
            pad = 2 * half - total
            dtype = entries[0][1].dtype
            past0, present0 = entries[0][1], entries[0][2]
            kname, vname, pkname, pvname = (t % layer for t in self.names)
            tag = f"genai_cache.{layer}"

            # inputs: key/value halves -> the original past tensors
            past_dims = [past0.shape[0], 1, past0.shape[1], half]
            k_in = ir.Value(name=kname, shape=ir.Shape(past_dims), type=ir.TensorType(dtype))
            v_in = ir.Value(name=vname, shape=ir.Shape(past_dims), type=ir.TensorType(dtype))
            row = node("Concat", [k_in, v_in], {"axis": 3}, name=f"{tag}.past_row").outputs[0]
            row = node("Squeeze", [row, axis1], name=f"{tag}.past_squeeze").outputs[0]
            offsets, off = [], 0
            for (name, past, _), w in zip(entries, widths):
                sl = node("Slice", [row, const(f"{tag}.start{off}", [off]), const(f"{tag}.end{off + w}", [off + w]),
                                    axis2], name=f"{tag}.past.{name}").outputs[0]
                sl.shape, sl.type = past.shape, past.type
                past.replace_all_uses_with(sl)
                offsets.append(off)
                off += w
            # outputs: the original present tensors -> key/value halves
            row = node("Concat", [p for _, _, p in entries], {"axis": 2}, name=f"{tag}.present_row").outputs[0]
            if pad:
                row = node("Pad", [row, const("genai_cache.pad_last1", [0, 0, 0, 0, 0, pad])],
                           name=f"{tag}.present_pad").outputs[0]
            row = node("Unsqueeze", [row, axis1], name=f"{tag}.present_unsqueeze").outputs[0]
            split = node("Split", [row, const("genai_cache.halves", [half, half])], {"axis": 3},
                         name=f"{tag}.present_split", num_outputs=2)
            present_dims = [present0.shape[0], 1, present0.shape[1], half]
            for out, name in zip(split.outputs, (pkname, pvname)):
                out.name, out.shape, out.type = name, ir.Shape(present_dims), ir.TensorType(dtype)
            new_inputs += [k_in, v_in]
            new_outputs += list(split.outputs)
            old_inputs.update(id(p) for _, p, _ in entries)
            old_outputs.update(id(p) for _, _, p in entries)
            layout["layers"].append({"layer": layer, "head_size": half, "pad": pad, "entries": [
                {"name": name, "width": w, "offset": o} for (name, _, _), w, o in zip(entries, widths, offsets)]})

        graph.extend(new_nodes)
        keep_in = [v for v in graph.inputs if id(v) not in old_inputs]
        graph.inputs.clear()
        graph.inputs.extend(keep_in + new_inputs)
        keep_out = [v for v in graph.outputs if id(v) not in old_outputs]
        graph.outputs.clear()
        graph.outputs.extend(keep_out + new_outputs)
        # the original present values stay as internal values; give them names that no longer look
        # like graph outputs
        for entries in layers.values():
            for name, _, present in entries:
                present.name = f"{present.name}.inner"
        model.metadata_props[METADATA_KEY] = json.dumps(layout, sort_keys=True)
        common_passes.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=True)


def layout_of(model: ir.Model) -> dict:
    """The layout a GenaiCacheLayoutPass wrote into the model (KeyError when it did not run)."""
    return json.loads(model.metadata_props[METADATA_KEY])


def split_state(layout: dict, state: dict[str, np.ndarray], prefix: str = "past") -> dict[str, np.ndarray]:
    """Original cache tensors {prefix.{i}.{name}: [B, S, w]} -> genai's {key/value name: [B, 1, S, H]}."""
    out = {}
    names = ("key_names", "value_names") if prefix == "past" else ("present_key_names", "present_value_names")
    for spec in layout["layers"]:
        i, half = spec["layer"], spec["head_size"]
        row = np.concatenate([state[f"{prefix}.{i}.{e['name']}"] for e in spec["entries"]], axis=-1)
        if spec["pad"]:
            row = np.concatenate([row, np.zeros(row.shape[:-1] + (spec["pad"],), row.dtype)], axis=-1)
        row = row[:, None]
        out[layout[names[0]] % i], out[layout[names[1]] % i] = row[..., :half], row[..., half:]
    return out


def join_state(layout: dict, state: dict[str, np.ndarray], prefix: str = "present") -> dict[str, np.ndarray]:
    """genai's {key/value name: [B, 1, S, H]} -> the original {prefix.{i}.{name}: [B, S, w]}."""
    out = {}
    names = ("key_names", "value_names") if prefix == "past" else ("present_key_names", "present_value_names")
    for spec in layout["layers"]:
        i = spec["layer"]
        row = np.concatenate([state[layout[names[0]] % i], state[layout[names[1]] % i]], axis=-1)[:, 0]
        for e in spec["entries"]:
            out[f"{prefix}.{i}.{e['name']}"] = row[..., e["offset"]:e["offset"] + e["width"]]
    return out
