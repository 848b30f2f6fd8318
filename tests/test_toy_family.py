"""A model family defined entirely in this module, registered through models.register, compiled for
ort-cpu with parity against its eager module: the compiler reads its cache spec and asks the family
which passes apply, nothing in the repository names it.

The toy decoder: learned positions, single-head attention and an MLP per layer. Its cache is ONE
tensor per layer, keys and values stacked: kv [batch, 2, past, hidden]."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import models
from models.cache import CacheSpec, CacheTensor
from models.errors import ConfigError
from models.family import Family, unregister

MODEL_TYPE = "toy_stacked_kv"
PRESET = "toy-stacked-kv"
LAYOUT = "stacked"


@dataclasses.dataclass
class ToyConfig:
    model_type: str = MODEL_TYPE
    vocab_size: int = 64
    hidden_size: int = 32
    num_hidden_layers: int = 2
    max_position_embeddings: int = 128

    def to_hf_dict(self) -> dict:
        return dataclasses.asdict(self)

    def param_count(self) -> int:
        h = self.hidden_size
        layer = 4 * h * h + 2 * (h * 2 * h) + 2 * h
        return 2 * self.vocab_size * h + self.max_position_embeddings * h + self.num_hidden_layers * layer


def toy_cache_spec(cfg: ToyConfig, layout: str = LAYOUT) -> CacheSpec:
    if layout != LAYOUT:
        raise ConfigError(f"toy cache layout {layout!r}: expected {LAYOUT!r}")
    return CacheSpec(layout, cfg.num_hidden_layers, (CacheTensor("kv", ("batch", 2, "past", cfg.hidden_size)),))


class ToyLayer(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.q, self.k, self.v, self.o = (nn.Linear(h, h, bias=False) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(h, 2 * h, bias=False), nn.SiLU(), nn.Linear(2 * h, h, bias=False))

    def forward(self, h, mask, past: tuple[torch.Tensor]):
        x = self.norm(h)
        kv = torch.cat([past[0], torch.stack([self.k(x), self.v(x)], dim=1)], dim=2)  # [B, 2, T, h]
        p = torch.softmax(self.q(x) @ kv[:, 0].transpose(1, 2) / math.sqrt(x.shape[-1]) + mask, dim=-1)
        h = h + self.o(p @ kv[:, 1])
        return h + self.mlp(h), (kv,)


class ToyDecoder(nn.Module):
    attention = "plain"

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(ToyLayer(cfg.hidden_size) for _ in range(cfg.num_hidden_layers))
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def cache_spec(self, layout: str = LAYOUT) -> CacheSpec:
        return toy_cache_spec(self.config, layout)

    def empty_cache(self, batch: int, layout: str = LAYOUT, dtype=torch.float32):
        return self.cache_spec(layout).empty(batch, dtype)

    def step(self, input_ids, past, layout: str = LAYOUT):
        S = input_ids.shape[1]
        T = self.cache_spec(layout).length(past)
        positions = torch.arange(S) + T
        mask = torch.where(torch.arange(T + S)[None, :] <= positions[:, None], 0.0, float("-inf"))
        h = self.embed(input_ids) + self.positions(positions)
        present = []
        for layer, layer_past in zip(self.layers, past):
            h, p = layer(h, mask, layer_past)
            present.append(p)
        return self.head(h).float(), present


def build_toy(name: str, seed: int = 0, attention: str = "plain") -> ToyDecoder:
    torch.manual_seed(seed)
    model = ToyDecoder(ToyConfig())
    with torch.no_grad():  # unit-scale logits, so greedy choices have clear margins
        model.head.weight.mul_(3.0)
    return model.eval()


def no_checkpoints(path, attention):
    raise ConfigError(f"{path}: the toy family has no checkpoint format")


TOY = Family(name="toy", model_types=(MODEL_TYPE,), config_from_json=no_checkpoints,
             module=lambda cfg, attention: ToyDecoder(cfg), load_checkpoint=no_checkpoints, save_checkpoint=None,
             presets={PRESET: ToyConfig()}, preset_config=lambda name: ToyConfig(), build_preset=build_toy,
             cache_layouts=(LAYOUT,), cache_spec=toy_cache_spec, passes=("ort-simplify",))


@pytest.fixture
def toy_family():
    models.register(TOY)
    yield TOY
    unregister(TOY.name)


def test_load_picks_the_family_and_an_unknown_model_type_names_the_families(toy_family, tmp_path):
    model = models.load(PRESET)
    assert isinstance(model, ToyDecoder) and models.family_of(model) is TOY
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError) as e:
        models.load(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "config.json") in msg and "'llama'" in msg
    assert "mla (model_type deepseek_v2, deepseek_v3)" in msg and f"toy (model_type {MODEL_TYPE})" in msg


def test_toy_family_compiles_for_ort_cpu_with_parity(toy_family, tmp_path):
    from pipeline.compile import compile_package
    from runtime.ort_runtime import PackageRuntime, verify_golden
    pkg = compile_package(PRESET, "ort-cpu", tmp_path / "toy", use_cache=False, progress=lambda m: None)
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["parity"]["passed"]
    cfg = ToyConfig()
    cache = manifest["io"]["cache"]
    assert cache["layout"] == LAYOUT and cache["per_layer"] == [{"name": "kv", "shape": ["batch", 2, "past", 32]}]
    assert cache["values_per_token_per_layer"] == 2 * cfg.hidden_size
    decode_inputs = [i["name"] for i in manifest["io"]["graphs"]["decode"]["inputs"]]
    assert decode_inputs == ["input_ids", "past.0.kv", "past.1.kv"]
    stages = {s["name"]: s for s in manifest["stages"]}
    assert stages["passes/ort-simplify"]["parity"] and "skipped" not in stages["passes/ort-simplify"]["params"]
    for name in ("passes/latent-kv-fusion", "passes/moe-ort-fused"):  # MLA's passes: not run, recorded as skipped
        assert stages[name]["params"]["skipped"] and not stages[name]["parity"], name
    # a 4-D cache tensor is not a genai key/value pair: no genai files (onnx/ holds the package's graphs only), and
    # the package says why
    assert "genai" not in manifest and not (pkg / "onnx" / "genai_config.json").exists()
    assert sorted(p.name for p in (pkg / "onnx").glob("*.onnx")) == ["decode.onnx", "prefill.onnx"]
    assert any(v.startswith("no onnxruntime-genai files") for v in manifest["verification"]["not_verified"])

    # the package against the eager module, independently of compile's own checks: prefill, then decode
    model = build_toy(PRESET)
    rt = PackageRuntime(pkg)
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_logits, ref_cache = model.step(ids, model.empty_cache(2))
        ref_next, ref_cache2 = model.step(ids[:, :1], ref_cache)
    logits, past = rt.run("prefill", ids.numpy(), rt.empty_cache(2))
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4, rtol=1e-4)
    assert past["past.1.kv"].shape == (2, 2, 5, cfg.hidden_size)
    np.testing.assert_allclose(past["past.1.kv"], ref_cache[1][0].numpy(), atol=1e-4, rtol=1e-4)
    logits2, past2 = rt.run("decode", ids[:, :1].numpy(), past)
    np.testing.assert_allclose(logits2, ref_next.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(past2["past.0.kv"], ref_cache2[0][0].numpy(), atol=1e-4, rtol=1e-4)
    assert verify_golden(pkg) == []
