"""The memory preflight of `mlamoe compile`: from the config alone (no weight read), the peak memory the compile
will need against the memory this machine has available; a model that cannot fit is refused before loading.

Today's compile holds the whole model in fp32 (the eager reference, plus the copies export, the passes and the
parity sessions make), so its peak grows with the fp32 weight bytes:

    peak ~ COMPILE_BASE_BYTES + COMPILE_FACTOR x fp32 weight bytes   (fp32 weight bytes = 4 x config.param_count())

fitted to measured ort-cpu compiles (MEASURED); other targets' extra golden data (ascend's --batch x --max-cache) is
not modelled. Available: MemAvailable of /proc/meminfo, or the cgroup's memory limit
(v2 memory.max, v1 memory.limit_in_bytes) when one is set and smaller. `--ignore-memory-check` skips the refusal.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from models.errors import MlamoeError

# the slope between the measured peaks of small and medium, the base through small (MEASURED's "fit")
COMPILE_BASE_BYTES = 1_650_000_000
COMPILE_FACTOR = 2.62
# --stream: fixed overhead, then per unit of the largest layer's fp32 bytes and of the embedding + head's; the layer
# factor fitted to the DeepSeek-V2-Lite-dims --quant int8 compile (peak 18.09 GB: 1.65 + 4.9 x 2.34 + 3 x 1.68), whose
# peak also holds what 27 layers left behind (benchmarks/cpu_stream_peak_rss.json); medium's layer-by-layer part
# peaked at 1.42 GB against the 2.9 GB estimated. The end-to-end checks (run only where the package fits) are not in it.
STREAM_BASE_BYTES = 1_650_000_000
STREAM_LAYER_FACTOR = 5.0
STREAM_VOCAB_FACTOR = 3.0
MEASURED = "benchmarks/cpu_compile_peak_rss.json: /usr/bin/time -v mlamoe compile --target ort-cpu of small and medium"
_MEMINFO = Path("/proc/meminfo")
_PROC_CGROUP = Path("/proc/self/cgroup")
_CGROUP = Path("/sys/fs/cgroup")
_NO_LIMIT = 1 << 60  # cgroup v1 writes a huge number for "no limit"


class MemoryCheckError(MlamoeError):
    pass


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    fp32_bytes: int
    peak_bytes: int


def largest_layer_params(cfg) -> tuple[int, int]:
    """(parameters of the largest decoder layer, of the embedding + head), from shapes alone (a DeepseekConfig)."""
    import dataclasses as dc
    vocab = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2) + cfg.hidden_size
    one = dc.replace(cfg, num_hidden_layers=1, first_k_dense_replace=0 if cfg.num_hidden_layers >
                     cfg.first_k_dense_replace else 1)
    return int(one.param_count() - vocab), int(vocab)


def estimate(cfg, stream: bool = False) -> MemoryEstimate:
    """The compile's estimated peak for a config (any family's: each has param_count()); stream: the layer-by-layer
    compile's (pipeline/streaming.py), STREAM_BASE_BYTES + STREAM_LAYER_FACTOR x the largest layer's fp32 bytes +
    STREAM_VOCAB_FACTOR x the embedding's and head's."""
    params = int(cfg.param_count())
    fp32 = 4 * params
    if stream:
        layer, vocab = largest_layer_params(cfg)
        return MemoryEstimate(params, fp32, int(STREAM_BASE_BYTES + STREAM_LAYER_FACTOR * 4 * layer
                                                + STREAM_VOCAB_FACTOR * 4 * vocab))
    return MemoryEstimate(params, fp32, int(COMPILE_BASE_BYTES + COMPILE_FACTOR * fp32))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2's no limit) and garbage: None


def _cgroup_limit() -> tuple[int, str] | None:
    """The memory limit of this process's cgroup, (bytes, file), or None when none is set or readable."""
    try:
        lines = _PROC_CGROUP.read_text().splitlines()
    except OSError:
        lines = []
    found = []
    for line in lines:
        hid, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        rel = rel.lstrip("/")
        if hid == "0" and controllers == "":  # v2
            candidates = [_CGROUP / rel / "memory.max", _CGROUP / "memory.max"]
        elif "memory" in controllers.split(","):  # v1
            candidates = [_CGROUP / "memory" / rel / "memory.limit_in_bytes",
                          _CGROUP / "memory" / "memory.limit_in_bytes"]
        else:
            continue
        for c in candidates:
            v = _read_int(c)
            if v is not None:
                if v < _NO_LIMIT:
                    found.append((v, str(c)))
                break
    return min(found) if found else None


def available_memory() -> tuple[int | None, str]:
    """(bytes available to this process, where that figure comes from); (None, why) when it cannot be read."""
    mem = None
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                mem = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    limit = _cgroup_limit()
    if limit is not None and (mem is None or limit[0] < mem):
        return limit[0], f"the cgroup memory limit ({limit[1]})"
    if mem is None:
        return None, "/proc/meminfo has no MemAvailable here"
    return mem, "MemAvailable in /proc/meminfo"


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def check(model_spec, cfg, stream: bool = False) -> str:
    """Raise MemoryCheckError when the estimate exceeds the available memory; otherwise return a line saying
    both figures (for the progress output: it depends on the machine, so it stays out of the manifest)."""
    est = estimate(cfg, stream)
    avail, source = available_memory()
    if avail is None:
        return f"memory check: estimated peak {_gib(est.peak_bytes)}; available memory unknown ({source})"
    if est.peak_bytes > avail and stream:
        raise MemoryCheckError(
            f"{model_spec}: --stream holds one decoder layer at a time, and the largest layer needs about "
            f"{_gib(est.peak_bytes)} at the peak ({_gib(STREAM_BASE_BYTES)} + {STREAM_LAYER_FACTOR}x its fp32 bytes + "
            f"{STREAM_VOCAB_FACTOR}x the embedding's and head's), but {_gib(avail)} is available ({source}). Nothing "
            "was loaded. Use a machine with more memory, or pass --ignore-memory-check to try anyway")
    if est.peak_bytes > avail:
        stream_est = estimate(cfg, stream=True) if hasattr(cfg, "first_k_dense_replace") else None
        raise MemoryCheckError(
            f"{model_spec}: {est.parameters:,} parameters ({_gib(est.fp32_bytes)} of fp32 weights); compile holds the "
            f"model in fp32 and would need about {_gib(est.peak_bytes)} at its peak ({_gib(COMPILE_BASE_BYTES)} + "
            f"{COMPILE_FACTOR}x the fp32 weights, measured in {MEASURED}), but {_gib(avail)} is available "
            f"({source}). Nothing was loaded. Compile it on a machine with at least {_gib(est.peak_bytes)} of free "
            "memory, or pass --ignore-memory-check to try anyway (the OOM killer may end it)"
            + (f"; or compile a checkpoint folder with --stream, one layer at a time (estimated peak "
               f"{_gib(stream_est.peak_bytes)}; --target ort-cpu, --quant none or int8)" if stream_est else ""))
    return f"memory check: estimated peak {_gib(est.peak_bytes)}, {_gib(avail)} available ({source})"
