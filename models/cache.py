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
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

BATCH = "batch"
PAST = "past"
UPDATES = ("append",)


@dataclasses.dataclass(frozen=True)
class CacheTensor:
    """One state tensor of a layer: symbolic shape ("batch", the growing axis "past", fixed sizes)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    @property
    def grows(self) -> int:
        """The axis that grows by one row per token."""
        return self.shape.index(PAST)

    def symbolic(self, batch: int | str = BATCH, length: int | str = PAST) -> list:
        return [batch if d == BATCH else length if d == PAST else d for d in self.shape]

    def values_per_token(self) -> int:
        return math.prod(d for d in self.shape if d not in (BATCH, PAST))

    def rows(self, start: int | None, stop: int | None) -> tuple:
        """Index of rows start..stop-1 along the growing axis (every batch row)."""
        return (slice(None),) * self.grows + (slice(start, stop),)


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    layout: str
    num_layers: int
    tensors: tuple[CacheTensor, ...]  # of one layer, in graph IO order
    update: str = "append"

    def __post_init__(self):
        if self.update not in UPDATES:
            raise ValueError(f"cache update rule {self.update!r}: expected one of {UPDATES}")
        for t in self.tensors:
            if t.shape.count(PAST) != 1 or t.shape[0] != BATCH:
                raise ValueError(f"cache tensor {t.name!r} shape {t.shape}: needs '{BATCH}' first and exactly "
                                 f"one growing axis '{PAST}'")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def dtype(self) -> str:
        dtypes = {t.dtype for t in self.tensors}
        return dtypes.pop() if len(dtypes) == 1 else "mixed"

    # ---- graph IO names ---------------------------------------------------------------------------
    def layer_names(self, layer: int, prefix: str = "past") -> list[str]:
        return [f"{prefix}.{layer}.{n}" for n in self.names]

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
        return [tuple(torch.zeros(s, dtype=dtype) for s in self.symbolic_shapes(batch, length))
                for _ in range(self.num_layers)]

    def static_empty(self, batch: int, max_len: int, dtype=np.float32) -> dict[str, np.ndarray]:
        """Zero `past.*` arrays of the fixed-shape form."""
        shapes = self.static_shapes(batch, max_len)
        return {f"past.{i}.{n}": np.zeros(s, dtype) for i in range(self.num_layers) for n, s in zip(self.names, shapes)}

    def length(self, cache) -> int:
        """Tokens held by a per-layer cache (layer 0's first tensor, along its growing axis)."""
        return cache[0][0].shape[self.tensors[0].grows]

    def flatten(self, cache, prefix: str = "past") -> dict[str, np.ndarray]:
        """[(tensor, ...) per layer] (torch or numpy) -> {f"{prefix}.{i}.{name}": numpy array}."""
        return {f"{prefix}.{i}.{n}": t.numpy() if isinstance(t, torch.Tensor) else t
                for i, layer in enumerate(cache) for n, t in zip(self.names, layer)}

    def unflatten(self, flat: dict, prefix: str = "past", layers=None) -> list[tuple]:
        """{f"{prefix}.{i}.{name}": array} -> [(array, ...) per layer], the arrays as given."""
        return [tuple(flat[f"{prefix}.{i}.{n}"] for n in self.names)
                for i in (range(self.num_layers) if layers is None else layers)]

    def group(self, flat_tensors) -> list[tuple]:
        """Graph-ordered tensors (layer-major) -> [(tensor, ...) per layer]."""
        k = len(self.tensors)
        return [tuple(flat_tensors[k * i: k * (i + 1)]) for i in range(len(flat_tensors) // k)]

    # ---- the package manifest -----------------------------------------------------------------------
    def to_manifest(self) -> dict:
        """The manifest's io.cache section."""
        values = sum(t.values_per_token() for t in self.tensors)
        itemsize = sum(np.dtype(t.dtype).itemsize * t.values_per_token() for t in self.tensors)
        return {"layout": self.layout, "num_layers": self.num_layers, "dtype": self.dtype,
                "per_layer": [{"name": t.name, "shape": t.symbolic()} for t in self.tensors],
                "values_per_token_per_layer": values, "bytes_per_token_per_layer": itemsize,
                "bytes_per_token": itemsize * self.num_layers,
                "input_names": "past.{layer}.{name}", "output_names": "present.{layer}.{name}"}
