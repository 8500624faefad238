"""``SparseAdapterLinear``: a drop-in wrapper of ``nn.Linear`` holding a sparse delta.

Storage phases (Algorithm 1 of the paper):

* **search** (mask epochs): ``delta`` is a dense fp32 Ŵ ``[d_out, d_in]`` and ``mask`` a
  bool ``[d_out, d_in]`` buffer; the forward uses W + Ŵ⊙M. Entries outside the mask keep
  their last value (frozen, invisible to the forward) so that a score such as MCS = Ŵ·g
  can select them again; their optimizer moments are cleared when they leave the mask.
* **fixed** (after the mask epochs): ``delta`` holds only the kept entries — fp32
  ``[nnz]`` values (element-sparse) or ``[n, B, B]`` blocks (block-sparse) — and
  ``indices`` the int32 sorted flat element indices or block ids. The dense Ŵ, the mask
  and their optimizer state are gone.

The switch replaces ``delta`` by a new ``nn.Parameter`` of the compact shape (autograd
caches a leaf's shape, so resizing ``.data`` in place is not an option); the training code
swaps it into the optimizer and moves the kept entries' state along
(``sparse_engine.masking.freeze_masks``).
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

    def __init__(self, base: nn.Linear, config: SparseAdapterConfig, name: str = ""):
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
        self.phase = SEARCH
        self._base_requires_grad = (base.weight.requires_grad, None if base.bias is None else base.bias.requires_grad)
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.delta = nn.Parameter(torch.zeros(d_out, d_in, dtype=torch.float32, device=base.weight.device))
        self.register_buffer("mask", torch.ones(d_out, d_in, dtype=torch.bool, device=base.weight.device))
        self.register_buffer("indices", None)
        self.mask_ignored = False
        self.score_sink = None
        self._kernel_aux = None  # (source tensor, its version, Triton index layout): see _kernel_layout

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def kept_count(self) -> int:
        """Number of kept units: elements (element-sparse) or tiles (block-sparse)."""
        if self.phase == FIXED:
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
        if self.phase == SEARCH:
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
            if self.phase == SEARCH:
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
        expected = self.shape if self.phase == SEARCH else (
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
        n_units = self._unit_grid()[0] * self._unit_grid()[1]
        tiles = torch.zeros(n_units, dtype=torch.bool, device=self.mask.device)
        tiles[kept.long()] = True
        tiles = tiles.view(self._unit_grid())
        mask = tiles if self.block_size is None else block_mask_to_elements(tiles, self.block_size)
        self.mask.copy_(mask)
        return mask

    def kept_units(self) -> torch.Tensor:
        """int32 sorted flat indices of kept elements (or tile ids in block mode)."""
        if self.phase == FIXED:
            return self.indices
        units = self.mask if self.block_size is None else self.mask[:: self.block_size, :: self.block_size]
        return units.reshape(-1).nonzero().flatten().to(torch.int32)

    def _unit_grid(self) -> tuple[int, int]:
        if self.block_size is None:
            return self.shape
        return (self.out_features // self.block_size, self.in_features // self.block_size)

    def compact_gather_index(self) -> torch.Tensor:
        """Flat dense positions, in the order the fixed-phase storage lays the kept entries out."""
        kept = self.kept_units().long()
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

    def freeze(self) -> torch.Tensor:
        """Switch to compact storage (a new ``delta`` parameter); returns the gather index used."""
        if self.phase == FIXED:
            raise RuntimeError(f"{self.name}: already in the fixed phase")
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
        if self.phase == SEARCH:
            return self.delta.detach() * self.mask
        if self.block_size is None:
            return ref.densify_compact(self.delta.detach(), self.indices, self.shape)
        return ref.densify_blocks(self.delta.detach(), self.indices, self.shape)

    def to_sparse(self) -> SparseDelta | BlockSparseDelta:
        """The adapter as a validated container (fixed or search phase)."""
        self.check_unsharded()
        values = self.delta.detach().reshape(-1)[self.compact_gather_index()] if self.phase == SEARCH else self.delta.detach()
        kept = self.kept_units()
        if self.block_size is None:
            return SparseDelta(self.shape, values.float().contiguous(), kept.contiguous())
        blocks = values.reshape(-1, self.block_size, self.block_size).float().contiguous()
        return BlockSparseDelta(self.shape, blocks, kept.contiguous())

    def load_sparse(self, delta: SparseDelta | BlockSparseDelta) -> None:
        """Take a saved adapter: fixed phase with ``delta``'s entries (checked against this layer)."""
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
        # A copy: training must never write into the caller's tensors (e.g. a loaded file's).
        self.delta = nn.Parameter(values.to(device=device, dtype=torch.float32, copy=True).contiguous())
        self.indices = kept.to(device).contiguous()
        self.mask = None
        self.phase = FIXED
        self._kernel_aux = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A state dict records its storage phase: ``indices`` (fixed) or ``mask`` (search). A
        # checkpoint of the other phase (the Trainer resuming after the freeze, or loading a
        # best model saved during the mask epochs) switches this layer to that phase first, so
        # the tensors fit; the caller's optimizer must then be (re)built, as the Trainer does.
        delta = state_dict.get(prefix + "delta")
        if torch.is_tensor(delta):
            if prefix + "indices" in state_dict and self.phase == SEARCH:
                self._adopt_phase(FIXED, delta, state_dict[prefix + "indices"])
            elif prefix + "mask" in state_dict and self.phase == FIXED:
                self._adopt_phase(SEARCH, delta, state_dict[prefix + "mask"])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _adopt_phase(self, phase: str, delta: torch.Tensor, index: torch.Tensor) -> None:
        """Empty storage of ``phase`` shaped like the incoming ``delta`` / ``indices`` or ``mask``."""
        device = self.base.weight.device
        self.delta = nn.Parameter(torch.zeros(delta.shape, dtype=torch.float32, device=device))
        if phase == FIXED:
            self.indices = torch.zeros(index.shape, dtype=torch.int32, device=device)
            self.mask = None
        else:
            self.mask = torch.zeros(index.shape, dtype=torch.bool, device=device)
            self.indices = None
        self.phase = phase
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
