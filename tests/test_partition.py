"""Expert partition planning (parallel/partition.py): balance, coverage, memory, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

import models
from parallel.partition import (PartitionError, config_hash, contiguous_plan, load_routing_stats, moe_layers,
                                plan_command, plan_partition, routing_stats, save_routing_stats, validate_plan)


def zipf_load(cfg, s=1.0, seed=0, tokens=100_000):
    """Tokens per expert per MoE layer: Zipf(s) over the experts, hot experts shuffled per layer."""
    rng = np.random.default_rng(seed)
    z = 1.0 / np.arange(1, cfg.n_routed_experts + 1) ** s
    z = z / z.sum() * tokens * cfg.num_experts_per_tok
    return np.stack([rng.permutation(z) for _ in moe_layers(cfg)])


def covered(plan, cfg):
    for L in plan["layers"]:
        held = [e for h in L["rank_experts"] for e in h]
        assert sorted(set(held)) == list(range(cfg.n_routed_experts)), L["layer"]
        assert len(held) == cfg.n_routed_experts + plan["redundant"]
        assert all(h for h in L["rank_experts"])
        assert all(len(set(h)) == len(h) for h in L["rank_experts"])


@pytest.mark.parametrize("name,ranks,redundant", [("deepseek-v2-lite", 16, 16), ("deepseek-v2-lite", 8, 8),
                                                  ("tiny", 4, 4), ("small", 4, 4)])
def test_skewed_load_balanced_plan_beats_contiguous(name, ranks, redundant):
    cfg = models.load_config(name)
    load = zipf_load(cfg)
    plan = plan_partition(cfg, ranks, redundant, load=load)
    base = contiguous_plan(cfg, ranks, load=load)
    nored = plan_partition(cfg, ranks, 0, load=load)
    print(f"\n{name} {ranks} ranks, Zipf(1.0) load: max/mean rank load, worst layer: balanced+{redundant} redundant "
          f"{plan['imbalance']['max']:.3f}, balanced no redundancy {nored['imbalance']['max']:.3f}, "
          f"contiguous {base['imbalance']['max']:.3f}")
    assert plan["imbalance"]["max"] <= 1.10
    assert base["imbalance"]["max"] > 1.10
    assert base["imbalance"]["max"] > plan["imbalance"]["max"]
    assert nored["imbalance"]["max"] <= base["imbalance"]["max"] + 1e-9
    covered(plan, cfg)
    covered(base, cfg)
    # tokens are conserved: a replicated expert's load is split between its replicas
    for L in plan["layers"]:
        assert sum(L["rank_load"]) == pytest.approx(sum(L["expert_load"]))
    validate_plan(json.loads(json.dumps(plan)), cfg)


def test_uniform_plan_is_balanced_and_covers():
    cfg = models.load_config("deepseek-v3-671b")
    plan = plan_partition(cfg, 64, 16)
    covered(plan, cfg)
    assert plan["load_source"] == "uniform"
    assert plan["imbalance"]["max"] == pytest.approx(1.0)
    assert plan == plan_partition(cfg, 64, 16)  # deterministic


def test_memory_per_rank_671b_hand_computed():
    # Independent hand computation from REFERENCE.md's DeepSeek-V3 671B dims, bf16 (2 bytes/param).
    h, H, qr, r, nope, rope, v = 7168, 128, 1536, 512, 128, 64, 128
    attn = h * qr + qr + qr * H * (nope + rope) + h * (r + rope) + r + r * H * (nope + v) + H * v * h
    per_layer = attn + 2 * h                               # + input / post-attention RMSNorm
    dense = 3 * h * 18432                                  # 3 dense SwiGLU layers
    shared = 3 * h * 2048                                  # 1 shared expert per MoE layer
    router = 256 * h + 256                                 # gate weight + e_score_correction_bias
    replicated = 61 * per_layer + 3 * dense + 58 * (shared + router) + 2 * 129280 * h + h
    expert = 3 * h * 2048
    slots = 58 * (256 + 16)                                # 15776 = 64 * 246.5
    cfg = models.load_config("deepseek-v3-671b")
    plan = plan_partition(cfg, 64, 16)
    mem = plan["memory"]
    assert plan["bytes_per_param"] == 2 and plan["dtype"] == "bf16"
    assert mem["replicated_bytes"] == 2 * replicated
    assert mem["expert_bytes"] == 2 * expert
    assert sorted(mem["rank_slots"]) == [246] * 32 + [247] * 32
    assert sum(mem["rank_slots"]) == slots
    for b, s in zip(mem["rank_bytes"], mem["rank_slots"]):
        assert b == 2 * (replicated + s * expert)
    assert mem["max_rank_bytes"] == 2 * (replicated + 247 * expert)
    print(f"\n671B / 64 ranks / 16 redundant: {mem['max_rank_bytes'] / 2**30:.2f} GiB max per rank (bf16)")
    # whole-model sanity: replicated + all experts once = the config's parameter count
    assert replicated + 58 * 256 * expert == cfg.param_count()


def test_plan_command_config_only():
    plan, text = plan_command("deepseek-v3-671b", 64, 16)
    assert "GiB" in text and "imbalance" in text and "ranks 0-31" in text
    assert plan["ranks"] == 64 and plan["redundant"] == 16
    json.dumps(plan)
    plan2, text2 = plan_command("deepseek-v2-lite", 16, 0)
    assert plan2["model"]["n_routed_experts"] == 64 and "contiguous" in text2


def test_routing_stats_and_stats_file(tmp_path):
    model = models.load("tiny")
    cfg = model.config
    g = np.random.default_rng(0)
    batches = [g.integers(0, cfg.vocab_size, (2, 8)), g.integers(0, cfg.vocab_size, 5).tolist()]
    counts = routing_stats(model, batches)
    assert counts.shape == (len(moe_layers(cfg)), cfg.n_routed_experts)
    assert (counts.sum(axis=1) == (16 + 5) * cfg.num_experts_per_tok).all()
    path = save_routing_stats(tmp_path / "routing_stats.json", counts, config_hash(cfg))
    assert (load_routing_stats(path) == counts).all()
    plan, text = plan_command("tiny", 2, 2, stats_path=path)
    assert plan["load_source"] == "calibration"
    assert plan["layers"][0]["expert_load"] == counts[0].astype(float).tolist()


def test_more_ranks_than_experts():
    cfg = models.load_config("tiny")  # 8 experts
    with pytest.raises(PartitionError, match=r"12 ranks but only 8 routed experts.*at least 4 redundant"):
        plan_partition(cfg, 12, 0)
    with pytest.raises(PartitionError, match="12 ranks"):
        contiguous_plan(cfg, 12)
    plan = plan_partition(cfg, 12, 4)  # allowed with enough replicas: every rank holds one expert
    covered(plan, cfg)
    assert all(len(h) == 1 for L in plan["layers"] for h in L["rank_experts"])
    with pytest.raises(PartitionError, match="ranks = 0"):
        plan_partition(cfg, 0)
    with pytest.raises(PartitionError, match="redundant = -1"):
        plan_partition(cfg, 2, -1)


def test_plan_missing_an_expert():
    cfg = models.load_config("tiny")
    plan = plan_partition(cfg, 4, 0)
    plan["layers"][1]["rank_experts"][2] = plan["layers"][1]["rank_experts"][2][:1]
    with pytest.raises(PartitionError, match=r"does not cover every expert: layer 2 has no rank for experts \[\d\]"):
        validate_plan(plan, cfg)


def test_stale_plan_hash_mismatch():
    cfg = models.load_config("tiny")
    plan = plan_partition(cfg, 4, 0, model_hash="a" * 64)
    validate_plan(plan, cfg, model_hash="a" * 64)
    with pytest.raises(PartitionError, match=f"stale partition plan: it was made for model {'a' * 64} but this "
                                             f"model is {'b' * 64}"):
        validate_plan(plan, cfg, model_hash="b" * 64)
    other = models.load_config("tiny-v2")  # same expert count, another model
    with pytest.raises(PartitionError, match=f"made for config {config_hash(cfg)} but this model's config is "
                                             f"{config_hash(other)}"):
        validate_plan(plan, other)


def test_bad_stats_and_not_a_plan(tmp_path):
    cfg = models.load_config("tiny")
    with pytest.raises(PartitionError, match=r"shape \[3, 8\], expected \[2 MoE layers, 8 experts\]"):
        plan_partition(cfg, 2, load=np.ones((3, 8)))
    with pytest.raises(PartitionError, match="not found"):
        load_routing_stats(tmp_path / "nope.json")
    with pytest.raises(PartitionError, match="not a partition plan"):
        validate_plan({"foo": 1}, cfg)


def test_save_and_load_plan(tmp_path):
    from parallel.partition import load_plan, save_plan
    cfg = models.load_config("tiny")
    plan = plan_partition(cfg, 4, 2, model_hash="c" * 64)
    path = save_plan(plan, tmp_path / "partition.json")
    assert load_plan(path, cfg, model_hash="c" * 64) == json.loads(json.dumps(plan))
    with pytest.raises(PartitionError, match="stale partition plan"):
        load_plan(path, cfg, model_hash="d" * 64)
    with pytest.raises(PartitionError, match="not found"):
        load_plan(tmp_path / "missing.json", cfg)


@pytest.mark.parametrize("ranks, redundant", [(2, 1), (2, 3), (3, 1), (4, 4)])
def test_replicas_of_one_expert_land_on_distinct_ranks(ranks, redundant):
    """Uniform load sorts the extra replicas last; they must still never share a rank with a copy."""
    cfg = models.load_config("tiny")
    plan = plan_partition(cfg, ranks, redundant)
    validate_plan(plan, cfg)
    for layer in plan["layers"]:
        for experts in layer["rank_experts"]:
            assert len(experts) == len(set(experts))
