"""mlamoe: compile DeepSeek-class (MLA + MoE) checkpoints into verified deployment packages."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from models.errors import MlamoeError


class _Group(click.Group):
    """Print our errors as one clear line, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MlamoeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except Exception as e:
            if not type(e).__module__.startswith(("onnxruntime", "onnx.")):
                raise
            # ONNX Runtime / onnx refusing a package's graph: a damaged or foreign package, not our bug
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            click.echo(f"error: ONNX Runtime could not load or run the package's graphs ({first}); the package "
                       "is damaged or was not built by this mlamoe: run `mlamoe verify` on it, or rebuild it", err=True)
            sys.exit(2)


def _reads_package(command):
    """For commands that read a package: a manifest.json whose fields were damaged or edited (a key
    missing, a value of the wrong type) is one clear error naming the field, not a traceback."""
    import functools

    @functools.wraps(command)
    def wrapped(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, FileNotFoundError, IsADirectoryError,
                NotADirectoryError) as e:
            if isinstance(e, click.ClickException):
                raise
            what = f"{type(e).__name__}: {e}".strip()
            raise MlamoeError(f"the package's manifest.json lacks or mistypes a field this command reads ({what}); "
                              "it was damaged or edited after packaging: copy the package again or rebuild it") from e
    return wrapped


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="mlamoe")
def main():
    """Compile DeepSeek-class (MLA + MoE) models into verified deployment packages.

    \b
    Typical use:
      mlamoe compile --model small --target ort-cpu --out dist/small-ort-cpu
      mlamoe compile --model small --target ascend --batch 8 --max-cache 131072
      mlamoe verify dist/small-ort-cpu.tar.gz
      mlamoe generate dist/small-ort-cpu --prompt-ids 1,2,3 --max-new-tokens 8 --json
      mlamoe clean                      # what killed compiles left in dist/
    """


def _default_target() -> str:
    from targets import DEFAULT
    return DEFAULT


def _targets_help() -> str:
    from targets import PLANNED, PROFILES
    planned = f" (planned: {', '.join(PLANNED)})" if PLANNED else ""
    return f"deployment target: {', '.join(PROFILES)}{planned}"


@main.command()
@click.option("--model", "model_spec", default="trained-small", show_default=True,
              help="trained-small (the trained checkpoint in models/trained/, whose predictions mean something), "
                   "a random-weight preset (tiny, tiny-v2, small, medium: for tests and benchmarks) or a Hugging "
                   "Face checkpoint folder")
@click.option("--target", default=_default_target(), show_default=True, help=_targets_help())
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="package folder to create (default dist/<model>-<target>); its reproducible .tar.gz and the "
                   "build log NAME.build.json (times, cache hits) are written beside it")
@click.option("--force", is_flag=True, help="replace --out if it exists")
@click.option("--quant", default=None,
              help="quantization scheme (default none; an FP8 checkpoint: fp8 where the target has it): ort-cpu "
                   "none|int8|int4|w8a8|fp8, recommended int4 (MatMulNBits 4-bit block 32 with int8 activations "
                   "in the kernels, attention and dense-layer MLP linears 8-bit, QMoE 4-bit experts: 0.20x the fp32 weights, 2.1-2.6x "
                   "fp32's decode speed measured on small/medium, trained-small perplexity +0.26-0.37%; int8 is weight-only "
                   "and slower than fp32 unless --int8-accuracy-level 4); ort-cuda none (fp16)|int8 (MatMulNBits 8-bit, QMoE int8 experts where CUDA "
                   "takes them, fp16 compute; recommended there: trained-small perplexity -0.003%, top-1 99.5%, "
                   "0.62x fp16's graph bytes, decode as fast as fp16 on an H200)|int4 (MatMulNBits 4-bit block 32 "
                   "with zero points, attention and dense-layer MLP linears 8-bit, QMoE 4-bit experts where CUDA takes them, fp16 "
                   "compute: trained-small perplexity +0.18%, top-1 95.9% on ORT CPU; on an "
                   "H200 it verifies but decodes no faster than fp16 at this size: benchmarks/h200_ort_cuda_int4.json)|fp8 (E4M3 128x128-block weights "
                   "dequantized to fp16 on every run: saves weight memory, not time; experts stay fp16 MoE); ascend none|w8a8 (int8 QDQ graphs; "
                   "AMCT/ATC acceptance unverified here)")
@click.option("--int8-accuracy-level", type=click.IntRange(0, 4), default=None,
              help="--quant int8 on ort-cpu: MatMulNBits/QMoE accuracy_level; 4 quantizes activations to int8 per "
                   "block inside the kernels (faster, not weight-only numerics); default 0")
@click.option("--seed", default=0, show_default=True, help="seed of a preset's weights and of the golden inputs")
@click.option("--no-cache", is_flag=True, help="recompute every stage (default: reuse unchanged stages from "
                                               "$MLAMOE_CACHE or ~/.cache/mlamoe)")
@click.option("--ignore-memory-check", is_flag=True,
              help="compile even when the memory preflight (the peak estimated from the config: the model is held in "
                   "fp32, several copies during export) exceeds the memory available here; the OOM killer may end it")
@click.option("--no-archive", is_flag=True,
              help="do not write OUT.tar.gz beside the package (the archive stores the weights uncompressed: about the "
                   "package's size again on disk)")
@click.option("--stream", is_flag=True,
              help="compile a checkpoint folder one decoder layer at a time (only that layer's weights in memory; "
                   "each layer's graphs judged against the eager layer, end-to-end checks where the package fits in "
                   "memory): DeepSeek-V2/V3 checkpoints, --target ort-cpu, --quant none or int8 (docs/streaming.md)")
@click.option("--soc", default=None, help="Ascend soc_version, e.g. Ascend910B3 (ascend target only; default Ascend910B3)")
@click.option("--precision", default=None, help="Ascend precision mode (default mixed_float16; e.g. force_fp16)")
@click.option("--require-om", is_flag=True, help="ascend: fail if atc is not installed (default: package without .om)")
@click.option("--batch", type=int, default=None,
              help="ascend: sequences every graph runs at once (default 1)")
@click.option("--max-cache", type=int, default=None,
              help="ascend: the longest cache (tokens) the package serves; default the model's "
                   "max_position_embeddings, capped by the soc's HBM estimate (printed; docs/ascend.md)")
@click.option("--cache-gears", default=None,
              help="ascend: decode (and chunk-prefill) graphs at these cache lengths, e.g. 4096,32768,131072, the "
                   "last = --max-cache; default 4096/32768/131072 below --max-cache plus --max-cache; one shared "
                   "weights file; verified here at the smallest gear")
@click.option("--prefill-buckets", default=None,
              help="ascend: prefill graph lengths, e.g. 16,64,256 (the default); longer prompts run in chunks of "
                   "the largest")
@click.option("--ranks", type=int, default=None,
              help="ort-cpu: also write expert-parallel graphs for N ranks (expert_parallel/, run with torchrun)")
@click.option("--redundant", type=int, default=0, show_default=True, help="with --ranks: extra replicas of hot experts")
@click.option("--genai", type=click.Choice(["pipeline", "single", "none"]), default=None,
              help="ort-cpu: the onnxruntime-genai files, in onnx/ over its one weights file (docs/genai.md; "
                   "onnxruntime_genai.Model('PACKAGE/onnx')): pipeline (default; the prefill graph on the prompt, the "
                   "latent-fused decode graph per token), single (one graph: slower decode) or none")
@click.option("--decode-gears", default=None,
              help="ort-cuda (fp16): also build fixed-shape decode gears at these cache lengths, e.g. 1024,8192,32768: "
                   "one graph per gear over a preallocated cache written in place, static-gather MoE, bound once "
                   "through IOBinding and captured as a CUDA graph (docs/ort-cuda.md); one shared weights file")
def compile(model_spec, target, out, force, quant, int8_accuracy_level, seed, no_cache, ignore_memory_check, no_archive, stream, soc,
            precision, require_om, batch, max_cache, cache_gears, prefill_buckets, ranks, redundant, genai, decode_gears):
    """Build a verified package: load, export, passes, quantize, target, package."""
    import targets
    from .compile import compile_package
    given = {"soc": soc, "precision": precision, "require_om": require_om, "ranks": ranks, "redundant": redundant,
             "int8_accuracy_level": int8_accuracy_level, "genai": genai, "decode_gears": decode_gears,
             "batch": batch, "max_cache": max_cache, "cache_gears": cache_gears, "prefill_buckets": prefill_buckets}
    # options the target does not take at all (the --quant-dependent ones: compile_package, once --quant is known)
    for problem in targets.option_problems(target, quant, given) if target in targets.TARGETS else ():
        if not problem.needs_quant:
            raise click.BadParameter(problem.message, param_hint=problem.flag)
    out = out or Path("dist") / f"{Path(model_spec).name}-{target}"
    path = compile_package(model_spec, target, out, force=force, quant=quant, seed=seed, use_cache=not no_cache,
                           ignore_memory_check=ignore_memory_check, stream=stream, archive=not no_archive, **given)
    archive = "none (--no-archive)" if no_archive else path.parent / (path.name + ".tar.gz")
    click.echo(f"package: {path}\narchive: {archive}")


@main.command()
@click.argument("package", type=click.Path(exists=True, path_type=Path))
@click.option("--hashes-only", is_flag=True, help="check file hashes only, do not re-run golden data")
@_reads_package
def verify(package, hashes_only):
    """Re-check every file's sha256, then re-run the golden data where the runtime is present."""
    from .verify import verify_full
    ok, lines = verify_full(package, hashes_only=hashes_only)
    for line in lines:
        click.echo(line)
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("package", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
@_reads_package
def inspect(package, as_json):
    """Show what a package holds: model, target, stages with parity, IO, files."""
    from .package import open_package
    root, manifest, cleanup = open_package(package)
    try:
        if as_json:
            click.echo(json.dumps(manifest, indent=2, sort_keys=True))
            return
        from .inspect import describe
        from .stages import read_build_log
        click.echo(describe(manifest, read_build_log(package) if package.is_dir() else None))
    finally:
        cleanup()


@main.command()
@click.argument("source")
@click.option("--prompt", default=None, help="prompt text, encoded with the package's (or checkpoint's) tokenizer")
@click.option("--chat", is_flag=True, help="with --prompt: wrap it as one user message with the tokenizer's "
                                           "chat template")
@click.option("--prompt-ids", default=None, help="comma-separated token ids, e.g. 1,2,3 (instead of --prompt)")
@click.option("--max-new-tokens", default=16, show_default=True)
@click.option("--seed", default=0, show_default=True, help="seed of a preset's weights")
@click.option("--json", "as_json", is_flag=True,
              help='print {"tokens": [...], "step_logits": [[...], ...]} (and "text" with --prompt)')
def generate(source, prompt, chat, prompt_ids, max_new_tokens, seed, as_json):
    """Greedy generation from a PACKAGE (its runtime) or a preset / checkpoint folder (eager).

    With --prompt it prints the generated text (the continuation only), with --prompt-ids the ids."""
    if (prompt is None) == (prompt_ids is None):
        raise click.BadParameter("give exactly one of --prompt TEXT or --prompt-ids IDS", param_hint="--prompt")
    if chat and prompt is None:
        raise click.BadParameter("--chat applies to --prompt", param_hint="--chat")
    p = Path(source)
    is_package = (p / "manifest.json").is_file() or p.name.endswith(".tar.gz")
    tokenizer = None
    if prompt is not None:
        from models import tokenizer as tk
        if is_package:
            tokenizer = _package_tokenizer(p)
        else:
            import models
            files, note = tk.package_tokenizer(source, models.load_config(source).vocab_size)
            if not files:
                raise tk.TokenizerError(f"{source}: {note}; use --prompt-ids")
            tokenizer = tk.from_files(files, str(source))
        tok, tok_config = tokenizer
        text = tk.apply_chat_template(tok_config, prompt) if chat else prompt
        ids = tok.encode(text, add_special_tokens=False).ids
        if not ids:
            raise click.BadParameter("the prompt encodes to no tokens", param_hint="--prompt")
    else:
        try:
            ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"{prompt_ids!r}: expected comma-separated integers", param_hint="--prompt-ids")
        if not ids:
            raise click.BadParameter("needs at least one token id", param_hint="--prompt-ids")
    if is_package:
        tokens, logits = _generate_from_package(p, ids, max_new_tokens)
    else:
        import models
        model = models.load(source, seed=seed)
        _check_ids(ids, model.config.vocab_size)
        t, lg = models.greedy_generate(model, ids, max_new_tokens)
        tokens, logits = t[0].tolist(), lg[0].numpy()
    text_out = tokenizer[0].decode(tokens, skip_special_tokens=False) if tokenizer else None
    if as_json:
        out = {"tokens": tokens, "step_logits": [[float(v) for v in row] for row in logits]}
        if text_out is not None:
            out["text"] = text_out
        click.echo(json.dumps(out))
    else:
        click.echo(text_out if text_out is not None else " ".join(map(str, tokens)))


@main.command()
@click.option("--model", "model_spec", default="small", show_default=True, help="preset or checkpoint folder")
@click.option("--target", default=_default_target(), show_default=True, help="target to compile and time")
@click.option("--package", type=click.Path(exists=True, path_type=Path), default=None,
              help="time an existing package instead of compiling one")
@click.option("--threads", default=2, show_default=True, help="intra-op threads for ORT and torch alike")
@click.option("--cache-lengths", default="128,1024,4096", show_default=True, help="decode cache lengths")
@click.option("--suite", type=click.Choice(["package", "latent-kv", "moe", "quant", "v32-sparse", "cache-table", "all"]),
              default="package", show_default=True,
              help="package: package vs eager; latent-kv: (a) expanded / (b) latent / (c) fused decode; "
                   "moe: dynamic vs ort-fused vs static-gather MoE (decode step, and the MoE layers alone vs the memory floor); quant: ort-cpu decode graph fp32 vs int8 (MatMulNBits + QMoE); "
                   "v32-sparse: a V3.2 model's decode (default small-v32), top-k sparse vs dense MLA, same weights, at 8K/32K/128K; "
                   "cache-table: cache sizes at DeepSeek-V3 671B dims")
@click.option("--json", "as_json", is_flag=True, help="print the raw results as JSON")
def bench(model_spec, target, package, threads, cache_lengths, suite, as_json):
    """Time prefill and decode (package vs eager, attention forms, MoE forms, int8), one run per suite."""
    from benchmarks import bench as b
    results, texts = {}, []
    lengths = [int(x) for x in cache_lengths.split(",")]
    if suite in ("package", "all"):
        results["package"] = r = b.run_bench(model_spec, target, threads, lengths, package)
        texts.append(b.format_bench(r))
    if suite in ("latent-kv", "all"):
        from benchmarks.latent_kv import bench_decode_forms, format_table
        kv_lengths = lengths if cache_lengths != "128,1024,4096" else [1024, 8192, 32768]
        results["latent_kv"] = r = bench_decode_forms(model_spec, kv_lengths, threads)
        texts.append(format_table(r))
    if suite in ("moe", "all"):
        from benchmarks.moe import bench_moe_decode, format_bench_moe
        results["moe"] = r = bench_moe_decode(model_spec, threads)
        texts.append(format_bench_moe(r))
    if suite in ("quant", "all"):
        from benchmarks.quant import bench_int8_decode, format_bench_quant
        results["quant"] = r = bench_int8_decode(model_spec, threads)
        texts.append(format_bench_quant(r))
    if suite == "v32-sparse":  # not in "all": it needs a V3.2 model
        from benchmarks.v32_sparse import bench_v32_sparse, format_table as format_v32
        v32_lengths = lengths if cache_lengths != "128,1024,4096" else [8192, 32768, 131072]
        v32_model = "small-v32" if model_spec == "small" else model_spec  # --model's default is V3's `small`
        results["v32_sparse"] = r = bench_v32_sparse(v32_model, v32_lengths, threads)
        texts.append(format_v32(r))
    if suite in ("cache-table", "latent-kv", "all"):
        from models import preset_config
        table = b.cache_table(preset_config("deepseek-v3-671b"))
        results["cache_table_671b"] = table
        texts.append(b.format_cache_table(table, "DeepSeek-V3 671B"))
    click.echo(json.dumps(results, indent=2, sort_keys=True) if as_json else "\n\n".join(texts))


@main.command()
@click.option("--model", "model_spec", required=True,
              help="preset (incl. config-only deepseek-v3-671b, deepseek-v2-lite) or checkpoint folder")
@click.option("--ranks", type=int, required=True, help="expert-parallel ranks (devices)")
@click.option("--redundant", type=int, default=0, show_default=True, help="extra replicas of the hottest experts")
@click.option("--stats", "stats_path", default=None, help="routing statistics (.npy or routing_stats.json); "
                                                          "default: uniform expert load")
@click.option("--bytes-per-param", default=2, show_default=True, help="weight bytes per parameter (bf16 = 2)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write partition.json here")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def plan(model_spec, ranks, redundant, stats_path, bytes_per_param, out, as_json):
    """Expert-parallel partition plan and per-device memory, from config shapes alone."""
    from parallel.partition import plan_command, save_plan
    p, text = plan_command(model_spec, ranks, redundant, stats_path, bytes_per_param=bytes_per_param)
    if out:
        save_plan(p, out)
    click.echo(json.dumps(p, indent=1, sort_keys=True) if as_json else text)


@main.command()
@click.argument("folders", nargs=-1, type=click.Path(path_type=Path))
@click.option("--cache", "clean_cache", is_flag=True, help="also remove unfinished entries of the stage cache "
                                                              "($MLAMOE_CACHE or ~/.cache/mlamoe)")
def clean(folders, clean_cache):
    """Remove what killed builds left: staging/scratch folders and temporary archives in FOLDERS
    (default dist), and with --cache unfinished stage-cache entries. Live builds are left alone."""
    from .package import clean_stale
    from .stages import clean_cache_tmp, default_cache_dir
    removed = [p for f in (folders or (Path("dist"),)) for p in clean_stale(f)]
    if clean_cache:
        removed += clean_cache_tmp(default_cache_dir())
    for p in removed:
        click.echo(f"removed {p}")
    click.echo(f"{len(removed)} left-over{'s' if len(removed) != 1 else ''} removed")


@_reads_package
def _package_tokenizer(path: Path):
    from models import tokenizer as tk
    from .package import open_package
    root, manifest, cleanup = open_package(path)
    try:
        if not (root / "tokenizer" / "tokenizer.json").is_file():
            why = (manifest.get("tokenizer") or {}).get("source", "built before packages carried tokenizers")
            raise tk.TokenizerError(f"{path}: the package has no tokenizer ({why}); use --prompt-ids")
        return tk.load(root / "tokenizer", manifest["io"]["vocab_size"])
    finally:
        cleanup()


@_reads_package
def _generate_from_package(path: Path, prompt: list[int], max_new_tokens: int):
    from runtime.ort_runtime import PackageRuntime
    from .package import open_package
    root, manifest, cleanup = open_package(path)
    try:
        _check_ids(prompt, manifest["io"]["vocab_size"])
        tokens, logits = PackageRuntime(root, manifest=manifest).generate(prompt, max_new_tokens)
    finally:
        cleanup()
    return tokens[0].tolist(), logits[0]


def _check_ids(prompt, vocab):
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise click.BadParameter(f"token id(s) {bad} outside the vocabulary [0, {vocab})", param_hint="--prompt-ids")


if __name__ == "__main__":
    main()
