"""models/ against the independent reference: transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM.

Checkpoints come from transformers' own save_pretrained (tests/conftest.py: hf_checkpoints), and
checkpoints we write must load back into transformers. All comparisons in fp32.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import hf_reference
import models
from models.presets import init_weights

TOL = 1e-4
PROMPT_LEN, DECODE_STEPS, BATCH = 7, 16, 2


def _ids(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@torch.no_grad()
def _ours_with_cache(model, prompt, continuation, layout="latent"):
    """Our model, same protocol as hf_reference.hf_logits_with_cache."""
    logits, cache = model.step(prompt, model.empty_cache(prompt.shape[0], layout), layout)
    steps = []
    for i in range(continuation.shape[1]):
        step_logits, cache = model.step(continuation[:, i:i + 1], cache, layout)
        steps.append(step_logits[:, -1])
    return logits, torch.stack(steps, dim=1)


@pytest.fixture(scope="module")
def hf_runs(hf_checkpoints):
    """{kind: (prompt, continuation, transformers prefill logits, transformers decode logits)}."""
    out = {}
    for kind, (hf, _) in hf_checkpoints.items():
        vocab = hf.config.vocab_size
        prompt = _ids(vocab, BATCH, PROMPT_LEN, seed=1)
        cont = _ids(vocab, BATCH, DECODE_STEPS, seed=2)
        out[kind] = (prompt, cont, *hf_reference.hf_logits_with_cache(hf, prompt, cont))
    return out


@pytest.mark.parametrize("kind", ["v3", "v2", "v2-greedy"])
def test_transformers_checkpoint_matches_transformers_prefill_and_cached_decode_in_both_forms(
        hf_checkpoints, hf_runs, kind):
    _, path = hf_checkpoints[kind]
    prompt, cont, ref_prefill, ref_decode = hf_runs[kind]
    model = models.load(path, attention="absorbed")
    assert model.attention == "absorbed"
    for form in ("absorbed", "naive"):  # the form chosen at load time, then switched on the loaded model
        model.attention = form
        prefill, decode = _ours_with_cache(model, prompt, cont)
        assert prefill.dtype == torch.float32 and prefill.shape == ref_prefill.shape
        assert decode.shape == ref_decode.shape == (BATCH, DECODE_STEPS, model.config.vocab_size)
        assert (prefill - ref_prefill).abs().max().item() <= TOL, form
        assert (decode - ref_decode).abs().max().item() <= TOL, form


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_the_parity_configs_exercise_score_bias_and_group_limits(hf_checkpoints, hf_runs, kind):
    """Guards the tests above: with the routing detail removed our logits must move away from transformers."""
    _, path = hf_checkpoints[kind]
    prompt, _, ref_prefill, _ = hf_runs[kind]
    model = models.load(path)
    with torch.no_grad():
        if kind == "v3":  # a zero e_score_correction_bias changes the chosen experts
            biases = [m.e_score_correction_bias for m in model.modules() if isinstance(m, models.moe.Router)]
            assert biases and all(b.abs().max() > 0 for b in biases)
            for b in biases:
                b.zero_()
        else:  # keeping every group changes the chosen experts
            assert model.config.topk_method == "group_limited_greedy" and model.config.n_group == 4
            model.config.topk_group = model.config.n_group
        logits = model(prompt)
    assert (logits - ref_prefill).abs().max().item() > 1e-2


def test_latent_norms_use_eps_1e6_like_transformers_whatever_rms_norm_eps_says(tmp_path):
    hf = hf_reference.hf_model("v3", rms_norm_eps=0.3)
    hf.save_pretrained(tmp_path)
    model = models.load(tmp_path)
    prompt = _ids(hf.config.vocab_size, BATCH, PROMPT_LEN, seed=3)
    with torch.no_grad():
        diff = (model(prompt) - hf(prompt).logits).abs().max().item()
    assert diff <= TOL


@pytest.mark.parametrize("kind", ["v3", "v2", "v2-greedy"])
def test_greedy_generate_equals_transformers_greedy_tokens(hf_checkpoints, kind):
    hf, path = hf_checkpoints[kind]
    model = models.load(path, attention="absorbed")
    prompt = _ids(hf.config.vocab_size, BATCH, 5, seed=4)
    n = 8
    tokens, step_logits = models.greedy_generate(model, prompt, n)
    assert tokens.shape == (BATCH, n) and tokens.dtype == torch.long
    with torch.no_grad():
        ref = hf.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones_like(prompt))
        assert torch.equal(tokens, ref[:, prompt.shape[1]:])
        # teacher-forced: transformers' logits at each position chose our token, and equal our step logits
        full = hf(torch.cat([prompt, tokens], dim=1)).logits[:, prompt.shape[1] - 1:-1]
    assert torch.equal(full.argmax(-1), tokens)
    assert (full - step_logits).abs().max().item() <= TOL


def _v2_group_limited_tiny():
    cfg = models.presets.preset_config("tiny-v2")
    return dataclasses.replace(cfg, topk_method="group_limited_greedy", n_group=4, topk_group=2)


@pytest.mark.parametrize("source", ["tiny", "tiny-v2", "tiny-v2-group-limited"])
def test_checkpoint_saved_by_models_save_loads_in_transformers_with_same_logits(tmp_path, source):
    from transformers import AutoModelForCausalLM
    if source == "tiny-v2-group-limited":
        model = models.checkpoint.empty_model(_v2_group_limited_tiny())
        init_weights(model, seed=5)
        model.eval()
    else:
        model = models.load(source)
    models.save(model, tmp_path / "ckpt")
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    hf.eval()
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    cfg = model.config
    expected_cls = "DeepseekV3ForCausalLM" if cfg.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
    assert type(hf).__name__ == expected_cls
    for field in ("n_group", "topk_group", "num_experts_per_tok", "routed_scaling_factor", "norm_topk_prob",
                  "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "n_shared_experts"):
        assert getattr(hf.config, field) == getattr(cfg, field), field
    if cfg.model_type == "deepseek_v2":
        assert hf.config.topk_method == cfg.topk_method
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    prompt = _ids(cfg.vocab_size, BATCH, PROMPT_LEN, seed=6)
    cont = _ids(cfg.vocab_size, BATCH, 4, seed=7)
    ref_prefill, ref_decode = hf_reference.hf_logits_with_cache(hf, prompt, cont)
    prefill, decode = _ours_with_cache(model, prompt, cont)
    assert (prefill - ref_prefill).abs().max().item() <= TOL
    assert (decode - ref_decode).abs().max().item() <= TOL


def test_tied_word_embeddings_checkpoints_match_transformers_both_ways(tmp_path):
    from transformers import AutoModelForCausalLM
    hf = hf_reference.hf_model("v3", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "from_hf")
    ours = models.load(tmp_path / "from_hf")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    prompt = _ids(hf.config.vocab_size, BATCH, PROMPT_LEN, seed=8)
    with torch.no_grad():
        assert (ours(prompt) - hf(prompt).logits).abs().max().item() <= TOL
    models.save(ours, tmp_path / "from_ours")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "from_ours").eval()
    with torch.no_grad():
        assert (ours(prompt) - back(prompt).logits).abs().max().item() <= TOL
