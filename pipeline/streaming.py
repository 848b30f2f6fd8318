"""`mlamoe compile --stream`: a checkpoint compiled one decoder layer at a time (issue 16), never held whole.

For each layer in order, with only that layer's weights in memory:
  1. read its tensors from the safetensors shards (models/layer_stream.py) into the eager layer (fp32);
  2. run the eager layer on the golden cases' hidden states (prefill, prefill-chunk, decode), recording its
     outputs and cache rows: the inputs of the next layer, and the reference of this layer's graphs;
  3. instantiate the layer's graph from its kind's template (pipeline/layerwise.py: traced once per kind), derive
     its decode form, run the target's passes and the quantize scheme on the layer's own graphs;
  4. judge the layer's graphs on ONNX Runtime against the eager layer on the recorded inputs (`layer/{i}/...`
     reports: msit's layer-wise comparison, here on every layer);
  5. store its initializers in the package's one weights file (pipeline/weights_file.py WeightsFile.store) and drop
     the layer.
The embedding and the head (norm + lm_head) are parts of their own, built the same way. The package's prefill and
decode graphs are then stitched from the parts (references into the weights file, not bytes) and saved.

End to end, where the whole package fits in memory (an estimate from the weights file's size): the stitched graphs
run the golden cases on ONNX Runtime against the eager outputs computed layer by layer (`stitched/...`), and greedy
generation through the package's runtime is checked against the eager model teacher-forced on the generated tokens
(one more layer-by-layer pass over the checkpoint: the eager logits of every step at once). Where it does not fit,
those checks are skipped and the package says so (manifest verification.not_verified, README).

The golden decode case feeds a seeded random token rather than the argmax of the chunk's logits (the argmax is known
only after the last layer, and each layer runs once): any token is a valid decode input.

Targets: ort-cpu (the ORT offline optimisation is left to session creation: it needs the whole graph in one
session; ort_runtime sessions apply the same level online). Families: the MLA decoders (DeepSeek-V2/V3) whose cache
grows by appending; quantization: none and int8 (weight-only, per layer: needs no calibration across layers).
"""
from __future__ import annotations

import gc
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from models.errors import MlamoeError
from models.layer_stream import LayerStream
from passes import PASSES, graphs_for
from passes.cleanup import cleanup
from passes.ir_external import session_from_model

from . import layerwise as lw
from .build import write_tokenizer
from .export import finish
from .golden import Golden, GoldenCase, case_lengths, save_golden
from .io_spec import cache_spec as io_cache_spec, graph_io
from .package import write_manifest
from .package_readme import package_readme
from .parity import budget_for, compare, write_reports
from .stages import StageRecord, StageRunner, _rss_bytes, release_memory
from .weights_file import WeightsFile, weights_section

STREAM_TARGETS = ("ort-cpu",)
STREAM_QUANT = ("none", "int8")
CASES = (("prefill", "prefill"), ("prefill-chunk", "prefill"), ("decode", "decode"))
# An ORT CPU session holds its graph's weights and may prepack the MatMul operands (a second copy); the runtime
# opens prefill and decode together
SESSION_FACTOR = 2.2
SESSION_OVERHEAD = 1.5 * 2**30


# The checks' sessions read the weights file in place (memory-mapped): without ORT's prepacked copies of the MatMul
# operands a whole-package session costs the pages it touches, not the weights again (the runtime's own sessions keep
# prepacking: it is faster)
NO_PREPACK = {"session.disable_prepacking": "1"}


def check_options():
    """Session options of the layer checks, fresh for every session (passes.ir_external.session_from_model adds the
    weights file's folder to the options it is given): basic optimisation, no prepacking (NO_PREPACK)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    for key, value in NO_PREPACK.items():
        so.add_session_config_entry(key, value)
    return so


class StreamingError(MlamoeError):
    pass


def refusal(target: str, quant: str, family) -> str | None:
    """Why --stream cannot build this (None: it can)."""
    if target not in STREAM_TARGETS:
        return f"--stream builds for --target {', '.join(STREAM_TARGETS)} (not {target} yet)"
    if quant not in STREAM_QUANT:
        return f"--stream builds --quant {', '.join(STREAM_QUANT)} (not {quant} yet)"
    if family.name != "mla":
        return f"--stream builds the MLA decoders (DeepSeek-V2/V3), not {family.describe()}"
    return None


class _Digest:
    """The weights' content address, tensor by tensor as they are read: sha256 over the sorted lines
    `name dtype sha256(bytes)` (bytes as fp32 after loading, as the eager reference holds them)."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, prefix: str, module: torch.nn.Module) -> None:
        for name, t in module.state_dict().items():
            data = np.ascontiguousarray(t.detach().numpy())
            self.lines.append(f"{prefix}{name} {t.dtype} {hashlib.sha256(data.view(np.uint8)).hexdigest()}")

    def hexdigest(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.lines)).encode()).hexdigest()


def _feeds(step_inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in step_inputs.items()}


def _run(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _apply_passes(graphs: dict[str, ir.Model], pass_names) -> tuple[dict[str, ir.Model], list[str]]:
    notes = []
    for name in pass_names:
        for g in graphs_for(name):
            p = PASSES[name]()
            result = p(graphs[g])
            graphs[g] = cleanup(result.model)
            report = getattr(p, "report", None)
            if report:
                notes.append(f"{name} on {g}: {report}")
    return graphs, notes


def _quantize(graphs: dict[str, ir.Model], quant: str) -> list[str]:
    if quant == "none":
        return []
    from passes.quantize import quantize
    notes = []
    for g, m in graphs.items():
        rep = quantize(m, quant)
        cleanup(m)
        notes.append(f"{g}: {rep.summary()}")
    return notes


def fits_in_memory(weights_bytes: int) -> tuple[bool, str]:
    from .memory_check import available_memory
    avail, source = available_memory()
    need = SESSION_FACTOR * weights_bytes + SESSION_OVERHEAD
    if avail is None:
        return True, f"available memory unknown ({source}); end-to-end checks attempted"
    return need <= avail, (f"the package's sessions need about {need / 2**30:.1f} GiB ({SESSION_FACTOR} x "
                           f"{weights_bytes / 2**30:.1f} GiB of weights + {SESSION_OVERHEAD / 2**30:.1f}), "
                           f"{avail / 2**30:.1f} GiB available ({source})")


@torch.no_grad()
def stream_logits(stream: LayerStream, ids: torch.Tensor, layout: str, progress=None) -> torch.Tensor:
    """The eager model's logits for `ids` [B, S] from an empty cache, one layer in memory at a time."""
    h = stream.embed()(ids)
    for i in range(stream.num_layers):
        if progress is not None:
            progress.update("eager teacher-forced pass", i + 1, stream.num_layers)
        layer = stream.layer(i)
        h, _ = stream.step_layer(layer, h, tuple(stream.empty_cache(ids.shape[0], layout)[i]), layout)
        del layer
    norm, lm_head = stream.head()
    return lm_head(norm(h)).float()


def build_streaming(stream: LayerStream, *, profile, out: Path, pkg: Path, runner: StageRunner,
                    load: StageRecord, base_manifest: dict, quant: str, seed: int, tokenizer: dict, layout: str,
                    gen_tokens: int, pass_names, skipped: dict[str, str], started: float, session: dict) -> None:
    """The streaming build (module doc) into the staged package folder `pkg`; session: the
    target's session settings (the manifest's target.session, read by runtime/ort_runtime.py)."""
    from runtime import ort_runtime

    cfg = stream.config
    spec = stream.cache_spec(layout)
    names = [t.name for t in spec.layers[0]]
    V, B = cfg.vocab_size, 2
    prompt_len, chunk_len = case_lengths(spec)
    g = torch.Generator().manual_seed(seed)
    ids = {"prefill": torch.randint(0, V, (B, prompt_len), generator=g),
           "prefill-chunk": torch.randint(0, V, (B, chunk_len), generator=g),
           "decode": torch.randint(0, V, (B, 1), generator=g)}
    digest = _Digest()
    max_seq = cfg.max_position_embeddings
    rec = StageRecord("layerwise", {"layout": layout, "exporter": "torch.onnx.export(dynamo=True), one layer per kind",
                                    "passes": list(pass_names), "quant": quant}, dict(load.inputs))
    t0 = time.perf_counter()
    (pkg / "onnx").mkdir()
    weights = WeightsFile(pkg / "onnx")
    parts_p: list[ir.Model] = []
    parts_d: list[ir.Model] = []
    try:
        # ---- embedding ------------------------------------------------------------------------------
        runner.progress(f"[layerwise] embedding ({cfg.vocab_size} x {cfg.hidden_size})")
        embed = stream.embed()
        digest.add("model.embed_tokens.", embed)
        h = {c: embed(ids[c]) for c, _ in CASES}
        emb = lw.export_part(lw.Embed(embed), "embed", torch.zeros(2, 3, dtype=torch.long), "input_ids", "h", max_seq)
        weights.store(emb)
        del embed
        release_memory()

        # ---- layers ---------------------------------------------------------------------------------
        templates: dict[str, ir.Model] = {}
        noted: set[str] = set()
        presents: dict[str, list[tuple]] = {c: [] for c, _ in CASES}
        # the ORT chain: the same cases through each layer's graphs in turn (the package's own computation, layer by
        # layer: its golden outputs when quantized, and an end-to-end check that needs one layer in memory)
        h_ort = {c: v.numpy() for c, v in h.items()}
        presents_ort: dict[str, list[tuple]] = {c: [] for c, _ in CASES}
        empty = spec.empty(B)
        for i in range(stream.num_layers):
            t_layer = time.perf_counter()
            laps: dict[str, float] = {}

            def lap(what: str, since=[t_layer]) -> None:  # seconds per sub-step (build log)
                now = time.perf_counter()
                laps[what] = round(now - since[0], 3)
                since[0] = now

            runner.live.update(f"layer {i}: reading weights", i + 1, stream.num_layers)
            layer = stream.layer(i)
            lap("read")
            digest.add(f"model.layers.{i}.", layer)
            # eager on the recorded inputs: prefill from an empty cache, the chunk after it, decode after that
            inputs, outputs, gate_inputs = {}, {}, {}
            layer_past = {"prefill": tuple(empty[i])}
            gate = getattr(layer.mlp, "gate", None)
            for c, _ in CASES:
                x = h[c]
                seen = []
                hook = None if gate is None else gate.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
                out_h, present = stream.step_layer(layer, x, layer_past[c], layout)
                if hook is not None:
                    hook.remove()
                    gate_inputs[c] = seen[0]
                inputs[c] = {"h": x, **{f"past.{n}": t for n, t in zip(names, layer_past[c])}}
                outputs[c] = {"h_out": out_h, **{f"present.{n}": t for n, t in zip(names, present)}}
                presents[c].append(tuple(present))
                h[c] = out_h
                if c == "prefill":
                    layer_past["prefill-chunk"] = tuple(present)
                elif c == "prefill-chunk":
                    layer_past["decode"] = tuple(present)
            lap("eager")
            # the layer's graphs
            runner.live.update(f"layer {i}: graphs", i + 1, stream.num_layers)
            kind = lw.layer_kind(layer)
            if kind not in templates:
                step = lw.LayerStep(layer, stream.rope_inv_freq, stream.rope_factor, stream.softmax_scale, layout,
                                    stream.attention == "absorbed")
                runner.progress(f"[layerwise] tracing the {kind} layer template (layer {i})")
                templates[kind] = lw.export_layer(step, spec.layers[i], cfg.hidden_size, max_seq)
                lw.check_template(templates[kind], layer)
                lw.strip_parameters(templates[kind], layer)
                rec.notes.append(f"template {kind}: traced at layer {i}")
            prefill = finish(lw.instantiate(templates[kind], layer), "prefill")
            graphs = {"prefill": prefill, "decode": lw.decode_form(prefill)}
            lap("graphs")
            graphs, pass_notes = _apply_passes(graphs, pass_names)
            lap("passes")
            quant_notes = _quantize(graphs, quant)
            lap("quantize")
            if kind not in noted:  # the passes do the same to every layer of a kind: the first one's notes
                noted.add(kind)
                rec.notes.extend(f"layer {i} ({kind}): {n}" for n in pass_notes + quant_notes)
            # layer-wise parity: the layer's graphs on ORT against the eager layer, on the recorded inputs
            runner.live.update(f"layer {i}: parity", i + 1, stream.num_layers)
            for gname in graphs:  # into the weights file first: the checks' sessions then read it, not a copy
                weights.store(graphs[gname])
            lap("store")
            sessions = {gname: session_from_model(graphs[gname], check_options()) for gname in graphs}
            check_layer(runner, rec, i, graphs, sessions, inputs, outputs, gate_inputs, quant, stream, layer)
            for c, cg in CASES:
                past_ort = (presents_ort["prefill"][i] if c == "prefill-chunk" else
                            presents_ort["prefill-chunk"][i] if c == "decode" else tuple(t.numpy() for t in empty[i]))
                got = _run(sessions[cg], {"h": h_ort[c], **{f"past.{n}": t for n, t in zip(names, past_ort)}})
                h_ort[c] = got["h_out"]
                presents_ort[c].append(tuple(got[f"present.{n}"] for n in names))
            del sessions
            lap("check")
            parts_p.append(graphs["prefill"])
            parts_d.append(graphs["decode"])
            del layer, graphs, prefill, inputs, outputs
            gc.collect()  # the layer's graphs hold reference cycles: without a collection each layer's stays
            release_memory()
            lap("release")
            rec.timings[f"layer{i}"] = {"seconds": round(time.perf_counter() - t_layer, 3), **laps}
            runner.progress(f"[layerwise] layer {i + 1}/{stream.num_layers} ({kind}) "
                            f"{time.perf_counter() - t_layer:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in laps.items())}), "
                            f"weights file {weights.stored_bytes / 2**30:.2f} GiB, RSS {_rss_bytes() / 2**30:.2f} GiB")

        # ---- head -----------------------------------------------------------------------------------
        norm, lm_head = stream.head()
        digest.add("model.norm.", norm)
        if not cfg.tie_word_embeddings:
            digest.add("lm_head.", lm_head)
        logits = {c: lm_head(norm(h[c])).float() for c, _ in CASES}
        head = lw.export_part(lw.Head(norm, lm_head), "head", torch.randn(2, 3, cfg.hidden_size), "h", "logits",
                              max_seq)
        head_sess = session_from_model(head, check_options())
        logits_ort = {c: _run(head_sess, {"h": h_ort[c]})["logits"] for c, _ in CASES}
        del head_sess
        weights.store(head)
        del norm, lm_head
        release_memory()

        # ---- stitch and save ------------------------------------------------------------------------
        runner.live.update("stitching the prefill and decode graphs")
        full = {"prefill": lw.stitch("prefill", _clone(emb), parts_p, _clone(head), names),
                "decode": lw.stitch("decode", _clone(emb), parts_d, _clone(head), names)}
        for gname, m in full.items():
            m.graph.name = gname
            weights.save(m, f"{gname}.onnx", check=False)
    finally:
        weights.close()
    pooled, flip_failures = pooled_flips(runner.reports)
    if pooled:
        rec.notes.append("routing flips per case over all MoE layers: " + json.dumps(pooled, sort_keys=True))
    if flip_failures:
        from .parity import ParityError
        raise ParityError(f"parity failed at stage 'layer-{quant}' (routing flips pooled over the layers): "
                          + "; ".join(flip_failures))
    rec.seconds = round(time.perf_counter() - t0, 3)
    rec.timings["peak_rss_bytes"] = peak_rss_bytes()  # the layer-by-layer part's peak (build log, not manifest)
    runner.progress(f"[layerwise] done: {stream.num_layers} layers in {rec.seconds:.1f} s, peak RSS so far "
                    f"{rec.timings['peak_rss_bytes'] / 2**30:.2f} GiB, weights file {weights.stored_bytes / 2**30:.2f} GiB")
    rec.notes.append(f"wrote {', '.join('onnx/' + p.name for p in weights.files)} (hashed in the manifest's files)")
    load.inputs["weights"] = digest.hexdigest()
    base_manifest["model"]["weights_sha256"] = load.inputs["weights"]
    runner.records.append(rec)
    del full, parts_p, parts_d, emb, head
    release_memory()

    # ---- golden data ------------------------------------------------------------------------------------
    def make_cases(logits_of, presents_of):
        return [GoldenCase("prefill", "prefill", {"input_ids": ids["prefill"].numpy(), **spec.flatten(empty, "past")},
                           {"logits": np.asarray(logits_of["prefill"]), **spec.flatten(presents_of["prefill"], "present")}),
                GoldenCase("prefill-chunk", "prefill", {"input_ids": ids["prefill-chunk"].numpy(),
                                                        **spec.flatten(presents_of["prefill"], "past")},
                           {"logits": np.asarray(logits_of["prefill-chunk"]),
                            **spec.flatten(presents_of["prefill-chunk"], "present")}),
                GoldenCase("decode", "decode", {"input_ids": ids["decode"].numpy(),
                                                **spec.flatten(presents_of["prefill-chunk"], "past")},
                           {"logits": np.asarray(logits_of["decode"]), **spec.flatten(presents_of["decode"], "present")})]

    eager_cases = make_cases({c: v.numpy() for c, v in logits.items()}, presents)
    chain_cases = make_cases(logits_ort, presents_ort)
    chained = StageRecord("chained", {"graphs": "each layer's, in turn"}, {})
    for e, o in zip(eager_cases, chain_cases):  # the package's computation layer by layer against eager, end to end
        if quant == "none":
            runner.add_report(chained, compare(f"chained/{e.name}", e.outputs, o.outputs, logits_outputs=["logits"]))
        else:  # routing by itself, for people: the binding judgement is each layer's, teacher-forced
            runner.add_report(chained, compare(f"info/{quant}-vs-fp32/{e.name}", {"logits": e.outputs["logits"]},
                                               {"logits": o.outputs["logits"]}, logits_outputs=["logits"],
                                               budget=budget_for(f"quantize-{quant}")), binding=False)
    runner.records.append(chained)
    # what the package must reproduce: eager fp32, or (quantized) its own graphs' outputs, chained
    cases = eager_cases if quant == "none" else chain_cases  # (the chain's cache inputs are its own rows)
    paths = {gname: pkg / "onnx" / f"{gname}.onnx" for gname in ("prefill", "decode")}
    io = {"vocab_size": V, "cache": io_cache_spec(cfg, layout),
          "graphs": {gname: {"file": f"onnx/{gname}.onnx", **graph_io(p)} for gname, p in paths.items()},
          "weights": weights_section(weights, "onnx")}
    fits, fit_note = fits_in_memory(weights.stored_bytes)
    verified, not_verified = [], []
    e2e = StageRecord("stitched", {"graphs": "prefill, decode"}, {})
    t1 = time.perf_counter()
    gen_prompt = ids["prefill"][:1]
    tokens = np.zeros((1, 0), np.int64)
    step_logits = np.zeros((1, 0, V), np.float32)
    if fits:
        from .build import run_cases
        runner.live.update("stitched graphs on ONNX Runtime")
        golden = Golden(cases, gen_prompt.numpy(), tokens, step_logits)
        results = run_cases(paths, golden, {"graph_optimization_level": "basic", "config_entries": NO_PREPACK},
                            progress=runner.live)
        for case in cases:  # the stitched graphs against eager (fp32) or against their own layers chained
            stage = "stitched" if quant == "none" else f"stitched-{quant}"
            runner.add_report(e2e, compare(f"{stage}/{case.name}", case.outputs, results[case.name],
                                           logits_outputs=["logits"], budget=budget_for("stitched")))
        del results
        release_memory()
        if gen_tokens:
            runner.live.update(f"greedy generation through the package ({gen_tokens} tokens)")
            rt = ort_runtime.PackageRuntime(pkg, manifest={"io": io, "target": {
                "session": {**session, "config_entries": NO_PREPACK}}})
            tokens, step_logits = rt.generate(gen_prompt.numpy(), gen_tokens)
            del rt
            release_memory()
            seq = torch.cat([gen_prompt, torch.as_tensor(tokens[:, :-1], dtype=torch.long)], dim=1)
            eager = stream_logits(stream, seq, layout, runner.live)[:, prompt_len - 1:].numpy()
            eager_tokens = eager.argmax(-1)
            stage = "stitched" if quant == "none" else f"info/{quant}-greedy-vs-fp32"
            report = compare(f"{stage}/greedy", {"step_logits": eager}, {"step_logits": step_logits},
                             logits_outputs=["step_logits"],
                             budget=None if quant == "none" else budget_for(f"quantize-{quant}"))
            report.add_tokens("greedy", eager_tokens, tokens)  # eager teacher-forced on the package's tokens
            runner.add_report(e2e, report, binding=quant == "none")
            if quant == "none":
                tokens, step_logits = eager_tokens, eager
        verified.append("the stitched prefill/decode graphs on the golden cases against " +
                        ("the eager model (computed layer by layer)" if quant == "none" else
                         "their own layers' graphs chained") + f" ({fit_note})")
        if gen_tokens:
            verified.append(f"greedy generation of {gen_tokens} tokens through the package's runtime, against the eager "
                            "model teacher-forced on those tokens (one layer-by-layer pass)")
    else:
        not_verified.append(f"the stitched graphs were not run by this compile ({fit_note}), nor greedy generation; "
                            "the same layer graphs were run chained, one at a time (golden data and the chained "
                            "check)")
        runner.progress(f"[stitched] not run: {fit_note}")
    e2e.seconds = round(time.perf_counter() - t1, 3)
    e2e.timings["peak_rss_bytes"] = peak_rss_bytes()
    runner.records.append(e2e)
    golden = Golden(cases, gen_prompt.numpy(), np.asarray(tokens), np.asarray(step_logits, np.float32))

    # ---- package -----------------------------------------------------------------------------------------
    (pkg / "runtime").mkdir()
    import shutil
    shutil.copyfile(Path(ort_runtime.__file__), pkg / "runtime" / Path(ort_runtime.__file__).name)
    golden_section = save_golden(golden, pkg / "golden", pkg)
    tol = budget_for(profile.parity_stage)
    golden_section["tolerance"] = {"atol": tol.atol, "rtol": tol.rtol, "stage": profile.parity_stage}
    layers_judged = sum(1 for r in runner.reports if r.stage.startswith("layer"))
    verified.insert(0, f"every decoder layer's prefill and decode graphs against the eager layer on recorded inputs "
                       f"({layers_judged} layer-wise reports, {stream.num_layers} layers)")
    verified.insert(1, "end to end in bounded memory: the golden cases through each layer's graphs in turn on ONNX "
                       "Runtime against the eager model layer by layer (" +
                       ("fp32 budget" if quant == "none" else f"informational for {quant}; golden/ holds these "
                        "outputs, what the package computes") + ")")
    not_verified.append("ONNX Runtime's offline optimisation was not applied (it needs the whole graph in one session); "
                        "the runtime's sessions optimise at load")
    if quant != "none":
        not_verified.append(f"the accuracy of {quant} on this model's real task (random or unknown weights)")
    manifest = {
        **base_manifest,
        "target": {"name": profile.name, "description": profile.description, "providers": list(profile.providers),
                   "session": session, "quantization": quant, "runtime": "runtime/ort_runtime.py"},
        "io": io, "golden": golden_section,
        "streaming": {"layers": stream.num_layers, "templates": sorted(templates),
                      "end_to_end": bool(fits), "why": fit_note,
                      "decode_case": "a seeded random token (each layer runs once; the chunk's argmax is known "
                                     "only after the last layer)"},
    }
    for name, why in skipped.items():
        rec.notes.append(f"pass {name} not run: {why}")
    write_reports(runner.reports, pkg / "reports")
    pkg_rec = StageRecord("package", {"tarball": True}, {})
    runner.records.append(pkg_rec)
    manifest["stages"] = [r.to_dict() for r in runner.records]
    manifest["parity"] = {"passed": runner.binding_passed(), "reports": ["reports/parity.json", "reports/parity.md"]}
    manifest["verification"] = {"verified_here": verified, "not_verified": not_verified}
    write_tokenizer(pkg, tokenizer)
    (pkg / "README.md").write_text(package_readme(manifest, runner.reports))
    write_manifest(pkg, manifest)
    runner.progress(f"[package] {out} ({time.time() - started:.1f} s in all)")


def _derived(outputs: dict, h: np.ndarray, quant: str) -> dict:
    """What a layer comparison judges: fp32, the layer's outputs as they are; quantized, the layer's own
    contribution h_out - h (the residual stream would hide a broken layer) and its cache rows."""
    if quant == "none":
        return outputs
    return {"delta": outputs["h_out"] - h, **{k: v for k, v in outputs.items() if k.startswith("present.")}}


def check_layer(runner: StageRunner, rec: StageRecord, i: int, graphs: dict, sessions: dict, inputs: dict,
                outputs: dict, gate_inputs: dict, quant: str, stream: LayerStream, layer) -> None:
    """Layer i's graphs on ONNX Runtime against the eager layer, each golden case on its graph. A quantized MoE
    layer is judged teacher-forced (pipeline/parity.py compare_routed): its gate logits are replaced by the eager
    layer's, so the numbers judge every token, and its own routing decisions are compared apart."""
    from passes.ir_external import copy_model
    from passes.routing_probes import force_gate_logits, forced_name, gate_name, router_probs_name
    from .parity import Router, compare_routed
    budget = layer_budget(quant)
    routed = quant != "none" and bool(gate_inputs)
    for gname in ("prefill", "decode"):
        sess = sessions[gname]
        forced = None
        if routed:
            probe = copy_model(graphs[gname])
            if force_gate_logits(probe) != 1:
                raise StreamingError(f"layer {i}: its {gname} graph should have one MoE router")
            forced = session_from_model(probe, check_options())
        for c, cg in CASES:
            if cg != gname:
                continue
            feeds = _feeds(inputs[c])
            h = feeds["h"]
            ref = _derived({k: v.numpy() for k, v in outputs[c].items()}, h, quant)
            got = _derived(_run(sess, feeds), h, quant)
            stage = f"layer/{i}/{c}" if quant == "none" else f"layer-{quant}/{i}/{c}"
            if forced is None:
                runner.add_report(rec, compare(stage, ref, got, budget=budget))
                continue
            gate = layer.mlp.gate
            ref_gate = torch.nn.functional.linear(gate_inputs[c].float(), gate.weight.float()).numpy()
            out = _run(forced, {**feeds, forced_name(0): ref_gate})
            bias = None if gate.e_score_correction_bias is None else gate.e_score_correction_bias.double().numpy()
            report = compare_routed(stage, ref, _derived(out, h, quant), [ref_gate], [out[gate_name(0)]],
                                    [Router.of(stream.config, bias)], budget=budget, unforced=got,
                                    forced_router_probs=[out[router_probs_name(0)]])
            runner.add_report(rec, report)
        del sess, forced


def pooled_flips(reports) -> tuple[dict[str, dict], list[str]]:
    """The routing flips of the layer-wise reports pooled per golden case over every MoE layer, as a whole-model report
    pools its layers -> ({case: {"n_flips", "n_decisions", "share"}}, failures): a case fails when its share exceeds
    MAX_FLIPPED_FRACTION (one flip always allowed, as parity's rule has it)."""
    from .parity import MAX_FLIPPED_FRACTION
    pooled: dict[str, dict] = {}
    for r in reports:
        rt = r.extra.get("routing") if hasattr(r, "extra") else r.get("extra", {}).get("routing")
        stage = r.stage if hasattr(r, "stage") else r["stage"]
        if not rt or "n_decisions" not in rt:
            continue
        p = pooled.setdefault(stage.split("/")[-1], {"n_flips": 0, "n_decisions": 0})
        p["n_flips"] += rt["n_flips"]
        p["n_decisions"] += rt["n_decisions"]
    failures = []
    for case, p in pooled.items():
        p["share"] = p["n_flips"] / p["n_decisions"] if p["n_decisions"] else 0.0
        if p["share"] > MAX_FLIPPED_FRACTION and p["n_flips"] > 1:
            failures.append(f"case {case}: routing flipped at {p['n_flips']} of {p['n_decisions']} (position, MoE layer) "
                            f"decisions over all layers ({100 * p['share']:.1f}% > {100 * MAX_FLIPPED_FRACTION:g}%)")
    return pooled, failures


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (getrusage: Linux reports KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def layer_budget(quant: str):
    return budget_for("layer" if quant == "none" else f"layer-{quant}")


def _clone(m: ir.Model) -> ir.Model:
    return ir.Model(m.graph.clone(), ir_version=m.ir_version, producer_name=m.producer_name)
