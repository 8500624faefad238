"""Fused masked-delta linear kernels: y = x (W + ΔW)ᵀ (+ b), its input gradient, the adapter
gradient and the mask-update score pass, in both storage phases of an adapted layer (search:
dense fp32 Ŵ + bool mask; fixed: compact fp32 values at int32 sorted flat indices, decoded
through a :class:`CompactLayout` from :func:`build_compact_layout`).

The launchers are drop-in twins of ``sparse_engine/kernels/reference.py`` (``masked_delta_linear``,
``masked_delta_grad_input``, ``masked_delta_grad_delta``, ``delta_score``, ``compact_*``), plus
the element top-k without a dense score (``score_histogram``, ``score_select``,
``threshold_from_histogram``, ``delta_score_topk``). Tiling, the compact layout's format, the
score passes, limits and status: docs/kernels.md, section "Masked-delta kernels".
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import runtime

runtime.require_triton(__name__)

import triton  # after the check that names the fix
import triton.language as tl

__all__ = [
    "LAYOUT_TILE",
    "CompactLayout",
    "build_compact_layout",
    "masked_delta_linear",
    "masked_delta_grad_input",
    "masked_delta_grad_delta",
    "delta_score",
    "compact_delta_linear",
    "compact_grad_input",
    "compact_grad_values",
    "score_histogram",
    "score_select",
    "threshold_from_histogram",
    "delta_score_topk",
    "score_key",
    "unpack_bits",
    "set_bit_positions",
    "jit_kernels",
]

LAYOUT_TILE = 64  # columns per layout tile; ranks 0..63 fit an int8
_SCORE_ID = {name: i for i, name in enumerate(runtime.SCORES)}
_HIST_BINS = 1 << 16

# weight-operand modes of the GEMM kernels
_W_DENSE = 0  # W + Ŵ (mask ignored)
_W_MASKED = 1  # W + Ŵ ⊙ M
_W_COMPACT = 2  # W + scatter(values) via CompactLayout

# epilogues of the G = dYᵀX kernel
_EPI_MASKED = 0  # dense fp32 G ⊙ M (or G)
_EPI_COMPACT = 1  # G at kept slots only
_EPI_SCORE = 2  # per-element score
_EPI_BLOCK = 3  # score summed per BS×BS tile
_EPI_HIST = 4  # histogram of a 16-bit digit of the score key
_EPI_SELECT = 5  # packed bits: key > T, key == T


# ============================================================================ configs


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP": group}, num_warps=warps, num_stages=stages)


# Autotune candidates for H100/H200. Forward: BLOCK_N = output columns, BLOCK_K =
# reduction (d_in). dX: BLOCK_K = output columns (d_in), BLOCK_N = reduction (d_out).
# G = dYᵀX: BLOCK_N × BLOCK_K output tile, BLOCK_M = token reduction step.
# All chosen to compile for sm_90 (triton 3.9, bf16, Phi-3 qkv specialisation) with no
# register spill and at most 227 KiB of shared memory (checked without a GPU by compiling for
# the target and reading cuobjdump -res-usage: benchmarks/bench_masked_delta.py --compile-report).
GPU_FWD_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(256, 128, 64, 8, 3),
    _cfg(128, 256, 32, 8, 3),
    _cfg(256, 128, 32, 8, 4),
    _cfg(128, 128, 32, 8, 4),
    _cfg(128, 128, 32, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 64, 64, 4, 4),
]
GPU_DX_CONFIGS = [
    _cfg(128, 64, 128, 8, 3),
    _cfg(256, 64, 128, 8, 3),
    _cfg(128, 32, 256, 8, 3),
    _cfg(256, 32, 128, 8, 4),
    _cfg(128, 32, 128, 8, 4),
    _cfg(64, 64, 128, 4, 4),
    _cfg(128, 64, 64, 4, 4),
]
GPU_GT_CONFIGS = [
    _cfg(64, 128, 128, 8, 3),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 128, 8, 4),  # 4 warps spilled in the compact epilogue (255 registers)
    _cfg(32, 128, 128, 8, 4),
    _cfg(64, 64, 64, 4, 4),
]
# fp32 activations with IEEE fp32 dots (no tensor cores; PyTorch's default fp32 matmul
# precision): the bf16 tiles above spill heavily there, these do not (or barely).
GPU_FP32_CONFIGS = [
    _cfg(64, 32, 32, 4, 2),
    _cfg(64, 64, 32, 8, 2),
    _cfg(32, 64, 32, 4, 2),
]
GPU_SCORE_TILE = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)

if runtime.INTERPRET:
    # small tiles: several tiles and reduction steps even at test shapes; BLOCK_K 32 (fwd)
    # and 128 (dX, G) exercise both compact-offset lookups (column tile within / across
    # 64-column layout tiles)
    _FWD_CONFIGS = [_cfg(32, 32, 32, 4, 1)]
    _DX_CONFIGS = [_cfg(32, 32, 128, 4, 1)]
    _GT_CONFIGS = [_cfg(32, 32, 128, 4, 1)]
    _SCORE_TILE = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
else:  # pragma: no cover - GPU only
    _FWD_CONFIGS, _DX_CONFIGS, _GT_CONFIGS = GPU_FWD_CONFIGS, GPU_DX_CONFIGS, GPU_GT_CONFIGS
    _SCORE_TILE = GPU_SCORE_TILE

# Tests and tuning scripts may pin one config per kernel ("fwd", "dx", "gt") here instead of
# autotuning: {name: triton.Config}. With runtime.AUTOTUNE off, each kernel's first listed config.
CONFIG_OVERRIDE: dict = {}


def _run(name, tuned, raw, grid, args, consts):
    cfg = CONFIG_OVERRIDE.get(name)
    if cfg is None and not runtime.AUTOTUNE:
        cfg = tuned.configs[0]
    if cfg is None:
        tuned[grid](*args, **consts)
    else:
        raw[grid](*args, **consts, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ============================================================================ kernels


@triton.jit
def _delta_tile(
    d_ptr, m_ptr, off_ptr, rn, rk, k0, N, K,
    s_dn, s_dk, s_mn, s_mk, n_tiles,
    MODE: tl.constexpr, BLOCK_K: tl.constexpr, LT: tl.constexpr,
):
    """fp32 ΔW tile [len(rn), len(rk)] (rows rn, columns rk starting at k0); 0 outside."""
    inb = (rn[:, None] < N) & (rk[None, :] < K)
    if MODE == 2:
        # compact: slot = offsets[r, c // LT] + rank[r, c]; rank −1 = not kept
        rank = tl.load(m_ptr + rn[:, None] * s_mn + rk[None, :] * s_mk, mask=inb, other=-1).to(tl.int32)
        if BLOCK_K <= LT:
            # the whole column tile lies in one layout tile (k0 is a multiple of BLOCK_K)
            base = tl.load(off_ptr + rn * n_tiles + k0 // LT, mask=rn < N, other=0)
            slot = base[:, None] + rank
        else:
            base = tl.load(off_ptr + rn[:, None] * n_tiles + (rk // LT)[None, :], mask=inb, other=0)
            slot = base + rank
        d = tl.load(d_ptr + slot, mask=inb & (rank >= 0), other=0.0).to(tl.float32)
    else:
        d = tl.load(d_ptr + rn[:, None] * s_dn + rk[None, :] * s_dk, mask=inb, other=0.0).to(tl.float32)
        if MODE == 1:
            keep = tl.load(m_ptr + rn[:, None] * s_mn + rk[None, :] * s_mk, mask=inb, other=0)
            d = tl.where(keep != 0, d, 0.0)
    return d


@triton.jit
def _grouped_pid(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP row tiles sweep the columns together."""
    width = GROUP * n_cols
    group_id = pid // width
    first = group_id * GROUP
    size = tl.minimum(n_rows - first, GROUP)
    pid_r = first + (pid % width) % size
    pid_c = (pid % width) // size
    return pid_r, pid_c


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, d_ptr, m_ptr, off_ptr, b_ptr, y_ptr,
    M, N, K, n_tiles, M_KEY,
    s_xm, s_xk, s_wn, s_wk, s_dn, s_dk, s_mn, s_mk, s_ym, s_yn,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr, LT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """y[M, N] = x[M, K] · (W + ΔW)[N, K]ᵀ (+ b)."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[:, None] * s_wn + rk[None, :] * s_wk, mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        d = _delta_tile(d_ptr, m_ptr, off_ptr, rn, rk, k0, N, K, s_dn, s_dk, s_mn, s_mk, n_tiles, MODE, BLOCK_K, LT)
        w_eff = (w.to(tl.float32) + d).to(x_ptr.dtype.element_ty)
        if UPCAST:
            a = a.to(tl.float32)
            w_eff = w_eff.to(tl.float32)
        if DOT_FP32:
            acc = tl.dot(a, tl.trans(w_eff), acc, input_precision=PREC)
        else:
            acc = tl.dot(a, tl.trans(w_eff), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _dx_kernel(
    dy_ptr, w_ptr, d_ptr, m_ptr, off_ptr, dx_ptr,
    M, N, K, n_tiles, M_KEY,
    s_gm, s_gn, s_wn, s_wk, s_dn, s_dk, s_mn, s_mk, s_xm, s_xk,
    MODE: tl.constexpr, UPCAST: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr, LT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """dX[M, K] = dY[M, N] · (W + ΔW)[N, K]."""
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    k0 = pid_k * BLOCK_K
    rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        g = tl.load(dy_ptr + rm[:, None] * s_gm + rn[None, :] * s_gn, mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = tl.load(w_ptr + rn[:, None] * s_wn + rk[None, :] * s_wk, mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        d = _delta_tile(d_ptr, m_ptr, off_ptr, rn, rk, k0, N, K, s_dn, s_dk, s_mn, s_mk, n_tiles, MODE, BLOCK_K, LT)
        w_eff = (w.to(tl.float32) + d).to(dy_ptr.dtype.element_ty)
        if UPCAST:
            g = g.to(tl.float32)
            w_eff = w_eff.to(tl.float32)
        if DOT_FP32:
            acc = tl.dot(g, w_eff, acc, input_precision=PREC)
        else:
            acc = tl.dot(g, w_eff, acc)
    tl.store(dx_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk, acc.to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.jit
def _score_key(s):
    """Order-preserving signed int32 key of fp32 scores; −0.0 is folded onto +0.0."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _gt_kernel(
    dy_ptr, x_ptr, d_ptr, m_ptr, off_ptr, out_ptr, out2_ptr,
    M, N, K, n_tiles, n_words, thresh, prefix, M_KEY,
    s_gm, s_gn, s_xm, s_xk, s_dn, s_dk, s_mn, s_mk, s_on, s_ok,
    EPI: tl.constexpr, HAS_MASK: tl.constexpr, SCORE: tl.constexpr, BS: tl.constexpr, DIGIT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr, LT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_K) tile of G = dYᵀX (fp32, reduction over the M tokens) + epilogue."""
    pid_n, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP)
    n0 = pid_n * BLOCK_N
    k0 = pid_k * BLOCK_K
    rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
    inb = (rn[:, None] < N) & (rk[None, :] < K)

    # does this tile need G at all?
    need = 1
    if EPI == 0:
        if HAS_MASK:
            keep = tl.load(m_ptr + rn[:, None] * s_mn + rk[None, :] * s_mk, mask=inb, other=0)
            need = tl.max(tl.max(keep.to(tl.int32), axis=1), axis=0)
    if EPI == 1:
        rank = tl.load(m_ptr + rn[:, None] * s_mn + rk[None, :] * s_mk, mask=inb, other=-1).to(tl.int32)
        need = tl.max(tl.max(rank, axis=1), axis=0) + 1  # > 0 iff something is kept
    if EPI >= 2:
        if SCORE == 3:  # wm = |Ŵ| needs no gradient
            need = 0

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if need > 0:
        for m0 in range(0, M, BLOCK_M):
            rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            g = tl.load(dy_ptr + rm[:, None] * s_gm + rn[None, :] * s_gn, mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
            a = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            if UPCAST:
                g = g.to(tl.float32)
                a = a.to(tl.float32)
            if DOT_FP32:
                acc = tl.dot(tl.trans(g), a, acc, input_precision=PREC)
            else:
                acc = tl.dot(tl.trans(g), a, acc)

    # mask / rank tiles are reloaded here (L2 hits) rather than kept live across the loop
    if EPI == 0:
        res = acc
        if HAS_MASK:
            keep = tl.load(m_ptr + rn[:, None] * s_mn + rk[None, :] * s_mk, mask=inb, other=0)
            res = tl.where(keep != 0, acc, 0.0)
        tl.store(out_ptr + rn[:, None] * s_on + rk[None, :] * s_ok, res, mask=inb)
    elif EPI == 1:
        rank = tl.load(m_ptr + rn[:, None] * s_mn + rk[None, :] * s_mk, mask=inb, other=-1).to(tl.int32)
        if BLOCK_K <= LT:
            base = tl.load(off_ptr + rn * n_tiles + k0 // LT, mask=rn < N, other=0)
            slot = base[:, None] + rank
        else:
            base = tl.load(off_ptr + rn[:, None] * n_tiles + (rk // LT)[None, :], mask=inb, other=0)
            slot = base + rank
        tl.store(out_ptr + slot, acc, mask=inb & (rank >= 0))
    else:
        dlt = tl.load(d_ptr + rn[:, None] * s_dn + rk[None, :] * s_dk, mask=inb, other=0.0).to(tl.float32)
        if SCORE == 0:
            sc = dlt * acc
        elif SCORE == 1:
            sc = tl.abs(dlt * acc)
        elif SCORE == 2:
            sc = tl.abs(acc)
        else:
            sc = tl.abs(dlt)
        if EPI == 2:
            tl.store(out_ptr + rn[:, None] * s_on + rk[None, :] * s_ok, sc.to(out_ptr.dtype.element_ty), mask=inb)
        elif EPI == 3:
            # per BS×BS tile sums (dims are multiples of BS: out-of-range lanes are whole tiles)
            sc = tl.where(inb, sc, 0.0)
            part = tl.sum(tl.sum(tl.reshape(sc, (BLOCK_N // BS, BS, BLOCK_K // BS, BS)), axis=3), axis=1)
            bn = n0 // BS + tl.arange(0, BLOCK_N // BS)
            bk = k0 // BS + tl.arange(0, BLOCK_K // BS)
            tl.store(out_ptr + bn[:, None] * s_on + bk[None, :] * s_ok, part,
                     mask=(bn[:, None] < N // BS) & (bk[None, :] < K // BS))
        else:
            key = _score_key(sc)
            valid = inb & (sc == sc)  # NaN is never counted nor selected
            if EPI == 4:
                if DIGIT == 0:
                    binv = (key >> 16) + 32768
                else:
                    valid = valid & ((key >> 16) == prefix)
                    binv = key & 0xFFFF
                tl.atomic_add(out_ptr + binv, tl.full((BLOCK_N, BLOCK_K), 1, tl.int32), mask=valid, sem="relaxed")
            else:
                shifts = tl.arange(0, 32)[None, None, :]
                gt = tl.reshape((valid & (key > thresh)).to(tl.int32), (BLOCK_N, BLOCK_K // 32, 32))
                eq = tl.reshape((valid & (key == thresh)).to(tl.int32), (BLOCK_N, BLOCK_K // 32, 32))
                w_gt = tl.xor_sum(gt << shifts, axis=2)  # distinct bits: xor == or
                w_eq = tl.xor_sum(eq << shifts, axis=2)
                rw = k0 // 32 + tl.arange(0, BLOCK_K // 32)
                wmask = (rn[:, None] < N) & (rw[None, :] < n_words)
                tl.store(out_ptr + rn[:, None] * n_words + rw[None, :], w_gt, mask=wmask)
                tl.store(out2_ptr + rn[:, None] * n_words + rw[None, :], w_eq, mask=wmask)


# M_KEY: the token count rounded up to a power of two. It only keys the autotuner, so that
# tuning does not rerun for every sequence length; the kernels ignore it.
_fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=["M_KEY", "N", "K", "MODE"])(_fwd_kernel)
_dx_tuned = triton.autotune(configs=_DX_CONFIGS, key=["M_KEY", "N", "K", "MODE"])(_dx_kernel)
_fwd_tuned_f32 = triton.autotune(configs=_FWD_CONFIGS if runtime.INTERPRET else GPU_FP32_CONFIGS,
                                 key=["M_KEY", "N", "K", "MODE"])(_fwd_kernel)
_dx_tuned_f32 = triton.autotune(configs=_DX_CONFIGS if runtime.INTERPRET else GPU_FP32_CONFIGS,
                                key=["M_KEY", "N", "K", "MODE"])(_dx_kernel)
_gt_tuned = triton.autotune(configs=_GT_CONFIGS, key=["M_KEY", "N", "K", "EPI", "HAS_MASK"])(_gt_kernel)


def jit_kernels() -> dict:
    """The jit kernels by name (``fwd``, ``dx``, ``gt``), for compile checks without a GPU: the
    GEMM kernels autotune over ``GPU_FWD_CONFIGS`` / ``GPU_DX_CONFIGS`` / ``GPU_GT_CONFIGS``
    (``GPU_FP32_CONFIGS`` for IEEE fp32), the score epilogues run ``GPU_SCORE_TILE``."""
    return {"fwd": _fwd_kernel, "dx": _dx_kernel, "gt": _gt_kernel}


# ============================================================================ validation


def _weight(weight, d_in: int | None = None, name: str = "weight") -> tuple[int, int]:
    runtime.check_float(weight, name)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [d_out, d_in], got shape {tuple(weight.shape)}")
    if d_in is not None and weight.shape[1] != d_in:
        raise ValueError(f"{name} has d_in={weight.shape[1]} but the activations' last dim is {d_in}")
    return weight.shape[0], weight.shape[1]


def _acts(t, name: str, width: int | None = None, width_name: str = "") -> torch.Tensor:
    """Flatten ``[..., width]`` activations to 2-D (a view when the strides allow, else a copy)."""
    runtime.check_float(t, name)
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension [..., features]")
    if width is not None and t.shape[-1] != width:
        raise ValueError(f"{name} has last dim {t.shape[-1]} but {width_name} is {width}")
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # -1 is ambiguous for 0 features


def _delta_and_mask(delta, mask, shape):
    runtime.check_float(delta, "delta")
    if tuple(delta.shape) != tuple(shape):
        raise ValueError(f"delta must have the weight's shape {tuple(shape)}, got {tuple(delta.shape)}")
    if mask is None:
        return None
    runtime.check_tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (or None), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have the weight's shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask.view(torch.uint8)  # same strides, loadable bytes


def _bias(bias, d_out: int):
    if bias is None:
        return None
    runtime.check_float(bias, "bias")
    if bias.dim() != 1 or bias.shape[0] != d_out:
        raise ValueError(f"bias must have shape [{d_out}], got {tuple(bias.shape)}")
    return bias if bias.stride(0) == 1 else bias.contiguous()


def _out(out, shape, dtype, device, name="out") -> torch.Tensor:
    return runtime.output(out, shape, dtype, device, name=name, contiguous=True)


def _dot_flags(dtype: torch.dtype, device: torch.device) -> dict:
    upcast = runtime.upcast_bf16(dtype)
    dot_fp32 = dtype == torch.float32 or upcast
    prec = "ieee"
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        prec = "tf32"  # follow PyTorch's own fp32 matmul setting
    return dict(UPCAST=upcast, DOT_FP32=dot_fp32, PREC=prec)


def _ieee(consts: dict) -> bool:
    """fp32 operands multiplied without tensor cores: use the small-tile config list."""
    return consts["DOT_FP32"] and consts["PREC"] == "ieee" and not consts["UPCAST"]


def _dummy(device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.float32, device=device)


def _tokens_match(dy2: torch.Tensor, x2: torch.Tensor) -> None:
    if dy2.shape[0] != x2.shape[0]:
        raise ValueError(f"dy has {dy2.shape[0]} tokens but x has {x2.shape[0]}")
    if dy2.dtype != x2.dtype:
        raise TypeError(f"dy and x must have the same dtype, got {dy2.dtype} and {x2.dtype}")


# ============================================================================ compact layout


@dataclasses.dataclass(frozen=True, eq=False)
class CompactLayout:
    """Per-layer lookup structure of a frozen element mask (built by :func:`build_compact_layout`).

    ``rank`` int8 ``[d_out, d_in]``: −1 where not kept, else the rank of the element among the
    kept elements of its row inside its ``tile``-column tile. ``offsets`` int32
    ``[d_out * n_tiles + 1]``: number of kept elements before (row, tile) in flat row-major
    order (the last entry is ``nnz``). Slot of kept (r, c): ``offsets[r*n_tiles + c//tile] + rank[r, c]``.
    """

    shape: tuple[int, int]
    nnz: int
    rank: torch.Tensor
    offsets: torch.Tensor
    tile: int
    n_tiles: int
    indices_key: tuple

    def check(self, indices: torch.Tensor, shape, device) -> None:
        if tuple(shape) != self.shape:
            raise ValueError(f"layout was built for shape {self.shape}, the weight is {tuple(shape)}")
        if self.rank.device != device:
            raise ValueError(f"layout is on {self.rank.device}, the inputs are on {device}; rebuild it")
        if _indices_key(indices) != self.indices_key:
            raise ValueError(
                "layout was built for a different indices tensor (or the indices were modified in place); "
                "rebuild it with build_compact_layout(indices, shape)"
            )

    def nbytes(self) -> int:
        return self.rank.numel() * self.rank.element_size() + self.offsets.numel() * 4


def _indices_key(indices: torch.Tensor) -> tuple:
    # inference tensors have no version counter (and cannot be written outside inference mode)
    version = None if indices.is_inference() else indices._version
    return (indices.data_ptr(), version, indices.numel(), str(indices.device))


def _check_indices(indices, shape) -> None:
    runtime.check_tensor(indices, "indices")
    if indices.dtype != torch.int32:
        raise TypeError(f"indices must be int32 flat row-major indices, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
    if not indices.is_contiguous():
        raise ValueError("indices must be contiguous")
    n = shape[0] * shape[1]
    if n > 2**31 - 1:
        raise ValueError(f"a {shape[0]}x{shape[1]} weight has more elements than int32 flat indices can address")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"indices must lie in [0, {n}) for a {shape[0]}x{shape[1]} weight, got range [{lo}, {hi}]")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError("indices must be sorted ascending and unique")


def build_compact_layout(indices: torch.Tensor, shape, tile: int = LAYOUT_TILE) -> CompactLayout:
    """Validate ``indices`` (int32, 1-D, sorted, unique, in range) and build the :class:`CompactLayout`.

    Built once when a mask is frozen (one pass over the indices, a few syncs for validation);
    pass it on every fixed-phase call. Works on any device (plain PyTorch).
    """
    if len(tuple(shape)) != 2:
        raise ValueError(f"shape must be (d_out, d_in), got {tuple(shape)}")
    d_out, d_in = (int(s) for s in shape)
    if d_out <= 0 or d_in <= 0:
        raise ValueError(f"shape must be positive, got {(d_out, d_in)}")
    if tile != LAYOUT_TILE:
        raise ValueError(f"the kernels are compiled for layout tile {LAYOUT_TILE}, got {tile}")
    _check_indices(indices, (d_out, d_in))
    dev = indices.device
    n_tiles = triton.cdiv(d_in, tile)
    idx = indices.long()
    rows, cols = idx // d_in, idx % d_in
    bucket = rows * n_tiles + cols // tile  # non-decreasing because indices are sorted
    counts = torch.bincount(bucket, minlength=d_out * n_tiles)
    offsets = torch.zeros(d_out * n_tiles + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=offsets[1:])
    rank = torch.arange(idx.numel(), device=dev) - offsets[bucket]
    rank_map = torch.full((d_out, d_in), -1, dtype=torch.int8, device=dev)
    rank_map.view(-1)[idx] = rank.to(torch.int8)
    return CompactLayout(
        shape=(d_out, d_in), nnz=int(idx.numel()), rank=rank_map, offsets=offsets.to(torch.int32),
        tile=tile, n_tiles=n_tiles, indices_key=_indices_key(indices),
    )


def _layout(indices, shape, layout) -> CompactLayout:
    if layout is None:
        return build_compact_layout(indices, shape)
    if not isinstance(layout, CompactLayout):
        raise TypeError(f"layout must be a CompactLayout from build_compact_layout, got {type(layout).__name__}")
    runtime.check_tensor(indices, "indices")
    layout.check(indices, shape, indices.device)
    return layout


def _values(values, layout: CompactLayout):
    runtime.check_float(values, "values")
    if values.dim() != 1 or values.numel() != layout.nnz:
        raise ValueError(f"values must be 1-D with nnz={layout.nnz} entries, got shape {tuple(values.shape)}")
    if not values.is_contiguous():
        raise ValueError("values must be contiguous")
    return values if values.numel() else _dummy(values.device)


# ============================================================================ GEMM launchers


def _launch_fwd(x2, weight, dparts, bias, y2, mode, n_tiles=1):
    M, K = x2.shape
    N = weight.shape[0]
    if M == 0 or N == 0:
        return y2
    d, m, off, s_d, s_m = dparts
    b = bias if bias is not None else _dummy(x2.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    args = (
        x2, weight, d, m, off, b, y2,
        M, N, K, n_tiles, runtime.pow2(M),
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), s_d[0], s_d[1], s_m[0], s_m[1],
        y2.stride(0), y2.stride(1),
    )
    consts = dict(MODE=mode, HAS_BIAS=bias is not None, LT=LAYOUT_TILE, **_dot_flags(x2.dtype, x2.device))
    _run("fwd", _fwd_tuned_f32 if _ieee(consts) else _fwd_tuned, _fwd_kernel, grid, args, consts)
    return y2


def _launch_dx(dy2, weight, dparts, dx2, mode, n_tiles=1):
    M, N = dy2.shape
    K = weight.shape[1]
    if M == 0 or K == 0:
        return dx2
    d, m, off, s_d, s_m = dparts
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    args = (
        dy2, weight, d, m, off, dx2,
        M, N, K, n_tiles, runtime.pow2(M),
        dy2.stride(0), dy2.stride(1), weight.stride(0), weight.stride(1), s_d[0], s_d[1], s_m[0], s_m[1],
        dx2.stride(0), dx2.stride(1),
    )
    consts = dict(MODE=mode, LT=LAYOUT_TILE, **_dot_flags(dy2.dtype, dy2.device))
    _run("dx", _dx_tuned_f32 if _ieee(consts) else _dx_tuned, _dx_kernel, grid, args, consts)
    return dx2


def _dense_parts(delta, mask_u8):
    if mask_u8 is None:
        return (delta, delta, delta, delta.stride(), delta.stride()), _W_DENSE
    return (delta, mask_u8, delta, delta.stride(), mask_u8.stride()), _W_MASKED


def _compact_parts(vals, layout):
    return (vals, layout.rank, layout.offsets, (0, 0), layout.rank.stride()), _W_COMPACT


def _fill_empty(out, value=0.0):
    if out.numel():
        out.fill_(value)
    return out


# -------------------------------------------------------------------------- search phase


def masked_delta_linear(x, weight, delta, mask, bias=None, *, out=None):
    """y = x (W + Ŵ⊙M)ᵀ + b in x's dtype; ``mask=None`` ignores the mask. W + Ŵ⊙M is never stored."""
    runtime.check_tensor(x, "x")
    d_out, d_in = _weight(weight, x.shape[-1] if x.dim() else None)
    x2 = _acts(x, "x", d_in, "weight's d_in")
    mask_u8 = _delta_and_mask(delta, mask, (d_out, d_in))
    bias = _bias(bias, d_out)
    runtime.check_same_device(x.device, weight=weight, delta=delta, mask=mask, bias=bias)
    runtime.check_usable(x, "masked-delta")
    y = _out(out, (*x.shape[:-1], d_out), x.dtype, x.device)
    y2 = y.view(x2.shape[0], d_out)
    if d_in == 0:
        return _fill_empty(y) if bias is None else y.copy_(bias.to(y.dtype).expand_as(y))
    parts, mode = _dense_parts(delta, mask_u8)
    _launch_fwd(x2, weight, parts, bias, y2, mode)
    return y


def masked_delta_grad_input(dy, weight, delta, mask, *, out=None):
    """dX = dY (W + Ŵ⊙M) in dy's dtype."""
    runtime.check_tensor(dy, "dy")
    d_out, d_in = _weight(weight)
    dy2 = _acts(dy, "dy", d_out, "weight's d_out")
    mask_u8 = _delta_and_mask(delta, mask, (d_out, d_in))
    runtime.check_same_device(dy.device, weight=weight, delta=delta, mask=mask)
    runtime.check_usable(dy, "masked-delta")
    dx = _out(out, (*dy.shape[:-1], d_in), dy.dtype, dy.device)
    if d_out == 0:
        return _fill_empty(dx)
    parts, mode = _dense_parts(delta, mask_u8)
    _launch_dx(dy2, weight, parts, dx.view(dy2.shape[0], d_in), mode)
    return dx


def _launch_gt(dy2, x2, out, epi, *, d=None, m=None, off=None, out2=None, has_mask=False, score=0, bs=1,
               digit=0, thresh=0, prefix=0, n_tiles=1, n_words=1, fixed=False, s_out=(0, 0)):
    M = dy2.shape[0]
    N, K = dy2.shape[1], x2.shape[1]
    dev = x2.device
    dum = _dummy(dev)
    d = dum if d is None else d
    m = dum if m is None else m
    off = dum if off is None else off
    out2 = dum if out2 is None else out2
    s_d = d.stride() if d.dim() == 2 else (0, 0)
    s_m = m.stride() if m.dim() == 2 else (0, 0)
    args = (
        dy2, x2, d, m, off, out, out2,
        M, N, K, n_tiles, n_words, thresh, prefix, runtime.pow2(M),
        dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), s_d[0], s_d[1], s_m[0], s_m[1], s_out[0], s_out[1],
    )
    consts = dict(EPI=epi, HAS_MASK=has_mask, SCORE=score, BS=bs, DIGIT=digit, LT=LAYOUT_TILE,
                  **_dot_flags(x2.dtype, dev))
    if fixed:
        t = dict(_SCORE_TILE)
        bn, bk = max(t["BLOCK_N"], bs), max(t["BLOCK_K"], bs)
        grid = (triton.cdiv(N, bn) * triton.cdiv(K, bk),)
        _gt_kernel[grid](*args, **consts, BLOCK_M=t["BLOCK_M"], BLOCK_N=bn, BLOCK_K=bk, GROUP=8,
                         num_warps=t["num_warps"], num_stages=t["num_stages"])
    else:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
        _run("gt", _gt_tuned, _gt_kernel, grid, args, consts)


def _grad_operands(dy, x, d_out=None, d_in=None):
    runtime.check_tensor(dy, "dy")
    runtime.check_tensor(x, "x")
    dy2 = _acts(dy, "dy", d_out, "d_out")
    x2 = _acts(x, "x", d_in, "d_in")
    _tokens_match(dy2, x2)
    runtime.check_same_device(x.device, dy=dy)
    runtime.check_usable(x, "masked-delta")
    return dy2, x2


def masked_delta_grad_delta(dy, x, mask, *, out=None):
    """dŴ = (dYᵀX) ⊙ M, dense fp32 ``[d_out, d_in]`` (``mask=None``: G itself). Masked-out
    entries are exact zeros; tiles with nothing kept skip the token loop."""
    dy2, x2 = _grad_operands(dy, x)
    shape = (dy2.shape[1], x2.shape[1])
    mask_u8 = None
    if mask is not None:
        runtime.check_tensor(mask, "mask")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (or None), got {mask.dtype}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask must have shape (d_out, d_in) = {shape}, got {tuple(mask.shape)}")
        runtime.check_same_device(x.device, mask=mask)
        mask_u8 = mask.view(torch.uint8)
    g = _out(out, shape, torch.float32, x.device)
    if g.numel() == 0:
        return g
    _launch_gt(dy2, x2, g, _EPI_MASKED, m=mask_u8, has_mask=mask is not None, s_out=g.stride())
    return g


def _score_args(dy, x, delta, score):
    if score not in runtime.SCORES:
        raise ValueError(f"score must be one of {runtime.SCORES}, got {score!r}")
    runtime.check_float(delta, "delta")
    if delta.dim() != 2:
        raise ValueError(f"delta must be 2-D [d_out, d_in], got shape {tuple(delta.shape)}")
    dy2, x2 = _grad_operands(dy, x, delta.shape[0], delta.shape[1])
    runtime.check_same_device(x.device, delta=delta)
    return dy2, x2


def delta_score(dy, x, delta, score: str = "mcs", block_size: int | None = None, *, out=None,
                out_dtype: torch.dtype = torch.float32):
    """Mask-update score from G = dYᵀX, computed in the GEMM epilogue; G itself is never written.

    mcs = Ŵ⊙G (signed), snip = |Ŵ⊙G|, gm = |G|, wm = |Ŵ|. ``block_size=None``: per element,
    ``[d_out, d_in]`` in ``out_dtype`` (fp32 = the reference; bf16/fp16 halve the bytes).
    ``block_size=B`` (a power of two ≤ 128 dividing both dims): fp32 sums per B×B tile,
    ``[d_out/B, d_in/B]`` (1/B² of the bytes). For an element top-k that writes no dense
    score at all see :func:`delta_score_topk`.
    """
    dy2, x2 = _score_args(dy, x, delta, score)
    d_out, d_in = delta.shape
    sid = _SCORE_ID[score]
    if block_size is None:
        if out_dtype not in runtime.FLOAT_DTYPES:
            raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
        res = _out(out, (d_out, d_in), out_dtype, x.device)
        if res.numel():
            _launch_gt(dy2, x2, res, _EPI_SCORE, d=delta, score=sid, fixed=True, s_out=res.stride())
        return res
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int or None, got {type(block_size).__name__}")
    if block_size < 1 or block_size > 128 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [1, 128], got {block_size}")
    if d_out % block_size or d_in % block_size:
        raise ValueError(f"block_size {block_size} must divide the weight's dims ({d_out}, {d_in})")
    res = _out(out, (d_out // block_size, d_in // block_size), torch.float32, x.device)
    if res.numel():
        _launch_gt(dy2, x2, res, _EPI_BLOCK, d=delta, score=sid, bs=block_size, fixed=True, s_out=res.stride())
    return res


# --------------------------------------------------------------------------- fixed phase


def compact_delta_linear(x, weight, values, indices, bias=None, layout=None, *, out=None):
    """y = x (W + ΔW)ᵀ + b, ΔW = ``values`` at flat ``indices``; ``layout`` from
    :func:`build_compact_layout` (built here, with full index validation, when ``None``)."""
    runtime.check_tensor(x, "x")
    d_out, d_in = _weight(weight, x.shape[-1] if x.dim() else None)
    x2 = _acts(x, "x", d_in, "weight's d_in")
    bias = _bias(bias, d_out)
    runtime.check_same_device(x.device, weight=weight, values=values, indices=indices, bias=bias)
    lay = _layout(indices, (d_out, d_in), layout)
    vals = _values(values, lay)
    runtime.check_usable(x, "masked-delta")
    y = _out(out, (*x.shape[:-1], d_out), x.dtype, x.device)
    parts, mode = _compact_parts(vals, lay)
    _launch_fwd(x2, weight, parts, bias, y.view(x2.shape[0], d_out), mode, lay.n_tiles)
    return y


def compact_grad_input(dy, weight, values, indices, layout=None, *, out=None):
    """dX = dY (W + ΔW), ΔW compact."""
    runtime.check_tensor(dy, "dy")
    d_out, d_in = _weight(weight)
    dy2 = _acts(dy, "dy", d_out, "weight's d_out")
    runtime.check_same_device(dy.device, weight=weight, values=values, indices=indices)
    lay = _layout(indices, (d_out, d_in), layout)
    vals = _values(values, lay)
    runtime.check_usable(dy, "masked-delta")
    dx = _out(out, (*dy.shape[:-1], d_in), dy.dtype, dy.device)
    parts, mode = _compact_parts(vals, lay)
    _launch_dx(dy2, weight, parts, dx.view(dy2.shape[0], d_in), mode, lay.n_tiles)
    return dx


def compact_grad_values(dy, x, indices, layout=None, *, out=None):
    """d values = (dYᵀX) at the kept flat ``indices``, fp32 ``[nnz]``. Only kept entries are
    written (no dense gradient); tiles with nothing kept skip the token loop."""
    dy2, x2 = _grad_operands(dy, x)
    shape = (dy2.shape[1], x2.shape[1])
    runtime.check_same_device(x.device, indices=indices)
    lay = _layout(indices, shape, layout)
    gv = _out(out, (lay.nnz,), torch.float32, x.device)
    if lay.nnz == 0:
        return gv
    _launch_gt(dy2, x2, gv, _EPI_COMPACT, m=lay.rank, off=lay.offsets, n_tiles=lay.n_tiles)
    return gv


# ================================================================ element top-k, no dense score


def score_key(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 key of fp32 scores (the kernels' key; −0.0 maps to +0.0's key)."""
    s = scores.float()
    s = torch.where(s == 0, torch.zeros_like(s), s)
    bits = s.view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def score_histogram(dy, x, delta, score: str = "mcs", *, prefix: int | None = None, hist=None):
    """Histogram (int32 ``[65536]``) of a 16-bit digit of the scores' order-preserving key.

    ``prefix=None``: the high 16 bits (bin = (key >> 16) + 32768). ``prefix=p``: the low 16
    bits among elements whose high digit is ``p`` (``p`` in [-32768, 32767]). NaN scores are
    not counted. Counts are *added* into ``hist`` when given (sum over batches or layers).
    """
    dy2, x2 = _score_args(dy, x, delta, score)
    if prefix is not None and not (-32768 <= int(prefix) <= 32767):
        raise ValueError(f"prefix must be a high key digit in [-32768, 32767], got {prefix}")
    if hist is None:
        hist = torch.zeros(_HIST_BINS, dtype=torch.int32, device=x.device)
    else:
        runtime.check_tensor(hist, "hist")
        if hist.dtype != torch.int32 or tuple(hist.shape) != (_HIST_BINS,) or not hist.is_contiguous():
            raise ValueError(f"hist must be a contiguous int32 tensor of shape ({_HIST_BINS},)")
        runtime.check_same_device(x.device, hist=hist)
    if delta.numel():
        _launch_gt(dy2, x2, hist, _EPI_HIST, d=delta, score=_SCORE_ID[score], digit=0 if prefix is None else 1,
                   prefix=0 if prefix is None else int(prefix), fixed=True)
    return hist


def score_select(dy, x, delta, threshold_key: int, score: str = "mcs"):
    """Packed bit masks (int32 ``[d_out, ceil(d_in/32)]``, bit j of word w = column 32w + j)
    of the elements whose score key is ``> threshold_key`` and ``== threshold_key``."""
    dy2, x2 = _score_args(dy, x, delta, score)
    d_out, d_in = delta.shape
    n_words = triton.cdiv(d_in, 32) if d_in else 0
    gt = torch.empty((d_out, n_words), dtype=torch.int32, device=x.device)
    eq = torch.empty_like(gt)
    if gt.numel():
        _launch_gt(dy2, x2, gt, _EPI_SELECT, d=delta, out2=eq, score=_SCORE_ID[score], thresh=int(threshold_key),
                   n_words=n_words, fixed=True)
    return gt, eq


def threshold_from_histogram(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin, count strictly above it) such that the k-th largest key falls in ``bin``.

    ``hist`` from :func:`score_histogram`; requires 1 ≤ k ≤ hist.sum().
    """
    h = hist.long().cpu()
    total = int(h.sum())
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    above = torch.cumsum(h.flip(0), 0).flip(0) - h  # count in bins strictly above each bin
    b = int(((above < k) & (above + h >= k)).nonzero().max())
    return b, int(above[b])


def unpack_bits(words: torch.Tensor, d_in: int) -> torch.Tensor:
    """bool ``[rows, d_in]`` from the packed int32 words of :func:`score_select` (a dense
    view for inspection; :func:`set_bit_positions` lists the set bits without one)."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(words.shape[0], 32 * words.shape[1])[:, :d_in].bool()


_UNPACK_CHUNK = 1 << 16  # words expanded at a time: 8 MiB of int32 temporaries


def set_bit_positions(words: torch.Tensor, d_in: int, limit: int | None = None) -> torch.Tensor:
    """int64 ascending flat positions (row · d_in + column) of the set bits of packed words
    ``[rows, ceil(d_in/32)]``, the first ``limit`` of them when given.

    Only the nonzero words are expanded, a chunk at a time, so the temporaries stay small
    whatever the matrix size (a full unpack costs 32 int32 per word)."""
    n_words = words.shape[1]
    nonzero = words.reshape(-1).nonzero().flatten()
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    found, count = [], 0
    for start in range(0, nonzero.numel(), _UNPACK_CHUNK):
        at = nonzero[start:start + _UNPACK_CHUNK]
        bits = ((words.reshape(-1)[at].unsqueeze(1) >> shifts) & 1).bool()
        word_row, word_col = at // n_words, at % n_words
        col = word_col.unsqueeze(1) * 32 + shifts
        pos = (word_row.unsqueeze(1) * d_in + col)[bits & (col < d_in)]
        found.append(pos)
        count += pos.numel()
        if limit is not None and count >= limit:
            break
    out = torch.cat(found) if found else torch.zeros(0, dtype=torch.int64, device=words.device)
    return out if limit is None else out[:limit]


def delta_score_topk(dy, x, delta, k: int, score: str = "mcs") -> torch.Tensor:
    """int32 sorted flat indices of the ``k`` largest element scores, without a dense score.

    Three G passes (high-digit histogram, low-digit histogram, select); equals
    ``reference.topk_flat_indices(delta_score(dy, x, delta, score), k)`` on the same scores:
    ties at the threshold by lower flat index, ±0 equal, NaN never selected (fewer than k
    returned when fewer are not NaN).
    """
    dy2, x2 = _score_args(dy, x, delta, score)
    d_out, d_in = delta.shape
    n = d_out * d_in
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}], got {k!r}")
    dev = x.device
    if k == 0:
        return torch.zeros(0, dtype=torch.int32, device=dev)
    hi = score_histogram(dy, x, delta, score)
    n_valid = int(hi.sum())
    if k >= n_valid:  # every non-NaN element
        thresh, take_eq = -(2**31), n  # key > INT_MIN or == INT_MIN: all valid
    else:
        b_hi, above_hi = threshold_from_histogram(hi, k)
        prefix = b_hi - 32768
        lo = score_histogram(dy, x, delta, score, prefix=prefix)
        b_lo, above_lo = threshold_from_histogram(lo, k - above_hi)
        thresh = prefix * 65536 + b_lo  # the exact int32 key of the k-th largest score
        take_eq = k - above_hi - above_lo
    gt, eq = score_select(dy, x, delta, thresh, score)
    sel_gt = set_bit_positions(gt, d_in)
    sel_eq = set_bit_positions(eq, d_in, limit=take_eq)
    return torch.sort(torch.cat([sel_gt, sel_eq])).values.to(torch.int32)
