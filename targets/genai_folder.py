"""The ONNX Runtime GenAI folder of an ORT package: what `onnxruntime_genai.Model(folder)` loads.

    genai/prefill.onnx, decode.onnx (+ .onnx.data when large)  the package's two graphs, cache IO in
                                 genai's layout (passes/genai_cache_layout); genai runs prefill.onnx on
                                 the prompt and decode.onnx on every generated token ("decoder-pipeline")
    genai/genai_config.json      targets/genai_config.py
    genai/tokenizer.json, tokenizer_config.json ...  the package's tokenizer files, as they are

The "single" form holds one graph instead, genai/model.onnx (the rewritten prefill graph, type
"decoder"), run for the prompt and every token: one copy of the weights instead of two, slower decode
(the prefill graph's attention is not latent-fused).

Built from the graphs and config in memory (a target builder) or from a finished package folder:

    python -m targets.genai_folder PACKAGE [OUT] [--single]      (OUT defaults to PACKAGE/genai)
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import onnx_ir as ir

from passes.genai_cache_layout import GenaiCacheLayoutPass

from .genai_config import DECODER_FILENAME, write_genai_config

GENAI_DIR = "genai"
FORMS = ("pipeline", "single")
# weights above this go to model.onnx.data (ONNX's 2 GiB protobuf limit; the threshold of the
# package's own graphs, pipeline/export.py)
EXTERNAL_DATA_BYTES = int(1.5 * 2**30)


def _save(model: ir.Model, path: Path) -> list[Path]:
    """Save without ONNX's checker: an ort-cpu package graph is ORT-optimized (contrib ops such as
    SimplifiedLayerNormalization in the default domain), which only ONNX Runtime loads."""
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    data = path.name + ".data" if weights > EXTERNAL_DATA_BYTES else None
    if data is None:
        ir.external_data.load_to_model(model)  # nothing may point at the source package's data file
    ir.save(model, path, external_data=data)
    return [path] + ([path.parent / data] if data else [])


def build_genai_folder(out_dir: str | Path, graphs: dict[str, ir.Model], model_config: dict,
                       tokenizer_files: dict[str, bytes], form: str = "pipeline",
                       max_length: int | None = None) -> list[Path]:
    """Write the genai folder from the package's graphs {"prefill": ..., "decode": ...} (rewritten in
    place: pass copies to keep them). form: "pipeline" (both graphs) or "single" (prefill only).
    -> the files written."""
    if form not in FORMS:
        raise ValueError(f"form {form!r}: one of {', '.join(FORMS)}")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files: list[Path] = []
    names = {"prefill": "prefill.onnx", "decode": "decode.onnx"} if form == "pipeline" else {"prefill": DECODER_FILENAME}
    for graph, filename in names.items():
        GenaiCacheLayoutPass()(graphs[graph])
        files += _save(graphs[graph], out / filename)
    token_gen = ("decode.onnx", graphs["decode"]) if form == "pipeline" else None
    files.append(write_genai_config(out, model_config, graphs["prefill"], filename=names["prefill"],
                                    token_gen=token_gen, max_length=max_length))
    for name, data in sorted(tokenizer_files.items()):
        (out / name).write_bytes(data)
        files.append(out / name)
    return files


def from_package(package_dir: str | Path, out_dir: str | Path | None = None, form: str = "pipeline") -> list[Path]:
    """The genai folder of a finished ort-cpu package (default: PACKAGE/genai)."""
    root = Path(package_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    wanted = ("prefill", "decode") if form == "pipeline" else ("prefill",)
    graphs = {g: ir.load(root / manifest["io"]["graphs"][g]["file"]) for g in wanted}
    tok = manifest.get("tokenizer") or {}
    tokenizer_files = {Path(f).name: (root / f).read_bytes() for f in tok.get("files", [])}
    return build_genai_folder(out_dir or root / GENAI_DIR, graphs, manifest["model"]["config"], tokenizer_files,
                              form=form)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    form = "single" if "--single" in args else "pipeline"
    args = [a for a in args if a != "--single"]
    if not 1 <= len(args) <= 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for f in from_package(*args, form=form):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
