"""Validated containers for a sparse delta ΔW of a (d_out, d_in) weight.

* ``SparseDelta``: fp32 (or bf16 for serving) ``values[nnz]`` at int32 sorted, unique flat
  row-major ``indices[nnz]``.
* ``BlockSparseDelta``: ``blocks[n, B, B]`` at int32 sorted, unique flat block ids
  ``row_block * (d_in // B) + col_block``: true B×B tiles of the (out, in) matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_engine.kernels import reference as ref

_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_indices(indices: torch.Tensor, limit: int, what: str) -> None:
    if indices.dtype != torch.int32:
        raise ValueError(f"{what} must be int32, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(indices.shape)}")
    if indices.numel():
        if int(indices.min()) < 0 or int(indices.max()) >= limit:
            raise ValueError(f"{what} out of range [0, {limit})")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError(f"{what} must be sorted and unique")


@dataclass(frozen=True)
class SparseDelta:
    shape: tuple[int, int]
    values: torch.Tensor
    indices: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"shape must be (d_out, d_in) with positive dims, got {self.shape}")
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        if self.values.dtype not in _VALUE_DTYPES:
            raise ValueError(f"values must be one of {_VALUE_DTYPES}, got {self.values.dtype}")
        if self.values.dim() != 1 or self.values.shape != self.indices.shape:
            raise ValueError(
                f"values and indices must be 1-D of equal length, got {tuple(self.values.shape)} and {tuple(self.indices.shape)}"
            )
        _check_indices(self.indices, self.shape[0] * self.shape[1], "indices")

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def clone(self) -> SparseDelta:
        """A copy that shares no storage with this one."""
        return SparseDelta(self.shape, self.values.clone(), self.indices.clone())

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.bool, device=self.indices.device)
        m[self.indices.long()] = True
        return m.view(self.shape)

    def to_dense(self) -> torch.Tensor:
        return ref.densify_compact(self.values, self.indices, self.shape)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: torch.Tensor) -> "SparseDelta":
        indices = mask.reshape(-1).nonzero().flatten().to(torch.int32)
        return cls(tuple(dense.shape), dense.reshape(-1)[indices.long()].float().contiguous(), indices)


@dataclass(frozen=True)
class BlockSparseDelta:
    shape: tuple[int, int]
    blocks: torch.Tensor
    block_indices: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"shape must be (d_out, d_in) with positive dims, got {self.shape}")
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        if self.blocks.dim() != 3 or self.blocks.shape[1] != self.blocks.shape[2]:
            raise ValueError(f"blocks must be [n, B, B], got {tuple(self.blocks.shape)}")
        bs = self.block_size
        if self.shape[0] % bs or self.shape[1] % bs:
            raise ValueError(f"block size {bs} does not divide the weight shape {self.shape}")
        if self.blocks.dtype not in _VALUE_DTYPES:
            raise ValueError(f"blocks must be one of {_VALUE_DTYPES}, got {self.blocks.dtype}")
        if self.block_indices.shape != (self.blocks.shape[0],):
            raise ValueError(
                f"block_indices must have one id per block ({self.blocks.shape[0]}), got {tuple(self.block_indices.shape)}"
            )
        _check_indices(self.block_indices, self.grid[0] * self.grid[1], "block_indices")

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[-1])

    @property
    def grid(self) -> tuple[int, int]:
        return self.shape[0] // self.block_size, self.shape[1] // self.block_size

    @property
    def nnz(self) -> int:
        return self.blocks.numel()

    def mask(self) -> torch.Tensor:
        tiles = torch.zeros(self.grid[0] * self.grid[1], dtype=torch.bool, device=self.blocks.device)
        tiles[self.block_indices.long()] = True
        return block_mask_to_elements(tiles.view(self.grid), self.block_size)

    def to_dense(self) -> torch.Tensor:
        return ref.densify_blocks(self.blocks, self.block_indices, self.shape)

    def clone(self) -> BlockSparseDelta:
        """A copy that shares no storage with this one."""
        return BlockSparseDelta(self.shape, self.blocks.clone(), self.block_indices.clone())

    def to_sparse_delta(self) -> SparseDelta:
        return SparseDelta.from_dense(self.to_dense(), self.mask())

    @classmethod
    def from_dense(cls, dense: torch.Tensor, tile_mask: torch.Tensor, block_size: int) -> "BlockSparseDelta":
        block_indices = tile_mask.reshape(-1).nonzero().flatten().to(torch.int32)
        blocks = ref.gather_blocks(dense.float(), block_indices, block_size).contiguous()
        return cls(tuple(dense.shape), blocks, block_indices)


def block_mask_to_elements(tile_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Expand a ``[d_out/B, d_in/B]`` tile mask to the ``[d_out, d_in]`` element mask."""
    return tile_mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)

