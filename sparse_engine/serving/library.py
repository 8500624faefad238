"""The registry of served adapters: registration checks, packed pools per layer, batches."""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from sparse_engine.backend import resolve as resolve_backend
from sparse_engine.config import BACKENDS
from sparse_engine.io import base_fingerprint
from sparse_engine.kernels import reference as ref
from sparse_engine.layers import SparseAdapterLinear
from sparse_engine.model import base_linear, replace_module
from sparse_engine.serving.layer import MultiAdapterLinear
from sparse_engine.serving.plan import Batch, check_assignment
from sparse_engine.serving.pool import BLOCK, ELEMENT, SUPPORTED_BLOCK_SIZE, LayerPool, tensor_bytes
from sparse_engine.serving.source import delta_sources, file_sources


def _kernels(setting: str, tensor: torch.Tensor):
    """The Triton multi-adapter launchers, or None for their reference twin."""
    if not resolve_backend(setting, tensor).triton:
        return None
    try:
        return importlib.import_module("sparse_engine.kernels.multi_adapter")
    except ImportError as exc:
        if setting == "triton":
            raise RuntimeError(f"the Triton multi-adapter kernels are not available: {exc}") from exc
        return None


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
        # the reference path (torch sparse matrices) reads int32 column ids without a copy
        self._int32_cols = backend == "reference" or (backend == "auto" and self.device.type != "cuda")
        self._adapters: dict[str, AdapterInfo] = {}
        self._pools: dict[str, LayerPool] = {}
        self._wrapped: dict[str, MultiAdapterLinear] = {}
        self._slot_names: list[str | None] = []
        self._slot_cap = self._INITIAL_SLOTS  # rows of every pointer table
        self._active: list[Batch] = []

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
    def pools(self) -> Mapping[str, LayerPool]:
        """The packed storage of each served layer (read-only view, for inspection)."""
        return MappingProxyType(self._pools)

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
            total += tensor_bytes(layer.base.weight) + (0 if layer.base.bias is None else tensor_bytes(layer.base.bias))
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
        meta, deltas, origin = self._read_source(source, name)
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
        params = sum(d.params for d in deltas.values())
        info = AdapterInfo(name=name, kind=kind, slot=slot, layers=tuple(deltas), params=params, bytes=nbytes,
                           base_model=(meta or {}).get("base_model"), source=origin, metadata=dict(meta or {}))
        self._adapters[name] = info
        return info

    def _stage(self, slot: int, deltas: Mapping, shapes: Mapping, slot_cap: int, exact: bool) -> list[dict]:
        """Every tensor the registration needs, allocated and written where nothing reads it yet:
        the adapter's entries per layer, streamed from ``deltas`` (``LayerSource`` by layer; new
        pools for layers not served yet), and, when the slot capacity grows, larger pointer
        tables for the untouched layers too."""
        staged = []
        for layer, delta in deltas.items():
            pool = self._pools.get(layer) or LayerPool(layer, shapes[layer], self.device, self.dtype,
                                                      int32_cols=self._int32_cols)
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
        for p in paths:  # every file's header checked before anything is registered
            file_sources(p, str(p))
        before = self._snapshot()
        done: list[str] = []
        try:
            for p in paths:
                name = (names or {}).get(p.stem, p.stem)
                self.register(name, p)
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
        batch = Batch(self._adapters, adapters, repeat_rows=repeat_rows, block_m=self.block_m)
        self._active.append(batch)
        try:
            yield batch
        finally:
            self._active.remove(batch)

    def forward(self, adapters: Sequence[str | None], **inputs):
        """``model(**inputs)`` with row ``b`` served by ``adapters[b]`` (no grad)."""
        check_assignment(adapters)
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
        check_assignment(adapters)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] != len(adapters):
            raise ValueError(f"the batch has {input_ids.shape[0]} rows but {len(adapters)} adapter assignments were given")
        with torch.no_grad(), self.use(adapters, repeat_rows=True):
            return self.model.generate(input_ids=input_ids, **generate_kwargs)

    def apply(self, layer: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add the active batch's deltas of ``layer`` to its base output ``y`` (in place) for
        the input ``x``; what a :class:`MultiAdapterLinear` calls. Outside :meth:`use`, ``y``."""
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
        kernels = _kernels(self.backend, x)
        impl = ref if kernels is None else kernels
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        plan = plans.get(BLOCK)
        if plan is not None and pool.n_blocks:
            bm, tiles = plan.tile_table(kernels)
            impl.multi_block_delta(x2, y2, plan.token_order, plan.seg_slots, plan.seg_offsets, pool.blk_ptr,
                                   pool.block_cols, pool.blocks, block_m=bm, tiles=tiles)
        plan = plans.get(ELEMENT)
        if plan is not None and pool.n_values:
            bm, tiles = plan.tile_table(kernels)
            impl.multi_element_delta(x2, y2, plan.token_order, plan.seg_slots, plan.seg_offsets, pool.el_ptr,
                                     pool.cols, pool.values, block_m=bm, tiles=tiles)
        return y

    # ------------------------------------------------------------- internals
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
        replace_module(self.model, layer, wrapper)
        self._wrapped[layer] = wrapper

    def _uninstall_layer(self, layer: str) -> None:
        wrapper = self._wrapped.pop(layer, None)
        if wrapper is not None:
            replace_module(self.model, layer, wrapper.base)

    @staticmethod
    def _read_source(source, name):
        """(metadata, ``{layer: LayerSource}``, origin): a file's entries are streamed when staged."""
        where = f"adapter {name!r}"
        if isinstance(source, (str, Path)):
            meta, layers = file_sources(source, f"{where} ({source})")
            return meta, layers, str(source)
        if isinstance(source, tuple) and len(source) in (2, 3):
            meta, deltas = source[0], source[1]
            origin = source[2] if len(source) == 3 else None
            if not isinstance(deltas, Mapping):
                raise ValueError(f"{where} has no layers")
            return meta, delta_sources(deltas, where + (f" ({origin})" if origin else "")), origin
        if isinstance(source, Mapping):
            return None, delta_sources(source, where), None
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
            kinds.add(delta.kind)
            try:
                module = self.model.get_submodule(layer)
            except AttributeError:
                raise ValueError(f"{where} adapts layer {layer!r}, which this model does not have") from None
            if isinstance(module, MultiAdapterLinear) and module.library is not self:
                raise ValueError(f"{where}: layer {layer} is served by another AdapterLibrary; uninstall() it first")
            if isinstance(module, SparseAdapterLinear):
                raise ValueError(f"{where}: layer {layer} already carries a training adapter; detach() it first")
            lin = base_linear(module)
            if lin is None:
                raise ValueError(f"{where}: layer {layer} of the model is a {type(module).__name__}, not an nn.Linear")
            shape = tuple(lin.weight.shape)
            if tuple(delta.shape) != shape:
                raise ValueError(f"{where} does not fit this model: layer {layer} is {tuple(delta.shape)} in the adapter, "
                                 f"{shape} in the model")
            if delta.kind == BLOCK and delta.block_size != SUPPORTED_BLOCK_SIZE:
                raise ValueError(f"{where}: layer {layer} has block size {delta.block_size}; serving supports "
                                 f"{SUPPORTED_BLOCK_SIZE}")
            shapes[layer] = shape  # ids and values are checked piece by piece as they are staged
        if len(kinds) != 1:
            raise ValueError(f"{where} mixes element- and block-sparse layers; one format per adapter")
        if meta is not None:
            known = meta.get("layers")
            if known is not None and set(known) != set(deltas):
                raise ValueError(f"{where}: the metadata's layers do not match its tensors")
            if check_base and meta.get("base_fingerprint"):
                # computed every time (a strided sample of ≤ 4096 values per layer): a cache
                # would have to notice weights changed in place or replaced since
                mine = base_fingerprint(self.model, deltas)
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


def _batch_rows(inputs: Mapping) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        t = inputs.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return int(t.shape[0])
    return None
