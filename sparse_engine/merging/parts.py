"""The pieces every merge method is built from: an expert's layer as a flat :class:`Part`
(stored entries and their indices, never densified when sparse), trimming, Breadcrumbs'
crumbs, DARE's drop, the weighted sum into a layer accumulator and TIES's sign election
and disjoint mean. docs/merging.md defines each."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.merging.expert import Delta, dense_of

BASES = ("tensor", "stored")  # what the fractions of trim / crumbs count: the whole tensor or the stored entries
SIGN_METHODS = ("total", "frequency")
CHUNK = 1 << 22  # elementwise passes over a dense layer go in chunks: small temporaries


@dataclass
class Part:
    """One expert's delta of one layer, flattened: ``idx`` None means dense (all entries stored)."""

    values: torch.Tensor  # fp32 [n]
    idx: torch.Tensor | None  # int32/int64 sorted flat indices, or None
    numel: int

    @property
    def count(self) -> int:
        return self.values.numel()


def part_of(delta: Delta, device) -> Part:
    if isinstance(delta, SparseDelta):
        # int32 indices go straight into index_add_ (no int64 copy of every expert's indices)
        return Part(delta.values.to(device=device, dtype=torch.float32), delta.indices.to(device),
                    delta.shape[0] * delta.shape[1])
    if isinstance(delta, BlockSparseDelta):
        bs = delta.block_size
        n_col = delta.shape[1] // bs
        tiles = delta.block_indices.to(device).long()
        r = torch.arange(bs, device=device)
        rows = (tiles // n_col * bs)[:, None, None] + r[None, :, None]
        cols = (tiles % n_col * bs)[:, None, None] + r[None, None, :]
        flat = (rows * delta.shape[1] + cols).reshape(-1)
        values = delta.blocks.to(device=device, dtype=torch.float32).reshape(-1)
        flat, order = torch.sort(flat)
        if flat.numel() and delta.shape[0] * delta.shape[1] < 2**31:
            flat = flat.to(torch.int32)
        return Part(values[order], flat, delta.shape[0] * delta.shape[1])
    dense = dense_of(delta).to(device).reshape(-1)
    return Part(dense, None, dense.numel())


def select(part: Part, keep: torch.Tensor) -> Part:
    """The entries of ``part`` where the boolean ``keep`` (over its stored entries) is true."""
    positions = keep.nonzero().flatten()
    idx = positions if part.idx is None else part.idx[positions]
    return Part(part.values[positions], idx, part.numel)


def desc_rank(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry by descending |value|, ties broken by lower position (deterministic)."""
    order = torch.sort(values.abs(), descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank


def trim_top(part: Part, density: float, basis: str) -> Part:
    """Keep the ``int(density · n)`` entries of largest |value| (n: tensor size or stored count)."""
    if density >= 1.0:
        return part
    n = part.numel if basis == "tensor" else part.count
    k = int(density * n)
    if k >= part.count:
        return part
    return select(part, desc_rank(part.values) < k)


def crumbs(part: Part, beta: float, gamma: float, basis: str) -> Part:
    """Drop the ``int(gamma·n)`` largest and ``int(beta·n)`` smallest |values| (n as in :func:`trim_top`)."""
    n = part.numel if basis == "tensor" else part.count
    n_top, n_bottom = int(gamma * n), int(beta * n)
    rank = desc_rank(part.values)
    return select(part, (rank >= n_top) & (rank < n - n_bottom))


def dare_drop(part: Part, drop_rate: float, rescale: bool, generator: torch.Generator) -> Part:
    """Keep each stored entry with probability 1 − p (one draw each), survivors divided by 1 − p."""
    if drop_rate <= 0.0:
        return part
    keep = 1.0 - drop_rate
    draws = torch.bernoulli(torch.full((part.count,), keep, dtype=torch.float32), generator=generator)
    values = part.values * draws.to(part.values.device)
    if rescale and keep > 0.0:
        values = values / keep
    return select(Part(values, part.idx, part.numel), values != 0)


def accumulate(acc: torch.Tensor, part: Part, weight: float) -> None:
    """acc += weight · part, on the part's stored entries only."""
    values = part.values if weight == 1.0 else part.values * weight
    if part.idx is None:
        acc.add_(values)
    else:
        acc.index_add_(0, part.idx, values)


def count_dtype(n: int) -> torch.dtype:
    """The smallest integer type that counts up to ``n`` experts."""
    return torch.uint8 if n < 255 else (torch.int16 if n < 32767 else torch.int32)


def count_entries(counts: torch.Tensor, part: Part) -> None:
    """counts += 1 on the part's entries (every entry for a dense part)."""
    if part.idx is None:
        counts += 1
    else:
        counts.index_add_(0, part.idx, torch.ones(1, dtype=counts.dtype, device=counts.device).expand(part.count))


def elect_sign(scratch: torch.Tensor, kept: list[tuple[int, Part]], sign: str) -> torch.Tensor:
    """TIES's elected sign per entry (int8 ±1, + where the sum is 0): of Σ trimmed ("total") or
    Σ sign(trimmed) ("frequency"). ``scratch`` (zeros, one per entry) holds the sum and is left zeroed."""
    for _, part in kept:
        accumulate(scratch, part if sign == "total" else Part(part.values.sign(), part.idx, part.numel), 1.0)
    majority = torch.where(scratch >= 0, 1, -1).to(torch.int8)
    scratch.zero_()
    return majority


def disjoint_mean(acc: torch.Tensor, kept: list[tuple[int, Part]], w: list[float], majority: torch.Tensor,
                  cdtype: torch.dtype) -> torch.Tensor:
    """TIES's disjoint mean into ``acc`` (zeros): Σ w_i·t_i over the experts whose sign agrees with
    ``majority``, divided by how many they are (at least 1)."""
    agree_count = torch.zeros(acc.numel(), dtype=cdtype, device=acc.device)
    for i, part in kept:
        maj = majority if part.idx is None else majority[part.idx]
        sel = select(part, part.values.sign().to(torch.int8) == maj)
        accumulate(acc, sel, w[i])
        count_entries(agree_count, sel)
    for c in chunks(acc.numel()):
        acc[c].div_(agree_count[c].clamp(min=1))
    return acc


def chunks(n: int):
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


def check_finite(values: torch.Tensor, what: str) -> None:
    flat = values.reshape(-1)
    if flat.numel() and not all(bool(torch.isfinite(flat[c]).all()) for c in chunks(flat.numel())):
        raise ValueError(f"{what} holds NaN or Inf values; safe_merge refuses to merge it "
                         "(pass safe_merge=False to merge anyway)")
