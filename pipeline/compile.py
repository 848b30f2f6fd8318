"""`mlamoe compile`: load -> export -> passes -> quantize -> target -> package, each stage checked.

The target-agnostic part: the package lock and staging, the `load` stage, the base manifest and the
default-quantization choice; everything after `load` is the target's build (targets.get(target).build,
targets/base.py), which gets a pipeline.build.BuildContext. The package is assembled in a temporary folder
beside --out and renamed into place only when every stage has passed its parity budget, so an
interrupted or failed compile leaves nothing at the output path.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import models
import targets
from models.checkpoint import weights_sha256
from models.config import DeepseekConfig
from models.errors import MlamoeError
from models.tokenizer import package_tokenizer
from targets.base import TargetProfile

from . import memory_check
from .build import BuildContext, tokenizer_section
from .package import package_lock, staging, write_failure
from .stages import StageRecord, StageRunner, write_build_log

VERSION = "0.1.0"


class CompileError(MlamoeError):
    pass


def config_sha256(cfg: DeepseekConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_hf_dict(), sort_keys=True).encode()).hexdigest()


def _fp32_weight_bytes(model_spec: str) -> int | None:
    try:
        return 4 * models.load_config(model_spec).param_count()
    except Exception:  # only sizes an error message
        return None


def _compile_package(model_spec: str, target: str, out: str | Path, *, force: bool = False, quant: str | None = None,
                     seed: int = 0, cache_dir: Path | None = None, use_cache: bool = True,
                     layout: str | None = None, gen_tokens: int = 32, progress=None, ignore_memory_check: bool = False,
                     stream: bool = False, archive: bool = True, **target_options) -> Path:
    """archive: also write `out`.tar.gz (the hand-off; it takes about the package's size again on disk).
    stream: compile a checkpoint folder one decoder layer at a time (pipeline/streaming.py), never holding the
    model whole; the memory preflight then estimates that build's peak.
    ignore_memory_check: load even when the memory preflight (pipeline/memory_check.py: the peak estimated
    from the config against the available memory) says the compile will not fit.
    target_options: the target-only options (targets.base.TargetOption: soc, precision, require_om for
    ascend; ranks, redundant, calibrate, int8_accuracy_level for ort-cpu...); one given to a target that does
    not take it is an error naming the targets that do."""
    model_spec = models.resolve(model_spec)
    builder = targets.get(target)
    profile: TargetProfile = builder.profile
    requested_quant = quant
    quant = quant or profile.quant_schemes[0]  # until the checkpoint is loaded: an FP8 one may change it
    if quant not in profile.quant_schemes:
        raise CompileError(f"--quant {quant}: target {target!r} supports {', '.join(profile.quant_schemes)}")
    problems = targets.option_problems(target, quant, target_options)
    if problems:
        raise CompileError(problems[0].message)
    options = {o.name: target_options.get(o.name, o.default) for o in builder.options}
    builder.validate(quant, options)  # a bad option value fails before any work
    out = Path(out)
    if out.exists() and not force:
        raise CompileError(f"{out}: exists; pass --force to replace it (or choose another --out)")
    runner = StageRunner(cache_dir, use_cache, progress)
    started = time.time()
    if stream:
        _check_streamable(model_spec, target, quant)
    _memory_preflight(model_spec, ignore_memory_check, runner, stream)

    # ---- load ---------------------------------------------------------------------------------
    t = time.perf_counter()
    if stream:  # the checkpoint checked whole, its weights read layer by layer by the build
        from models.layer_stream import LayerStream
        family = models.checkpoint_family(Path(model_spec))
        model = LayerStream(model_spec, config=family.config_from_json, module=family.module)
    else:
        model = models.load(model_spec, seed=seed)
        family = models.family_of(model)
    cfg = model.config
    if target in family.target_notes:  # a target the family is not ready for (models.Family.target_notes)
        raise CompileError(f"--target {target}: {family.describe()} does not compile for it yet: "
                           f"{family.target_notes[target]}")
    layout = layout or family.cache_layouts[0]  # the family's default cache layout
    kind = "checkpoint" if Path(model_spec).is_dir() else "preset"
    load = StageRecord("load", {"model": str(model_spec) if kind == "preset" else Path(model_spec).name,
                                "kind": kind, "seed": seed if kind == "preset" else None,
                                "attention": model.attention, **({"stream": True} if stream else {})},
                       {"config": config_sha256(cfg),
                        # streaming: hashed tensor by tensor as the layers are read (pipeline/streaming.py)
                        "weights": "" if stream else weights_sha256(model)})
    fp8_checkpoint = (model.is_fp8() if stream else
                      getattr(model, "checkpoint", None) is not None and bool(model.checkpoint.fp8_names))
    if fp8_checkpoint:
        load.notes.append("FP8 e4m3 weights dequantized to fp32 for the reference, layer by layer" if stream else
                          f"{len(model.checkpoint.fp8_names)} FP8 e4m3 weights dequantized to fp32 for the reference")
    quant, quant_why = _default_quant(requested_quant, quant, fp8_checkpoint, profile)
    if family.quant_schemes is not None and quant not in family.quant_schemes:  # models.Family.quant_schemes
        allowed = ", ".join(family.quant_schemes)
        if requested_quant is not None:
            raise CompileError(f"--quant {quant}: {family.describe()} compiles only with --quant {allowed}: "
                               f"{family.quant_note}")
        quant, quant_why = family.quant_schemes[0], (
            f"no --quant: {family.describe()} compiles only with --quant {allowed} ({family.quant_note}), so the "
            f"weights are packaged as --quant {family.quant_schemes[0]}")
    if stream:  # the scheme an FP8 checkpoint defaults to may be one --stream does not build
        from .streaming import refusal
        why = refusal(target, quant, family)
        if why:
            raise CompileError(f"{why}{' (' + quant_why + ')' if quant_why else ''}; pass --quant none or int8")
    if quant_why:
        load.notes.append(quant_why)
        runner.progress(f"[load] {quant_why}")
    load.notes.append(f"{cfg.param_count():,} parameters; eager reference is fp32 PyTorch")
    tokenizer, tokenizer_note = package_tokenizer(model_spec, cfg.vocab_size)
    load.notes.append(f"tokenizer: {tokenizer_note}")
    load.seconds = round(time.perf_counter() - t, 3)
    runner.records.append(load)
    runner.progress(f"[load] {model_spec}: {cfg.param_count():,} parameters")
    base_manifest = {
        "mlamoe_version": VERSION,
        "model": {"source": load.params["model"], "kind": kind, "seed": load.params["seed"],
                  "config": cfg.to_hf_dict(), "config_sha256": load.inputs["config"],
                  "weights_sha256": load.inputs["weights"], "parameters": cfg.param_count()},
        "toolchain": runner.versions,
        "tokenizer": tokenizer_section(tokenizer, tokenizer_note),
        "quantization_choice": {"requested": requested_quant, "scheme": quant, "fp8_checkpoint": fp8_checkpoint,
                                "why": quant_why or ("--quant " + quant if requested_quant else
                                                     f"the target's default ({quant})")},
    }
    if stream:
        from .build import family_passes_of, skipped_passes_of
        with staging(out, force, archive=archive) as pkg:
            builder.build_streaming(stream=model, profile=profile, out=out, pkg=pkg, runner=runner, load=load,
                            base_manifest=base_manifest, quant=quant, seed=seed, tokenizer=tokenizer, layout=layout,
                            gen_tokens=gen_tokens, pass_names=family_passes_of(family, profile.passes),
                            skipped=skipped_passes_of(family, profile.passes), started=started)
        write_build_log(out, runner, started, archive)
        return out
    with staging(out, force, archive=archive) as pkg:
        builder.build(BuildContext(model=model, profile=profile, out=out, package=pkg, runner=runner, load=load,
                                   base_manifest=base_manifest, quant=quant, seed=seed, started=started,
                                   tokenizer=tokenizer, layout=layout, gen_tokens=gen_tokens, options=options))
    write_build_log(out, runner, started, archive)
    return out


def _check_streamable(model_spec, target: str, quant: str) -> None:
    from .streaming import refusal
    if not Path(model_spec).is_dir():
        raise CompileError(f"--stream reads a checkpoint folder, and {model_spec!r} is a preset: save it first "
                           "(models.save, or `python -m benchmarks.synth_checkpoint` for real dimensions), or drop "
                           "--stream")
    why = refusal(target, quant, models.checkpoint_family(Path(model_spec)))
    if why:
        raise CompileError(why)


def _memory_preflight(model_spec, ignore: bool, runner: StageRunner, stream: bool = False) -> None:
    """Before any weight is read: refuse a model whose compile cannot fit in this machine's memory (one
    MemoryCheckError saying the estimate, the available memory and what to do), unless told to ignore it."""
    cfg = models.load_config(model_spec)  # config.json or the preset: no weights; a bad path fails as load would
    if ignore:
        est, (avail, source) = memory_check.estimate(cfg, stream), memory_check.available_memory()
        have = f"{avail / 2 ** 30:.1f} GiB available ({source})" if avail is not None else source
        runner.progress(f"[preflight] --ignore-memory-check: estimated peak {est.peak_bytes / 2 ** 30:.1f} GiB, {have}")
        return
    runner.progress(f"[preflight] {memory_check.check(model_spec, cfg, stream)}")


def _default_quant(requested: str | None, quant: str, fp8_checkpoint: bool, profile: TargetProfile
                   ) -> tuple[str, str | None]:
    """(scheme, why or None). Without --quant an FP8 checkpoint keeps its own FP8 weights (bytes passed
    through) on a target with an fp8 scheme, and is dequantized (saying so) on one without."""
    if requested is not None or not fp8_checkpoint:
        return quant, None
    if "fp8" in profile.quant_schemes:
        experts = (" (the routed experts excepted: inside com.microsoft.MoE they are dequantized, ORT has no "
                   "FP8 MoE kernel)" if "moe-ort-fused" in profile.passes else "")
        return "fp8", ("FP8 checkpoint and no --quant: packaged as --quant fp8, the checkpoint's own E4M3 bytes and "
                       f"scales passed through{experts}")
    return quant, (f"FP8 checkpoint and no --quant: target {profile.name} has no fp8 scheme (it supports "
                   f"{', '.join(profile.quant_schemes)}), so the FP8 weights are dequantized and packaged as "
                   f"--quant {quant}")


def compile_package(model_spec: str, target: str, out: str | Path, **options) -> Path:
    """Build the package for `target` at `out` (and `out`.tar.gz beside it); see _compile_package for
    the options. Holds the package lock for the whole build (a second compile into the same --out
    fails at once), and turns a full disk or an unwritable folder into one clear error."""
    out = Path(out)
    try:
        with package_lock(out):
            return _compile_package(model_spec, target, out, **options)
    except OSError as e:
        failure = write_failure(e, out, _fp32_weight_bytes(model_spec))
        if failure is None:
            raise
        raise failure from e
