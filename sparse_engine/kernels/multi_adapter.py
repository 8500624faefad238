"""Segmented multi-adapter delta kernels: every token row of a batch gets the sparse delta of
its own adapter, added into the base output ``out = x·Wᵀ`` computed once for the batch (the
kernels behind ``sparse_engine.serving``, whose ``AdapterLibrary`` builds the pools and segments).

Launchers: ``multi_block_delta`` and ``multi_element_delta`` (PyTorch twins of the same names in
``sparse_engine/kernels/reference.py``; arguments are trusted, no host synchronisation on the serving path),
``build_tiles`` and ``choose_block_m``. The pool, row-pointer, segment and tile-table layouts
they read, the kernel design and the choice of BLOCK_M: docs/serving.md, section "Kernel design".
"""
from __future__ import annotations

import torch

from . import runtime

runtime.require_triton(__name__)

import triton  # after the check that names the fix
import triton.language as tl

# A row of the tile table (int32 [n, _TILE_FIELDS], from build_tiles): the adapter slot and the
# first / end position of the tile's rows in token_order. constexpr: the kernels read them too.
_TILE_SLOT, _TILE_FIRST, _TILE_END = (tl.constexpr(i) for i in range(3))
_TILE_FIELDS = tl.constexpr(3)

__all__ = ["build_tiles", "choose_block_m", "multi_block_delta", "multi_element_delta", "element_config_fits",
           "jit_kernels", "autotune_configs"]


# ============================================================================ kernels


@triton.jit
def _operand(v, CT: tl.constexpr, UPCAST: tl.constexpr):
    """Cast a loaded tile to the compute dtype ``CT``; in the interpreter, bf16 goes on as fp32."""
    v = v.to(CT)
    if UPCAST:
        v = v.to(tl.float32)
    return v


@triton.jit
def _tile_tokens(tile_ptr, tok_ptr, pid_t, BLOCK_M: tl.constexpr):
    """Row ``pid_t`` of the tile table: (adapter slot, first, end) and the tile's token rows."""
    slot = tl.load(tile_ptr + pid_t * _TILE_FIELDS + _TILE_SLOT)
    t0 = tl.load(tile_ptr + pid_t * _TILE_FIELDS + _TILE_FIRST)
    t1 = tl.load(tile_ptr + pid_t * _TILE_FIELDS + _TILE_END)
    offs = t0 + tl.arange(0, BLOCK_M)
    m_mask = offs < t1
    tok = tl.load(tok_ptr + offs, mask=m_mask, other=0).to(tl.int64)
    return slot, t0, t1, tok, m_mask


def _block_configs():
    if runtime.INTERPRET:
        return [triton.Config({"KG": 2, "ROWS": 2}, num_warps=4, num_stages=1)]
    cfgs = []
    for kg in (2, 4, 8):
        for rows in (1, 2, 4):
            for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 3)):
                cfgs.append(triton.Config({"KG": kg, "ROWS": rows}, num_warps=warps, num_stages=stages))
    # many output block rows per program with plain loads (num_stages 1: no cp.async, which
    # bypasses L1), so later rows can find the tile's gathered x slices in L1 (as for the DSD
    # kernel in block_sparse.py; the autotuner decides)
    for rows in (16, 64):
        cfgs.append(triton.Config({"KG": 4, "ROWS": rows}, num_warps=4, num_stages=1))
    return cfgs


def _one_default(default):
    """With runtime.AUTOTUNE off, keep only the config matching ``default`` ((kwargs, warps, stages))."""

    def prune(configs, named_args, **kwargs):
        if runtime.AUTOTUNE or len(configs) == 1:
            return configs
        chosen = runtime.matching_config(configs, [default])
        return [chosen] if chosen is not None else configs[:1]

    return prune


@triton.autotune(
    configs=_block_configs(),
    key=["N_BUCKET", "n_rb", "D_BUCKET", "BLOCK_M", "B"],
    prune_configs_by={"early_config_prune": _one_default(({"KG": 4, "ROWS": 1}, 4, 3))},
    restore_value=["out_ptr"],
)
@triton.jit
def _multi_block_kernel(
    x_ptr, out_ptr, tok_ptr, tile_ptr, row_ptr_ptr, cols_ptr, blk_ptr,
    n_rb, N_BUCKET, D_BUCKET, stride_rp,
    stride_xm, stride_xk, stride_om, stride_on,
    stride_bs, stride_br, stride_bc,
    B: tl.constexpr, BLOCK_M: tl.constexpr, KG: tl.constexpr, ROWS: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[tok, o·B:(o+1)·B] += Σ_j x[tok, c_j·B:(c_j+1)·B] · blocks[j]ᵀ over the blocks j of row o of the tile's adapter."""
    pid_o = tl.program_id(1)
    CT: tl.constexpr = x_ptr.dtype.element_ty
    slot, t0, t1, tok, m_mask = _tile_tokens(tile_ptr, tok_ptr, tl.program_id(0), BLOCK_M)
    kk = tl.arange(0, KG * B)
    g = kk // B
    t = kk % B
    u = tl.arange(0, B)
    line = row_ptr_ptr + slot.to(tl.int64) * stride_rp
    for r in range(ROWS):
        o = pid_o * ROWS + r
        o_ok = (o < n_rb) & (t1 > t0)
        start = tl.load(line + o, mask=o_ok, other=0)
        end = tl.load(line + o + 1, mask=o_ok, other=0)
        acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
        for j0 in range(start, end, KG):
            j = j0 + g
            valid = j < end
            col = tl.load(cols_ptr + j, mask=valid, other=0)
            xcols = tl.max_contiguous(tl.multiple_of(col * B + t, B), B)
            a = tl.load(
                x_ptr + tok[:, None] * stride_xm + xcols[None, :] * stride_xk,
                mask=m_mask[:, None] & valid[None, :],
                other=0.0,
            )
            # bop[g·B + t, u] = blocks[j_g, u, t]  (the block transposed: rows = inputs, cols = outputs)
            bop = tl.load(
                blk_ptr + j.to(tl.int64)[:, None] * stride_bs + u[None, :] * stride_br + t[:, None] * stride_bc,
                mask=valid[:, None],
                other=0.0,
            )
            a = _operand(a, CT, UPCAST)
            bop = _operand(bop, CT, UPCAST)
            if IEEE:
                acc = tl.dot(a, bop, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, bop, acc)
        if end > start:
            ptrs = out_ptr + tok[:, None] * stride_om + (o * B + u)[None, :] * stride_on
            prev = tl.load(ptrs, mask=m_mask[:, None], other=0.0).to(tl.float32)
            tl.store(ptrs, (prev + acc).to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def _element_configs():
    if runtime.INTERPRET:
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn in (32, 64, 128)
        for w, s in ((4, 2), (4, 3), (8, 3))
    ]


def element_config_fits(block_m: int, cfg) -> bool:
    """At most 64 fp32 accumulator registers per thread (BLOCK_M·BLOCK_N = 128x128 on 4 warps spills on sm_90)."""
    return block_m * cfg.kwargs["BLOCK_N"] <= 2048 * cfg.num_warps


def _element_prune(configs, named_args, **kwargs):
    bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 16))
    keep = [c for c in configs if element_config_fits(bm, c)] or configs[:1]
    return _one_default(({"BLOCK_N": 64}, 4, 3))(keep, named_args, **kwargs)


@triton.autotune(
    configs=_element_configs(),
    key=["N_BUCKET", "d_out", "D_BUCKET", "BLOCK_M"],
    prune_configs_by={"early_config_prune": _element_prune},
    restore_value=["out_ptr"],
)
@triton.jit
def _multi_element_kernel(
    x_ptr, out_ptr, tok_ptr, tile_ptr, row_ptr_ptr, cols_ptr, val_ptr,
    d_out, N_BUCKET, D_BUCKET, stride_rp,
    stride_xm, stride_xk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[tok, r] += Σ_k x[tok, col_{r,k}] · val_{r,k} for the BLOCK_N rows r of this program."""
    pid_n = tl.program_id(1)
    CT: tl.constexpr = x_ptr.dtype.element_ty
    slot, t0, t1, tok, m_mask = _tile_tokens(tile_ptr, tok_ptr, tl.program_id(0), BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < tl.where(t1 > t0, d_out, 0)  # an empty tile reads nothing
    line = row_ptr_ptr + slot.to(tl.int64) * stride_rp
    start = tl.load(line + rows, mask=r_ok, other=0)
    end = tl.load(line + rows + 1, mask=r_ok, other=0)
    n_max = tl.max(end - start, axis=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(n_max):
        j = start + k
        valid = j < end
        col = tl.load(cols_ptr + j, mask=valid, other=0).to(tl.int64)
        val = tl.load(val_ptr + j, mask=valid, other=0.0)
        xv = tl.load(
            x_ptr + tok[:, None] * stride_xm + col[None, :] * stride_xk,
            mask=m_mask[:, None] & valid[None, :],
            other=0.0,
        )
        acc += _operand(xv, CT, UPCAST).to(tl.float32) * _operand(val, CT, UPCAST).to(tl.float32)[None, :]
    if n_max > 0:
        ptrs = out_ptr + tok[:, None] * stride_om + rows[None, :] * stride_on
        mask = m_mask[:, None] & r_ok[None, :]
        prev = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (prev + acc).to(out_ptr.dtype.element_ty), mask=mask)


def jit_kernels() -> dict:
    """The jit kernels by name (``block``, ``element``), for compile checks without a GPU."""
    return {"block": _multi_block_kernel.fn, "element": _multi_element_kernel.fn}


def autotune_configs() -> dict:
    """The configs each kernel of :func:`jit_kernels` autotunes over in this process (element
    configs are pruned per BLOCK_M by :func:`element_config_fits` at launch)."""
    return {"block": list(_multi_block_kernel.configs), "element": list(_multi_element_kernel.configs)}


# ======================================================================== launchers


def choose_block_m(max_seg_len: int) -> int:
    """Token tile size from the longest segment: the smallest of 16, 32, 64, 128 that holds it,
    so every segment of up to 128 tokens is one tile and its adapter is read once; a longer
    segment is cut into 128-token tiles (read once per tile)."""
    for bm in (16, 32, 64):
        if max_seg_len <= bm:
            return bm
    return 128


def build_tiles(seg_slots: torch.Tensor, seg_offsets: torch.Tensor, n_sel: int, block_m: int) -> torch.Tensor:
    """int32 ``[n_sel // block_m + n_seg, 3]`` tile table (slot, first, end) into ``token_order``.

    Device ops only (no host synchronisation): the table has the host-known upper bound of
    rows, the unused ones are empty tiles ``(0, 0, 0)``.
    """
    n_seg = int(seg_slots.numel())
    device = seg_slots.device
    n_max = int(n_sel) // int(block_m) + n_seg
    if n_max == 0:
        return torch.zeros((0, _TILE_FIELDS.value), dtype=torch.int32, device=device)
    offs = seg_offsets.to(torch.int64)
    lens = offs[1:] - offs[:-1]
    per_seg = (lens + block_m - 1) // block_m
    tile_end = torch.cumsum(per_seg, 0)  # inclusive
    ids = torch.arange(n_max, dtype=torch.int64, device=device)
    seg = torch.searchsorted(tile_end, ids, right=True)  # n_seg for ids past the last tile
    live = seg < n_seg
    seg_c = seg.clamp(max=max(n_seg - 1, 0))
    first_tile = tile_end[seg_c] - per_seg[seg_c]
    first = offs[seg_c] + (ids - first_tile) * block_m
    end = torch.minimum(first + block_m, offs[seg_c + 1])
    columns = {_TILE_SLOT.value: seg_slots.to(torch.int64)[seg_c], _TILE_FIRST.value: first, _TILE_END.value: end}
    table = torch.stack([columns[c] for c in range(_TILE_FIELDS.value)], 1)
    table = torch.where(live[:, None], table, torch.zeros_like(table))
    return table.to(torch.int32).contiguous()


def _check_common(x, out, token_order, seg_slots, seg_offsets, row_ptr, n_lines):
    if x.dtype not in runtime.FLOAT_DTYPES or out.dtype not in runtime.FLOAT_DTYPES:
        raise TypeError(f"x and out must be fp16/bf16/fp32, got {x.dtype} and {out.dtype}")
    if x.dim() != 2 or out.dim() != 2 or x.shape[0] != out.shape[0]:
        raise ValueError(f"x [T, d_in] and out [T, d_out] must be 2-D with equal T, got {tuple(x.shape)}, {tuple(out.shape)}")
    for name, t in (("token_order", token_order), ("seg_slots", seg_slots), ("seg_offsets", seg_offsets),
                    ("row_ptr", row_ptr)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device}, x on {x.device}")
    if seg_offsets.shape != (seg_slots.numel() + 1,):
        raise ValueError(f"seg_offsets must have n_seg + 1 = {seg_slots.numel() + 1} entries, got {tuple(seg_offsets.shape)}")
    if row_ptr.dim() != 2 or row_ptr.shape[1] != n_lines + 1 or row_ptr.stride(1) != 1:
        raise ValueError(f"row_ptr must be [n_slots, {n_lines + 1}] with unit inner stride, got {tuple(row_ptr.shape)}")
    if not token_order.is_contiguous():
        raise ValueError("token_order must be contiguous")
    if x.shape[0] * max(1, x.stride(0)) >= 2**62:
        raise ValueError("x is too large")
    runtime.check_usable(x, "multi-adapter")


def _tiles_for(seg_slots, seg_offsets, n_sel, block_m, tiles):
    if block_m is None:  # one host synchronisation; the serving path passes block_m and tiles
        block_m = choose_block_m(int((seg_offsets[1:] - seg_offsets[:-1]).max()))
    if block_m not in (16, 32, 64, 128):
        raise ValueError(f"block_m must be one of 16, 32, 64, 128, got {block_m}")
    if tiles is None:
        tiles = build_tiles(seg_slots, seg_offsets, n_sel, block_m)
    elif tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != _TILE_FIELDS.value or not tiles.is_contiguous():
        raise ValueError("tiles must be a contiguous int32 [n, 3] table from build_tiles")
    return block_m, tiles


def multi_block_delta(x, out, token_order, seg_slots, seg_offsets, row_ptr, block_cols, blocks, *,
                      block_m: int | None = None, tiles: torch.Tensor | None = None):
    """``out[token_order[seg i]] += x[...] · ΔW_{seg_slots[i]}ᵀ`` for block-sparse adapters, in place.

    ``x [T, d_in]``, ``out [T, d_out]`` (the base output), ``blocks [cap, B, B]`` (any float
    dtype, cast to x's), ``block_cols int32 [cap]``, ``row_ptr int32 [n_slots, d_out/B + 1]``.
    ``tiles``: a table from :func:`build_tiles` for ``block_m`` (cached by the caller across
    layers). Returns ``out``.
    """
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2] or blocks.dtype not in runtime.FLOAT_DTYPES:
        raise ValueError(f"blocks must be a float [cap, B, B] tensor, got {tuple(blocks.shape)} {blocks.dtype}")
    bs = runtime.check_block_size(int(blocks.shape[-1]), "the block size")
    d_out, d_in = int(out.shape[-1]), int(x.shape[-1])
    if d_out % bs or d_in % bs:
        raise ValueError(f"block size {bs} does not divide ({d_out}, {d_in})")
    _check_common(x, out, token_order, seg_slots, seg_offsets, row_ptr, d_out // bs)
    if block_cols.dtype != torch.int32 or block_cols.device != x.device or blocks.device != x.device:
        raise ValueError("block_cols must be int32 and block_cols/blocks on x's device")
    n_sel = int(token_order.numel())
    if n_sel == 0 or seg_slots.numel() == 0 or blocks.shape[0] == 0:
        return out
    block_m, tiles = _tiles_for(seg_slots, seg_offsets, n_sel, block_m, tiles)
    n_rb = d_out // bs
    sb = blocks.stride()
    grid = lambda meta: (tiles.shape[0], triton.cdiv(n_rb, meta["ROWS"]))
    _multi_block_kernel[grid](
        x, out, token_order, tiles, row_ptr, block_cols, blocks,
        n_rb, runtime.pow2(n_sel), runtime.pow2(d_in), row_ptr.stride(0),
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        sb[0], sb[1], sb[2],
        B=bs, BLOCK_M=block_m, IEEE=x.dtype == torch.float32,
        UPCAST=runtime.upcast_bf16(x.dtype),
    )
    return out


def multi_element_delta(x, out, token_order, seg_slots, seg_offsets, row_ptr, cols, values, *,
                        block_m: int | None = None, tiles: torch.Tensor | None = None):
    """``out[token_order[seg i]] += x[...] · ΔW_{seg_slots[i]}ᵀ`` for element-sparse adapters, in place.

    ``values [cap]`` (any float dtype, cast to x's), ``cols [cap]`` int16/int32 column ids,
    ``row_ptr int32 [n_slots, d_out + 1]``. Returns ``out``.
    """
    d_out, d_in = int(out.shape[-1]), int(x.shape[-1])
    _check_common(x, out, token_order, seg_slots, seg_offsets, row_ptr, d_out)
    if values.dtype not in runtime.FLOAT_DTYPES or values.dim() != 1:
        raise ValueError(f"values must be a 1-D float tensor, got {tuple(values.shape)} {values.dtype}")
    if cols.dtype not in (torch.int16, torch.int32) or cols.shape != values.shape:
        raise ValueError(f"cols must be int16/int32 with values' shape, got {cols.dtype} {tuple(cols.shape)}")
    if cols.device != x.device or values.device != x.device:
        raise ValueError("cols/values must be on x's device")
    n_sel = int(token_order.numel())
    if n_sel == 0 or seg_slots.numel() == 0 or values.numel() == 0:
        return out
    block_m, tiles = _tiles_for(seg_slots, seg_offsets, n_sel, block_m, tiles)
    grid = lambda meta: (tiles.shape[0], triton.cdiv(d_out, meta["BLOCK_N"]))
    _multi_element_kernel[grid](
        x, out, token_order, tiles, row_ptr, cols, values,
        d_out, runtime.pow2(n_sel), runtime.pow2(d_in), row_ptr.stride(0),
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, UPCAST=runtime.upcast_bf16(x.dtype),
    )
    return out
