"""``SparseAdapterLinear``: a drop-in wrapper of ``nn.Linear`` holding a sparse delta.

Phases of Algorithm 1: **search** (mask epochs: the mask may change) and **fixed** (after
them). Storage, one of three (README, "Algorithm 1, as implemented"):

* dense search (until the first mask update, Ŵ starts at 0 with M = 1): ``delta`` is the
  dense fp32 Ŵ ``[d_out, d_in]``, ``mask`` a bool buffer of the same shape;
* compact search (after it): ``delta`` holds the kept entries only and ``indices`` their
  int32 sorted flat element indices or tile ids; ``delta_dense`` keeps every entry's last
  value (a buffer, no gradient or optimizer state), so that a score such as MCS = Ŵ·g can
  select an entry again;
* fixed: ``delta`` + ``indices`` as above; ``delta_dense`` is gone.

A change of storage replaces ``delta`` by a new ``nn.Parameter`` (autograd caches a leaf's
shape); ``sparse_engine.masking`` swaps it into the optimizer and moves the kept entries'
state along.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_engine import backend, distributed, ops
from sparse_engine.backend import Kernels
from sparse_engine.config import SparseAdapterConfig
from sparse_engine.formats import BlockSparseDelta, SparseDelta, block_mask_to_elements
from sparse_engine.kernels import reference as ref

SEARCH, FIXED = "search", "fixed"


class LinearWrapper(nn.Module):
    """A module standing in for the ``nn.Linear`` it holds as ``.base``: code that reads a
    linear's ``weight``, ``bias`` or feature sizes still finds them."""

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


class SparseAdapterLinear(LinearWrapper):
    """y = x (W + ΔW)ᵀ + b with a trainable sparse ΔW; W and b frozen and never modified."""

    def __init__(self, base: nn.Linear, config: SparseAdapterConfig, name: str = "",
                 initial: SparseDelta | BlockSparseDelta | None = None):
        """``initial``: start in the fixed phase with these entries (a loaded adapter, taken
        without a copy and without ever allocating the dense Ŵ); default Ŵ = 0, M = 1."""
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SparseAdapterLinear wraps nn.Linear, got {type(base).__name__} for {name!r}")
        distributed.refuse_sharded(base.weight, f"the weight of {name or 'the layer'}")
        d_out, d_in = base.weight.shape
        bs = config.block_size
        if bs is not None and (d_out % bs or d_in % bs):
            raise ValueError(
                f"block_size {bs} does not divide the weight of {name or 'the layer'} ({d_out}×{d_in}); "
                "use an element-sparse adapter (block_size=None) or another target module"
            )
        self.base = base
        self.name = name
        self.keep_ratio = config.keep_ratio
        self.block_size = bs
        self.backend = config.backend
        self.compact_search = config.compact_search
        self.phase = SEARCH
        self._base_requires_grad = (base.weight.requires_grad, None if base.bias is None else base.bias.requires_grad)
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.mask_ignored = False
        self.score_sink = None
        self._kernel_aux = None  # (source tensor, its version, Triton index layout): see _kernel_layout
        self.register_buffer("mask", None)
        self.register_buffer("indices", None)
        self.register_buffer("delta_dense", None)
        if initial is not None:
            self.load_sparse(initial, copy=False)
        else:
            self.delta = nn.Parameter(torch.zeros(d_out, d_in, dtype=torch.float32, device=base.weight.device))
            self.mask = torch.ones(d_out, d_in, dtype=torch.bool, device=base.weight.device)

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def dense_storage(self) -> bool:
        """True while ``delta`` is the dense Ŵ (search phase, until the first mask update)."""
        return self.mask is not None

    @property
    def search_delta(self) -> torch.Tensor:
        """The dense Ŵ of the search phase, every entry (the parameter, or in compact storage
        the ``delta_dense`` buffer as of the last ``sync_search_delta``)."""
        if self.phase == FIXED:
            raise RuntimeError(f"{self.name}: the fixed phase keeps no dense Ŵ")
        return self.delta if self.dense_storage else self.delta_dense

    def sync_search_delta(self) -> None:
        """Compact search storage: write the kept entries' current values into ``delta_dense``."""
        if self.phase == SEARCH and not self.dense_storage:
            with torch.no_grad():
                self.delta_dense.view(-1)[self.compact_gather_index()] = self.delta.detach().reshape(-1)

    @property
    def kept_count(self) -> int:
        """Number of kept units: elements (element-sparse) or tiles (block-sparse)."""
        if not self.dense_storage:
            return int(self.indices.numel())
        if self.block_size is None:
            return int(self.mask.sum())
        return int(self.mask[:: self.block_size, :: self.block_size].sum())

    @property
    def trainable_count(self) -> int:
        """Number of trainable scalars: kept elements (``kept_count × B²`` when block-sparse)."""
        return self.kept_count * (1 if self.block_size is None else self.block_size**2)

    def extra_repr(self) -> str:
        kind = "element" if self.block_size is None else f"block{self.block_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{kind}, keep_ratio={self.keep_ratio}, phase={self.phase}"
        )

    # --------------------------------------------------------------------- forward
    @property
    def kernels(self) -> Kernels:
        """The implementations this layer runs with, for the device its weight is on."""
        return backend.resolve(self.backend, self.base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self.kernels
        if self.dense_storage:
            if (self.block_size is not None and kernels.triton and not self.mask_ignored
                    and self.score_sink is None):
                # the kernels train a block layer's search phase on its kept tiles only
                layout = self._kernel_layout(kernels, self.mask)
                return ops.BlockSearchDeltaLinear.apply(x, self.base.weight, self.base.bias, self.delta, layout,
                                                        kernels)
            mask = None if self.mask_ignored else self.mask
            return ops.MaskedDeltaLinear.apply(
                x, self.base.weight, self.base.bias, self.delta, mask, kernels, self.score_sink
            )
        if self.mask_ignored:  # the score pass of compact search storage: W + every entry of Ŵ
            return ops.MaskedDeltaLinear.apply(
                x, self.base.weight, self.base.bias, self.delta_dense, None, kernels, self.score_sink
            )
        if self.indices.numel() == 0:  # dropped layer (layer drop): nothing to add
            return F.linear(x, self.base.weight, self.base.bias)
        layout = self._kernel_layout(kernels, self.indices)
        function = ops.CompactDeltaLinear if self.block_size is None else ops.BlockDeltaLinear
        return function.apply(x, self.base.weight, self.base.bias, self.delta, self.indices, layout, kernels)

    def _kernel_layout(self, kernels: Kernels, source: torch.Tensor):
        """The Triton kernels' index layout of the kept units (None on the reference), built
        from ``source`` (the fixed-phase ``indices``, or the search-phase ``mask`` of a
        block-sparse layer) and rebuilt whenever ``source`` is another tensor or was written in
        place since: after ``set_mask``, ``load_state_dict``, ``.to(device)``. (An inference
        tensor has no version counter; it is matched by identity.)

        Built outside inference mode, so that a layout first built in an evaluation step can
        still be saved for backward by a later training step."""
        if not kernels.triton:
            return None
        version = None if source.is_inference() else source._version
        cached = self._kernel_aux
        if cached is not None and cached[0] is source and cached[1] == version:
            return cached[2]
        with torch.inference_mode(False):
            if self.dense_storage:
                layout = kernels.block_layout(self.kept_units(), self.shape, self.block_size)
            elif self.block_size is None:
                layout = kernels.compact_layout(self.indices, self.shape)
            else:
                layout = kernels.block_layout(self.indices, self.shape, self.block_size)
        self._kernel_aux = (source, version, layout)
        return layout

    def check_unsharded(self) -> None:
        """Refuse parameters that FSDP has sharded or flattened since ``attach`` (a clear error
        now instead of a crash or a silent divergence at the first mask update)."""
        delta = self._parameters.get("delta")
        where = f"the sparse adapter {self.name or 'layer'}"
        if delta is None:
            raise RuntimeError(f"{where} no longer owns its parameter (flattened by FSDP?): sparse adapters support "
                               "data parallelism with DDP, not FSDP")
        distributed.refuse_sharded(delta, where)
        distributed.refuse_sharded(self.base.weight, f"the weight under {where}")
        expected = self.shape if self.dense_storage else (
            tuple(self.indices.shape) if self.block_size is None
            else (self.indices.numel(), self.block_size, self.block_size))
        if tuple(delta.shape) != tuple(expected) or tuple(self.base.weight.shape) != self.shape:
            raise RuntimeError(f"{where} holds a parameter of shape {tuple(delta.shape)}, not {tuple(expected)} "
                               "(sharded by FSDP?): sparse adapters support data parallelism with DDP, not FSDP")

    # ---------------------------------------------------------------- mask control
    def set_mask(self, kept: torch.Tensor) -> torch.Tensor:
        """Search phase: keep the units at int32 sorted flat ``kept`` indices; returns the element mask.

        In block mode ``kept`` holds tile ids.
        """
        if self.phase != SEARCH:
            raise RuntimeError(f"{self.name}: the mask is frozen (fixed phase); it can no longer change")
        if not self.dense_storage:
            raise RuntimeError(f"{self.name}: the search phase holds compact storage; use keep_units")
        n_units = self._unit_grid()[0] * self._unit_grid()[1]
        tiles = torch.zeros(n_units, dtype=torch.bool, device=self.mask.device)
        tiles[kept.long()] = True
        tiles = tiles.view(self._unit_grid())
        mask = tiles if self.block_size is None else block_mask_to_elements(tiles, self.block_size)
        self.mask.copy_(mask)
        return mask

    def kept_units(self) -> torch.Tensor:
        """int32 sorted flat indices of kept elements (or tile ids in block mode)."""
        if not self.dense_storage:
            return self.indices
        units = self.mask if self.block_size is None else self.mask[:: self.block_size, :: self.block_size]
        return units.reshape(-1).nonzero().flatten().to(torch.int32)

    def _unit_grid(self) -> tuple[int, int]:
        if self.block_size is None:
            return self.shape
        return (self.out_features // self.block_size, self.in_features // self.block_size)

    def element_mask(self) -> torch.Tensor:
        """The dense bool mask M of the kept entries, whatever the storage."""
        if self.dense_storage:
            return self.mask
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.indices.device)
        mask.view(-1)[self.compact_gather_index()] = True
        return mask

    def compact_gather_index(self, units: torch.Tensor | None = None) -> torch.Tensor:
        """Flat dense positions, in the order compact storage lays out the entries of the kept
        units (or of ``units``, sorted element indices or tile ids)."""
        kept = (self.kept_units() if units is None else units).long()
        if self.block_size is None:
            return kept
        bs = self.block_size
        n_col = self.in_features // bs
        row0 = (kept // n_col) * bs
        col0 = (kept % n_col) * bs
        r = torch.arange(bs, device=kept.device)
        rows = row0[:, None, None] + r[None, :, None]
        cols = col0[:, None, None] + r[None, None, :]
        return (rows * self.in_features + cols).reshape(-1)

    def keep_units(self, kept: torch.Tensor) -> tuple[nn.Parameter, torch.Tensor]:
        """Search phase, into compact storage: keep the units at int32 sorted flat ``kept``
        (tile ids in block mode), each starting from its last value in Ŵ.

        Returns (the previous ``delta``, source): ``source[i]`` is the flat position in the
        previous ``delta`` of entry ``i`` of the new one, -1 for an entry that was not kept
        before (it starts with fresh optimizer moments). ``delta`` stays the same parameter,
        overwritten, when its shape does not change (one more update at a per-layer k)."""
        if self.phase != SEARCH:
            raise RuntimeError(f"{self.name}: the mask is frozen (fixed phase); it can no longer change")
        kept = kept.to(device=self.delta.device, dtype=torch.int32).contiguous()
        units = self._unit_grid()[0] * self._unit_grid()[1]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= units or bool((kept[1:] <= kept[:-1]).any())):
            raise ValueError(f"{self.name}: kept units must be sorted, distinct and in [0, {units})")
        old = self.delta
        gather = self.compact_gather_index(kept)
        if self.dense_storage:
            dense = old.detach()
            source = torch.where(self.mask.reshape(-1)[gather], gather, -1)
        else:
            self.sync_search_delta()
            dense = self.delta_dense
            before, now = self.indices.long(), kept.long()
            pos = torch.searchsorted(before, now).clamp(max=max(before.numel() - 1, 0))
            hit = before[pos] == now if before.numel() else torch.zeros_like(now, dtype=torch.bool)
            unit_source = torch.where(hit, pos, -1)
            if self.block_size is not None:
                per_tile = self.block_size**2
                offsets = torch.arange(per_tile, device=kept.device)
                unit_source = torch.where(unit_source[:, None] >= 0, unit_source[:, None] * per_tile + offsets, -1)
            source = unit_source.reshape(-1)
        values = dense.reshape(-1)[gather]
        if self.block_size is not None:
            values = values.view(-1, self.block_size, self.block_size)
        if not self.dense_storage and tuple(values.shape) == tuple(old.shape):
            with torch.no_grad():
                old.copy_(values)
            old.grad = None  # laid out for the previous units
        else:
            self.delta = nn.Parameter(values.contiguous())
        if self.dense_storage:
            self.delta_dense = dense  # the old parameter's storage: every entry's last value
            self.mask = None
        self.indices = kept
        self._kernel_aux = None
        return old, source

    def freeze(self) -> torch.Tensor | None:
        """Freeze the mask: compact storage, no dense Ŵ. From dense storage ``delta`` becomes a
        new parameter and the gather index used is returned; from compact search storage the
        parameter stays and None is returned."""
        if self.phase == FIXED:
            raise RuntimeError(f"{self.name}: already in the fixed phase")
        if not self.dense_storage:
            self.delta_dense = None
            self.phase = FIXED
            return None
        gather = self.compact_gather_index()
        kept = self.kept_units()
        values = self.delta.data.reshape(-1)[gather]
        if self.block_size is not None:
            values = values.view(-1, self.block_size, self.block_size)
        self.delta = nn.Parameter(values.contiguous())
        self.indices = kept.contiguous()
        self.mask = None
        self.phase = FIXED
        self._kernel_aux = None
        return gather

    # -------------------------------------------------------------- import / export
    def delta_weight(self) -> torch.Tensor:
        """The dense fp32 ΔW this layer adds to W (Ŵ⊙M in the search phase)."""
        if self.dense_storage:
            return self.delta.detach() * self.mask
        if self.block_size is None:
            return ref.densify_compact(self.delta.detach(), self.indices, self.shape)
        return ref.densify_blocks(self.delta.detach(), self.indices, self.shape)

    def to_sparse(self) -> SparseDelta | BlockSparseDelta:
        """The adapter as a validated container (fixed or search phase)."""
        self.check_unsharded()
        values = (self.delta.detach().reshape(-1)[self.compact_gather_index()] if self.dense_storage
                  else self.delta.detach())
        kept = self.kept_units()
        if self.block_size is None:
            return SparseDelta(self.shape, values.float().contiguous(), kept.contiguous())
        blocks = values.reshape(-1, self.block_size, self.block_size).float().contiguous()
        return BlockSparseDelta(self.shape, blocks, kept.contiguous())

    def load_sparse(self, delta: SparseDelta | BlockSparseDelta, copy: bool = True) -> None:
        """Take a saved adapter: fixed phase with ``delta``'s entries (checked against this layer).

        ``copy=False`` adopts ``delta``'s tensors when they are fp32 on the layer's device
        (a freshly read file: no second copy); training then writes into them."""
        if tuple(delta.shape) != self.shape:
            raise ValueError(f"{self.name}: adapter shape {tuple(delta.shape)} does not match the layer {self.shape}")
        is_block = isinstance(delta, BlockSparseDelta)
        if is_block != (self.block_size is not None) or (is_block and delta.block_size != self.block_size):
            want = "element-sparse" if self.block_size is None else f"block-sparse (B={self.block_size})"
            raise ValueError(f"{self.name}: the adapter is not {want}")
        device = self.base.weight.device
        if is_block:
            values, kept = delta.blocks, delta.block_indices
        else:
            values, kept = delta.values, delta.indices
        # By default a copy: training must never write into the caller's tensors.
        self.delta = nn.Parameter(values.to(device=device, dtype=torch.float32, copy=copy).contiguous())
        self.indices = kept.to(device=device, dtype=torch.int32).contiguous()
        self.mask = None
        self.delta_dense = None
        self.phase = FIXED
        self._kernel_aux = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A state dict records its storage: ``mask`` (dense search), ``indices`` + ``delta_dense``
        # (compact search) or ``indices`` alone (fixed). A checkpoint of another storage (the
        # Trainer resuming after a mask update or the freeze, or loading a best model saved
        # earlier) switches this layer to it first, so the tensors fit; the caller's optimizer
        # must then be (re)built, as the Trainer does.
        keys = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
        incoming = ("dense" if "mask" in keys else "compact" if "delta_dense" in keys
                    else "fixed" if "indices" in keys else None)
        if incoming is not None and torch.is_tensor(state_dict.get(prefix + "delta")) and incoming != self.storage:
            self._adopt_storage(incoming, {k: state_dict[prefix + k] for k in ("delta", "mask", "indices")
                                           if k in keys})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def storage(self) -> str:
        """``dense`` (search), ``compact`` (search) or ``fixed``."""
        return "dense" if self.dense_storage else "compact" if self.phase == SEARCH else "fixed"

    def _adopt_storage(self, storage: str, like: dict[str, torch.Tensor]) -> None:
        """Empty storage of kind ``storage``, shaped like the incoming tensors ``like``."""
        device = self.base.weight.device
        self.delta = nn.Parameter(torch.zeros(like["delta"].shape, dtype=torch.float32, device=device))
        self.mask = torch.zeros(self.shape, dtype=torch.bool, device=device) if storage == "dense" else None
        self.indices = (None if storage == "dense"
                        else torch.zeros(like["indices"].shape, dtype=torch.int32, device=device))
        self.delta_dense = (torch.zeros(self.shape, dtype=torch.float32, device=device) if storage == "compact"
                            else None)
        self.phase = FIXED if storage == "fixed" else SEARCH
        self._kernel_aux = None

    def restore(self, storage: str, tensors: dict[str, torch.Tensor]) -> None:
        """Set this layer's storage from a checkpoint's ``tensors`` (``delta`` and ``mask``,
        ``indices``, ``delta_dense`` as ``storage`` needs them), copied; ``delta`` becomes a
        new parameter when its shape or the storage changes."""
        needed = {"dense": ("delta", "mask"), "compact": ("delta", "indices", "delta_dense"),
                  "fixed": ("delta", "indices")}[storage]
        missing = [k for k in needed if tensors.get(k) is None]
        if missing:
            raise ValueError(f"{self.name}: a {storage} checkpoint of this layer lacks {missing}")
        for key in ("mask", "delta_dense"):
            if key in needed and tuple(tensors[key].shape) != self.shape:
                raise ValueError(f"{self.name}: the checkpoint's {key} is {tuple(tensors[key].shape)}, "
                                 f"the layer {self.shape}")
        if storage != self.storage or tuple(tensors["delta"].shape) != tuple(self.delta.shape):
            self._adopt_storage(storage, tensors)
        with torch.no_grad():
            for key in needed:
                getattr(self, key).copy_(tensors[key])
        self._kernel_aux = None

    def to_linear(self, merge: bool) -> nn.Linear:
        """The wrapped ``nn.Linear``: unchanged (``merge=False``) or a new one with W + ΔW."""
        base = self.base
        w_grad, b_grad = self._base_requires_grad
        if not merge:
            base.weight.requires_grad_(w_grad)
            if base.bias is not None:
                base.bias.requires_grad_(b_grad)
            return base
        merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_((base.weight.float() + self.delta_weight()).to(base.weight.dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged
