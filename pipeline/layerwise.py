"""Graphs built a decoder layer at a time (issue 16's streaming compile): export one layer per kind once, instantiate
it per layer with that layer's weights, and stitch the package's prefill / decode graphs from the parts.

Why a layer template and not one export per layer: torch.onnx.export's time grows with the layer's graph (the MoE
expert loop dominates it), not with the weights, and every layer of a kind (dense MLP / MoE) traces to the same graph
with other weights. The raw export (before cleanup's constant folding, which turns weights into derived tensors such
as transposes) holds each parameter as an initializer named after it, so a layer is the template's graph cloned with
the initializers' tensors replaced by that layer's parameters; cleanup and the passes then run on the layer's own
graph (tests/test_layerwise.py: the stitched graphs against the eager model, and the template check below).

The parts, each an ONNX graph the exporter traced:
  embed   input_ids [batch, seq] -> h [batch, seq, hidden]                (model.embed_tokens)
  layer   h, past.{name}... -> h_out, present.{name}...                   (one decoder layer: RoPE and the causal
                                                                           mask from past's length inside it, as
                                                                           DeepseekForCausalLM.step computes them)
  head    h -> logits [batch, seq, vocab]                                  (model.norm, lm_head)
`stitch` joins embed, the layers in order and head into one graph with the whole-model graph's IO (input_ids,
past.{i}.{name} -> logits, present.{i}.{name}; pipeline/export.py), each layer's values and initializers prefixed
with its index so names stay unique. The layers' initializers may already be references into the package's
weights file (pipeline/weights_file.py WeightsFile.store): stitching moves references, never bytes.
"""
from __future__ import annotations

import re

import onnx_ir as ir
import torch
from torch.export import Dim

from models.decoder import step_rope_mask
from models.errors import MlamoeError

from .export import finish, trace

PREFIX = "layer."  # the template's parameter names: LayerStep's submodule is "layer"


class LayerwiseError(MlamoeError):
    pass


class LayerStep(torch.nn.Module):
    """One decoder layer as a graph: (h, *past) -> (h_out, *present), past in the cache spec's per-layer order."""

    def __init__(self, layer: torch.nn.Module, rope_inv_freq: torch.Tensor, rope_factor: float, softmax_scale: float,
                 layout: str, absorbed: bool = False):
        super().__init__()
        self.layer, self.layout, self.absorbed = layer, layout, absorbed
        self.register_buffer("rope_inv_freq", rope_inv_freq, persistent=False)
        self.rope_factor, self.softmax_scale = rope_factor, softmax_scale

    def forward(self, h, *past):
        cos, sin, mask = step_rope_mask(h.shape[1], past[0].shape[1], self.rope_inv_freq, self.rope_factor)
        h, present = self.layer(h, cos, sin, mask, self.softmax_scale, tuple(past), self.layout, self.absorbed)
        return (h, *present)


class Embed(torch.nn.Module):
    def __init__(self, embed_tokens):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class Head(torch.nn.Module):
    def __init__(self, norm, lm_head):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, h):
        return self.lm_head(self.norm(h)).float()


def layer_kind(layer: torch.nn.Module) -> str:
    """Layers of one kind trace to one graph: the MLP's class (DeepSeekMoE or dense) tells them apart."""
    return type(layer.mlp).__name__


def _dims(max_seq: int):
    return (Dim("batch", min=1, max=1024), Dim("seq", min=1, max=max_seq), Dim("past", min=0, max=max_seq))


def export_layer(step: LayerStep, spec_tensors, hidden: int, max_seq: int) -> ir.Model:
    """The raw (uncleaned) prefill graph of one layer: inputs h, past.{name}; outputs h_out, present.{name}.
    spec_tensors: the cache spec's tensors of one layer (models/cache.py CacheTensor; append rule only)."""
    if any(t.rule != "append" for t in spec_tensors):
        raise LayerwiseError("the layer-wise export handles caches that grow by appending (MLA's); this cache has "
                             f"{sorted({t.rule for t in spec_tensors})} rules")
    batch, seq, past = _dims(max_seq)
    g = torch.Generator().manual_seed(0)
    B, S, P = 2, 3, 2
    h = torch.randn(B, S, hidden, generator=g)
    example = tuple(torch.randn(*[B if d == "batch" else P if d == "past" else d for d in t.shape], generator=g)
                    for t in spec_tensors)
    shapes = {"h": {0: batch, 1: seq}, "past": tuple({0: batch, t.grows: past} for t in spec_tensors)}
    names = [t.name for t in spec_tensors]
    program = trace(step.eval(), (h, *example), "one decoder layer", LayerwiseError, dynamic_shapes=shapes,
                    input_names=["h", *[f"past.{n}" for n in names]],
                    output_names=["h_out", *[f"present.{n}" for n in names]])
    return program.model


def export_part(module: torch.nn.Module, what: str, example: torch.Tensor, input_name: str, output_name: str,
                max_seq: int) -> ir.Model:
    """embed or head: one input [batch, seq, ...] -> one output; cleaned and finished like an exported graph."""
    batch, seq, _ = _dims(max_seq)
    program = trace(module.eval(), (example,), what, LayerwiseError, dynamic_shapes=({0: batch, 1: seq},),
                    input_names=[input_name], output_names=[output_name])
    return finish(program.model, what)


def instantiate(template: ir.Model, layer: torch.nn.Module) -> ir.Model:
    """The template's graph (a clone; the template is untouched) with every parameter initializer holding
    `layer`'s tensor (shared with the module, not copied). Every parameter must be there, shape for shape."""
    params = {PREFIX + n: t for n, t in layer.state_dict().items()}
    graph = template.graph.clone()
    for name, value in graph.initializers.items():
        if name not in params:
            continue
        t = params[name]
        if value.shape is not None and tuple(value.shape) != tuple(t.shape):
            raise LayerwiseError(f"initializer {name!r}: the template has shape {list(value.shape)}, the layer "
                                 f"{list(t.shape)}; layers of one kind must have one shape")
        value.const_value = ir.Tensor(t.detach().numpy(), name=name)
    return ir.Model(graph, ir_version=template.ir_version, producer_name=template.producer_name,
                    functions=list(template.functions.values()))


def strip_parameters(template: ir.Model, layer: torch.nn.Module) -> None:
    """Drop the template's parameter tensors (the traced layer's weights; instantiate puts each layer's in): a template
    kept for the whole compile must not keep a layer alive. Their values keep name, shape and dtype."""
    for n in layer.state_dict():
        value = template.graph.initializers.get(PREFIX + n)
        if value is not None:
            value.const_value = None


def check_template(template: ir.Model, layer: torch.nn.Module) -> None:
    """Every parameter of the layer appears as an initializer of the raw export under its own name: what
    `instantiate` relies on (an exporter that renamed or folded them would leave the template's weights in
    every layer)."""
    inits = template.graph.initializers
    missing = [n for n in layer.state_dict() if PREFIX + n not in inits]
    if missing:
        raise LayerwiseError(f"the layer export has no initializer for {len(missing)} parameter(s), e.g. "
                             f"{missing[:3]}: the layer template cannot be re-instantiated")


def decode_form(prefill_layer: ir.Model) -> ir.Model:
    """The layer's decode graph: its prefill graph with h fixed to [batch, 1, hidden] (as export.specialize_decode
    does for the whole model)."""
    from .export import _seq_is_one
    from passes.cleanup import cleanup
    decode = ir.Model(prefill_layer.graph.clone(), ir_version=prefill_layer.ir_version,
                      producer_name=prefill_layer.producer_name)
    h = decode.graph.inputs[0]
    if h.name != "h" or h.shape is None or len(h.shape) != 3:
        raise LayerwiseError("decode_form: the first input of a layer graph must be h [batch, seq, hidden]")
    h.shape = ir.Shape([h.shape[0], 1, h.shape[2]])
    for out in decode.graph.outputs:
        if out.shape is not None:
            out.shape = ir.Shape([_seq_is_one(d) for d in out.shape])
    decode.graph.name = "decode"
    return cleanup(decode)


def _move(part: ir.Graph, into: ir.Graph, prefix: str, inputs: dict[str, ir.Value]) -> dict[str, ir.Value]:
    """Move every node and initializer of `part` into `into`: each of part's graph inputs named in `inputs` is
    replaced by that value, every value and initializer renamed prefix + name. -> part's outputs by name."""
    for v in list(part.inputs):
        if v.name not in inputs:
            raise LayerwiseError(f"stitch: no value for the part's input {v.name!r}")
        v.replace_all_uses_with(inputs[v.name])
    outputs = {v.name: v for v in part.outputs}
    for name in list(part.initializers):
        value = part.initializers.pop(name)
        value.name = prefix + name
        if value.const_value is not None and not isinstance(value.const_value, ir.ExternalTensor):
            value.const_value.name = value.name
        into.register_initializer(value)
    # Sizes the exporter could not tie to the inputs (the MoE expert loop's per-expert token counts: u0, u1, ...)
    # are named alike in every layer cloned from one template; ONNX Runtime's memory planner takes one name for one
    # size across the graph, so each part gets its own.
    known = {tok for v in part.inputs for d in (v.shape or []) if not isinstance(d, int)
             for tok in _IDENT.findall(str(d))}
    nodes = list(part)
    part.remove(nodes, safe=False)
    for node in nodes:
        node.name = prefix + (node.name or node.op_type)
        for out in node.outputs:
            if out.name is not None:
                out.name = prefix + out.name
            if out.shape is not None and any(_local(d, known) for d in out.shape):
                out.shape = ir.Shape([ir.SymbolicDim(prefix + str(d)) if _local(d, known) else d
                                      for d in out.shape])
        into.append(node)
    part.outputs.clear()
    return outputs


_IDENT = re.compile(r"[A-Za-z_]\w*")


def _local(dim, known: set[str]) -> bool:
    return not isinstance(dim, int) and dim is not None and str(dim) != "None" and \
        any(tok not in known for tok in _IDENT.findall(str(dim)))


def stitch(name: str, embed: ir.Model, layers: list[ir.Model], head: ir.Model, cache_names: list[str]) -> ir.Model:
    """One graph with the whole-model IO: embed -> layers[0] -> ... -> head. The parts are consumed (their nodes
    move); pass clones to keep them. cache_names: the cache spec's tensor names of one layer, in its order."""
    first = embed.graph.inputs[0]
    input_ids = ir.Value(name="input_ids", shape=first.shape, type=first.type)
    past = [[ir.Value(name=f"past.{i}.{n}", shape=layer.graph.inputs[1 + j].shape,
                      type=layer.graph.inputs[1 + j].type) for j, n in enumerate(cache_names)]
            for i, layer in enumerate(layers)]
    graph = ir.Graph([input_ids, *[v for p in past for v in p]], [], nodes=[], name=name, opset_imports={})
    opsets: dict[str, int] = {}
    for part in (embed, *layers, head):
        for domain, version in part.opset_imports.items():
            if opsets.setdefault(domain, version) != version:
                raise LayerwiseError(f"stitch: opset {domain!r} {version} in one part, {opsets[domain]} in another")
        if part.functions:
            raise LayerwiseError("stitch: a part graph has model-local functions; inline them first")
    h = _move(embed.graph, graph, "embed/", {"input_ids": input_ids})["h"]
    presents = []
    for i, layer in enumerate(layers):
        feeds = {"h": h, **{f"past.{n}": past[i][j] for j, n in enumerate(cache_names)}}
        out = _move(layer.graph, graph, f"layers.{i}/", feeds)
        h = out["h_out"]
        for n in cache_names:
            v = out[f"present.{n}"]
            v.name = f"present.{i}.{n}"
            presents.append(v)
    logits = _move(head.graph, graph, "head/", {"h": h})["logits"]
    logits.name = "logits"
    graph.outputs.extend([logits, *presents])
    graph.opset_imports.update(opsets)
    model = ir.Model(graph, ir_version=embed.ir_version, producer_name="mlamoe", producer_version="")
    return model

