"""Serving shapes of an ascend package (`--batch`, `--max-cache`, `--cache-gears`, `--prefill-buckets`): the batch B,
the longest cache M, the cache-length gears and the prefill buckets, checked against the model
(max_position_embeddings) and the soc's HBM (profile.HBM_GB) before any export.

    gears    fixed-shape graphs at several cache lengths G1 < G2 < ... < Gn = M, all over one weights file. A
             serving loop runs the smallest gear G >= position + 1 (decode) or >= position + bucket (prefill) and
             moves the cache into the next gear's buffers (zero rows appended) when it outgrows its gear.
    buckets  prefill graphs of S tokens: every bucket at the smallest gear, the chunk length C (the largest bucket)
             at each larger gear. A prompt longer than C runs as C-token chunks, each at position = its start
             (pipeline/static_export.py StaticRunner.prefill).
    names    smallest gear: decode, prefill_s{S} (the names of a one-gear package); larger gears: decode_g{G},
             prefill_s{C}_g{G}.
    HBM      what one gear keeps resident on the NPU: one copy of the weights per graph of that gear (ATC embeds the
             weights in every .om) + its past and present cache buffers (the .om's fp32 inputs and outputs, two
             buffers). Activations and workspace are not estimated: HBM_USABLE leaves room for them.
"""
from __future__ import annotations

import dataclasses
import math

from models.errors import MlamoeError
from models.static_lm import static_cache_spec
from pipeline.static_export import StaticGraphSpec

from .profile import HBM_SOURCE, HIGH_PRECISION_MODES, hbm_bytes

DEFAULT_BATCH = 1
DEFAULT_BUCKETS = (16, 64, 256)
DEFAULT_GEARS = (4096, 32768, 131072)  # the gears below M; M itself is always the last gear
HBM_USABLE = 0.9  # share of HBM the estimate may fill (the rest: activations, workspace, runtime); a choice
CACHE_IO_BYTES = 4  # the cache tensors are fp32 graph inputs/outputs (ATC keeps the ONNX IO dtype)


class AscendShapeError(MlamoeError):
    pass


def parse_ints(value, flag: str) -> tuple[int, ...] | None:
    """"4096,32768" (or a sequence of ints) -> sorted unique ints; None for no value; a clear error otherwise."""
    if value is None or value == "" or value == ():
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        vals = [int(str(x).strip()) for x in items]
    except ValueError:
        raise AscendShapeError(f"{flag} {value!r}: expected comma-separated integers, e.g. "
                               f"{'4096,32768,131072' if 'gears' in flag else '16,64,256'}") from None
    if len(set(vals)) != len(vals):
        raise AscendShapeError(f"{flag} {value!r}: duplicate values")
    bad = [v for v in vals if v < 2]
    if bad:
        raise AscendShapeError(f"{flag} {value!r}: every value must be >= 2, got {bad}")
    return tuple(sorted(vals))


def check_batch(batch) -> int:
    if batch is None:
        return DEFAULT_BATCH
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise AscendShapeError(f"--batch {batch}: must be an integer >= 1 (the sequences every graph runs at once)")
    return batch


def weight_bytes(cfg, precision_mode: str) -> int:
    """The weights of one .om on the NPU: parameters x 2 bytes (fp16 under the lowering precision modes), x 4
    under must_keep_origin_dtype / origin."""
    return cfg.param_count() * (4 if precision_mode in HIGH_PRECISION_MODES else 2)


def cache_bytes(cfg, batch: int, rows: int) -> int:
    """Bytes of one set of cache buffers (every layer's past.* tensors) at `rows` cache rows."""
    spec = static_cache_spec(cfg)
    return int(sum(math.prod(s) for s in spec.static_shapes(batch, rows)) * CACHE_IO_BYTES * spec.num_layers)


@dataclasses.dataclass(frozen=True)
class GearMemory:
    gear: int
    graphs: tuple[str, ...]
    weights_bytes: int  # one .om's weights
    cache_bytes: int  # one set of buffers (past); present is a second one

    @property
    def resident_bytes(self) -> int:
        return len(self.graphs) * self.weights_bytes + 2 * self.cache_bytes

    def to_dict(self) -> dict:
        return {"gear": self.gear, "graphs": list(self.graphs), "weights_bytes_per_graph": self.weights_bytes,
                "cache_bytes_past": self.cache_bytes, "cache_bytes_past_and_present": 2 * self.cache_bytes,
                "resident_bytes": self.resident_bytes}


@dataclasses.dataclass(frozen=True)
class ServingShapes:
    batch: int
    max_cache: int
    gears: tuple[int, ...]
    buckets: tuple[int, ...]
    soc_version: str
    hbm_bytes: int | None
    weights_bytes: int
    cache_bytes_per_token: int  # past + present, batch 1
    why: str  # how max_cache was chosen
    gear_cache_bytes: tuple[int, ...] = ()  # one set of buffers (past) per gear, batch B

    @property
    def chunk(self) -> int:
        return self.buckets[-1]

    def graph_name(self, gear: int, seq: int) -> str:
        base = "decode" if seq == 1 else f"prefill_s{seq}"
        return base if gear == self.gears[0] else f"{base}_g{gear}"

    def gear_specs(self, gear: int) -> list[StaticGraphSpec]:
        seqs = self.buckets if gear == self.gears[0] else (self.chunk,)
        return ([StaticGraphSpec(self.graph_name(gear, 1), self.batch, 1, gear, "gather")]
                + [StaticGraphSpec(self.graph_name(gear, s), self.batch, s, gear, "dense") for s in seqs])

    def specs(self) -> list[StaticGraphSpec]:
        return [s for g in self.gears for s in self.gear_specs(g)]

    def base_specs(self) -> list[StaticGraphSpec]:
        """The smallest gear's graphs: the ones run and verified on this machine."""
        return self.gear_specs(self.gears[0])

    def memory(self) -> list[GearMemory]:
        return [GearMemory(g, tuple(s.name for s in self.gear_specs(g)), self.weights_bytes, c)
                for g, c in zip(self.gears, self.gear_cache_bytes)]

    def usable_bytes(self) -> int | None:
        return None if self.hbm_bytes is None else int(self.hbm_bytes * HBM_USABLE)

    def to_manifest(self) -> dict:
        return {"batch": self.batch, "max_cache": self.max_cache, "gears": list(self.gears),
                "prefill_buckets": list(self.buckets), "chunk": self.chunk, "why_max_cache": self.why,
                "graphs": {str(g): [s.name for s in self.gear_specs(g)] for g in self.gears},
                "hbm": {"soc_version": self.soc_version, "bytes": self.hbm_bytes, "usable_share": HBM_USABLE,
                        "source": HBM_SOURCE if self.hbm_bytes else None,
                        "weights_bytes_per_graph": self.weights_bytes,
                        "cache_bytes_per_token_batch1_past_and_present": self.cache_bytes_per_token,
                        "per_gear": [m.to_dict() for m in self.memory()]}}


def _gb(n: int | float) -> str:
    return f"{n / 1e9:.2f} GB"


def resolve_shapes(cfg, soc_version: str, precision_mode: str, batch=None, max_cache=None, gears=None,
                   buckets=None) -> ServingShapes:
    """The package's shapes from the options (None: the default), or AscendShapeError naming the option, the value
    and the fix."""
    B = check_batch(batch)
    P = cfg.max_position_embeddings
    given_buckets = parse_ints(buckets, "--prefill-buckets")
    given_gears = parse_ints(gears, "--cache-gears")
    if max_cache is not None and (not isinstance(max_cache, int) or max_cache < 2):
        raise AscendShapeError(f"--max-cache {max_cache}: must be an integer >= 2 (cache rows, i.e. tokens)")
    W = weight_bytes(cfg, precision_mode)
    per_token = 2 * cache_bytes(cfg, 1, 1)  # past + present
    hbm = hbm_bytes(soc_version)
    usable = None if hbm is None else int(hbm * HBM_USABLE)
    bk = given_buckets or DEFAULT_BUCKETS

    if max_cache is not None:
        M, why = max_cache, f"--max-cache {max_cache}"
    elif given_gears is not None:
        M, why = given_gears[-1], f"the largest of --cache-gears {','.join(map(str, given_gears))}"
    else:
        M, why = P, f"the model's max_position_embeddings {P}"
        if usable is not None:
            # the largest gear holds 2 graphs (decode + the chunk prefill) when there are several gears
            room = usable - 2 * W
            cap = room // (per_token * B) if room > 0 else 0
            cap -= cap % bk[-1] if cap >= bk[-1] else 0
            if cap < M:
                M, why = cap, (f"capped by the HBM estimate: {soc_version} {_gb(hbm)} x {HBM_USABLE} usable = "
                               f"{_gb(usable)} >= 2 graphs x {_gb(W)} weights + {per_token:,} B/token x batch {B} x "
                               f"{cap} tokens (max_position_embeddings {P})")
        if usable is not None and M < bk[-1] < P:
            raise AscendShapeError(
                f"--batch {B}: the HBM estimate leaves room for {M} cache tokens ({soc_version} {_gb(usable)} usable, "
                f"2 graphs x {_gb(W)} weights, {per_token:,} B/token x batch {B}), less than one prefill bucket "
                f"({bk[-1]}): lower --batch")
        if given_buckets is None and M < bk[-1]:
            bk = tuple(b for b in bk if b <= M) or (M,)
    if M > P:
        src, fix = ((f"--max-cache {M}", f"--max-cache {P} or less") if max_cache is not None else
                    (f"--cache-gears {','.join(map(str, given_gears))}", f"gears of at most {P}"))
        raise AscendShapeError(f"{src}: over the model's max_position_embeddings {P} (its RoPE covers no more "
                               f"positions); use {fix}")
    if given_gears is not None and given_gears[-1] != M:
        raise AscendShapeError(f"--cache-gears {','.join(map(str, given_gears))}: the largest gear must equal "
                               f"--max-cache {M} (the longest cache the package serves); add {M} or drop --max-cache")
    if M < bk[-1]:
        raise AscendShapeError(f"--max-cache {M}: below the largest prefill bucket {bk[-1]} (a bucket must fit in the "
                               f"cache); use --max-cache {bk[-1]} or more, or smaller --prefill-buckets")
    G = given_gears or (tuple(g for g in DEFAULT_GEARS if bk[-1] <= g < M) + (M,))
    if G[0] < bk[-1]:
        raise AscendShapeError(f"--cache-gears {','.join(map(str, G))}: the smallest gear {G[0]} is below the largest "
                               f"prefill bucket {bk[-1]} (the smallest gear holds every bucket); use gears >= {bk[-1]}")
    shapes = ServingShapes(B, M, G, bk, soc_version, hbm, W, per_token, why, tuple(cache_bytes(cfg, B, g) for g in G))
    if usable is not None:
        for m in sorted(shapes.memory(), key=lambda m: -m.gear):
            if m.resident_bytes > usable:
                what = (f"--cache-gears {','.join(map(str, G))}" if given_gears is not None and m.gear != M
                        else f"--max-cache {M}")
                raise AscendShapeError(
                    f"{what} at --batch {B}: gear {m.gear} needs {_gb(m.resident_bytes)} on the NPU "
                    f"({len(m.graphs)} graphs x {_gb(W)} weights + past and present cache {_gb(2 * m.cache_bytes)}), "
                    f"over the usable {_gb(usable)} ({HBM_USABLE} of {soc_version}'s {_gb(hbm)} HBM); lower "
                    f"--max-cache or --batch")
    return shapes


def describe(shapes: ServingShapes) -> list[str]:
    """The progress lines: the shapes, why M, and the HBM estimate per gear."""
    out = [f"[ascend] shapes: batch {shapes.batch}, max cache {shapes.max_cache} ({shapes.why}), gears "
           f"{list(shapes.gears)}, prefill buckets {list(shapes.buckets)} (longer prompts in {shapes.chunk}-token "
           "chunks)"]
    if shapes.hbm_bytes is None:
        out.append(f"[ascend] HBM: no sourced HBM figure for {shapes.soc_version}; the memory bound is not checked")
    for m in shapes.memory():
        out.append(f"[ascend] HBM estimate gear {m.gear}: {len(m.graphs)} graphs x {_gb(m.weights_bytes)} weights + "
                   f"{shapes.cache_bytes_per_token:,} B/token x batch {shapes.batch} x {m.gear} tokens "
                   f"= {_gb(m.resident_bytes)}"
                   + ("" if shapes.hbm_bytes is None else
                      f" of {_gb(shapes.usable_bytes())} usable ({shapes.soc_version} {_gb(shapes.hbm_bytes)})"))
    return out


def memory_table(shapes: ServingShapes) -> str:
    """The package README's table: per gear, the graphs, weights and cache bytes at the package's batch."""
    rows = "\n".join(f"| {m.gear:,} | {', '.join(f'`{g}`' for g in m.graphs)} | {_gb(len(m.graphs) * m.weights_bytes)} "
                     f"| {_gb(2 * m.cache_bytes)} | {_gb(m.resident_bytes)} |" for m in shapes.memory())
    return ("| gear (cache rows) | graphs | weights (one copy per .om) | cache past + present (fp32, batch "
            f"{shapes.batch}) | resident |\n|---|---|---|---|---|\n{rows}")
