"""The ascend target's build, in order, writing into a package folder (the compiler calls this
between its `load` stage and `package`; every step can also be called on its own):

    1. profile      make_profile(soc, precision)               unknown soc / mode -> AscendProfileError
       shapes       shapes.resolve_shapes (batch, max cache,   bad value / over HBM -> AscendShapeError
                    gears, buckets; HBM estimate printed)
    2. export       static_export.export_static_graph per spec -> onnx/<graph>.onnx (opset 18, static), every gear
    3. check        checker.check_or_raise per graph           -> AscendCheckError listing violations
    4. parity fp32  emulation.static_parity + chunked prefill  budget "export" (1e-4, greedy binding); steps 4-5
                    (chunked_prefill_parity)                   and the golden data at the smallest gear only
    5. emulation    emulation.emulate (fp16, keep_dtype islands) budget "ascend-fp16-emulation" (msit),
                    teacher-forced: the fp16 graphs read the fp32 static graphs' gate logits (and
                    indexer scores), every row judged; their own routing judged apart by parity's
                    rule (flips within the share, each a near tie; emulation.compare_runs)
    6. build files  atc.write_build                             ascend/build_om.sh, keep_dtype, atc_config.json
    7. atc          atc.run_atc(require_om)                     .om in ascend/om/ or "om not built: atc not found"
    8. kit          kit.write_golden + kit.install_kit          golden/ascend/, ascend/kit/verify_on_device.py

With quant="w8a8" (targets/ascend/quant.py) the fp32 graphs are exported to a work folder and checked
against eager (step 4, fp32 budget) first; then the attention activations are calibrated on the fp32
prefill graph, every graph is quantized (QDQ, opset 18) into onnx/, and steps 3-8 run on the quantized
graphs: parity of the fp32 QDQ graphs vs eager under BUDGETS["quantize-w8a8"], the fp16 emulation of the
QDQ graphs judged against the fp32 QDQ graphs by msit's thresholds (the device's golden data are those
graphs' outputs), Q/DQ and the per-token quantization kept fp32 (keep_dtype), reports/quantization.json
and the error profile of the first prefill bucket. Where either judgement fails, the accuracy fallback
(_quantize_w8a8; docs/ascend.md "Accuracy fallback") keeps linear sites unquantized one at a time in network
order, at most quant.FALLBACK_MAX_SITES, re-quantizing and re-judging each time; the manifest records it.

`build_ascend` returns an AscendBuild: the parity reports (fp32 then fp16), the manifest section,
the README section and the ATC result. It raises on a failed check, a failed parity budget or an
ATC failure (with ATC's error text); a missing atc is not an error unless require_om.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

from pipeline.build import moe_routers
from pipeline.parity import ParityError, ParityReport
from pipeline.weights_file import WeightsFile, weights_section

from . import atc as atc_mod
from . import checker, emulation, kit
from . import shapes as shapes_mod
from .profile import DEFAULT_PRECISION, DEFAULT_SOC, AscendProfile, make_profile
from .shapes import ServingShapes, resolve_shapes
from .static_export import (TARGET_OPSET, StaticGraphSpec, StaticRunner, export_static_graph, fp32_island_nodes,
                            ort_sessions, static_cache_spec)


@dataclasses.dataclass
class AscendBuild:
    profile: AscendProfile
    specs: list[StaticGraphSpec]
    reports: list[ParityReport]
    atc: atc_mod.AtcResult
    manifest: dict
    readme: str
    seconds: dict
    quant: str = "none"
    quant_reports: dict = dataclasses.field(default_factory=dict)  # graph -> QuantReport.to_dict()
    shapes: ServingShapes | None = None

    @property
    def judged(self) -> str:
        """What the fp16 emulation showed, for the package README's summary line."""
        return emulation.describe(self.reports)


def build_ascend(model, package_dir: Path, *, soc_version: str = DEFAULT_SOC, precision_mode: str = DEFAULT_PRECISION,
                 batch: int | None = None, max_cache: int | None = None, buckets: tuple[int, ...] | None = None,
                 gears: tuple[int, ...] | None = None, require_om: bool = False, atc: str | None = None,
                 external_weight: int = 0, gen_tokens: int = 16, seed: int = 0, progress=print,
                 quant: str = "none") -> AscendBuild:
    """None for batch / max_cache / buckets / gears: targets/ascend/shapes.py's defaults (max cache from the model's
    max_position_embeddings, capped by the soc's HBM)."""
    package_dir = Path(package_dir)
    profile = make_profile(soc_version, precision_mode, quant)  # fails first on a bad soc / mode / scheme
    shapes = resolve_shapes(model.config, soc_version, precision_mode, batch, max_cache, gears, buckets)
    for line in shapes_mod.describe(shapes):
        progress(line)
    specs = shapes.specs()
    base = {s.name for s in shapes.base_specs()}  # the smallest gear: run and verified here
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="mlamoe-ascend-") as work:
        fp32_dir = package_dir / "onnx" if quant == "none" else Path(work) / "fp32"
        t = time.perf_counter()
        graphs: dict[str, tuple[StaticGraphSpec, Path]] = {}
        keep: dict[str, list[str]] = {}
        with WeightsFile(fp32_dir) as weights:  # decode and every bucket over one weights file
            for spec in specs:
                m = export_static_graph(model, spec)
                path = weights.save(m, f"{spec.name}.onnx")
                graphs[spec.name] = (spec, path)
                keep[spec.name] = [n for names in fp32_island_nodes(m).values() for n in names]
                progress(f"[ascend] exported {spec.name}: batch {spec.batch}, seq {spec.seq}, cache {spec.max_cache}, "
                         f"{len(m.graph)} nodes")
                del m
        weights_info = weights_section(weights, "onnx")
        seconds["export"] = round(time.perf_counter() - t, 3)

        reports: list[ParityReport] = []
        routers = moe_routers(model)
        quant_reports: dict = {}
        fallback: dict | None = None  # w8a8's accuracy fallback record (_quantize_w8a8)
        reference = model  # what the fp16 emulation and the device golden data are judged against
        fp32_base = {n: g for n, g in graphs.items() if n in base}
        chunked: list[ParityReport] = []
        if quant == "w8a8":
            t = time.perf_counter()
            reports += emulation.static_parity(model, fp32_base, gen_tokens=gen_tokens, seed=seed)
            chunked = chunked_prefill_parity(model, fp32_base, seed)
            reports += chunked
            for r in reports:
                r.raise_if_failed()
            fp32_graphs = graphs
            graphs, keep, quant_reports, weights_info, quant_checks, fallback = _quantize_w8a8(
                model, graphs, package_dir, seed, progress, base, gen_tokens, routers)
            seconds["quantize"] = round(time.perf_counter() - t, 3)

        t = time.perf_counter()
        for name, (_, path) in graphs.items():
            checker.check_or_raise(path, profile, what=f"onnx/{name}.onnx")
        seconds["check"] = round(time.perf_counter() - t, 3)
        progress(f"[ascend] profile check passed ({profile.describe()})")

        t = time.perf_counter()
        base_graphs = {n: g for n, g in graphs.items() if n in base}
        if quant == "w8a8":  # judged inside _quantize_w8a8 (the accuracy fallback needs the verdicts)
            reports += quant_checks
            reference = emulation.static_reference(base_graphs, model.config)
        else:
            reports += emulation.static_parity(model, base_graphs, gen_tokens=gen_tokens, seed=seed)
            chunked = chunked_prefill_parity(model, base_graphs, seed)
            reports += chunked
            reports += emulation.emulate(reference, base_graphs, keep, gen_tokens=gen_tokens, seed=seed, routers=routers)
        for r in reports:
            if quant == "w8a8" and not r.passed and fallback["sites"]:
                try:
                    r.raise_if_failed()
                except ParityError as e:
                    raise ParityError(f"{e} [after the accuracy fallback kept {len(fallback['sites'])} linear "
                                      f"site(s) unquantized, its maximum ({fallback['max_sites']} sites, "
                                      f"{fallback['n_candidates']} candidates): {', '.join(fallback['sites'])}]",
                                      e.report) from None
            r.raise_if_failed()
        seconds["parity"] = round(time.perf_counter() - t, 3)
        progress(f"[ascend] parity at gear {shapes.gears[0]}: {len(reports)} reports passed (fp32 static graphs, "
                 + ("W8A8 QDQ graphs vs eager, fp16 emulation of them)" if quant == "w8a8" else "fp16 emulation)"))
        if quant == "w8a8":
            _write_quant_reports(package_dir, quant_reports, graphs, fp32_dir, model.config)

    agraphs = [atc_mod.atc_graph(package_dir, f"onnx/{n}.onnx", n, keep_fp32=keep[n]) for n in graphs]
    build_section = atc_mod.write_build(package_dir, agraphs, profile, external_weight)
    t = time.perf_counter()
    result = atc_mod.run_atc(package_dir, require_om=require_om, atc=atc)
    seconds["atc"] = round(time.perf_counter() - t, 3)
    progress(f"[ascend] {result.status}")

    base_specs = shapes.base_specs()
    cases = kit.write_golden(model, base_specs, package_dir, seed,
                             graphs={n: p for n, (_, p) in graphs.items() if n in base} if quant == "w8a8" else None)
    kit_path = kit.install_kit(package_dir)
    serve_path = kit.install_kit(package_dir, kit.SERVE_FILE)
    atc_config = json.loads((package_dir / atc_mod.CONFIG).read_text())
    g0 = shapes.gears[0]
    bigger = [n for n in graphs if n not in base]
    verified_here = [
        f"every graph ({len(graphs)}, all gears) passes the ascend profile checker ({profile.describe()})",
        f"at the smallest gear ({g0} cache rows, batch {shapes.batch}: graphs {', '.join(sorted(base))}): the fp32 "
        "static graphs on ONNX Runtime CPU match eager PyTorch (atol 1e-4) on a bucketed prefill, "
        f"decode steps and {gen_tokens}-token greedy generation" + (" (before quantization)" if quant == "w8a8" else ""),
    ]
    if chunked:
        verified_here.append(f"chunked prefill at the smallest gear: {_chunk_text(chunked[0])} vs eager PyTorch's "
                             "one-pass prefill of the same prompt, atol 1e-4" + (" (fp32, before quantization)"
                                                                                 if quant == "w8a8" else ""))
    if quant == "w8a8":
        q = _parity_summary(reports, "quantize-w8a8/")
        verified_here.append("the W8A8 QDQ graphs (fp32 on ONNX Runtime CPU) vs eager fp32 within the quantize-w8a8 "
                             f"budget (cosine/KL/rel euclid; elementwise and greedy tokens reported, not judged): {q}")
        verified_here.append("every QDQ weight dequantizes to the per-channel int8 scheme of passes/quant_w8a8.py "
                             "(tested against an independent numpy implementation)")
        verified_here.append("fp16 emulation of the W8A8 graphs (softmax/RMSNorm/router "
                             f"and the quantization arithmetic kept fp32 as in keep_dtype) {emulation.describe(reports)}")
    else:
        verified_here.append("fp16 emulation (softmax/RMSNorm/router kept fp32 as in keep_dtype) "
                             f"{emulation.describe(reports)}")
    not_verified = ([f"the larger gears' graphs ({', '.join(bigger)}) were exported from the same module and "
                     "checked against the profile, but not run here: at batch "
                     f"{shapes.batch} their caches ({', '.join(f'{m.gear}: {m.cache_bytes / 1e9:.2f} GB' for m in shapes.memory()[1:])} "
                     "per past buffer, fp32) are beyond this CPU's parity runs; they differ from the smallest gear's "
                     "graphs only in the cache length (the RoPE and row-index tables, the mask width)"]
                    if bigger else [])
    not_verified += ["that ATC accepts the graphs and builds the .om (run `bash ascend/build_om.sh`)"
                     if result.status != atc_mod.STATUS_BUILT else "",
                     "the .om's numerics on the NPU (run `python3 ascend/kit/verify_on_device.py`)",
                     "performance on the NPU",
                     "ascend/kit/serve.py with --backend ais_bench (the .om files on the NPU); its gear and chunk "
                     "logic with --backend ort is tested against eager PyTorch in mlamoe's tests (tiny preset), not "
                     "run by this build",
                     "the HBM table: an estimate from the weights and cache sizes (activations and workspace not "
                     "counted), not a measurement on the NPU"]
    if quant == "w8a8":
        from .quant import VERIFICATION
        not_verified = VERIFICATION + not_verified
        not_verified.append("the accuracy of W8A8 on this model's real task: random-weight presets say nothing about it "
                            "(trained-small held-out perplexity for w8a8 is in the repository README)")
    not_verified = [x for x in not_verified if x]
    readme = kit.kit_readme(atc_config, cases, result.status, verified_here, not_verified)
    readme = _gears_readme(shapes) + "\n" + readme
    manifest = {
        "soc_version": profile.soc_version,
        "precision": f"{profile.precision_flag}={profile.precision_mode}",
        "opset": TARGET_OPSET,
        "graphs": {s.name: {"file": f"onnx/{s.name}.onnx", "kind": s.kind, "batch": s.batch, "seq": s.seq,
                            "max_cache": s.max_cache, "gear": s.max_cache, "moe_form": s.moe_form,
                            "verified_here": s.name in base,
                            "checker": checker.summary(graphs[s.name][1])} for s in specs},
        "shapes": {**shapes.to_manifest(),
                   "runtime": {"decode": "the smallest gear G with G >= position + 1",
                               "prefill": f"chunks of at most {shapes.chunk} tokens, each at position = its start, "
                                          "in the smallest gear G >= position + bucket (then the smallest bucket "
                                          "holding the chunk, right-padded)",
                               "gear switch": "copy each past.* tensor into the larger gear's buffer, rows beyond "
                                              "the old gear zero"},
                   "verified_gear": g0},
        "io": {"input_ids": "int32 [B, S]", "position": "int32 [B]",
               "cache": _cache_io(static_cache_spec(model.config))},
        "build": build_section,
        "weights": weights_info,
        "om": {"status": result.status, "files": result.om_files, "log": result.log},
        "kit": {"verify": kit_path, "serve": serve_path, "golden": f"{kit.GOLDEN_DIR}/cases.json"},
        "verification": {"verified_here": verified_here, "not_verified": not_verified},
    }
    if quant == "w8a8":
        from .quant import AMCT_CONVERT_QAT_DOC, AMCT_QAT_DOC
        manifest["quantization"] = {
            "scheme": "w8a8",
            "weights": "int8 per output channel (symmetric, amax/127), DequantizeLinear with axis (opset 13 form)",
            "activations": {"attention (MLA projections)": "static per-tensor int8, QuantizeLinear/DequantizeLinear, "
                                                           "amax from calibration on the fp32 prefill graph",
                            "dense MLP, shared and routed experts": "per-token dynamic int8 (ReduceMax/Div/Round/Clip/Mul)"},
            "not_quantized": ["embeddings", "norms", "lm_head", "router gate", "kv_b_proj (absorbed W_UK/W_UV)"],
            "reports": ["reports/quantization.json", "reports/error_profile.csv"],
            "golden_reference": "the fp32 W8A8 QDQ graphs on ONNX Runtime CPU",
            "ascend_route": {"documented": "AMCT convert_qat_model (QDQ 'QAT' ONNX -> CANN quant model with "
                                          "AscendQuant/AscendDequant) then ATC",
                             "docs": [AMCT_QAT_DOC, AMCT_CONVERT_QAT_DOC],
                             "verified": False},
            "accuracy_fallback": fallback,
            "weights_bytes": {g: {"before": r["weights_bytes_before"], "after": r["weights_bytes_after"],
                                  "linear_before": r["linear_bytes_before"], "linear_after": r["linear_bytes_after"]}
                              for g, r in quant_reports.items()},
        }
        readme = _quant_readme(manifest["quantization"], quant_reports, fallback) + "\n" + readme
    return AscendBuild(profile, specs, reports, result, manifest, readme, seconds, quant, quant_reports, shapes)


CHUNK_STAGE = "export/ascend-static/chunked-prefill"


def chunked_prompt_length(runner: StaticRunner) -> int | None:
    """A prompt longer than the largest bucket C (C + C/2 + 1: two full-or-partial chunks, the last one padded),
    within the smallest gear; None when the gear cannot hold one."""
    C, G = runner.chunk, runner.gears[0]
    L = C + C // 2 + 1
    return L if L <= G and runner.chunk > 1 else None


def chunked_prefill_parity(model, graphs: dict[str, tuple[StaticGraphSpec, Path]], seed: int = 0) -> list[ParityReport]:
    """A prompt longer than the largest bucket, prefilled in chunks by StaticRunner over the smallest gear's fp32
    graphs, vs eager PyTorch's one-pass prefill (logits of every position and the cache rows), budget "export"."""
    import numpy as np
    import torch
    from pipeline.parity import budget_for, compare
    specs = {n: s for n, (s, _) in graphs.items()}
    runner = StaticRunner(ort_sessions({n: p for n, (_, p) in graphs.items()}), specs, model.config)
    L = chunked_prompt_length(runner)
    if L is None:
        return []
    prompt = emulation.make_prompt(model.config, runner.decode_spec.batch, L, seed + 17)
    cache_spec = static_cache_spec(model.config)
    with torch.no_grad():
        ref_logits, ref_cache = model.step(prompt, model.empty_cache(prompt.shape[0], cache_spec.layout),
                                           cache_spec.layout)
    logits, cache = runner.prefill(prompt.numpy())
    ref, act = {"logits": ref_logits.numpy()}, {"logits": logits}
    for i, layer in enumerate(ref_cache):
        for t, a in zip(cache_spec.tensors, layer):
            ref[f"present.{i}.{t.name}"] = a.numpy()
            act[f"present.{i}.{t.name}"] = np.ascontiguousarray(cache[f"past.{i}.{t.name}"][t.rows(0, L)])
    rep = compare(CHUNK_STAGE, ref, act, logits_outputs=["logits"], budget=budget_for("export"))
    chunks = [min(runner.chunk, L - s) for s in range(0, L, runner.chunk)]
    rep.extra["chunks"] = {"prompt_length": L, "chunk": runner.chunk, "chunk_lengths": chunks,
                           "gear": runner.gears[0], "batch": runner.decode_spec.batch}
    return [rep]


def _chunk_text(rep: ParityReport) -> str:
    c = rep.extra["chunks"]
    worst = max(o.max_abs for o in rep.outputs)
    return (f"a {c['prompt_length']}-token prompt (largest bucket {c['chunk']}) run as chunks of "
            f"{' + '.join(map(str, c['chunk_lengths']))} tokens, logits and cache rows max abs {worst:.2e}")


def _gears_readme(shapes: ServingShapes) -> str:
    g0 = shapes.gears[0]
    names = "\n".join(f"| {g:,} | {', '.join(f'`{s.name}`' for s in shapes.gear_specs(g))} | "
                      f"{'yes (parity, golden data)' if g == g0 else 'checker only'} |" for g in shapes.gears)
    hbm = ("no sourced HBM figure for this soc_version: the bound was not checked" if shapes.hbm_bytes is None else
           f"{shapes.soc_version}: {shapes.hbm_bytes / 1e9:.0f} GB HBM ({shapes_mod.HBM_SOURCE}); the build refuses a "
           f"gear whose estimate passes {shapes_mod.HBM_USABLE} of it")
    return f"""## Shapes and gears (batch {shapes.batch}, max cache {shapes.max_cache:,})

Max cache: {shapes.why}. Prefill buckets {', '.join(map(str, shapes.buckets))}; chunk length {shapes.chunk}.

| gear (cache rows M) | graphs | run here |
|---|---|---|
{names}

Every graph is fixed-shape (ATC `--input_shape`, no `--dynamic_dims`); all of them share `onnx/weights.data`.

**Runtime contract for a serving loop.** Keep each cache tensor `past.{{i}}.*` in the buffers of the current gear
`[B, G, .]`. Decode at `position` runs the smallest gear with `G >= position + 1`. A prompt runs in chunks of at most
{shapes.chunk} tokens, each at `position` = its first token's index, in the smallest gear with
`G >= position + bucket` and the smallest bucket holding the chunk (right-padded; read the logits of its real
tokens). When a step needs a larger gear, copy each cache tensor into that gear's buffer (rows beyond the old
gear zero) and continue there; rows past `position` are never read (the mask comes from `position`), so padding
written by a padded chunk is overwritten by the tokens that follow. Feed `present.*` back as the next `past.*`.
`ascend/kit/serve.py` is that loop (numpy; `--backend ort` runs the ONNX graphs on CPU, `--backend ais_bench` the
.om files on the NPU, the latter not run here): `python3 ascend/kit/serve.py --prompt-ids 1,2,3 --max-new-tokens 8`.

**Memory per gear on the NPU** (estimate, {hbm}): one copy of the weights per loaded .om (ATC embeds the weights
in each .om: the shared `onnx/weights.data` saves disk, not device memory) and the past and present cache buffers
(fp32 graph inputs and outputs) at batch {shapes.batch}; activations and workspace not counted.

{shapes_mod.memory_table(shapes)}
"""


def _cache_io(cache) -> str:
    """The manifest's io.cache line: each cache tensor of layer i at its fixed shapes (M rows)."""
    short = {"float32": "fp32", "float16": "fp16"}
    return ", ".join(f"past.{{i}}.{t.name} {short.get(t.dtype, t.dtype)} [{', '.join(map(str, t.symbolic('B', 'M')))}]"
                     for t in cache.tensors) + " -> present.{i}.*"


def _parity_summary(reports: list[ParityReport], prefix: str) -> str:
    """'prefill cosine 0.99x, KL ...; decode-0 ...' for the reports whose stage starts with prefix."""
    parts = []
    for r in reports:
        if not r.stage.startswith(prefix):
            continue
        o = next((o for o in r.outputs if o.name in ("logits", "step_logits")), None)
        if o is None or o.cosine is None:
            continue
        kl = "" if o.kl is None else f", KL {o.kl:.2e}"
        parts.append(f"{r.stage.rsplit('/', 1)[-1]} cosine {o.cosine:.5f}, rel euclid {o.rel_euclid:.4f}{kl}")
    return "; ".join(parts) or "no reports"


def calibrate_on_first_prefill(cfg, graphs: dict[str, tuple[StaticGraphSpec, Path]], seed: int
                               ) -> tuple[str, dict[str, float]]:
    """w8a8's static activation ranges: the first prefill bucket (fp32) on CALIBRATION_PROMPTS seeded prompts (token ids
    uniform over the vocabulary) -> (that graph's name, {activation: amax})."""
    import numpy as np
    import onnx_ir as ir
    from .quant import calibrate_static
    from .static_export import INDEX_DTYPE, zero_inputs
    cal_name = next(n for n, (s, _) in graphs.items() if s.kind == "prefill")
    spec, path = graphs[cal_name]
    rng = np.random.default_rng(seed + 1)
    feeds = []
    for _ in range(CALIBRATION_PROMPTS):
        f = zero_inputs(cfg, spec)
        f["input_ids"] = rng.integers(0, cfg.vocab_size, (spec.batch, spec.seq)).astype(INDEX_DTYPE)
        feeds.append(f)
    return cal_name, calibrate_static(ir.load(path), feeds)


def _quantize_w8a8(model, graphs: dict[str, tuple[StaticGraphSpec, Path]], package_dir: Path, seed: int, progress,
                   base: set[str], gen_tokens: int, routers):
    """Calibrate on the first prefill bucket (fp32), quantize every graph into package_dir/onnx and judge the QDQ
    graphs of the smallest gear (quantize-w8a8/ascend-static vs eager, then their fp16 emulation), with the accuracy
    fallback: while a judgement fails, the next linear site in network order (quant.fallback_candidates) is kept
    unquantized and everything is quantized and judged again, at most quant.FALLBACK_MAX_SITES sites. The budgets are
    the stages' own; the last attempt's reports are returned whether they pass or not (the caller raises).
    -> (graphs, keep lists, {graph: QuantReport dict}, weights section, reports, fallback record)."""
    import onnx_ir as ir
    from . import emulation
    from .quant import FALLBACK_MAX_SITES, fallback_candidates, quant_node_names, quantize_static_graph
    cfg = model.config
    cal_name, calibration = calibrate_on_first_prefill(cfg, graphs, seed)
    spec, path = graphs[cal_name]
    progress(f"[ascend] w8a8: calibrated {len(calibration)} attention activations on {cal_name} "
             f"({CALIBRATION_PROMPTS} seeded prompts of {spec.seq} tokens)")
    candidates = fallback_candidates(ir.load(path))
    kept: list[str] = []
    attempts: list[dict] = []
    while True:
        out, keep, reps = {}, {}, {}
        with WeightsFile(package_dir / "onnx") as weights:  # the QDQ graphs over one weights file
            for name, (spec, p) in graphs.items():
                m = ir.load(p)
                rep = quantize_static_graph(m, cfg, calibration, keep_unquantized=kept)
                dst = weights.save(m, f"{name}.onnx")
                out[name] = (spec, dst)
                keep[name] = list(dict.fromkeys([n for names in fp32_island_nodes(m).values() for n in names]
                                                + quant_node_names(m)))
                reps[name] = rep.to_dict()
                if not attempts:
                    progress(f"[ascend] w8a8 {name}: {rep.summary()}")
                del m
        weights_info = weights_section(weights, "onnx")
        base_graphs = {n: g for n, g in out.items() if n in base}
        checks = emulation.quant_parity(model, {n: g for n, g in graphs.items() if n in base}, base_graphs,
                                        "quantize-w8a8/ascend-static", gen_tokens=gen_tokens, seed=seed,
                                        routers=routers)
        if all(r.passed for r in checks):
            checks += emulation.emulate(emulation.static_reference(base_graphs, cfg), base_graphs, keep,
                                        gen_tokens=gen_tokens, seed=seed, routers=routers)
        failed = [r for r in checks if not r.passed]
        attempts.append({"unquantized": list(kept), "failed": [_failure(r) for r in failed]})
        if not failed or len(kept) >= min(FALLBACK_MAX_SITES, len(candidates)):
            break
        kept.append(candidates[len(kept)])
        progress(f"[ascend] w8a8: {failed[0].stage} failed ({attempts[-1]['failed'][0]['worst']}); accuracy "
                 f"fallback keeps {kept[-1]} unquantized ({len(kept)} of at most {FALLBACK_MAX_SITES}) and re-judges")
    fallback = {"rule": "while the quantize-w8a8 stage or the fp16 emulation of the QDQ graphs misses its budget, "
                        "keep the next linear site in network order unquantized (fp16 under ATC) and judge again",
                "max_sites": FALLBACK_MAX_SITES, "n_candidates": len(candidates), "sites": list(kept),
                "attempts": attempts,
                "passed": not attempts[-1]["failed"]}
    for r in reps.values():
        r["accuracy_fallback"] = list(kept)
    return out, keep, reps, weights_info, checks, fallback


def _failure(r) -> dict:
    """A failed report's stage and reasons (outputs, binding tokens, routing), for the fallback record."""
    reasons = r.failure_reasons()
    return {"stage": r.stage, "worst": "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")}


CALIBRATION_PROMPTS = 4


def _write_quant_reports(package_dir: Path, quant_reports: dict, graphs: dict, fp32_dir: Path, cfg) -> None:
    """reports/quantization.json and the per-linear error profile (CSV + PNG) of the first prefill bucket."""
    import numpy as np
    import onnx_ir as ir
    from pipeline.error_profile import write_error_profile
    from .static_export import INDEX_DTYPE, zero_inputs
    rdir = package_dir / "reports"
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "quantization.json").write_text(json.dumps(quant_reports, indent=2, sort_keys=True) + "\n")
    name = next(n for n, (s, _) in graphs.items() if s.kind == "prefill")
    spec, qpath = graphs[name]
    feeds = zero_inputs(cfg, spec)
    feeds["input_ids"] = np.random.default_rng(7).integers(0, cfg.vocab_size, (spec.batch, spec.seq)).astype(INDEX_DTYPE)
    write_error_profile(ir.load(fp32_dir / f"{name}.onnx"), ir.load(qpath), "w8a8", feeds, rdir / "error_profile.csv")


def _fallback_readme(fallback: dict | None) -> str:
    if not fallback or not fallback["sites"]:
        return ("Accuracy fallback: none needed (the first quantization met the quantize-w8a8 budget and msit's "
                "thresholds in the fp16 emulation).")
    first = fallback["attempts"][0]["failed"]
    why = "; ".join(f"{f['stage']}: {f['worst']}" for f in first[:3])
    return (f"Accuracy fallback: {len(fallback['sites'])} linear site(s) kept unquantized (fp16 under ATC; at most "
            f"{fallback['max_sites']} may be): {', '.join(f'`{x}`' for x in fallback['sites'])}. With every site "
            f"quantized the build failed: {why}. `manifest.json` `quantization.accuracy_fallback.attempts` has every "
            "attempt's failures.")


def _quant_readme(section: dict, quant_reports: dict, fallback: dict | None = None) -> str:
    rows = "\n".join(f"| `{g}` | {r['linear_bytes_before']:,} | {r['linear_bytes_after']:,} | "
                     f"{r['linear_ratio']:.3f} | {r['weights_bytes_before']:,} | {r['weights_bytes_after']:,} |"
                     for g, r in quant_reports.items())
    docs = " and ".join(section["ascend_route"]["docs"])
    return f"""## W8A8 (`--quant w8a8`)

The graphs in `onnx/` are W8A8 QDQ graphs (opset 18): weights {section['weights']}; attention activations
{section['activations']['attention (MLA projections)']}; dense MLP, shared and routed experts: per-token dynamic
int8 as plain ONNX ops. Not quantized: {', '.join(section['not_quantized'])}. `golden/ascend/` holds
{section['golden_reference']} (what the .om must reproduce); `reports/quantization.json` has the bytes per weight
and `reports/error_profile.csv` (+ .png) where the error enters, per linear layer.

{_fallback_readme(fallback)}

| graph | linear bytes fp32 | linear bytes int8 | ratio | all weights before | after |
|---|---|---|---|---|---|
{rows}

**Not verified (no CANN here):** AMCT documents QDQ ONNX models ("QAT models") as input to
`amct_onnx.convert_qat_model`, which writes the CANN quantized model (AscendQuant/AscendDequant, int8 weights)
that ATC then converts ({docs}). Its documented scope is Conv/Gemm/ConvTranspose/single-input MatMul, per-tensor
weights for Gemm/MatMul; these graphs use per-channel weights, per-token dynamic activations and dequantized
expert tables feeding Gather/batched MatMul. Whether convert_qat_model or ATC accepts them, and whether ATC
keeps int8 or folds the dequantized weights to fp16, is unknown until tried on a CANN host
(`bash ascend/build_om.sh check` runs `atc --mode=3` on these graphs as they are).
"""

