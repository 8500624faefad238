"""Batched top-k mask selection over many layers: sample-bracketed radix select.

Public launchers (same results as their twins in ``sparse_engine/kernels/reference.py``, bit for bit):
``topk_per_layer(scores, ks)``, ``topk_global(scores, k)`` (one threshold over all layers) and
``topk_from_delta_grad(deltas, grads, score, ...)`` (the score computed on the fly from Ŵ and G,
per element or per ``B×B`` tile). Each returns, per layer, the int32 sorted flat indices of the
kept entries (with ``return_stats=True`` also the :class:`SelectStats` of the paths taken);
``kept_masks`` turns them into bool masks. The selection rule (ties, ±0, NaN), the 32-bit keys,
the passes and their scratch memory: docs/kernels.md, section "Batched top-k".
"""
from __future__ import annotations

import operator
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from . import runtime
from .reference import kept_masks  # noqa: F401 - part of this module's API (shared with the twin)

runtime.require_triton(__name__)

import triton  # after the check that names the fix
import triton.language as tl

__all__ = ["TopkConfig", "DEFAULT_CONFIG", "SelectStats", "Selection", "with_config", "topk_per_layer",
           "topk_global", "topk_from_delta_grad", "delta_grad_tile_scores", "kept_masks", "jit_kernels"]

_KIND = {"identity": 0, "mcs": 1, "snip": 2, "gm": 3, "wm": 4}
_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ALL_ONES = 0xFFFFFFFF

# The packed int64 tables the passes share, field by field. constexpr globals are the only
# globals a jit function may read, so the kernels and the host code use the same names (the
# host reads ``.value`` where torch indexes a column).
# per layer [L, _NF]: element offsets into the a / b inputs, units, first block, blocks, first
# sample chunk, sample span, group, first tile-score output, columns, tile columns
(_F_AOFF, _F_BOFF, _F_N, _F_BLK, _F_NBLK, _F_CHK, _F_SPAN, _F_GROUP, _F_TOUT, _F_NCOL,
 _F_NBC) = (tl.constexpr(i) for i in range(11))
_NF = tl.constexpr(11)
# per group [G, _GF]: bracket ends, candidate capacity and first slot, active flag, threshold
# key, tie quota, mode (1: threshold from the candidates)
_G_LO, _G_HI, _G_CAP, _G_CBASE, _G_ACTIVE, _G_T, _G_QUOTA, _G_MODE = (tl.constexpr(i) for i in range(8))
_GF = tl.constexpr(8)
# per radix target [rows, _TF]: prefix value, prefix mask, remaining rank, bottom flag
_T_VAL, _T_MASK, _T_NEED, _T_BOTTOM = (tl.constexpr(i) for i in range(4))
_TF = tl.constexpr(4)
# per group counts of the bracket pass [G, _CF]: valid keys, keys above, keys inside, candidates
_C_VALID, _C_ABOVE, _C_IN, _C_FILL = (tl.constexpr(i) for i in range(4))
_CF = tl.constexpr(4)
# per group key segment of a buffer [G, _SF]: first key, number of keys
_S_START, _S_LEN = (tl.constexpr(i) for i in range(2))
_SF = tl.constexpr(2)
# per layer [L, _LF]: totals of the count pass (keys above T, ties at T), and the output of
# the scan pass (first output slot, entries selected)
_L_GT, _L_EQ = (tl.constexpr(i) for i in range(2))
_L_START, _L_COUNT = (tl.constexpr(i) for i in range(2))
_LF = tl.constexpr(2)
_NB = tl.constexpr(256)  # radix bins: 8-bit digits
_SHIFTS = (24, 16, 8, 0)
_SHIFTS16 = (24, 16)  # 16-bit keys live in the top half: two digits


@dataclass(frozen=True)
class TopkConfig:
    """Tunables of the selection (defaults aim at H100/H200; tests shrink them)."""

    block: int = 4096  # units per block of the bracket / write passes (power of 2)
    sample_chunk: int = 64  # consecutive units per sample chunk (power of 2)
    chunks_per_program: int = 32  # sample chunks per program (power of 2)
    sample_every: int = 128  # one unit in `sample_every` is sampled (4-byte inputs)...
    min_sample: int = 1 << 12  # ...and at least this many per group (see _sample_plan)
    full_sample_max: int = 1 << 18  # groups/layers this small are sampled whole (exact)
    cap_frac: float = 0.011  # candidate capacity, fraction of units (for 4-byte inputs)
    cap_slack: int = 256  # plus this many candidates per group
    margin_sd: float = 4.5  # bracket half-width in binomial standard deviations
    margin_frac: float = 0.0005  # plus this fraction of the sample
    single_read: bool = True  # 32-bit keys: write pass from the bracket pass's bits (no second read)
    buf_chunk: int = 4096  # keys per program in buffer histograms
    scan_chunk: int = 1024
    run_chunk: int = 256
    tiles_per_program: int = 16  # block mode: tiles per program of the tile-score pass
    num_warps: int = 8


DEFAULT_CONFIG = TopkConfig()


@triton.jit
def _load(ptr, offs, mask, other, MASKED: tl.constexpr):
    # MASKED=False for blocks known to lie inside their layer: a mask that depends on the
    # layer's size (a runtime value) would keep the loads from vectorising
    if MASKED:
        v = tl.load(ptr + offs, mask=mask, other=other)
    else:
        v = tl.load(ptr + offs)
    return v


@triton.jit
def _load_f32(ptr, offs, mask, DT: tl.constexpr, MASKED: tl.constexpr):
    if DT == 2:  # bf16 passed as an int16 view: widen exactly by a bit shift
        raw = _load(ptr, offs, mask, 0, MASKED)
        bits = raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        val = bits.to(tl.float32, bitcast=True)
    else:
        val = _load(ptr, offs, mask, 0.0, MASKED).to(tl.float32)
    return val


@triton.jit
def _score(a_ptr, b_ptr, a_offs, b_offs, mask, KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr,
           MASKED: tl.constexpr = True):
    if KIND == 0:
        s = _load_f32(a_ptr, a_offs, mask, ADT, MASKED)
    elif KIND == 1:
        s = _load_f32(a_ptr, a_offs, mask, ADT, MASKED) * _load_f32(b_ptr, b_offs, mask, BDT, MASKED)
    elif KIND == 2:
        s = tl.abs(_load_f32(a_ptr, a_offs, mask, ADT, MASKED) * _load_f32(b_ptr, b_offs, mask, BDT, MASKED))
    elif KIND == 3:
        s = tl.abs(_load_f32(b_ptr, b_offs, mask, BDT, MASKED))
    else:
        s = tl.abs(_load_f32(a_ptr, a_offs, mask, ADT, MASKED))
    return s


@triton.jit
def _to_key(s, mask):
    """Order-preserving uint32 key of fp32 ``s``; NaN and masked lanes get key 0."""
    bits = s.to(tl.uint32, bitcast=True)
    bits = tl.where(s == 0.0, tl.zeros_like(bits), bits)  # -0.0 -> +0.0
    neg = (bits & 0x80000000) != 0
    # xor with an explicit all-ones constant, not `~`: triton 3.6's interpreter lowers `~` on
    # unsigned tensors to `^ -1`, which numpy 2 refuses for uint32
    key = tl.where(neg, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    valid = mask & (s == s)
    key = tl.where(valid, key, tl.zeros_like(key))
    return key, valid


@triton.jit
def _unit_keys(a_ptr, b_ptr, a_offs, b_offs, mask, KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr,
               K16: tl.constexpr, MASKED: tl.constexpr = True):
    """Keys of the units at the offsets. K16 (fp16/bf16 scores): the input's own 16-bit order
    key in the top half (same order and ties as comparing the values in fp32)."""
    if K16:
        if ADT == 2:  # bf16 as int16
            raw = _load(a_ptr, a_offs, mask, 0, MASKED)
            b = raw.to(tl.uint16, bitcast=True).to(tl.uint32)
            val = (b << 16).to(tl.float32, bitcast=True)
        else:  # fp16
            h = _load(a_ptr, a_offs, mask, 0.0, MASKED)
            b = h.to(tl.int16, bitcast=True).to(tl.uint16, bitcast=True).to(tl.uint32)
            val = h.to(tl.float32)
        b = tl.where(val == 0.0, tl.zeros_like(b), b)  # -0.0 -> +0.0
        neg = (b & 0x8000) != 0
        k16 = tl.where(neg, b ^ 0xFFFF, b | 0x8000)  # b < 2**16: flips the 16 bits
        valid = mask & (val == val)
        key = tl.where(valid, k16 << 16, tl.zeros_like(k16))
    else:
        s = _score(a_ptr, b_ptr, a_offs, b_offs, mask, KIND, ADT, BDT, MASKED)
        key, valid = _to_key(s, mask)
    return key, valid


@triton.jit
def _buf_load(ptr, offs, mask, K16: tl.constexpr):
    """A key from a compact buffer (int32, or int16 holding the top half when K16)."""
    raw = tl.load(ptr + offs, mask=mask, other=0)
    if K16:
        key = raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    else:
        key = raw.to(tl.uint32, bitcast=True)
    return key


@triton.jit
def _buf_val(key, K16: tl.constexpr):
    if K16:
        v = (key >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        v = key.to(tl.int32, bitcast=True)
    return v


@triton.jit
def _find_layer(meta_ptr, field, L, pid, MAXL: tl.constexpr):
    ar = tl.arange(0, MAXL)
    starts = tl.load(meta_ptr + ar * _NF + field, mask=ar < L, other=1 << 62)
    return tl.sum((starts <= pid).to(tl.int32), axis=0) - 1


@triton.jit
def _block_keys(a_ptr, b_ptr, meta_ptr, l, pid, BLOCK: tl.constexpr,
                KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr, K16: tl.constexpr,
                AAL: tl.constexpr, BAL: tl.constexpr):
    n = tl.load(meta_ptr + l * _NF + _F_N)
    j = pid - tl.load(meta_ptr + l * _NF + _F_BLK)
    idx = j * BLOCK + tl.arange(0, BLOCK)
    m = idx < n
    # AAL / BAL: a power of two dividing every layer's element offset (the launcher checks);
    # the hint lets the loads of a block vectorise to 16 bytes, as the offsets come from a table
    aoff = tl.multiple_of(tl.load(meta_ptr + l * _NF + _F_AOFF), AAL)
    boff = tl.multiple_of(tl.load(meta_ptr + l * _NF + _F_BOFF), BAL)
    if (j + 1) * BLOCK <= n:
        key, valid = _unit_keys(a_ptr, b_ptr, aoff + idx, boff + idx, m, KIND, ADT, BDT, K16, False)
    else:  # the layer's last, partial block
        key, valid = _unit_keys(a_ptr, b_ptr, aoff + idx, boff + idx, m, KIND, ADT, BDT, K16, True)
    return idx, key, valid


@triton.jit
def _sample_kernel(a_ptr, b_ptr, meta_ptr, L, n_chunks, keys_ptr,
                   SC: tl.constexpr, CPP: tl.constexpr, MAXL: tl.constexpr,
                   KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr, K16: tl.constexpr,
                   AAL: tl.constexpr, BAL: tl.constexpr):
    pid = tl.program_id(0)
    cid = pid * CPP + tl.arange(0, CPP)
    cm = cid < n_chunks
    ar = tl.arange(0, MAXL)
    starts = tl.load(meta_ptr + ar * _NF + _F_CHK, mask=ar < L, other=1 << 62)
    lay = tl.sum((starts[None, :] <= cid[:, None]).to(tl.int32), axis=1) - 1
    n = tl.load(meta_ptr + lay * _NF + _F_N)
    c = cid - tl.load(meta_ptr + lay * _NF + _F_CHK)
    span = tl.load(meta_ptr + lay * _NF + _F_SPAN)
    slack = tl.maximum(span - SC, 0)
    hashed = (c * 2654435761) & 0xFFFFFFFF
    jitter = tl.where(slack > 0, hashed % (slack + 1), 0)
    pos = c * span + jitter
    u = pos[:, None] + tl.arange(0, SC)[None, :]
    m = cm[:, None] & (u < n[:, None])
    aoff = tl.load(meta_ptr + lay * _NF + _F_AOFF)
    boff = tl.load(meta_ptr + lay * _NF + _F_BOFF)
    key, valid = _unit_keys(a_ptr, b_ptr, aoff[:, None] + u, boff[:, None] + u, m, KIND, ADT, BDT, K16)
    out = cid.to(tl.int64)[:, None] * SC + tl.arange(0, SC)[None, :]
    tl.store(keys_ptr + out, _buf_val(key, K16), mask=cm[:, None])


@triton.jit
def _buf_hist_kernel(keys_ptr, seg_ptr, ts_ptr, hist_ptr, NT: tl.constexpr, SHIFT: tl.constexpr,
                     CH: tl.constexpr, K16: tl.constexpr):
    c = tl.program_id(0)
    g = tl.program_id(1)
    start = tl.load(seg_ptr + g * _SF + _S_START)
    n = tl.load(seg_ptr + g * _SF + _S_LEN)
    base = c.to(tl.int64) * CH
    if base < n:
        ar = tl.arange(0, CH)
        m = (base + ar) < n
        key = _buf_load(keys_ptr, start + base + ar, m, K16)
        valid = m & (key != 0)
        digit = ((key >> SHIFT) & (_NB - 1)).to(tl.int32)
        bins = tl.arange(0, _NB)
        for t in tl.static_range(NT):
            row = g * NT + t
            pv = tl.load(ts_ptr + row * _TF + _T_VAL).to(tl.uint32)
            pm = tl.load(ts_ptr + row * _TF + _T_MASK).to(tl.uint32)
            match = valid & ((key & pm) == pv)
            h = tl.histogram(tl.where(match, digit, 0), _NB)
            # unmatched lanes were counted in bin 0: take them out (no mask argument needed)
            n_off = CH - tl.sum(match.to(tl.int32), axis=0)
            h = h - tl.where(bins == 0, n_off, 0)
            tl.atomic_add(hist_ptr + row * _NB + bins, h, mask=h > 0, sem="relaxed")


@triton.jit
def _full_hist_kernel(a_ptr, b_ptr, meta_ptr, L, gs_ptr, ts_ptr, hist_ptr,
                      SHIFT: tl.constexpr, BLOCK: tl.constexpr, MAXL: tl.constexpr,
                      KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr, K16: tl.constexpr,
                      AAL: tl.constexpr, BAL: tl.constexpr):
    pid = tl.program_id(0)
    lay = _find_layer(meta_ptr, _F_BLK, L, pid, MAXL)
    g = tl.load(meta_ptr + lay * _NF + _F_GROUP)
    if tl.load(gs_ptr + g * _GF + _G_ACTIVE) != 0:
        idx, key, valid = _block_keys(a_ptr, b_ptr, meta_ptr, lay, pid, BLOCK, KIND, ADT, BDT, K16, AAL, BAL)
        pv = tl.load(ts_ptr + g * _TF + _T_VAL).to(tl.uint32)
        pm = tl.load(ts_ptr + g * _TF + _T_MASK).to(tl.uint32)
        match = valid & ((key & pm) == pv)
        digit = ((key >> SHIFT) & (_NB - 1)).to(tl.int32)
        h = tl.histogram(tl.where(match, digit, 0), _NB)
        bins = tl.arange(0, _NB)
        n_off = BLOCK - tl.sum(match.to(tl.int32), axis=0)
        h = h - tl.where(bins == 0, n_off, 0)
        tl.atomic_add(hist_ptr + g * _NB + bins, h, mask=h > 0, sem="relaxed")


@triton.jit
def _select_kernel(hist_ptr, ts_ptr, SHIFT: tl.constexpr,
                   FIRST: tl.constexpr, LAST: tl.constexpr):
    """One radix digit: the bin holding the `need`-th largest matching key."""
    t = tl.program_id(0)
    bins = tl.arange(0, _NB)
    h = tl.load(hist_ptr + t * _NB + bins).to(tl.int64)
    tl.store(hist_ptr + t * _NB + bins, tl.zeros([_NB], dtype=tl.int32))  # ready for the next digit
    total = tl.sum(h, axis=0)
    need = tl.load(ts_ptr + t * _TF + _T_NEED)
    if FIRST:
        tl.store(ts_ptr + t * _TF + _T_BOTTOM, (need > total).to(tl.int64))
    need = tl.minimum(tl.maximum(need, 0), total)
    suffix = total - tl.cumsum(h, axis=0) + h  # keys in bins >= b
    b = tl.sum((suffix >= need).to(tl.int32), axis=0) - 1
    above = tl.sum(tl.where(bins == b, suffix - h, 0), axis=0)
    need = need - above
    val = tl.load(ts_ptr + t * _TF + _T_VAL) | (b.to(tl.int64) << SHIFT)
    pmask = tl.load(ts_ptr + t * _TF + _T_MASK) | (tl.full([], _NB - 1, tl.int64) << SHIFT)
    if LAST:
        # a rank below every valid key: the bracket end is the bottom (all valid keys)
        val = tl.where(tl.load(ts_ptr + t * _TF + _T_BOTTOM) != 0, 1, val)
    tl.store(ts_ptr + t * _TF + _T_VAL, val)
    tl.store(ts_ptr + t * _TF + _T_MASK, pmask)
    tl.store(ts_ptr + t * _TF + _T_NEED, need)


@triton.jit
def _bracket_kernel(a_ptr, b_ptr, meta_ptr, L, gs_ptr, gc_ptr, blk_gt_ptr, blk_cnt_ptr, blk_run_ptr, cand_ptr,
                    blk_nin_ptr, cpos_ptr, bits_ptr,
                    BLOCK: tl.constexpr, MAXL: tl.constexpr, BITS: tl.constexpr,
                    KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr, K16: tl.constexpr,
                    AAL: tl.constexpr, BAL: tl.constexpr):
    pid = tl.program_id(0)
    lay = _find_layer(meta_ptr, _F_BLK, L, pid, MAXL)
    g = tl.load(meta_ptr + lay * _NF + _F_GROUP)
    if tl.load(gs_ptr + g * _GF + _G_ACTIVE) != 0:
        idx, key, valid = _block_keys(a_ptr, b_ptr, meta_ptr, lay, pid, BLOCK, KIND, ADT, BDT, K16, AAL, BAL)
        lo = tl.load(gs_ptr + g * _GF + _G_LO).to(tl.uint32)
        hi = tl.load(gs_ptr + g * _GF + _G_HI).to(tl.uint32)
        above = valid & (key > hi)
        inb = valid & (key >= lo) & (key <= hi)
        n_above = tl.sum(above.to(tl.int32), axis=0)
        n_in = tl.sum(inb.to(tl.int32), axis=0)
        n_valid = tl.sum(valid.to(tl.int32), axis=0)
        tl.store(blk_gt_ptr + pid, n_above)
        tl.store(blk_cnt_ptr + pid, n_in)
        if BITS:
            # key > hi as one bit per unit (32 units per word), and the run length kept
            # apart from blk_cnt (which the count pass overwrites with tie counts)
            # a sum of distinct powers of two is their or; uint32 so that bit 31 cannot overflow
            # (and a plain sum, not xor_sum, which the interpreter runs one element at a time)
            shifts = tl.arange(0, 32).to(tl.uint32)[None, :]
            words = tl.sum(tl.reshape(above.to(tl.uint32), (BLOCK // 32, 32)) << shifts, axis=1)
            tl.store(bits_ptr + pid.to(tl.int64) * (BLOCK // 32) + tl.arange(0, BLOCK // 32),
                     words.to(tl.int32, bitcast=True))
            tl.store(blk_nin_ptr + pid, n_in)
        tl.atomic_add(gc_ptr + g * _CF + _C_VALID, n_valid.to(tl.int64), sem="relaxed")
        tl.atomic_add(gc_ptr + g * _CF + _C_ABOVE, n_above.to(tl.int64), sem="relaxed")
        tl.atomic_add(gc_ptr + g * _CF + _C_IN, n_in.to(tl.int64), sem="relaxed")
        if (lo < hi) & (n_in > 0):
            start = tl.atomic_add(gc_ptr + g * _CF + _C_FILL, n_in.to(tl.int64), sem="relaxed")
            tl.store(blk_run_ptr + pid, start.to(tl.int32))
            if start + n_in <= tl.load(gs_ptr + g * _GF + _G_CAP):
                rank = tl.cumsum(inb.to(tl.int32), axis=0) - 1
                dst = tl.load(gs_ptr + g * _GF + _G_CBASE) + start + rank
                tl.store(cand_ptr + dst, _buf_val(key, K16), mask=inb)
                if BITS:  # in-block position of each candidate (BLOCK <= 32768)
                    tl.store(cpos_ptr + dst, tl.arange(0, BLOCK).to(tl.int16), mask=inb)


@triton.jit
def _count_kernel(meta_ptr, L, gs_ptr, blk_gt_ptr, blk_cnt_ptr, blk_run_ptr, cand_ptr, ltot_ptr,
                  RUNCH: tl.constexpr, MAXL: tl.constexpr,
                  K16: tl.constexpr):
    pid = tl.program_id(0)
    lay = _find_layer(meta_ptr, _F_BLK, L, pid, MAXL)
    g = tl.load(meta_ptr + lay * _NF + _F_GROUP)
    n_gt = tl.load(blk_gt_ptr + pid)
    n_eq = tl.load(blk_cnt_ptr + pid)
    if (tl.load(gs_ptr + g * _GF + _G_MODE) == 1) & (n_eq > 0):
        thr = tl.load(gs_ptr + g * _GF + _G_T).to(tl.uint32)
        base = tl.load(gs_ptr + g * _GF + _G_CBASE) + tl.load(blk_run_ptr + pid)
        c_gt = n_gt * 0
        c_eq = n_gt * 0
        for s in range(0, n_eq, RUNCH):
            ar = s + tl.arange(0, RUNCH)
            mm = ar < n_eq
            key = _buf_load(cand_ptr, base + ar, mm, K16)
            c_gt += tl.sum((mm & (key > thr)).to(tl.int32), axis=0)
            c_eq += tl.sum((mm & (key == thr)).to(tl.int32), axis=0)
        n_gt = n_gt + c_gt
        n_eq = c_eq
        tl.store(blk_gt_ptr + pid, n_gt)
        tl.store(blk_cnt_ptr + pid, n_eq)
    tl.atomic_add(ltot_ptr + lay * _LF + _L_GT, n_gt.to(tl.int64), sem="relaxed")
    tl.atomic_add(ltot_ptr + lay * _LF + _L_EQ, n_eq.to(tl.int64), sem="relaxed")


@triton.jit
def _scan_kernel(meta_ptr, L, gs_ptr, ltot_ptr, blk_gt_ptr, blk_cnt_ptr, blk_take_ptr, blk_off_ptr, lout_ptr,
                 GLOBAL: tl.constexpr, CH: tl.constexpr, MAXL: tl.constexpr):
    lay = tl.program_id(0)
    ar = tl.arange(0, MAXL)
    lm = ar < L
    lgt = tl.load(ltot_ptr + ar * _LF + _L_GT, mask=lm, other=0)
    leq = tl.load(ltot_ptr + ar * _LF + _L_EQ, mask=lm, other=0)
    if GLOBAL:
        tb = tl.cumsum(leq, axis=0) - leq  # ties in earlier layers
        qeff = tl.load(gs_ptr + _G_QUOTA) - tb
    else:
        qeff = tl.load(gs_ptr + ar * _GF + _G_QUOTA, mask=lm, other=0)
    taken = tl.minimum(tl.maximum(qeff, 0), leq)
    sel = lgt + taken
    start = tl.cumsum(sel, axis=0) - sel
    my_q = tl.sum(tl.where(ar == lay, qeff, 0), axis=0)
    carry_s = tl.sum(tl.where(ar == lay, start, 0), axis=0)
    tl.store(lout_ptr + lay * _LF + _L_START, carry_s)
    tl.store(lout_ptr + lay * _LF + _L_COUNT, tl.sum(tl.where(ar == lay, sel, 0), axis=0))
    b0 = tl.load(meta_ptr + lay * _NF + _F_BLK)
    nb = tl.load(meta_ptr + lay * _NF + _F_NBLK)
    carry_e = my_q * 0
    for c in range(0, nb, CH):
        i = c + tl.arange(0, CH)
        mm = i < nb
        eq = tl.load(blk_cnt_ptr + b0 + i, mask=mm, other=0).to(tl.int64)
        gt = tl.load(blk_gt_ptr + b0 + i, mask=mm, other=0).to(tl.int64)
        e_before = carry_e + tl.cumsum(eq, axis=0) - eq
        take = tl.minimum(tl.maximum(my_q - e_before, 0), eq)
        s = gt + take
        off = carry_s + tl.cumsum(s, axis=0) - s
        tl.store(blk_take_ptr + b0 + i, take.to(tl.int32), mask=mm)
        tl.store(blk_off_ptr + b0 + i, off.to(tl.int32), mask=mm)
        carry_e += tl.sum(eq, axis=0)
        carry_s += tl.sum(s, axis=0)


@triton.jit
def _write_kernel(a_ptr, b_ptr, meta_ptr, L, gs_ptr, blk_gt_ptr, blk_take_ptr, blk_off_ptr, out_ptr,
                  blk_run_ptr, blk_nin_ptr, cand_ptr, cpos_ptr, bits_ptr,
                  BLOCK: tl.constexpr, MAXL: tl.constexpr,
                  BITS: tl.constexpr,
                  KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr, K16: tl.constexpr,
                  AAL: tl.constexpr, BAL: tl.constexpr):
    pid = tl.program_id(0)
    take = tl.load(blk_take_ptr + pid)
    if tl.load(blk_gt_ptr + pid) + take > 0:
        lay = _find_layer(meta_ptr, _F_BLK, L, pid, MAXL)
        g = tl.load(meta_ptr + lay * _NF + _F_GROUP)
        thr = tl.load(gs_ptr + g * _GF + _G_T).to(tl.uint32)
        # BITS (0 or 1): this launch has the bracket pass's bits; mode 1: the group's threshold
        # came from its candidates, so all its in-bracket units are in candidate runs
        if tl.load(gs_ptr + g * _GF + _G_MODE) * BITS == 1:
            # the input is not read again: units above the bracket come from the bracket
            # pass's bits, the rest of the selection from this block's candidate run
            W: tl.constexpr = BLOCK // 32
            CH: tl.constexpr = 64  # candidates per step: a [W, CH] compare, ~1% of a block per step
            wi = tl.arange(0, W)
            words = tl.load(bits_ptr + pid.to(tl.int64) * W + wi).to(tl.uint32, bitcast=True)
            base = tl.load(gs_ptr + g * _GF + _G_CBASE) + tl.load(blk_run_ptr + pid)
            n_in = tl.load(blk_nin_ptr + pid)
            ties_before = n_in * 0
            for s in range(0, n_in, CH):
                ar = s + tl.arange(0, CH)
                mm = ar < n_in
                ckey = _buf_load(cand_ptr, base + ar, mm, K16)
                cpos = tl.load(cpos_ptr + base + ar, mask=mm, other=0).to(tl.int32)
                ceq = (mm & (ckey == thr)).to(tl.int32)
                trank = ties_before + tl.cumsum(ceq, axis=0) - ceq
                csel = mm & ((ckey > thr) | ((ceq != 0) & (trank < take)))
                cbit = tl.where(csel, tl.full([CH], 1, tl.uint32) << (cpos & 31).to(tl.uint32), 0)
                # distinct bits, none set yet (candidates are not above the bracket): sum == or
                words += tl.sum(tl.where((cpos >> 5)[None, :] == wi[:, None], cbit[None, :], 0), axis=1)
                ties_before += tl.sum(ceq, axis=0)
            flags = tl.reshape(((words[:, None] >> tl.arange(0, 32).to(tl.uint32)[None, :]) & 1).to(tl.int32),
                               (BLOCK,))
            n = tl.load(meta_ptr + lay * _NF + _F_N)
            j = pid - tl.load(meta_ptr + lay * _NF + _F_BLK)
            idx = j * BLOCK + tl.arange(0, BLOCK)
            pos = tl.load(blk_off_ptr + pid) + tl.cumsum(flags, axis=0) - 1
            tl.store(out_ptr + pos, idx.to(tl.int32), mask=(flags != 0) & (idx < n))
        else:
            idx, key, valid = _block_keys(a_ptr, b_ptr, meta_ptr, lay, pid, BLOCK, KIND, ADT, BDT, K16,
                                          AAL, BAL)
            eqm = (valid & (key == thr)).to(tl.int32)
            tie_rank = tl.cumsum(eqm, axis=0) - eqm
            sel = (valid & (key > thr)) | ((eqm != 0) & (tie_rank < take))
            sel_i = sel.to(tl.int32)
            pos = tl.load(blk_off_ptr + pid) + tl.cumsum(sel_i, axis=0) - 1
            tl.store(out_ptr + pos, idx.to(tl.int32), mask=sel)


@triton.jit
def _tile_kernel(a_ptr, b_ptr, meta_ptr, L, out_ptr,
                 TT: tl.constexpr, BS: tl.constexpr, BP: tl.constexpr, MAXL: tl.constexpr,
                 KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr, AAL: tl.constexpr, BAL: tl.constexpr):
    """Per-tile sums of the on-the-fly score: TT tiles (flat tile ids) per program."""
    pid = tl.program_id(0)
    lay = _find_layer(meta_ptr, _F_BLK, L, pid, MAXL)
    n_tiles = tl.load(meta_ptr + lay * _NF + _F_N)
    j = pid - tl.load(meta_ptr + lay * _NF + _F_BLK)
    t = j * TT + tl.arange(0, TT)
    tm = t < n_tiles
    ncol = tl.multiple_of(tl.load(meta_ptr + lay * _NF + _F_NCOL), BS)  # block mode: d_in % BS == 0
    nbc = tl.load(meta_ptr + lay * _NF + _F_NBC)
    rb = t // nbc
    cb = t % nbc
    r = tl.arange(0, BP)
    c = tl.arange(0, BP)
    rows = rb[:, None, None] * BS + r[None, :, None]
    cols = cb[:, None, None] * BS + c[None, None, :]
    m = tm[:, None, None] & (r < BS)[None, :, None] & (c < BS)[None, None, :]
    offs = rows * ncol + cols
    aoff = tl.multiple_of(tl.load(meta_ptr + lay * _NF + _F_AOFF), AAL)
    boff = tl.multiple_of(tl.load(meta_ptr + lay * _NF + _F_BOFF), BAL)
    s = _score(a_ptr, b_ptr, aoff + offs, boff + offs, m, KIND, ADT, BDT)
    s = tl.where(m, s, 0.0)
    tsum = tl.sum(tl.sum(s, axis=2), axis=1)
    tl.store(out_ptr + tl.load(meta_ptr + lay * _NF + _F_TOUT) + t, tsum, mask=tm)


def jit_kernels() -> dict:
    """The jit kernels of the passes by name, for compile checks without a GPU. They take the
    launch's ``MAXL`` (``max(2, runtime.pow2(layers))``) and the :class:`TopkConfig` fields as
    constexprs; no autotuning."""
    return {"sample": _sample_kernel, "buf_hist": _buf_hist_kernel, "full_hist": _full_hist_kernel,
            "select": _select_kernel, "bracket": _bracket_kernel, "count": _count_kernel, "scan": _scan_kernel,
            "write": _write_kernel, "tile": _tile_kernel}


# ------------------------------------------------------------------------------ host side


@dataclass(frozen=True)
class SelectStats:
    """Which paths one selection took (tests assert them, benchmarks record them). Groups:
    one per layer, or one for all layers in global mode."""

    groups: int
    blocks: int  # blocks of the bracket and write passes
    sampled_units: int  # units the sample pass read (0 when every group is trivial)
    trivial: int  # groups with k = 0 or k = every unit: no selection to run
    exact_bracket: int  # groups whose k-th key the bracket pinned down (no radix select)
    candidates: int  # groups whose threshold came from the candidate radix select...
    candidate_keys: int  # ...over this many compacted keys
    fallback: int  # groups that took the full-input radix select (bracket missed, or overflow)
    recount: int  # groups that needed the counting pass after their threshold
    single_read: int  # candidate groups whose write pass used the bracket pass's bits
    offset_alignment: int  # the tl.multiple_of hint of the layer offsets (16: vector loads)


class Selection(NamedTuple):
    """What a launcher returns with ``return_stats=True``."""

    indices: list[torch.Tensor]
    stats: SelectStats


def _to_dev(t: torch.Tensor, device) -> torch.Tensor:
    """Host table to the device without a stream sync (pinned, non-blocking: the caching host
    allocator keeps the pinned block until the copy has run)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _common_dtype(tensors) -> torch.dtype:
    dts = {t.dtype for t in tensors}
    return dts.pop() if len(dts) == 1 else torch.float32


def _prep(tensors, dtype):
    """Contiguous tensors of one dtype, as the kernel will read them (bf16 as int16 views)."""
    out = []
    for t in tensors:
        t = t.detach()
        if t.dtype != dtype:
            t = t.to(dtype)  # mixed lists are widened (exact) to fp32
        t = t.contiguous().reshape(-1)
        out.append(t.view(torch.int16) if dtype == torch.bfloat16 else t)
    return out


def _elem_offsets(base: torch.Tensor, tensors) -> list[int]:
    es = base.element_size()
    offs = []
    for t in tensors:
        diff = t.data_ptr() - base.data_ptr()
        if diff % es:
            raise ValueError("tensor storage is not aligned to its element size")
        offs.append(diff // es)
    return offs


def _check_device(tensors, what: str) -> None:
    """One device for every tensor, and one the kernels run on."""
    runtime.check_same_device(tensors[0].device, **{f"{what}[{i}]": t for i, t in enumerate(tensors)})
    runtime.check_usable(tensors[0], "top-k")


class _Source:
    """What the kernels read: one or two flat tensor lists and how to score them."""

    def __init__(self, a_list, b_list, kind: int, dtype_a, dtype_b, bytes_per_unit: int):
        self.a_list, self.b_list = a_list, b_list
        self.kind = kind
        self.adt, self.bdt = _DT[dtype_a], _DT[dtype_b]
        self.bytes_per_unit = bytes_per_unit
        # fp16/bf16 scores select on their own 16-bit keys: half-size buffers, two radix digits
        self.k16 = kind == _KIND["identity"] and dtype_a in (torch.float16, torch.bfloat16)
        self.key_bytes = 2 if self.k16 else 4
        self.shifts = _SHIFTS16 if self.k16 else _SHIFTS
        # base pointers: a non-empty tensor (an empty one may have a null data pointer)
        self.a_base = next((t for t in a_list if t.numel()), a_list[0])
        self.b_base = next((t for t in b_list if t.numel()), b_list[0])
        self.a_offs = _elem_offsets(self.a_base, a_list)
        self.b_offs = _elem_offsets(self.b_base, b_list)
        self.a_align = runtime.offset_alignment(self.a_offs)
        self.b_align = runtime.offset_alignment(self.b_offs)

    def constexprs(self) -> dict:
        """What the kernels that read the inputs specialise on."""
        return dict(KIND=self.kind, ADT=self.adt, BDT=self.bdt, K16=self.k16, AAL=self.a_align, BAL=self.b_align)


# ---------------------------------------------------------------- the selection, pass by pass


@dataclass
class _Plan:
    """Host tables of one selection: the sampling plan per layer, ranks and capacity per group."""

    global_mode: bool
    sizes: list[int]  # units per layer
    group_of: list[int]  # group of each layer
    gk: list[int]  # units to keep per group
    n_chunks: int  # sample chunks, all layers
    chunks: list[int]  # sample chunks per layer
    chunk_start: list[int]  # first sample chunk of each layer
    sampled: list[int]  # units sampled per layer
    n_blocks: int  # blocks, all layers
    meta: torch.Tensor  # int64 [L, _NF]
    groups: torch.Tensor  # int64 [G, _GF]
    targets: torch.Tensor  # int64 [2 G, _TF]: each group's bracket ends as sample ranks (hi, lo)
    trivial: list[bool]  # k = 0 or k = every unit
    caps: list[int]  # candidate capacity per group
    cand_base: list[int]  # first candidate slot per group
    bits: int  # 1: the single-read write pass (bits written by the bracket pass)

    @property
    def L(self) -> int:
        return len(self.sizes)

    @property
    def G(self) -> int:
        return len(self.gk)


def _sample_plan(src: _Source, sizes, group_of, gsize, gk, cfg: TopkConfig, cand_bytes: int):
    """Sample chunks per layer: their number, their spacing (span) and the units they cover.

    The sample fixes the bracket's width (~ margin_sd binomial sd of the sample rank, so
    relative width ~ 1/sqrt(sample)) and the width the candidates. Per group: at least one
    unit in `sample_every`, and at least the size that minimises sample + candidate bytes;
    then at least what keeps the expected bracket within 80% of `cap_frac` (at most 1/32
    of the group); a group whose bracket would still not fit gets a larger capacity.
    """
    SC = cfg.sample_chunk
    cap_frac = min(1.0, cfg.cap_frac * src.bytes_per_unit / src.key_bytes)
    room = 0.8 * cap_frac - 2.0 * cfg.margin_frac
    rate = max(1, int(round(cfg.sample_every * src.key_bytes / max(1, src.bytes_per_unit))))

    def sample_size(n, k):
        if n == 0:
            return 1
        sdq = math.sqrt(k / n * (1.0 - k / n))
        m_opt = (n * cfg.margin_sd * sdq * cand_bytes / src.key_bytes) ** (2.0 / 3.0)
        m_fit = (2.0 * cfg.margin_sd * sdq / room) ** 2 if room > 0 else 0.0
        return int(min(n, max(cfg.min_sample, n / rate, m_opt, min(m_fit, n / 32))))

    grate = [max(1, n // max(1, sample_size(n, k))) for n, k in zip(gsize, gk)]
    full = [gsize[group_of[i]] <= cfg.full_sample_max for i in range(len(sizes))]
    chunks, span, sampled = [], [], []
    for i, n in enumerate(sizes):
        if n == 0:
            c, s, m = 0, SC, 0
        elif full[i]:
            c, s, m = -(-n // SC), SC, n
        else:
            c = max(1, n // (SC * grate[group_of[i]]))
            s = n // c
            m = c * SC if s >= SC else n
        chunks.append(c)
        span.append(s)
        sampled.append(m)
    return chunks, span, sampled, full, cap_frac


def _group_rows(n: int, k: int, m: int, whole: bool, cap_frac: float, cfg: TopkConfig):
    """One group's candidate capacity and the two sample ranks that bracket its k-th key
    (``n`` units, ``m`` of them sampled, ``whole``: sampled entirely, so the ranks are exact)."""
    if whole or k == 0 or k == n:
        cap = 0
    elif cfg.cap_frac <= 0:  # no candidates at all (tests force the fallback this way)
        cap = min(n, cfg.cap_slack)
    else:  # the expected bracket (2 delta of m sampled ranks, scaled to n) over 0.8
        q_g, m_g = k / max(1, n), max(1, m)
        d_g = cfg.margin_sd * math.sqrt(max(q_g * m_g * (1.0 - q_g), 1.0)) + cfg.margin_frac * m_g + 2.0
        need = 2.0 * d_g / m_g * n / 0.8
        cap = min(n, int(math.ceil(max(cap_frac * n, need))) + cfg.cap_slack)
    r_hi = r_lo = 0
    if k == 0 or k == n:
        pass
    elif whole:
        r_hi = r_lo = k
    else:
        q = k / n
        rho = q * m
        delta = cfg.margin_sd * math.sqrt(max(rho * (1.0 - q), 1.0)) + cfg.margin_frac * m + 2.0
        r_hi = int(math.floor(rho - delta))
        r_lo = int(math.ceil(rho + delta))
    return cap, r_hi, r_lo


def _plan(src: _Source, sizes: list[int], ks: list[int], global_mode: bool, cfg: TopkConfig) -> _Plan:
    """The host tables: per layer its blocks and sample chunks, per group its ranks and capacity."""
    L = len(sizes)
    total_units = sum(sizes)
    if total_units >= 2**31 - 1:
        raise ValueError(f"at most 2**31 - 2 entries in one call, got {total_units}")
    group_of = [0] * L if global_mode else list(range(L))
    gsize = [total_units] if global_mode else list(sizes)
    gk = [sum(ks)] if global_mode else list(ks)
    G = len(gk)
    BLOCK = cfg.block
    bits_possible = cfg.single_read and not src.k16 and 32 <= BLOCK <= 32768
    cand_bytes = src.key_bytes + (2 if bits_possible else 0)
    chunks, span, sampled, full, cap_frac = _sample_plan(src, sizes, group_of, gsize, gk, cfg, cand_bytes)

    nblk = [-(-n // BLOCK) for n in sizes]
    blk_start, chunk_start = [0] * L, [0] * L
    for i in range(1, L):
        blk_start[i] = blk_start[i - 1] + nblk[i - 1]
        chunk_start[i] = chunk_start[i - 1] + chunks[i - 1]
    rows = []
    for i in range(L):
        row = [0] * _NF.value
        row[_F_AOFF], row[_F_BOFF], row[_F_N] = src.a_offs[i], src.b_offs[i], sizes[i]
        row[_F_BLK], row[_F_NBLK], row[_F_CHK] = blk_start[i], nblk[i], chunk_start[i]
        row[_F_SPAN], row[_F_GROUP] = span[i], group_of[i]
        rows.append(row)

    gm, gfull = [0] * G, [True] * G
    for i in range(L):
        gm[group_of[i]] += sampled[i]
        gfull[group_of[i]] = gfull[group_of[i]] and full[i]
    gs_rows, ts_rows, trivial, caps, cand_base = [], [], [], [], []
    cbase = 0
    for g in range(G):
        cap, r_hi, r_lo = _group_rows(gsize[g], gk[g], gm[g], gfull[g], cap_frac, cfg)
        row = [0] * _GF.value
        row[_G_CAP], row[_G_CBASE], row[_G_ACTIVE] = cap, cbase, 1
        trivial.append(gk[g] == 0 or gk[g] == gsize[g])
        if trivial[g]:
            row[_G_LO] = row[_G_HI] = _ALL_ONES if gk[g] == 0 else 0
        gs_rows.append(row)
        target_hi, target_lo = [0] * _TF.value, [0] * _TF.value
        target_hi[_T_NEED], target_lo[_T_NEED] = r_hi, r_lo
        ts_rows += [target_hi, target_lo]
        caps.append(cap)
        cand_base.append(cbase)
        cbase += cap
    # single read: the bracket pass also writes one bit per unit (key > hi) and each candidate's
    # in-block position, and the write pass builds the selection from those (1/32 of a 32-bit
    # key's bytes) instead of reading the input again. 16-bit keys keep the second read: the
    # bits would be 1/16 of their bytes, more scratch than the 5% budget leaves.
    bits = int(bits_possible and any(not trivial[g] and not gfull[g] for g in range(G)))
    return _Plan(global_mode=global_mode, sizes=list(sizes), group_of=group_of, gk=gk,
                 n_chunks=chunk_start[-1] + chunks[-1], chunks=chunks, chunk_start=chunk_start, sampled=sampled,
                 n_blocks=blk_start[-1] + nblk[-1], meta=torch.tensor(rows, dtype=torch.int64),
                 groups=torch.tensor(gs_rows, dtype=torch.int64), targets=torch.tensor(ts_rows, dtype=torch.int64),
                 trivial=trivial, caps=caps, cand_base=cand_base, bits=bits)


@dataclass
class _Run:
    """One selection on the device: its plan, the device copies of the tables, the buffers the
    passes hand on and the launch constants."""

    plan: _Plan
    src: _Source
    cfg: TopkConfig
    device: torch.device
    meta: torch.Tensor  # the plan's tables on the device
    groups: torch.Tensor
    maxl: int  # layers rounded up to a power of two (>= 2): the width of the layer lookups
    key_dtype: torch.dtype  # candidate and sample key buffers
    # filled by the bracket pass (3), read by the later passes
    counts: torch.Tensor | None = None  # int64 [G, _CF]
    blk_gt: torch.Tensor | None = None  # per block: keys above the bracket, later above T
    blk_cnt: torch.Tensor | None = None  # per block: keys in the bracket, later ties at T
    blk_run: torch.Tensor | None = None  # per block: first slot of its candidate run
    cand: torch.Tensor | None = None  # the candidate keys
    blk_nin: torch.Tensor | None = None  # single read: keys in the bracket (blk_cnt is overwritten)
    cpos: torch.Tensor | None = None  # single read: in-block position of each candidate
    bits: torch.Tensor | None = None  # single read: one bit per unit, key > hi

    def block_buffer(self) -> torch.Tensor:
        return torch.zeros(max(1, self.plan.n_blocks), dtype=torch.int32, device=self.device)

    def launch_input(self) -> dict:
        """Constexprs of the kernels that read the inputs block by block."""
        return dict(BLOCK=self.cfg.block, MAXL=self.maxl, num_warps=self.cfg.num_warps, **self.src.constexprs())


@dataclass
class _Resolution:
    """Per group, after the bracket pass (host sync 1): how its exact threshold is found."""

    kept: list[int]  # units to keep: min(k, valid units)
    above: list[int]  # valid units above the bracket
    fill: list[int]  # candidates compacted
    thr: list[int]  # threshold key, where already known
    quota: list[int]  # ties at the threshold to keep, where already known
    mode: list[int]  # 1: threshold from the candidates
    radix_cand: list[int]  # groups for the candidate radix select
    radix_full: list[int]  # groups for the full-input radix select (fallback)
    recount: list[int]  # groups whose bracket counts are not final at their threshold
    exact_bracket: int  # groups the bracket resolved alone


def _sample_pass(run: _Run) -> None:
    """Passes 1 and 2: sample keys into a compact buffer, then radix-select two ranks per group
    in it: the bracket ``[lo, hi]`` of each non-trivial group (into the group table)."""
    p, cfg, device = run.plan, run.cfg, run.device
    SC, CPP = cfg.sample_chunk, cfg.chunks_per_program
    keys = torch.empty(max(1, p.n_chunks * SC), dtype=run.key_dtype, device=device)
    _sample_kernel[(triton.cdiv(p.n_chunks, CPP),)](
        run.src.a_base, run.src.b_base, run.meta, p.L, p.n_chunks, keys, SC=SC, CPP=CPP, MAXL=run.maxl, num_warps=4,
        **run.src.constexprs())
    seg = torch.zeros(p.G, _SF.value, dtype=torch.int64)
    for i in reversed(range(p.L)):
        seg[p.group_of[i], _S_START.value] = p.chunk_start[i] * SC
    for i in range(p.L):
        seg[p.group_of[i], _S_LEN.value] += p.chunks[i] * SC
    targets = _to_dev(p.targets, device)
    _buffer_radix(keys, seg, targets, p.G, 2, int(seg[:, _S_LEN.value].max()), run)
    vals = targets.view(p.G, 2, _TF.value)[:, :, _T_VAL.value]
    trivial = _to_dev(torch.tensor(p.trivial), device)
    hi, lo = _G_HI.value, _G_LO.value
    run.groups[:, hi] = torch.where(trivial, run.groups[:, hi], vals[:, 0])
    run.groups[:, lo] = torch.where(trivial, run.groups[:, lo], vals[:, 1])


def _bracket_pass(run: _Run, bits: int) -> None:
    """Pass 3 (``bits=run.plan.bits``), the one full read: per block the keys above and inside
    the bracket, per group their totals; the in-bracket keys compacted into per-group candidate
    runs. With ``lo == hi == T`` and ``bits=0`` it is the counting pass of a recount."""
    p = run.plan
    if p.n_blocks:
        _bracket_kernel[(p.n_blocks,)](run.src.a_base, run.src.b_base, run.meta, p.L, run.groups, run.counts,
                                       run.blk_gt, run.blk_cnt, run.blk_run, run.cand, run.blk_nin, run.cpos,
                                       run.bits, BITS=bits, **run.launch_input())


def _bracket_buffers(run: _Run) -> None:
    """The buffers the bracket pass fills and the later passes read."""
    p, device = run.plan, run.device
    run.counts = torch.zeros(p.G, _CF.value, dtype=torch.int64, device=device)
    run.blk_gt, run.blk_cnt, run.blk_run = run.block_buffer(), run.block_buffer(), run.block_buffer()
    cand_size = sum(p.caps)
    run.cand = torch.empty(max(1, cand_size), dtype=run.key_dtype, device=device)
    if p.bits:
        run.cpos = torch.empty(max(1, cand_size), dtype=torch.int16, device=device)
        run.bits = torch.empty(max(1, p.n_blocks * (run.cfg.block // 32)), dtype=torch.int32, device=device)
        run.blk_nin = run.block_buffer()
    else:
        run.cpos = run.bits = run.blk_nin = run.blk_run  # never read: BITS is a constexpr 0


def _resolve(run: _Run) -> _Resolution:
    """Host sync 1: per group, does the bracket hold the k-th key (``above < k <= above + in``),
    and did its candidates fit? That decides how pass 4 finds the exact threshold."""
    p = run.plan
    host = torch.cat([run.counts, run.groups[:, [_G_LO.value, _G_HI.value]]], dim=1).cpu()
    n_valid, n_above, n_in, fill = (host[:, c.value].tolist() for c in (_C_VALID, _C_ABOVE, _C_IN, _C_FILL))
    lo_h, hi_h = host[:, _CF.value].tolist(), host[:, _CF.value + 1].tolist()
    G = p.G
    r = _Resolution(kept=[0] * G, above=n_above, fill=fill, thr=[0] * G, quota=[0] * G, mode=[0] * G,
                    radix_cand=[], radix_full=[], recount=[], exact_bracket=0)
    for g in range(G):
        kp = min(p.gk[g], n_valid[g])
        r.kept[g] = kp
        if kp == 0:
            r.thr[g] = _ALL_ONES  # nothing selected; every count is already zero
        elif kp == n_valid[g]:
            r.thr[g] = 0  # every valid key is above key 0
            if not p.trivial[g]:
                r.recount.append(g)
        elif n_above[g] < kp <= n_above[g] + n_in[g]:
            if lo_h[g] == hi_h[g]:
                r.thr[g], r.quota[g] = lo_h[g], kp - n_above[g]
                r.exact_bracket += 1
            elif fill[g] <= p.caps[g]:
                r.mode[g] = 1
                r.radix_cand.append(g)
            else:
                r.radix_full.append(g)
        else:
            r.radix_full.append(g)
    return r


def _threshold_pass(run: _Run, r: _Resolution) -> None:
    """Pass 4: each group's exact threshold key T and tie quota into the group table, from its
    candidates (small launches) or, as a fallback, from the whole input (one read per digit);
    then a counting pass where the bracket pass's counts are not the counts at T."""
    p, device = run.plan, run.device
    G = p.G
    thr = _to_dev(torch.tensor(r.thr, dtype=torch.int64), device)
    quota = _to_dev(torch.tensor(r.quota, dtype=torch.int64), device)
    if r.radix_cand:
        targets = torch.zeros(G, _TF.value, dtype=torch.int64)
        seg = torch.zeros(G, _SF.value, dtype=torch.int64)
        for g in r.radix_cand:
            targets[g, _T_NEED.value] = r.kept[g] - r.above[g]
            seg[g, _S_START.value] = p.cand_base[g]
            seg[g, _S_LEN.value] = r.fill[g]
        targets = _to_dev(targets, device)
        _buffer_radix(run.cand, seg, targets, G, 1, max(r.fill[g] for g in r.radix_cand), run)
        thr, quota = _take_rows(r.radix_cand, G, targets, thr, quota, device)
    if r.radix_full:
        targets = torch.zeros(G, _TF.value, dtype=torch.int64)
        active = torch.zeros(G, dtype=torch.int64)
        for g in r.radix_full:
            targets[g, _T_NEED.value] = r.kept[g]
            active[g] = 1
        targets = _to_dev(targets, device)
        run.groups[:, _G_ACTIVE.value] = _to_dev(active, device)
        hist = torch.zeros(G * _NB.value, dtype=torch.int32, device=device)
        shifts = run.src.shifts
        for lvl, shift in enumerate(shifts):
            _full_hist_kernel[(p.n_blocks,)](run.src.a_base, run.src.b_base, run.meta, p.L, run.groups, targets, hist,
                                             SHIFT=shift, **run.launch_input())
            _select_kernel[(G,)](hist, targets, SHIFT=shift, FIRST=lvl == 0, LAST=lvl == len(shifts) - 1,
                                 num_warps=1)
        thr, quota = _take_rows(r.radix_full, G, targets, thr, quota, device)
    run.groups[:, _G_T.value] = thr
    run.groups[:, _G_QUOTA.value] = quota
    run.groups[:, _G_MODE.value] = _to_dev(torch.tensor(r.mode, dtype=torch.int64), device)

    recount = r.recount + r.radix_full
    if recount and p.n_blocks:  # the bracket pass again, with lo == hi == T
        active = torch.zeros(G, dtype=torch.int64)
        active[recount] = 1
        run.groups[:, _G_ACTIVE.value] = _to_dev(active, device)
        run.groups[:, _G_LO.value] = thr
        run.groups[:, _G_HI.value] = thr
        _bracket_pass(run, bits=0)


def _write_pass(run: _Run, r: _Resolution) -> list[torch.Tensor]:
    """Passes 5 (count: per block the keys above T and the ties at T), 6 (scan: per block its
    output offset and tie quota) and 7 (write: the selected indices); host sync 2 reads the
    per-layer output ranges."""
    p, cfg, device = run.plan, run.cfg, run.device
    L = p.L
    totals = torch.zeros(L, _LF.value, dtype=torch.int64, device=device)
    ranges = torch.zeros(L, _LF.value, dtype=torch.int64, device=device)
    blk_take, blk_off = run.block_buffer(), run.block_buffer()
    out = torch.empty(max(1, sum(r.kept)), dtype=torch.int32, device=device)
    a, b = run.src.a_base, run.src.b_base
    if p.n_blocks:
        _count_kernel[(p.n_blocks,)](run.meta, L, run.groups, run.blk_gt, run.blk_cnt, run.blk_run, run.cand, totals,
                                     RUNCH=cfg.run_chunk, MAXL=run.maxl, K16=run.src.k16, num_warps=4)
    _scan_kernel[(L,)](run.meta, L, run.groups, totals, run.blk_gt, run.blk_cnt, blk_take, blk_off, ranges,
                       GLOBAL=p.global_mode, CH=cfg.scan_chunk, MAXL=run.maxl, num_warps=4)
    if p.n_blocks:
        _write_kernel[(p.n_blocks,)](a, b, run.meta, L, run.groups, run.blk_gt, blk_take, blk_off, out,
                                     run.blk_run, run.blk_nin, run.cand, run.cpos, run.bits,
                                     BITS=p.bits, **run.launch_input())
    ranges = ranges.cpu().tolist()
    total = sum(row[_L_COUNT] for row in ranges)
    if total != sum(r.kept) or (not p.global_mode and any(ranges[i][_L_COUNT] != r.kept[i] for i in range(L))):
        raise RuntimeError(f"top-k internal error: selected {total} entries, expected {sum(r.kept)}")
    return [out[row[_L_START]:row[_L_START] + row[_L_COUNT]] for row in ranges]


def _run_select(src: _Source, sizes: list[int], ks: list[int], global_mode: bool, cfg: TopkConfig,
                device) -> Selection:
    """The selection's passes in order (docs/kernels.md, "Batched top-k"), two host syncs."""
    plan = _plan(src, sizes, ks, global_mode, cfg)
    run = _Run(plan=plan, src=src, cfg=cfg, device=device, meta=_to_dev(plan.meta, device),
               groups=_to_dev(plan.groups, device), maxl=max(2, runtime.pow2(plan.L)),
               key_dtype=torch.int16 if src.k16 else torch.int32)
    if not all(plan.trivial):
        _sample_pass(run)  # 1, 2 (its key buffer is freed before the candidate buffers exist)
    _bracket_buffers(run)
    _bracket_pass(run, bits=plan.bits)  # 3
    r = _resolve(run)  # host sync 1
    _threshold_pass(run, r)  # 4
    indices = _write_pass(run, r)  # 5, 6, 7, host sync 2
    G = plan.G
    stats = SelectStats(
        groups=G, blocks=plan.n_blocks, sampled_units=int(sum(plan.sampled)) if not all(plan.trivial) else 0,
        trivial=sum(plan.trivial), exact_bracket=r.exact_bracket, candidates=len(r.radix_cand),
        candidate_keys=sum(r.fill[g] for g in r.radix_cand), fallback=len(r.radix_full), recount=len(r.recount),
        single_read=len(r.radix_cand) if plan.bits else 0, offset_alignment=min(src.a_align, src.b_align))
    return Selection(indices, stats)


def _take_rows(groups, G, targets, thr, quota, device):
    """Threshold and tie quota of ``groups`` from a radix state, the others unchanged."""
    rows = torch.zeros(G, dtype=torch.bool)
    rows[groups] = True
    rows = _to_dev(rows, device)
    return torch.where(rows, targets[:, _T_VAL.value], thr), torch.where(rows, targets[:, _T_NEED.value], quota)


def _buffer_radix(keys, seg, targets, G: int, NT: int, max_len: int, run: _Run) -> None:
    """Radix select over per-group segments of a compact key buffer (8-bit digits), ``NT``
    targets per group."""
    seg = _to_dev(seg, run.device)
    hist = torch.zeros(G * NT * _NB.value, dtype=torch.int32, device=run.device)
    n_prog = max(1, triton.cdiv(max_len, run.cfg.buf_chunk))
    shifts = run.src.shifts
    for lvl, shift in enumerate(shifts):
        _buf_hist_kernel[(n_prog, G)](keys, seg, targets, hist, NT=NT, SHIFT=shift, CH=run.cfg.buf_chunk,
                                      K16=run.src.k16, num_warps=4)
        _select_kernel[(G * NT,)](hist, targets, SHIFT=shift, FIRST=lvl == 0, LAST=lvl == len(shifts) - 1,
                                  num_warps=1)


def _score_source(scores, what="scores") -> tuple[_Source, list[int]]:
    if not isinstance(scores, (list, tuple)) or len(scores) == 0:
        raise ValueError(f"{what} must be a non-empty list of tensors")
    for i, s in enumerate(scores):
        runtime.check_float(s, f"{what}[{i}]")
    _check_device(list(scores), what)
    dt = _common_dtype(scores)
    flat = _prep(scores, dt)
    src = _Source(flat, flat, _KIND["identity"], dt, dt, torch.empty(0, dtype=dt).element_size())
    return src, [s.numel() for s in scores]


def topk_per_layer(scores: list[torch.Tensor], ks: list[int], *, config: TopkConfig | None = None,
                   return_stats: bool = False):
    """Per-layer top-k: int32 sorted flat indices of the ``ks[i]`` largest entries of ``scores[i]``
    (with ``return_stats``: a :class:`Selection`, the indices and the paths taken)."""
    if not isinstance(ks, (list, tuple)):
        raise TypeError(f"ks must be a list of ints, got {type(ks).__name__}")
    src, sizes = _score_source(scores)
    if len(ks) != len(sizes):
        raise ValueError(f"got {len(sizes)} score tensors but {len(ks)} values of k")
    ks = [runtime.check_count(k, n, f"ks[{i}]") for i, (k, n) in enumerate(zip(ks, sizes))]
    result = _run_select(src, sizes, ks, False, config or DEFAULT_CONFIG, scores[0].device)
    return result if return_stats else result.indices


def topk_global(scores: list[torch.Tensor], k: int, *, config: TopkConfig | None = None, return_stats: bool = False):
    """One threshold over all layers: exactly ``k`` kept overall (ties: layer order, then flat
    index); with ``return_stats`` a :class:`Selection`."""
    src, sizes = _score_source(scores)
    k = runtime.check_count(k, sum(sizes), "k")
    result = _run_select(src, sizes, [k], True, config or DEFAULT_CONFIG, scores[0].device)
    return result if return_stats else result.indices


def _fused_source(deltas, grads, score: str, block_size):
    """Validate Ŵ / G lists; return the source, the layer shapes and the number of units per layer."""
    if score not in runtime.SCORES:
        raise ValueError(f"score must be one of {runtime.SCORES}, got {score!r}")
    need_a = score != "gm"
    need_b = score != "wm"
    if need_a and deltas is None:
        raise ValueError(f"score {score!r} needs deltas")
    if need_b and grads is None:
        raise ValueError(f"score {score!r} needs grads")
    ref_list = deltas if need_a else grads
    if not isinstance(ref_list, (list, tuple)) or len(ref_list) == 0:
        raise ValueError("deltas / grads must be non-empty lists of tensors")
    L = len(ref_list)
    for name, lst, needed in (("deltas", deltas, need_a), ("grads", grads, need_b)):
        if not needed:
            continue
        if not isinstance(lst, (list, tuple)) or len(lst) != L:
            raise ValueError(f"deltas and grads must be lists of the same length, got {name} of length "
                             f"{len(lst) if isinstance(lst, (list, tuple)) else type(lst).__name__}")
        for i, t in enumerate(lst):
            runtime.check_float(t, f"{name}[{i}]")
            if t.dim() != 2:
                raise ValueError(f"{name}[{i}] must be 2-D [d_out, d_in], got shape {tuple(t.shape)}")
    if need_a and need_b:
        for i, (d, g) in enumerate(zip(deltas, grads)):
            if d.shape != g.shape:
                raise ValueError(f"deltas[{i}] has shape {tuple(d.shape)} but grads[{i}] has {tuple(g.shape)}")
    shapes = [tuple(t.shape) for t in ref_list]
    if block_size is not None:
        if isinstance(block_size, bool):
            raise TypeError("block_size must be an int or None, got bool")
        try:
            block_size = operator.index(block_size)
        except TypeError:
            raise TypeError(f"block_size must be an int or None, got {type(block_size).__name__}") from None
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        for i, (r, c) in enumerate(shapes):
            if r % block_size or c % block_size:
                raise ValueError(f"block_size {block_size} does not divide layer {i}'s shape ({r}, {c})")
    units = [(r // block_size) * (c // block_size) if block_size else r * c for r, c in shapes]
    tensors = [t for lst, nd in ((deltas, need_a), (grads, need_b)) if nd for t in lst]
    _check_device(tensors, "deltas and grads")
    a_dt = _common_dtype(deltas) if need_a else None
    b_dt = _common_dtype(grads) if need_b else None
    a_flat = _prep(deltas, a_dt) if need_a else None
    b_flat = _prep(grads, b_dt) if need_b else None
    bpu = (a_flat[0].element_size() if need_a else 0) + (b_flat[0].element_size() if need_b else 0)
    a_flat = a_flat if a_flat is not None else b_flat
    b_flat = b_flat if b_flat is not None else a_flat
    a_dt = a_dt or b_dt
    b_dt = b_dt or a_dt
    return _Source(a_flat, b_flat, _KIND[score], a_dt, b_dt, bpu), shapes, units, block_size


def topk_from_delta_grad(deltas, grads, score: str = "mcs", ks=None, global_k=None, block_size=None, *,
                         config: TopkConfig | None = None, return_stats: bool = False):
    """Top-k of a score computed on the fly from Ŵ (``deltas``) and G (``grads``), never materialised.

    ``score``: ``mcs`` = Ŵ⊙G (signed), ``snip`` = |Ŵ⊙G|, ``gm`` = |G| (``deltas`` may be None),
    ``wm`` = |Ŵ| (``grads`` may be None). Give exactly one of ``ks`` (per layer) or ``global_k``.
    ``block_size=None`` selects elements (flat element indices); ``block_size=B`` sums the score
    over ``B×B`` tiles (see :func:`delta_grad_tile_scores`) and selects tiles (flat block ids
    ``row_block * (d_in // B) + col_block``). With ``return_stats``: a :class:`Selection`.
    """
    cfg = config or DEFAULT_CONFIG
    if (ks is None) == (global_k is None):
        raise ValueError("give exactly one of ks (per-layer k) or global_k")
    src, shapes, units, block_size = _fused_source(deltas, grads, score, block_size)
    if ks is not None:
        if not isinstance(ks, (list, tuple)):
            raise TypeError(f"ks must be a list of ints, got {type(ks).__name__}")
        if len(ks) != len(units):
            raise ValueError(f"got {len(units)} layers but {len(ks)} values of k")
        ks = [runtime.check_count(k, n, f"ks[{i}]") for i, (k, n) in enumerate(zip(ks, units))]
    else:
        global_k = runtime.check_count(global_k, sum(units), "global_k")
    device = src.a_base.device
    if block_size is None:
        result = _run_select(src, units, ks if ks is not None else [global_k], ks is None, cfg, device)
        return result if return_stats else result.indices
    tile_scores = _tile_scores(src, shapes, block_size, cfg, device)
    if ks is not None:
        return topk_per_layer(tile_scores, ks, config=cfg, return_stats=return_stats)
    return topk_global(tile_scores, global_k, config=cfg, return_stats=return_stats)


def delta_grad_tile_scores(deltas, grads, score: str = "mcs", block_size: int = 16, *,
                           config: TopkConfig | None = None) -> list[torch.Tensor]:
    """fp32 per-tile sums ``[d_out/B, d_in/B]`` of the score, exactly as the block mode selects on.

    One launch over all layers; the element scores are never stored. Sums are taken in a fixed
    order (over a tile's columns, then its rows): deterministic, equal to
    ``reference.delta_grad_score(..., block_size)`` up to fp32 rounding.
    """
    if block_size is None:
        raise ValueError("block_size must be an int")
    src, shapes, _, block_size = _fused_source(deltas, grads, score, block_size)
    return _tile_scores(src, shapes, block_size, config or DEFAULT_CONFIG, src.a_base.device)


def _tile_scores(src: _Source, shapes, block_size: int, cfg: TopkConfig, device) -> list[torch.Tensor]:
    """fp32 per-tile sums of the score, one ``[d_out/B, d_in/B]`` view per layer of one buffer."""
    L = len(shapes)
    TT = cfg.tiles_per_program
    n_tiles = [(r // block_size) * (c // block_size) for r, c in shapes]
    rows = []
    blk = tout = 0
    for i, (r, c) in enumerate(shapes):
        row = [0] * _NF.value
        row[_F_AOFF], row[_F_BOFF], row[_F_N], row[_F_BLK] = src.a_offs[i], src.b_offs[i], n_tiles[i], blk
        row[_F_TOUT], row[_F_NCOL], row[_F_NBC] = tout, c, c // block_size
        rows.append(row)
        blk += -(-n_tiles[i] // TT)
        tout += n_tiles[i]
    meta = torch.tensor(rows, dtype=torch.int64)
    buf = torch.empty(max(1, tout), dtype=torch.float32, device=device)
    if blk:
        _tile_kernel[(blk,)](src.a_base, src.b_base, _to_dev(meta, device), L, buf, TT=TT, BS=block_size,
                             BP=runtime.pow2(block_size), MAXL=max(2, runtime.pow2(L)), KIND=src.kind,
                             ADT=src.adt, BDT=src.bdt, AAL=src.a_align, BAL=src.b_align, num_warps=4)
    out, start = [], 0
    for (r, c), n in zip(shapes, n_tiles):
        out.append(buf[start:start + n].view(r // block_size, c // block_size))
        start += n
    return out


def with_config(**changes) -> TopkConfig:
    """A copy of the default configuration with some fields changed (tests, tuning)."""
    return replace(DEFAULT_CONFIG, **changes)
