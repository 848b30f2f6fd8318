"""DeepSeek-V4 checkpoints (models/v4_checkpoint.py): native names with FP8 blocks and FP4 experts, or
transformers' names, read into transformers 5.24's DeepseekV4ForCausalLM state dict.

The reference is independent of models/ and of the safetensors library: the files are parsed by hand
(8-byte header length, JSON header, raw bytes) and decoded in numpy from the format definitions:
FP8 E4M3 from its bits (sign, 4 exponent bits with bias 7, 3 mantissa bits, subnormals at exponent 0),
E8M0 = 2^(e-127), FP4 E2M1 = sign bit 3 + magnitude {0, .5, 1, 1.5, 2, 3, 4, 6}[bits 0-2], element 2j in the
low nibble. Expert merging (w1 rows then w3 rows per expert) is rebuilt in the test from the names.
transformers itself is the second reference for the names (from_pretrained of an unquantized native
checkpoint through its conversion mapping) and for the dequantization (its Fp8Dequantize op); its FP8
from_pretrained path needs `accelerate`, which this environment does not have.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import models.v4_checkpoint as v4c
from models.errors import CheckpointError
from models.v4_checkpoint import load_v4_state_dict, save_v4_native_checkpoint

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

# All three attention kinds, a hash layer then routed layers. hidden 160 = one full and one partial
# 128-block and 5 FP4 groups; q_b_proj is 256 rows (two row blocks); experts K = 160 and 32.
TINY = dict(vocab_size=96, hidden_size=160, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, head_dim=64, q_lora_rank=48, num_experts_per_tok=2, n_routed_experts=4,
            n_shared_experts=1, o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=32, index_topk=4,
            sliding_window=8, hc_mult=2, hc_sinkhorn_iters=3, partial_rotary_factor=0.25,
            max_position_embeddings=256, num_nextn_predict_layers=0,
            layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
            mlp_layer_types=["hash_moe", "moe", "moe"],
            rope_parameters={"rope_type": "yarn", "factor": 16.0, "beta_fast": 32, "beta_slow": 1,
                             "original_max_position_embeddings": 64})


def _tiny_model():
    cfg = DeepseekV4Config(**TINY)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.is_floating_point():  # random everywhere (the default init leaves biases/sinks at zero)
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 * (1 + 20 * (torch.rand(p.shape, generator=g) > 0.99)))
            else:
                p.copy_(torch.randint(0, cfg.n_routed_experts, p.shape, generator=g))
            if name.endswith("self_attn.q_b_proj.weight"):
                p[128:] *= 8  # its two 128-row blocks get different scales: a block mix-up shows
    return cfg, model


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


@pytest.fixture(scope="module")
def native_dir(tiny, tmp_path_factory):
    cfg, model = tiny
    return save_v4_native_checkpoint(model.state_dict(), cfg, tmp_path_factory.mktemp("v4") / "native",
                                     max_shard_bytes=60_000, mtp_layers=1)


@pytest.fixture(scope="module")
def loaded(native_dir):
    return load_v4_state_dict(native_dir)


# ---- the independent reference ---------------------------------------------------------------------------
def _e4m3_table() -> np.ndarray:
    b = np.arange(256)
    sign = np.where(b >> 7, -1.0, 1.0)
    e, m = (b >> 3) & 0xF, b & 0x7
    val = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    val = np.where((b & 0x7F) == 0x7F, np.nan, val)  # e4m3fn: only S.1111.111 is NaN, no infinities
    return (sign * val).astype(np.float32)


E4M3 = _e4m3_table()
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def _read_raw(folder: Path) -> dict[str, tuple[str, list[int], bytes]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        data = f.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        for name, v in header.items():
            if name != "__metadata__":
                a, b = v["data_offsets"]
                out[name] = (v["dtype"], v["shape"], data[8 + n + a:8 + n + b])
    return out


def _decode(dtype: str, shape: list[int], raw: bytes) -> np.ndarray:
    if dtype == "F32":
        return np.frombuffer(raw, np.float32).reshape(shape)
    if dtype == "BF16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dtype == "F8_E4M3":
        return E4M3[np.frombuffer(raw, np.uint8)].reshape(shape)
    if dtype == "F8_E8M0":
        return np.ldexp(np.float32(1), np.frombuffer(raw, np.uint8).astype(np.int32) - 127).astype(np.float32).reshape(shape)
    if dtype == "I64":
        return np.frombuffer(raw, np.int64).reshape(shape)
    raise AssertionError(dtype)


def _fp4_decode(raw: bytes, shape: list[int], swap_nibbles: bool = False) -> np.ndarray:
    u = np.frombuffer(raw, np.uint8).reshape(shape)
    lo, hi = E2M1[u & 0xF], E2M1[u >> 4]
    if swap_nibbles:
        lo, hi = hi, lo
    return np.stack([lo, hi], axis=-1).reshape(shape[0], 2 * shape[1])


def _dequant(raw: dict, wname: str, sname: str | None, scale_shift: int = 0, swap_nibbles: bool = False) -> np.ndarray:
    dt, shape, b = raw[wname]
    if sname is None:
        return _decode(dt, shape, b).astype(np.float32) if dt != "I64" else _decode(dt, shape, b)
    s = _decode(*raw[sname])
    s = np.roll(s.ravel(), scale_shift).reshape(s.shape)  # fault injection: each scale one block off
    if dt == "F8_E4M3":
        full = np.repeat(np.repeat(s, 128, 0)[: shape[0]], 128, 1)[:, : shape[1]]
        return E4M3[np.frombuffer(b, np.uint8)].reshape(shape) * full
    assert dt == "I8", dt
    return _fp4_decode(b, shape, swap_nibbles) * np.repeat(s, 32, axis=1)


def _reference(folder: Path, expected_names, n_experts: int, **fault) -> dict[str, np.ndarray]:
    """transformers name -> tensor, decoded from the files; names mapped by the rename table in the test."""
    raw = _read_raw(folder)
    top = {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight", "model.norm.weight": "norm.weight",
           "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
           "model.hc_head.hc_scale": "hc_head_scale"}
    ref = {}
    for name in expected_names:
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            layer = name.split(".")[2]
            ws = ("w1", "w3") if name.endswith("gate_up_proj") else ("w2",)
            ref[name] = np.stack([np.concatenate([
                _dequant(raw, f"layers.{layer}.ffn.experts.{e}.{w}.weight", f"layers.{layer}.ffn.experts.{e}.{w}.scale",
                         **fault) for w in ws]) for e in range(n_experts)])
            continue
        native = top.get(name) or _native_layer_name(name)
        base = native[: -len(".weight")] if native.endswith(".weight") else native
        ref[name] = _dequant(raw, native, base + ".scale" if base + ".scale" in raw else None, **fault)
    return ref


def _native_layer_name(name: str) -> str:
    _, _, layer, rest = name.split(".", 3)
    table = [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"), ("attn_hc.", "hc_attn_"),
             ("ffn_hc.", "hc_ffn_"), ("self_attn.sinks", "attn.attn_sink"),
             ("self_attn.compressor.indexer.scorer.weights_proj", "attn.indexer.weights_proj"),
             ("self_attn.compressor.indexer.q_b_proj", "attn.indexer.wq_b"),
             ("self_attn.compressor.indexer.", "attn.indexer.compressor."), ("self_attn.", "attn."),
             ("q_a_proj", "wq_a"), ("q_a_norm", "q_norm"), ("q_b_proj", "wq_b"), ("o_a_proj", "wo_a"),
             ("o_b_proj", "wo_b"), ("position_bias", "ape"), ("gate.e_score_correction_bias", "gate.bias"),
             ("mlp.", "ffn."), ("shared_experts.gate_proj", "shared_experts.w1"),
             ("shared_experts.down_proj", "shared_experts.w2"), ("shared_experts.up_proj", "shared_experts.w3")]
    for a, b in table:
        rest = rest.replace(a, b)
    if ".compressor." in rest:
        rest = rest.replace("kv_proj", "wkv").replace("gate_proj", "wgate").replace("kv_norm", "norm")
    else:
        rest = rest.replace("kv_proj", "wkv")
    return f"layers.{layer}.{rest}"


def _mismatches(state: dict[str, torch.Tensor], ref: dict[str, np.ndarray]) -> list[str]:
    bad = [k for k in ref if k not in state]
    for k, r in ref.items():
        if k in state:
            a = state[k].numpy()
            if a.shape != r.shape or a.dtype != r.dtype or not np.array_equal(a.view(np.uint8), r.view(np.uint8)):
                bad.append(k)
    return bad


# ---- tests ---------------------------------------------------------------------------------------------
def test_native_fp8_fp4_sharded_equals_independent_decode_bit_exactly(tiny, native_dir, loaded):
    cfg, model = tiny
    config, state, src = loaded
    assert src.naming == "native"
    assert (native_dir / "model.safetensors.index.json").is_file() and len(list(native_dir.glob("*.safetensors"))) > 3
    assert set(state) == set(model.state_dict())
    ref = _reference(native_dir, model.state_dict(), cfg.n_routed_experts)
    assert _mismatches(state, ref) == []
    # what was stored how
    assert src.fp4_names == tuple(sorted(n for n in state if ".mlp.experts." in n))
    assert "model.layers.1.self_attn.compressor.indexer.q_b_proj.weight" in src.fp8_names
    assert "model.layers.0.mlp.shared_experts.down_proj.weight" in src.fp8_names
    assert "model.embed_tokens.weight" not in src.fp8_names and "model.layers.0.mlp.gate.weight" not in src.fp8_names
    assert src.scale_dtypes == ("float8_e8m0fnu",)
    raw = _read_raw(native_dir)
    assert raw["layers.0.ffn.experts.0.w1.weight"][:2] == ("I8", [32, 80])
    assert raw["layers.0.ffn.experts.0.w1.scale"][:2] == ("F8_E8M0", [32, 5])
    assert raw["layers.0.attn.wq_b.scale"][:2] == ("F8_E8M0", [2, 1])
    # MTP block skipped and counted
    assert src.skipped_mtp == sum(1 for n in raw if n.startswith("mtp.")) > 0
    assert config["num_nextn_predict_layers"] == 1
    # the raw bytes stay reachable for an FP8/FP4 passthrough stage
    w, s = src.raw_fp8("model.layers.0.self_attn.q_a_proj.weight")
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    pieces = src.raw("model.layers.2.mlp.experts.gate_up_proj")
    assert [p[0] for p in pieces[:2]] == ["layers.2.ffn.experts.0.w1.weight", "layers.2.ffn.experts.0.w3.weight"]
    assert pieces[0][1].dtype == torch.int8 and pieces[0][2].shape == (32, 5)
    # the result loads strictly into transformers' model and is close to the weights it was made from
    m2 = DeepseekV4ForCausalLM(cfg)
    m2.load_state_dict(state, strict=True)
    for k, t in model.state_dict().items():
        if t.is_floating_point():
            assert (state[k] - t).abs().max() <= 0.26 * t.abs().max() + 1e-6, k


def test_transformers_dequant_agrees(native_dir, loaded):
    """transformers' own FP8/FP4 dequantization (Fp8Dequantize) of the same stored tensors, a second reference."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    _, state, src = loaded
    op = Fp8Dequantize(None)
    # Fp8Dequantize infers the block from the scale grid (rows // grid rows), right only where the dims are
    # multiples of 128 (as in real V4 checkpoints); here that is q_b_proj [256, 48] (scale [2, 1]).
    for name in ("model.layers.0.self_attn.q_b_proj.weight", "model.layers.1.self_attn.q_b_proj.weight"):
        (_, w, s), = src.raw(name)
        assert torch.equal(op._dequantize_one(w, s.float(), torch.float32), state[name])
    pieces = src.raw("model.layers.1.mlp.experts.down_proj")
    theirs = torch.stack([op._dequantize_one(w, s.float(), torch.float32) for _, w, s in pieces])
    assert torch.equal(theirs, state["model.layers.1.mlp.experts.down_proj"])


def test_flipped_nibbles_or_shifted_scale_blocks_are_caught(tiny, native_dir, loaded, monkeypatch):
    cfg, model = tiny
    _, state, _ = loaded
    names = list(model.state_dict())
    for fault in ({"swap_nibbles": True}, {"scale_shift": 1}):
        bad = _mismatches(state, _reference(native_dir, names, cfg.n_routed_experts, **fault))
        assert any(".experts." in b for b in bad), fault
    assert any(".q_b_proj" in b for b in _mismatches(state, _reference(native_dir, names, cfg.n_routed_experts,
                                                                        scale_shift=1)))
    # and a reader with either bug fails the exact comparison
    ref = _reference(native_dir, names, cfg.n_routed_experts)
    real_unpack, real_fp8 = v4c.fp4_unpack, v4c.fp8_dequantize
    monkeypatch.setattr(v4c, "fp4_unpack", lambda p: real_unpack(((p.view(torch.uint8) >> 4) |
                                                                  (p.view(torch.uint8) << 4)).view(torch.int8)))
    assert any(".experts." in b for b in _mismatches(load_v4_state_dict(native_dir)[1], ref))
    monkeypatch.setattr(v4c, "fp4_unpack", real_unpack)
    monkeypatch.setattr(v4c, "fp8_dequantize", lambda w, s: real_fp8(w, s.view(torch.uint8).flip(0).view(s.dtype)))
    assert any("q_b_proj" in b for b in _mismatches(load_v4_state_dict(native_dir)[1], ref))


def test_fp4_rounds_to_nearest_with_power_of_two_scales():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 64, generator=g) * torch.logspace(-3, 2, 8)[:, None]
    w[0, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4)  # ties: the even code wins
    packed, scale = v4c.fp4_quantize(w)
    deq = v4c.fp4_dequantize(packed, scale)
    s = v4c.e8m0_to_float(scale).repeat_interleave(32, 1)
    grid = torch.tensor(E2M1)
    best = ((w / s)[..., None] - grid).abs().min(-1).values * s
    assert torch.equal((deq - w).abs(), best)
    assert torch.equal(deq[0, :8], torch.tensor([0.0, 1, 1, 2, 2, 4, 4, 6]))
    amax = w.abs().reshape(8, 2, 32).amax(-1)
    sc = v4c.e8m0_to_float(scale)
    assert bool(((amax / sc <= 6) & (amax / sc > 3)).all())  # the smallest power of two that fits


def test_transformers_named_checkpoint_loads_unchanged(tiny, tmp_path):
    cfg, model = tiny
    sd = model.state_dict()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(cfg.to_json_string())
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "hf" / "model.safetensors")
    _, state, src = load_v4_state_dict(tmp_path / "hf")
    assert src.naming == "transformers" and src.fp8_names == () and src.skipped_mtp == 0
    assert set(state) == set(sd) and all(torch.equal(state[k], sd[k]) for k in sd)


def test_transformers_save_pretrained_layout_loads(tiny, tmp_path):
    """transformers 5.24's save_pretrained writes neither naming: its conversion mapping run backwards leaves
    model.layers.N.attn.wq_a.weight, head.weight, model.embed_tokens.weight, model.hc_head.hc_fn and
    attn.norm for the attention's kv_norm. Read as such, it gives the model's own tensors back."""
    cfg, model = tiny
    model.save_pretrained(tmp_path / "sp", safe_serialization=True)
    raw = _read_raw(tmp_path / "sp")
    assert {"head.weight", "model.layers.0.attn.wq_a.weight", "model.layers.0.attn.norm.weight",
            "model.hc_head.hc_fn"} <= set(raw)
    _, state, src = load_v4_state_dict(tmp_path / "sp")
    assert src.naming == "transformers-saved"
    sd = model.state_dict()
    assert set(state) == set(sd) and all(torch.equal(state[k], sd[k]) for k in sd)


def test_transformers_reads_the_native_names_the_same_way(tiny, tmp_path):
    """transformers' conversion mapping (from_pretrained) over an unquantized native checkpoint gives the same
    transformers-named tensors as this reader: the rename table and the expert merge agree with it."""
    cfg, model = tiny
    folder = save_v4_native_checkpoint(model.state_dict(), cfg, tmp_path / "plain", fp8=False, expert_dtype=None,
                                       dtype=torch.float32, max_shard_bytes=200_000)
    theirs = DeepseekV4ForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    _, mine, src = load_v4_state_dict(folder)
    assert src.naming == "native" and src.fp8_names == src.fp4_names == ()
    assert set(theirs) == set(mine)
    assert all(torch.equal(theirs[k], mine[k]) for k in mine), [k for k in mine if not torch.equal(theirs[k], mine[k])]
    assert all(torch.equal(mine[k], t) for k, t in model.state_dict().items())


def test_native_config_reads_back_as_the_same_transformers_config(tiny, native_dir):
    cfg, _ = tiny
    raw = json.loads((native_dir / "config.json").read_text())
    for legacy in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling"):
        assert legacy in raw and legacy not in ("layer_types", "mlp_layer_types")
    assert "layer_types" not in raw and "mlp_layer_types" not in raw
    assert raw["compress_ratios"] == [0, 4, 128, 0]  # like V4-Flash: one more entry, for the MTP layer
    assert raw["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "scale_fmt": "ue8m0", "weight_block_size": [128, 128], "expert_dtype": "fp4"}
    back = DeepseekV4Config(**{k: v for k, v in raw.items() if k != "quantization_config"})
    for f in ("layer_types", "mlp_layer_types", "partial_rotary_factor", "qk_rope_head_dim", "compress_rates",
              "hidden_size", "o_groups", "index_head_dim", "hc_mult", "rope_theta", "compress_rope_theta"):
        assert getattr(back, f) == getattr(cfg, f), f
    # legacy rope_scaling {"type": "yarn", ...} lands in rope_parameters["compress"] (key spelt "type")
    comp = dict(back.rope_parameters["compress"])
    comp["rope_type"] = comp.pop("type", comp.get("rope_type"))
    assert comp == cfg.rope_parameters["compress"] and back.rope_parameters["main"] == cfg.rope_parameters["main"]


# ---- errors --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory):
    """One-file native checkpoint whose tensors the fault tests edit."""
    cfg, model = tiny
    folder = save_v4_native_checkpoint(model.state_dict(), cfg, tmp_path_factory.mktemp("v4s") / "one")
    return folder, load_file(folder / "model.safetensors")


def _variant(single, tmp_path, edit) -> Path:
    folder, tensors = single
    out = tmp_path / "edited"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    t = dict(tensors)
    edit(t)
    save_file(t, out / "model.safetensors")
    return out


H = TINY["hidden_size"]


@pytest.mark.parametrize("edit, message", [
    (lambda t: (t.pop("layers.0.attn.wq_a.weight"), t.pop("layers.0.attn.wq_a.scale")),
     r"missing.*'model\.layers\.0\.self_attn\.q_a_proj\.weight' \(native name 'layers\.0\.attn\.wq_a\.weight'\)"),
    (lambda t: t.update({"layers.0.attn_norm.weight": torch.ones(H + 1)}),
     r"'layers\.0\.attn_norm\.weight' has shape \[161\], config\.json implies \[160\]"),
    (lambda t: t.pop("layers.0.attn.wq_a.scale"),
     r"'layers\.0\.attn\.wq_a\.weight' is stored as float8_e4m3fn \(quantized\) but its scale "
     r"'layers\.0\.attn\.wq_a\.scale' is missing"),
    (lambda t: t.pop("layers.0.attn.wq_a.weight"),
     r"scale 'layers\.0\.attn\.wq_a\.scale' has no weight 'layers\.0\.attn\.wq_a\.weight'"),
    (lambda t: t.update({"layers.1.ffn.experts.2.w3.weight": torch.zeros(32, H, dtype=torch.int8)}),
     r"'layers\.1\.ffn\.experts\.2\.w3\.weight' is packed FP4 with shape \[32, 160\]; .* need \[32, 80\]"),
    (lambda t: t.update({"layers.1.ffn.experts.2.w3.scale": t["layers.1.ffn.experts.2.w3.scale"][:, :4].clone()}),
     r"'layers\.1\.ffn\.experts\.2\.w3\.scale' has shape \[32, 4\]; FP4 \[32, 160\] .* needs \[32, 5\]"),
    (lambda t: t.update({"layers.0.attn_norm.weight": torch.ones(H, dtype=torch.float64)}),
     r"'layers\.0\.attn_norm\.weight' has dtype F64, which a DeepSeek-V4 checkpoint does not use"),
    (lambda t: t.update({"layers.0.attn.wq_a.scale": t["layers.0.attn.wq_a.scale"].view(torch.uint8).to(torch.int64)}),
     r"'layers\.0\.attn\.wq_a\.scale' has dtype int64; a scale is float8_e8m0fnu"),
    (lambda t: t.update({"model.norm.weight": t["norm.weight"].clone()}),
     r"mixes DeepSeek's native tensor names .* and transformers' names \(1, e\.g\. 'model\.norm\.weight'\)"),
    (lambda t: t.pop("layers.2.ffn.experts.3.w2.weight"),
     r"routed expert tensor 'layers\.2\.ffn\.experts\.3\.w2\.weight' is missing"),
    (lambda t: t.update({"layers.0.attn.wq_a.scale": torch.ones(2, 2)}),
     r"'layers\.0\.attn\.wq_a\.scale' has shape \[2, 2\]; 128x128 blocks of \[48, 160\] need \[1, 2\]"),
    (lambda t: t.update({"layers.0.attn.extra.weight": torch.ones(2)}),
     r"unexpected tensor.*layers\.0\.attn\.extra\.weight"),
    (lambda t: t.update({"layers.0.attn.norm.weight": t["layers.0.attn.kv_norm.weight"].clone()}),
     r"'layers\.0\.attn\.kv_norm\.weight' and 'layers\.0\.attn\.norm\.weight' are both"),
], ids=["missing", "shape", "fp8-no-scale", "scale-no-weight", "fp4-packed-shape", "fp4-scale-shape",
        "unknown-dtype", "scale-dtype", "mixed-naming", "missing-expert", "fp8-scale-shape", "unexpected", "duplicate"])
def test_errors_name_the_tensor_and_the_fix(single, tmp_path, edit, message):
    folder = _variant(single, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_v4_state_dict(folder)


def test_unmodified_single_file_loads_and_refuses_pickles(single, tmp_path):
    folder, _ = single
    assert load_v4_state_dict(folder)[2].naming == "native"
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        load_v4_state_dict(tmp_path)


def test_fp8_experts_and_layers_beyond_num_hidden_layers(tiny, tmp_path):
    """expert_dtype fp8: routed experts in 128x128 FP8 blocks; a native layers.3.* block (an MTP layer counted
    in the layer numbers) is skipped like mtp.*."""
    cfg, model = tiny
    folder = save_v4_native_checkpoint(model.state_dict(), cfg, tmp_path / "fp8e", expert_dtype="fp8")
    tensors = load_file(folder / "model.safetensors")
    extra = {"layers.3." + k[len("layers.2."):]: v.clone() for k, v in tensors.items() if k.startswith("layers.2.")}
    save_file({**tensors, **extra}, folder / "model.safetensors")
    config, state, src = load_v4_state_dict(folder)
    assert config["quantization_config"]["expert_dtype"] == "fp8" and src.fp4_names == ()
    assert "model.layers.0.mlp.experts.gate_up_proj" in src.fp8_names and src.skipped_mtp == len(extra)
    assert _read_raw(folder)["layers.0.ffn.experts.1.w2.scale"][:2] == ("F8_E8M0", [2, 1])
    assert _mismatches(state, _reference(folder, model.state_dict(), cfg.n_routed_experts)) == []


def test_transformers_named_fp8_with_fp32_weight_scale_inv(tiny, tmp_path):
    """transformers' (and V3's) FP8 naming: W.weight float8_e4m3fn + W.weight_scale_inv fp32 per 128x128 block."""
    from models.checkpoint import fp8_block_quantize
    cfg, model = tiny
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    name = "model.layers.1.self_attn.q_b_proj.weight"
    q, s = fp8_block_quantize(sd[name])
    sd[name], sd[name + "_scale_inv"] = q, s
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text(cfg.to_json_string())
    save_file(sd, tmp_path / "t" / "model.safetensors")
    _, state, src = load_v4_state_dict(tmp_path / "t")
    assert src.naming == "transformers" and src.fp8_names == (name,) and src.scale_dtypes == ("float32",)
    want = E4M3[q.view(torch.uint8).numpy()] * np.repeat(np.repeat(s.numpy(), 128, 0)[:256], 128, 1)[:, :48]
    assert np.array_equal(state[name].numpy().view(np.uint8), want.view(np.uint8))
    assert torch.equal(src.raw_fp8(name)[0].view(torch.uint8), q.view(torch.uint8))


def test_native_attn_norm_alias_for_kv_norm(single, tmp_path):
    """transformers reads attn.norm as the attention's kv_norm too (its `.norm.` -> `.kv_norm.` rename)."""
    def edit(t):
        t["layers.0.attn.norm.weight"] = t.pop("layers.0.attn.kv_norm.weight")
    folder = _variant(single, tmp_path, edit)
    _, state, _ = load_v4_state_dict(folder)
    want = load_file(single[0] / "model.safetensors")["layers.0.attn.kv_norm.weight"].float()
    assert torch.equal(state["model.layers.0.self_attn.kv_norm.weight"], want)


def test_models_load_of_a_native_fp8_fp4_folder_and_of_the_same_weights_saved_by_transformers(tiny, native_dir,
                                                                                             tmp_path):
    """The public entry: models.load(native FP8+FP4 folder) -> our DeepseekV4ForCausalLM whose logits equal
    those of the module built from the numpy-decoded weights; the same weights written by transformers'
    save_pretrained and by models.save (transformers names) load to identical logits."""
    import models
    from models.v4 import DeepseekV4ForCausalLM as Ours
    cfg, model = tiny
    ours = models.load(native_dir)
    assert ours.config.quantization_config["expert_dtype"] == "fp4"
    src = ours.checkpoint
    assert isinstance(ours, Ours) and src.naming == "native" and src.skipped_mtp > 0
    assert "model.layers.0.mlp.experts.gate_up_proj" in src.fp4_names
    assert "model.layers.0.self_attn.q_a_proj.weight" in src.fp8_names
    w, s = src.raw_fp8("model.layers.0.self_attn.q_a_proj.weight")
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    ref = _reference(native_dir, model.state_dict(), cfg.n_routed_experts)
    eager = Ours(ours.config).eval()
    eager.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ref.items()}, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(ids)
        assert torch.equal(logits, eager(ids))
    hf = DeepseekV4ForCausalLM(cfg).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    hf.save_pretrained(tmp_path / "sp", safe_serialization=True)
    for folder, layout in ((tmp_path / "sp", "transformers-saved"),
                           (models.save(ours, tmp_path / "ours"), "transformers")):
        other = models.load(folder)
        assert other.checkpoint.naming == layout and other.checkpoint.fp8_names == ()
        assert other.config.quantization_config is None
        with torch.no_grad():
            assert torch.equal(other(ids), logits), layout


def test_transformers_named_fp8_experts_fill_the_merged_tensor_expert_by_expert(tiny, tmp_path):
    """A transformers-named [E, 2I, H] FP8 expert tensor with [E, ...] block scales: each expert dequantized into
    its slot of the merged tensor, as the per-expert reference says."""
    from models.checkpoint import fp8_block_dequantize, fp8_block_quantize
    cfg, model = tiny
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    name = "model.layers.1.mlp.experts.gate_up_proj"
    qs = [fp8_block_quantize(sd[name][e]) for e in range(sd[name].shape[0])]
    sd[name], sd[name + "_scale_inv"] = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text(cfg.to_json_string())
    save_file(sd, tmp_path / "t" / "model.safetensors")
    _, state, src = load_v4_state_dict(tmp_path / "t")
    assert src.fp8_names == (name,)
    assert torch.equal(state[name], torch.stack([fp8_block_dequantize(q, s) for q, s in qs]))
