"""The README.md written into every package, for the team that receives it."""
from __future__ import annotations

from pathlib import Path

from .parity import ParityReport


def _quant_lines(t: dict) -> list[str]:
    if t.get("quantization") != "int8":
        return []
    acc4 = t.get("quantization_options", {}).get("accuracy_level") == 4
    return ["", "INT8: linear layers as `com.microsoft.MatMulNBits` (bits=8, blocks of 128), routed experts as "
            "`com.microsoft.QMoE` (int8); lm_head, router gate, embeddings and norms stay fp32. " + (
                "accuracy_level=4: both kernels quantize the activations to int8 per token per block inside the "
                "kernel (QMoE experts per block), so the numerics are not weight-only."
                if acc4 else "Activations stay fp32 (weight-only numerics; QMoE experts per output channel).")]


def random_weights_note(kind: str) -> str:
    """For a package built from a random-weight preset: what its agreement figures do not say."""
    if kind != "preset":
        return ""
    return (" The model is a random-weight preset: these figures judge numerics, not predictions (top-1 and greedy "
            "tokens of random weights follow routing near ties); `--model trained-small` gives figures that mean "
            "something.")


def judged_line(reports: list[ParityReport], kind: str) -> str:
    """The README's summary: what the package's checks judged and what they showed."""
    parts = []
    layerwise = [r for r in reports if r.stage.startswith(("layer/", "layer-"))]
    if layerwise:  # --stream: each layer's graphs against the eager layer
        layers = {r.stage.split("/")[1] for r in layerwise}
        worst = min((o.cosine for r in layerwise for o in r.outputs if o.cosine is not None), default=float("nan"))
        parts.append(f"compiled layer by layer: each of the {len(layers)} decoder layers' graphs against the eager "
                     f"layer on recorded inputs ({len(layerwise)} comparisons, cosine >= {worst:.6f})")
    for r in reports:
        t = r.extra.get("tokens", {}).get("greedy")
        if t is not None and not r.stage.startswith("info/"):
            parts.append(f"greedy tokens of the packaged graphs equal those of the graphs they were checked against "
                         f"for {t['n_equal_steps']} of {t['n_steps_reference']} steps ({r.stage})")
        elif t is not None:
            parts.append(f"against eager fp32, {t['n_equal_steps']} of {t['n_steps_reference']} greedy steps equal "
                         "(informational)")
    routed = [r for r in reports if "routing" in r.extra and "n_decisions" in r.extra["routing"]]
    if routed:
        flips = sum(r.extra["routing"]["n_flips"] for r in routed)
        n = sum(r.extra["routing"]["n_decisions"] for r in routed)
        judged = "delta" if layerwise else "logits"  # --stream: a layer's own contribution h_out - h
        worst = min((o.cosine for r in routed for o in r.outputs if o.name == judged and o.cosine is not None),
                    default=float("nan"))
        what = "each layer's output (h_out - h) cosine" if layerwise else "logits cosine"
        parts.append(f"{routed[0].stage.split('/')[0]}: {what} >= {worst:.6f} against eager fp32 with its "
                     f"routing forced; " + (f"no routing decision flipped ({n} (position, MoE layer) compared)"
                                           if not flips else f"{flips} of {n} (position, MoE layer) routing "
                                           "decisions flipped, each at a near tie"))
    passed = all(r.passed for r in reports if not r.stage.startswith("info/"))
    text = "; ".join(parts) + ("; every stage within its parity budget." if passed else "; SOME STAGES FAILED.")
    text += random_weights_note(kind)
    return "**Judged:** " + text[0].upper() + text[1:]


def package_readme(manifest: dict, reports: list[ParityReport]) -> str:
    m, t, io = manifest["model"], manifest["target"], manifest["io"]
    cfg, cache = m["config"], io["cache"]
    lines = [
        f"# {m['source']} for {t['name']}",
        "",
        f"Compiled by mlamoe {manifest['mlamoe_version']} from a {m['kind']} "
        f"({cfg['model_type']}, {m['parameters']:,} parameters; weights sha256 `{m['weights_sha256'][:16]}…`).",
        f"Target: {t['description']}. Quantization: {t['quantization']}.",
        *_quant_lines(t),
        "",
        judged_line(reports, m["kind"]),
        "",
        "## Contents",
        "",
        "| path | what |",
        "|---|---|",
        "| `manifest.json` | schema version, model config and hashes, toolchain, stages with parity, IO spec, "
        "sha256 and size of every file |",
        "| `onnx/prefill.onnx`, `onnx/decode.onnx` | the graphs (prefill: any prompt length, optional past cache; "
        "decode: one token per sequence) |",
        *_weights_rows(manifest),
        "| `runtime/ort_runtime.py` | a runner needing only numpy + onnxruntime (greedy generation, golden re-check) |",
        "| `golden/` | inputs and expected outputs (.npy) of the eager fp32 reference |",
        "| `reports/parity.json`, `reports/parity.md` | every stage's parity numbers |",
        *_tokenizer_rows(manifest),
        *_genai_rows(manifest),
        "",
        "## Inputs and outputs",
        "",
        "- `input_ids` int64 `[batch, seq]` (decode: `[batch, 1]`).",
    ]
    lines += cache_lines(cache, io["vocab_size"])
    lines += [
        "",
        "## Run and verify",
        "",
        "```",
        "pip install onnxruntime numpy",
        "python runtime/ort_runtime.py verify-golden          # re-run golden inputs, compare",
        "python runtime/ort_runtime.py generate --prompt-ids 1,2,3 --max-new-tokens 16",
        "sha256sum -c <(python -c \"import json;[print(f['sha256'],f['path']) for f in json.load(open('manifest.json'))['files']]\")",
        "```",
        "With the compiler installed, `mlamoe verify <this folder or .tar.gz>` checks every hash and re-runs the golden data"
        + (", and `mlamoe generate <this folder> --prompt \"text\"` (or `--chat`) generates text with tokenizer/."
           if (manifest.get("tokenizer") or {}).get("dir") else "."),
        "",
        "## What was verified, and what was not",
        "",
    ]
    lines += [f"- Verified: {v}" for v in manifest["verification"]["verified_here"]]
    lines += [f"- Not verified: {v}" for v in manifest["verification"]["not_verified"]] or []
    lines += [f"- Not run: `{r['name']}`: {r['params']['skipped']}" for r in manifest.get("stages", [])
              if r["params"].get("skipped")]
    lines += ["", "## Parity summary", "", "| stage | passed | worst max abs | min cosine |", "|---|---|---|---|"]
    for r in reports:
        finite = [o for o in r.outputs if o.max_abs == o.max_abs]
        worst = max((o.max_abs for o in finite), default=0.0)
        cos = min((o.cosine for o in finite if o.cosine is not None), default=1.0)
        lines.append(f"| {r.stage} | {'yes' if r.passed else 'NO'} | {worst:.2e} | {cos:.6f} |")
    return "\n".join(lines) + "\n"


def cache_lines(cache: dict, vocab_size: int) -> list[str]:
    """The README's cache IO lines from the manifest's io.cache (models/cache.py's to_manifest): one line per
    tensor of a uniform spec; per-layer specs: each layer kind's tensors with their length rules."""
    if "layer_kinds" not in cache:
        lines = [f"- `past.{{layer}}.{spec['name']}` float32 `{spec['shape']}` for layer 0..{cache['num_layers'] - 1}; "
                 f"the graph returns `present.{{layer}}.{spec['name']}` with this step appended (feed it back as past)."
                 for spec in cache["per_layer"]]
        return lines + [
            f"- `logits` float32 `[batch, seq, {vocab_size}]`.",
            f"- Cache layout `{cache['layout']}`: {cache['values_per_token_per_layer']} values "
            f"({cache['bytes_per_token_per_layer']} bytes) per token per layer, {cache['bytes_per_token']} bytes per token.",
            "- Positions are `past + arange(seq)`; a new prompt passes caches with `past = 0`.",
        ]
    lines = [f"- Cache layout `{cache['layout']}`, per layer kind (`past` = tokens seen; each `present.{{layer}}.{{name}}` "
             "is that tensor after this step: feed it back as `past.{layer}.{name}`):"]
    for kind in cache["layer_kinds"]:
        layers = [i for i, k in enumerate(cache["layer_kind_of"]) if k == kind["kind"]]
        tensors = ", ".join(f"`{t['name']}` `{t['shape']}`" + (f" (empty state {t['fill']})" if "fill" in t else "")
                            for t in kind["per_layer"])
        lines.append(f"  - layers {', '.join(map(str, layers))}: {tensors}")
    return lines + [
        f"- `logits` float32 `[batch, seq, {vocab_size}]`.",
        f"- {cache['bytes_per_token']:g} bytes per token in the long run (compressed entries counted per token), plus "
        f"{cache['bounded_bytes_per_batch_row']} bytes per sequence of bounded state (windows, pending rows, fixed tensors).",
        "- The tokens seen are read from the cache tensors' lengths; a new prompt passes every tensor empty (0 rows; "
        "fixed tensors at their empty state; runtime/ort_runtime.py's empty_cache builds them from manifest.json).",
    ]


def _weights_rows(manifest: dict) -> list[str]:
    w = manifest.get("io", {}).get("weights")
    if not isinstance(w, dict) or "file" not in w:
        return []
    return [f"| `{w['file']}` | the weights of every graph ({', '.join(f'`{Path(f).name}`' for f in w.get('graphs', []))}), "
            f"one copy ({w.get('bytes', 0):,} bytes; the graphs reference it by offset, ONNX external data: keep `onnx/` "
            "together) |"]


def _tokenizer_rows(manifest: dict) -> list[str]:
    tok = manifest.get("tokenizer") or {}
    if tok.get("dir"):
        return [f"| `{tok['dir']}/` | {', '.join(f.split('/')[-1] for f in tok['files'])}: {tok['source']} "
                "(load tokenizer.json with the `tokenizers` library) |"]
    return [f"| (no tokenizer) | {tok.get('source', 'none recorded')} |"]


def _genai_rows(manifest: dict) -> list[str]:
    g = manifest.get("genai")
    if not g:
        return []
    own = [f for f in g.get("files", []) if f != g.get("weights")]
    listed = ", ".join(f"`{f}`" for f in own) if own else f"`{g['dir']}/`"
    return [f"| {listed} | the same graphs for onnxruntime-genai ({g['type']}; cache as one key/value pair per layer of "
            f"half the state row), beside the package's graphs and over the same `{g['weights']}` (no second copy of the "
            f"weights): `python -c \"import onnxruntime_genai as og; og.Model('{g['dir']}')\"` with {g['runtime']}; "
            "greedy, batch 1 or equal-length prompts |"]
