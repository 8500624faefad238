"""Serving many sparse experts on one base model in one batch (issue 7).

* :class:`AdapterLibrary` holds many element- and block-sparse adapters packed on the
  model's device, one pool per adapted layer; adapters are registered / unregistered at
  run time (from adapter files or ``read_adapter`` results), checked against the model
  (layer names, shapes, base fingerprint) before anything changes, with memory accounting.
* Registering an adapter replaces each target ``nn.Linear`` it names by a
  :class:`MultiAdapterLinear` (generic module replacement, any HF model; unregistering the
  last adapter of a layer puts the ``nn.Linear`` back): its forward runs
  the base GEMM once for the whole batch, then adds each token row's sparse delta through
  ``sparse_engine.kernels.multi_adapter`` (Triton on CUDA) or its reference twin (CPU).
* ``with library.use(["expert_a", None, "expert_b"]):`` sets the per-row assignment of the
  batch (``None`` = base model); ``library.generate(...)`` / ``library.forward(...)`` wrap it.
  Generation with the KV cache works: every step's forward uses the same assignment; beams
  and ``num_return_sequences`` keep each input row's adapter on all its expanded rows.
* :func:`evaluate_routed` scores held-in tasks with each request sent to its own expert, in
  mixed batched passes; :func:`run_routed_eval` is the CLI-free entry point for adapter files.

The serving path is inference-only (no autograd through the deltas).
"""
from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine.backend import resolve as resolve_backend
from sparse_engine.config import BACKENDS
from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.io import weights_fingerprint
from sparse_engine.kernels import reference as ref

__all__ = [
    "AdapterInfo",
    "AdapterLibrary",
    "MultiAdapterLinear",
    "base_fingerprint_of",
    "evaluate_routed",
    "run_routed_eval",
]

BLOCK, ELEMENT = "block", "element"
SUPPORTED_BLOCK_SIZE = 16
_INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------- helpers


def _base_linear(module: nn.Module) -> nn.Linear | None:
    """The plain ``nn.Linear`` of ``module`` (itself, or the base of our serving wrapper)."""
    if isinstance(module, MultiAdapterLinear):
        return module.base
    if type(module).__name__ == "SparseAdapterLinear":
        return module.base
    if isinstance(module, nn.Linear):
        return module
    return None


def base_fingerprint_of(model: nn.Module, layer_names: Iterable[str]) -> str:
    """The base fingerprint ``sparse_engine.io.base_fingerprint`` would give ``model`` with
    adapters on ``layer_names``, computed from the plain (or serving-wrapped) model.

    Same hash (``io.weights_fingerprint``), over the layers in model order.
    """
    wanted = set(layer_names)
    named = []
    for name, module in model.named_modules():
        if name not in wanted:
            continue
        lin = _base_linear(module)
        if lin is None:
            raise ValueError(f"layer {name!r} of the model is a {type(module).__name__}, not an nn.Linear")
        named.append((name, lin.weight))
    missing = sorted(wanted - {name for name, _ in named})
    if missing:
        raise ValueError(f"the model has no layer named {missing[:3]}")
    return weights_fingerprint(named)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _kernels(setting: str, tensor: torch.Tensor):
    if not resolve_backend(setting, tensor).triton:
        return ref
    try:
        return importlib.import_module("sparse_engine.kernels.multi_adapter")
    except ImportError as exc:
        if setting == "triton":
            raise RuntimeError(f"the Triton multi-adapter kernels are not available: {exc}") from exc
        return ref


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# -------------------------------------------------------------------------- layer


class MultiAdapterLinear(nn.Module):
    """Drop-in for a target ``nn.Linear``: ``y = x·Wᵀ + b`` once for the batch, then each
    row's sparse delta from the library (rows with no adapter keep the base output)."""

    def __init__(self, base: nn.Linear, library: AdapterLibrary, name: str):
        super().__init__()
        self.base = base
        self.name = name
        self._library = library  # a plain attribute: the library is not a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layer={self.name!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base.weight, self.base.bias)
        return self._library._apply(self.name, x, y)


# --------------------------------------------------------------------------- pools


class _LayerPool:
    """Packed storage of every adapter's delta of one layer (see ``kernels/multi_adapter.py``).

    Block pool ``blocks [cap, B, B]`` + ``block_cols int32``; element pool ``values [cap]`` +
    ``cols`` (int16 when ``d_in < 2**15``); CSR row pointers per slot (absolute offsets),
    ``blk_ptr [slot_cap, d_out/B + 1]`` and ``el_ptr [slot_cap, d_out + 1]``. A format's pointer
    table exists only while the layer holds an adapter of that format (``None`` otherwise): an
    element table is 4·(d_out + 1) bytes per slot, 37 kB per slot at Phi-3's qkv, and a library
    of block adapters should not pay it. Each adapter owns one contiguous extent of its format's
    pool; unregistering compacts the pool. The library drops a pool once it holds no adapter.
    """

    _TABLES: ClassVar[dict[str, str]] = {BLOCK: "blk_ptr", ELEMENT: "el_ptr"}
    _BUFFERS: ClassVar[dict[str, tuple[str, str]]] = {BLOCK: ("blocks", "block_cols"), ELEMENT: ("values", "cols")}
    _TENSORS = (*_BUFFERS[BLOCK], *_BUFFERS[ELEMENT], *_TABLES.values())

    def __init__(self, name: str, shape: tuple[int, int], device, dtype):
        self.name = name
        self.shape = shape
        self.device = device
        self.dtype = dtype
        d_out, d_in = shape
        bs = SUPPORTED_BLOCK_SIZE
        self.n_rb = d_out // bs
        self.col_dtype = torch.int16 if d_in < 2**15 else torch.int32
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
        value = _dtype_size(self.dtype)
        if kind == BLOCK:
            return SUPPORTED_BLOCK_SIZE**2 * value + 4
        return value + _dtype_size(self.col_dtype)

    # -- accounting
    def table_bytes(self) -> int:
        return sum(_nbytes(t) for t in (getattr(self, attr) for attr in self._TABLES.values()) if t is not None)

    def used_bytes(self) -> int:
        """Entries in use plus the pointer tables (allocated whole, ``slot_cap`` rows each)."""
        return (self.n_blocks * self.entry_bytes(BLOCK) + self.n_values * self.entry_bytes(ELEMENT)
                + self.table_bytes())

    def reserved_bytes(self, replaced: Mapping[str, torch.Tensor] | None = None) -> int:
        """Every device byte the pool holds; with ``replaced`` (staged tensors), what it would hold."""
        tensors = {attr: getattr(self, attr) for attr in self._TENSORS}
        tensors.update(replaced or {})
        return sum(_nbytes(t) for t in tensors.values() if t is not None)

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

    def stage(self, slot: int, delta, slot_cap: int, exact: bool = False) -> dict:
        """Allocate and write ``delta`` past the used end of the pool; nothing visible changes.

        ``exact``: grow buffers to exactly what is needed (no 1.5× headroom)."""
        d_out, d_in = self.shape
        kind = BLOCK if isinstance(delta, BlockSparseDelta) else ELEMENT
        tensors = self.stage_tables(slot_cap, kind)
        if kind == BLOCK:
            ids = delta.block_indices.to(self.device).long()
            n_cb = d_in // SUPPORTED_BLOCK_SIZE
            rows, cols = ids // n_cb, (ids % n_cb).to(torch.int32)
            data = delta.blocks.to(device=self.device, dtype=self.dtype)
            offset = self.n_blocks
            line = _line(rows, self.n_rb, offset, self.device)
        else:
            idx = delta.indices.to(self.device).long()
            rows, cols = idx // d_in, (idx % d_in).to(self.col_dtype)
            data = delta.values.to(device=self.device, dtype=self.dtype)
            offset = self.n_values
            line = _line(rows, d_out, offset, self.device)
        n = int(data.shape[0])
        if offset + n > _INT32_MAX:
            raise ValueError(f"layer {self.name}: the pool would exceed 2**31 entries")
        data_attr, col_attr = self._BUFFERS[kind]
        tensors[data_attr], tensors[col_attr] = _append_at(getattr(self, data_attr), getattr(self, col_attr), offset,
                                                           data, cols, exact)
        return {"pool": self, "slot": slot, "kind": kind, "offset": offset, "n": n, "line": line, "tensors": tensors}

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


def _append_at(data_buf: torch.Tensor, col_buf: torch.Tensor, offset: int, data: torch.Tensor, cols: torch.Tensor,
               exact: bool = False):
    """Write ``data``/``cols`` at ``offset`` of a pool's two parallel buffers, into larger
    copies when they do not fit (the originals keep what was committed; ``exact``: copies of
    exactly the size needed, else with 1.5× headroom). Returns the buffers."""
    end = offset + data.shape[0]
    if end > data_buf.shape[0]:
        cap = end if exact else _new_cap(data_buf.shape[0], end)
        data_buf, col_buf = _grow(data_buf, cap, offset), _grow(col_buf, cap, offset)
    data_buf[offset:end] = data
    col_buf[offset:end] = cols
    return data_buf, col_buf


def _grow_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    new = torch.zeros((rows, t.shape[1]), dtype=t.dtype, device=t.device)
    new[: t.shape[0]] = t
    return new


def _line(rows: torch.Tensor, n_lines: int, offset: int, device) -> torch.Tensor:
    """Absolute CSR row pointers ``[n_lines + 1]`` of sorted entries in ``rows`` starting at ``offset``."""
    counts = torch.bincount(rows, minlength=n_lines) if rows.numel() else torch.zeros(n_lines, dtype=torch.long, device=device)
    line = torch.zeros(n_lines + 1, dtype=torch.long, device=device)
    line[1:] = torch.cumsum(counts, 0)
    return (line + offset).to(torch.int32)


# ----------------------------------------------------------------------- batches


@dataclass
class _Plan:
    """Segments of one adapter format for one (batch, tokens per row): see kernels/multi_adapter.py."""

    token_order: torch.Tensor
    seg_slots: torch.Tensor
    seg_offsets: torch.Tensor
    n_sel: int
    max_seg: int  # tokens of the longest segment (known on the host: no synchronisation)
    block_m: int | None  # None: chosen by the kernel module from the longest segment
    tiles: dict = field(default_factory=dict)

    def tile_table(self, impl):
        """(block_m, tile table) for a Triton kernel module, built once per batch and shared by all layers."""
        if impl is ref:
            return self.block_m, None
        bm = self.block_m or impl.choose_block_m(self.max_seg)
        if bm not in self.tiles:
            self.tiles[bm] = impl.build_tiles(self.seg_slots, self.seg_offsets, self.n_sel, bm)
        return bm, self.tiles[bm]


class _Batch:
    """A per-row adapter assignment, resolved to slots once; plans cached per tokens-per-row.

    ``repeat_rows``: the model may also see ``k · len(names)`` rows, ``k`` consecutive rows per
    assignment (how ``generate`` lays out beams and ``num_return_sequences``)."""

    def __init__(self, library: AdapterLibrary, names: Sequence[str | None], repeat_rows: bool = False):
        _check_assignment(names)
        names = list(names)
        unknown = sorted({n for n in names if n is not None and n not in library._adapters}, key=str)
        if unknown:
            raise ValueError(
                f"unknown adapter name(s) {unknown[:5]}; registered: {sorted(library._adapters)[:20]}"
                + " (use None for rows that should run the base model)"
            )
        self.library = library
        self.names = names
        self.repeat_rows = repeat_rows
        self.slots = [-1 if n is None else library._adapters[n].slot for n in names]
        self.kinds = [None if n is None else library._adapters[n].kind for n in names]
        self._plans: dict = {}

    def rows_per_assignment(self, rows: int, layer: str, flattened: bool = False) -> int:
        """How many consecutive rows of a batch of ``rows`` rows each assignment covers: 1, or
        (``repeat_rows``, or ``flattened``: 2-D activations ``[batch·tokens, features]`` as OPT's
        MLP takes them) ``rows // len(self)``. Those rows lay out the tokens of one request, so
        the plans are this batch's with that many times the tokens per row."""
        if rows == len(self.names):
            return 1
        if not ((self.repeat_rows or flattened) and self.names and rows % len(self.names) == 0):
            raise ValueError(
                f"layer {layer}: the batch has {rows} rows but {len(self.names)} adapter assignments were given "
                "(one adapter name or None per row)"
            )
        return rows // len(self.names)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def adapter_names(self) -> set[str]:
        return {n for n in self.names if n is not None}

    def plans(self, per_row: int, device) -> dict:
        key = (per_row, str(device))
        if key not in self._plans:
            self._plans[key] = self._build(per_row, device)
        return self._plans[key]

    def _build(self, per_row: int, device) -> dict:
        out = {}
        for kind in (BLOCK, ELEMENT):
            rows = [b for b in range(len(self.slots)) if self.kinds[b] == kind]
            if not rows:
                continue
            rows.sort(key=lambda b: self.slots[b])  # stable: rows of one adapter stay in batch order
            seg_slots, seg_rows = [], []
            for b in rows:
                if seg_slots and seg_slots[-1] == self.slots[b]:
                    seg_rows[-1] += 1
                else:
                    seg_slots.append(self.slots[b])
                    seg_rows.append(1)
            r = torch.tensor(rows, dtype=torch.int64)
            token_order = (r[:, None] * per_row + torch.arange(per_row)[None, :]).reshape(-1)
            offsets = torch.zeros(len(seg_rows) + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(torch.tensor(seg_rows) * per_row, 0)
            n_sel = token_order.numel()
            if n_sel > _INT32_MAX:
                raise ValueError("too many tokens in one batch for int32 token ids")
            packed = torch.cat([token_order, torch.tensor(seg_slots), offsets]).to(torch.int32).to(device)
            n_seg = len(seg_slots)
            out[kind] = _Plan(
                token_order=packed[:n_sel],
                seg_slots=packed[n_sel: n_sel + n_seg],
                seg_offsets=packed[n_sel + n_seg:],
                n_sel=n_sel,
                max_seg=max(seg_rows) * per_row,
                block_m=self.library.block_m,
            )
        return out


# ------------------------------------------------------------------------ library


@dataclass(frozen=True)
class AdapterInfo:
    """What the library knows about one registered adapter."""

    name: str
    kind: str  # "block" | "element"
    slot: int
    layers: tuple[str, ...]
    params: int  # stored scalars (kept elements, or blocks × B²)
    bytes: int  # on the device: values + column ids + row pointers
    base_model: str | None
    source: str | None
    metadata: dict = field(default_factory=dict, compare=False, repr=False)


class AdapterLibrary:
    """Many sparse adapters packed on ``model``'s device, served in mixed batches.

    ``AdapterLibrary(model, dtype=None, device=None, backend="auto", max_bytes=None,
    check_base=True, block_m=None)``:

    * ``dtype``: dtype of the stored values (default: the model's parameter dtype, e.g. bf16
      on GPU); ``device``: default the model's device.
    * ``backend``: ``auto`` (Triton on CUDA, the PyTorch reference on CPU), ``triton`` or
      ``reference``.
    * ``max_bytes``: optional bound on ``memory()["reserved_bytes"]``, every device byte the
      library holds (pools with their spare capacity, pointer tables); a registration that
      would leave more reserved fails and changes nothing.
    * ``check_base``: refuse adapter files whose base fingerprint differs from the model's.

    A layer is served (its ``nn.Linear`` replaced by a :class:`MultiAdapterLinear`) while at
    least one registered adapter names it: the first such registration installs the wrapper,
    unregistering the last one frees the layer's pools and puts the ``nn.Linear`` back.
    :meth:`uninstall` puts every original linear back.
    """

    _INITIAL_SLOTS = 8

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None, device=None,
                 backend: str = "auto", max_bytes: int | None = None, check_base: bool = True,
                 block_m: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"max_bytes must be a non-negative integer or None, got {max_bytes!r}")
        if block_m is not None and block_m not in (16, 32, 64, 128):
            raise ValueError(f"block_m must be None or one of 16, 32, 64, 128, got {block_m!r}")
        try:
            p = next(model.parameters())
        except StopIteration:
            raise ValueError("the model has no parameters") from None
        self.model = model
        self.device = torch.device(device) if device is not None else p.device
        self.dtype = dtype or p.dtype
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be fp32, fp16 or bf16, got {self.dtype}")
        self.backend = backend
        self.max_bytes = max_bytes
        self.check_base = check_base
        self.block_m = block_m
        self._adapters: dict[str, AdapterInfo] = {}
        self._pools: dict[str, _LayerPool] = {}
        self._wrapped: dict[str, MultiAdapterLinear] = {}
        self._slot_names: list[str | None] = []
        self._slot_cap = self._INITIAL_SLOTS  # rows of every pointer table
        self._active: list[_Batch] = []

    # ------------------------------------------------------------- inspection
    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)

    def __contains__(self, name) -> bool:
        return name in self._adapters

    def info(self, name: str) -> AdapterInfo:
        if name not in self._adapters:
            raise KeyError(f"unknown adapter {name!r}; registered: {sorted(self._adapters)[:20]}")
        return self._adapters[name]

    @property
    def layers(self) -> list[str]:
        """Names of the layers served (replaced by :class:`MultiAdapterLinear`)."""
        return list(self._wrapped)

    def memory(self) -> dict:
        """Device memory of the library.

        ``adapters``: per adapter, its entries and one row-pointer line per layer (what a
        decode step reads for it); ``used_bytes``: entries in use plus the pointer tables;
        ``table_bytes``: the pointer tables alone (``slot_capacity`` rows per table, one table
        per format present in a layer); ``reserved_bytes``: every device byte held, spare pool
        capacity included — the quantity ``max_bytes`` bounds.
        """
        return {
            "adapters": {n: a.bytes for n, a in self._adapters.items()},
            "n_adapters": len(self._adapters),
            "adapter_bytes": sum(a.bytes for a in self._adapters.values()),
            "used_bytes": sum(p.used_bytes() for p in self._pools.values()),
            "table_bytes": sum(p.table_bytes() for p in self._pools.values()),
            "reserved_bytes": sum(p.reserved_bytes() for p in self._pools.values()),
            "max_bytes": self.max_bytes,
            "slot_capacity": self._slot_cap,
            "layers": len(self._pools),
        }

    def step_bytes(self, names: Iterable[str | None]) -> int:
        """Bytes one decode step must read in the served layers: the base weights (and biases)
        of those layers plus each distinct adapter of ``names`` once (values, ids, row pointers)."""
        distinct = {n for n in names if n is not None}
        total = 0
        for layer in self._wrapped.values():
            total += _nbytes(layer.base.weight) + (0 if layer.base.bias is None else _nbytes(layer.base.bias))
        for n in distinct:
            total += self.info(n).bytes
        return total

    # ------------------------------------------------------------- registration
    def register(self, name: str, source, *, check_base: bool | None = None) -> AdapterInfo:
        """Add an adapter under ``name``: ``source`` is an adapter file path, a ``(meta, deltas)``
        pair from :func:`sparse_engine.io.read_adapter`, or a ``{layer: delta}`` dict.

        Everything is checked before the library or the model changes (name, layer names and
        shapes, format, values finite, base fingerprint, memory budget); on any error the
        library is as it was.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._adapters:
            raise ValueError(f"an adapter named {name!r} is already registered; unregister it first")
        meta, deltas, origin = self._read_source(source)
        check = self.check_base if check_base is None else check_base
        kind, shapes = self._validate(name, meta, deltas, origin, check)

        slot = self._free_slot()
        slot_cap = self._slot_cap
        while slot >= slot_cap:
            slot_cap *= 2
        staged = self._stage(slot, deltas, shapes, slot_cap, exact=False)
        if self.max_bytes is not None and self._reserved_after(staged) > self.max_bytes:
            # without headroom: pools and pointer tables grown to exactly what this adapter needs
            staged = None  # free the first staging's copies before making the second
            slot_cap = max(self._slot_cap, slot + 1)
            staged = self._stage(slot, deltas, shapes, slot_cap, exact=True)
            after = self._reserved_after(staged)
            if after > self.max_bytes:
                reserved = self.memory()["reserved_bytes"]
                raise MemoryError(
                    f"registering {name!r} would bring the library's reserved device memory from {reserved} to "
                    f"{after} bytes, over max_bytes={self.max_bytes}"
                )
        nbytes = sum(st["n"] * st["pool"].entry_bytes(st["kind"]) + st["pool"].table_width(st["kind"]) * 4
                     for st in staged if "slot" in st)
        # ---- commit: nothing below allocates or can fail on valid input
        self._slot_cap = slot_cap
        for st in staged:
            pool = st["pool"]
            self._pools.setdefault(pool.name, pool)
            pool.commit(st)
        for layer in deltas:
            self._install(layer)
        if slot == len(self._slot_names):
            self._slot_names.append(name)
        else:
            self._slot_names[slot] = name
        params = sum(d.nnz for d in deltas.values())
        info = AdapterInfo(name=name, kind=kind, slot=slot, layers=tuple(deltas), params=params, bytes=nbytes,
                           base_model=(meta or {}).get("base_model"), source=origin, metadata=dict(meta or {}))
        self._adapters[name] = info
        return info

    def _stage(self, slot: int, deltas: Mapping, shapes: Mapping, slot_cap: int, exact: bool) -> list[dict]:
        """Every tensor the registration needs, allocated and written where nothing reads it yet:
        the adapter's entries per layer (new pools for layers not served yet), and, when the slot
        capacity grows, larger pointer tables for the untouched layers too."""
        staged = []
        for layer, delta in deltas.items():
            pool = self._pools.get(layer) or _LayerPool(layer, shapes[layer], self.device, self.dtype)
            staged.append(pool.stage(slot, delta, slot_cap, exact))
        if slot_cap > self._slot_cap:
            for layer, pool in self._pools.items():
                if layer not in deltas:
                    tables = pool.stage_tables(slot_cap)
                    if tables:
                        staged.append({"pool": pool, "tensors": tables})
        return staged

    def _reserved_after(self, staged: list[dict]) -> int:
        """``reserved_bytes`` once ``staged`` is committed."""
        replaced = {st["pool"].name: st for st in staged}
        total = sum(pool.reserved_bytes() for layer, pool in self._pools.items() if layer not in replaced)
        return total + sum(st["pool"].reserved_bytes(st["tensors"]) for st in staged)

    def load_dir(self, directory, pattern: str = "*.safetensors", *, names: Mapping[str, str] | None = None) -> list[str]:
        """Register every adapter file in ``directory`` matching ``pattern`` (name = file stem,
        or ``names[stem]``). All or nothing: if one file fails, the library (pools, their
        capacity, pointer tables, served layers) and the model are restored as they were."""
        paths = sorted(Path(directory).glob(pattern))
        if not paths:
            raise FileNotFoundError(f"no adapter files matching {pattern!r} in {directory}")
        from sparse_engine.io import read_adapter

        loaded = [((names or {}).get(p.stem, p.stem), (*read_adapter(p), str(p))) for p in paths]
        before = self._snapshot()
        done: list[str] = []
        try:
            for name, src in loaded:
                self.register(name, src)
                done.append(name)
        except BaseException:
            self._restore(before)
            raise
        return done

    def _snapshot(self) -> dict:
        return {
            "adapters": dict(self._adapters),
            "slot_names": list(self._slot_names),
            "slot_cap": self._slot_cap,
            "pools": {layer: pool.snapshot() for layer, pool in self._pools.items()},
        }

    def _restore(self, snap: Mapping) -> None:
        """Back to a snapshot taken with only registrations since (no unregister in between)."""
        taken = {info.slot for name, info in self._adapters.items() if name not in snap["adapters"]}
        for layer in list(self._pools):
            if layer not in snap["pools"]:
                del self._pools[layer]
                self._uninstall_layer(layer)
        for layer, state in snap["pools"].items():
            self._pools[layer].restore(state, taken)
        self._adapters = dict(snap["adapters"])
        self._slot_names = list(snap["slot_names"])
        self._slot_cap = snap["slot_cap"]

    def unregister(self, name: str) -> None:
        """Remove an adapter and free its pool space (later adapters move down). A layer no
        registered adapter names any more loses its pools and gets its ``nn.Linear`` back; with
        no adapter left the library is as new.

        Refused while a batch that uses it is active (inside :meth:`use`)."""
        info = self.info(name)
        for batch in self._active:
            if name in batch.adapter_names:
                raise RuntimeError(f"adapter {name!r} is used by the active batch; unregister it after the batch")
        for layer in info.layers:
            pool = self._pools[layer]
            pool.remove(info.slot)
            if not pool.extents:
                del self._pools[layer]
                self._uninstall_layer(layer)
        self._slot_names[info.slot] = None
        while self._slot_names and self._slot_names[-1] is None:
            self._slot_names.pop()
        del self._adapters[name]
        if not self._adapters:
            self._slot_cap = self._INITIAL_SLOTS

    def shrink_to_fit(self) -> None:
        """Release pool capacity beyond what the registered adapters use, and pointer-table
        rows beyond the highest slot in use."""
        slot_cap = self._INITIAL_SLOTS
        while slot_cap < len(self._slot_names):
            slot_cap *= 2
        # never above the current capacity: tables are only cut here, and an exact-size
        # registration (max_bytes) may have left fewer rows than the power of two
        slot_cap = min(slot_cap, self._slot_cap)
        self._slot_cap = slot_cap
        for pool in self._pools.values():
            pool.shrink_to_fit(slot_cap)

    def uninstall(self) -> nn.Module:
        """Put the original ``nn.Linear`` modules back and drop every adapter; returns the model."""
        if self._active:
            raise RuntimeError("cannot uninstall while a batch is active")
        for layer in list(self._wrapped):
            self._uninstall_layer(layer)
        self._pools.clear()
        self._adapters.clear()
        self._slot_names.clear()
        self._slot_cap = self._INITIAL_SLOTS
        return self.model

    # -------------------------------------------------------------- serving
    @contextlib.contextmanager
    def use(self, adapters: Sequence[str | None], *, repeat_rows: bool = False):
        """Within the block, every forward of the model applies ``adapters[b]`` to batch row ``b``
        (``None``: the base model). The batch must have exactly ``len(adapters)`` rows, or, with
        ``repeat_rows``, ``k · len(adapters)`` rows where each assignment covers ``k``
        consecutive rows (the layout of ``generate``'s beams / ``num_return_sequences``)."""
        batch = _Batch(self, adapters, repeat_rows=repeat_rows)
        self._active.append(batch)
        try:
            yield batch
        finally:
            self._active.remove(batch)

    def forward(self, adapters: Sequence[str | None], **inputs):
        """``model(**inputs)`` with row ``b`` served by ``adapters[b]`` (no grad)."""
        _check_assignment(adapters)
        rows = _batch_rows(inputs)
        if rows is not None and rows != len(adapters):
            raise ValueError(f"the batch has {rows} rows but {len(adapters)} adapter assignments were given")
        with torch.no_grad(), self.use(adapters):
            return self.model(**inputs)

    def generate(self, input_ids: torch.Tensor, adapters: Sequence[str | None], **generate_kwargs):
        """``model.generate`` (KV cache on) with row ``b`` served by ``adapters[b]``.

        Beam search (``num_beams``) and ``num_return_sequences`` work: ``generate`` expands row
        ``b`` into consecutive rows (``repeat_interleave``), and each keeps ``adapters[b]``; the
        output has ``num_return_sequences`` consecutive rows per input row, as in ``generate``."""
        _check_assignment(adapters)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] != len(adapters):
            raise ValueError(f"the batch has {input_ids.shape[0]} rows but {len(adapters)} adapter assignments were given")
        with torch.no_grad(), self.use(adapters, repeat_rows=True):
            return self.model.generate(input_ids=input_ids, **generate_kwargs)

    # ------------------------------------------------------------- internals
    def _apply(self, layer: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self._active:
            return y
        rows = x.shape[0] if x.dim() >= 2 else 1
        batch = self._active[-1]
        repeat = batch.rows_per_assignment(rows, layer, flattened=x.dim() == 2)
        pool = self._pools.get(layer)
        if pool is None or (pool.n_blocks == 0 and pool.n_values == 0):
            return y
        if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
            raise RuntimeError("the multi-adapter serving path is inference-only; run it under torch.no_grad()")
        per_row = x[0].numel() // x.shape[-1] if x.dim() >= 2 else 1
        plans = batch.plans(per_row * repeat, x.device)
        if not plans:
            return y
        if x.device != pool.device:
            raise ValueError(f"layer {layer}: activations on {x.device} but the adapters are on {pool.device}")
        impl = _kernels(self.backend, x)
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        plan = plans.get(BLOCK)
        if plan is not None and pool.n_blocks:
            bm, tiles = plan.tile_table(impl)
            impl.multi_block_delta(x2, y2, plan.token_order, plan.seg_slots, plan.seg_offsets, pool.blk_ptr,
                                   pool.block_cols, pool.blocks, block_m=bm, tiles=tiles)
        plan = plans.get(ELEMENT)
        if plan is not None and pool.n_values:
            bm, tiles = plan.tile_table(impl)
            impl.multi_element_delta(x2, y2, plan.token_order, plan.seg_slots, plan.seg_offsets, pool.el_ptr,
                                     pool.cols, pool.values, block_m=bm, tiles=tiles)
        return y

    def _free_slot(self) -> int:
        for i, n in enumerate(self._slot_names):
            if n is None:
                return i
        return len(self._slot_names)

    def _install(self, layer: str) -> None:
        if layer in self._wrapped:
            return
        module = self.model.get_submodule(layer)
        wrapper = MultiAdapterLinear(module, self, layer)
        _set_submodule(self.model, layer, wrapper)
        self._wrapped[layer] = wrapper

    def _uninstall_layer(self, layer: str) -> None:
        wrapper = self._wrapped.pop(layer, None)
        if wrapper is not None:
            _set_submodule(self.model, layer, wrapper.base)

    @staticmethod
    def _read_source(source):
        if isinstance(source, (str, Path)):
            from sparse_engine.io import read_adapter

            meta, deltas = read_adapter(source)
            return meta, deltas, str(source)
        if isinstance(source, tuple) and len(source) in (2, 3):
            meta, deltas = source[0], source[1]
            return meta, deltas, (source[2] if len(source) == 3 else None)
        if isinstance(source, Mapping):
            return None, dict(source), None
        raise TypeError(
            "source must be an adapter file path, a (meta, deltas) pair from read_adapter, or a {layer: delta} dict; "
            f"got {type(source).__name__}"
        )

    def _validate(self, name, meta, deltas, origin, check_base):
        where = f"adapter {name!r}" + (f" ({origin})" if origin else "")
        if not isinstance(deltas, Mapping) or not deltas:
            raise ValueError(f"{where} has no layers")
        kinds = set()
        shapes = {}
        for layer, delta in deltas.items():
            if not isinstance(delta, (SparseDelta, BlockSparseDelta)):
                raise TypeError(f"{where}: layer {layer} is a {type(delta).__name__}, not a SparseDelta/BlockSparseDelta")
            kinds.add(BLOCK if isinstance(delta, BlockSparseDelta) else ELEMENT)
            try:
                module = self.model.get_submodule(layer)
            except AttributeError:
                raise ValueError(f"{where} adapts layer {layer!r}, which this model does not have") from None
            if isinstance(module, MultiAdapterLinear) and module._library is not self:
                raise ValueError(f"{where}: layer {layer} is served by another AdapterLibrary; uninstall() it first")
            if type(module).__name__ == "SparseAdapterLinear":
                raise ValueError(f"{where}: layer {layer} already carries a training adapter; detach() it first")
            lin = _base_linear(module)
            if lin is None:
                raise ValueError(f"{where}: layer {layer} of the model is a {type(module).__name__}, not an nn.Linear")
            shape = tuple(lin.weight.shape)
            if tuple(delta.shape) != shape:
                raise ValueError(f"{where} does not fit this model: layer {layer} is {tuple(delta.shape)} in the adapter, "
                                 f"{shape} in the model")
            if isinstance(delta, BlockSparseDelta) and delta.block_size != SUPPORTED_BLOCK_SIZE:
                raise ValueError(f"{where}: layer {layer} has block size {delta.block_size}; serving supports "
                                 f"{SUPPORTED_BLOCK_SIZE}")
            vals = delta.blocks if isinstance(delta, BlockSparseDelta) else delta.values
            if vals.numel() and not bool(torch.isfinite(vals).all()):
                raise ValueError(f"{where}: layer {layer} holds NaN or Inf values")
            shapes[layer] = shape
        if len(kinds) != 1:
            raise ValueError(f"{where} mixes element- and block-sparse layers; one format per adapter")
        if meta is not None:
            known = meta.get("layers")
            if known is not None and set(known) != set(deltas):
                raise ValueError(f"{where}: the metadata's layers do not match its tensors")
            if check_base and meta.get("base_fingerprint"):
                # computed every time (a strided sample of ≤ 4096 values per layer): a cache
                # would have to notice weights changed in place or replaced since
                mine = base_fingerprint_of(self.model, deltas)
                if meta["base_fingerprint"] != mine:
                    raise ValueError(
                        f"{where} was trained on another base model ({meta.get('base_model')!r}, fingerprint "
                        f"{meta['base_fingerprint']}); this model's fingerprint is {mine}. "
                        "Pass check_base=False to serve it anyway."
                    )
        for layer in deltas:
            if layer not in self._pools:
                continue
            if self._pools[layer].shape != shapes[layer]:  # pragma: no cover - the model's shape cannot change
                raise ValueError(f"{where}: layer {layer} shape differs from the served layer")
        return kinds.pop(), shapes


def _check_assignment(names) -> None:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError("adapters must be a list with one adapter name (or None) per batch row, not a string; "
                         f"got {type(names).__name__}")
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise ValueError(f"adapter names must be strings or None, got {bad[:3]}")


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _batch_rows(inputs: Mapping) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        t = inputs.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return int(t.shape[0])
    return None


# -------------------------------------------------------------- routed evaluation


def evaluate_routed(library: AdapterLibrary, tokenizer, tasks: Mapping, routes: Mapping[str, str | None] | None = None,
                    *, batch_size: int = 32, max_new_tokens: int = 16, max_length: int = 48,
                    progress: bool = False, return_predictions: bool = False):
    """Rouge-L per task with every request sent to its task's expert, in mixed batches.

    ``tasks``: ``{task: [Example] | TaskData}`` (the ``test`` split of a TaskData);
    ``routes``: ``{task: adapter name or None}`` (default: the adapter named like the task).
    All requests are pooled, ordered and batched exactly like
    :func:`sparse_engine.evaluation.generate` (longest prompt first, left padding, greedy), and
    each batch runs once with its per-row experts, so a score equals the task's expert evaluated
    alone up to the other rows' padding. Returns ``{task: Rouge-L}``, or
    ``(scores, {task: [prediction]})`` with ``return_predictions``.
    """
    from sparse_engine import evaluation
    from sparse_engine.data import TaskData, encode_prompt

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    routes = dict(routes) if routes is not None else {t: t for t in tasks}
    requests = []  # (task, example)
    for task, examples in tasks.items():
        if task not in routes:
            raise ValueError(f"no route for task {task!r}; routes cover {sorted(routes)[:10]}")
        if routes[task] is not None and routes[task] not in library:
            raise ValueError(f"task {task!r} is routed to {routes[task]!r}, which is not registered; "
                             f"registered: {library.names[:20]}")
        if isinstance(examples, TaskData):
            examples = examples.test
        examples = list(examples)
        if not examples:
            raise ValueError(f"task {task!r} has no examples to evaluate")
        requests.extend((task, ex) for ex in examples)
    lengths = [len(encode_prompt(tokenizer, ex.source, max_length)["input_ids"]) for _, ex in requests]
    order = sorted(range(len(requests)), key=lambda i: -lengths[i])  # the order generate() uses
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="routed", leave=False)
    predictions: list[str | None] = [None] * len(requests)
    for idx in batches:
        names = [routes[requests[i][0]] for i in idx]
        with library.use(names):
            outs = evaluation.generate(library.model, tokenizer, [requests[i][1].source for i in idx],
                                       max_new_tokens=max_new_tokens, batch_size=len(idx), max_length=max_length)
        for i, text in zip(idx, outs):
            predictions[i] = text
    scores, per_task = {}, {}
    for task in tasks:
        sel = [i for i, (t, _) in enumerate(requests) if t == task]
        per_task[task] = [predictions[i] for i in sel]
        scores[task] = evaluation.rouge_l(per_task[task], [requests[i][1].target for i in sel])
    return (scores, per_task) if return_predictions else scores


def run_routed_eval(adapter_dir, *, method: str = "sparse", tasks: Sequence[str] | None = None, n_test: int = 100,
                    seed: int = 0, model=None, tokenizer=None, base_spec=None, cache_dir=None,
                    batch_size: int = 32, max_new_tokens: int = 16, max_length: int = 48, backend: str = "auto",
                    progress: bool = False) -> dict:
    """Routed-experts evaluation of adapter files ``<task>-<method>.safetensors`` in ``adapter_dir``
    (what ``run_demo`` / ``sparse-engine train`` write) on the built-in held-in tasks.

    ``tasks`` default: every held-in task that has a file. ``model``/``tokenizer`` default to the
    built-in base (``base_spec``, ``cache_dir``). Returns ``{"scores": {task: Rouge-L},
    "mean": ..., "adapters": {task: file}, "settings": {...}}``; the model is left unchanged.
    """
    from sparse_engine import data, evaluation

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {adapter_dir}")
    if tasks is None:
        tasks = [t for t in data.HELD_IN if (adapter_dir / f"{t}-{method}.safetensors").is_file()]
        if not tasks:
            raise FileNotFoundError(f"no held-in adapter files '<task>-{method}.safetensors' in {adapter_dir}")
    tasks = list(tasks)
    files = {t: adapter_dir / f"{t}-{method}.safetensors" for t in tasks}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"adapter files not found: {missing[:3]}")
    if model is None:
        from sparse_engine.builtin import load_builtin_base

        model, tokenizer = load_builtin_base(base_spec, cache_dir=cache_dir, progress=progress)
    elif tokenizer is None:
        raise ValueError("give the tokenizer with the model")
    suite = {t: data.builtin_task_data(t, n_train=0, n_validation=0, n_test=n_test, seed=seed) for t in tasks}
    library = AdapterLibrary(model, backend=backend)
    try:
        for t, path in files.items():
            library.register(t, path)
        scores = evaluate_routed(library, tokenizer, suite, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 max_length=max_length, progress=progress)
    finally:
        library.uninstall()
    return {
        "scores": scores,
        "mean": evaluation.mean_score(scores),
        "adapters": {t: str(p) for t, p in files.items()},
        "settings": {"method": method, "n_test": n_test, "seed": seed, "batch_size": batch_size,
                     "max_new_tokens": max_new_tokens, "max_length": max_length},
    }
