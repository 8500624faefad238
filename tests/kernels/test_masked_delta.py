"""Fused masked-delta kernels (sparse_engine/kernels/masked_delta.py) against sparse_engine/kernels/reference.py.

Every result is compared with the reference run in float64 on the same inputs; it passes
when its max error is at most 2x PyTorch's own error (the reference run in the test dtype)
plus a small floor (flash-attention's habit). Outputs are poisoned with NaN through
``out=`` before launch so that unwritten elements fail. On CPU the kernels run under
TRITON_INTERPRET=1 (set by tests/conftest.py) in fp32 and fp16; bf16 runs only with CUDA.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

try:
    from sparse_engine.kernels import masked_delta as md
    from sparse_engine.kernels import reference as ref
    from sparse_engine.kernels.runtime import SCORES
except ImportError:  # repo not installed (pip install -e .): import the folder directly
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from kernels import masked_delta as md
    from kernels import reference as ref
    from kernels.runtime import SCORES

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="bf16 arithmetic is wrong in the Triton interpreter; CUDA only")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# (tokens shape, d_in, d_out)
SHAPES = [((37,), 53, 29), ((1,), 53, 29), ((2, 5), 40, 24), ((24,), 136, 40)]


# ----------------------------------------------------------------------------- helpers


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


def _mask(shape, kind):
    if kind is None:
        return None
    if kind == "random":
        return torch.rand(shape, device=DEV) < 0.3
    if kind == "empty":
        return torch.zeros(shape, dtype=torch.bool, device=DEV)
    if kind == "full":
        return torch.ones(shape, dtype=torch.bool, device=DEV)
    if kind == "one":
        m = torch.zeros(shape, dtype=torch.bool, device=DEV)
        m[shape[0] // 2, shape[1] - 1] = True
        return m
    raise ValueError(kind)


def _indices(mask):
    return mask.flatten().nonzero().flatten().to(torch.int32)


def _poison(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _d(t):
    return None if t is None else (t.double() if t.is_floating_point() else t)


def _check(out, fn, args, dtype, name=""):
    """``out`` vs fn(*args) in float64, tolerance tied to fn(*args) in the test dtype."""
    exp64 = fn(*[_d(a) for a in args]).double()
    exp_pt = fn(*args).double()
    got = out.double()
    assert got.shape == exp64.shape, name
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten elements?)"
    err = (got - exp64).abs().max().item() if got.numel() else 0.0
    err_pt = (exp_pt - exp64).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, exp64.abs().max().item() if got.numel() else 1.0)
    tol = 2 * err_pt + FLOOR[dtype] * scale
    assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (PyTorch's own error {err_pt:.3e})"
    return exp64


def _setup(tok, d_in, d_out, dtype, mask_kind="random"):
    x = _rand(*tok, d_in, dtype=dtype)
    w = _rand(d_out, d_in, dtype=dtype)
    delta = _rand(d_out, d_in, scale=0.5)
    mask = _mask((d_out, d_in), mask_kind)
    dy = _rand(*tok, d_out, dtype=dtype)
    return x, w, delta, mask, dy


# ---------------------------------------------------------------------- search phase


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tok,d_in,d_out", SHAPES)
@pytest.mark.parametrize("mask_kind", ["random", None])
def test_search_phase(dtype, tok, d_in, d_out, mask_kind):
    x, w, delta, mask, dy = _setup(tok, d_in, d_out, dtype, mask_kind)
    bias = _rand(d_out, dtype=dtype)
    for b in (bias, None):
        y = md.masked_delta_linear(x, w, delta, mask, b, out=_poison((*tok, d_out), dtype))
        assert y.dtype == dtype
        _check(y, ref.masked_delta_linear, (x, w, delta, mask, b), dtype, "forward")
    dx = md.masked_delta_grad_input(dy, w, delta, mask, out=_poison((*tok, d_in), dtype))
    assert dx.dtype == dtype
    _check(dx, ref.masked_delta_grad_input, (dy, w, delta, mask), dtype, "grad_input")
    gd = md.masked_delta_grad_delta(dy, x, mask, out=_poison((d_out, d_in), torch.float32))
    assert gd.dtype == torch.float32
    _check(gd, ref.masked_delta_grad_delta, (dy, x, mask), torch.float32, "grad_delta")
    if mask is not None:
        assert (gd[~mask] == 0).all(), "masked-out gradient entries must be exact zeros"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["empty", "full", "one"])
def test_search_phase_mask_extremes(dtype, mask_kind):
    tok, d_in, d_out = (37,), 53, 29
    x, w, delta, mask, dy = _setup(tok, d_in, d_out, dtype, mask_kind)
    y = md.masked_delta_linear(x, w, delta, mask, out=_poison((*tok, d_out), dtype))
    _check(y, ref.masked_delta_linear, (x, w, delta, mask), dtype, "forward")
    if mask_kind == "empty":  # W alone, bit for bit the same effective weight
        _check(y, lambda a, b: torch.nn.functional.linear(a, b), (x, w), dtype, "forward=W")
    dx = md.masked_delta_grad_input(dy, w, delta, mask, out=_poison((*tok, d_in), dtype))
    _check(dx, ref.masked_delta_grad_input, (dy, w, delta, mask), dtype, "grad_input")
    gd = md.masked_delta_grad_delta(dy, x, mask, out=_poison((d_out, d_in), torch.float32))
    _check(gd, ref.masked_delta_grad_delta, (dy, x, mask), torch.float32, "grad_delta")
    assert torch.equal(gd != 0, mask & (gd != 0)) and (gd[~mask] == 0).all()
    if mask_kind == "one":
        assert (gd != 0).sum() == 1


def test_non_contiguous_operands():
    """Transposed weight/delta/mask views and strided activations are taken as they are."""
    dtype = torch.float32
    x_big = _rand(37, 106, dtype=dtype)
    x = x_big[:, ::2]  # inner stride 2
    w = _rand(53, 29, dtype=dtype).t()
    delta = _rand(53, 29).t()
    mask = (torch.rand(53, 29, device=DEV) < 0.4).t()
    dy = _rand(29, 37, dtype=dtype).t()
    bias = _rand(29, dtype=dtype)
    _check(md.masked_delta_linear(x, w, delta, mask, bias, out=_poison((37, 29), dtype)), ref.masked_delta_linear,
           (x, w, delta, mask, bias), dtype)
    _check(md.masked_delta_grad_input(dy, w, delta, mask, out=_poison((37, 53), dtype)), ref.masked_delta_grad_input,
           (dy, w, delta, mask), dtype)
    _check(md.masked_delta_grad_delta(dy, x, mask, out=_poison((29, 53), torch.float32)),
           ref.masked_delta_grad_delta, (dy, x, mask), dtype)
    # 3-D activations that cannot be viewed as 2-D (reshape copies)
    x3 = _rand(5, 4, 53, dtype=dtype).transpose(0, 1)
    _check(md.masked_delta_linear(x3, w, delta, mask, out=_poison((4, 5, 29), dtype)), ref.masked_delta_linear,
           (x3, w, delta, mask), dtype)


@pytest.mark.parametrize("d_out,d_in", [(7, 0), (0, 5)])
def test_zero_width_weights(d_out, d_in):
    """A weight with no inputs (y = b, or 0) or no outputs (dX = 0) is not an error."""
    x, dy = _rand(4, 3, d_in), _rand(4, 3, d_out)
    w, delta = _rand(d_out, d_in), _rand(d_out, d_in)
    mask = torch.ones(d_out, d_in, dtype=torch.bool, device=DEV)
    bias = _rand(d_out)
    for got, fn, args in (
        (md.masked_delta_linear(x, w, delta, mask, bias), ref.masked_delta_linear, (x, w, delta, mask, bias)),
        (md.masked_delta_grad_input(dy, w, delta, mask), ref.masked_delta_grad_input, (dy, w, delta, mask)),
        (md.masked_delta_grad_delta(dy, x, mask), ref.masked_delta_grad_delta, (dy, x, mask)),
    ):
        assert torch.equal(got.cpu(), fn(*args).cpu())


def test_mixed_weight_dtype():
    """fp16 base weight under fp32 activations: W_eff formed in fp32, cast to x's dtype."""
    x, _, delta, mask, dy = _setup((37,), 53, 29, torch.float32)
    w = _rand(29, 53, dtype=torch.float16)
    _check(md.masked_delta_linear(x, w, delta, mask), ref.masked_delta_linear, (x, w, delta, mask), torch.float32)


# ----------------------------------------------------------------------- fixed phase


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tok,d_in,d_out", SHAPES)
@pytest.mark.parametrize("mask_kind", ["random", "empty", "full", "one"])
def test_fixed_phase(dtype, tok, d_in, d_out, mask_kind):
    x, w, delta, mask, dy = _setup(tok, d_in, d_out, dtype, mask_kind)
    idx = _indices(mask)
    values = delta.flatten()[idx.long()].contiguous()
    layout = md.build_compact_layout(idx, (d_out, d_in))
    bias = _rand(d_out, dtype=dtype)
    for b in (bias, None):
        for lay in (layout, None):
            y = md.compact_delta_linear(x, w, values, idx, b, lay, out=_poison((*tok, d_out), dtype))
            _check(y, ref.compact_delta_linear, (x, w, values, idx, b), dtype, "compact forward")
    dx = md.compact_grad_input(dy, w, values, idx, layout, out=_poison((*tok, d_in), dtype))
    _check(dx, ref.compact_grad_input, (dy, w, values, idx), dtype, "compact grad_input")
    gv = md.compact_grad_values(dy, x, idx, layout, out=_poison((idx.numel(),), torch.float32))
    assert gv.dtype == torch.float32 and gv.shape == (idx.numel(),)
    _check(gv, ref.compact_grad_values, (dy, x, idx), torch.float32, "compact grad_values")
    # fixed phase == search phase with the same mask
    y_search = md.masked_delta_linear(x, w, delta, mask)
    y_fixed = md.compact_delta_linear(x, w, values, idx, None, layout)
    # same effective weight bits; only the autotuned tiling (summation order) may differ
    torch.testing.assert_close(y_fixed.float(), y_search.float(), rtol=0,
                               atol=2 * FLOOR[dtype] * max(1.0, y_search.abs().max().item()))


def test_layout_format():
    d_out, d_in = 5, 150  # 3 layout tiles per row, the last one partial
    mask = torch.rand(d_out, d_in, device=DEV) < 0.5
    idx = _indices(mask)
    lay = md.build_compact_layout(idx, (d_out, d_in))
    assert lay.rank.dtype == torch.int8 and lay.rank.shape == (d_out, d_in)
    assert lay.offsets.dtype == torch.int32 and lay.offsets.numel() == d_out * 3 + 1
    assert int(lay.offsets[-1]) == idx.numel() == lay.nnz
    assert torch.equal(lay.rank >= 0, mask)
    rows = torch.arange(d_out, device=DEV)[:, None].expand(d_out, d_in)
    cols = torch.arange(d_in, device=DEV)[None, :].expand(d_out, d_in)
    slot = lay.offsets.long()[rows * lay.n_tiles + cols // md.LAYOUT_TILE] + lay.rank.long()
    assert torch.equal(slot[mask], torch.arange(idx.numel(), device=DEV))
    assert lay.nbytes() < d_out * d_in * 4 / 2  # far below a fp32 buffer of the weight's size


@pytest.mark.parametrize("name,dtype", [("fwd", torch.float16), ("dx", torch.float16), ("gt", torch.float16),
                                        ("fwd", torch.float32), ("dx", torch.float32)])
def test_every_gpu_config(name, dtype, monkeypatch):
    """Each GPU autotune config (tile shapes, both compact-offset lookups) computes the same
    function; run here through the interpreter, pinned one at a time."""
    configs = {"fwd": md.GPU_FWD_CONFIGS, "dx": md.GPU_DX_CONFIGS, "gt": md.GPU_GT_CONFIGS}[name]
    if dtype == torch.float32:
        configs = md.GPU_FP32_CONFIGS
    tok, d_in, d_out = (40,), 200, 72
    x, w, delta, mask, dy = _setup(tok, d_in, d_out, dtype)
    idx = _indices(mask)
    values = delta.flatten()[idx.long()].contiguous()
    layout = md.build_compact_layout(idx, (d_out, d_in))
    for cfg in configs:
        monkeypatch.setitem(md.CONFIG_OVERRIDE, name, cfg)
        if name == "fwd":
            _check(md.masked_delta_linear(x, w, delta, mask, out=_poison((*tok, d_out), dtype)),
                   ref.masked_delta_linear, (x, w, delta, mask), dtype, str(cfg))
            _check(md.compact_delta_linear(x, w, values, idx, None, layout, out=_poison((*tok, d_out), dtype)),
                   ref.compact_delta_linear, (x, w, values, idx), dtype, str(cfg))
        elif name == "dx":
            _check(md.masked_delta_grad_input(dy, w, delta, mask, out=_poison((*tok, d_in), dtype)),
                   ref.masked_delta_grad_input, (dy, w, delta, mask), dtype, str(cfg))
            _check(md.compact_grad_input(dy, w, values, idx, layout, out=_poison((*tok, d_in), dtype)),
                   ref.compact_grad_input, (dy, w, values, idx), dtype, str(cfg))
        else:
            _check(md.masked_delta_grad_delta(dy, x, mask, out=_poison((d_out, d_in), torch.float32)),
                   ref.masked_delta_grad_delta, (dy, x, mask), torch.float32, str(cfg))
            _check(md.compact_grad_values(dy, x, idx, layout, out=_poison((idx.numel(),), torch.float32)),
                   ref.compact_grad_values, (dy, x, idx), torch.float32, str(cfg))


# ------------------------------------------------------------------------- score pass


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", SCORES)
def test_element_scores(dtype, score):
    tok, d_in, d_out = (2, 19), 53, 29
    x, _, delta, _, dy = _setup(tok, d_in, d_out, dtype)
    delta[3] = 0.0  # a zero row: mcs/snip/wm scores there are exact zeros
    s = md.delta_score(dy, x, delta, score, out=_poison((d_out, d_in), torch.float32))
    assert s.dtype == torch.float32
    _check(s, lambda a, b, c: ref.delta_score(a, b, c, score), (dy, x, delta), torch.float32, score)
    if score != "gm":
        assert (s[3] == 0).all()
    if score in ("snip", "gm", "wm"):
        assert (s >= 0).all()
    half = md.delta_score(dy, x, delta, score, out_dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), s, rtol=2e-3, atol=1e-3 * s.abs().max().item())


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("d_out,d_in,bs", [(48, 32, 16), (96, 32, 16), (32, 96, 16), (64, 64, 32), (6, 4, 2)])
def test_block_scores(score, d_out, d_in, bs):
    dtype = torch.float16
    x, _, delta, _, dy = _setup((37,), d_in, d_out, dtype)
    s = md.delta_score(dy, x, delta, score, block_size=bs, out=_poison((d_out // bs, d_in // bs), torch.float32))
    assert s.shape == (d_out // bs, d_in // bs) and s.dtype == torch.float32
    _check(s, lambda a, b, c: ref.delta_score(a, b, c, score, bs), (dy, x, delta), torch.float32, score)
    # consistent with the kernel's own element scores
    elem = md.delta_score(dy, x, delta, score)
    torch.testing.assert_close(s, ref.block_sum(elem, bs), rtol=1e-5, atol=1e-5 * max(1.0, s.abs().max().item()))


def test_block_scores_bf16_input_cpu_path():
    """The block pass only needs fp32 accumulation: fp32 inputs with a 3:1 weight."""
    x, _, delta, _, dy = _setup((1,), 16, 48, torch.float32)
    s = md.delta_score(dy, x, delta, "mcs", block_size=16)
    _check(s, lambda a, b, c: ref.delta_score(a, b, c, "mcs", 16), (dy, x, delta), torch.float32)


def test_score_key_order():
    vals = torch.tensor([float("-inf"), -3.0, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")], device=DEV)
    key = md.score_key(vals)
    assert key[3] == key[4]  # ±0 equal
    assert (key[1:] >= key[:-1]).all() and (key[[0, 1, 2, 4, 5, 6]] < key[[1, 2, 4, 5, 6, 7]]).all()


@pytest.mark.parametrize("score", ["mcs", "snip", "gm", "wm"])
def test_histogram(score):
    x, _, delta, _, dy = _setup((37,), 53, 29, torch.float32)
    hist = md.score_histogram(dy, x, delta, score)
    s = md.delta_score(dy, x, delta, score)
    key = md.score_key(s).long().flatten()
    expect = torch.bincount((key >> 16) + 32768, minlength=1 << 16)
    assert torch.equal(hist.long(), expect)
    # accumulation and the low digit
    md.score_histogram(dy, x, delta, score, hist=hist)
    assert torch.equal(hist.long(), 2 * expect)
    p = int((key >> 16)[0])
    lo = md.score_histogram(dy, x, delta, score, prefix=p)
    assert torch.equal(lo.long(), torch.bincount(key[(key >> 16) == p] & 0xFFFF, minlength=1 << 16))


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_topk_without_dense_score(score, frac):
    x, _, delta, _, dy = _setup((37,), 53, 29, torch.float32)
    delta[:, :20] = 0.0  # many exact ties (±0 for mcs) across the threshold
    s = md.delta_score(dy, x, delta, score)
    k = int(frac * s.numel())
    got = md.delta_score_topk(dy, x, delta, k, score)
    assert got.dtype == torch.int32
    assert torch.equal(got, ref.topk_flat_indices(s, k))


def test_topk_all_zero_scores_and_nan():
    x, _, delta, _, dy = _setup((37,), 53, 29, torch.float32)
    zero = torch.zeros_like(delta)  # Algorithm 1's first update: Ŵ = 0, MCS all ±0
    got = md.delta_score_topk(dy, x, zero, 100, "mcs")
    assert torch.equal(got, torch.arange(100, dtype=torch.int32, device=DEV))
    nan_delta = delta.clone()
    nan_delta[0, :10] = float("nan")
    s = md.delta_score(dy, x, nan_delta, "wm")
    n_valid = s.numel() - 10
    for k in (5, n_valid, s.numel()):
        assert torch.equal(md.delta_score_topk(dy, x, nan_delta, k, "wm"), ref.topk_flat_indices(s, min(k, s.numel())))


def test_score_outputs_fit_an_eighth_of_a_dense_gradient():
    """What the score pass writes per layer (tile scores, or the select pass's two bit masks)
    is at most 1/8 of a dense fp32 gradient; the histograms are a fixed 2 × 256 KiB."""
    x, _, delta, _, dy = _setup((37,), 96, 64, torch.float32)
    dense_bytes = 4 * delta.numel()
    tiles = md.delta_score(dy, x, delta, "mcs", 16)
    gt, eq = md.score_select(dy, x, delta, 0, "mcs")
    hist = md.score_histogram(dy, x, delta, "mcs")
    assert tiles.nbytes <= dense_bytes / 8
    assert gt.nbytes + eq.nbytes <= dense_bytes / 8
    assert hist.nbytes == 4 * 65536


@pytest.mark.parametrize("chunk", [1, 3, 1 << 16])
def test_set_bit_positions_lists_the_bits_in_order(monkeypatch, chunk):
    monkeypatch.setattr(md, "_UNPACK_CHUNK", chunk)
    gen = torch.Generator().manual_seed(3)
    for rows, d_in in ((5, 70), (1, 32), (4, 1), (0, 40)):
        n_words = (d_in + 31) // 32
        words = torch.randint(-(2**31), 2**31 - 1, (rows, n_words), generator=gen, dtype=torch.int64)
        words[words % 3 == 0] = 0  # empty words between full ones
        words = words.to(torch.int32).to(DEV)
        expected = md.unpack_bits(words, d_in).flatten().nonzero().flatten()
        assert torch.equal(md.set_bit_positions(words, d_in), expected)
        for limit in (0, 1, 7, expected.numel() + 5):
            assert torch.equal(md.set_bit_positions(words, d_in, limit=limit), expected[:limit])


# --------------------------------------------------------------------------- bad input


def test_bad_inputs():
    x, w, delta, mask, dy = _setup((7,), 53, 29, torch.float32)
    idx = _indices(mask)
    values = delta.flatten()[idx.long()].contiguous()
    lay = md.build_compact_layout(idx, (29, 53))
    with pytest.raises(TypeError, match="x"):
        md.masked_delta_linear(x.to(torch.int32), w, delta, mask)
    with pytest.raises(ValueError, match="d_in"):
        md.masked_delta_linear(x[:, :50], w, delta, mask)
    with pytest.raises(ValueError, match="delta"):
        md.masked_delta_linear(x, w, delta[:, :50], mask)
    with pytest.raises(TypeError, match="mask"):
        md.masked_delta_linear(x, w, delta, mask.float())
    with pytest.raises(ValueError, match="mask"):
        md.masked_delta_linear(x, w, delta, mask[:, :50])
    with pytest.raises(ValueError, match="bias"):
        md.masked_delta_linear(x, w, delta, mask, torch.zeros(28, device=DEV))
    with pytest.raises(ValueError, match="weight"):
        md.masked_delta_linear(x, w[None], delta, mask)
    with pytest.raises(ValueError, match="tokens"):
        md.masked_delta_grad_delta(dy[:5], x, mask)
    with pytest.raises(TypeError, match="same dtype"):
        md.masked_delta_grad_delta(dy.half(), x, mask)
    with pytest.raises(ValueError, match="shape"):
        md.masked_delta_linear(x, w, delta, mask, out=torch.empty(7, 28, device=DEV))
    with pytest.raises(TypeError, match="dtype"):
        md.masked_delta_linear(x, w, delta, mask, out=torch.empty(7, 29, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        md.masked_delta_linear(x, w, delta, mask, out=torch.empty(29, 7, device=DEV).t())
    # indices
    with pytest.raises(TypeError, match="int32"):
        md.compact_delta_linear(x, w, values, idx.long())
    with pytest.raises(ValueError, match="sorted"):
        md.compact_delta_linear(x, w, values, idx.flip(0).contiguous())
    dup = idx.clone()
    dup[1] = dup[0]
    with pytest.raises(ValueError, match="unique"):
        md.compact_delta_linear(x, w, values, dup)
    bad = idx.clone()
    bad[-1] = 29 * 53
    with pytest.raises(ValueError, match="range"):
        md.compact_delta_linear(x, w, values, bad)
    with pytest.raises(ValueError, match="range"):
        md.build_compact_layout(idx - 1 if idx[0] == 0 else idx - idx[0] - 1, (29, 53))
    with pytest.raises(ValueError, match="1-D"):
        md.build_compact_layout(idx[None], (29, 53))
    with pytest.raises(ValueError, match="nnz"):
        md.compact_delta_linear(x, w, values[:-1], idx, None, lay)
    with pytest.raises(ValueError, match="layout"):
        md.compact_delta_linear(x, w, values, idx.clone(), None, lay)  # another indices tensor
    with pytest.raises(ValueError, match="layout"):
        md.compact_delta_linear(x[:, :52], w[:, :52], values, idx, None, lay)
    with pytest.raises(TypeError, match="layout"):
        md.compact_grad_values(dy, x, idx, layout={"rank": 1})
    with pytest.raises(TypeError, match="values"):
        md.compact_grad_input(dy, w, values.to(torch.int32), idx, lay)
    # scores
    with pytest.raises(ValueError, match="score"):
        md.delta_score(dy, x, delta, "abs")
    with pytest.raises(ValueError, match="divide"):
        md.delta_score(dy, x, delta, "mcs", block_size=16)
    with pytest.raises(ValueError, match="power of two"):
        md.delta_score(dy, x, delta, "mcs", block_size=3)
    with pytest.raises(ValueError, match="k must"):
        md.delta_score_topk(dy, x, delta, 29 * 53 + 1)
