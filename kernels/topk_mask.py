"""Batched top-k mask selection over many layers: sample-bracketed radix select.

Public launchers (same results as their twins in ``kernels/reference.py``, bit for bit):
``topk_per_layer(scores, ks)``, ``topk_global(scores, k)`` (one threshold over all layers) and
``topk_from_delta_grad(deltas, grads, score, ...)`` (the score computed on the fly from Ŵ and G,
per element or per ``B×B`` tile). Each returns, per layer, the int32 sorted flat indices of the
kept entries; ``kept_masks`` turns them into bool masks. The selection rule (ties, ±0, NaN), the
32-bit keys, the passes and their scratch memory: docs/kernels.md, section "Batched top-k".
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import torch

from .runtime import HAS_TRITON, SCORES, triton_usable_for
from .reference import kept_masks  # noqa: F401 - part of this module's API (shared with the twin)

_KIND = {"identity": 0, "mcs": 1, "snip": 2, "gm": 3, "wm": 4}
_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ALL_ONES = 0xFFFFFFFF

# per-layer metadata (int64 [L, _NF])
_F_AOFF, _F_BOFF, _F_N, _F_BLK, _F_NBLK, _F_CHK, _F_SPAN, _F_GROUP, _F_TOUT, _F_NCOL, _F_NBC = range(11)
_NF = 11
# per-group state (int64 [G, _GF])
_G_LO, _G_HI, _G_CAP, _G_CBASE, _G_ACTIVE, _G_T, _G_QUOTA, _G_MODE = range(8)
_GF = 8
# per-target radix state (int64 [rows, 4]): prefix value, prefix mask, remaining rank, bottom flag
_NB_BITS = 8
_NB = 1 << _NB_BITS
_SHIFTS = (24, 16, 8, 0)
_SHIFTS16 = (24, 16)  # 16-bit keys live in the top half: two digits


@dataclass(frozen=True)
class TopkConfig:
    """Tunables of the selection (defaults aim at H100/H200; tests shrink them)."""

    block: int = 4096  # units per block of the bracket / write passes (power of 2)
    sample_chunk: int = 64  # consecutive units per sample chunk (power of 2)
    chunks_per_program: int = 32  # sample chunks per program (power of 2)
    sample_every: int = 128  # one unit in `sample_every` is sampled (4-byte inputs)...
    min_sample: int = 1 << 12  # ...and at least this many per group (see _run_select's sampling plan)
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

# Statistics of the last call (tests assert which paths ran).
last_stats: dict = {}

if HAS_TRITON:
    import triton
    import triton.language as tl

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
    def _find_layer(meta_ptr, field, L, pid, MAXL: tl.constexpr, NF: tl.constexpr):
        ar = tl.arange(0, MAXL)
        starts = tl.load(meta_ptr + ar * NF + field, mask=ar < L, other=1 << 62)
        return tl.sum((starts <= pid).to(tl.int32), axis=0) - 1

    @triton.jit
    def _block_keys(a_ptr, b_ptr, meta_ptr, l, pid, BLOCK: tl.constexpr, NF: tl.constexpr,
                    KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr, K16: tl.constexpr,
                    AAL: tl.constexpr, BAL: tl.constexpr):
        n = tl.load(meta_ptr + l * NF + 2)
        j = pid - tl.load(meta_ptr + l * NF + 3)
        idx = j * BLOCK + tl.arange(0, BLOCK)
        m = idx < n
        # AAL / BAL: a power of two dividing every layer's element offset (the launcher checks);
        # the hint lets the loads of a block vectorise to 16 bytes, as the offsets come from a table
        aoff = tl.multiple_of(tl.load(meta_ptr + l * NF + 0), AAL)
        boff = tl.multiple_of(tl.load(meta_ptr + l * NF + 1), BAL)
        if (j + 1) * BLOCK <= n:
            key, valid = _unit_keys(a_ptr, b_ptr, aoff + idx, boff + idx, m, KIND, ADT, BDT, K16, False)
        else:  # the layer's last, partial block
            key, valid = _unit_keys(a_ptr, b_ptr, aoff + idx, boff + idx, m, KIND, ADT, BDT, K16, True)
        return idx, key, valid

    @triton.jit
    def _sample_kernel(a_ptr, b_ptr, meta_ptr, L, n_chunks, keys_ptr,
                       SC: tl.constexpr, CPP: tl.constexpr, MAXL: tl.constexpr, NF: tl.constexpr,
                       KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr, K16: tl.constexpr,
                       AAL: tl.constexpr, BAL: tl.constexpr):
        pid = tl.program_id(0)
        cid = pid * CPP + tl.arange(0, CPP)
        cm = cid < n_chunks
        ar = tl.arange(0, MAXL)
        starts = tl.load(meta_ptr + ar * NF + 5, mask=ar < L, other=1 << 62)
        lay = tl.sum((starts[None, :] <= cid[:, None]).to(tl.int32), axis=1) - 1
        n = tl.load(meta_ptr + lay * NF + 2)
        c = cid - tl.load(meta_ptr + lay * NF + 5)
        span = tl.load(meta_ptr + lay * NF + 6)
        slack = tl.maximum(span - SC, 0)
        hashed = (c * 2654435761) & 0xFFFFFFFF
        jitter = tl.where(slack > 0, hashed % (slack + 1), 0)
        pos = c * span + jitter
        u = pos[:, None] + tl.arange(0, SC)[None, :]
        m = cm[:, None] & (u < n[:, None])
        aoff = tl.load(meta_ptr + lay * NF + 0)
        boff = tl.load(meta_ptr + lay * NF + 1)
        key, valid = _unit_keys(a_ptr, b_ptr, aoff[:, None] + u, boff[:, None] + u, m, KIND, ADT, BDT, K16)
        out = cid.to(tl.int64)[:, None] * SC + tl.arange(0, SC)[None, :]
        tl.store(keys_ptr + out, _buf_val(key, K16), mask=cm[:, None])

    @triton.jit
    def _buf_hist_kernel(keys_ptr, seg_ptr, ts_ptr, hist_ptr, NT: tl.constexpr, SHIFT: tl.constexpr,
                         CH: tl.constexpr, NB: tl.constexpr, K16: tl.constexpr):
        c = tl.program_id(0)
        g = tl.program_id(1)
        start = tl.load(seg_ptr + g * 2)
        n = tl.load(seg_ptr + g * 2 + 1)
        base = c.to(tl.int64) * CH
        if base < n:
            ar = tl.arange(0, CH)
            m = (base + ar) < n
            key = _buf_load(keys_ptr, start + base + ar, m, K16)
            valid = m & (key != 0)
            digit = ((key >> SHIFT) & (NB - 1)).to(tl.int32)
            bins = tl.arange(0, NB)
            for t in tl.static_range(NT):
                row = g * NT + t
                pv = tl.load(ts_ptr + row * 4 + 0).to(tl.uint32)
                pm = tl.load(ts_ptr + row * 4 + 1).to(tl.uint32)
                match = valid & ((key & pm) == pv)
                h = tl.histogram(tl.where(match, digit, 0), NB)
                # unmatched lanes were counted in bin 0: take them out (no mask argument needed)
                n_off = CH - tl.sum(match.to(tl.int32), axis=0)
                h = h - tl.where(bins == 0, n_off, 0)
                tl.atomic_add(hist_ptr + row * NB + bins, h, mask=h > 0, sem="relaxed")

    @triton.jit
    def _full_hist_kernel(a_ptr, b_ptr, meta_ptr, L, gs_ptr, ts_ptr, hist_ptr,
                          SHIFT: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, MAXL: tl.constexpr,
                          NF: tl.constexpr, GF: tl.constexpr,
                          KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr, K16: tl.constexpr,
                          AAL: tl.constexpr, BAL: tl.constexpr):
        pid = tl.program_id(0)
        lay = _find_layer(meta_ptr, 3, L, pid, MAXL, NF)
        g = tl.load(meta_ptr + lay * NF + 7)
        if tl.load(gs_ptr + g * GF + 4) != 0:
            idx, key, valid = _block_keys(a_ptr, b_ptr, meta_ptr, lay, pid, BLOCK, NF, KIND, ADT, BDT, K16, AAL, BAL)
            pv = tl.load(ts_ptr + g * 4 + 0).to(tl.uint32)
            pm = tl.load(ts_ptr + g * 4 + 1).to(tl.uint32)
            match = valid & ((key & pm) == pv)
            digit = ((key >> SHIFT) & (NB - 1)).to(tl.int32)
            h = tl.histogram(tl.where(match, digit, 0), NB)
            bins = tl.arange(0, NB)
            n_off = BLOCK - tl.sum(match.to(tl.int32), axis=0)
            h = h - tl.where(bins == 0, n_off, 0)
            tl.atomic_add(hist_ptr + g * NB + bins, h, mask=h > 0, sem="relaxed")

    @triton.jit
    def _select_kernel(hist_ptr, ts_ptr, SHIFT: tl.constexpr, NB: tl.constexpr,
                       FIRST: tl.constexpr, LAST: tl.constexpr):
        """One radix digit: the bin holding the `need`-th largest matching key."""
        t = tl.program_id(0)
        bins = tl.arange(0, NB)
        h = tl.load(hist_ptr + t * NB + bins).to(tl.int64)
        tl.store(hist_ptr + t * NB + bins, tl.zeros([NB], dtype=tl.int32))  # ready for the next digit
        total = tl.sum(h, axis=0)
        need = tl.load(ts_ptr + t * 4 + 2)
        if FIRST:
            tl.store(ts_ptr + t * 4 + 3, (need > total).to(tl.int64))
        need = tl.minimum(tl.maximum(need, 0), total)
        suffix = total - tl.cumsum(h, axis=0) + h  # keys in bins >= b
        b = tl.sum((suffix >= need).to(tl.int32), axis=0) - 1
        above = tl.sum(tl.where(bins == b, suffix - h, 0), axis=0)
        need = need - above
        val = tl.load(ts_ptr + t * 4 + 0) | (b.to(tl.int64) << SHIFT)
        pmask = tl.load(ts_ptr + t * 4 + 1) | (tl.full([], NB - 1, tl.int64) << SHIFT)
        if LAST:
            # a rank below every valid key: the bracket end is the bottom (all valid keys)
            val = tl.where(tl.load(ts_ptr + t * 4 + 3) != 0, 1, val)
        tl.store(ts_ptr + t * 4 + 0, val)
        tl.store(ts_ptr + t * 4 + 1, pmask)
        tl.store(ts_ptr + t * 4 + 2, need)

    @triton.jit
    def _bracket_kernel(a_ptr, b_ptr, meta_ptr, L, gs_ptr, gc_ptr, blk_gt_ptr, blk_cnt_ptr, blk_run_ptr, cand_ptr,
                        blk_nin_ptr, cpos_ptr, bits_ptr,
                        BLOCK: tl.constexpr, MAXL: tl.constexpr, NF: tl.constexpr, GF: tl.constexpr, BITS: tl.constexpr,
                        KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr, K16: tl.constexpr,
                        AAL: tl.constexpr, BAL: tl.constexpr):
        pid = tl.program_id(0)
        lay = _find_layer(meta_ptr, 3, L, pid, MAXL, NF)
        g = tl.load(meta_ptr + lay * NF + 7)
        if tl.load(gs_ptr + g * GF + 4) != 0:
            idx, key, valid = _block_keys(a_ptr, b_ptr, meta_ptr, lay, pid, BLOCK, NF, KIND, ADT, BDT, K16, AAL, BAL)
            lo = tl.load(gs_ptr + g * GF + 0).to(tl.uint32)
            hi = tl.load(gs_ptr + g * GF + 1).to(tl.uint32)
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
            tl.atomic_add(gc_ptr + g * 4 + 0, n_valid.to(tl.int64), sem="relaxed")
            tl.atomic_add(gc_ptr + g * 4 + 1, n_above.to(tl.int64), sem="relaxed")
            tl.atomic_add(gc_ptr + g * 4 + 2, n_in.to(tl.int64), sem="relaxed")
            if (lo < hi) & (n_in > 0):
                start = tl.atomic_add(gc_ptr + g * 4 + 3, n_in.to(tl.int64), sem="relaxed")
                tl.store(blk_run_ptr + pid, start.to(tl.int32))
                if start + n_in <= tl.load(gs_ptr + g * GF + 2):
                    rank = tl.cumsum(inb.to(tl.int32), axis=0) - 1
                    dst = tl.load(gs_ptr + g * GF + 3) + start + rank
                    tl.store(cand_ptr + dst, _buf_val(key, K16), mask=inb)
                    if BITS:  # in-block position of each candidate (BLOCK <= 32768)
                        tl.store(cpos_ptr + dst, tl.arange(0, BLOCK).to(tl.int16), mask=inb)

    @triton.jit
    def _count_kernel(meta_ptr, L, gs_ptr, blk_gt_ptr, blk_cnt_ptr, blk_run_ptr, cand_ptr, ltot_ptr,
                      RUNCH: tl.constexpr, MAXL: tl.constexpr, NF: tl.constexpr, GF: tl.constexpr,
                      K16: tl.constexpr):
        pid = tl.program_id(0)
        lay = _find_layer(meta_ptr, 3, L, pid, MAXL, NF)
        g = tl.load(meta_ptr + lay * NF + 7)
        n_gt = tl.load(blk_gt_ptr + pid)
        n_eq = tl.load(blk_cnt_ptr + pid)
        if (tl.load(gs_ptr + g * GF + 7) == 1) & (n_eq > 0):
            thr = tl.load(gs_ptr + g * GF + 5).to(tl.uint32)
            base = tl.load(gs_ptr + g * GF + 3) + tl.load(blk_run_ptr + pid)
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
        tl.atomic_add(ltot_ptr + lay * 2 + 0, n_gt.to(tl.int64), sem="relaxed")
        tl.atomic_add(ltot_ptr + lay * 2 + 1, n_eq.to(tl.int64), sem="relaxed")

    @triton.jit
    def _scan_kernel(meta_ptr, L, gs_ptr, ltot_ptr, blk_gt_ptr, blk_cnt_ptr, blk_take_ptr, blk_off_ptr, lout_ptr,
                     GLOBAL: tl.constexpr, CH: tl.constexpr, MAXL: tl.constexpr, NF: tl.constexpr, GF: tl.constexpr):
        lay = tl.program_id(0)
        ar = tl.arange(0, MAXL)
        lm = ar < L
        lgt = tl.load(ltot_ptr + ar * 2 + 0, mask=lm, other=0)
        leq = tl.load(ltot_ptr + ar * 2 + 1, mask=lm, other=0)
        if GLOBAL:
            tb = tl.cumsum(leq, axis=0) - leq  # ties in earlier layers
            qeff = tl.load(gs_ptr + 6) - tb
        else:
            qeff = tl.load(gs_ptr + ar * GF + 6, mask=lm, other=0)
        taken = tl.minimum(tl.maximum(qeff, 0), leq)
        sel = lgt + taken
        start = tl.cumsum(sel, axis=0) - sel
        my_q = tl.sum(tl.where(ar == lay, qeff, 0), axis=0)
        carry_s = tl.sum(tl.where(ar == lay, start, 0), axis=0)
        tl.store(lout_ptr + lay * 2 + 0, carry_s)
        tl.store(lout_ptr + lay * 2 + 1, tl.sum(tl.where(ar == lay, sel, 0), axis=0))
        b0 = tl.load(meta_ptr + lay * NF + 3)
        nb = tl.load(meta_ptr + lay * NF + 4)
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
                      BLOCK: tl.constexpr, MAXL: tl.constexpr, NF: tl.constexpr, GF: tl.constexpr,
                      BITS: tl.constexpr,
                      KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr, K16: tl.constexpr,
                      AAL: tl.constexpr, BAL: tl.constexpr):
        pid = tl.program_id(0)
        take = tl.load(blk_take_ptr + pid)
        if tl.load(blk_gt_ptr + pid) + take > 0:
            lay = _find_layer(meta_ptr, 3, L, pid, MAXL, NF)
            g = tl.load(meta_ptr + lay * NF + 7)
            thr = tl.load(gs_ptr + g * GF + 5).to(tl.uint32)
            # BITS (0 or 1): this launch has the bracket pass's bits; mode 1: the group's threshold
            # came from its candidates, so all its in-bracket units are in candidate runs
            if tl.load(gs_ptr + g * GF + 7) * BITS == 1:
                # the input is not read again: units above the bracket come from the bracket
                # pass's bits, the rest of the selection from this block's candidate run
                W: tl.constexpr = BLOCK // 32
                CH: tl.constexpr = 64  # candidates per step: a [W, CH] compare, ~1% of a block per step
                wi = tl.arange(0, W)
                words = tl.load(bits_ptr + pid.to(tl.int64) * W + wi).to(tl.uint32, bitcast=True)
                base = tl.load(gs_ptr + g * GF + 3) + tl.load(blk_run_ptr + pid)
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
                n = tl.load(meta_ptr + lay * NF + 2)
                j = pid - tl.load(meta_ptr + lay * NF + 3)
                idx = j * BLOCK + tl.arange(0, BLOCK)
                pos = tl.load(blk_off_ptr + pid) + tl.cumsum(flags, axis=0) - 1
                tl.store(out_ptr + pos, idx.to(tl.int32), mask=(flags != 0) & (idx < n))
            else:
                idx, key, valid = _block_keys(a_ptr, b_ptr, meta_ptr, lay, pid, BLOCK, NF, KIND, ADT, BDT, K16,
                                              AAL, BAL)
                eqm = (valid & (key == thr)).to(tl.int32)
                tie_rank = tl.cumsum(eqm, axis=0) - eqm
                sel = (valid & (key > thr)) | ((eqm != 0) & (tie_rank < take))
                sel_i = sel.to(tl.int32)
                pos = tl.load(blk_off_ptr + pid) + tl.cumsum(sel_i, axis=0) - 1
                tl.store(out_ptr + pos, idx.to(tl.int32), mask=sel)

    @triton.jit
    def _tile_kernel(a_ptr, b_ptr, meta_ptr, L, out_ptr,
                     TT: tl.constexpr, BS: tl.constexpr, BP: tl.constexpr, MAXL: tl.constexpr, NF: tl.constexpr,
                     KIND: tl.constexpr, ADT: tl.constexpr, BDT: tl.constexpr, AAL: tl.constexpr, BAL: tl.constexpr):
        """Per-tile sums of the on-the-fly score: TT tiles (flat tile ids) per program."""
        pid = tl.program_id(0)
        lay = _find_layer(meta_ptr, 3, L, pid, MAXL, NF)
        n_tiles = tl.load(meta_ptr + lay * NF + 2)
        j = pid - tl.load(meta_ptr + lay * NF + 3)
        t = j * TT + tl.arange(0, TT)
        tm = t < n_tiles
        ncol = tl.multiple_of(tl.load(meta_ptr + lay * NF + 9), BS)  # block mode: d_in % BS == 0
        nbc = tl.load(meta_ptr + lay * NF + 10)
        rb = t // nbc
        cb = t % nbc
        r = tl.arange(0, BP)
        c = tl.arange(0, BP)
        rows = rb[:, None, None] * BS + r[None, :, None]
        cols = cb[:, None, None] * BS + c[None, None, :]
        m = tm[:, None, None] & (r < BS)[None, :, None] & (c < BS)[None, None, :]
        offs = rows * ncol + cols
        aoff = tl.multiple_of(tl.load(meta_ptr + lay * NF + 0), AAL)
        boff = tl.multiple_of(tl.load(meta_ptr + lay * NF + 1), BAL)
        s = _score(a_ptr, b_ptr, aoff + offs, boff + offs, m, KIND, ADT, BDT)
        s = tl.where(m, s, 0.0)
        tsum = tl.sum(tl.sum(s, axis=2), axis=1)
        tl.store(out_ptr + tl.load(meta_ptr + lay * NF + 8) + t, tsum, mask=tm)


# ------------------------------------------------------------------------------ host side


def _to_dev(t: torch.Tensor, device) -> torch.Tensor:
    """Host table to the device without a stream sync (pinned, non-blocking: the caching host
    allocator keeps the pinned block until the copy has run)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _check_k(k, n: int, what: str) -> int:
    if isinstance(k, bool):  # operator.index(True) is 1: a flag passed by mistake
        raise TypeError(f"{what} must be an int, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(k).__name__}") from None
    if k < 0 or k > n:
        raise ValueError(f"{what} must be in [0, {n}] (the number of entries), got {k}")
    return k


def _check_float(t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DT:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {t.dtype}")


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


def _offset_alignment(offsets) -> int:
    """The largest power of two, at most 16, dividing every element offset (a compiler hint)."""
    align = 16
    for off in offsets:
        while off % align:
            align //= 2
    return align


def _check_device(tensors) -> torch.device:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if not HAS_TRITON or not triton_usable_for(tensors[0]):
        raise RuntimeError(
            "the Triton top-k needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before import); "
            "use kernels.reference.topk_per_layer / topk_global on this device")
    return dev


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
        self.a_align = _offset_alignment(self.a_offs)
        self.b_align = _offset_alignment(self.b_offs)


def _run_select(src: _Source, sizes: list[int], ks: list[int], global_mode: bool, cfg: TopkConfig,
                device) -> list[torch.Tensor]:
    L = len(sizes)
    G = 1 if global_mode else L
    MAXL = max(2, _pow2(L))
    BLOCK = cfg.block
    SC = cfg.sample_chunk
    NW = cfg.num_warps
    total_units = sum(sizes)
    if total_units >= 2**31 - 1:
        raise ValueError(f"at most 2**31 - 2 entries in one call, got {total_units}")
    group_of = [0] * L if global_mode else list(range(L))
    gsize = [total_units] if global_mode else list(sizes)

    # ---- sampling plan
    # The sample fixes the bracket's width (~ margin_sd binomial sd of the sample rank, so
    # relative width ~ 1/sqrt(sample)) and the width the candidates. Per group: at least one
    # unit in `sample_every`, and at least the size that minimises sample + candidate bytes;
    # then at least what keeps the expected bracket within 80% of `cap_frac` (at most 1/32
    # of the group); a group whose bracket would still not fit gets a larger capacity.
    gk = [sum(ks)] if global_mode else list(ks)
    bits_possible = cfg.single_read and not src.k16 and 32 <= BLOCK <= 32768
    cand_bytes = src.key_bytes + (2 if bits_possible else 0)
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
    full = [gsize[group_of[i]] <= cfg.full_sample_max for i in range(L)]
    nch, span, msize = [], [], []
    for i, n in enumerate(sizes):
        if n == 0:
            c, s, m = 0, SC, 0
        elif full[i]:
            c, s, m = -(-n // SC), SC, n
        else:
            c = max(1, n // (SC * grate[group_of[i]]))
            s = n // c
            m = c * SC if s >= SC else n
        nch.append(c)
        span.append(s)
        msize.append(m)
    nblk = [-(-n // BLOCK) for n in sizes]
    blk_start = [0] * L
    chk_start = [0] * L
    for i in range(1, L):
        blk_start[i] = blk_start[i - 1] + nblk[i - 1]
        chk_start[i] = chk_start[i - 1] + nch[i - 1]
    n_blocks = blk_start[-1] + nblk[-1]
    n_chunks = chk_start[-1] + nch[-1]

    rows = []
    for i in range(L):
        row = [0] * _NF
        row[_F_AOFF], row[_F_BOFF], row[_F_N] = src.a_offs[i], src.b_offs[i], sizes[i]
        row[_F_BLK], row[_F_NBLK], row[_F_CHK] = blk_start[i], nblk[i], chk_start[i]
        row[_F_SPAN], row[_F_GROUP] = span[i], group_of[i]
        rows.append(row)
    meta = torch.tensor(rows, dtype=torch.int64)

    # ---- per-group plan: trivial groups, sample ranks, candidate capacity
    gm = [0] * G
    gfull = [True] * G
    for i in range(L):
        gm[group_of[i]] += msize[i]
        gfull[group_of[i]] = gfull[group_of[i]] and full[i]
    gs_rows, ts_rows = [], []  # ts: target 0 is the bracket's hi end (rank r_hi), target 1 its lo end
    trivial = [False] * G
    caps = [0] * G
    cbase = 0
    for g in range(G):
        n, k, m = gsize[g], gk[g], gm[g]
        if gfull[g] or k == 0 or k == n:
            caps[g] = 0
        elif cfg.cap_frac <= 0:  # no candidates at all (tests force the fallback this way)
            caps[g] = min(n, cfg.cap_slack)
        else:  # the expected bracket (2 delta of m sampled ranks, scaled to n) over 0.8
            q_g, m_g = k / max(1, n), max(1, m)
            d_g = cfg.margin_sd * math.sqrt(max(q_g * m_g * (1.0 - q_g), 1.0)) + cfg.margin_frac * m_g + 2.0
            need = 2.0 * d_g / m_g * n / 0.8
            caps[g] = min(n, int(math.ceil(max(cap_frac * n, need))) + cfg.cap_slack)
        row = [0] * _GF
        row[_G_CAP], row[_G_CBASE], row[_G_ACTIVE] = caps[g], cbase, 1
        cbase += caps[g]
        r_hi = r_lo = 0
        if k == 0 or k == n:
            trivial[g] = True
            row[_G_LO] = row[_G_HI] = _ALL_ONES if k == 0 else 0
        elif gfull[g]:
            r_hi = r_lo = k
        else:
            q = k / n
            rho = q * m
            delta = cfg.margin_sd * math.sqrt(max(rho * (1.0 - q), 1.0)) + cfg.margin_frac * m + 2.0
            r_hi = int(math.floor(rho - delta))
            r_lo = int(math.ceil(rho + delta))
        gs_rows.append(row)
        ts_rows += [[0, 0, r_hi, 0], [0, 0, r_lo, 0]]
    gs = torch.tensor(gs_rows, dtype=torch.int64)
    ts = torch.tensor(ts_rows, dtype=torch.int64)
    cand_size = cbase

    a_base, b_base = src.a_base, src.b_base
    kw = dict(KIND=src.kind, ADT=src.adt, BDT=src.bdt, K16=src.k16, AAL=src.a_align, BAL=src.b_align)
    kdt = torch.int16 if src.k16 else torch.int32
    shifts = src.shifts
    meta_d = _to_dev(meta, device)
    gs_d = _to_dev(gs, device)
    i32 = dict(dtype=torch.int32, device=device)
    stats = {"groups": G, "blocks": n_blocks}

    # ---- 1. sample + 2. radix select on the sample (two targets per group)
    if not all(trivial):
        keys = torch.empty(max(1, n_chunks * SC), dtype=kdt, device=device)
        CPP = cfg.chunks_per_program
        _sample_kernel[(triton.cdiv(n_chunks, CPP),)](
            a_base, b_base, meta_d, L, n_chunks, keys, SC=SC, CPP=CPP, MAXL=MAXL, NF=_NF, num_warps=4, **kw)
        seg = torch.zeros(G, 2, dtype=torch.int64)  # per group: first key, number of keys
        for i in reversed(range(L)):
            seg[group_of[i], 0] = chk_start[i] * SC
        for i in range(L):
            seg[group_of[i], 1] += nch[i] * SC
        ts_d = _to_dev(ts, device)
        _buffer_radix(keys, seg, ts_d, G, 2, int(seg[:, 1].max()), cfg, device, src)
        vals = ts_d.view(G, 2, 4)[:, :, 0]
        triv_d = _to_dev(torch.tensor(trivial), device)
        gs_d[:, _G_HI] = torch.where(triv_d, gs_d[:, _G_HI], vals[:, 0])
        gs_d[:, _G_LO] = torch.where(triv_d, gs_d[:, _G_LO], vals[:, 1])
        stats["sampled_units"] = int(sum(msize))
        del keys, vals  # freed before the candidate buffers: the peak is the larger of the two

    # single read: the bracket pass also writes one bit per unit (key > hi) and each candidate's
    # in-block position, and the write pass builds the selection from those (1/32 of a 32-bit
    # key's bytes) instead of reading the input again. 16-bit keys keep the second read: the
    # bits would be 1/16 of their bytes, more scratch than the 5% budget leaves.
    BITS = int(bits_possible and any(not trivial[g] and not gfull[g] for g in range(G)))

    # ---- 3. bracket pass: counts, validity, candidate compaction
    gc = torch.zeros(G, 4, dtype=torch.int64, device=device)
    blk_gt = torch.zeros(max(1, n_blocks), **i32)
    blk_cnt = torch.zeros(max(1, n_blocks), **i32)
    blk_run = torch.zeros(max(1, n_blocks), **i32)
    cand = torch.empty(max(1, cand_size), dtype=kdt, device=device)
    if BITS:
        cpos = torch.empty(max(1, cand_size), dtype=torch.int16, device=device)
        bits = torch.empty(max(1, n_blocks * (BLOCK // 32)), **i32)
        blk_nin = torch.zeros(max(1, n_blocks), **i32)
    else:
        cpos = bits = blk_nin = blk_run  # never read: BITS is a constexpr 0
    if n_blocks:
        _bracket_kernel[(n_blocks,)](a_base, b_base, meta_d, L, gs_d, gc, blk_gt, blk_cnt, blk_run, cand,
                                     blk_nin, cpos, bits,
                                     BLOCK=BLOCK, MAXL=MAXL, NF=_NF, GF=_GF, BITS=BITS, num_warps=NW, **kw)
    host = torch.cat([gc, gs_d[:, [_G_LO, _G_HI]]], dim=1).cpu()  # sync 1
    n_valid, n_above, n_in, fill = (host[:, j].tolist() for j in range(4))
    lo_h, hi_h = host[:, 4].tolist(), host[:, 5].tolist()

    thr = [0] * G
    quota = [0] * G
    mode = [0] * G
    radix_cand, radix_full, recount = [], [], []
    kprime = [0] * G
    for g in range(G):
        kp = min(gk[g], n_valid[g])
        kprime[g] = kp
        if kp == 0:
            thr[g] = _ALL_ONES  # nothing selected; every count is already zero
        elif kp == n_valid[g]:
            thr[g] = 0  # every valid key is above key 0
            if not trivial[g]:
                recount.append(g)
        elif n_above[g] < kp <= n_above[g] + n_in[g]:
            if lo_h[g] == hi_h[g]:
                thr[g], quota[g] = lo_h[g], kp - n_above[g]
            elif fill[g] <= caps[g]:
                mode[g] = 1
                radix_cand.append(g)
            else:
                radix_full.append(g)
        else:
            radix_full.append(g)
    stats.update(exact_bracket=sum(1 for g in range(G) if not trivial[g] and 0 < kprime[g] < n_valid[g]
                                   and mode[g] == 0 and g not in radix_full),
                 candidates=len(radix_cand), fallback=len(radix_full), recount=len(recount),
                 trivial=sum(trivial), candidate_keys=sum(fill[g] for g in radix_cand),
                 single_read=len(radix_cand) if BITS else 0)

    # ---- 4. exact threshold: candidate radix (small) and/or full-input radix (fallback)
    thr_d = _to_dev(torch.tensor(thr, dtype=torch.int64), device)
    quota_d = _to_dev(torch.tensor(quota, dtype=torch.int64), device)
    if radix_cand:
        ts_c = torch.zeros(G, 4, dtype=torch.int64)
        seg = torch.zeros(G, 2, dtype=torch.int64)
        for g in radix_cand:
            ts_c[g, 2] = kprime[g] - n_above[g]
            seg[g, 0] = int(gs_rows[g][_G_CBASE])
            seg[g, 1] = fill[g]
        ts_c = _to_dev(ts_c, device)
        _buffer_radix(cand, seg, ts_c, G, 1, max(fill[g] for g in radix_cand), cfg, device, src)
        thr_d, quota_d = _take_rows(radix_cand, G, ts_c, thr_d, quota_d, device)
    if radix_full:
        ts_f = torch.zeros(G, 4, dtype=torch.int64)
        active = torch.zeros(G, dtype=torch.int64)
        for g in radix_full:
            ts_f[g, 2] = kprime[g]
            active[g] = 1
        ts_f = _to_dev(ts_f, device)
        gs_d[:, _G_ACTIVE] = _to_dev(active, device)
        hist = torch.zeros(G * _NB, **i32)
        for lvl, shift in enumerate(shifts):
            _full_hist_kernel[(n_blocks,)](a_base, b_base, meta_d, L, gs_d, ts_f, hist, SHIFT=shift, NB=_NB,
                                           BLOCK=BLOCK, MAXL=MAXL, NF=_NF, GF=_GF, num_warps=NW, **kw)
            _select_kernel[(G,)](hist, ts_f, SHIFT=shift, NB=_NB, FIRST=lvl == 0, LAST=lvl == len(shifts) - 1,
                                 num_warps=1)
        thr_d, quota_d = _take_rows(radix_full, G, ts_f, thr_d, quota_d, device)
    gs_d[:, _G_T] = thr_d
    gs_d[:, _G_QUOTA] = quota_d
    gs_d[:, _G_MODE] = _to_dev(torch.tensor(mode, dtype=torch.int64), device)

    # counting pass (bracket kernel with lo == hi == T) where the bracket counts are not final
    recount = recount + radix_full
    if recount and n_blocks:
        active = torch.zeros(G, dtype=torch.int64)
        active[recount] = 1
        gs_d[:, _G_ACTIVE] = _to_dev(active, device)
        gs_d[:, _G_LO] = thr_d
        gs_d[:, _G_HI] = thr_d
        _bracket_kernel[(n_blocks,)](a_base, b_base, meta_d, L, gs_d, gc, blk_gt, blk_cnt, blk_run, cand,
                                     blk_nin, cpos, bits,
                                     BLOCK=BLOCK, MAXL=MAXL, NF=_NF, GF=_GF, BITS=0, num_warps=NW, **kw)

    # ---- 5. count, 6. scan, 7. write
    ltot = torch.zeros(L, 2, dtype=torch.int64, device=device)
    lout = torch.zeros(L, 2, dtype=torch.int64, device=device)
    blk_take = torch.zeros(max(1, n_blocks), **i32)
    blk_off = torch.zeros(max(1, n_blocks), **i32)
    out = torch.empty(max(1, sum(kprime)), **i32)
    if n_blocks:
        _count_kernel[(n_blocks,)](meta_d, L, gs_d, blk_gt, blk_cnt, blk_run, cand, ltot,
                                   RUNCH=cfg.run_chunk, MAXL=MAXL, NF=_NF, GF=_GF, K16=src.k16, num_warps=4)
    _scan_kernel[(L,)](meta_d, L, gs_d, ltot, blk_gt, blk_cnt, blk_take, blk_off, lout,
                       GLOBAL=global_mode, CH=cfg.scan_chunk, MAXL=MAXL, NF=_NF, GF=_GF, num_warps=4)
    if n_blocks:
        _write_kernel[(n_blocks,)](a_base, b_base, meta_d, L, gs_d, blk_gt, blk_take, blk_off, out,
                                   blk_run, blk_nin, cand, cpos, bits,
                                   BLOCK=BLOCK, MAXL=MAXL, NF=_NF, GF=_GF, BITS=BITS, num_warps=NW, **kw)
    lout_h = lout.cpu().tolist()  # sync 2
    total = sum(c for _, c in lout_h)
    if total != sum(kprime) or (not global_mode and any(lout_h[i][1] != kprime[i] for i in range(L))):
        raise RuntimeError(f"top-k internal error: selected {total} entries, expected {sum(kprime)}")
    last_stats.clear()
    last_stats.update(stats)
    return [out[s:s + c] for s, c in lout_h]


def _take_rows(groups, G, ts_d, thr_d, quota_d, device):
    """Threshold and tie quota of ``groups`` from a radix state, the others unchanged."""
    rows = torch.zeros(G, dtype=torch.bool)
    rows[groups] = True
    rows = _to_dev(rows, device)
    return torch.where(rows, ts_d[:, 0], thr_d), torch.where(rows, ts_d[:, 2], quota_d)


def _buffer_radix(keys, seg, ts_d, G: int, NT: int, max_len: int, cfg: TopkConfig, device, src) -> None:
    """Radix select over per-group segments of a compact key buffer (8-bit digits)."""
    seg_d = _to_dev(seg, device)
    hist = torch.zeros(G * NT * _NB, dtype=torch.int32, device=device)
    n_prog = max(1, triton.cdiv(max_len, cfg.buf_chunk))
    for lvl, shift in enumerate(src.shifts):
        _buf_hist_kernel[(n_prog, G)](keys, seg_d, ts_d, hist, NT=NT, SHIFT=shift, CH=cfg.buf_chunk, NB=_NB,
                                      K16=src.k16, num_warps=4)
        _select_kernel[(G * NT,)](hist, ts_d, SHIFT=shift, NB=_NB, FIRST=lvl == 0, LAST=lvl == len(src.shifts) - 1,
                                  num_warps=1)


def _score_source(scores, what="scores") -> tuple[_Source, list[int]]:
    if not isinstance(scores, (list, tuple)) or len(scores) == 0:
        raise ValueError(f"{what} must be a non-empty list of tensors")
    for i, s in enumerate(scores):
        _check_float(s, f"{what}[{i}]")
    _check_device(list(scores))
    dt = _common_dtype(scores)
    flat = _prep(scores, dt)
    src = _Source(flat, flat, _KIND["identity"], dt, dt, torch.empty(0, dtype=dt).element_size())
    return src, [s.numel() for s in scores]


def topk_per_layer(scores: list[torch.Tensor], ks: list[int], *, config: TopkConfig | None = None) -> list[torch.Tensor]:
    """Per-layer top-k: int32 sorted flat indices of the ``ks[i]`` largest entries of ``scores[i]``."""
    if not isinstance(ks, (list, tuple)):
        raise TypeError(f"ks must be a list of ints, got {type(ks).__name__}")
    src, sizes = _score_source(scores)
    if len(ks) != len(sizes):
        raise ValueError(f"got {len(sizes)} score tensors but {len(ks)} values of k")
    ks = [_check_k(k, n, f"ks[{i}]") for i, (k, n) in enumerate(zip(ks, sizes))]
    return _run_select(src, sizes, ks, False, config or DEFAULT_CONFIG, scores[0].device)


def topk_global(scores: list[torch.Tensor], k: int, *, config: TopkConfig | None = None) -> list[torch.Tensor]:
    """One threshold over all layers: exactly ``k`` kept overall (ties: layer order, then flat index)."""
    src, sizes = _score_source(scores)
    k = _check_k(k, sum(sizes), "k")
    return _run_select(src, sizes, [k], True, config or DEFAULT_CONFIG, scores[0].device)


def _fused_source(deltas, grads, score: str, block_size):
    """Validate Ŵ / G lists; return the source, the layer shapes and the number of units per layer."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
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
            _check_float(t, f"{name}[{i}]")
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
    _check_device(tensors)
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
                         config: TopkConfig | None = None) -> list[torch.Tensor]:
    """Top-k of a score computed on the fly from Ŵ (``deltas``) and G (``grads``), never materialised.

    ``score``: ``mcs`` = Ŵ⊙G (signed), ``snip`` = |Ŵ⊙G|, ``gm`` = |G| (``deltas`` may be None),
    ``wm`` = |Ŵ| (``grads`` may be None). Give exactly one of ``ks`` (per layer) or ``global_k``.
    ``block_size=None`` selects elements (flat element indices); ``block_size=B`` sums the score
    over ``B×B`` tiles (see :func:`delta_grad_tile_scores`) and selects tiles (flat block ids
    ``row_block * (d_in // B) + col_block``).
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
        ks = [_check_k(k, n, f"ks[{i}]") for i, (k, n) in enumerate(zip(ks, units))]
    else:
        global_k = _check_k(global_k, sum(units), "global_k")
    device = src.a_base.device
    if block_size is None:
        if ks is not None:
            return _run_select(src, units, ks, False, cfg, device)
        return _run_select(src, units, [global_k], True, cfg, device)
    tile_scores = _tile_scores(src, shapes, block_size, cfg, device)
    if ks is not None:
        return topk_per_layer(tile_scores, ks, config=cfg)
    return topk_global(tile_scores, global_k, config=cfg)


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
    meta = torch.zeros(L, _NF, dtype=torch.int64)
    blk = tout = 0
    for i, (r, c) in enumerate(shapes):
        meta[i, _F_AOFF] = src.a_offs[i]
        meta[i, _F_BOFF] = src.b_offs[i]
        meta[i, _F_N] = n_tiles[i]
        meta[i, _F_BLK] = blk
        meta[i, _F_TOUT] = tout
        meta[i, _F_NCOL] = c
        meta[i, _F_NBC] = c // block_size
        blk += -(-n_tiles[i] // TT)
        tout += n_tiles[i]
    buf = torch.empty(max(1, tout), dtype=torch.float32, device=device)
    if blk:
        _tile_kernel[(blk,)](src.a_base, src.b_base, _to_dev(meta, device), L, buf, TT=TT, BS=block_size,
                             BP=_pow2(block_size), MAXL=max(2, _pow2(L)), NF=_NF, KIND=src.kind,
                             ADT=src.adt, BDT=src.bdt, AAL=src.a_align, BAL=src.b_align, num_warps=4)
    out, start = [], 0
    for (r, c), n in zip(shapes, n_tiles):
        out.append(buf[start:start + n].view(r // block_size, c // block_size))
        start += n
    return out


def with_config(**changes) -> TopkConfig:
    """A copy of the default configuration with some fields changed (tests, tuning)."""
    return replace(DEFAULT_CONFIG, **changes)
