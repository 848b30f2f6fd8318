"""genai_config.json for ONNX Runtime GenAI, from the model config and the genai-layout graphs.

The graphs are package graphs rewritten by passes.genai_cache_layout (one key/value pair per layer,
[batch, 1, seq, H]); everything about the cache (names, H, layer count) is read from them, everything
about the model (vocabulary, special tokens, context length) from its config.json dict. Field
meanings: onnxruntime-genai's src/config.h and its model builder's make_genai_config
(onnxruntime_genai/models/builders/base.py), which this follows field for field.

Two forms:
  type "decoder"           one graph (the prefill graph: it takes any seq and any past) runs the
                           prompt and every generated token;
  type "decoder-pipeline"  the prefill graph runs the prompt (run_on_prompt) and the decode graph
                           (latent-fused attention, input_ids [batch, 1]) every generated token
                           (run_on_token_gen): the same two graphs the package runtime runs.
                           genai calls a step a prompt step when it appends more than one token
                           (src/models/decoder_only_pipeline.cpp: first_run_ = next_tokens.size() > 1),
                           so a one-token prompt runs on the decode graph (it takes an empty past).

What the fields mean for an MLA graph (genai reads them as if the cache were multi-head K/V):
  num_key_value_heads = 1 and head_size = H: the shape genai allocates for every past key and value
    ([batch, 1, 0, H] at the first step), half of the per-layer latent row (passes/genai_cache_layout).
  num_attention_heads, hidden_size: the model's own; genai uses them for nothing the graph depends on
    (no position or mask inputs are declared, so genai feeds input_ids and the cache only).
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir

from passes.genai_cache_layout import layout_of

DECODER_FILENAME = "genai_model.onnx"  # the "decoder" form's one graph
GENAI_CONFIG = "genai_config.json"
MODEL_TYPE = "decoder"  # genai's generic decoder-only LLM (src/models/model_type.h ModelType::IsLLM)
PIPELINE_TYPE = "decoder-pipeline"  # several graphs, each run on the prompt and/or the generated tokens (IsPipe)


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _io(model: ir.Model) -> tuple[list[str], list[str]]:
    return [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]


def genai_config(model_config: dict, decoder: ir.Model, filename: str = DECODER_FILENAME,
                 token_gen: tuple[str, ir.Model] | None = None, max_length: int | None = None,
                 provider_options: list | None = None) -> dict:
    """The genai_config.json dict for `decoder` (a graph rewritten by GenaiCacheLayoutPass), saved as
    `filename` beside the config.

    token_gen: (filename, graph) of a second rewritten graph for the generated tokens (the decode
      graph): the "decoder-pipeline" form; without it the "decoder" form runs `decoder` for both.
    model_config: the model's config.json dict (the package manifest's model.config).
    max_length: search.max_length (prompt + generated tokens); default: the context length.
    """
    layout = layout_of(decoder)
    if token_gen is not None:
        other = layout_of(token_gen[1])
        if other != layout or _io(token_gen[1]) != _io(decoder):
            raise ValueError("the token-generation graph's cache layout or IO differs from the prompt graph's")
    heads = {spec["head_size"] for spec in layout["layers"]}
    if len(heads) != 1:  # genai reads per-layer widths from the graph, but one value goes in the config
        raise ValueError(f"layers have different key/value widths {sorted(heads)}")
    head_size = heads.pop()
    graph_inputs = {v.name for v in decoder.graph.inputs}
    graph_outputs = {v.name for v in decoder.graph.outputs}
    if "input_ids" not in graph_inputs or "logits" not in graph_outputs:
        raise ValueError("the decoder graph must take input_ids and return logits")
    inputs = {"input_ids": "input_ids",
              "past_key_names": layout["key_names"], "past_value_names": layout["value_names"]}
    for optional in ("attention_mask", "position_ids"):  # genai feeds these only where the graph has them
        if optional in graph_inputs:
            inputs[optional] = optional
    outputs = {"logits": "logits", "present_key_names": layout["present_key_names"],
               "present_value_names": layout["present_value_names"]}

    context = int(model_config.get("max_position_embeddings") or 0)
    if context <= 0:
        raise ValueError("model config has no max_position_embeddings: genai needs a context_length")
    eos = _token_ids(model_config.get("eos_token_id"))
    bos = _token_ids(model_config.get("bos_token_id"))
    pad = model_config.get("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    model = {
        "context_length": context,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": list(provider_options or [])},
            "filename": filename,
            "head_size": head_size,
            "hidden_size": int(model_config["hidden_size"]),
            "inputs": inputs,
            "outputs": outputs,
            "num_attention_heads": int(model_config["num_attention_heads"]),
            "num_hidden_layers": len(layout["layers"]),
            "num_key_value_heads": 1,
        },
        "pad_token_id": int(pad),
        "type": MODEL_TYPE if token_gen is None else PIPELINE_TYPE,
        "vocab_size": int(model_config["vocab_size"]),
    }
    if token_gen is not None:
        ins, outs = _io(decoder)
        del model["decoder"]["filename"]
        # one model per array element, so that the order survives sorted keys
        model["decoder"]["pipeline"] = [
            {"prompt": {"filename": filename, "inputs": ins, "outputs": outs,
                        "run_on_prompt": True, "run_on_token_gen": False}},
            {"token_gen": {"filename": token_gen[0], "inputs": ins, "outputs": outs,
                           "run_on_prompt": False, "run_on_token_gen": True}}]
    if bos:
        model["bos_token_id"] = bos[0]
    if eos:
        model["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    search = {
        "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
        "max_length": int(max_length or context), "min_length": 0, "no_repeat_ngram_size": 0,
        "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
        "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
    }
    return {"model": model, "search": search}


def write_genai_config(folder: str | Path, model_config: dict, decoder: ir.Model, **kw) -> Path:
    """Write genai_config.json into `folder` (sorted keys, newline-terminated: byte-identical rebuilds)."""
    path = Path(folder) / GENAI_CONFIG
    path.write_text(json.dumps(genai_config(model_config, decoder, **kw), indent=2, sort_keys=True) + "\n")
    return path
