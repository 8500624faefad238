"""Packed storage of many adapters' deltas for one served layer (see ``sparse_engine/kernels/multi_adapter.py``)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import ClassVar

import torch

from sparse_engine.config import SUPPORTED_BLOCK_SIZES

BLOCK, ELEMENT = "block", "element"
SUPPORTED_BLOCK_SIZE = SUPPORTED_BLOCK_SIZES[0]  # the multi-adapter block kernels take 16×16 tiles only
INT32_MAX = 2**31 - 1


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class LayerPool:
    """Packed storage of every adapter's delta of one layer (see ``sparse_engine/kernels/multi_adapter.py``).

    Block pool ``blocks [cap, B, B]`` + ``block_cols int32``; element pool ``values [cap]`` +
    ``cols`` (int16 when ``d_in < 2**15`` and the Triton kernels read the pool; int32 for the
    reference path, ``int32_cols``, whose torch sparse matrices take int32 ids as they are); CSR row pointers per slot (absolute offsets),
    ``blk_ptr [slot_cap, d_out/B + 1]`` and ``el_ptr [slot_cap, d_out + 1]``. A format's pointer
    table exists only while the layer holds an adapter of that format (``None`` otherwise): an
    element table is 4·(d_out + 1) bytes per slot, 37 kB per slot at Phi-3's qkv, and a library
    of block adapters should not pay it. Each adapter owns one contiguous extent of its format's
    pool; unregistering compacts the pool. The library drops a pool once it holds no adapter.
    """

    _TABLES: ClassVar[dict[str, str]] = {BLOCK: "blk_ptr", ELEMENT: "el_ptr"}
    _BUFFERS: ClassVar[dict[str, tuple[str, str]]] = {BLOCK: ("blocks", "block_cols"), ELEMENT: ("values", "cols")}
    _TENSORS = (*_BUFFERS[BLOCK], *_BUFFERS[ELEMENT], *_TABLES.values())

    def __init__(self, name: str, shape: tuple[int, int], device, dtype, int32_cols: bool = False):
        self.name = name
        self.shape = shape
        self.device = device
        self.dtype = dtype
        d_out, d_in = shape
        bs = SUPPORTED_BLOCK_SIZE
        self.n_rb = d_out // bs
        self.col_dtype = torch.int32 if int32_cols or d_in >= 2**15 else torch.int16
        self.n_blocks = 0
        self.n_values = 0
        self.blk_ptr: torch.Tensor | None = None
        self.el_ptr: torch.Tensor | None = None
        self._empty_buffers(BLOCK)
        self._empty_buffers(ELEMENT)
        self.extents: dict[int, tuple[str, int, int]] = {}  # slot -> (kind, offset, length)

    def _empty_buffers(self, kind: str) -> None:
        if kind == BLOCK:
            bs = SUPPORTED_BLOCK_SIZE
            self.blocks = torch.empty((0, bs, bs), dtype=self.dtype, device=self.device)
            self.block_cols = torch.empty(0, dtype=torch.int32, device=self.device)
        else:
            self.values = torch.empty(0, dtype=self.dtype, device=self.device)
            self.cols = torch.empty(0, dtype=self.col_dtype, device=self.device)

    def table_width(self, kind: str) -> int:
        return (self.n_rb if kind == BLOCK else self.shape[0]) + 1

    def entry_bytes(self, kind: str) -> int:
        """Device bytes of one stored entry: a B×B block + its column id, or a value + its column id."""
        value = dtype_size(self.dtype)
        if kind == BLOCK:
            return SUPPORTED_BLOCK_SIZE**2 * value + 4
        return value + dtype_size(self.col_dtype)

    # -- accounting
    def table_bytes(self) -> int:
        return sum(tensor_bytes(t) for t in (getattr(self, attr) for attr in self._TABLES.values()) if t is not None)

    def used_bytes(self) -> int:
        """Entries in use plus the pointer tables (allocated whole, ``slot_cap`` rows each)."""
        return (self.n_blocks * self.entry_bytes(BLOCK) + self.n_values * self.entry_bytes(ELEMENT)
                + self.table_bytes())

    def reserved_bytes(self, replaced: Mapping[str, torch.Tensor] | None = None) -> int:
        """Every device byte the pool holds; with ``replaced`` (staged tensors), what it would hold."""
        tensors = {attr: getattr(self, attr) for attr in self._TENSORS}
        tensors.update(replaced or {})
        return sum(tensor_bytes(t) for t in tensors.values() if t is not None)

    # -- staging / commit (a failed registration changes nothing visible)
    def stage_tables(self, slot_cap: int, kind: str | None = None) -> dict:
        """New pointer tables for ``slot_cap`` slots: the existing ones grown (copies), and a
        first, zeroed table for ``kind`` when the layer has no adapter of that format yet."""
        out = {}
        for k, attr in self._TABLES.items():
            table = getattr(self, attr)
            if table is None:
                if k == kind:
                    out[attr] = torch.zeros((slot_cap, self.table_width(k)), dtype=torch.int32, device=self.device)
            elif table.shape[0] < slot_cap:
                out[attr] = _grow_rows(table, slot_cap)
        return out

    def stage(self, slot: int, source, slot_cap: int, exact: bool = False) -> dict:
        """Write the entries of ``source`` (a ``serving.source.LayerSource``) past the used end of
        the pool, piece by piece; nothing visible changes. The transient memory is one piece:
        the pool's buffers are grown (copies) only when the entries do not fit.

        ``exact``: grow buffers to exactly what is needed (no 1.5× headroom)."""
        d_out, d_in = self.shape
        kind = source.kind
        tensors = self.stage_tables(slot_cap, kind)
        offset, n = (self.n_blocks if kind == BLOCK else self.n_values), source.count
        if offset + n > INT32_MAX:
            raise ValueError(f"layer {self.name}: the pool would exceed 2**31 entries")
        n_lines, per_line = (self.n_rb, d_in // SUPPORTED_BLOCK_SIZE) if kind == BLOCK else (d_out, d_in)
        data_attr, col_attr = self._BUFFERS[kind]
        data_buf, col_buf = _room(getattr(self, data_attr), getattr(self, col_attr), offset, n, exact)
        counts = torch.zeros(n_lines, dtype=torch.int64)
        pos = offset
        for values, ids in source.pieces():
            rows = torch.div(ids, per_line, rounding_mode="floor")
            counts += torch.bincount(rows, minlength=n_lines).cpu()
            end = pos + ids.numel()
            data_buf[pos:end] = values  # cast to the pool's dtype and device on the way
            col_buf[pos:end] = ids - rows * per_line
            pos = end
        line = torch.zeros(n_lines + 1, dtype=torch.int64)
        line[1:] = torch.cumsum(counts, 0)
        tensors[data_attr], tensors[col_attr] = data_buf, col_buf
        return {"pool": self, "slot": slot, "kind": kind, "offset": offset, "n": n,
                "line": (line + offset).to(device=self.device, dtype=torch.int32), "tensors": tensors}

    def commit(self, st: dict) -> None:
        """Swap in the staged tensors; for an adapter's staging, publish its row-pointer line."""
        for attr, tensor in st["tensors"].items():
            setattr(self, attr, tensor)
        if "slot" not in st:  # only pointer tables grown for more slots
            return
        slot, n, kind = st["slot"], st["n"], st["kind"]
        if kind == BLOCK:
            self.n_blocks += n
        else:
            self.n_values += n
        getattr(self, self._TABLES[kind])[slot].copy_(st["line"])
        self.extents[slot] = (kind, st["offset"], n)

    def remove(self, slot: int) -> None:
        """Drop the slot's extent and compact its pool (later extents move down); the format's
        buffers and pointer table are freed when no adapter of that format is left."""
        kind, offset, n = self.extents.pop(slot)
        data_attr, col_attr = self._BUFFERS[kind]
        table = getattr(self, self._TABLES[kind])
        used = self.n_blocks if kind == BLOCK else self.n_values
        used = self._compact((getattr(self, data_attr), getattr(self, col_attr)), used, offset, n, table)
        if kind == BLOCK:
            self.n_blocks = used
        else:
            self.n_values = used
        table[slot].zero_()
        for s, (k, off, m) in list(self.extents.items()):
            if k == kind and off >= offset + n and n:
                self.extents[s] = (k, off - n, m)
        if not any(k == kind for k, _, _ in self.extents.values()):
            setattr(self, self._TABLES[kind], None)
            self._empty_buffers(kind)

    @staticmethod
    def _compact(arrays, used, offset, n, table) -> int:
        """Close the gap of ``n`` entries at ``offset`` in place; returns the new used count."""
        if n == 0:
            return used
        tail = used - offset - n
        for arr in arrays:
            if tail:
                arr[offset: offset + tail] = arr[offset + n: used].clone()
        table.sub_(torch.where(table >= offset + n, n, 0).to(table.dtype))
        return used - n

    def shrink_to_fit(self, slot_cap: int) -> None:
        """Buffers down to the entries in use, pointer tables down to ``slot_cap`` rows."""
        self.blocks = self.blocks[: self.n_blocks].clone()
        self.block_cols = self.block_cols[: self.n_blocks].clone()
        self.values = self.values[: self.n_values].clone()
        self.cols = self.cols[: self.n_values].clone()
        for attr in self._TABLES.values():
            table = getattr(self, attr)
            if table is not None and table.shape[0] > slot_cap:
                setattr(self, attr, table[:slot_cap].clone())

    # -- snapshots (AdapterLibrary.load_dir rolls back to one)
    def snapshot(self) -> dict:
        state = {attr: getattr(self, attr) for attr in self._TENSORS}
        state.update(n_blocks=self.n_blocks, n_values=self.n_values, extents=dict(self.extents))
        return state

    def restore(self, state: Mapping, freed_slots: Iterable[int]) -> None:
        """Back to ``state``. Entries written past the used ends since then are invisible; the
        pointer-table rows of ``freed_slots`` (slots taken since the snapshot) are zeroed, since
        tables not grown since were written in place."""
        for attr, value in state.items():
            setattr(self, attr, dict(value) if attr == "extents" else value)
        for attr in self._TABLES.values():
            table = getattr(self, attr)
            if table is None:
                continue
            for slot in freed_slots:
                if slot < table.shape[0]:
                    table[slot].zero_()


def _new_cap(cap: int, need: int) -> int:
    return max(need, int(math.ceil(cap * 1.5)), 16)


def _grow(t: torch.Tensor, cap: int, used: int) -> torch.Tensor:
    new = torch.empty((cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
    if used:
        new[:used] = t[:used]
    return new


def _room(data_buf: torch.Tensor, col_buf: torch.Tensor, offset: int, n: int, exact: bool = False):
    """A pool's two parallel buffers with room for ``n`` more entries at ``offset``: the same
    buffers when they fit, else larger copies holding the first ``offset`` entries (the
    originals keep what was committed; ``exact``: exactly the size needed, else 1.5× headroom)."""
    end = offset + n
    if end > data_buf.shape[0]:
        cap = end if exact else _new_cap(data_buf.shape[0], end)
        data_buf, col_buf = _grow(data_buf, cap, offset), _grow(col_buf, cap, offset)
    return data_buf, col_buf


def _grow_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    new = torch.zeros((rows, t.shape[1]), dtype=t.dtype, device=t.device)
    new[: t.shape[0]] = t
    return new
