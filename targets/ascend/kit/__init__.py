"""The on-device verification kit put into an ascend package.

    write_golden(model, specs, package_dir)  -> golden/ascend/*.npy + golden/ascend/cases.json
    install_kit(package_dir)                 -> ascend/kit/verify_on_device.py (standalone, numpy only)
    install_kit(package_dir, SERVE_FILE)     -> ascend/kit/serve.py (the reference serving loop: gears, chunks)
    kit_readme(config, cases, verified_here, not_verified) -> Markdown for the package README

Golden cases are defined entirely by the eager fp32 model (never by an emulation): for each prefill
bucket a right-padded prompt (the padded positions are ordinary tokens, so eager gives every
output), and a decode step at a position inside the cache, its input cache = eager's, zero-padded
to the fixed length M.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ..static_export import INDEX_DTYPE, StaticGraphSpec, input_names, output_names, static_cache_spec

KIT_FILE = Path(__file__).resolve().parent / "verify_on_device.py"
SERVE_FILE = Path(__file__).resolve().parent / "serve.py"  # the reference serving loop (gears, chunked prefill)
GOLDEN_DIR = "golden/ascend"


def _pad(t: torch.Tensor, tensor, M: int) -> np.ndarray:
    """A cache tensor of T rows -> its fixed-shape form: M rows along the growing axis, rows T.. zero."""
    out = np.zeros(tensor.symbolic(t.shape[0], M), np.float32)
    out[tensor.rows(0, t.shape[tensor.grows])] = t.numpy()
    return out


@torch.no_grad()
def golden_cases(model, specs: list[StaticGraphSpec], seed: int = 0) -> list[dict]:
    """[{name, graph, inputs: {name: array}, outputs: {name: array}}] from the eager model."""
    cfg = model.config
    cache = static_cache_spec(cfg)
    layout = cache.layout
    g = torch.Generator().manual_seed(seed + 1234)
    cases = []
    for spec in specs:
        B, S, M = spec.batch, spec.seq, spec.max_cache
        if spec.kind == "prefill":
            ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
            past = model.empty_cache(B, layout)
            logits, present = model.step(ids, past, layout)
            pos = 0
        else:
            pos = min(M - 1, max(1, M // 2))
            ctx = torch.randint(0, cfg.vocab_size, (B, pos), generator=g)
            _, past = model.step(ctx, model.empty_cache(B, layout), layout)
            ids = torch.randint(0, cfg.vocab_size, (B, 1), generator=g)
            logits, present = model.step(ids, past, layout)
        inputs = {"input_ids": ids.numpy().astype(INDEX_DTYPE), "position": np.full((B,), pos, INDEX_DTYPE)}
        outputs = {"logits": logits.numpy()}
        for prefix, cache_rows, into in (("past", past, inputs), ("present", present, outputs)):
            padded = [tuple(_pad(a, t, M) for t, a in zip(cache.tensors, layer)) for layer in cache_rows]
            into.update(cache.flatten(padded, prefix))
        cases.append({"name": spec.name, "graph": spec.name, "position": pos, "inputs": inputs, "outputs": outputs,
                      "input_order": input_names(cache), "output_order": output_names(cache)})
    return cases


def graph_outputs(cases: list[dict], graphs: dict[str, Path]) -> list[dict]:
    """The cases with their outputs replaced by what `graphs` ({graph name: .onnx}) compute on ORT CPU
    from the same inputs (a quantized package's golden data: what its .om must reproduce)."""
    from ..static_export import ort_sessions
    sessions = ort_sessions({c["graph"]: graphs[c["graph"]] for c in cases})
    out = []
    for c in cases:
        sess = sessions[c["graph"]]
        res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, c["inputs"])))
        out.append({**c, "outputs": {n: res[n] for n in c["outputs"]}})
    return out


def write_golden(model, specs: list[StaticGraphSpec], package_dir: Path, seed: int = 0,
                 graphs: dict[str, Path] | None = None) -> dict:
    """Save the cases as .npy + cases.json; -> the cases.json document (paths package-relative).
    graphs: the expected outputs come from these graphs (fp32, ORT CPU) instead of eager PyTorch."""
    package_dir = Path(package_dir)
    folder = package_dir / GOLDEN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    reference = ("eager PyTorch fp32" if graphs is None else
                 "the package's W8A8 QDQ graphs (onnx/) run in fp32 on ONNX Runtime CPU; inputs from eager PyTorch")
    doc = {"schema": 1, "reference": reference, "thresholds": {"min_cosine": 0.99, "max_rel_euclid": 0.05,
                                                              "max_kl": 0.005}, "cases": []}
    cases = golden_cases(model, specs, seed)
    if graphs is not None:
        cases = graph_outputs(cases, graphs)
    for c in cases:
        entry = {"name": c["name"], "graph": c["graph"], "position": c["position"], "onnx": f"onnx/{c['graph']}.onnx",
                 "om": f"ascend/om/{c['graph']}.om", "input_order": c["input_order"],
                 "output_order": c["output_order"], "logits_outputs": ["logits"], "inputs": {}, "outputs": {}}
        for kind in ("inputs", "outputs"):
            for n, arr in c[kind].items():
                p = folder / f"{c['name']}.{'in' if kind == 'inputs' else 'out'}.{n}.npy"
                np.save(p, np.ascontiguousarray(arr), allow_pickle=False)
                entry[kind][n] = p.relative_to(package_dir).as_posix()
        doc["cases"].append(entry)
    (folder / "cases.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc


def install_kit(package_dir: Path, src: Path = KIT_FILE) -> str:
    dst = Path(package_dir) / "ascend" / "kit" / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(0o755)
    return dst.relative_to(package_dir).as_posix()


def compare_commands(cases_doc: dict) -> list[str]:
    out = []
    for c in cases_doc["cases"]:
        ins = ",".join(c["inputs"][n] for n in c["input_order"])
        out.append(f"msit debug compare -gm {c['onnx']} -om {c['om']} -i {ins} -o ascend/compare/{c['name']}")
    return out


def kit_readme(atc_config: dict, cases_doc: dict, atc_status: str, verified_here: list[str],
               not_verified: list[str]) -> str:
    g_lines = "\n".join(f"| `{g['name']}` | `{g['onnx']}` | `{g['input_shape'] if len(g['input_shape']) < 90 else g['input_shape'][:87] + '...'}` |"
                        for g in atc_config["graphs"])
    cmds = "\n".join(compare_commands(cases_doc))
    layer0 = [n.split(".", 2)[2] for n in cases_doc["cases"][0]["input_order"] if n.startswith("past.0.")]
    cache_names = " / ".join(f"`past.{{i}}.{n}`" for n in layer0)
    here = "\n".join(f"- {v}" for v in verified_here) or "- (nothing)"
    there = "\n".join(f"- {v}" for v in not_verified) or "- (nothing)"
    return f"""## Ascend (CANN / ATC)

.om status: **{atc_status}**. soc_version `{atc_config['soc_version']}`,
`{atc_config['precision']['flag']}={atc_config['precision']['mode']}`.

| graph | ONNX (opset 18, static shapes) | --input_shape |
|---|---|---|
{g_lines}

All graphs keep their weights in one file, `onnx/weights.data` (ONNX external data: each graph's initializers
reference it by offset, initializers of at most 1 KiB stay inside the .onnx). ATC is given each `onnx/<graph>.onnx`
by path and reads the external data beside it, as for any ONNX model past protobuf's 2 GB; keep `onnx/` together.

Build on a host with the CANN toolkit (`source /usr/local/Ascend/ascend-toolkit/set_env.sh`; no NPU needed):

    bash ascend/build_om.sh check   # atc --mode=3 pre-checks only
    bash ascend/build_om.sh         # pre-check + build ascend/om/*.om (logs in ascend/logs/)

Another soc_version: replace `--soc_version=` in `ascend/build_om.sh` (the graphs do not depend on it).

Verify on the NPU (numpy + ais_bench or msit):

    python3 ascend/kit/verify_on_device.py --device 0

It runs each golden case of `golden/ascend/cases.json` through the .om and applies msit's
thresholds: cosine > 0.99, relative Euclidean distance < 0.05, KL < 0.005 (logits).
Per-op debugging (ONNX on CPU vs OM on NPU, layer by layer):

    {cmds.replace(chr(10), chr(10) + '    ')}

Runtime contract: `input_ids` int32 [B, S], `position` int32 [B] (index of input_ids[:, 0] in the
cache), caches {cache_names} fp32 [B, M, .] -> `present.*` (same shape, rows
position..position+S-1 written). Prefill: right-pad the prompt to a bucket, read logits at
len-1, then decode at position = len. Keep position + S <= M.

Verified here:
{here}

Must be verified on the Ascend host:
{there}
"""
