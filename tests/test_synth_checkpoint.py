"""benchmarks/synth_checkpoint.py: random-weight checkpoint folders at a config's dimensions, written tensor by
tensor. At tiny dimensions: the folder loads with models.load and holds exactly the bytes written (read back
independently with safe_open), shards split at the limit and the index maps every tensor, the tensor names and
shapes are transformers' DeepseekV2ForCausalLM's, and bad arguments are one error line with exit code 2."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import models
from benchmarks import synth_checkpoint as synth

ROOT = Path(__file__).resolve().parents[1]


def small_v2_lite(**over):
    """deepseek-v2-lite's config (V2: no q_lora, softmax greedy routing, 2 shared experts, YaRN) at tiny widths."""
    cfg = dataclasses.replace(models.load_config("deepseek-v2-lite"), vocab_size=300, hidden_size=64,
                              intermediate_size=96, moe_intermediate_size=24, num_attention_heads=4,
                              n_routed_experts=8, num_experts_per_tok=3, kv_lora_rank=32, qk_nope_head_dim=16,
                              qk_rope_head_dim=8, v_head_dim=16, **over)
    return cfg.validate("test config")


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """small_v2_lite with 3 layers, bf16, shards of 100 kB, blocks of 1000 elements (so tensors span blocks)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(synth, "CHUNK", 1000)
    out = tmp_path_factory.mktemp("synth") / "ckpt"
    summary = synth.synth_checkpoint(small_v2_lite(num_hidden_layers=3), out, shard_bytes=100_000, seed=7)
    yield out, summary
    mp.undo()


def test_folder_loads_and_the_model_holds_the_bytes_written(written):
    out, summary = written
    stored = read_all(out)
    model = models.load(out)
    state = model.state_dict()
    assert set(state) == set(stored) and summary["tensors"] == len(stored)
    for name, t in stored.items():
        assert torch.equal(state[name], t.float()), name
    cfg = models.load_config(out)
    assert cfg.model_type == "deepseek_v2" and cfg.num_hidden_layers == 3 and cfg.q_lora_rank is None
    assert summary["parameters"] == cfg.param_count() == sum(t.numel() for t in stored.values())
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]]))
    assert torch.isfinite(logits).all() and 0.1 < logits.std() < 10  # unit-scale weights: a sane model


def test_dtypes_scales_and_values_follow_the_rules(written, monkeypatch):
    out, _ = written
    monkeypatch.setattr(synth, "CHUNK", 1000)  # as written
    stored = read_all(out)
    cfg, family = synth.resolve_config(models.load_config(out))
    for spec in synth.tensor_specs(cfg, family):
        t = stored[spec.name]
        router = ".mlp.gate." in spec.name
        assert t.dtype == (torch.float32 if router else torch.bfloat16), spec.name
        assert torch.equal(t, synth.tensor_values(spec, 7)), spec.name
        if spec.name.endswith("norm.weight"):
            assert torch.all(t == 1)
        else:
            assert abs(t.float().std().item() * spec.shape[-1] ** 0.5 - 1) < 0.1, spec.name
    # bf16 = the upper 16 bits of the fp32 draw rounded to nearest even, done here on the raw bits
    spec = next(s for s in synth.tensor_specs(cfg, family) if s.name.endswith("kv_b_proj.weight"))
    f32 = torch.cat(list(synth.tensor_chunks(spec, 7))).numpy().view(np.uint32).astype(np.uint64)
    rne = ((f32 + 0x7FFF + ((f32 >> 16) & 1)) >> 16).astype(np.uint16)
    assert np.array_equal(stored[spec.name].view(torch.int16).numpy().view(np.uint16).ravel(), rne)


def test_shards_split_at_the_limit_and_the_index_maps_every_tensor(written):
    out, summary = written
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) == summary["shards"] > 3 and not (out / "model.safetensors").exists()
    assert {s.name for s in shards} == set(index["weight_map"].values())
    total = 0
    for f in shards:
        with safe_open(f, "pt") as st:
            keys = set(st.keys())
            sizes = [st.get_tensor(k).numel() * st.get_tensor(k).element_size() for k in keys]
        assert keys == {k for k, v in index["weight_map"].items() if v == f.name}
        assert sum(sizes) <= 100_000 or len(keys) == 1, f.name
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total == summary["tensor_bytes"]
    # greedy: a shard ends only where its next tensor would not fit
    specs = {s.name: s for s in synth.tensor_specs(*synth.resolve_config(models.load_config(out)))}
    order = list(specs)
    for a, b in zip(shards, shards[1:]):
        in_a = [n for n in order if index["weight_map"][n] == a.name]
        first_b = next(n for n in order if index["weight_map"][n] == b.name)
        assert sum(specs[n].nbytes for n in in_a) + specs[first_b].nbytes > 100_000


def test_one_shard_without_index_under_the_limit_and_same_seed_same_bytes(tmp_path):
    a = synth.synth_checkpoint("tiny-v2", tmp_path / "a", seed=3)
    synth.synth_checkpoint("tiny-v2", tmp_path / "b", seed=3)
    synth.synth_checkpoint("tiny-v2", tmp_path / "c", seed=4)
    assert a["shards"] == 1 and sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json",
                                                                                      "model.safetensors"]
    bytes_ = {k: (tmp_path / k / "model.safetensors").read_bytes() for k in "abc"}
    assert bytes_["a"] == bytes_["b"] != bytes_["c"]
    models.load(tmp_path / "a")


@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_tensor_names_and_shapes_are_transformers(kind, tmp_path):
    """The names transformers' own save_pretrained writes for the same config (its in-memory state_dict fuses the
    experts into mlp.experts.gate_up_proj / down_proj; its checkpoints keep one tensor per expert), and the
    unfused part of its state_dict."""
    import transformers
    cfg = (small_v2_lite(num_hidden_layers=3) if kind == "v2" else
           dataclasses.replace(models.load_config("tiny"), num_hidden_layers=4, first_k_dense_replace=2))
    d = cfg.to_hf_dict()
    d.pop("model_type"), d.pop("architectures")
    hf_cls = {"v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
              "v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM)}[kind]
    with torch.device("meta"):
        hf = hf_cls[1](hf_cls[0](**d))
    mine = {s.name: s.shape for s in synth.tensor_specs(*synth.resolve_config(cfg))}
    hf_keys = set(hf.state_dict())
    fused = {k for k in hf_keys if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))}
    assert fused and (hf_keys - fused) <= set(mine)
    per_expert = {f"{k.rsplit('.', 1)[0]}.{e}.{p}.weight" for k in fused for e in range(cfg.n_routed_experts)
                  for p in (("gate_proj", "up_proj") if k.endswith("gate_up_proj") else ("down_proj",))}
    assert set(mine) == (hf_keys - fused) | per_expert
    hf_real = hf_cls[1](hf_cls[0](**d))  # at these widths: cheap; save_pretrained's names and shapes
    hf_real.save_pretrained(tmp_path / "hf")
    saved = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            saved.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    assert saved == mine


def test_layers_truncates_and_other_presets_by_name(tmp_path):
    cfg, family = synth.resolve_config("deepseek-v3-671b", layers=2)
    assert (cfg.num_hidden_layers, cfg.first_k_dense_replace, cfg.hidden_size) == (2, 2, 7168)
    specs = synth.tensor_specs(cfg, family)
    assert not any(s.name.startswith("model.layers.2.") for s in specs)
    assert synth.resolve_config("deepseek-v2-lite")[0].num_hidden_layers == 27
    total = sum(s.numel for s in synth.tensor_specs(*synth.resolve_config("deepseek-v2-lite")))
    assert total == models.load_config("deepseek-v2-lite").param_count() == 15_706_484_224
    out = synth.synth_checkpoint(small_v2_lite(), tmp_path / "two", layers=2, shard_bytes=10 ** 9)
    assert out["num_hidden_layers"] == 2 and models.load_config(tmp_path / "two").num_hidden_layers == 2


def test_bad_arguments_are_one_error_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [(["--config", "no-such-preset"], "unknown model preset"),
             (["--layers", "0"], "--layers 0"),
             (["--layers", "28"], "--layers 28"),
             (["--config", "tiny-v4"], "own checkpoint naming"),
             (["--shard-gb", "0"], "--shard-gb"),
             (["--dtype", "int3"], "--dtype int3")]
    for args, words in cases:
        assert synth.main(args + ["--out", str(tmp_path / "new")]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (args, err)
    assert synth.main(["--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "exists and is not an empty folder" in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists()
    r = subprocess.run([sys.executable, "-m", "benchmarks.synth_checkpoint", "--layers", "x", "--out",
                        str(tmp_path / "new")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--layers" in r.stderr


def test_a_failed_write_leaves_nothing_at_out(tmp_path, monkeypatch):
    def boom(spec, seed):
        raise OSError("disk full")
    monkeypatch.setattr(synth, "tensor_chunks", boom)
    with pytest.raises(OSError):
        synth.synth_checkpoint("tiny-v2", tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_config_from_a_checkpoint_folder_fp8_config_dropped(tmp_path):
    """--config FOLDER reads its config.json; an FP8 checkpoint's quantization_config is left out (the tensors
    written are --dtype, not FP8 blocks), so the result loads."""
    src = models.save(models.load("tiny"), tmp_path / "fp8", fp8=True)
    assert models.load_config(src).fp8
    synth.synth_checkpoint(src, tmp_path / "out", layers=2)
    cfg = models.load_config(tmp_path / "out")
    assert not cfg.fp8 and cfg.num_hidden_layers == 2 and cfg.hidden_size == 64
    models.load(tmp_path / "out")


def test_too_little_disk_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda p: usage(10 ** 12, 10 ** 12 - 10 ** 9, 10 ** 9))
    assert synth.main(["--out", str(tmp_path / "v2lite")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "needs 31.42 GB" in err and "1.00 GB free" in err
    assert list(tmp_path.iterdir()) == []
