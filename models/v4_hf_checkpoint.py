"""DeepSeek-V4 checkpoints as transformers saves them (config.json + safetensors with DeepseekV4ForCausalLM's
state-dict names, unquantized): load and save. DeepSeek's native names and FP8 / FP4 weights are
models/v4_checkpoint.py's. Safetensors only (models/checkpoint.py's scan refuses pickle folders).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .checkpoint import CheckpointSource, _check_file_sizes, _check_shapes, _open, _scan
from .errors import CheckpointError
from .v4 import DeepseekV4ForCausalLM
from .v4_config import DeepseekV4Config
from .v4_rope import inv_freq

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_IGNORED_RE = re.compile(r"(rotary_emb\..*inv_freq|^mtp\..*)$")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def empty_model(cfg: DeepseekV4Config, attention: str = "naive") -> DeepseekV4ForCausalLM:
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(cfg, attention)
    model = model.to_empty(device="cpu").requires_grad_(False)
    model.freqs = {k: inv_freq(cfg, k) for k in ("main", "compress")}  # built on meta above
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_checkpoint(path: str | os.PathLike, attention: str = "naive") -> DeepseekV4ForCausalLM:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; a Hugging Face checkpoint folder needs config.json "
                              "beside its safetensors files")
    cfg = DeepseekV4Config.from_json(path / "config.json")
    weight_map = _scan(path)
    _check_file_sizes(path, set(weight_map.values()))

    def kept(name: str) -> bool:
        m = _LAYER_RE.match(name)
        return not (m and int(m.group(1)) >= cfg.num_hidden_layers) and not _IGNORED_RE.search(name)

    available = {k: v for k, v in weight_map.items() if kept(k)}
    with torch.device("meta"):
        expected = DeepseekV4ForCausalLM(cfg, attention).state_dict()
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing, extra = sorted(set(expected) - set(available)), sorted(set(available) - set(expected))
    if any(k.endswith("_scale_inv") or k.endswith(".scale") for k in extra) or cfg.quantization_config:
        raise CheckpointError(f"{path}: holds quantized (FP8 / FP4) weights; this loader reads transformers' "
                              "unquantized DeepSeek-V4 checkpoints (DeepSeek's own format: models/v4_checkpoint.py)")
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}; the "
                              "checkpoint does not match its config.json (or uses DeepSeek's native names)")
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}; the "
                              "checkpoint does not match its config.json (layer_types, n_routed_experts?)")
    _check_shapes(path, available, expected)
    model = empty_model(cfg, attention)
    target = model.state_dict()
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(available[name], []).append(name)
    with torch.no_grad():
        for fname in sorted(by_file):
            with _open(path / fname) as f:
                for name in by_file[fname]:
                    try:
                        t = f.get_tensor(name)
                    except (SafetensorError, ValueError, TypeError, RuntimeError) as e:
                        raise CheckpointError(f"{path / fname}: tensor {name!r} cannot be read ({e}); the file is "
                                              "corrupt: copy or re-save it") from None
                    want = target[name].dtype
                    if (want == torch.long) != (t.dtype in (torch.int64, torch.int32)) or (
                            want != torch.long and t.dtype not in FLOAT_DTYPES):
                        raise CheckpointError(f"{path / fname}: tensor {name!r} has dtype {t.dtype}; expected "
                                              f"{'an integer table' if want == torch.long else 'fp32 / bf16 / fp16'}")
                    target[name].copy_(t.to(want))
    model.checkpoint = CheckpointSource(path, dict(available), ())
    return model.eval()


def save_checkpoint(model: DeepseekV4ForCausalLM, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """config.json + model.safetensors in transformers' names (router, tid2eid, sinks, biases kept as they are)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"{path}: exists and is not empty; choose a new folder")
    tensors = {}
    for name, t in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().contiguous()
        tensors[name] = t if t.dtype == torch.long or ".mlp.gate." in name or t.dim() < 2 else t.to(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.config.to_json(tmp / "config.json")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
