"""The DeepSeek-V4 family (models/v4*.py) against transformers 5.24's DeepseekV4ForCausalLM (fp32, eager):
a tiny random checkpoint written by transformers' save_pretrained (every layer type, hash layers, YaRN on the
compress rope, non-zero sinks / routing bias / position biases / mHC biases) loads through models.load and
matches transformers' logits for a batch-2 prompt crossing CSA and HCA windows, for 16 cached decode steps and
for a chunked prefill; injected faults fail the comparison; config errors are named; the cache spec.

Reference: transformers' no-cache `forward` over the whole sequence (teacher-forced: our cached steps see the
same tokens). Its cached `forward` with an explicit DynamicCache(config=cfg) is checked to agree with that
(test_transformers_own_cached_forward_agrees_with_its_forward). `generate()` is not used: on CSA layers it
disagrees with transformers' own forward (REFERENCE.md, DeepSeek-V4), while the no-cache forward is the
plain statement of the math (every compressed entry built from the prompt at once, no state carried).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import models
from models.errors import ConfigError
from models.v4 import DeepseekV4ForCausalLM
from models.v4_config import CSA, HCA, SLIDING, DeepseekV4Config

TOL = 1e-4
BATCH, PROMPT_LEN, DECODE_STEPS = 2, 21, 16  # 21: 5 CSA windows (m=4) + 1, 2 HCA windows (m=8) + 5
TYPES = [SLIDING, CSA, HCA, CSA]
CHUNKS = (5, 7, 3, 1, 6, 2, 4, 9)  # 37 tokens: windows split across chunks


def hf_v4_config(**over):
    from transformers import DeepseekV4Config as HFConfig
    kw = dict(vocab_size=128, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
              head_dim=32, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4, o_groups=2, o_lora_rank=8,
              index_n_heads=8, index_head_dim=16, index_topk=3, sliding_window=8, partial_rotary_factor=0.25,
              compress_rates={CSA: 4, HCA: 8}, layer_types=list(TYPES),
              mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], hc_mult=4, hc_sinkhorn_iters=6,
              rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "beta_fast": 32, "beta_slow": 1},
              max_position_embeddings=256, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5)
    kw.update(over)
    cfg = HFConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def hf_v4_model(seed: int = 0, **over):
    """Random transformers V4 with unit-scale matrices and every bias / sink / table non-trivial (its
    _init_weights zeroes sinks, position_bias, mHC bases, e_score_correction_bias and tid2eid)."""
    from transformers import DeepseekV4ForCausalLM as HFModel
    torch.manual_seed(seed)
    model = HFModel(hf_v4_config(**over)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    E = model.config.n_routed_experts
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if name.endswith("tid2eid"):
                t.copy_(torch.stack([torch.randperm(E, generator=g)[:t.shape[1]] for _ in range(t.shape[0])]))
            elif name.endswith("norm.weight"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            elif t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5)
            else:  # sinks, position biases, mHC base / scale, e_score_correction_bias
                t.copy_(0.5 * torch.randn(t.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def hf_v4(tmp_path_factory):
    """(transformers model, its save_pretrained folder, tokens [B, PROMPT_LEN + DECODE_STEPS], forward logits)."""
    hf = hf_v4_model()
    path = tmp_path_factory.mktemp("hf_v4")
    hf.save_pretrained(path)
    ids = torch.randint(0, hf.config.vocab_size, (BATCH, PROMPT_LEN + DECODE_STEPS),
                        generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
    return hf, path, ids, ref


@pytest.fixture(scope="module")
def ours(hf_v4):
    return models.load(hf_v4[1])


@torch.no_grad()
def prefill_then_decode(model, ids):
    logits, cache = model.step(ids[:, :PROMPT_LEN], model.empty_cache(ids.shape[0]))
    out = [logits]
    for i in range(PROMPT_LEN, ids.shape[1]):
        logits, cache = model.step(ids[:, i:i + 1], cache)
        out.append(logits)
    return torch.cat(out, dim=1), cache


def max_err(a, b) -> float:
    return (a - b).abs().max().item()


def test_transformers_checkpoint_loads_as_the_v4_family(ours, hf_v4):
    hf, path, _, _ = hf_v4
    assert isinstance(ours, DeepseekV4ForCausalLM) and models.family_of(ours).name == "v4"
    cfg = ours.config
    assert cfg.layer_types == TYPES and cfg.mlp_layer_types[:2] == ["hash_moe"] * 2
    assert cfg.rope_parameters == hf.config.rope_parameters
    assert models.load_config(path) == cfg
    theirs, mine = hf.state_dict(), ours.state_dict()
    assert set(theirs) == set(mine) and all(theirs[k].shape == mine[k].shape for k in theirs)
    for n in ("model.hc_head.hc_fn", "model.layers.0.mlp.gate.tid2eid", "model.layers.2.mlp.gate.e_score_correction_bias",
              "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight",
              "model.layers.1.self_attn.sinks", "model.layers.3.mlp.experts.gate_up_proj", "lm_head.weight"):
        assert n in mine
    assert mine["model.layers.3.mlp.experts.gate_up_proj"].shape == (4, 32, 32)
    assert torch.equal(mine["model.layers.0.mlp.gate.tid2eid"], theirs["model.layers.0.mlp.gate.tid2eid"])
    assert cfg.param_count() == sum(t.numel() for t in mine.values())
    fresh = DeepseekV4ForCausalLM(cfg)
    fresh.load_state_dict(theirs, strict=True)


def test_rope_frequencies_equal_transformers(ours, hf_v4):
    rot = hf_v4[0].model.rotary_emb
    for kind in ("main", "compress"):
        assert torch.allclose(ours.freqs[kind], getattr(rot, f"{kind}_inv_freq"), rtol=1e-6, atol=0)
        assert getattr(rot, f"{kind}_attention_scaling") == 1.0


def test_prompt_matches_transformers_forward(ours, hf_v4):
    hf, _, ids, ref = hf_v4
    with torch.no_grad():
        logits = ours(ids[:, :PROMPT_LEN])
    assert logits.shape == (BATCH, PROMPT_LEN, hf.config.vocab_size)
    assert ref.abs().max() > 1.0 and ref.std(-1).min() > 0.1  # not trivially flat
    assert max_err(logits, ref[:, :PROMPT_LEN]) <= TOL
    assert max_err(ours(ids), ref) <= TOL


def test_sixteen_cached_decode_steps_match_transformers_forward(ours, hf_v4):
    _, _, ids, ref = hf_v4
    logits, cache = prefill_then_decode(ours, ids)
    assert max_err(logits, ref) <= TOL
    T = PROMPT_LEN + DECODE_STEPS
    spec = ours.cache_spec()
    assert spec.length(cache) == T
    for layer, tensors in zip(cache, spec.layers):
        for t, x in zip(tensors, layer):
            assert list(x.shape) == t.symbolic(BATCH, T), (t.name, x.shape)


def test_chunked_prefill_equals_one_shot_prefill_and_transformers(ours, hf_v4):
    _, _, ids, ref = hf_v4
    cache, out, a = ours.empty_cache(BATCH), [], 0
    with torch.no_grad():
        for c in CHUNKS:
            logits, cache = ours.step(ids[:, a:a + c], cache)
            out.append(logits)
            a += c
        one_shot, cache1 = ours.step(ids, ours.empty_cache(BATCH))
    assert a == ids.shape[1]
    assert max_err(torch.cat(out, 1), one_shot) <= TOL and max_err(one_shot, ref) <= TOL
    for l0, l1 in zip(cache, cache1):
        for x0, x1 in zip(l0, l1):
            assert x0.shape == x1.shape and torch.allclose(x0, x1, atol=1e-5, equal_nan=True)


def test_transformers_own_cached_forward_agrees_with_its_forward(hf_v4):
    from transformers import DynamicCache
    hf, _, ids, ref = hf_v4
    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        out = [hf(input_ids=ids[:, :PROMPT_LEN], cache=cache, use_cache=True).logits]
        for i in range(PROMPT_LEN, ids.shape[1]):
            out.append(hf(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True).logits)
    assert max_err(torch.cat(out, 1).float(), ref) <= TOL


def test_the_indexer_drops_entries_and_has_no_ties_at_the_boundary(ours, hf_v4, monkeypatch):
    """The CSA comparison means something only if the top-k drops visible entries and is unambiguous."""
    import models.v4_compressor as comp
    seen = []
    real = comp.top_ids

    def spy(scores, k):
        seen.append((scores.detach().clone(), k))
        return real(scores, k)

    monkeypatch.setattr(comp, "top_ids", spy)
    prefill_then_decode(ours, hf_v4[2])
    dropped = 0
    for s, k in seen:
        vals = s.sort(dim=-1, descending=True).values
        if vals.shape[-1] > k:
            finite = torch.isfinite(vals)
            both = finite[..., k - 1] & finite[..., k]
            assert not (both & (vals[..., k - 1] == vals[..., k])).any()
            dropped += int(finite[..., k].sum())
    assert dropped > 0


def _broken(model, edit):
    b = DeepseekV4ForCausalLM(model.config)
    b.load_state_dict(model.state_dict())
    b.freqs = model.freqs
    edit(b)
    return b.eval()



def _sinkhorn_skipped(monkeypatch):
    """comb left row-stochastic (softmax only). Normalising rows first instead of columns converges to almost
    the same matrix (0.006 in the logits here): too weak a fault for the 100 x TOL bar."""
    import models.v4_hc as hc
    monkeypatch.setattr(hc, "sinkhorn", lambda c, i, e: c)


def _comb_untransposed(monkeypatch):
    from models.v4_hc import HyperConnection
    monkeypatch.setattr(HyperConnection, "merge", staticmethod(
        lambda post, comb, out, streams: post.unsqueeze(-1) * out.unsqueeze(-2) + comb @ streams))


def _overlap_dropped(monkeypatch):
    """CSA entries pool only their own window (Ca of the previous window given weight 0)."""
    from models.v4_compressor import Compressor
    real = Compressor.forward

    def forward(self, x, state, past_entries, freqs):
        if self.overlap:
            state = (state[0], state[1], state[2], torch.full_like(state[3], float("-inf")))
            entries, new = real(self, x, state, past_entries, freqs)
            return entries, new[:3] + (torch.full_like(new[3], float("-inf")),)
        return real(self, x, state, past_entries, freqs)

    monkeypatch.setattr(Compressor, "forward", forward)


def _shared_expert_unclamped(monkeypatch):
    from models.v4_moe import SharedExpert
    monkeypatch.setattr(SharedExpert, "forward", lambda self, x: self.down_proj(
        torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)))


FAULTS = {
    "sinks dropped": lambda m, mp: _broken(m, lambda b: [l.self_attn.sinks.data.fill_(-1e9) for l in b.model.layers]),
    "CSA overlap skipped": lambda m, mp: (_overlap_dropped(mp), m)[1],
    "Sinkhorn projection skipped": lambda m, mp: (_sinkhorn_skipped(mp), m)[1],
    "comb applied untransposed": lambda m, mp: (_comb_untransposed(mp), m)[1],
    "routing bias ignored": lambda m, mp: _broken(m, lambda b: [l.mlp.gate.e_score_correction_bias.data.zero_()
                                                               for l in b.model.layers if not l.mlp.gate.hashed]),
    "index_topk raised (dense CSA)": lambda m, mp: _broken(m, lambda b: [
        setattr(l.self_attn.compressor.indexer, "topk", 64) for l in b.model.layers if l.self_attn.layer_type == CSA]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_fails_the_comparison(ours, hf_v4, fault, monkeypatch):
    _, _, ids, ref = hf_v4
    logits, _ = prefill_then_decode(FAULTS[fault](ours, monkeypatch), ids)
    assert max_err(logits, ref) > 100 * TOL, fault


def test_swiglu_limit_clamps_the_shared_expert_too(ours, monkeypatch):
    """With a small swiglu_limit the clamps bind; dropping the shared expert's clamp changes the output."""
    from models.v4_moe import SharedExpert
    m = _broken(ours, lambda b: None)
    for layer in m.model.layers:
        layer.mlp.experts.limit = layer.mlp.shared_experts.limit = 0.05
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        clamped = m(ids)
        monkeypatch.setattr(SharedExpert, "forward", lambda self, x: self.down_proj(
            torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)))
        assert max_err(m(ids), clamped) > 100 * TOL


def test_cache_spec_shapes_length_and_manifest():
    tiny = models.load("tiny-v4")
    cfg = tiny.config
    spec = tiny.cache_spec()
    D, Di, W = cfg.head_dim, cfg.index_head_dim, cfg.sliding_window
    assert [t.name for t in spec.layer_tensors(0)] == ["window"]
    assert [t.name for t in spec.layer_tensors(2)] == ["window", "pending_kv", "pending_gate", "compressed"]
    assert [t.name for t in spec.layer_tensors(1)] == [
        "window", "pending_kv", "pending_gate", "overlap_kv", "overlap_gate", "compressed",
        "index_pending_kv", "index_pending_gate", "index_overlap_kv", "index_overlap_gate", "index_key"]
    assert spec.input_names([2]) == ["past.2.window", "past.2.pending_kv", "past.2.pending_gate", "past.2.compressed"]
    empty = tiny.empty_cache(3)
    assert [tuple(x.shape) for x in empty[1]] == [(3, 0, D), (3, 0, 2 * D), (3, 0, 2 * D), (3, 4, D), (3, 4, D),
                                                  (3, 0, D), (3, 0, 2 * Di), (3, 0, 2 * Di), (3, 4, Di), (3, 4, Di),
                                                  (3, 0, Di)]
    assert torch.isinf(empty[1][4]).all() and (empty[1][3] == 0).all()
    assert spec.length(empty) == 0
    with torch.no_grad():
        _, cache = tiny.step(torch.arange(27).view(1, 27), tiny.empty_cache(1))
    assert spec.length(cache) == 27
    assert cache[0][0].shape[1] == W - 1 and cache[2][1].shape[1] == 27 % 8 and cache[2][3].shape[1] == 27 // 8
    assert cache[1][1].shape[1] == 27 % 4 and cache[1][5].shape[1] == 27 // 4 and cache[1][10].shape[1] == 27 // 4
    man = spec.to_manifest()
    # long-run bytes per token (fp32): HCA D/8, CSA D/4 + Di/4, sliding 0
    csa, hca = 4 * (D / 4 + Di / 4), 4 * D / 8
    assert man["bytes_per_token"] == 2 * csa + 2 * hca
    kinds = [man["layer_kinds"][k]["bytes_per_token"] for k in man["layer_kind_of"]]
    assert kinds == [0, csa, hca, csa, hca]
    window = 4 * (W - 1) * D
    hca_bounded = window + 4 * 2 * 7 * D
    csa_bounded = window + 4 * (2 * 3 * 2 * D + 2 * 4 * D) + 4 * (2 * 3 * 2 * Di + 2 * 4 * Di)
    assert man["bounded_bytes_per_batch_row"] == window + 2 * csa_bounded + 2 * hca_bounded
    real = models.family_for("deepseek_v4").cache_spec(models.load_config("deepseek-v4-flash"), "compressed")
    kinds = {man["kind"]: man for man in real.to_manifest()["layer_kinds"]}
    values = sorted(k["values_per_token"] for k in kinds.values())
    assert values == [512 / 128, 512 / 4 + 128 / 4]  # REFERENCE.md: HCA 4, CSA 160 per token per layer
    with pytest.raises(ConfigError, match="'latent'.*compressed"):
        tiny.cache_spec("latent")


def test_presets():
    tiny = models.load_config("tiny-v4")
    assert set(tiny.layer_types) == {SLIDING, CSA, HCA} and set(tiny.mlp_layer_types) == {"hash_moe", "moe"}
    assert tiny.param_count() < 1_000_000 and tiny.index_topk < 30 // tiny.csa_rate
    assert 20e6 < models.load_config("small-v4").param_count() < 40e6
    flash = models.load_config("deepseek-v4-flash")
    assert (flash.num_hidden_layers, flash.hidden_size, flash.num_attention_heads, flash.head_dim,
            flash.qk_rope_head_dim, flash.n_routed_experts, flash.index_topk) == (43, 4096, 64, 512, 64, 256, 512)
    assert 280e9 < flash.param_count() < 290e9
    pro = models.load_config("deepseek-v4-pro")
    assert (pro.num_hidden_layers, pro.hidden_size, pro.num_attention_heads, pro.o_groups, pro.n_routed_experts) == \
        (61, 7168, 128, 16, 384)
    with pytest.raises(ConfigError, match="config-only"):
        models.load("deepseek-v4-flash")


def test_legacy_config_fields_fold_in_as_transformers_folds_them(hf_v4):
    from transformers import DeepseekV4Config as HFConfig
    legacy = {"model_type": "deepseek_v4", "num_hidden_layers": 4, "compress_ratios": [0, 4, 128, 4, 0],
              "compress_rate_csa": 4, "compress_rate_hca": 128, "num_hash_layers": 2, "qk_rope_head_dim": 64,
              "head_dim": 512, "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
              "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                               "beta_fast": 32, "beta_slow": 1}}
    ours = DeepseekV4Config.from_hf_dict(legacy)
    theirs = HFConfig(**{k: v for k, v in legacy.items() if k != "model_type"})
    assert ours.layer_types == theirs.layer_types == [SLIDING, CSA, HCA, CSA]
    assert ours.mlp_layer_types == theirs.mlp_layer_types == ["hash_moe", "hash_moe", "moe", "moe"]
    assert ours.compress_rates == theirs.compress_rates and ours.qk_rope_head_dim == theirs.qk_rope_head_dim == 64
    assert ours.rope_parameters["compress"]["rope_type"] == "yarn" and ours.rope_parameters["compress"]["attention_factor"] == 1.0
    assert DeepseekV4Config.from_hf_dict(ours.to_hf_dict()) == ours


def test_save_round_trip_loads_into_transformers(tmp_path):
    from transformers import DeepseekV4ForCausalLM as HFModel
    tiny = models.load("tiny-v4", seed=1)
    path = models.save(tiny, tmp_path / "ckpt")
    hf = HFModel.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (1, 26), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_err(tiny(ids), hf(input_ids=ids).logits.float()) <= TOL
    assert models.load(path).config == tiny.config


@pytest.mark.parametrize("field, value, words", [
    ("layer_types", ["sliding_attention", "full_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"], "'full_attention' is not one of"),
    ("layer_types", [SLIDING, CSA], "num_hidden_layers=4 entries"),
    ("mlp_layer_types", ["hash_moe", "dense", "moe", "moe"], "'dense' is not one of"),
    ("head_dim", 30, "partial_rotary_factor"),
    ("o_groups", 3, "must divide num_attention_heads=4"),
    ("index_topk", 0, "must be a positive integer"),
    ("scoring_func", "relu", "sqrtsoftplus, softmax, sigmoid"),
    ("num_key_value_heads", 2, "one KV head"),
    ("compress_ratios", [0, 4, 16, 4], "0 (sliding), 4 (CSA) or 128 (HCA)"),
])
def test_bad_config_values_are_clear_config_errors(hf_v4, tmp_path, field, value, words):
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_v4[1], folder)
    d = json.loads((folder / "config.json").read_text())
    d[field] = value
    if field == "compress_ratios":
        d.pop("layer_types")
    if field == "head_dim":
        d["rope_parameters"]["compress"]["partial_rotary_factor"] = 0.3
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        models.load(folder)
    msg = str(e.value)
    assert str(folder / "config.json") in msg and words in msg
    if field != "head_dim":
        assert f"'{field}'" in msg and repr(value) in msg


def test_checkpoint_that_does_not_match_its_config_is_a_clear_error(hf_v4, tmp_path):
    from safetensors.torch import load_file, save_file
    from models.errors import CheckpointError
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_v4[1], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.attn.indexer.wq_b.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="1 tensor.s. missing, e.g. 'model.layers.1.self_attn.compressor.indexer.q_b_proj.weight' "
                       r"\(native name 'layers.1.attn.indexer.wq_b.weight'\)"):
        models.load(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(CheckpointError, match="pickle"):
        models.load(folder)
