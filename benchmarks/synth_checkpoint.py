"""A random-weight Hugging Face checkpoint folder at a config's real dimensions, written in bounded memory.

    python -m benchmarks.synth_checkpoint --config deepseek-v2-lite --out DIR [--layers N] [--dtype bf16]
                                          [--shard-gb 5] [--seed 0]

For exercising the compiler on real-size checkpoints without downloading one (issue 16). --config is a preset
name (the config-only deepseek-v2-lite / deepseek-v3-671b / deepseek-v3.2 have the real dimensions) or a
checkpoint folder whose config.json is used; --layers keeps the first N decoder layers.

What it writes (models/checkpoint.py reads it back):
- config.json: the config as the project's own checkpoint save writes it (DeepseekConfig.to_json: the Hugging
  Face field names, model_type deepseek_v2 / deepseek_v3 / deepseek_v32);
- the tensors under the names of the family's reference module, which are transformers' checkpoint names
  (model.layers.N.mlp.experts.E.gate_proj.weight, ...), in module order, in safetensors shards of at most
  --shard-gb (10^9 bytes; a tensor larger than that gets a shard of its own), plus model.safetensors.index.json
  (weight_map, metadata.total_size) when there is more than one shard;
- dtypes as models.save: every tensor in --dtype except the router (mlp.gate.weight and
  e_score_correction_bias), which stays fp32.

Values: deterministic from (seed, tensor name) alone: a torch generator seeded by sha256(f"{seed}/{name}")
draws the tensor's elements in flat order in blocks of CHUNK elements; matrices (embedding and lm_head included)
~ N(0, 1/shape[-1]), norm weights 1.0, e_score_correction_bias 0. bf16 / fp16 are torch's round-to-nearest-even
casts of the fp32 draws.

Memory: the shard layout (names, shapes, offsets) is planned from the module built on the meta device, each
shard's header is written first, then each tensor is generated and written CHUNK elements at a time, so the
peak is a few CHUNK-sized buffers whatever the model size. The folder is written beside --out and renamed
into place at the end: an interrupted run leaves no half checkpoint at --out.
Progress (tensors, bytes, elapsed) goes to stderr at most every PROGRESS_SECONDS; a JSON summary to stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from models.checkpoint import publish_folder

GB = 10 ** 9
CHUNK = 1 << 24  # elements generated (and held in fp32) at a time
PROGRESS_SECONDS = 5.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


class SynthError(Exception):
    """A bad argument or a state the writer refuses; printed as one line, exit code 2."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def resolve_config(spec, layers: int | None = None):
    """A preset name, a checkpoint folder or a config object -> (validated config, its family), the decoder
    truncated to `layers` layers when given."""
    import models
    from models.checkpoint import save_checkpoint
    from models.errors import MlamoeError
    try:
        cfg = models.load_config(spec) if isinstance(spec, (str, os.PathLike)) else dataclasses.replace(spec)
        family = models.family_for(cfg.model_type)
    except MlamoeError as e:
        raise SynthError(str(e)) from None
    if family.save_checkpoint is not save_checkpoint:
        raise SynthError(f"--config {spec}: model family {family.name!r} has its own checkpoint naming; this writer "
                         "knows the names of the families saved by models/checkpoint.py (DeepSeek-V2/V3/V3.2)")
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= cfg.num_hidden_layers:
            raise SynthError(f"--layers {layers}: must be an integer from 1 to the config's num_hidden_layers "
                             f"({cfg.num_hidden_layers})")
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers,
                                  first_k_dense_replace=min(cfg.first_k_dense_replace, layers))
    if getattr(cfg, "quantization_config", None) is not None:  # an FP8 checkpoint's config: the tensors written are not
        cfg = dataclasses.replace(cfg, quantization_config=None)
    try:
        cfg.validate(f"--config {spec}")
    except MlamoeError as e:
        raise SynthError(str(e)) from None
    return cfg, family


def tensor_specs(cfg, family, dtype: torch.dtype = torch.bfloat16) -> list[TensorSpec]:
    """The checkpoint's tensors, in module order: the names and shapes of the family's reference module (built
    on the meta device: nothing allocated), the dtypes models.save gives them."""
    with torch.device("meta"):
        state = family.module(cfg, "naive").state_dict()
    specs = []
    for name, t in state.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        router = name.endswith("e_score_correction_bias") or ".mlp.gate." in name  # as models.save: fp32
        specs.append(TensorSpec(name, tuple(t.shape), torch.float32 if router else dtype))
    return specs


def plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most shard_bytes (a larger tensor alone in its group), in order."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def tensor_chunks(spec: TensorSpec, seed: int):
    """The tensor's values in flat order, as fp32 blocks of at most CHUNK elements (see the module docstring)."""
    n = spec.numel
    if spec.name.endswith("norm.weight"):
        for start in range(0, n, CHUNK):
            yield torch.ones(min(CHUNK, n - start))
        return
    if spec.name.endswith("e_score_correction_bias") or len(spec.shape) < 2:
        for start in range(0, n, CHUNK):
            yield torch.zeros(min(CHUNK, n - start))
        return
    g = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    std = 1.0 / math.sqrt(spec.shape[-1])
    for start in range(0, n, CHUNK):
        yield torch.randn(min(CHUNK, n - start), generator=g).mul_(std)


def tensor_values(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The whole tensor as written (for tests and small tensors: it allocates the tensor)."""
    return torch.cat(list(tensor_chunks(spec, seed))).to(spec.dtype).view(spec.shape)


def _header(shard: list[TensorSpec]) -> bytes:
    entries, offset = {}, 0
    for s in shard:
        entries[s.name] = {"dtype": _ST_DTYPE[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as the safetensors library writes


def write_shard(path: Path, shard: list[TensorSpec], seed: int, on_tensor: Callable[[TensorSpec], None]) -> None:
    """safetensors format: u64 little-endian header length, the JSON header, then the tensors' raw bytes
    (little-endian, row-major) back to back in header order."""
    header = _header(shard)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for s in shard:
            for block in tensor_chunks(s, seed):
                f.write(block.to(s.dtype).view(_INT_VIEW[s.dtype]).numpy().data)
            on_tensor(s)


class _Progress:
    def __init__(self, n_tensors: int, total_bytes: int, stream=sys.stderr):
        self.n, self.total, self.stream = n_tensors, total_bytes, stream
        self.done = self.bytes = 0
        self.started = self.last = time.monotonic()

    def __call__(self, spec: TensorSpec) -> None:
        self.done += 1
        self.bytes += spec.nbytes
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS or self.done == self.n:
            self.last = now
            print(f"[synth] {self.done}/{self.n} tensors, {self.bytes / GB:.2f}/{self.total / GB:.2f} GB, "
                  f"{now - self.started:.0f} s", file=self.stream, flush=True)


def synth_checkpoint(config, out: str | os.PathLike, *, layers: int | None = None, dtype: str = "bf16",
                     shard_bytes: int = 5 * GB, seed: int = 0, progress_stream=sys.stderr) -> dict:
    """Write the checkpoint folder `out` (see the module docstring); returns a summary. config: a preset name, a
    checkpoint folder or a config object (tests shrink a real config's dimensions this way)."""
    if dtype not in DTYPES:
        raise SynthError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise SynthError(f"--shard-gb: must be a positive size, got {shard_bytes} bytes")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SynthError(f"--out {out}: exists and is not an empty folder; choose a new one")
    cfg, family = resolve_config(config, layers)
    specs = tensor_specs(cfg, family, DTYPES[dtype])
    shards = plan_shards(specs, shard_bytes)
    total = sum(s.nbytes for s in specs)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total + 64 * 2 ** 20:
        raise SynthError(f"--out {out}: the checkpoint needs {total / GB:.2f} GB, {out.parent} has "
                         f"{free / GB:.2f} GB free")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg.to_json(tmp / "config.json")
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
        progress = _Progress(len(specs), total, progress_stream)
        for fname, shard in zip(names, shards):
            write_shard(tmp / fname, shard, seed, progress)
        if len(shards) > 1:
            weight_map = {s.name: fname for fname, shard in zip(names, shards) for s in shard}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"config": str(config) if isinstance(config, (str, os.PathLike)) else "(config object)",
            "model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers, "dtype": dtype, "seed": seed,
            "parameters": sum(s.numel for s in specs), "param_count_from_config": cfg.param_count(),
            "tensors": len(specs), "shards": len(shards), "tensor_bytes": total,
            "bytes_on_disk": sum(f.stat().st_size for f in out.iterdir()),
            "seconds": round(time.monotonic() - started, 1), "out": str(out)}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own prints the usage first)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    ap = _Parser(prog="python -m benchmarks.synth_checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="deepseek-v2-lite", help="preset name or checkpoint folder "
                    "(default deepseek-v2-lite: the real DeepSeek-V2-Lite dimensions, 15.7B parameters)")
    ap.add_argument("--out", required=True, type=Path, help="checkpoint folder to create (must not exist or be empty)")
    ap.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers")
    ap.add_argument("--dtype", default="bf16", help=f"tensor dtype: {', '.join(DTYPES)} (the router stays fp32)")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, in 10^9 bytes (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="weights are a function of seed and tensor name")
    a = ap.parse_args(argv)
    try:
        if not (a.shard_gb > 0 and math.isfinite(a.shard_gb)):
            raise SynthError(f"--shard-gb {a.shard_gb}: must be a positive number")
        summary = synth_checkpoint(a.config, a.out, layers=a.layers, dtype=a.dtype,
                                   shard_bytes=max(1, int(a.shard_gb * GB)), seed=a.seed)
    except SynthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
