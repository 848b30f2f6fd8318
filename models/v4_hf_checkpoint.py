"""The V4 family's checkpoint entry points: load any V4 folder into DeepseekV4ForCausalLM; save one.

`load_checkpoint` goes through models/v4_checkpoint.py's one rename table and reader, so a folder in any of the
three namings loads: DeepSeek's native names (as on the Hub, FP8 E4M3 blocks / FP4 E2M1 experts dequantized
exactly), transformers' state-dict names, or the layout transformers 5.24's save_pretrained writes (native
leaf names under `model.`). Every name, shape and scale is checked before the model is allocated; tensors are
then copied one at a time into the preallocated parameters (the model is never held twice).
`model.checkpoint` is the V4CheckpointSource: fp8_names / fp4_names, raw(name) and raw_fp8(name) give the
stored bytes for an FP8 / FP4 passthrough stage. MTP tensors are skipped. Safetensors only.

`save_checkpoint` writes config.json + model.safetensors under the module's (transformers') state-dict names,
which transformers' from_pretrained and this loader both read; DeepSeek's native layout (FP8 / FP4) is
v4_checkpoint.save_v4_native_checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .checkpoint import checkpoint_folder, write_folder
from .errors import CheckpointError
from .v4 import DeepseekV4ForCausalLM
from .v4_checkpoint import load_v4_state_dict
from .v4_config import DeepseekV4Config
from .v4_rope import inv_freq


def empty_model(cfg: DeepseekV4Config, attention: str = "naive") -> DeepseekV4ForCausalLM:
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(cfg, attention)
    model = model.to_empty(device="cpu").requires_grad_(False)
    model.freqs = {k: inv_freq(cfg, k) for k in ("main", "compress")}  # built on meta above
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_checkpoint(path: str | os.PathLike, attention: str = "naive") -> DeepseekV4ForCausalLM:
    path = checkpoint_folder(path)
    cfg = DeepseekV4Config.from_json(path / "config.json")
    with torch.device("meta"):  # the module's names and shapes, without allocating anything
        shapes = {k: tuple(v.shape) for k, v in DeepseekV4ForCausalLM(cfg, attention).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    model: DeepseekV4ForCausalLM | None = None
    targets: dict[str, torch.Tensor] = {}

    def into(name: str, t: torch.Tensor) -> None:
        nonlocal model, targets
        if model is None:  # allocated once the reader has checked every name, shape and scale
            model = empty_model(cfg, attention)
            targets = model.state_dict()
        target = targets[name]
        if (target.dtype == torch.long) != (not t.is_floating_point()):
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}; expected "
                                  f"{'an integer table' if target.dtype == torch.long else 'a float weight'}")
        with torch.no_grad():
            target.copy_(t)

    _, _, src = load_v4_state_dict(path, expected=shapes, into=into)
    if model is None:
        raise CheckpointError(f"{path}: holds no DeepSeek-V4 tensors")
    model.checkpoint = src
    return model.eval()


def save_checkpoint(model: DeepseekV4ForCausalLM, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """config.json + model.safetensors in transformers' names (router, tid2eid, sinks, biases kept as they are),
    unquantized (no quantization_config)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"{path}: exists and is not empty; choose a new folder")
    tensors = {}
    for name, t in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().contiguous()
        tensors[name] = t if t.dtype == torch.long or ".mlp.gate." in name or t.dim() < 2 else t.to(dtype)
    # the weights written are unquantized: a model loaded from an FP8 / FP4 folder must not say otherwise
    return write_folder(path, tensors, dataclasses.replace(model.config, quantization_config=None).to_json)
