"""Checkpoint folders: shards, MTP tensors, bf16, every bad input's error, and the memory profile of loading.

Good checkpoints come from transformers' save_pretrained (tests/conftest.py: hf_checkpoints) and
from models.save; the expected weights are read back with the safetensors library directly.
"""
from __future__ import annotations

import json
import pickle
import shutil
import weakref
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

import hf_reference
import models
import models.checkpoint
from models import CheckpointError, ConfigError, MlamoeError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("generation_config.json"))
    return dst


def _assert_same_weights(model, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(reference)
    for name, t in state.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, reference[name].float()), name


def _rewrite(folder: Path, edit) -> None:
    """Apply edit(dict of tensors) to folder/model.safetensors."""
    f = folder / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _edit_config(folder: Path, **fields) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder / "config.json"


@pytest.fixture()
def v3_copy(hf_checkpoints, tmp_path):
    """A writable copy of the transformers V3 checkpoint (one model.safetensors)."""
    return _copy(hf_checkpoints["v3"][1], tmp_path / "ckpt")


@pytest.fixture(scope="module")
def v3_weights(hf_checkpoints):
    return load_file(hf_checkpoints["v3"][1] / "model.safetensors")


# ---- good checkpoints -------------------------------------------------------------------------

def test_sharded_checkpoint_written_by_models_save_loads_identical_weights(tmp_path):
    model = models.load("tiny")
    folder = models.save(model, tmp_path / "ckpt", max_shard_bytes=40_000)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    loaded = models.load(folder)
    _assert_same_weights(loaded, model.state_dict())


def test_sharded_checkpoint_written_by_transformers_loads_identical_weights(hf_checkpoints, v3_weights, tmp_path):
    hf, _ = hf_checkpoints["v3"]
    hf.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    assert len(list((tmp_path / "ckpt").glob("model-*-of-*.safetensors"))) > 3
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    _assert_same_weights(models.load(tmp_path / "ckpt"), v3_weights)


def _mtp_tensors(weights: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """A V3-style MTP layer: a copy of the last layer renamed to `layer`, plus the MTP-only projections."""
    h = weights["model.norm.weight"].shape[0]
    out = {k.replace("model.layers.2.", f"model.layers.{layer}."): v.clone()
           for k, v in weights.items() if k.startswith("model.layers.2.")}
    out.update({f"model.layers.{layer}.eh_proj.weight": torch.ones(h, 2 * h),
                f"model.layers.{layer}.enorm.weight": torch.ones(h),
                f"model.layers.{layer}.hnorm.weight": torch.ones(h),
                f"model.layers.{layer}.shared_head.head.weight": torch.ones(7, h)})
    return out


def test_mtp_layer_tensors_in_their_own_file_are_ignored(v3_copy, v3_weights):
    save_file(_mtp_tensors(v3_weights, 3), v3_copy / "model-mtp.safetensors")
    _assert_same_weights(models.load(v3_copy), v3_weights)


def test_mtp_layer_tensors_in_an_indexed_shard_are_ignored(tmp_path):
    model = models.load("tiny")
    folder = models.save(model, tmp_path / "ckpt", max_shard_bytes=100_000)
    save_file(_mtp_tensors(model.state_dict(), 3), folder / "model-mtp.safetensors")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({k: "model-mtp.safetensors" for k in _mtp_tensors(model.state_dict(), 3)})
    index_path.write_text(json.dumps(index))
    _assert_same_weights(models.load(folder), model.state_dict())


def test_bf16_checkpoint_loads_as_exact_fp32_upcasts(tmp_path):
    hf = hf_reference.hf_model("v3").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "ckpt")
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert stored["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
    loaded = models.load(tmp_path / "ckpt")
    _assert_same_weights(loaded, stored)
    with torch.no_grad():
        logits = loaded(torch.tensor([[1, 2, 3, 4]]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_a_safetensors_checkpoint_beside_pickle_files_loads_without_unpickling(v3_copy, v3_weights, monkeypatch):
    torch.save({"x": torch.zeros(1)}, v3_copy / "pytorch_model.bin")
    _forbid_unpickling(monkeypatch)
    _assert_same_weights(models.load(v3_copy), v3_weights)


# ---- bad inputs: a clear error naming the file / field / value --------------------------------

def _load_error(path, kind=CheckpointError) -> str:
    with pytest.raises(kind) as e:
        models.load(path)
    assert isinstance(e.value, MlamoeError)
    return str(e.value)


def test_missing_tensor_is_named(v3_copy):
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    _rewrite(v3_copy, lambda t: t.pop(name))
    msg = _load_error(v3_copy)
    assert name in msg and str(v3_copy) in msg and "missing" in msg


def test_extra_tensor_is_named(v3_copy):
    name = "model.layers.2.mlp.experts.8.up_proj.weight"  # n_routed_experts is 8: ids 0..7
    _rewrite(v3_copy, lambda t: t.__setitem__(name, torch.zeros(24, 64)))
    msg = _load_error(v3_copy)
    assert name in msg and str(v3_copy) in msg


def test_wrong_shape_names_tensor_file_and_both_shapes(v3_copy, v3_weights):
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    shape = list(v3_weights[name].shape)
    _rewrite(v3_copy, lambda t: t.__setitem__(name, torch.zeros(shape[0], shape[1] + 1)))
    msg = _load_error(v3_copy)
    assert name in msg and str(v3_copy / "model.safetensors") in msg
    assert str([shape[0], shape[1] + 1]) in msg and str(shape) in msg


def test_unknown_model_type_names_the_field_and_value(v3_copy):
    cfg = _edit_config(v3_copy, model_type="llama")
    msg = _load_error(v3_copy, ConfigError)
    assert "model_type" in msg and "'llama'" in msg and str(cfg) in msg


def test_truncated_safetensors_is_refused(v3_copy):
    f = v3_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    msg = _load_error(v3_copy)
    assert str(f) in msg and "truncated" in msg


def test_safetensors_shorter_than_its_header_length_is_refused(v3_copy):
    f = v3_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5])
    msg = _load_error(v3_copy)
    assert str(f) in msg


@pytest.mark.parametrize("corruption", ["json-garbage", "huge-header-length"])
def test_corrupt_safetensors_header_is_refused(v3_copy, corruption):
    f = v3_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    if corruption == "json-garbage":
        data[8:40] = b"\x00\xffnot json at all, not at all!!!!"
    else:
        data[:8] = (2 ** 40).to_bytes(8, "little")
    f.write_bytes(bytes(data))
    msg = _load_error(v3_copy)
    assert str(f) in msg


def _forbid_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the loader unpickled a file")

    class RefusingUnpickler:
        def __init__(self, *a, **k):
            refuse()

    for target, attr in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(target, attr, refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)


def test_pickle_only_checkpoint_is_refused_without_unpickling(v3_copy, monkeypatch):
    (v3_copy / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, v3_copy / "pytorch_model.bin")
    _forbid_unpickling(monkeypatch)
    msg = _load_error(v3_copy)
    assert "pytorch_model.bin" in msg and "pickle" in msg and str(v3_copy) in msg


@pytest.mark.parametrize("fields,field,value", [
    ({"num_experts_per_tok": 5}, "num_experts_per_tok", 5),  # 2 kept groups x 2 experts = 4 < 5
    ({"n_group": 3, "topk_group": 1}, "n_group", 3),  # 8 experts in 3 groups
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim", 7),  # RoPE rotates pairs
    ({"topk_group": 5}, "topk_group", 5),  # more kept groups than groups
])
def test_inconsistent_config_names_the_field_and_value(v3_copy, fields, field, value):
    cfg = _edit_config(v3_copy, **fields)
    msg = _load_error(v3_copy, ConfigError)
    assert f"'{field}' = {value!r}" in msg and str(cfg) in msg


def test_checkpoint_folder_without_config_json_is_refused(v3_copy):
    (v3_copy / "config.json").unlink()
    msg = _load_error(v3_copy)
    assert "config.json" in msg and str(v3_copy) in msg


def test_checkpoint_path_that_does_not_exist_is_refused(tmp_path):
    msg = _load_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in msg


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    folder = models.save(models.load("tiny"), tmp_path / "ckpt", max_shard_bytes=100_000)
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    msg = _load_error(folder)
    assert shard.name in msg and "model.safetensors.index.json" in msg


def test_fp8_weight_without_its_scale_inv_is_refused(tmp_path):
    folder = models.save(models.load("tiny"), tmp_path / "ckpt", fp8=True)
    name = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv"
    _rewrite(folder, lambda t: t.pop(name))
    msg = _load_error(folder)
    assert name in msg


# ---- memory: never two full copies of the weights ----------------------------------------------

class _TrackingSafeOpen:
    """safe_open that records every tensor handed out and the peak bytes of those still alive."""
    real = safetensors.safe_open
    names: list[str] = []
    live: list[weakref.ref] = []
    peak = 0

    def __init__(self, *args, **kw):
        self._f = self.real(*args, **kw)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __getattr__(self, attr):
        return getattr(self._f, attr)

    def get_tensor(self, name):
        t = self._f.get_tensor(name)
        cls = type(self)
        cls.names.append(name)
        cls.live = [r for r in cls.live if r() is not None] + [weakref.ref(t)]
        cls.peak = max(cls.peak, sum(r().numel() * r().element_size() for r in cls.live))
        return t


@pytest.mark.parametrize("kind", ["fp32", "fp32-sharded", "fp8"])
def test_loading_holds_at_most_one_checkpoint_tensor_at_a_time(tmp_path, monkeypatch, kind):
    source = models.load("tiny")
    folder = models.save(source, tmp_path / "ckpt", fp8=kind == "fp8",
                         max_shard_bytes=100_000 if kind == "fp32-sharded" else None)
    stored = {}
    for f in folder.glob("*.safetensors"):
        stored.update(load_file(f))
    total = sum(t.numel() * t.element_size() for t in stored.values())
    largest = max(t.numel() * t.element_size() for n, t in stored.items() if not n.endswith("_scale_inv"))
    largest_scale = max((t.numel() * t.element_size() for n, t in stored.items() if n.endswith("_scale_inv")),
                        default=0)

    class Tracking(_TrackingSafeOpen):
        names, live, peak = [], [], 0

    def no_bulk(*a, **k):
        raise AssertionError("the loader read a whole file into a state dict")

    monkeypatch.setattr(models.checkpoint, "safe_open", Tracking)
    monkeypatch.setattr(safetensors, "safe_open", Tracking)
    for attr in ("load_file", "load"):
        monkeypatch.setattr(safetensors.torch, attr, no_bulk)
    loaded = models.load(folder)

    assert set(loaded.state_dict()) <= set(Tracking.names)  # every weight came through get_tensor
    assert Tracking.peak <= largest + largest_scale
    assert largest + largest_scale < total / 4  # the bound is far below "the whole checkpoint at once"
