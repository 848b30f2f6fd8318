"""A model family's cache spec: the named state tensors each layer keeps between steps, and how a step
(a prefill chunk or one decode token) reads and writes them. Export, golden data, the package IO spec,
the runtimes, the static (Ascend) export and the expert-parallel graphs read this spec; none of them
names a family's tensors.

Graph IO per layer i: inputs `past.{i}.{name}`, outputs `present.{i}.{name}`, layers in order and each
layer's tensors in spec order.

Update rules:
  "append"  (dynamic-shape graphs) present = past with this step's S rows appended along the growing
            axis; the past length T is read from the growing axis of layer 0's first tensor.
  static    (fixed-shape graphs, `static_shape`) the growing axis has a fixed length M; a step at
            `position` overwrites rows position .. position+S-1 and leaves the others as they were.

Per-layer specs (`CacheSpec.per_layer`, DeepSeek-V4): layers of different types hold different tensors, and
each tensor's length along its "past" axis follows its own rule of the tokens seen, T:
  append          T rows (one per token)
  window(n)       min(T, n) rows (the last n tokens)
  pending(m)      T % m rows (tokens since the last closed window of m)
  compressed(m)   T // m rows (one entry per closed window of m)
  fixed           no growing axis
`length(cache)` reads T back from a layer holding a pending(m) and a compressed(m) tensor: T = m * C + P.
The uniform specs (every layer the same tensors, all "append") keep their API and manifest unchanged.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

BATCH = "batch"
PAST = "past"
UPDATES = ("append",)
RULES = ("append", "window", "pending", "compressed", "fixed")


@dataclasses.dataclass(frozen=True)
class CacheTensor:
    """One state tensor of a layer: symbolic shape ("batch", the growing axis "past", fixed sizes)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    rule: str = "append"  # how the "past" axis follows the tokens seen T (module docstring); n: its W or m
    n: int = 0
    fill: float = 0.0  # value of an empty cache's entries (a fixed tensor's initial state, e.g. -inf gates)

    def rows_for(self, tokens: int) -> int:
        """Length of the growing axis after `tokens` tokens."""
        return {"append": tokens, "window": min(tokens, self.n), "pending": tokens % max(self.n, 1),
                "compressed": tokens // max(self.n, 1), "fixed": 0}[self.rule]

    def length_symbol(self) -> str:
        return {"append": PAST, "window": f"min({PAST},{self.n})", "pending": f"{PAST}%{self.n}",
                "compressed": f"{PAST}//{self.n}", "fixed": ""}[self.rule]

    def entries_per_token(self) -> float:
        """Rows added per token in the long run (append 1, compressed 1/m; bounded rules 0)."""
        return {"append": 1.0, "compressed": 1.0 / max(self.n, 1)}.get(self.rule, 0.0)

    def bounded_rows(self) -> int:
        """Rows a bounded rule holds at most (window n, pending m-1; fixed: the whole tensor counts as 1)."""
        return {"window": self.n, "pending": self.n - 1, "fixed": 1}.get(self.rule, 0)

    @property
    def grows(self) -> int:
        """The axis that grows by one row per token."""
        return self.shape.index(PAST)

    def symbolic(self, batch: int | str = BATCH, length: int | str = PAST) -> list:
        if self.rule != "append":  # length: tokens seen (an int) or the symbol, mapped through the rule
            length = self.rows_for(length) if isinstance(length, int) else self.length_symbol()
        return [batch if d == BATCH else length if d == PAST else d for d in self.shape]

    def values_per_token(self) -> int:
        return math.prod(d for d in self.shape if d not in (BATCH, PAST))

    def rows(self, start: int | None, stop: int | None) -> tuple:
        """Index of rows start..stop-1 along the growing axis (every batch row)."""
        return (slice(None),) * self.grows + (slice(start, stop),)


def _json_number(x: float) -> float | str:
    """x, or "inf" / "-inf" / "nan" as a string (the manifest is strict JSON: no Infinity)."""
    return x if math.isfinite(x) else str(x)


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    layout: str
    num_layers: int
    tensors: tuple[CacheTensor, ...]  # of one layer, in graph IO order (uniform specs)
    update: str = "append"
    per_layer: tuple[tuple[CacheTensor, ...], ...] | None = None  # each layer's own tensors (then tensors=())

    def __post_init__(self):
        if self.update not in UPDATES:
            raise ValueError(f"cache update rule {self.update!r}: expected one of {UPDATES}")
        if self.per_layer is not None and (self.tensors or len(self.per_layer) != self.num_layers):
            raise ValueError("a per-layer cache spec gives per_layer (one tuple per layer) and no uniform tensors")
        for t in {t for layer in self.layers for t in layer}:
            if t.rule not in RULES:
                raise ValueError(f"cache tensor {t.name!r}: rule {t.rule!r} is not one of {RULES}")
            if t.shape[0] != BATCH or t.shape.count(PAST) != (0 if t.rule == "fixed" else 1):
                raise ValueError(f"cache tensor {t.name!r} shape {t.shape}: needs '{BATCH}' first and exactly "
                                 f"one growing axis '{PAST}' (none for a fixed tensor)")

    @property
    def layers(self) -> tuple[tuple[CacheTensor, ...], ...]:
        """Each layer's tensors, in graph IO order."""
        return self.per_layer if self.per_layer is not None else (self.tensors,) * self.num_layers

    def layer_tensors(self, layer: int) -> tuple[CacheTensor, ...]:
        return self.layers[layer]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def dtype(self) -> str:
        dtypes = {t.dtype for layer in self.layers for t in layer}
        return dtypes.pop() if len(dtypes) == 1 else "mixed"

    # ---- graph IO names ---------------------------------------------------------------------------
    def layer_names(self, layer: int, prefix: str = "past") -> list[str]:
        return [f"{prefix}.{layer}.{t.name}" for t in self.layers[layer]]

    def names_of(self, prefix: str, layers=None) -> list[str]:
        """`{prefix}.{i}.{name}` for each layer i (all by default), layer-major."""
        return [n for i in (range(self.num_layers) if layers is None else layers) for n in self.layer_names(i, prefix)]

    def input_names(self, layers=None) -> list[str]:
        return self.names_of("past", layers)

    def output_names(self, layers=None) -> list[str]:
        return self.names_of("present", layers)

    # ---- shapes -----------------------------------------------------------------------------------
    def symbolic_shapes(self, batch: int | str = BATCH, length: int | str = PAST) -> list[list]:
        """Shape of each tensor of one layer, in spec order."""
        return [t.symbolic(batch, length) for t in self.tensors]

    def static_shapes(self, batch: int, max_len: int) -> list[tuple[int, ...]]:
        """The fixed-shape form: the growing axis has length max_len."""
        return [tuple(t.symbolic(batch, max_len)) for t in self.tensors]

    # ---- per-layer cache (list of tuples) <-> flat name -> array -----------------------------------
    def empty(self, batch: int, dtype=torch.float32, length: int = 0) -> list[tuple[torch.Tensor, ...]]:
        if self.per_layer is None:
            return [tuple(torch.zeros(s, dtype=dtype) for s in self.symbolic_shapes(batch, length))
                    for _ in range(self.num_layers)]
        return [tuple(torch.full(t.symbolic(batch, length), t.fill, dtype=dtype) for t in layer) for layer in self.layers]

    def static_empty(self, batch: int, max_len: int, dtype=np.float32) -> dict[str, np.ndarray]:
        """Zero `past.*` arrays of the fixed-shape form."""
        shapes = self.static_shapes(batch, max_len)
        return {f"past.{i}.{n}": np.zeros(s, dtype) for i in range(self.num_layers) for n, s in zip(self.names, shapes)}

    def length(self, cache) -> int:
        """Tokens held by a per-layer cache (layer 0's first tensor, along its growing axis; per-layer specs:
        m * compressed + pending rows of the first layer holding both)."""
        if self.per_layer is None:
            return cache[0][0].shape[self.tensors[0].grows]
        for layer, tensors in zip(cache, self.layers):
            rows = {t.rule: (t.n, x.shape[t.grows]) for t, x in zip(tensors, layer) if t.rule in ("pending", "compressed")}
            if "pending" in rows and "compressed" in rows:
                (m, p), (_, c) = rows["pending"], rows["compressed"]
                return m * c + p
        for layer, tensors in zip(cache, self.layers):
            for t, x in zip(tensors, layer):
                if t.rule == "append":
                    return x.shape[t.grows]
        raise ValueError("this cache spec has no layer from which the tokens seen can be read")

    def flatten(self, cache, prefix: str = "past") -> dict[str, np.ndarray]:
        """[(tensor, ...) per layer] (torch or numpy) -> {f"{prefix}.{i}.{name}": numpy array}."""
        return {f"{prefix}.{i}.{s.name}": t.numpy() if isinstance(t, torch.Tensor) else t
                for i, layer in enumerate(cache) for s, t in zip(self.layers[i], layer)}

    def unflatten(self, flat: dict, prefix: str = "past", layers=None) -> list[tuple]:
        """{f"{prefix}.{i}.{name}": array} -> [(array, ...) per layer], the arrays as given."""
        return [tuple(flat[f"{prefix}.{i}.{t.name}"] for t in self.layers[i])
                for i in (range(self.num_layers) if layers is None else layers)]

    def group(self, flat_tensors) -> list[tuple]:
        """Graph-ordered tensors (layer-major) -> [(tensor, ...) per layer]."""
        if self.per_layer is None:
            k = len(self.tensors)
            return [tuple(flat_tensors[k * i: k * (i + 1)]) for i in range(len(flat_tensors) // k)]
        out, start = [], 0
        for layer in self.layers:
            if start >= len(flat_tensors):
                break
            out.append(tuple(flat_tensors[start:start + len(layer)]))
            start += len(layer)
        return out

    # ---- the package manifest -----------------------------------------------------------------------
    def to_manifest(self) -> dict:
        """The manifest's io.cache section."""
        if self.per_layer is not None:
            return self._per_layer_manifest()
        values = sum(t.values_per_token() for t in self.tensors)
        itemsize = sum(np.dtype(t.dtype).itemsize * t.values_per_token() for t in self.tensors)
        return {"layout": self.layout, "num_layers": self.num_layers, "dtype": self.dtype,
                "per_layer": [{"name": t.name, "shape": t.symbolic()} for t in self.tensors],
                "values_per_token_per_layer": values, "bytes_per_token_per_layer": itemsize,
                "bytes_per_token": itemsize * self.num_layers,
                "input_names": "past.{layer}.{name}", "output_names": "present.{layer}.{name}"}

    def _per_layer_manifest(self) -> dict:
        """Per-layer specs: each distinct layer kind's tensors with their length rules, the values and bytes a
        token adds in the long run (compressed(m) rows count 1/m) and the bounded state (window, pending, fixed
        rows) a layer holds at most."""
        kinds: dict[tuple, dict] = {}
        layer_kind = []
        for layer in self.layers:
            key = tuple(layer)
            if key not in kinds:
                per_tok = sum(t.entries_per_token() * t.values_per_token() for t in layer)
                bytes_tok = sum(t.entries_per_token() * t.values_per_token() * np.dtype(t.dtype).itemsize for t in layer)
                bounded = sum(t.bounded_rows() * t.values_per_token() * np.dtype(t.dtype).itemsize for t in layer)
                kinds[key] = {"kind": len(kinds), "per_layer": [
                    {"name": t.name, "shape": t.symbolic(), "rule": t.rule, **({"n": t.n} if t.n else {}),
                     **({"fill": _json_number(t.fill)} if t.fill else {}),
                     "entries_per_token": t.entries_per_token()} for t in layer],
                    "values_per_token": per_tok, "bytes_per_token": bytes_tok, "bounded_bytes_per_batch_row": bounded}
            layer_kind.append(kinds[key]["kind"])
        per_kind = list(kinds.values())
        return {"layout": self.layout, "num_layers": self.num_layers, "dtype": self.dtype,
                "layer_kinds": per_kind, "layer_kind_of": layer_kind,
                "bytes_per_token": sum(per_kind[k]["bytes_per_token"] for k in layer_kind),
                "bounded_bytes_per_batch_row": sum(per_kind[k]["bounded_bytes_per_batch_row"] for k in layer_kind),
                "input_names": "past.{layer}.{name}", "output_names": "present.{layer}.{name}"}
