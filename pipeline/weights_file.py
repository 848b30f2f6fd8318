"""One weights file for every graph of a package folder.

A package ships several graphs over the same weights (ort-cpu / ort-cuda: prefill and decode, ort-cuda's decode
gears; ascend: decode and one prefill graph per bucket). Saved one by one, each graph carried its own copy.
`WeightsFile` saves them into one folder with ONE external-data file (default `weights.data`):

    with WeightsFile(folder) as w:                # folder/weights.data, created empty
        w.save(prefill, "prefill.onnx")           # every initializer over INLINE_BYTES goes to weights.data
        w.save(decode, "decode.onnx")             # ...unless the same bytes are already there: referenced
    w.files                                       # [folder/prefill.onnx, folder/decode.onnx, folder/weights.data]

- Dedup key: the tensor's bytes alone (sha256 + length), not its name. An external-data reference is (location,
  offset, length); dtype, shape and name stay in each graph's TensorProto, so two initializers with the same bytes
  can always share storage. Names are not stable across a package's graphs (ORT's offline optimisation renames
  folded constants, the latent-KV pass derives decode-only weights, fp16 conversion renames casts), so a
  name-keyed table would store the same bytes twice under two names.
- Written through onnx-ir: each stored tensor is streamed with `TensorProtocol.tofile` (for a tensor that is
  itself external data, onnx-ir copies file to file without materializing it), and the graph's initializer is
  replaced by an `onnx_ir.ExternalTensor` (location, offset, length) into the shared file before `ir.save` writes
  the graph; no TensorProto field is edited. onnx-ir's own `external_data.convert_tensors_to_external` writes a
  whole file in one call (and atomically replaces it), so it would need every graph in memory at once; appending
  graph by graph keeps one graph (and one tensor's bytes) in memory at a time.
- Hashing streams too: `tofile` into a sha256 sink, one tensor at a time; nothing holds a graph's bytes twice.
- Offsets of tensors over ALIGN_THRESHOLD bytes are aligned to ALIGN (4096, the page size ONNX Runtime needs to
  memory-map an initializer in place), smaller ones to 64. Initializers of at most INLINE_BYTES stay inside their
  .onnx (shapes, scalars, scales: what the ascend profile checker reads).
- After save() the model's initializers refer to the shared file: the in-memory model stays usable (and reads
  its weights from the package), and the caller's source files can be deleted.
- Deterministic: the same graphs saved in the same order give byte-identical files.
- Appending from a later step: `WeightsFile.reopen(folder, ["prefill.onnx", "decode.onnx"])` continues a closed
  file: its dedup table is rebuilt by hashing the byte ranges the named graphs (already saved over it) reference,
  and new tensors are appended after its end, so bytes already there are referenced, never stored again. The
  result is byte-identical to saving every graph in one session (the same table, the same end offset); nothing
  already written moves, so the earlier graphs stay valid. (ort-cpu: the genai graphs join onnx/weights.data.)
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx_ir as ir

from models.errors import MlamoeError

WEIGHTS_FILE = "weights.data"
INLINE_BYTES = 1024
ALIGN = 4096
SMALL_ALIGN = 64
ALIGN_THRESHOLD = 64 * 1024


class WeightsFileError(MlamoeError):
    pass


class _Sha256Sink:
    """A write-only file-like object that hashes what `tofile` writes into it."""

    def __init__(self):
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, data) -> int:
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":  # a tensor written as its own buffer (onnx-ir's TorchTensor)
            view = view.cast("B")
        self.h.update(view)
        self.n += view.nbytes
        return view.nbytes


class WeightsFile:
    """Graphs saved into `folder` over one shared external-data file `name` (module doc). Use as a context
    manager, or call close(); a graph's .onnx is written as soon as save() returns, the weights file is flushed
    before each graph file is written, so every graph saved so far loads at any time."""

    def __init__(self, folder: str | os.PathLike, name: str = WEIGHTS_FILE, inline_bytes: int = INLINE_BYTES,
                 _append: bool = False):
        if "/" in name or name in ("", ".", ".."):
            raise WeightsFileError(f"{name!r}: the weights file name must be a plain file name")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.path = self.folder / name
        self.inline_bytes = inline_bytes
        self._stored: dict[tuple[str, int], int] = {}  # (sha256, length) -> offset
        # append: never truncate (graphs loaded from the file may be memory-mapping it)
        self._f = open(self.path, "r+b" if _append else "wb")
        self._f.seek(0, os.SEEK_END)
        self.graphs: list[Path] = []
        self.referenced_bytes = 0  # bytes of every external initializer of every graph (what separate copies cost)

    @classmethod
    def reopen(cls, folder: str | os.PathLike, graphs: list[str], name: str = WEIGHTS_FILE,
               inline_bytes: int = INLINE_BYTES) -> "WeightsFile":
        """Continue the closed weights file folder/name, over which `graphs` (file names in folder, in the order
        they were saved) already are: those graphs are listed first in .graphs, their references counted in
        referenced_bytes, and every byte range they reference is hashed into the dedup table (module doc)."""
        import onnx
        folder = Path(folder)
        if not (folder / name).is_file():
            raise WeightsFileError(f"{folder / name}: no weights file to append to")
        w = cls(folder, name, inline_bytes, _append=True)
        size = w._f.tell()
        try:
            for filename in graphs:
                path = folder / filename
                if path.parent != folder or not path.is_file():
                    raise WeightsFileError(f"{filename!r}: not a graph in {folder}")
                for t in _external_tensors(onnx.load(str(path), load_external_data=False).graph):
                    info = {e.key: e.value for e in t.external_data}
                    if info["location"] != name:
                        raise WeightsFileError(f"{filename}: initializer {t.name!r} is in {info['location']!r}, "
                                               f"not {name!r}")
                    offset, length = int(info.get("offset", 0)), int(info["length"])
                    if offset + length > size:
                        raise WeightsFileError(f"{filename}: initializer {t.name!r} at {offset}+{length} is past the "
                                               f"end of {name} ({size} bytes)")
                    key = (_hash_range(w._f, offset, length), length)
                    w._stored[key] = min(offset, w._stored.get(key, offset))
                    w.referenced_bytes += length
                w.graphs.append(path)
        except BaseException:
            w.close()
            raise
        w._f.seek(0, os.SEEK_END)
        return w

    # -------------------------------------------------------------------------------------------- writing
    @property
    def stored_bytes(self) -> int:
        return self._f.tell() if not self._f.closed else self.path.stat().st_size

    @property
    def files(self) -> list[Path]:
        return [*self.graphs, self.path]

    def _append(self, tensor) -> tuple[int, int]:
        sink = _Sha256Sink()
        tensor.tofile(sink)
        key = (sink.h.hexdigest(), sink.n)
        if key not in self._stored:
            align = ALIGN if sink.n > ALIGN_THRESHOLD else SMALL_ALIGN
            pad = (-self._f.tell()) % align
            if pad:
                self._f.write(b"\0" * pad)
            offset = self._f.tell()
            self._f.flush()
            tensor.tofile(self._f)
            self._f.flush()
            if self._f.tell() - offset != sink.n:
                raise WeightsFileError(f"{self.path}: tensor {tensor.name!r} wrote {self._f.tell() - offset} bytes, "
                                       f"{sink.n} expected")
            self._stored[key] = offset
        return self._stored[key], sink.n

    def store(self, model: ir.Model) -> None:
        """Put `model`'s large initializers into the shared file and make them references to it (no graph file is
        written): a graph built in parts (pipeline/layerwise.py) stores each part as it is made and is saved
        whole later, its references kept as they are. Tensors already referring to this file stay where they
        are."""
        if self._f.closed:
            raise WeightsFileError(f"{self.path}: closed; open a new WeightsFile to store more tensors")
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None:
                    continue
                if self._holds(tensor):
                    self.referenced_bytes += tensor.length
                    continue
                if tensor.nbytes <= self.inline_bytes:
                    if isinstance(tensor, ir.ExternalTensor):  # a small weight still in some other data file
                        value.const_value = ir.Tensor(tensor.numpy().copy(), name=tensor.name, dtype=tensor.dtype)
                    continue
                offset, length = self._append(tensor)
                self.referenced_bytes += length
                value.const_value = ir.ExternalTensor(self.name, offset, length, tensor.dtype, shape=tensor.shape,
                                                      name=tensor.name, base_dir=self.folder)
        self._f.flush()

    def _holds(self, tensor) -> bool:
        return (isinstance(tensor, ir.ExternalTensor) and tensor.location == self.name
                and Path(tensor.base_dir).resolve() == self.folder.resolve())

    def save(self, model: ir.Model, filename: str, check: bool = True) -> Path:
        """Save `model` as folder/filename, its large initializers in the shared file (module doc). check: run
        ONNX's checker on the saved file (off for ORT-optimized graphs, whose contrib ops only ORT knows)."""
        if self._f.closed:
            raise WeightsFileError(f"{self.path}: closed; open a new WeightsFile to save more graphs")
        path = self.folder / filename
        if path.parent != self.folder:
            raise WeightsFileError(f"{filename!r}: a graph of a WeightsFile is saved beside its weights file "
                                   f"({self.folder})")
        self.store(model)
        self._f.flush()
        ir.save(model, path)
        if check:
            from pipeline.export import check_graph
            check_graph(path)
        self.graphs.append(path)
        return path

    def save_file(self, src: str | os.PathLike, filename: str | None = None, check: bool = False) -> Path:
        """Load a saved graph (its weights memory-mapped) and save() it here."""
        src = Path(src)
        return self.save(ir.load(src), filename or src.name, check=check)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "WeightsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def weights_section(w: WeightsFile, rel_dir: str) -> dict:
    """The manifest's io.weights: the shared file and the graphs over it, as paths relative to the package root
    (`rel_dir`: the folder's path there, e.g. "onnx"); bytes stored once against what separate copies would take."""
    return {"file": f"{rel_dir}/{w.name}", "bytes": w.stored_bytes, "graphs": [f"{rel_dir}/{p.name}" for p in w.graphs],
            "referenced_bytes": w.referenced_bytes, "inline_max_bytes": w.inline_bytes,
            "dedup": "bytes (sha256 + length); each graph references its initializers by offset"}


def save_graphs(folder: str | os.PathLike, graphs: dict[str, ir.Model | str | os.PathLike],
                name: str = WEIGHTS_FILE, check: bool = True) -> list[Path]:
    """Save {filename: model or saved graph path} into folder over one weights file, in the dict's order;
    -> the files written (graphs, then the weights file)."""
    with WeightsFile(folder, name) as w:
        for filename, g in graphs.items():
            if isinstance(g, ir.Model):
                w.save(g, filename, check=check)
            else:
                w.save_file(g, filename, check=check)
    return w.files


def _external_tensors(g):
    """Every initializer of graph proto `g` (and its subgraphs) stored as external data."""
    import onnx
    for t in g.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t
    for n in g.node:
        for a in n.attribute:
            if a.HasField("g"):
                yield from _external_tensors(a.g)
            for sub in a.graphs:
                yield from _external_tensors(sub)


def _hash_range(f, offset: int, length: int, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    f.seek(offset)
    left = length
    while left:
        data = f.read(min(chunk, left))
        if not data:
            raise WeightsFileError(f"{f.name}: ends inside the range {offset}+{length}")
        h.update(data)
        left -= len(data)
    return h.hexdigest()


def external_files(path: str | os.PathLike) -> dict[str, int]:
    """{external data file (relative to the graph's folder): bytes of it the graph references}, read from the
    graph's protobuf without loading any weights."""
    import onnx
    out: dict[str, int] = {}
    for t in _external_tensors(onnx.load(str(path), load_external_data=False).graph):
        info = {e.key: e.value for e in t.external_data}
        out[info["location"]] = out.get(info["location"], 0) + int(info.get("length", 0))
    return out
