"""What a registration reads: each adapted layer as a stream of checked pieces.

An adapter file is read piece by piece (``CHUNK_SCALARS`` values at a time, read from the
file straight into the piece's tensor: no memory map of it is resident), and deltas already in memory are
streamed the same way, so registering costs the pool's bytes plus one piece: never the whole
file beside the pool, nor a dense ΔW or mask. Every piece is checked (ids int32, sorted,
unique, in range; values finite) as it is read, before the pool writes it anywhere visible.
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.io import FORMAT_VERSION, METADATA_KEY
from sparse_engine.serving.pool import BLOCK, ELEMENT

CHUNK_SCALARS = 1 << 18
"""Values read and written per piece (1 MiB of fp32): bounds a registration's transient memory."""

# the tensors sparse_engine.io.write_adapter stores per layer L: L.<values>, L.<ids>
_FILE_TENSORS = {ELEMENT: ("values", "indices"), BLOCK: ("blocks", "block_indices")}
_VALUE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class LayerSource:
    """One adapted layer: ``count`` entries (values, or B×B blocks) at flat ids (element or
    tile ids, row-major), read by ``read(start, end)`` -> ``(values, int32 ids)``."""

    name: str
    shape: tuple[int, int]
    kind: str  # BLOCK | ELEMENT
    count: int
    block_size: int | None
    read: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    where: str  # names the adapter (and file) in error messages

    @property
    def params(self) -> int:
        """Stored scalars: kept elements, or blocks × B²."""
        return self.count * (self.block_size**2 if self.kind == BLOCK else 1)

    @property
    def units(self) -> int:
        """How many ids there are: d_out·d_in elements, or (d_out/B)·(d_in/B) tiles."""
        d_out, d_in = self.shape
        if self.kind == BLOCK:
            return (d_out // self.block_size) * (d_in // self.block_size)
        return d_out * d_in

    def pieces(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(values, ids)`` pieces in order, each checked before it is yielded."""
        step = max(1, CHUNK_SCALARS // (self.block_size**2 if self.kind == BLOCK else 1))
        last = -1
        for start in range(0, self.count, step):
            end = min(start + step, self.count)
            values, ids = self.read(start, end)
            if ids.dtype != torch.int32 or ids.shape != (end - start,) or values.shape[0] != end - start:
                raise ValueError(f"{self.where}: layer {self.name}: ids must be int32 with one per stored entry")
            first, final = (int(v) for v in ids[[0, -1]].tolist())
            if first <= last or bool((ids[1:] <= ids[:-1]).any()):
                raise ValueError(f"{self.where}: layer {self.name}: ids must be sorted and unique")
            if first < 0 or final >= self.units:
                raise ValueError(f"{self.where}: layer {self.name}: ids out of range [0, {self.units})")
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"{self.where}: layer {self.name} holds NaN or Inf values")
            last = final
            yield values, ids


def delta_sources(deltas: Mapping, where: str) -> dict[str, LayerSource]:
    """Sources over ``{layer: SparseDelta | BlockSparseDelta}`` already in memory (read as views)."""
    out = {}
    for layer, delta in deltas.items():
        if isinstance(delta, BlockSparseDelta):
            values, ids, kind, bs = delta.blocks, delta.block_indices, BLOCK, delta.block_size
        elif isinstance(delta, SparseDelta):
            values, ids, kind, bs = delta.values, delta.indices, ELEMENT, None
        else:
            raise TypeError(f"{where}: layer {layer} is a {type(delta).__name__}, not a SparseDelta/BlockSparseDelta")
        out[layer] = LayerSource(layer, tuple(delta.shape), kind, int(ids.numel()), bs,
                                 functools.partial(_slices, values, ids), where)
    return out


def _slices(values, ids, start, end):
    return values[start:end], ids[start:end]


def file_sources(path, where: str) -> tuple[dict, dict[str, LayerSource]]:
    """(metadata, sources) of an adapter file: its safetensors header is read and checked now
    (format version, every layer's tensors, dtypes, shapes and byte ranges); the entries are
    read when streamed, each piece straight from the file into its own tensor (no memory map)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"its header claims {n} bytes of a {size}-byte file")
            header = json.loads(f.read(n))
        raw = (header.pop("__metadata__", None) or {}).get(METADATA_KEY)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable adapter file (truncated or corrupt?): {exc}") from exc
    if raw is None:
        raise ValueError(f"{path} has no sparse-engine metadata; it is not an adapter file written by save_adapter")
    meta = json.loads(raw)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: adapter format version {meta.get('format_version')} is not supported ({FORMAT_VERSION})")
    data_start = 8 + n
    out = {}
    for layer, shape in (meta.get("layers") or {}).items():
        kind = BLOCK if f"{layer}.{_FILE_TENSORS[BLOCK][0]}" in header else ELEMENT
        v_key, i_key = (f"{layer}.{suffix}" for suffix in _FILE_TENSORS[kind])
        if v_key not in header or i_key not in header:
            raise ValueError(f"{path}: tensors of layer {layer} are missing ({v_key}, {i_key})")
        v_info, i_info = header[v_key], header[i_key]
        v_shape, i_shape = list(v_info["shape"]), list(i_info["shape"])
        bs = v_shape[-1] if kind == BLOCK else None
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{path}: layer {layer} has shape {shape}, not (d_out, d_in)")
        if v_info["dtype"] not in _VALUE_DTYPES or i_info["dtype"] != "I32":
            raise ValueError(f"{path}: layer {layer} stores {v_info['dtype']} values and {i_info['dtype']} ids; "
                             f"expected one of {sorted(_VALUE_DTYPES)} and I32")
        fits = (len(v_shape) == 3 and v_shape[1] == bs and bs > 0 and shape[0] % bs == 0 and shape[1] % bs == 0
                if kind == BLOCK else len(v_shape) == 1)
        if not fits or i_shape != v_shape[:1]:
            raise ValueError(f"{path}: layer {layer}: {v_key} {v_shape} and {i_key} {i_shape} do not fit a "
                             f"{'block' if kind == BLOCK else 'element'}-sparse layer of shape {tuple(shape)}")
        parts = []
        for info, dtype in ((v_info, _VALUE_DTYPES[v_info["dtype"]]), (i_info, torch.int32)):
            begin, end = info["data_offsets"]
            row = math.prod(info["shape"][1:]) * dtype.itemsize
            if not 0 <= begin <= end <= size - data_start or end - begin != info["shape"][0] * row:
                raise ValueError(f"{path}: tensor of layer {layer} ({info['shape']}) does not fit its bytes "
                                 f"[{begin}, {end}) of the file")
            parts.append((data_start + begin, tuple(info["shape"][1:]), dtype))
        out[layer] = LayerSource(layer, (int(shape[0]), int(shape[1])), kind, int(v_shape[0]), bs,
                                 functools.partial(_read_file, str(path), tuple(parts)), where)
    return meta, out


def _read_file(path, parts, start, end):
    """Rows ``[start, end)`` of each tensor in ``parts`` (file offset, row shape, dtype)."""
    out = []
    with open(path, "rb") as f:
        for offset, row_shape, dtype in parts:
            t = torch.empty((end - start, *row_shape), dtype=dtype)
            nbytes = t.numel() * dtype.itemsize
            f.seek(offset + start * (nbytes // max(1, end - start)))
            if nbytes and f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != nbytes:
                raise ValueError(f"{path} is cut short")
            out.append(t)
    return tuple(out)
