"""The DeepSeek-V3.2 family (models/v32*.py, models/indexer.py) against transformers 5.24's
DeepseekV32ForCausalLM: tiny random checkpoints written by transformers' save_pretrained load through
models.load (family from model_type) and match transformers' logits for a prompt longer than index_topk and
for 16 cached decode steps; faults in the indexer make the comparison fail; the cache spec; config errors.

The decode reference is transformers' full-sequence forward (teacher-forced: the same tokens fed one at a time
to our step with the cache). transformers' own cached forward is checked against that forward too.
"""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import models
from models.errors import ConfigError
from models.indexer import LightningIndexer
from models.v32 import DeepseekV32ForCausalLM
from models.v32_config import DeepseekV32Config

TOL = 1e-4
BATCH, PROMPT_LEN, DECODE_STEPS = 2, 12, 16
INDEX_TOPK = 5  # below the prompt length: every query past position 4 attends to a strict subset


def hf_v32_config(**over):
    from transformers import DeepseekV32Config as HFConfig
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
              first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
              n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, q_lora_rank=24, kv_lora_rank=32,
              qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True,
              index_n_heads=8, index_head_dim=16, index_topk=INDEX_TOPK, max_position_embeddings=256,
              rope_parameters=rope, tie_word_embeddings=False)
    kw.update(over)
    return HFConfig(**kw)


def hf_v32_model(seed: int = 0, **over):
    """Random transformers V3.2 with unit-scale weights, non-zero routing bias and a non-trivial k_norm."""
    from transformers import DeepseekV32ForCausalLM as HFModel
    torch.manual_seed(seed)
    model = HFModel(hf_v32_config(**over)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if name.endswith("e_score_correction_bias") or name.endswith("norm.bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif name.endswith("norm.weight"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            elif t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def hf_v32(tmp_path_factory):
    """(transformers model, its save_pretrained folder, tokens [B, PROMPT_LEN + DECODE_STEPS], forward logits)."""
    hf = hf_v32_model()
    path = tmp_path_factory.mktemp("hf_v32")
    hf.save_pretrained(path)
    ids = torch.randint(0, hf.config.vocab_size, (BATCH, PROMPT_LEN + DECODE_STEPS),
                        generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
    return hf, path, ids, ref


@pytest.fixture(scope="module")
def ours(hf_v32):
    return models.load(hf_v32[1])


@torch.no_grad()
def prefill_then_decode(model, ids, layout="latent"):
    """Prefill PROMPT_LEN tokens, then feed the rest one at a time with the cache -> logits [B, T, V]."""
    logits, cache = model.step(ids[:, :PROMPT_LEN], model.empty_cache(ids.shape[0], layout), layout)
    out = [logits]
    for i in range(PROMPT_LEN, ids.shape[1]):
        logits, cache = model.step(ids[:, i:i + 1], cache, layout)
        out.append(logits)
    return torch.cat(out, dim=1), cache


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


def test_transformers_checkpoint_loads_as_the_v32_family(ours, hf_v32):
    assert isinstance(ours, DeepseekV32ForCausalLM) and models.family_of(ours).name == "v32"
    cfg = ours.config
    assert (cfg.model_type, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == ("deepseek_v32", 8, 16, INDEX_TOPK)
    assert models.load_config(hf_v32[1]) == cfg
    names = set(ours.state_dict())
    for n in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"):
        assert f"model.layers.2.self_attn.indexer.{n}" in names
    assert cfg.param_count() == sum(t.numel() for t in ours.state_dict().values())


@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_prompt_longer_than_index_topk_matches_transformers(ours, hf_v32, form):
    hf, _, ids, ref = hf_v32
    ours.attention = form
    try:
        with torch.no_grad():
            logits = ours(ids[:, :PROMPT_LEN])
            hf_prompt = hf(input_ids=ids[:, :PROMPT_LEN]).logits.float()
    finally:
        ours.attention = "naive"
    assert logits.shape == hf_prompt.shape == (BATCH, PROMPT_LEN, hf.config.vocab_size)
    assert max_err(logits, hf_prompt) <= TOL
    assert max_err(logits, ref[:, :PROMPT_LEN]) <= TOL


@pytest.mark.parametrize("layout", ["latent", "expanded"])
def test_sixteen_cached_decode_steps_match_transformers_forward(ours, hf_v32, layout):
    hf, _, ids, ref = hf_v32
    logits, cache = prefill_then_decode(ours, ids, layout)
    assert logits.shape == ref.shape
    assert max_err(logits[:, :PROMPT_LEN], ref[:, :PROMPT_LEN]) <= TOL
    assert max_err(logits[:, PROMPT_LEN:], ref[:, PROMPT_LEN:]) <= TOL
    assert ours.cache_spec(layout).length(cache) == PROMPT_LEN + DECODE_STEPS
    assert cache[0][2].shape == (BATCH, PROMPT_LEN + DECODE_STEPS, 16)  # index_key, one row per token


def test_chunked_prefill_then_decode_matches_transformers_forward(ours, hf_v32):
    """Prefill in chunks of 5, 4 and 3 tokens (each chunk's queries see the cache and their own causal part)."""
    _, _, ids, ref = hf_v32
    cache, out = ours.empty_cache(BATCH), []
    with torch.no_grad():
        for a, b in ((0, 5), (5, 9), (9, PROMPT_LEN)) + tuple((i, i + 1) for i in range(PROMPT_LEN, ids.shape[1])):
            logits, cache = ours.step(ids[:, a:b], cache)
            out.append(logits)
    assert max_err(torch.cat(out, 1), ref) <= TOL


def test_indexer_selects_what_transformers_indexer_selects(ours, hf_v32):
    """One layer's LightningIndexer against transformers' DeepseekV32Indexer on the same inputs: the same
    key sets per query (order aside), on rows where the selection drops keys."""
    hf, _, ids, _ = hf_v32
    T = ids.shape[1]
    x = torch.randn(BATCH, T, hf.config.hidden_size, generator=torch.Generator().manual_seed(5))
    attn_hf, attn = hf.model.layers[1].self_attn, ours.model.layers[1].self_attn
    positions = torch.arange(T)
    causal = torch.where(positions[None, :] <= positions[:, None], 0.0, float("-inf"))
    with torch.no_grad():
        q_lat = attn.q_latent(x)
        ids_hf = attn_hf.indexer(x, attn_hf.q_a_layernorm(attn_hf.q_a_proj(x)),
                                 hf.model.rotary_emb(x, positions[None]),
                                 torch.where(causal == 0, 0.0, torch.finfo(torch.float32).min).expand(BATCH, T, T),
                                 positions[None])
        cos, sin = ours_cos_sin(ours, positions)
        keys = attn.indexer.key(x, cos, sin)
        ids_ours = attn.indexer.select(attn.indexer.scores(x, q_lat, cos, sin, keys, causal))
    rows = positions >= INDEX_TOPK  # queries with more visible keys than index_topk
    assert torch.equal(ids_ours[:, rows].sort(-1).values, ids_hf.long()[:, rows].sort(-1).values)


def ours_cos_sin(model, positions):
    from models.rope import rope_cos_sin
    return rope_cos_sin(positions, model.rope_inv_freq, model.rope_factor)


def test_transformers_own_cached_forward_agrees_with_its_forward(hf_v32):
    """No V4-like quirk here: transformers' V3.2 with a DynamicCache equals its full forward."""
    from transformers import DynamicCache
    hf, _, ids, ref = hf_v32
    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        out = [hf(input_ids=ids[:, :PROMPT_LEN], cache=cache, use_cache=True).logits]
        for i in range(PROMPT_LEN, ids.shape[1]):
            out.append(hf(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits)
    assert max_err(torch.cat(out, 1).float(), ref) <= TOL


def test_no_ties_at_the_selection_boundary(ours, hf_v32, monkeypatch):
    """The comparisons above are meaningful only if the top-k is unambiguous (ties go to the lower key id
    here, and arbitrarily in torch.topk); and the selection must actually drop keys."""
    seen = []
    real = LightningIndexer.select

    def spy(self, scores):
        seen.append(scores.detach().clone())
        return real(self, scores)

    monkeypatch.setattr(LightningIndexer, "select", spy)
    prefill_then_decode(ours, hf_v32[2])
    dropped = 0
    for s in seen:
        vals = s.sort(dim=-1, descending=True).values
        finite = torch.isfinite(vals)
        k = INDEX_TOPK
        if vals.shape[-1] > k:
            both = finite[..., k - 1] & finite[..., k]
            assert not (both & (vals[..., k - 1] == vals[..., k])).any()
            dropped += int(finite[..., k].sum())
    assert dropped > 0


def _with(model, edit):
    broken = DeepseekV32ForCausalLM(model.config, model.attention)
    broken.load_state_dict(model.state_dict())
    edit(broken)
    return broken.eval()


def _dense(model):
    cfg = dataclasses.replace(model.config, index_topk=PROMPT_LEN + DECODE_STEPS)
    dense = DeepseekV32ForCausalLM(cfg, model.attention)
    dense.load_state_dict(model.state_dict())
    return dense.eval()


def _interleaved_indexer_rope(m):
    from models.rope import apply_rope
    for layer in m.model.layers:
        ix = layer.self_attn.indexer
        ix._rope = (lambda ix: lambda x, cos, sin: torch.cat(
            [apply_rope(x[..., :ix.rope], cos, sin), x[..., ix.rope:]], dim=-1))(ix)


FAULTS = {
    "index_topk raised past the sequence (dense MLA)": _dense,
    "index_topk lowered by one": lambda m: _with(m, lambda b: [setattr(l.self_attn.indexer, "topk", INDEX_TOPK - 1)
                                                              for l in b.model.layers]),
    "k_norm dropped": lambda m: _with(m, lambda b: [setattr(l.self_attn.indexer, "k_norm", torch.nn.Identity())
                                                   for l in b.model.layers]),
    "interleaved RoPE in the indexer": lambda m: _with(m, _interleaved_indexer_rope),
    "weights_proj ignored": lambda m: _with(m, lambda b: [l.self_attn.indexer.weights_proj.weight.data.fill_(1.0)
                                                         for l in b.model.layers]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_in_the_indexer_fails_the_comparison(ours, hf_v32, fault):
    _, _, ids, ref = hf_v32
    logits, _ = prefill_then_decode(FAULTS[fault](ours), ids)
    assert max_err(logits, ref) > 100 * TOL, fault


def test_cache_spec_names_and_shapes():
    tiny = models.load("tiny-v32")
    cfg = tiny.config
    latent = tiny.cache_spec("latent")
    assert latent.names == ("c_kv", "k_pe", "index_key")
    assert latent.symbolic_shapes() == [["batch", "past", 64], ["batch", "past", 8], ["batch", "past", 16]]
    assert latent.input_names([1]) == ["past.1.c_kv", "past.1.k_pe", "past.1.index_key"]
    man = latent.to_manifest()
    assert man["values_per_token_per_layer"] == cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim == 88
    assert man["bytes_per_token"] == 88 * 4 * cfg.num_hidden_layers
    expanded = tiny.cache_spec("expanded")
    assert expanded.names == ("key", "value", "index_key")
    assert expanded.symbolic_shapes()[2] == ["batch", "past", 16]
    with torch.no_grad():
        _, cache = tiny.step(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), tiny.empty_cache(1))
    assert [tuple(t.shape) for t in cache[0]] == [(1, 8, 64), (1, 8, 8), (1, 8, 16)]
    with pytest.raises(ConfigError, match="'paged'.*latent, expanded"):
        tiny.cache_spec("paged")
    real = models.family_for("deepseek_v32").cache_spec(models.load_config("deepseek-v3.2"), "latent")
    assert [t.values_per_token() for t in real.tensors] == [512, 64, 128] and real.num_layers == 61


def test_presets_keep_v32_head_ratios_and_the_real_config_is_config_only():
    for name in ("tiny-v32", "small-v32", "deepseek-v3.2"):
        cfg = models.load_config(name)
        assert isinstance(cfg, DeepseekV32Config)
        assert 9 * cfg.index_n_heads * cfg.index_head_dim == cfg.num_attention_heads * cfg.latent_cache_width
        assert cfg.index_head_dim == 2 * cfg.qk_rope_head_dim
    real = models.load_config("deepseek-v3.2")
    assert (real.num_hidden_layers, real.hidden_size, real.index_n_heads, real.index_head_dim, real.index_topk) == \
        (61, 7168, 64, 128, 2048)
    assert models.load_config("tiny-v32").index_topk < 8 and models.load_config("small-v32").index_topk < 8
    with pytest.raises(ConfigError, match="config-only"):
        models.load("deepseek-v3.2")


def test_save_round_trip_loads_into_transformers(tmp_path):
    from transformers import DeepseekV32ForCausalLM as HFModel
    tiny = models.load("tiny-v32", seed=1)
    path = models.save(tiny, tmp_path / "ckpt")
    assert json.loads((path / "config.json").read_text())["architectures"] == ["DeepseekV32ForCausalLM"]
    hf = HFModel.from_pretrained(path).eval()
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_err(tiny(ids), hf(input_ids=ids).logits.float()) <= TOL
    assert models.load(path).config == tiny.config


@pytest.mark.parametrize("field, value, words", [
    ("index_topk", 0, "must be a positive integer"),
    ("index_head_dim", "128", "must be a positive integer"),
    ("index_head_dim", 4, "at least that"),
    ("q_lora_rank", None, "needs a q latent"),
    ("scoring_func", "softmax", "router is sigmoid"),
    ("mlp_layer_types", ["sparse", "dense", "sparse"], "first first_k_dense_replace"),
    ("layer_types", ["full_attention"] * 3, "indexed_attention"),
])
def test_bad_config_values_are_clear_config_errors(hf_v32, tmp_path, field, value, words):
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_v32[1], folder)
    d = json.loads((folder / "config.json").read_text())
    d[field] = value
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        models.load(folder)
    msg = str(e.value)
    assert str(folder / "config.json") in msg and f"'{field}'" in msg and repr(value) in msg and words in msg


def test_tiny_v32_compiles_for_ort_cpu_through_the_family_and_its_cache_spec(tmp_path, stage_cache):
    """The generic pipeline takes the second family as it is: the package's cache IO is the V3.2 spec (latent
    cache plus the indexer key cache), every stage within budget, the golden data re-run and 32 greedy tokens
    equal to the eager V3.2 module (itself checked against transformers above)."""
    from pipeline.compile import compile_package
    from pipeline.verify import verify_full
    pkg = compile_package("tiny-v32", "ort-cpu", tmp_path / "tiny-v32", cache_dir=stage_cache, progress=lambda m: None)
    m = json.loads((pkg / "manifest.json").read_text())
    cfg = models.load("tiny-v32").config
    assert [t["name"] for t in m["io"]["cache"]["per_layer"]] == ["c_kv", "k_pe", "index_key"]
    assert m["io"]["cache"]["values_per_token_per_layer"] == (cfg.kv_lora_rank + cfg.qk_rope_head_dim
                                                               + cfg.index_head_dim)
    assert m["parity"]["passed"]
    # the family's passes run: the decode graph attends over the gathered top-k rows, the MoE is lowered as V3's
    names = [s["name"] for s in m["stages"]]
    assert {"passes/latent-kv-fusion", "passes/moe-ort-fused", "passes/ort-simplify"} <= set(names), names
    fusion = next(s for s in m["stages"] if s["name"] == "passes/latent-kv-fusion")
    decode_note = next(n for n in fusion["notes"] if n.startswith("decode: "))
    report = json.loads(decode_note[len("decode: "):])
    assert [e["form"] for e in report] == ["topk-gather"] * cfg.num_hidden_layers, report
    assert any(n.startswith("prefill: left unchanged") for n in fusion["notes"])
    ok, lines = verify_full(pkg)
    assert ok, lines
