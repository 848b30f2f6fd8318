"""The MLA family's cache spec (models/mla.py cache_spec, models/cache.py) and the family registry."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import models
from models.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def tiny():
    return models.load("tiny")


def test_manifest_section_is_the_package_io_cache_of_before(tiny):
    """The dict compile wrote into manifest.json's io.cache before the spec existed, spelled out."""
    cfg = tiny.config
    assert tiny.cache_spec("latent").to_manifest() == {
        "layout": "latent", "num_layers": 3, "dtype": "float32",
        "per_layer": [{"name": "c_kv", "shape": ["batch", "past", 32]}, {"name": "k_pe", "shape": ["batch", "past", 8]}],
        "values_per_token_per_layer": 40, "bytes_per_token_per_layer": 160, "bytes_per_token": 480,
        "input_names": "past.{layer}.{name}", "output_names": "present.{layer}.{name}"}
    expanded = tiny.cache_spec("expanded").to_manifest()
    H = cfg.num_attention_heads
    assert expanded["per_layer"] == [{"name": "key", "shape": ["batch", H, "past", cfg.qk_head_dim]},
                                     {"name": "value", "shape": ["batch", H, "past", cfg.v_head_dim]}]
    assert expanded["values_per_token_per_layer"] == cfg.expanded_cache_width
    assert expanded["bytes_per_token"] == cfg.expanded_cache_width * 4 * cfg.num_hidden_layers


def test_flatten_unflatten_and_io_names_follow_the_graphs_order(tiny):
    spec = tiny.cache_spec("latent")
    with torch.no_grad():
        _, cache = tiny.step(torch.tensor([[1, 2, 3]]), tiny.empty_cache(1))
    flat = spec.flatten(cache, "present")
    assert list(flat) == spec.output_names() == [f"present.{i}.{n}" for i in range(3) for n in ("c_kv", "k_pe")]
    assert spec.input_names([1]) == ["past.1.c_kv", "past.1.k_pe"]
    back = spec.unflatten(flat, "present")
    assert all(np.array_equal(a, b.numpy()) for la, lb in zip(back, cache) for a, b in zip(la, lb))
    assert spec.length(cache) == 3
    static = spec.static_empty(2, 16)
    assert static["past.2.k_pe"].shape == (2, 16, 8) and list(static) == spec.input_names()
    assert tiny.cache_spec("expanded").tensors[0].grows == 2


def test_unknown_layout_and_unknown_model_type_are_clear_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match="'paged'.*latent, expanded"):
        tiny.cache_spec("paged")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v9"}))
    with pytest.raises(ConfigError) as e:
        models.load(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "'deepseek_v9'" in str(e.value)
    assert "mla (model_type deepseek_v2, deepseek_v3)" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        models.load(tmp_path / "empty")
    with pytest.raises(ConfigError, match="unknown model preset 'nope'.*tiny"):
        models.load("nope")


def test_a_family_cannot_take_another_familys_model_type():
    clash = models.Family(**{**models.family_for("deepseek_v3").__dict__, "name": "copy"})
    with pytest.raises(ConfigError, match="deepseek_v2.*family 'mla'"):
        models.register(clash)
    assert "copy" not in models.FAMILIES
