"""A batch's per-row adapter assignment and the segment plans the multi-adapter kernels read."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sparse_engine.serving.pool import BLOCK, ELEMENT, INT32_MAX

if TYPE_CHECKING:
    from sparse_engine.serving.library import AdapterInfo


def check_assignment(names) -> None:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError("adapters must be a list with one adapter name (or None) per batch row, not a string; "
                         f"got {type(names).__name__}")
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise ValueError(f"adapter names must be strings or None, got {bad[:3]}")


@dataclass
class Plan:
    """Segments of one adapter format for one (batch, tokens per row): see sparse_engine/kernels/multi_adapter.py."""

    token_order: torch.Tensor
    seg_slots: torch.Tensor
    seg_offsets: torch.Tensor
    n_sel: int
    max_seg: int  # tokens of the longest segment (known on the host: no synchronisation)
    block_m: int | None  # None: chosen by the kernel module from the longest segment
    tiles: dict = field(default_factory=dict)

    def tile_table(self, impl):
        """(block_m, tile table) for a Triton kernel module (None: the reference twin, which
        needs neither), built once per batch and shared by all layers."""
        if impl is None:
            return self.block_m, None
        bm = self.block_m or impl.choose_block_m(self.max_seg)
        if bm not in self.tiles:
            self.tiles[bm] = impl.build_tiles(self.seg_slots, self.seg_offsets, self.n_sel, bm)
        return bm, self.tiles[bm]


class Batch:
    """A per-row adapter assignment, resolved to slots once; plans cached per tokens-per-row.

    ``repeat_rows``: the model may also see ``k · len(names)`` rows, ``k`` consecutive rows per
    assignment (how ``generate`` lays out beams and ``num_return_sequences``)."""

    def __init__(self, adapters: Mapping[str, AdapterInfo], names: Sequence[str | None], *,
                 repeat_rows: bool = False, block_m: int | None = None):
        check_assignment(names)
        names = list(names)
        unknown = sorted({n for n in names if n is not None and n not in adapters}, key=str)
        if unknown:
            raise ValueError(
                f"unknown adapter name(s) {unknown[:5]}; registered: {sorted(adapters)[:20]}"
                + " (use None for rows that should run the base model)"
            )
        self.names = names
        self.repeat_rows = repeat_rows
        self.block_m = block_m
        self.slots = [-1 if n is None else adapters[n].slot for n in names]
        self.kinds = [None if n is None else adapters[n].kind for n in names]
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
            if n_sel > INT32_MAX:
                raise ValueError("too many tokens in one batch for int32 token ids")
            packed = torch.cat([token_order, torch.tensor(seg_slots), offsets]).to(torch.int32).to(device)
            n_seg = len(seg_slots)
            out[kind] = Plan(
                token_order=packed[:n_sel],
                seg_slots=packed[n_sel: n_sel + n_seg],
                seg_offsets=packed[n_sel + n_seg:],
                n_sel=n_sel,
                max_seg=max(seg_rows) * per_row,
                block_m=self.block_m,
            )
        return out
