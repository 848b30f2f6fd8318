"""MLA forms and cache layouts, YaRN numbers, the router, presets and the public models API.

References: REFERENCE.md section 1 (numbers and the router pseudo-code, re-implemented in numpy
here), transformers' ROPE_INIT_FUNCTIONS / yarn_apply_mscale, and transformers models built on
the meta device for parameter counts.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import models
from models.config import DeepseekConfig
from models.moe import Router
from models.presets import preset_config
from models.rope import attention_factor, inv_freq, softmax_scale, yarn_correction_range

FORMS_TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_models():
    return {name: models.load(name) for name in ("tiny", "tiny-v2")}


def _ids(vocab, batch, length, seed):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _run(model, chunks, layout="latent"):
    """Feed token chunks one after another through model.step; -> (logits [B, sum S, V], cache)."""
    cache = model.empty_cache(chunks[0].shape[0], layout)
    out = []
    for c in chunks:
        logits, cache = model.step(c, cache, layout)
        out.append(logits)
    return torch.cat(out, dim=1), cache


def _with_form(model, form):
    model.attention = form
    return model


# ---- naive vs absorbed ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])
def test_absorbed_and_naive_forms_agree_on_prefill_and_decode(tiny_models, name):
    model = tiny_models[name]
    ids = _ids(model.config.vocab_size, 2, 12, seed=0)
    chunks = [ids[:, :8]] + [ids[:, i:i + 1] for i in range(8, 12)]  # prefill, then 4 decode steps
    naive, _ = _run(_with_form(model, "naive"), chunks)
    absorbed, _ = _run(_with_form(model, "absorbed"), chunks)
    model.attention = "naive"
    assert (naive - absorbed).abs().max().item() <= FORMS_TOL
    assert naive.abs().max().item() > 0.1  # not trivially equal


def test_absorbed_and_naive_forms_agree_on_the_small_preset():
    model = models.load("small")
    ids = _ids(model.config.vocab_size, 2, 6, seed=1)
    with torch.no_grad():
        naive = _with_form(model, "naive")(ids)
        absorbed = _with_form(model, "absorbed")(ids)
    assert (naive - absorbed).abs().max().item() <= FORMS_TOL


# ---- the latent cache -------------------------------------------------------------------------

def test_latent_cache_holds_kv_lora_rank_plus_rope_values_per_token_per_layer(tiny_models):
    model = tiny_models["tiny"]
    cfg = model.config
    B, S = 2, 5
    ids = _ids(cfg.vocab_size, B, S + 1, seed=2)
    for form in ("naive", "absorbed"):
        _, cache = _run(_with_form(model, form), [ids[:, :S], ids[:, S:]])
        assert len(cache) == cfg.num_hidden_layers
        for c_kv, k_pe in cache:
            assert c_kv.shape == (B, S + 1, cfg.kv_lora_rank)
            assert k_pe.shape == (B, S + 1, cfg.qk_rope_head_dim)
            assert (c_kv.numel() + k_pe.numel()) / (B * (S + 1)) == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    model.attention = "naive"


def test_latent_cache_rows_are_normed_c_kv_and_rotated_k_pe(tiny_models):
    """Layer 0's cache, recomputed here from the weights: rmsnorm(c) and k_pe rotated as complex pairs."""
    model = tiny_models["tiny"]
    cfg = model.config
    ids = _ids(cfg.vocab_size, 1, 6, seed=3)
    _, cache = _run(model, [ids])
    layer = model.model.layers[0]
    attn = layer.self_attn

    def rms(x, w, eps):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    with torch.no_grad():
        x = rms(model.model.embed_tokens(ids), layer.input_layernorm.weight, cfg.rms_norm_eps)
        c, k_pe = (x @ attn.kv_a_proj_with_mqa.weight.T).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        c = rms(c, attn.kv_a_layernorm.weight, 1e-6)
        pos = torch.arange(ids.shape[1], dtype=torch.float64)[:, None]
        rot = torch.polar(torch.ones(1, dtype=torch.float64), pos * model.rope_inv_freq.double())
        k_pe = torch.view_as_real(torch.view_as_complex(k_pe.double().unflatten(-1, (-1, 2)).contiguous()) * rot)
        k_pe = k_pe.flatten(-2).float()
    assert torch.allclose(cache[0][0], c, atol=1e-5)
    assert torch.allclose(cache[0][1], k_pe, atol=1e-5)


def test_cache_widths_of_the_671b_config_match_reference_table():
    cfg = preset_config("deepseek-v3-671b")
    assert cfg.latent_cache_width == 576
    assert cfg.expanded_cache_width == 40960
    assert round(100 * cfg.latent_cache_width / cfg.expanded_cache_width, 2) == 1.41


@pytest.mark.parametrize("layout", ["latent", "expanded"])
@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_chunked_prefill_equals_one_shot_prefill(tiny_models, form, layout):
    for model in tiny_models.values():
        ids = _ids(model.config.vocab_size, 2, 10, seed=4)
        _with_form(model, form)
        one, cache_one = _run(model, [ids], layout)
        chunked, cache_chunked = _run(model, [ids[:, :6], ids[:, 6:]], layout)
        model.attention = "naive"
        assert (one - chunked).abs().max().item() <= FORMS_TOL
        for a, b in zip(cache_one, cache_chunked):
            assert torch.allclose(a[0], b[0], atol=FORMS_TOL) and torch.allclose(a[1], b[1], atol=FORMS_TOL)


def test_expanded_layout_gives_the_same_logits_as_latent(tiny_models):
    for model in tiny_models.values():
        cfg = model.config
        B, H = 2, cfg.num_attention_heads
        ids = _ids(cfg.vocab_size, B, 9, seed=5)
        chunks = [ids[:, :6]] + [ids[:, i:i + 1] for i in range(6, 9)]
        latent, _ = _run(model, chunks, "latent")
        expanded, cache = _run(model, chunks, "expanded")
        assert (latent - expanded).abs().max().item() <= FORMS_TOL
        k, v = cache[0]
        assert k.shape == (B, H, 9, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        assert v.shape == (B, H, 9, cfg.v_head_dim)


# ---- YaRN -------------------------------------------------------------------------------------

def test_yarn_softmax_scale_of_the_real_configs_matches_reference():
    assert softmax_scale(preset_config("deepseek-v3-671b")) == pytest.approx(0.135234, abs=1e-6)
    assert softmax_scale(preset_config("deepseek-v2-lite")) == pytest.approx(0.114721, abs=1e-6)
    # the formula, written out: (nope + rope)^-0.5 * (0.1 * mscale_all_dim * ln(factor) + 1)^2
    assert softmax_scale(preset_config("deepseek-v2-lite")) == pytest.approx(
        192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2, rel=1e-12)


def test_yarn_softmax_scale_matches_transformers():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
    for name in ("deepseek-v3-671b", "deepseek-v2-lite", "tiny", "tiny-v2"):
        cfg = preset_config(name)
        rope = {"rope_type": "yarn", **cfg.rope_scaling}
        assert softmax_scale(cfg) == pytest.approx(yarn_apply_mscale(rope, cfg.qk_head_dim ** -0.5), rel=1e-12)


def test_yarn_correction_range_for_rope_dim_64_theta_1e4_original_4096_is_10_to_23():
    cfg = preset_config("deepseek-v3-671b")
    assert (cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling["original_max_position_embeddings"]) == (64, 1e4, 4096)
    assert yarn_correction_range(cfg) == (10, 23)


def _hf_yarn_configs():
    import hf_reference
    from transformers import DeepseekV3Config
    real = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    return {
        "hf-v3-tiny": hf_reference.hf_config("v3"),
        "hf-v2-tiny": hf_reference.hf_config("v2"),
        "v3-671b": DeepseekV3Config(rope_parameters=dict(real), max_position_embeddings=163840),
        "v2-lite-rope": DeepseekV3Config(rope_parameters={**real, "mscale": 0.707, "mscale_all_dim": 0.707}),
        "mscale-differs": DeepseekV3Config(rope_parameters={**real, "mscale": 1.0, "mscale_all_dim": 0.5}),
        "no-truncate": DeepseekV3Config(rope_parameters={**real, "truncate": False, "beta_fast": 16}),
    }


@pytest.mark.parametrize("case", ["hf-v3-tiny", "hf-v2-tiny", "v3-671b", "v2-lite-rope", "mscale-differs",
                                  "no-truncate"])
def test_yarn_inv_freq_and_attention_factor_match_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_cfg = _hf_yarn_configs()[case]
    ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    ours = DeepseekConfig.from_hf_dict(hf_cfg.to_dict())  # through the config.json reader
    assert ours.rope_scaling is not None
    assert torch.allclose(inv_freq(ours), ref_freq.float(), rtol=1e-6, atol=0)
    assert attention_factor(ours) == pytest.approx(ref_factor, rel=1e-12)
    if case == "mscale-differs":
        assert ref_factor != pytest.approx(1.0)  # the cos/sin factor is exercised


def test_plain_rope_inv_freq_is_theta_power():
    cfg = dataclasses.replace(preset_config("tiny"), rope_scaling=None)
    d = cfg.qk_rope_head_dim
    ref = torch.tensor([1.0 / 10000.0 ** (2 * i / d) for i in range(d // 2)], dtype=torch.float32)
    assert torch.allclose(inv_freq(cfg), ref, rtol=1e-6)
    assert attention_factor(cfg) == 1.0 and softmax_scale(cfg) == cfg.qk_head_dim ** -0.5


# ---- the router against REFERENCE.md's pseudo-code in numpy ------------------------------------

def numpy_router(x, weight, bias, cfg):
    """REFERENCE.md section 1 'Router', line by line. -> (weights [T, k], ids [T, k], kept groups or None)."""
    logits = x.astype(np.float32) @ weight.astype(np.float32).T
    if cfg.scoring_func == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(-1, keepdims=True))
        s = e / e.sum(-1, keepdims=True)
    choice = s + bias if bias is not None else s.copy()
    kept = None
    if cfg.n_group > 1 and cfg.topk_method != "greedy":
        T, E = choice.shape
        if cfg.topk_method == "noaux_tc":
            group_score = np.sort(choice.reshape(T, cfg.n_group, -1), axis=-1)[..., -2:].sum(-1)
        else:
            group_score = s.reshape(T, cfg.n_group, -1).max(-1)
        kept = np.argsort(-group_score, axis=-1, kind="stable")[:, :cfg.topk_group]
        dropped = np.ones((T, cfg.n_group), dtype=bool)
        np.put_along_axis(dropped, kept, False, axis=-1)
        choice = np.where(np.repeat(dropped, E // cfg.n_group, axis=-1), -np.inf, choice)
    idx = np.argsort(-choice, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]
    w = np.take_along_axis(s, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * cfg.routed_scaling_factor, idx, kept


def _router_cfg(scoring_func, topk_method, norm_topk_prob, hidden=16):
    return DeepseekConfig(model_type="deepseek_v3", hidden_size=hidden, n_routed_experts=8, num_experts_per_tok=3,
                          n_group=4, topk_group=2, scoring_func=scoring_func, topk_method=topk_method,
                          norm_topk_prob=norm_topk_prob, routed_scaling_factor=2.5, vocab_size=16,
                          intermediate_size=16, moe_intermediate_size=8, num_hidden_layers=2, first_k_dense_replace=1,
                          num_attention_heads=2,
                          q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
                          v_head_dim=4).validate()


def _make_router(cfg, weight, bias=None):
    r = Router(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.as_tensor(weight))
        if r.e_score_correction_bias is not None:
            r.e_score_correction_bias.copy_(torch.as_tensor(bias))
    return r


def _sorted_by_expert(w, idx):
    order = np.argsort(idx, axis=-1)
    return np.take_along_axis(w, order, -1), np.take_along_axis(idx, order, -1)


ROUTER_CASES = [(sf, tm, norm) for tm in ("noaux_tc", "greedy", "group_limited_greedy")
                for sf in ("sigmoid", "softmax") for norm in (True, False)]


@pytest.mark.parametrize("scoring_func,topk_method,norm_topk_prob", ROUTER_CASES)
def test_router_matches_numpy_reference_pseudo_code(scoring_func, topk_method, norm_topk_prob):
    cfg = _router_cfg(scoring_func, topk_method, norm_topk_prob)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((256, cfg.hidden_size)).astype(np.float32)
    weight = (rng.standard_normal((8, cfg.hidden_size)) / 2).astype(np.float32)
    bias = (0.3 * rng.standard_normal(8)).astype(np.float32) if topk_method == "noaux_tc" else None
    router = _make_router(cfg, weight, bias)
    with torch.no_grad():
        w, idx = router(torch.from_numpy(x))
    assert w.dtype == torch.float32 and idx.shape == (256, 3)
    ref_w, ref_idx, kept = numpy_router(x, weight, bias, cfg)
    got_w, got_idx = _sorted_by_expert(w.numpy(), idx.numpy())
    ref_w, ref_idx = _sorted_by_expert(ref_w, ref_idx)
    assert np.array_equal(got_idx, ref_idx)
    np.testing.assert_allclose(got_w, ref_w, rtol=1e-5, atol=1e-7)
    if kept is not None:  # no chosen expert lies in a dropped group
        assert all(set(row_idx // 2) <= set(row_kept) for row_idx, row_kept in zip(got_idx, kept))
        # and the groups matter: a plain top-k would have chosen differently for some tokens
        plain = dataclasses.replace(cfg, topk_method="greedy")
        assert not np.array_equal(_sorted_by_expert(*numpy_router(x, weight, bias, plain)[:2])[1], got_idx)


@pytest.mark.parametrize("scoring_func,topk_method,logits,expected", [
    # noaux_tc: expert 0 has the best score but its group's top-2 sum loses to groups 1 and 2
    ("sigmoid", "noaux_tc", [5, -5, 1, 1.1, 0.9, 0.8, -3, -3], {2, 3, 4}),
    # noaux_tc: expert 4 (second best) is in group 2, whose top-2 sum loses to groups 0 and 1
    ("softmax", "noaux_tc", [3, -5, 2.5, 2.4, 2.6, -9, -7, -8], {0, 2, 3}),
    ("sigmoid", "noaux_tc", [3, -5, 2.5, 2.4, 2.6, -9, -7, -8], {0, 2, 3}),
    # group_limited_greedy: expert 4 (third best) is in a dropped group; a poor expert of a kept group wins
    ("softmax", "group_limited_greedy", [3, -5, 2.9, -6, 2.8, -4, -7, -8], {0, 1, 2}),
    ("sigmoid", "group_limited_greedy", [3, -5, 2.9, -6, 2.8, -4, -7, -8], {0, 1, 2}),
])
def test_router_never_chooses_experts_of_dropped_groups(scoring_func, topk_method, logits, expected):
    cfg = _router_cfg(scoring_func, topk_method, True, hidden=8)
    router = _make_router(cfg, np.eye(8, dtype=np.float32), np.zeros(8, dtype=np.float32))  # logits = x
    x = np.array([logits], dtype=np.float32)
    with torch.no_grad():
        _, idx = router(torch.from_numpy(x))
    assert set(idx[0].tolist()) == expected
    assert set(numpy_router(x, np.eye(8), np.zeros(8) if topk_method == "noaux_tc" else None, cfg)[1][0]) == expected


# ---- presets ----------------------------------------------------------------------------------

def test_preset_weights_are_deterministic_per_seed():
    a, b, c = models.load("tiny", seed=0), models.load("tiny", seed=0), models.load("tiny", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(not torch.equal(sa[k], sc[k]) for k in sa)
    biases = [k for k in sa if k.endswith("e_score_correction_bias")]
    assert biases and all(sa[k].abs().min() > 0 for k in biases)


def _hf_meta_param_count(cfg: DeepseekConfig) -> int:
    """transformers' own model of this config.json, on the meta device: parameters + router bias buffers."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = cfg.to_hf_dict()
    hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    return (sum(p.numel() for p in model.parameters())
            + sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")))


def test_param_count_of_deepseek_v3_671b_is_671b_without_mtp():
    """DeepSeek-V3 model card: 685B on the Hub = 671B main model + 14B MTP module. param_count has no MTP."""
    cfg = preset_config("deepseek-v3-671b")
    n = cfg.param_count()
    assert n == _hf_meta_param_count(cfg)
    assert abs(n - 671e9) / 671e9 < 0.005


def test_param_count_of_deepseek_v2_lite_is_15_7b():
    """DeepSeek-V2-Lite model card: 15.7B total parameters."""
    cfg = preset_config("deepseek-v2-lite")
    n = cfg.param_count()
    assert n == _hf_meta_param_count(cfg)
    assert abs(n - 15.7e9) / 15.7e9 < 0.005


@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])
def test_param_count_equals_the_materialised_models(tiny_models, name):
    model = tiny_models[name]
    n = sum(t.numel() for t in model.state_dict().values())
    assert model.config.param_count() == n


# ---- the public API ---------------------------------------------------------------------------

def test_load_preset_returns_eval_module_whose_forward_gives_fp32_logits():
    model = models.load("tiny")
    assert isinstance(model, torch.nn.Module)
    assert not model.training and not any(m.training for m in model.modules())
    ids = torch.randint(0, model.config.vocab_size, (3, 5))
    with torch.no_grad():
        logits = model(ids)
    assert logits.dtype == torch.float32
    assert logits.shape == (3, 5, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["deepseek-v3-671b", "deepseek-v2-lite"])
def test_load_of_a_config_only_preset_raises_config_error(name):
    with pytest.raises(models.ConfigError, match="config-only") as e:
        models.load(name)
    assert name in str(e.value)
    assert isinstance(e.value, models.MlamoeError)
    assert models.load_config(name).num_hidden_layers > 0  # the config itself is available


def test_load_of_an_unknown_preset_raises_config_error_naming_the_presets():
    with pytest.raises(models.ConfigError) as e:
        models.load("nope")
    msg = str(e.value)
    assert "'nope'" in msg
    assert all(p in msg for p in models.PRESETS)
