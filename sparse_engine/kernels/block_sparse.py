"""Triton kernels for 16×16 block-sparse adapters: ΔW given as ``blocks [n, B, B]`` at int32
sorted flat block ids ``row_block * (d_in // B) + col_block`` of the ``(d_out, d_in)`` weight.

Launchers (drop-in for the twins in ``sparse_engine/kernels/reference.py``): ``block_delta_matmul`` and
``block_delta_grad_input`` (the delta alone, DSD), ``block_grad_blocks`` (dYᵀX at the kept tiles
only, SDD), ``block_delta_linear`` and ``block_grad_input`` (W + ΔW fused into one GEMM), and
``build_block_slot_map`` / ``build_block_layout`` (index structures, validated once). The index
structures, kernel design, numerics and performance model: docs/kernels.md, section
"Block-sparse kernels".
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import runtime
from .reference import build_block_slot_map, validate_block_indices

runtime.require_triton(__name__)

import triton  # after the check that names the fix
import triton.language as tl

__all__ = [
    "BlockLayout",
    "build_block_layout",
    "build_block_slot_map",
    "block_delta_matmul",
    "block_delta_grad_input",
    "block_grad_blocks",
    "block_delta_linear",
    "block_grad_input",
    "jit_kernels",
    "autotune_configs",
]

# SDD: blocks of one row handled by one program (chunk size); KG·B = 64 columns of x per step.
_SDD_COLS = 64


# ============================================================================ kernels


@triton.jit
def _operand(v, CT: tl.constexpr, UPCAST: tl.constexpr):
    """Cast a loaded tile to the compute dtype ``CT``; in the interpreter, bf16 continues as fp32."""
    v = v.to(CT)
    if UPCAST:
        v = v.to(tl.float32)
    return v


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


def _dsd_configs():
    if runtime.INTERPRET:  # COLS 2: the column loop and its guard (odd column counts) run in tests
        return [triton.Config({"BLOCK_M": 64, "KG": 2, "COLS": 2}, num_warps=4, num_stages=1)]
    cfgs = []
    for bm in (16, 32, 64, 128):
        for kg in (2, 4, 8):
            for warps, stages in ((4, 3), (4, 4), (8, 3)):
                if bm <= 32 and warps == 8:
                    continue
                cfgs.append(triton.Config({"BLOCK_M": bm, "KG": kg, "COLS": 1}, num_warps=warps, num_stages=stages))
    # Many output columns per program over one small token tile, plain loads (num_stages=1: no
    # cp.async, which bypasses L1): the tile's x slices can then be re-read from L1 instead of
    # L2 by the next columns (a kept 16x16 block only reuses its x slice 16 times, so at keep
    # 0.1 the one-column configs are expected L2-bound). The autotuner decides between them.
    for bm, cols in ((16, 16), (32, 16), (16, 64)):
        cfgs.append(triton.Config({"BLOCK_M": bm, "KG": 4, "COLS": cols}, num_warps=4, num_stages=1))
    return cfgs


def _prune_by_m(block_name: str, defaults: tuple = ()):
    """Drop configs whose token tile is larger than the token count (keep the smallest).

    With ``runtime.AUTOTUNE`` off, keep one config: the first of ``defaults`` ((kwargs, warps, stages),
    in order of preference) that fits, else the first fitting config.
    """

    def prune(configs, named_args, **kwargs):
        m_bucket = kwargs.get("M_BUCKET", named_args.get("M_BUCKET", 1 << 30))
        keep = [c for c in configs if c.kwargs[block_name] <= max(16, m_bucket)]
        keep = keep or [min(configs, key=lambda c: c.kwargs[block_name])]
        if runtime.AUTOTUNE:
            return keep
        chosen = runtime.matching_config(keep, defaults)
        return [chosen] if chosen is not None else keep[:1]

    return prune


@triton.autotune(
    configs=_dsd_configs(),
    key=["M_BUCKET", "D_BUCKET", "n_out_blocks", "B"],
    prune_configs_by={"early_config_prune": _prune_by_m("BLOCK_M", tuple(
        ({"BLOCK_M": bm, "KG": 4, "COLS": 1}, 4, 3) for bm in (128, 64, 32, 16)))},
    restore_value=["c_ptr"],
)
@triton.jit
def _dsd_kernel(
    a_ptr, blk_ptr, ptr_ptr, slot_ptr, other_ptr, c_ptr,
    M, M_BUCKET, D_BUCKET, n_out_blocks,
    stride_am, stride_ak, stride_cm, stride_cn,
    stride_bs, stride_bt, stride_bo,
    B: tl.constexpr, BLOCK_M: tl.constexpr, KG: tl.constexpr, COLS: tl.constexpr,
    ACCUMULATE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    """C[:, o·B:(o+1)·B] (+)= Σ_j A[:, other_j·B:(other_j+1)·B] · Bop_j over the entries j of output column o,
    for the COLS output columns o of this program, one after the other.

    Bop_j[t, u] = blocks[slot_j, ...] read through (stride_bt, stride_bo): for y = xΔWᵀ the
    entries are a CSR row (other = column block, Bop = blockᵀ); for dX = dYΔW a CSC column
    (other = row block, Bop = block).
    """
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    for r in range(COLS):
        pid_o = tl.program_id(0) * COLS + r
        if pid_o < n_out_blocks:
            _dsd_column(a_ptr, blk_ptr, ptr_ptr, slot_ptr, other_ptr, c_ptr, pid_o, offs_m, m_mask,
                        stride_am, stride_ak, stride_cm, stride_cn, stride_bs, stride_bt, stride_bo,
                        B, BLOCK_M, KG, ACCUMULATE, IEEE, UPCAST)


@triton.jit
def _dsd_column(
    a_ptr, blk_ptr, ptr_ptr, slot_ptr, other_ptr, c_ptr, pid_o, offs_m, m_mask,
    stride_am, stride_ak, stride_cm, stride_cn, stride_bs, stride_bt, stride_bo,
    B: tl.constexpr, BLOCK_M: tl.constexpr, KG: tl.constexpr,
    ACCUMULATE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    CT: tl.constexpr = a_ptr.dtype.element_ty
    start = tl.load(ptr_ptr + pid_o)
    end = tl.load(ptr_ptr + pid_o + 1)
    kk = tl.arange(0, KG * B)
    g = kk // B
    t = kk % B
    u = tl.arange(0, B)
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for j0 in range(start, end, KG):
        j = j0 + g
        valid = j < end
        slot = tl.load(slot_ptr + j, mask=valid, other=0)
        other = tl.load(other_ptr + j, mask=valid, other=0)
        cols = tl.max_contiguous(tl.multiple_of(other * B + t, B), B)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + cols[None, :] * stride_ak,
            mask=m_mask[:, None] & valid[None, :],
            other=0.0,
        )
        bop = tl.load(
            blk_ptr + slot[:, None] * stride_bs + t[:, None] * stride_bt + u[None, :] * stride_bo,
            mask=valid[:, None],
            other=0.0,
        )
        acc = _mma(_operand(a, CT, UPCAST), _operand(bop, CT, UPCAST), acc, IEEE)

    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + (pid_o * B + u)[None, :] * stride_cn
    c_mask = m_mask[:, None]
    if ACCUMULATE:
        if end > start:
            prev = tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
            tl.store(c_ptrs, (prev + acc).to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _sdd_configs():
    if runtime.INTERPRET:
        return [triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bk in (32, 64, 128)
        for w, s in ((4, 3), (4, 4), (8, 3))
    ]


@triton.autotune(
    configs=_sdd_configs(),
    key=["M_BUCKET", "D_BUCKET", "n_rb", "B", "KG"],
    prune_configs_by={"early_config_prune": _prune_by_m("BLOCK_K", (({"BLOCK_K": 64}, 4, 3),))},
    restore_value=["c_ptr"],
)
@triton.jit
def _sdd_kernel(
    dy_ptr, x_ptr, row_ptr_ptr, chunk_ptr_ptr, cols_ptr, c_ptr,
    M, M_BUCKET, D_BUCKET, n_rb, n_search,
    stride_dm, stride_dn, stride_xm, stride_xk,
    stride_cs, stride_co, stride_ct,
    B: tl.constexpr, KG: tl.constexpr, BLOCK_K: tl.constexpr,
    ACCUMULATE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    """dBlocks[j] (+)= dY[:, r·B:(r+1)·B]ᵀ · X[:, c_j·B:(c_j+1)·B] for a chunk of ≤ KG kept blocks j of row r."""
    pid = tl.program_id(0)
    CT: tl.constexpr = x_ptr.dtype.element_ty
    total = tl.load(chunk_ptr_ptr + n_rb)
    active = pid < total
    # the last row r with chunk_ptr[r] <= pid (rows without blocks own no chunk)
    lo = pid * 0
    hi = lo + n_rb
    for _ in range(n_search):
        mid = (lo + hi) // 2
        below = tl.load(chunk_ptr_ptr + mid) <= pid
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    r = lo
    row_start = tl.load(row_ptr_ptr + r)
    row_end = tl.load(row_ptr_ptr + r + 1)
    first = row_start + (pid - tl.load(chunk_ptr_ptr + r)) * KG

    kk = tl.arange(0, KG * B)
    g = kk // B
    t = kk % B
    u = tl.arange(0, B)
    j = first + g
    valid = j < tl.where(active, row_end, first)  # inactive programs touch nothing
    col = tl.load(cols_ptr + j, mask=valid, other=0)
    xcols = tl.max_contiguous(tl.multiple_of(col * B + t, B), B)
    dycols = r * B + u

    # accᵀ[g·B + t, u] = Σ_m X[m, c_g·B + t] · dY[m, r·B + u]
    acc = tl.zeros((KG * B, B), dtype=tl.float32)
    m_stop = tl.where(active, M, 0)
    for m0 in range(0, m_stop, BLOCK_K):
        offs = m0 + tl.arange(0, BLOCK_K)
        mm = offs < M
        xt = tl.load(
            x_ptr + xcols[:, None] * stride_xk + offs[None, :] * stride_xm,
            mask=valid[:, None] & mm[None, :],
            other=0.0,
        )
        dyt = tl.load(dy_ptr + offs[:, None] * stride_dm + dycols[None, :] * stride_dn, mask=mm[:, None], other=0.0)
        acc = _mma(_operand(xt, CT, UPCAST), _operand(dyt, CT, UPCAST), acc, IEEE)

    c_ptrs = c_ptr + j[:, None] * stride_cs + u[None, :] * stride_co + t[:, None] * stride_ct
    c_mask = valid[:, None]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, acc, mask=c_mask)


def _fused_configs():
    if runtime.INTERPRET:
        return [triton.Config({"BLOCK_P": 32, "BLOCK_M": 32, "BLOCK_Q": 32, "GROUP": 4}, num_warps=4, num_stages=1)]
    cfgs = []
    for bp, bm, bq, w, s in (
        (128, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 32, 64, 4, 4),
        (128, 16, 128, 4, 4),
        (64, 16, 128, 4, 4),
        (32, 16, 128, 4, 4),  # decode: enough programs to stream W from every SM
        (32, 32, 128, 4, 4),
        (64, 32, 64, 4, 5),
    ):
        cfgs.append(triton.Config({"BLOCK_P": bp, "BLOCK_M": bm, "BLOCK_Q": bq, "GROUP": 8}, num_warps=w, num_stages=s))
    return cfgs


@triton.autotune(
    configs=_fused_configs(),
    key=["M_BUCKET", "P", "Q", "B"],
    prune_configs_by={"early_config_prune": _prune_by_m("BLOCK_M", (
        ({"BLOCK_P": 128, "BLOCK_M": 128, "BLOCK_Q": 64, "GROUP": 8}, 8, 3),
        ({"BLOCK_P": 128, "BLOCK_M": 64, "BLOCK_Q": 64, "GROUP": 8}, 4, 4),
        ({"BLOCK_P": 128, "BLOCK_M": 32, "BLOCK_Q": 64, "GROUP": 8}, 4, 4),
        ({"BLOCK_P": 32, "BLOCK_M": 16, "BLOCK_Q": 128, "GROUP": 8}, 4, 4),
    ))},
)
@triton.jit
def _fused_kernel(
    a_ptr, w_ptr, blk_ptr, slot_ptr, bias_ptr, c_ptr,
    M, M_BUCKET, P, Q,
    stride_am, stride_aq, stride_wp, stride_wq,
    stride_sp, stride_sq, stride_bs, stride_bp, stride_bq,
    stride_cm, stride_cp,
    B: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    """C[m, p] = Σ_q A[m, q] · W_eff[p, q] (+ bias[p]), W_eff = W + ΔW formed in fp32 and cast to A's dtype.

    W_eff[p, q] = W[p·stride_wp + q·stride_wq] + blocks[slot(p//B, q//B), p%B, q%B] (through the
    stride arguments): the forward uses (p, q) = (out, in), the input gradient (in, out).
    """
    pid = tl.program_id(0)
    CT: tl.constexpr = a_ptr.dtype.element_ty
    n_m = tl.cdiv(M, BLOCK_M)
    n_p = tl.cdiv(P, BLOCK_P)
    per_group = GROUP * n_p
    group = pid // per_group
    first_m = group * GROUP
    group_size = tl.minimum(n_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_size
    pid_p = (pid % per_group) // group_size

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_mask = offs_p < P
    m_mask = offs_m < M
    # A K step covers BLOCK_Q columns in SUB-wide slices, each inside one block column
    # (SUB = B, or BLOCK_Q when the blocks are wider than the K step).
    SUB: tl.constexpr = B if B < BLOCK_Q else BLOCK_Q
    v = tl.arange(0, SUB)
    p_block = offs_p // B
    row_in_block = (offs_p % B)[:, None] * stride_bp

    acc = tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        for s in tl.static_range(BLOCK_Q // SUB):
            q_start = q0 + s * SUB
            qb = q_start // B
            offs_q = q_start + v
            q_mask = offs_q < Q
            inner = row_in_block + (offs_q % B)[None, :] * stride_bq
            w = tl.load(
                w_ptr + offs_p[:, None] * stride_wp + offs_q[None, :] * stride_wq,
                mask=p_mask[:, None] & q_mask[None, :],
                other=0.0,
            )
            slot = tl.load(slot_ptr + p_block * stride_sp + qb * stride_sq, mask=p_mask & (p_block * 0 + qb * B < Q), other=-1)
            d = tl.load(blk_ptr + slot[:, None] * stride_bs + inner, mask=(slot >= 0)[:, None], other=0.0)
            w_eff = _operand(w.to(tl.float32) + d.to(tl.float32), CT, UPCAST)
            at = tl.load(
                a_ptr + offs_q[:, None] * stride_aq + offs_m[None, :] * stride_am,
                mask=q_mask[:, None] & m_mask[None, :],
                other=0.0,
            )
            acc = _mma(w_eff, _operand(at, CT, UPCAST), acc, IEEE)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_p, mask=p_mask, other=0.0).to(tl.float32)
        acc += bias[:, None]
    c_ptrs = c_ptr + offs_m[None, :] * stride_cm + offs_p[:, None] * stride_cp
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=p_mask[:, None] & m_mask[None, :])


def jit_kernels() -> dict:
    """The jit kernels by name (``dsd``: the delta alone, ``sdd``: dYᵀX at kept tiles, ``fused``:
    W + ΔW in one GEMM), for compile checks without a GPU."""
    return {"dsd": _dsd_kernel.fn, "sdd": _sdd_kernel.fn, "fused": _fused_kernel.fn}


def autotune_configs() -> dict:
    """The configs each kernel of :func:`jit_kernels` autotunes over in this process (the GPU
    lists, or one small config per kernel in the interpreter)."""
    return {"dsd": list(_dsd_kernel.configs), "sdd": list(_sdd_kernel.configs), "fused": list(_fused_kernel.configs)}


# ========================================================================== layouts


class BlockLayout(NamedTuple):
    """Validated index structures of one block-sparse delta (docs/kernels.md, "Block-sparse kernels")."""

    shape: tuple[int, int]
    block_size: int
    n_blocks: int
    block_indices: torch.Tensor  # int32 [n] sorted flat block ids
    slot_map: torch.Tensor  # int32 [d_out/B, d_in/B], -1 = absent
    row_ptr: torch.Tensor  # int32 [d_out/B + 1] CSR row pointers into the sorted blocks
    csr_slots: torch.Tensor  # int32 [n] = arange(n)
    csr_cols: torch.Tensor  # int32 [n] column block of each block
    col_ptr: torch.Tensor  # int32 [d_in/B + 1] CSC column pointers
    csc_slots: torch.Tensor  # int32 [n] slots in column-major order
    csc_rows: torch.Tensor  # int32 [n] row block of each CSC entry
    chunk_ptr: torch.Tensor  # int32 [d_out/B + 1] SDD chunk offsets per row


def _grid_of(shape, block_size):
    return shape[0] // block_size, shape[1] // block_size


def _csr(block_indices, n_rb, n_cb):
    dev = block_indices.device
    bounds = torch.arange(n_rb + 1, device=dev, dtype=torch.int64) * n_cb
    row_ptr = torch.searchsorted(block_indices.long(), bounds).to(torch.int32)
    cols = (block_indices % n_cb).to(torch.int32)
    slots = torch.arange(block_indices.numel(), device=dev, dtype=torch.int32)
    return row_ptr, slots, cols


def _csc(block_indices, n_rb, n_cb):
    dev = block_indices.device
    bi = block_indices.long()
    rows, cols = bi // n_cb, bi % n_cb
    keys = cols * n_rb + rows
    keys_sorted, perm = torch.sort(keys)
    bounds = torch.arange(n_cb + 1, device=dev, dtype=torch.int64) * n_rb
    col_ptr = torch.searchsorted(keys_sorted, bounds).to(torch.int32)
    return col_ptr, perm.to(torch.int32), rows[perm].to(torch.int32)


def _chunks(row_ptr, kg):
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    per_row = (counts + kg - 1) // kg
    chunk_ptr = torch.zeros(row_ptr.numel(), dtype=torch.int64, device=row_ptr.device)
    chunk_ptr[1:] = torch.cumsum(per_row, 0)
    return chunk_ptr.to(torch.int32)


def _sdd_kg(block_size):
    return max(1, _SDD_COLS // block_size)


def build_block_layout(block_indices: torch.Tensor, shape, block_size: int = 16) -> BlockLayout:
    """Validate ``block_indices`` once and build every index structure the launchers use."""
    runtime.check_block_size(block_size)
    shape = (int(shape[0]), int(shape[1]))
    slot_map = build_block_slot_map(block_indices, shape, block_size)
    n_rb, n_cb = _grid_of(shape, block_size)
    row_ptr, csr_slots, csr_cols = _csr(block_indices, n_rb, n_cb)
    col_ptr, csc_slots, csc_rows = _csc(block_indices, n_rb, n_cb)
    return BlockLayout(
        shape, block_size, int(block_indices.numel()), block_indices, slot_map,
        row_ptr, csr_slots, csr_cols, col_ptr, csc_slots, csc_rows, _chunks(row_ptr, _sdd_kg(block_size)),
    )


# ======================================================================= validation


def _check_device(a, **tensors):
    runtime.check_same_device(a.device, **tensors)
    runtime.check_usable(a, "block-sparse")


def _check_blocks(blocks, block_indices, block_size=None):
    runtime.check_float(blocks, "blocks")
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
        raise ValueError(f"blocks must be [n, B, B], got shape {tuple(blocks.shape)}")
    bs = int(blocks.shape[-1])
    if block_size is not None and bs != block_size:
        raise ValueError(f"blocks are {bs}x{bs} but block_size={block_size}")
    runtime.check_block_size(bs)
    if not isinstance(block_indices, torch.Tensor) or block_indices.dtype != torch.int32:
        raise TypeError(f"block_indices must be an int32 tensor, got {getattr(block_indices, 'dtype', type(block_indices))}")
    if block_indices.dim() != 1 or block_indices.shape[0] != blocks.shape[0]:
        raise ValueError(
            f"block_indices must be 1-D with one id per block ({blocks.shape[0]}), got shape {tuple(block_indices.shape)}"
        )
    return bs


def _check_shape(shape, bs):
    if shape[0] % bs or shape[1] % bs:
        raise ValueError(f"weight shape {tuple(shape)} is not a multiple of the block size {bs}")


def _resolve(block_indices, shape, bs, slot_map, layout, need):
    """Index structures for this call: from ``layout``, else ``slot_map`` (trusted), else validated ids.

    ``need``: subset of {"slot_map", "csr", "csc", "chunks"}.
    """
    n_rb, n_cb = _grid_of(shape, bs)
    if layout is not None:
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout from build_block_layout, got {type(layout).__name__}")
        if tuple(layout.shape) != tuple(shape) or layout.block_size != bs or layout.n_blocks != block_indices.numel():
            raise ValueError(
                f"layout was built for shape {layout.shape}, block size {layout.block_size}, {layout.n_blocks} blocks; "
                f"got shape {tuple(shape)}, block size {bs}, {block_indices.numel()} blocks"
            )
        if layout.slot_map.device != block_indices.device:
            raise ValueError(f"layout is on {layout.slot_map.device} but block_indices are on {block_indices.device}")
        return {
            "slot_map": layout.slot_map,
            "csr": (layout.row_ptr, layout.csr_slots, layout.csr_cols),
            "csc": (layout.col_ptr, layout.csc_slots, layout.csc_rows),
            "chunks": layout.chunk_ptr,
        }
    if slot_map is not None:
        if not isinstance(slot_map, torch.Tensor) or slot_map.dtype != torch.int32:
            raise TypeError(f"slot_map must be an int32 tensor, got {getattr(slot_map, 'dtype', type(slot_map))}")
        if tuple(slot_map.shape) != (n_rb, n_cb):
            raise ValueError(f"slot_map must have shape {(n_rb, n_cb)} (the block grid), got {tuple(slot_map.shape)}")
        if slot_map.device != block_indices.device:
            raise ValueError(f"slot_map is on {slot_map.device} but block_indices are on {block_indices.device}")
    elif "slot_map" in need:
        slot_map = build_block_slot_map(block_indices, shape, bs)  # validates the ids (one host sync)
    else:
        validate_block_indices(block_indices, n_rb, n_cb)  # one host sync
    out = {"slot_map": slot_map}
    if "csr" in need or "chunks" in need:
        out["csr"] = _csr(block_indices, n_rb, n_cb)
        if "chunks" in need:
            out["chunks"] = _chunks(out["csr"][0], _sdd_kg(bs))
    if "csc" in need:
        out["csc"] = _csc(block_indices, n_rb, n_cb)
    return out


_MAX_ELEMENTS = 2**31 - 1  # kernel offsets are 32-bit


def _flat(t, name, last):
    if t.dim() < 1 or t.shape[-1] != last:
        raise ValueError(f"{name} must have last dimension {last}, got shape {tuple(t.shape)}")
    flat = t.reshape(-1, last)
    if (flat.shape[0] - 1) * abs(flat.stride(0)) + (last - 1) * abs(flat.stride(1)) >= _MAX_ELEMENTS:
        raise ValueError(f"{name} spans 2**31 elements or more; split the tokens into smaller batches")
    return flat


def _m_bucket(m):
    return min(runtime.pow2(m), 1 << 14)


def _bucket(n_blocks, n_lines):
    """Autotune key for the density: blocks per block row / column, rounded up to a power of two."""
    return runtime.pow2(-(-int(n_blocks) // max(1, int(n_lines))))


def _out_2d(out, m, p):
    """A 2-D view of ``out`` sharing its memory (the kernel writes through it)."""
    try:
        view = out.view(m, p)
    except RuntimeError as exc:  # strides that cannot be flattened without a copy
        raise ValueError("out must be viewable as [tokens, features] without a copy (e.g. contiguous)") from exc
    return _flat(view, "the output", p)


# ======================================================================== launchers


def _dsd(a, blocks, entries, n_out_blocks, bs, out, accumulate, transpose_blocks):
    """Shared launcher of the delta-only DSD products (y = xΔWᵀ and dX = dYΔW)."""
    m, k = a.shape
    ptr, slots, other = entries
    c = out
    if m == 0:
        return
    if blocks.shape[0] == 0:
        if not accumulate:
            c.zero_()
        return
    sb = blocks.stride()
    stride_bt, stride_bo = (sb[2], sb[1]) if transpose_blocks else (sb[1], sb[2])
    grid = lambda meta: (triton.cdiv(n_out_blocks, meta["COLS"]), triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    _dsd_kernel[grid](
        a, blocks, ptr, slots, other, c,
        m, _m_bucket(m), _bucket(blocks.shape[0], n_out_blocks), n_out_blocks,
        a.stride(0), a.stride(1), c.stride(0), c.stride(1),
        sb[0], stride_bt, stride_bo,
        B=bs, ACCUMULATE=bool(accumulate), IEEE=a.dtype == torch.float32, UPCAST=runtime.upcast_bf16(a.dtype),
    )


def _delta_product(name, a, blocks, block_indices, shape, out, accumulate, slot_map, layout, *, forward: bool):
    """Checks, index structures and launch shared by the two delta-only products: ``forward``
    y = x·ΔWᵀ over CSR rows (``a`` = x), else dX = dY·ΔW over CSC columns (``a`` = dY)."""
    runtime.check_float(a, name)
    bs = _check_blocks(blocks, block_indices)
    _check_shape(shape, bs)
    _check_device(a, blocks=blocks, block_indices=block_indices)
    structure = "csr" if forward else "csc"
    idx = _resolve(block_indices, shape, bs, slot_map, layout, {structure})
    d_a, d_c = (shape[1], shape[0]) if forward else (shape[0], shape[1])
    a2 = _flat(a, name, d_a)
    out_shape = (*a.shape[:-1], d_c)
    if out is None:
        out = torch.empty(out_shape, dtype=a.dtype, device=a.device)
        accumulate = False
    else:
        runtime.output(out, out_shape, a.dtype, a.device)
    c = _out_2d(out, a2.shape[0], d_c)
    _dsd(a2, blocks, idx[structure], d_c // bs, bs, c, accumulate, transpose_blocks=forward)
    return out


def block_delta_matmul(x, blocks, block_indices, d_out: int, out=None, *, accumulate: bool = True,
                       slot_map=None, layout=None):
    """y (+)= x·ΔWᵀ reading only the kept blocks. ``x [..., d_in]`` → ``[..., d_out]`` in x's dtype.

    ``out`` given: the product is added into it (``accumulate=False``: overwritten) and it is
    returned. Each block is cast to x's dtype before the product (like the reference).
    """
    d_in = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else 0
    return _delta_product("x", x, blocks, block_indices, (int(d_out), int(d_in)), out, accumulate, slot_map, layout,
                          forward=True)


def block_delta_grad_input(dy, blocks, block_indices, d_in: int, out=None, *, accumulate: bool = True,
                           slot_map=None, layout=None):
    """dX (+)= dY·ΔW reading only the kept blocks. ``dy [..., d_out]`` → ``[..., d_in]`` in dy's dtype."""
    d_out = dy.shape[-1] if isinstance(dy, torch.Tensor) and dy.dim() else 0
    return _delta_product("dy", dy, blocks, block_indices, (int(d_out), int(d_in)), out, accumulate, slot_map,
                          layout, forward=False)


def block_grad_blocks(dy, x, block_indices, block_size: int, *, out=None, accumulate: bool = False,
                      slot_map=None, layout=None):
    """fp32 ``[n, B, B]`` gradient of the blocks: (dYᵀX) at the kept tiles, computed only there (SDD).

    ``out`` given: written (``accumulate=True``: added) in place and returned.
    """
    runtime.check_float(dy, "dy")
    runtime.check_float(x, "x")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy and x must have the same dtype, got {dy.dtype} and {x.dtype}")
    runtime.check_block_size(block_size)
    if not isinstance(block_indices, torch.Tensor) or block_indices.dtype != torch.int32:
        raise TypeError(f"block_indices must be an int32 tensor, got {getattr(block_indices, 'dtype', type(block_indices))}")
    if block_indices.dim() != 1:
        raise ValueError(f"block_indices must be 1-D, got shape {tuple(block_indices.shape)}")
    if dy.dim() < 1 or x.dim() < 1 or dy.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"dy and x must share their leading (token) dims, got {tuple(dy.shape)} and {tuple(x.shape)}")
    shape = (int(dy.shape[-1]), int(x.shape[-1]))
    bs = block_size
    _check_shape(shape, bs)
    _check_device(x, dy=dy, block_indices=block_indices)
    n = block_indices.numel()
    idx = _resolve(block_indices, shape, bs, slot_map, layout, {"chunks"})
    if out is None:
        out = torch.empty((n, bs, bs), dtype=torch.float32, device=x.device)
        accumulate = False
    else:
        runtime.output(out, (n, bs, bs), torch.float32, x.device)
    dy2, x2 = _flat(dy, "dy", shape[0]), _flat(x, "x", shape[1])
    m = x2.shape[0]
    if n == 0:
        return out
    if m == 0:
        if not accumulate:
            out.zero_()
        return out
    n_rb = shape[0] // bs
    kg = _sdd_kg(bs)
    row_ptr, _, cols = idx["csr"]
    n_programs = triton.cdiv(n, kg) + min(n_rb, n)
    n_search = max(1, (n_rb - 1).bit_length())
    _sdd_kernel[(n_programs,)](
        dy2, x2, row_ptr, idx["chunks"], cols, out,
        m, _m_bucket(m), _bucket(n, n_rb), n_rb, n_search,
        dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        B=bs, KG=kg, ACCUMULATE=bool(accumulate), IEEE=x.dtype == torch.float32, UPCAST=runtime.upcast_bf16(x.dtype),
    )
    return out


def _fused(a2, weight, blocks, slot_map, bias, c, p_dim, q_dim, bs, grad_input):
    m = a2.shape[0]
    if m == 0:
        return
    sw, ss, sb = weight.stride(), slot_map.stride(), blocks.stride()
    if grad_input:  # C[m, k] = Σ_n dY[m, n] W_eff[n, k]: p = in (k), q = out (n)
        stride_wp, stride_wq, stride_sp, stride_sq, stride_bp, stride_bq = sw[1], sw[0], ss[1], ss[0], sb[2], sb[1]
    else:  # C[m, n] = Σ_k X[m, k] W_eff[n, k]: p = out (n), q = in (k)
        stride_wp, stride_wq, stride_sp, stride_sq, stride_bp, stride_bq = sw[0], sw[1], ss[0], ss[1], sb[1], sb[2]
    if blocks.numel() == 0:  # nothing is ever read through it (all slots are -1); keep a valid pointer
        blocks = torch.zeros((1, bs, bs), dtype=torch.float32, device=a2.device)
        sb = blocks.stride()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(p_dim, meta["BLOCK_P"]),)  # noqa: E731
    _fused_kernel[grid](
        a2, weight, blocks, slot_map, bias if bias is not None else a2, c,
        m, _m_bucket(m), p_dim, q_dim,
        a2.stride(0), a2.stride(1), stride_wp, stride_wq,
        stride_sp, stride_sq, sb[0], stride_bp, stride_bq,
        c.stride(0), c.stride(1),
        B=bs, HAS_BIAS=bias is not None, IEEE=a2.dtype == torch.float32, UPCAST=runtime.upcast_bf16(a2.dtype),
    )


def _check_weight(weight, bs):
    runtime.check_float(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [d_out, d_in], got shape {tuple(weight.shape)}")
    _check_shape(tuple(weight.shape), bs)


def block_delta_linear(x, weight, blocks, block_indices, bias=None, *, out=None, slot_map=None, layout=None):
    """y = x (W + ΔW)ᵀ + b in one GEMM: the kept blocks are added into the base-weight tiles.

    W + ΔW is formed in fp32 and cast to x's dtype before the product (as the reference);
    ``weight`` may be bf16/fp16/fp32. ``out`` given: overwritten and returned.
    """
    runtime.check_float(x, "x")
    bs = _check_blocks(blocks, block_indices)
    _check_weight(weight, bs)
    d_out, d_in = (int(s) for s in weight.shape)
    if bias is not None:
        runtime.check_float(bias, "bias")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        if tuple(bias.shape) != (d_out,):
            raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
    _check_device(x, weight=weight, blocks=blocks, block_indices=block_indices, bias=bias)
    x2 = _flat(x, "x", d_in)
    idx = _resolve(block_indices, (d_out, d_in), bs, slot_map, layout, {"slot_map"})
    out_shape = (*x.shape[:-1], d_out)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    else:
        runtime.output(out, out_shape, x.dtype, x.device)
    c = _out_2d(out, x2.shape[0], d_out)
    _fused(x2, weight, blocks, idx["slot_map"], bias, c, d_out, d_in, bs, grad_input=False)
    return out


def block_grad_input(dy, weight, blocks, block_indices, *, out=None, slot_map=None, layout=None):
    """dX = dY (W + ΔW) in one GEMM (W + ΔW formed in fp32, cast to dy's dtype). ``out``: overwritten."""
    runtime.check_float(dy, "dy")
    bs = _check_blocks(blocks, block_indices)
    _check_weight(weight, bs)
    d_out, d_in = (int(s) for s in weight.shape)
    _check_device(dy, weight=weight, blocks=blocks, block_indices=block_indices)
    dy2 = _flat(dy, "dy", d_out)
    idx = _resolve(block_indices, (d_out, d_in), bs, slot_map, layout, {"slot_map"})
    out_shape = (*dy.shape[:-1], d_in)
    if out is None:
        out = torch.empty(out_shape, dtype=dy.dtype, device=dy.device)
    else:
        runtime.output(out, out_shape, dy.dtype, dy.device)
    c = _out_2d(out, dy2.shape[0], d_in)
    _fused(dy2, weight, blocks, idx["slot_map"], None, c, d_in, d_out, bs, grad_input=True)
    return out
