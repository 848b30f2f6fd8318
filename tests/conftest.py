"""Shared test setup. Keep it small: module-specific fixtures belong in their test files."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # makes `import hf_reference` work from every test file

# The models under test are tiny: one intra-op thread is as fast alone and far faster when the
# 2-core CI machine is shared (OpenMP threads spin against each other). MLAMOE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MLAMOE_TEST_THREADS", "1")))

# The transformers reference configurations the models/ tests run against (tests/hf_reference.py).
# v3: sigmoid + noaux_tc router, non-zero e_score_correction_bias, 4 groups keep 2, q_lora_rank set, YaRN.
# v2: softmax + group_limited_greedy router, 4 groups keep 2, plain q_proj, YaRN with mscale 0.707.
# v2-greedy: as v2 with the plain greedy router (config.json has n_group/topk_group null).
HF_KINDS = {
    "v3": ("v3", {}),
    "v2": ("v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}),
    "v2-greedy": ("v2", {}),
}


@pytest.fixture(scope="session")
def stage_cache(tmp_path_factory):
    """One stage cache for the compile tests of a run: an unchanged export is computed once, not per module
    (every build still re-runs its parity checks on what the cache returns)."""
    return tmp_path_factory.mktemp("stage-cache")


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """{kind: (transformers model in eval mode, folder it was save_pretrained into)}, built once.

    Tests must treat both as read-only (copy the folder before corrupting it).
    """
    import hf_reference
    out = {}
    for kind, (family, over) in HF_KINDS.items():
        model = hf_reference.hf_model(family, **over)
        path = tmp_path_factory.mktemp(f"hf_{kind}")
        model.save_pretrained(path)
        out[kind] = (model, path)
    return out


def tiny_fused_graphs(moe_pass, model_name: str = "tiny", simplify: bool = False) -> tuple:
    """(the preset `model_name`, {graph: serialized proto}) after export, latent-kv fusion and the MoE pass
    `moe_pass()` (the ort-cpu form with MoEGroupRouter, or the ort-cuda form with the router as plain ops), and
    ort-simplify when `simplify` (the ort-cpu flow)."""
    import onnx_ir as ir

    import models
    from passes import PASSES, graphs_for
    from passes.cleanup import cleanup
    from pipeline.export import export_graphs
    model = models.load(model_name, seed=0)
    graphs = export_graphs(model, "latent")
    for g in graphs_for("latent-kv-fusion"):
        PASSES["latent-kv-fusion"]()(graphs[g])
        cleanup(graphs[g])
    for g in ("prefill", "decode"):
        moe_pass()(graphs[g])
        cleanup(graphs[g])
        if simplify:
            PASSES["ort-simplify"]()(graphs[g])
            cleanup(graphs[g])
    return model, {g: ir.to_proto(m).SerializeToString() for g, m in graphs.items()}


@pytest.fixture(scope="session")
def tiny_cuda_graphs():
    """tiny's graphs as the ort-cuda flow has them before quantization (export, latent-kv fusion, MoE with
    the subgraph router), as serialized protos; shared by test_ort_cuda_int8.py and test_ort_cuda_fp8.py."""
    from targets.ort_cuda.build import CUDA_PASS_OVERRIDES
    return tiny_fused_graphs(CUDA_PASS_OVERRIDES["moe-ort-fused"])[1]


def package_copy(src, dest: Path, check=None) -> Path:
    """A copy at dest of the package folder or .tar.gz `src` (GPU tests record into theirs); check(manifest) may
    assert or skip first."""
    import shutil

    from pipeline.package import open_package
    root, manifest, cleanup = open_package(src)
    try:
        if check is not None:
            check(manifest)
        shutil.copytree(root, dest)
    finally:
        cleanup()
    return dest
