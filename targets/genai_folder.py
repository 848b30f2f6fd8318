"""The ONNX Runtime GenAI folder of an ORT package: what `onnxruntime_genai.Model(folder)` loads.

    genai/model.onnx (+ model.onnx.data when large)  the prefill graph, cache IO in genai's layout
                                                      (passes/genai_cache_layout); genai runs this one
                                                      graph for the prompt and for every later token
    genai/genai_config.json                           targets/genai_config.py
    genai/tokenizer.json, tokenizer_config.json ...   the package's tokenizer files, as they are

Built from the graph and config in memory (a target builder) or from a finished package folder:

    python -m targets.genai_folder PACKAGE [OUT]      (OUT defaults to PACKAGE/genai)
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


def build_genai_folder(out_dir: str | Path, prefill: ir.Model, model_config: dict,
                       tokenizer_files: dict[str, bytes], max_length: int | None = None) -> list[Path]:
    """Write the genai folder; `prefill` is rewritten in place (pass a copy to keep it). -> files written."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    GenaiCacheLayoutPass()(prefill)
    files = _save(prefill, out / DECODER_FILENAME)
    files.append(write_genai_config(out, model_config, prefill, max_length=max_length))
    for name, data in sorted(tokenizer_files.items()):
        (out / name).write_bytes(data)
        files.append(out / name)
    return files


def from_package(package_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """The genai folder of a finished ort-cpu package (default: PACKAGE/genai)."""
    root = Path(package_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    prefill = ir.load(root / manifest["io"]["graphs"]["prefill"]["file"])
    tok = manifest.get("tokenizer") or {}
    tokenizer_files = {Path(f).name: (root / f).read_bytes() for f in tok.get("files", [])}
    return build_genai_folder(out_dir or root / GENAI_DIR, prefill, manifest["model"]["config"], tokenizer_files)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for f in from_package(*args):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
