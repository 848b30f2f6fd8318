"""Hugging Face checkpoint I/O: config.json + safetensors (one file or shards with an index).

- Never unpickles: a folder holding only .bin/.pt/.pth/.ckpt/.pkl weights is refused.
- Loads tensor by tensor into preallocated parameters, so at most one extra tensor is in memory.
- FP8 (DeepSeek-V3/R1): `W.weight` in float8_e4m3fn plus `W.weight_scale_inv` [ceil(out/128),
  ceil(in/128)] fp32; dequantized = fp8 * scale_inv per 128x128 block. The raw FP8 bytes stay
  reachable through `model.checkpoint.raw_fp8(name)` for the quantization stage.
- Tensors of layers >= num_hidden_layers (V3's MTP layer 61) are ignored.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import DeepseekConfig
from .decoder import DeepseekForCausalLM
from .errors import CheckpointError
from .rope import inv_freq

FP8_BLOCK = 128
FP8_MAX = 448.0
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Names a model may carry that the reference does not use.
_IGNORED_RE = re.compile(r"(rotary_emb\.inv_freq)$")


@dataclasses.dataclass
class CheckpointSource:
    """Where a loaded model's weights came from; reads raw tensors again on demand."""
    path: Path
    weight_map: dict[str, str]  # tensor name -> file name (relative to path)
    fp8_names: tuple[str, ...]  # weights stored as fp8 e4m3 with a weight_scale_inv

    def read(self, name: str) -> torch.Tensor:
        with safe_open(self.path / self.weight_map[name], "pt") as f:
            return f.get_tensor(name)

    def raw_fp8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(float8_e4m3fn weight, fp32 weight_scale_inv) exactly as stored."""
        return self.read(name), self.read(name[: -len("weight")] + "weight_scale_inv")


def fp8_block_dequantize(w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    out, inp = w.shape
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:out].repeat_interleave(FP8_BLOCK, 1)[:, :inp]
    return w.float() * s


def fp8_block_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> (e4m3 [out, in], scale_inv [ceil(out/128), ceil(in/128)]) with amax/448 scales."""
    out, inp = w.shape
    bo, bi = -(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)
    padded = torch.zeros(bo * FP8_BLOCK, bi * FP8_BLOCK)
    padded[:out, :inp] = w.float()
    blocks = padded.view(bo, FP8_BLOCK, bi, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (blocks / scale[:, None, :, None]).view_as(padded)[:out, :inp].to(torch.float8_e4m3fn)
    return q, scale


def _fp8_eligible(name: str) -> bool:
    """DeepSeek's practice: embeddings, lm_head, norms and the router gate stay unquantized."""
    return (name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")) and ".mlp.gate." not in name


def _resolve_weight_files(path: Path) -> dict[str, str] | None:
    """Return tensor name -> file from the index, or None to scan every *.safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r}); it needs a 'weight_map' "
                                  "object mapping tensor names to shard files") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to shard file "
                                  "names (strings); the index is damaged")
        outside = sorted({f for f in weight_map.values() if Path(f).name != f or f in ("", ".", "..")})
        if outside:
            raise CheckpointError(f"{index}: names shard file {outside[0]!r}, which is not a file name in the "
                                  "checkpoint folder; shards must lie beside the index")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index}: names shard file(s) that do not exist: {', '.join(missing)}")
        return weight_map
    return None


def _open(path: Path):
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the file is truncated or "
                              "corrupt: copy or re-save it") from None


def _scan(path: Path) -> dict[str, str]:
    weight_map = _resolve_weight_files(path)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if weight_map is None:
        if not files:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{path}: holds only pickle weights ({', '.join(pickles)}); pickle checkpoints are refused "
                    "(loading one can run arbitrary code). Convert it to safetensors on a trusted machine "
                    "(e.g. transformers' save_pretrained(..., safe_serialization=True)) and load that.")
            raise CheckpointError(f"{path}: no model.safetensors or *.safetensors shards found")
        weight_map = {}
        for name in files:
            with _open(path / name) as f:
                for key in f.keys():
                    weight_map[key] = name
    else:
        for name in sorted(set(weight_map.values())):
            with _open(path / name) as f:
                keys = set(f.keys())
            absent = [k for k, v in weight_map.items() if v == name and k not in keys]
            if absent:
                raise CheckpointError(f"{path / name}: the index lists {absent[0]!r} in this shard but it is not "
                                      "there; the index and shards do not match")
    return weight_map


def _check_file_sizes(path: Path, files: set[str]) -> None:
    """safetensors maps files lazily; catch truncation before reading garbage."""
    for name in sorted(files):
        p = path / name
        raw = p.read_bytes()[:8] if p.stat().st_size >= 8 else b""
        if len(raw) < 8:
            raise CheckpointError(f"{p}: truncated ({p.stat().st_size} bytes): not a safetensors file")
        header_len = int.from_bytes(raw, "little")
        corrupt = CheckpointError(f"{p}: corrupt safetensors header; copy or re-save the file")
        if header_len > p.stat().st_size - 8:
            raise corrupt
        with open(p, "rb") as fh:
            fh.seek(8)
            try:
                header = json.loads(fh.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise corrupt from None
        try:
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (AttributeError, KeyError, TypeError, ValueError, IndexError):
            raise corrupt from None
        if p.stat().st_size < 8 + header_len + end:
            raise CheckpointError(f"{p}: truncated: the header needs {8 + header_len + end} bytes, the file has "
                                  f"{p.stat().st_size}; copy the file again")


def _check_shapes(path: Path, available: dict[str, str], expected: dict[str, torch.Tensor]) -> None:
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(available[name], []).append(name)
    for fname in sorted(by_file):
        with _open(path / fname) as f:
            for name in by_file[fname]:
                try:
                    shape = list(f.get_slice(name).get_shape())
                except (SafetensorError, ValueError, TypeError) as e:
                    raise CheckpointError(f"{path / fname}: tensor {name!r} cannot be read ({e}); the file is "
                                          "corrupt: copy or re-save it") from None
                if shape != list(expected[name].shape):
                    raise CheckpointError(f"{path / fname}: tensor {name!r} has shape {shape}, the config implies "
                                          f"{list(expected[name].shape)}; config.json and the weights do not match")


def weights_sha256(model) -> str:
    """Content address of a model's weights: every tensor, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(np.ascontiguousarray(t.detach().numpy()).tobytes())
    return h.hexdigest()


def empty_model(cfg: DeepseekConfig, attention: str = "naive",
                model_cls: type[DeepseekForCausalLM] = DeepseekForCausalLM) -> DeepseekForCausalLM:
    """Allocate without initialising (weights are about to be overwritten). model_cls: the family's module
    (a DeepseekForCausalLM subclass, e.g. DeepSeek-V3.2's)."""
    with torch.device("meta"):
        model = model_cls(cfg, attention)
    model = model.to_empty(device="cpu").requires_grad_(False)  # an inference reference
    model.rope_inv_freq = inv_freq(cfg)
    if cfg.tie_word_embeddings:  # to_empty allocates each occurrence of a shared parameter separately
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """`path` as a Path, after checking it is a folder with a config.json (a CheckpointError naming it otherwise)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (expected config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; a Hugging Face checkpoint folder needs config.json "
                              "beside its safetensors files")
    return path


def checked_weight_map(path: Path, cfg: DeepseekConfig, expected: dict[str, torch.Tensor]) -> dict[str, str]:
    """The checkpoint folder's tensor name -> shard file, for the tensors the model uses (`expected`: its
    state_dict on the meta device: names and shapes only), after checking every shard's header, that no tensor is
    missing or unexpected and that every shape is what the config implies; nothing is allocated. Tensors of
    layers >= num_hidden_layers (MTP) and rotary buffers are left out."""
    expected = dict(expected)
    weight_map = _scan(path)
    _check_file_sizes(path, set(weight_map.values()))

    def kept(name: str) -> bool:
        m = _LAYER_RE.match(name)
        return not (m and int(m.group(1)) >= cfg.num_hidden_layers) and not _IGNORED_RE.search(name)

    available = {k: v for k, v in weight_map.items() if kept(k)}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    scales = {k for k in available if k.endswith(".weight_scale_inv")}
    missing = sorted(set(expected) - set(available))
    extra = sorted(set(available) - set(expected) - scales)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}; "
                              "the checkpoint does not match its config.json")
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}; "
                              "the checkpoint does not match its config.json (wrong num_hidden_layers, "
                              "n_routed_experts or q_lora_rank?)")
    orphan = sorted(s for s in scales if s[: -len("_scale_inv")] not in expected)
    if orphan:
        raise CheckpointError(f"{path}: weight_scale_inv without its weight: {', '.join(orphan[:3])}")
    _check_shapes(path, available, expected)  # before allocating: a wrong config must not allocate its model
    return available


def load_checkpoint(path: str | os.PathLike, attention: str = "naive", *,
                    config_cls: type[DeepseekConfig] = DeepseekConfig,
                    model_cls: type[DeepseekForCausalLM] = DeepseekForCausalLM) -> DeepseekForCausalLM:
    """config.json + safetensors -> eval-mode model_cls. config_cls / model_cls: the family's config and module
    (DeepSeek-V3.2 passes its subclasses; the checkpoint names are the module's state_dict names)."""
    path = checkpoint_folder(path)
    cfg = config_cls.from_json(path / "config.json")
    with torch.device("meta"):  # names and shapes the config implies, without allocating anything
        expected = model_cls(cfg, attention).state_dict()
    available = checked_weight_map(path, cfg, expected)
    model = empty_model(cfg, attention, model_cls)
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)

    fp8_names = []
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(available[name], []).append(name)
    with torch.no_grad():
        for fname in sorted(by_file):
            with _open(path / fname) as f:
                for name in by_file[fname]:
                    t, fp8 = read_weight(path, f, fname, name, available, tuple(expected[name].shape))
                    expected[name].copy_(t.to(expected[name].dtype))
                    if fp8:
                        fp8_names.append(name)
                    del t
    if cfg.fp8 and not fp8_names:
        raise CheckpointError(f"{path / 'config.json'}: quantization_config says fp8 but no tensor is stored as "
                              "float8_e4m3fn")
    model.checkpoint = CheckpointSource(path, dict(available), tuple(sorted(fp8_names)))
    return model.eval()


def read_weight(path: Path, f, fname: str, name: str, available: dict[str, str], shape: tuple[int, ...]
                ) -> tuple[torch.Tensor, bool]:
    """One tensor of an open safetensors file `f` (path/fname) checked against the `shape` the config implies ->
    (fp32 / bf16 / fp16 tensor as stored, or an FP8 e4m3 weight dequantized to fp32 with its weight_scale_inv;
    whether it was FP8). Every failure is a CheckpointError naming the file and tensor."""
    try:
        t = f.get_tensor(name)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path / fname}: tensor {name!r} cannot be read ({e}); the file is "
                              "corrupt: copy or re-save it") from None
    where = f"{path / fname}: tensor {name!r}"
    if t.dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(f"{where} has dtype {t.dtype}; supported: fp32, bf16, fp16, fp8 e4m3")
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{where} has shape {list(t.shape)}, the config implies {list(shape)}")
    if t.dtype != torch.float8_e4m3fn:
        return t, False
    sname = name + "_scale_inv"
    if sname not in available:
        raise CheckpointError(f"{where} is fp8 but {sname!r} is missing")
    with _open(path / available[sname]) as fs:
        s = fs.get_tensor(sname)
    want = [-(-t.shape[0] // FP8_BLOCK), -(-t.shape[1] // FP8_BLOCK)]
    if list(s.shape) != want:
        raise CheckpointError(f"{path / available[sname]}: tensor {sname!r} has shape "
                              f"{list(s.shape)}, 128x128 blocks of {list(t.shape)} need {want}")
    return fp8_block_dequantize(t, s), True


def save_checkpoint(model: DeepseekForCausalLM, path: str | os.PathLike, *, fp8: bool = False,
                    max_shard_bytes: int | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json + safetensors (sharded with an index past max_shard_bytes).

    fp8=True stores DeepSeek-V3-style 128x128 block FP8 weights with weight_scale_inv.
    The folder is written beside the target and renamed, so a failed save leaves nothing.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"{path}: exists and is not empty; choose a new folder")
    cfg = dataclasses.replace(model.config)
    if fp8:
        cfg.quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().contiguous()
        if fp8 and _fp8_eligible(name):
            q, s = fp8_block_quantize(t)
            tensors[name], tensors[name + "_scale_inv"] = q, s
        elif name.endswith("e_score_correction_bias") or ".mlp.gate." in name:
            tensors[name] = t.float()  # router stays fp32 (transformers keeps it so too)
        else:
            tensors[name] = t.to(dtype)
    return write_folder(path, tensors, cfg.to_json, max_shard_bytes)


def publish_folder(tmp: Path, path: Path) -> None:
    """Give a checkpoint folder written in `tmp` (a mkdtemp beside `path`) its final name: readable by all (mkdtemp
    makes 0700; a checkpoint folder is meant to be shared), replacing `path` if it is an empty folder."""
    os.chmod(tmp, 0o755)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    if path.exists():
        path.rmdir()
    os.replace(tmp, path)


def write_folder(path: Path, tensors: dict[str, torch.Tensor], write_config: Callable[[Path], None],
                 max_shard_bytes: int | None = None) -> Path:
    """Write config.json (by write_config(file)) and the tensors as safetensors (one file, or shards of at most
    max_shard_bytes with model.safetensors.index.json) into a temporary folder beside `path`, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write_config(tmp / "config.json")
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(tensors):
            nbytes = tensors[name].numel() * tensors[name].element_size()
            if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensors[name]
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        publish_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
