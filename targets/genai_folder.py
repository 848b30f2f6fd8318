"""The ONNX Runtime GenAI files of an ORT package: what `onnxruntime_genai.Model(folder)` loads.

In an ort-cpu package they live in onnx/ itself, beside the package's graphs, so that they share its one
weights file (ONNX Runtime reads external data only from a graph's own folder, and onnxruntime-genai 0.18
refuses a graph path with ".." in it: docs/genai.md); `onnxruntime_genai.Model("PACKAGE/onnx")`:

    onnx/genai_prefill.onnx, genai_decode.onnx  the package's two graphs, cache IO in genai's layout
                                 (passes/genai_cache_layout); genai runs genai_prefill.onnx on the prompt and
                                 genai_decode.onnx on every generated token ("decoder-pipeline")
    onnx/weights.data            the package's weights file, continued (WeightsFile.reopen): the rewritten
                                 graphs' weights are the package graphs' bytes, referenced, not stored again
    onnx/genai_config.json       targets/genai_config.py
    onnx/tokenizer.json, tokenizer_config.json ...  the package's tokenizer files, as they are (genai reads
                                 them from the config's folder)
    onnx/prefill.onnx, decode.onnx  the package's own graphs: genai loads only the files its config names

The "single" form holds one graph instead, genai_model.onnx (the rewritten prefill graph, type "decoder"),
run for the prompt and every token: slower decode (the prefill graph's attention is not latent-fused).

Built elsewhere (a folder of its own, from_package / the command below), the same files with a weights file
of the folder's own: a second copy of the weights, outside the package.

check_golden() re-runs the package's golden cases and greedy tokens through the folder's graphs on
ONNX Runtime (bound by genai_config.json's names; onnxruntime-genai itself is not needed) and
manifest_section() describes the files for the package manifest.

Built from the graphs and config in memory (a target builder) or from a finished package folder:

    python -m targets.genai_folder PACKAGE OUT [--single]      (OUT: a new folder, its own weights file)
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

from .genai_config import DECODER_FILENAME, GENAI_CONFIG, write_genai_config

FORMS = ("pipeline", "single")
GRAPH_FILES = {"prefill": "genai_prefill.onnx", "decode": "genai_decode.onnx"}  # the pipeline form's


def genai_filenames(form: str) -> dict[str, str]:
    """{"prefill": file[, "decode": file]}: the genai graphs' names, which never clash with a package's
    onnx/prefill.onnx, onnx/decode.onnx (the genai graphs live beside them in an ort-cpu package)."""
    if form not in FORMS:
        raise ValueError(f"form {form!r}: one of {', '.join(FORMS)}")
    return dict(GRAPH_FILES) if form == "pipeline" else {"prefill": DECODER_FILENAME}


def build_genai_folder(out_dir: str | Path, graphs: dict[str, ir.Model], model_config: dict,
                       tokenizer_files: dict[str, bytes], form: str = "pipeline",
                       max_length: int | None = None, weights: WeightsFile | None = None) -> list[Path]:
    """Write the genai files from the package's graphs {"prefill": ..., "decode": ...} (rewritten in
    place: pass copies to keep them). form: "pipeline" (both graphs) or "single" (prefill only).

    weights: an open WeightsFile whose folder is out_dir (an ort-cpu package's onnx/, reopened after the
    package graphs: WeightsFile.reopen): the genai graphs, config and tokenizer files are written beside the
    package's files, their weights into the same file (bytes already there referenced, not stored again), and
    no file that is already there may be overwritten. Without it out_dir is made afresh (removed if it
    exists) with a weights file of its own. -> the files written (the weights file last)."""
    names = genai_filenames(form)
    out = Path(out_dir)
    if weights is None:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    elif weights.folder.resolve() != out.resolve():
        raise ValueError(f"{out}: the genai files go beside their weights file ({weights.folder})")
    written = [*names.values(), GENAI_CONFIG, *sorted(tokenizer_files)]
    clash = sorted(n for n in written if (out / n).exists())
    if clash:  # only where out is shared (a fresh folder is empty)
        raise ValueError(f"{out}: the genai files {clash} would overwrite files already there")
    for graph in names:  # every rewrite before anything is written: a cache genai cannot take leaves no file
        GenaiCacheLayoutPass()(graphs[graph])
    own = weights is None
    if own:
        weights = WeightsFile(out)
    try:
        files = [weights.save(graphs[graph], filename, check=False)  # ORT-optimized graphs: contrib ops
                 for graph, filename in names.items()]
    finally:
        if own:
            weights.close()
    token_gen = (names["decode"], graphs["decode"]) if form == "pipeline" else None
    files.append(write_genai_config(out, model_config, graphs["prefill"], filename=names["prefill"],
                                    token_gen=token_gen, max_length=max_length))
    for name, data in sorted(tokenizer_files.items()):
        (out / name).write_bytes(data)
        files.append(out / name)
    return files + [weights.path]


def from_package(package_dir: str | Path, out_dir: str | Path, form: str = "pipeline") -> list[Path]:
    """A genai folder of its own (out_dir, made afresh; its own weights file) from a finished ort-cpu package:
    for a package compiled with --genai none, or the other form. The package is not changed (a compile writes
    its genai files into onnx/ itself)."""
    root = Path(package_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    wanted = ("prefill", "decode") if form == "pipeline" else ("prefill",)
    graphs = {g: ir.load(root / manifest["io"]["graphs"][g]["file"]) for g in wanted}
    tok = manifest.get("tokenizer") or {}
    tokenizer_files = {Path(f).name: (root / f).read_bytes() for f in tok.get("files", [])}
    out = Path(out_dir)
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise ValueError(f"{out}: inside the package {root}, whose files its manifest hashes; give a folder outside it")
    return build_genai_folder(out, graphs, manifest["model"]["config"], tokenizer_files,
                              form=form)


def graph_files(genai_dir: str | Path) -> dict[str, str]:
    """{"prefill": file, "decode": file} that genai runs for the prompt / the generated tokens, from
    the folder's genai_config.json (the single form: the same file for both)."""
    dec = json.loads((Path(genai_dir) / GENAI_CONFIG).read_text())["model"]["decoder"]
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
        dec = json.loads((genai / GENAI_CONFIG).read_text())["model"]["decoder"]
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


def manifest_section(package_dir: str | Path, genai_dir: str | Path, files: list[Path] | None = None) -> dict:
    """The manifest's "genai" entry for genai files inside the package (hashed in "files" like every file):
    the folder genai loads, its form, the graphs genai runs, the shared weights file, the cache layout, and
    `files` (build_genai_folder's list, default: the config, the graphs and the weights file) as paths
    relative to the package: what in the folder belongs to genai."""
    root, genai = Path(package_dir), Path(genai_dir)
    cfg = json.loads((genai / GENAI_CONFIG).read_text())
    dec = cfg["model"]["decoder"]
    rel = genai.relative_to(root).as_posix()
    graphs = graph_files(genai)
    if files is None:
        files = [genai / GENAI_CONFIG, *(genai / f for f in dict.fromkeys(graphs.values())), genai / WEIGHTS_FILE]
    return {"dir": rel, "config": f"{rel}/{GENAI_CONFIG}", "type": cfg["model"]["type"],
            "weights": f"{rel}/{WEIGHTS_FILE}",
            "files": sorted(Path(f).resolve().relative_to(root.resolve()).as_posix() for f in files),
            "graphs": {g: f"{rel}/{f}" for g, f in graphs.items()},
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
    if len(args) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for f in from_package(*args, form=form):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
