"""DeepSeek-V3-style block FP8 checkpoints: models.save(..., fp8=True) then models.load.

The reference here is independent of models/ and of the safetensors library: the safetensors files
are parsed by hand (8-byte header length, JSON header, raw bytes), fp8 bytes are decoded with
ml_dtypes.float8_e4m3fn and multiplied by the 128x128 block-expanded weight_scale_inv in numpy.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import models
from models.checkpoint import empty_model
from models.config import DeepseekConfig
from models.presets import init_weights

BLOCK = 128
NP_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F8_E4M3": ml_dtypes.float8_e4m3fn}

# Dims below 128 (one partial block per matrix): kv_a 40x64, q_b 96x32, experts 32x64 ...
SMALL = dict(model_type="deepseek_v3", vocab_size=200, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
             num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4,
             n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=48, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
# Dims above 128, mostly not multiples of it: hidden 192, dense 320, experts 160, kv_a 144x192,
# q_a 256x192 (an exact multiple), q_b 160x256, kv_b 224x128, o_proj 192x96.
LARGE = dict(model_type="deepseek_v3", vocab_size=300, hidden_size=192, intermediate_size=320, moe_intermediate_size=160,
             num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4,
             n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=256, kv_lora_rank=128,
             qk_nope_head_dim=64, qk_rope_head_dim=16, v_head_dim=48,
             rope_scaling={"factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1,
                           "mscale": 1.0, "mscale_all_dim": 1.0})


def read_safetensors_raw(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype string, shape, raw little-endian bytes), parsed without the safetensors library."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    return {k: (v["dtype"], v["shape"], data[base + v["data_offsets"][0]: base + v["data_offsets"][1]])
            for k, v in header.items()}


def read_checkpoint_raw(folder: Path) -> dict[str, tuple[str, list[int], bytes]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(read_safetensors_raw(f))
    return out


def to_numpy(entry) -> np.ndarray:
    dtype, shape, raw = entry
    return np.frombuffer(raw, dtype=NP_DTYPES[dtype]).reshape(shape)


def numpy_dequantize(w_fp8: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    out, inp = w_fp8.shape
    expanded = np.repeat(np.repeat(scale_inv.astype(np.float32), BLOCK, axis=0), BLOCK, axis=1)[:out, :inp]
    return w_fp8.astype(np.float32) * expanded


def quantized_by_deepseek(name: str) -> bool:
    """Linear projections are fp8; embeddings, lm_head, norms and the router gate are not (REFERENCE.md)."""
    return name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight")


@pytest.fixture(scope="module", params=["dims-below-128", "dims-above-128"])
def fp8_case(request, tmp_path_factory):
    """(original fp32 model, its fp8 checkpoint folder, raw tensors of that folder, loaded model)."""
    cfg = DeepseekConfig(**(SMALL if request.param == "dims-below-128" else LARGE)).validate()
    model = empty_model(cfg)
    init_weights(model, seed=11)
    model.eval()
    folder = models.save(model, tmp_path_factory.mktemp("fp8") / "ckpt", fp8=True)
    return model, folder, read_checkpoint_raw(folder), models.load(folder)


def test_fp8_config_json_carries_the_deepseek_quantization_config(fp8_case):
    _, folder, _, loaded = fp8_case
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert q == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert loaded.config.fp8


def test_fp8_projections_are_stored_e4m3_with_blockwise_scale_inv(fp8_case):
    model, _, raw, _ = fp8_case
    state = model.state_dict()
    quantized = [n for n in state if quantized_by_deepseek(n)]
    assert quantized
    for name in quantized:
        dtype, shape, _ = raw[name]
        assert dtype == "F8_E4M3", name
        assert shape == list(state[name].shape)
        s_dtype, s_shape, _ = raw[name + "_scale_inv"]
        assert s_dtype == "F32"
        assert s_shape == [math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)], name


def test_fp8_scale_inv_is_each_blocks_amax_over_448(fp8_case):
    """The block grid is [out/128, in/128] (rows = output channels) and the scale maps the block amax to 448."""
    model, _, raw, _ = fp8_case
    for name, w in model.state_dict().items():
        if not quantized_by_deepseek(name):
            continue
        w = w.numpy()
        scale = to_numpy(raw[name + "_scale_inv"])
        for bi in range(scale.shape[0]):
            for bj in range(scale.shape[1]):
                amax = np.abs(w[bi * BLOCK:(bi + 1) * BLOCK, bj * BLOCK:(bj + 1) * BLOCK]).max()
                assert scale[bi, bj] == pytest.approx(amax / 448.0, rel=1e-6), (name, bi, bj)


def test_fp8_loaded_weights_equal_numpy_dequantization_bitwise(fp8_case):
    _, _, raw, loaded = fp8_case
    state = loaded.state_dict()
    checked = 0
    for name, t in state.items():
        if not quantized_by_deepseek(name):
            continue
        ref = numpy_dequantize(to_numpy(raw[name]), to_numpy(raw[name + "_scale_inv"]))
        got = t.numpy()
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), name
        checked += 1
    assert checked == len(loaded.checkpoint.fp8_names)
    assert set(loaded.checkpoint.fp8_names) == {n for n in state if quantized_by_deepseek(n)}


def test_fp8_dequantized_weights_stay_within_e4m3_rounding_of_the_originals(fp8_case):
    """e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus half a subnormal step (2^-10 * scale)."""
    model, _, raw, loaded = fp8_case
    original, got = model.state_dict(), loaded.state_dict()
    for name in original:
        if not quantized_by_deepseek(name):
            continue
        w = original[name].numpy().astype(np.float64)
        scale = np.repeat(np.repeat(to_numpy(raw[name + "_scale_inv"]), BLOCK, 0), BLOCK, 1)[:w.shape[0], :w.shape[1]]
        err = np.abs(got[name].numpy() - w)
        assert np.all(err <= np.abs(w) * 2.0 ** -4 + scale * 2.0 ** -10 + 1e-12), name


def test_raw_fp8_returns_the_stored_bytes_unchanged(fp8_case):
    _, _, raw, loaded = fp8_case
    for name in loaded.checkpoint.fp8_names:
        w, s = loaded.checkpoint.raw_fp8(name)
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert list(w.shape) == raw[name][1] and list(s.shape) == raw[name + "_scale_inv"][1]
        assert w.contiguous().view(torch.uint8).numpy().tobytes() == raw[name][2], name
        assert s.contiguous().numpy().tobytes() == raw[name + "_scale_inv"][2], name


def test_fp8_leaves_norms_embeddings_lm_head_and_router_unquantized(fp8_case):
    model, _, raw, loaded = fp8_case
    original, got = model.state_dict(), loaded.state_dict()
    kept = [n for n in original if not quantized_by_deepseek(n)]
    kinds = {"embed_tokens", "lm_head", "norm.weight", "layernorm", "mlp.gate.weight", "e_score_correction_bias"}
    assert all(any(k in n for n in kept) for k in kinds), kept
    for name in kept:
        dtype, _, _ = raw[name]
        assert dtype == "F32", (name, dtype)
        assert name + "_scale_inv" not in raw
        assert torch.equal(got[name], original[name]), name
    assert not [n for n in raw if n.endswith("_scale_inv") and not quantized_by_deepseek(n[: -len("_scale_inv")])]


def test_fp8_checkpoint_runs_close_to_the_fp32_model(fp8_case):
    """End-to-end sanity only (the bitwise test above is the real check): fp8 noise gives cosine ~0.998
    here, but it may flip a routing decision (~0.96 when it does), so the bound is loose."""
    model, _, _, loaded = fp8_case
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(ids), loaded(ids)
    assert torch.isfinite(got).all()
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0).item()
    assert cos > 0.95
