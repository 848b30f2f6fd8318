"""The ONNX Runtime GenAI folder of an ORT package: what `onnxruntime_genai.Model(folder)` loads.

    genai/prefill.onnx, decode.onnx  the package's two graphs, cache IO in genai's layout
                                 (passes/genai_cache_layout); genai runs prefill.onnx on the prompt and
                                 decode.onnx on every generated token ("decoder-pipeline")
    genai/weights.data           their weights, one copy shared by both (pipeline/weights_file.py; the folder's
                                 own: ONNX Runtime reads external data only from the graph's folder)
    genai/genai_config.json      targets/genai_config.py
    genai/tokenizer.json, tokenizer_config.json ...  the package's tokenizer files, as they are

The "single" form holds one graph instead, genai/model.onnx (the rewritten prefill graph, type
"decoder"), run for the prompt and every token: one copy of the weights instead of two, slower decode
(the prefill graph's attention is not latent-fused).

check_golden() re-runs the package's golden cases and greedy tokens through the folder's graphs on
ONNX Runtime (bound by genai_config.json's names; onnxruntime-genai itself is not needed) and
manifest_section() describes the folder for the package manifest.

Built from the graphs and config in memory (a target builder) or from a finished package folder:

    python -m targets.genai_folder PACKAGE [OUT] [--single]      (OUT defaults to PACKAGE/genai)
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

from passes.genai_cache_layout import METADATA_KEY, GenaiCacheLayoutPass, join_state, split_state

from pipeline.weights_file import WEIGHTS_FILE, WeightsFile
from runtime.ort_runtime import PackageRuntime, verify_golden

from .genai_config import DECODER_FILENAME, write_genai_config

GENAI_DIR = "genai"
FORMS = ("pipeline", "single")


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
    names = {"prefill": "prefill.onnx", "decode": "decode.onnx"} if form == "pipeline" else {"prefill": DECODER_FILENAME}
    # the graphs over one weights file of the folder's own (ONNX Runtime refuses external data outside the
    # graph's folder, so genai/ cannot reference the package's onnx/weights.data)
    with WeightsFile(out) as weights:
        for graph, filename in names.items():
            GenaiCacheLayoutPass()(graphs[graph])
            weights.save(graphs[graph], filename, check=False)  # ORT-optimized graphs: contrib ops
    files: list[Path] = list(weights.files)
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


def graph_files(genai_dir: str | Path) -> dict[str, str]:
    """{"prefill": file, "decode": file} that genai runs for the prompt / the generated tokens, from
    the folder's genai_config.json (the single form: the same file for both)."""
    dec = json.loads((Path(genai_dir) / "genai_config.json").read_text())["model"]["decoder"]
    if "pipeline" not in dec:
        return {"prefill": dec["filename"], "decode": dec["filename"]}
    models = [m for element in dec["pipeline"] for m in element.values()]
    pick = {g: [m["filename"] for m in models if m["run_on_prompt" if g == "prefill" else "run_on_token_gen"]]
            for g in ("prefill", "decode")}
    if any(len(v) != 1 for v in pick.values()):
        raise ValueError(f"{genai_dir}: want one pipeline model on the prompt and one on the tokens, got {pick}")
    return {g: v[0] for g, v in pick.items()}


class GenaiGraphsRuntime(PackageRuntime):
    """The package runtime over a genai folder's graphs: the cache state fed and read under the names the
    folder's genai_config.json gives (what genai binds), in the package's own past.* / present.* terms
    outside."""

    def __init__(self, package_dir: str | Path, genai_dir: str | Path, providers=None, manifest: dict | None = None):
        import onnx
        genai = Path(genai_dir).resolve()
        files = {g: str(genai / f) for g, f in graph_files(genai).items()}
        super().__init__(package_dir, providers=providers, graphs=files, manifest=manifest)
        dec = json.loads((genai / "genai_config.json").read_text())["model"]["decoder"]
        self.layouts = {}
        for g, f in files.items():
            meta = {p.key: p.value for p in onnx.load(f, load_external_data=False).metadata_props}
            layout = json.loads(meta[METADATA_KEY])
            # bind by the config's names, as genai does (a config that names them wrongly must fail the check)
            layout.update(key_names=dec["inputs"]["past_key_names"], value_names=dec["inputs"]["past_value_names"],
                          present_key_names=dec["outputs"]["present_key_names"],
                          present_value_names=dec["outputs"]["present_value_names"])
            self.layouts[g] = layout

    def outputs(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        past = {n: v for n, v in feeds.items() if n != "input_ids"}
        got = super().outputs(graph, {"input_ids": feeds["input_ids"], **split_state(self.layouts[graph], past)})
        return {"logits": got["logits"], **join_state(self.layouts[graph], got)}


def check_golden(package_dir: str | Path, genai_dir: str | Path, providers=None, manifest: dict | None = None
                 ) -> list[str]:
    """Re-run the package's golden cases and greedy tokens through the genai folder's graphs on ONNX
    Runtime (runtime/ort_runtime.py's verify_golden over GenaiGraphsRuntime); -> failures, [] when every
    output is within the package's recorded tolerance (Polygraphy's rule) and the greedy tokens are equal.
    Needs onnxruntime only, not onnxruntime-genai. manifest: the package's (default: read from the folder; a
    builder passes the one it is about to write)."""
    return verify_golden(package_dir, runtime=GenaiGraphsRuntime(package_dir, genai_dir, providers, manifest))


def manifest_section(package_dir: str | Path, genai_dir: str | Path) -> dict:
    """The manifest's "genai" entry for a genai folder inside the package (its files are hashed in
    "files" like every file): where it is, its form, the graphs genai runs, the cache layout."""
    root, genai = Path(package_dir), Path(genai_dir)
    cfg = json.loads((genai / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    rel = genai.relative_to(root).as_posix()
    return {"dir": rel, "config": f"{rel}/genai_config.json", "type": cfg["model"]["type"],
            "weights": f"{rel}/{WEIGHTS_FILE}",
            "graphs": {g: f"{rel}/{f}" for g, f in graph_files(genai).items()},
            "cache": {"past_key_names": dec["inputs"]["past_key_names"],
                      "past_value_names": dec["inputs"]["past_value_names"],
                      "shape": ["batch", dec["num_key_value_heads"], "seq", dec["head_size"]],
                      "layout": "per layer, the state row (every past.{i}.* side by side) split in two halves: "
                                "key = first, value = second (passes/genai_cache_layout.py)"},
            "runtime": "onnxruntime-genai==0.18.0, in its own environment (docs/genai.md)"}


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
