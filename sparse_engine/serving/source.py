"""What a registration reads: each adapted layer as a stream of checked pieces.

An adapter file is read piece by piece (``CHUNK_SCALARS`` values at a time, read from the
file straight into the piece's tensor: no memory map of it is resident), and deltas already in memory are
streamed the same way, so registering costs the pool's bytes plus one piece: never the whole
file beside the pool, nor a dense ΔW or mask. Every piece is checked (ids int32, sorted,
unique, in range; values finite) as it is read, before the pool writes it anywhere visible.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.io import TensorSpan, layer_tensor_names, read_adapter_header
from sparse_engine.serving.pool import BLOCK, ELEMENT

CHUNK_SCALARS = 1 << 18
"""Values read and written per piece (1 MiB of fp32): bounds a registration's transient memory."""

_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    meta, spans = read_adapter_header(path)
    out = {}
    for layer, shape in (meta.get("layers") or {}).items():
        block = layer_tensor_names(layer, block=True)[0] in spans
        kind = BLOCK if block else ELEMENT
        v_key, i_key = layer_tensor_names(layer, block)
        if v_key not in spans or i_key not in spans:
            raise ValueError(f"{path}: tensors of layer {layer} are missing ({v_key}, {i_key})")
        values, ids = spans[v_key], spans[i_key]
        bs = values.shape[-1] if block else None
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{path}: layer {layer} has shape {shape}, not (d_out, d_in)")
        if values.dtype not in _VALUE_DTYPES or ids.dtype != torch.int32:
            raise ValueError(f"{path}: layer {layer} stores {values.dtype} values and {ids.dtype} ids; "
                             f"expected one of {list(_VALUE_DTYPES)} and torch.int32")
        fits = (len(values.shape) == 3 and values.shape[1] == bs and bs > 0 and shape[0] % bs == 0
                and shape[1] % bs == 0 if block else len(values.shape) == 1)
        if not fits or ids.shape != values.shape[:1]:
            raise ValueError(f"{path}: layer {layer}: {v_key} {list(values.shape)} and {i_key} {list(ids.shape)} "
                             f"do not fit a {kind}-sparse layer of shape {tuple(shape)}")
        out[layer] = LayerSource(layer, (int(shape[0]), int(shape[1])), kind, values.shape[0], bs,
                                 functools.partial(_read_file, str(path), values, ids), where)
    return meta, out


def _read_file(path, values: TensorSpan, ids: TensorSpan, start: int, end: int):
    """Rows ``[start, end)`` of a layer's values and ids."""
    with open(path, "rb") as f:
        try:
            return values.read_rows(f, start, end), ids.read_rows(f, start, end)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
