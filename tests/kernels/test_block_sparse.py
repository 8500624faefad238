"""Block-sparse (16×16) adapter kernels vs an fp64 dense reference.

On a machine without CUDA the kernels run in the Triton interpreter (conftest sets
TRITON_INTERPRET=1): fp32 and fp16 there, bf16 only on CUDA (interpreter bf16 math is wrong).

Pass rule: ‖ours − fp64‖/‖fp64‖ ≤ 2 · (PyTorch's own error: the reference twin run in the
test dtype, vs fp64) + a small floor. Outputs are poisoned with NaN before the launch.
"""
from __future__ import annotations

import pytest
import torch

from sparse_engine.kernels import block_sparse as bsk
from sparse_engine.kernels import reference as ref
from sparse_engine.kernels import runtime

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
B = 16
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
SHAPES = [(96, 32), (32, 96), (64, 48)]  # (d_out, d_in): 3:1, 1:3, 4:3
TOKENS = [1, 17, 300]
PATTERNS = ["zero", "one", "all", "random"]


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_config_per_shape(monkeypatch):
    """On a GPU, skip benchmarking every autotune config at each first call (correctness only)."""
    monkeypatch.setattr(runtime, "AUTOTUNE", False)


def _indices(pattern: str, shape, block_size=B, gen=None) -> torch.Tensor:
    n_tiles = (shape[0] // block_size) * (shape[1] // block_size)
    if pattern == "zero":
        ids = torch.zeros(0, dtype=torch.int64)
    elif pattern == "one":
        ids = torch.randint(n_tiles, (1,), generator=gen)
    elif pattern == "all":
        ids = torch.arange(n_tiles)
    else:
        ids = torch.randperm(n_tiles, generator=gen)[: max(1, (2 * n_tiles) // 5)]
    return torch.sort(ids).values.to(torch.int32).to(DEV)


def _blocks(n, block_size=B) -> torch.Tensor:
    return (torch.randn(n, block_size, block_size) * 0.5).to(DEV)


def _rand(*shape, dtype) -> torch.Tensor:
    return torch.randn(*shape).to(dtype).to(DEV)


def _poison(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _rel(a: torch.Tensor, truth: torch.Tensor) -> float:
    a64 = a.detach().cpu().double()
    den = truth.norm().item()
    num = (a64 - truth).norm().item()
    return num / den if den > 0 else num


def _check(name, ours, torch_same_dtype, truth, dtype):
    assert ours.dtype == torch_same_dtype.dtype, f"{name}: dtype {ours.dtype} != {torch_same_dtype.dtype}"
    assert ours.shape == torch_same_dtype.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(torch_same_dtype.shape)}"
    assert not torch.isnan(ours).any(), f"{name}: NaN in the output (an element was not written)"
    err, err_torch = _rel(ours, truth), _rel(torch_same_dtype, truth)
    assert err <= 2 * err_torch + FLOOR[dtype], f"{name}: error {err:.3e} vs PyTorch {err_torch:.3e} ({dtype})"


def _dense64(blocks, idx, shape):
    return ref.densify_blocks(blocks.cpu().double(), idx.cpu(), shape).double()


def _empty_out_columns(idx, shape, block_size, axis):
    """Output features with no kept block: row blocks (axis 0: y = xΔWᵀ) or column blocks (axis 1: dX)."""
    n_rb, n_cb = shape[0] // block_size, shape[1] // block_size
    tiles = torch.zeros(n_rb * n_cb, dtype=torch.bool)
    tiles[idx.cpu().long()] = True
    present = tiles.view(n_rb, n_cb).any(dim=1 - axis)
    return (~present).repeat_interleave(block_size)


# ------------------------------------------------------------------ main correctness


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_all_launchers_vs_fp64(shape, tokens, pattern, dtype):
    d_out, d_in = shape
    idx = _indices(pattern, shape)
    blocks = _blocks(idx.numel())
    x, dy = _rand(tokens, d_in, dtype=dtype), _rand(tokens, d_out, dtype=dtype)
    w, bias = _rand(d_out, d_in, dtype=dtype), _rand(d_out, dtype=dtype)
    x64, dy64, w64, b64 = (t.cpu().double() for t in (x, dy, w, bias))
    delta64 = _dense64(blocks, idx, shape)

    # 1a: y = x ΔWᵀ (output poisoned, overwritten)
    y = bsk.block_delta_matmul(x, blocks, idx, d_out, _poison((tokens, d_out), dtype), accumulate=False)
    _check("delta fwd", y, ref.block_delta_matmul(x, blocks, idx, d_out), x64 @ delta64.t(), dtype)
    empty = _empty_out_columns(idx, shape, B, axis=0)
    assert (y[:, empty.to(DEV)] == 0).all(), "row blocks without a kept block must give exact zeros"

    # 1b: dX = dY ΔW
    dx = bsk.block_delta_grad_input(dy, blocks, idx, d_in, _poison((tokens, d_in), dtype), accumulate=False)
    _check("delta dX", dx, ref.block_delta_grad_input(dy, blocks, idx, d_in), dy64 @ delta64, dtype)
    empty = _empty_out_columns(idx, shape, B, axis=1)
    assert (dx[:, empty.to(DEV)] == 0).all(), "column blocks without a kept block must give exact zeros"

    # 1c: dBlocks = (dYᵀX) at the kept tiles, fp32
    db = bsk.block_grad_blocks(dy, x, idx, B, out=_poison((idx.numel(), B, B), torch.float32))
    truth = ref.gather_blocks(dy64.t() @ x64, idx.cpu(), B)
    _check("dBlocks", db, ref.block_grad_blocks(dy, x, idx, B), truth, dtype)

    # 1d: fused y = x (W + ΔW)ᵀ + b and dX = dY (W + ΔW)
    y = bsk.block_delta_linear(x, w, blocks, idx, bias, out=_poison((tokens, d_out), dtype))
    _check("fused fwd", y, ref.block_delta_linear(x, w, blocks, idx, bias), x64 @ (w64 + delta64).t() + b64, dtype)
    dx = bsk.block_grad_input(dy, w, blocks, idx, out=_poison((tokens, d_in), dtype))
    _check("fused dX", dx, ref.block_grad_input(dy, w, blocks, idx), dy64 @ (w64 + delta64), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_accumulate_3d_and_default_outputs(dtype):
    """``out=`` accumulates (untouched row blocks bit-identical), 3-D inputs, freshly allocated outputs."""
    shape = (96, 48)
    d_out, d_in = shape
    idx = torch.tensor([0, 4, 7, 8, 16], dtype=torch.int32, device=DEV)  # row blocks 0,1,2,5 (3,4 empty)
    blocks = _blocks(idx.numel())
    delta64 = _dense64(blocks, idx, shape)
    x, dy = _rand(2, 9, d_in, dtype=dtype), _rand(2, 9, d_out, dtype=dtype)
    w = _rand(d_out, d_in, dtype=dtype)
    x64, dy64, w64 = (t.cpu().double() for t in (x, dy, w))

    before = _rand(2, 9, d_out, dtype=dtype)
    out = before.clone()
    got = bsk.block_delta_matmul(x, blocks, idx, d_out, out)
    assert got is out
    _check("accumulate fwd", out, ref.block_delta_matmul(x, blocks, idx, d_out, before.clone()),
           before.cpu().double() + x64 @ delta64.t(), dtype)
    untouched = _empty_out_columns(idx, shape, B, axis=0).to(DEV)
    assert untouched.any()
    assert torch.equal(out[..., untouched], before[..., untouched])

    before = _rand(2, 9, d_in, dtype=dtype)
    out = before.clone()
    bsk.block_delta_grad_input(dy, blocks, idx, d_in, out)
    _check("accumulate dX", out, ref.block_delta_grad_input(dy, blocks, idx, d_in, before.clone()),
           before.cpu().double() + dy64 @ delta64, dtype)
    untouched = _empty_out_columns(idx, shape, B, axis=1).to(DEV)
    assert torch.equal(out[..., untouched], before[..., untouched])

    g0 = torch.randn(idx.numel(), B, B, device=DEV)
    g = g0.clone()
    bsk.block_grad_blocks(dy, x, idx, B, out=g, accumulate=True)
    truth = g0.cpu().double() + ref.gather_blocks(dy64.reshape(-1, d_out).t() @ x64.reshape(-1, d_in), idx.cpu(), B)
    _check("accumulate dBlocks", g, g0 + ref.block_grad_blocks(dy, x, idx, B), truth, dtype)

    # freshly allocated outputs and 3-D shapes, no bias
    y = bsk.block_delta_matmul(x, blocks, idx, d_out)
    assert y.shape == (2, 9, d_out)
    _check("3-D fwd", y, ref.block_delta_matmul(x, blocks, idx, d_out), x64 @ delta64.t(), dtype)
    y = bsk.block_delta_linear(x, w, blocks, idx)
    _check("3-D fused", y, ref.block_delta_linear(x, w, blocks, idx), x64 @ (w64 + delta64).t(), dtype)
    dx = bsk.block_grad_input(dy, w, blocks, idx)
    assert dx.shape == (2, 9, d_in)
    _check("3-D fused dX", dx, ref.block_grad_input(dy, w, blocks, idx), dy64 @ (w64 + delta64), dtype)
    dx = bsk.block_delta_grad_input(dy, blocks, idx, d_in)
    _check("3-D dX", dx, ref.block_delta_grad_input(dy, blocks, idx, d_in), dy64 @ delta64, dtype)


def test_strided_inputs_and_fp32_weight_with_fp16_activations():
    """Non-contiguous x / weight / blocks, and a weight dtype different from the activations'."""
    d_out, d_in = 64, 32
    idx = torch.tensor([1, 2, 5, 6], dtype=torch.int32, device=DEV)
    blocks = _blocks(idx.numel()).transpose(1, 2)  # non-contiguous blocks
    x = torch.randn(d_in, 17).t().to(DEV)  # strides (1, 17)
    w = torch.randn(d_in, d_out).t().to(DEV)  # non-contiguous weight
    dy = torch.randn(17, 2 * d_out).to(DEV)[:, ::2]  # column stride 2
    delta64 = _dense64(blocks, idx, (d_out, d_in))
    x64, w64, dy64 = x.cpu().double(), w.cpu().double(), dy.cpu().double()
    f32 = torch.float32
    _check("strided fwd", bsk.block_delta_matmul(x, blocks, idx, d_out), ref.block_delta_matmul(x, blocks, idx, d_out),
           x64 @ delta64.t(), f32)
    _check("strided dX", bsk.block_delta_grad_input(dy, blocks, idx, d_in),
           ref.block_delta_grad_input(dy, blocks, idx, d_in), dy64 @ delta64, f32)
    _check("strided dBlocks", bsk.block_grad_blocks(dy, x, idx, B), ref.block_grad_blocks(dy, x, idx, B),
           ref.gather_blocks(dy64.t() @ x64, idx.cpu(), B), f32)
    _check("strided fused", bsk.block_delta_linear(x, w, blocks, idx), ref.block_delta_linear(x, w, blocks, idx),
           x64 @ (w64 + delta64).t(), f32)
    _check("strided fused dX", bsk.block_grad_input(dy, w, blocks, idx), ref.block_grad_input(dy, w, blocks, idx),
           dy64 @ (w64 + delta64), f32)
    # fp32 base weight, fp16 activations: W + ΔW formed in fp32, cast to fp16 (as the reference)
    xh, dyh = x.half(), dy.half()
    _check("mixed fused", bsk.block_delta_linear(xh, w, blocks, idx), ref.block_delta_linear(xh, w, blocks, idx),
           xh.cpu().double() @ (w64 + delta64).t(), torch.float16)
    _check("mixed fused dX", bsk.block_grad_input(dyh, w, blocks, idx), ref.block_grad_input(dyh, w, blocks, idx),
           dyh.cpu().double() @ (w64 + delta64), torch.float16)


@pytest.mark.parametrize("bs", [32, 64])
def test_larger_block_sizes(bs):
    """B = 64 is wider than the fused kernel's K step in the interpreter (one block column then
    takes several K steps); without that handled, the fused outputs came back as zeros."""
    d_out, d_in = 2 * bs, 3 * bs
    idx = torch.tensor([0, 2, 4], dtype=torch.int32, device=DEV)
    blocks = _blocks(3, bs)
    x, dy, w = _rand(17, d_in, dtype=torch.float32), _rand(17, d_out, dtype=torch.float32), _rand(d_out, d_in, dtype=torch.float32)
    delta64 = _dense64(blocks, idx, (d_out, d_in))
    x64, dy64, w64 = (t.cpu().double() for t in (x, dy, w))
    f32 = torch.float32
    _check(f"B{bs} fwd", bsk.block_delta_matmul(x, blocks, idx, d_out), ref.block_delta_matmul(x, blocks, idx, d_out),
           x64 @ delta64.t(), f32)
    _check(f"B{bs} dX", bsk.block_delta_grad_input(dy, blocks, idx, d_in), ref.block_delta_grad_input(dy, blocks, idx, d_in),
           dy64 @ delta64, f32)
    _check(f"B{bs} dBlocks", bsk.block_grad_blocks(dy, x, idx, bs), ref.block_grad_blocks(dy, x, idx, bs),
           ref.gather_blocks(dy64.t() @ x64, idx.cpu(), bs), f32)
    _check(f"B{bs} fused", bsk.block_delta_linear(x, w, blocks, idx), ref.block_delta_linear(x, w, blocks, idx),
           x64 @ (w64 + delta64).t(), f32)
    _check(f"B{bs} fused dX", bsk.block_grad_input(dy, w, blocks, idx), ref.block_grad_input(dy, w, blocks, idx),
           dy64 @ (w64 + delta64), f32)


def test_many_blocks_per_row_span_several_chunks():
    """Rows with more kept blocks than one SDD chunk / one DSD step, next to empty rows."""
    d_out, d_in = 48, 160  # 3 x 10 block grid
    n_cb = d_in // B
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] + [2 * n_cb + c for c in (0, 3, 4, 5, 9)]  # row 1 empty
    idx = torch.tensor(ids, dtype=torch.int32, device=DEV)
    blocks = _blocks(len(ids))
    x, dy = _rand(33, d_in, dtype=torch.float32), _rand(33, d_out, dtype=torch.float32)
    delta64 = _dense64(blocks, idx, (d_out, d_in))
    x64, dy64 = x.cpu().double(), dy.cpu().double()
    f32 = torch.float32
    db = bsk.block_grad_blocks(dy, x, idx, B, out=_poison((len(ids), B, B), f32))
    _check("chunks dBlocks", db, ref.block_grad_blocks(dy, x, idx, B), ref.gather_blocks(dy64.t() @ x64, idx.cpu(), B), f32)
    _check("chunks fwd", bsk.block_delta_matmul(x, blocks, idx, d_out), ref.block_delta_matmul(x, blocks, idx, d_out),
           x64 @ delta64.t(), f32)
    _check("chunks dX", bsk.block_delta_grad_input(dy, blocks, idx, d_in),
           ref.block_delta_grad_input(dy, blocks, idx, d_in), dy64 @ delta64, f32)


def test_zero_tokens():
    idx = torch.tensor([1], dtype=torch.int32, device=DEV)
    blocks, w = _blocks(1), _rand(32, 32, dtype=torch.float32)
    x = torch.zeros(0, 32, device=DEV)
    assert bsk.block_delta_matmul(x, blocks, idx, 32).shape == (0, 32)
    assert bsk.block_delta_linear(x, w, blocks, idx).shape == (0, 32)
    assert bsk.block_grad_input(x, w, blocks, idx).shape == (0, 32)
    assert bsk.block_delta_grad_input(x, blocks, idx, 32).shape == (0, 32)
    g = bsk.block_grad_blocks(x, x, idx, B, out=_poison((1, B, B), torch.float32))
    assert torch.equal(g, torch.zeros_like(g))


# --------------------------------------------------------------- index structures


def test_slot_map_and_layout():
    shape = (64, 48)
    idx = torch.tensor([0, 2, 4, 5, 10, 11], dtype=torch.int32, device=DEV)
    sm = bsk.build_block_slot_map(idx, shape, B)
    expect = torch.full((4, 3), -1, dtype=torch.int32)
    for slot, b in enumerate(idx.tolist()):
        expect[b // 3, b % 3] = slot
    assert sm.dtype == torch.int32 and torch.equal(sm.cpu(), expect)

    lay = bsk.build_block_layout(idx, shape, B)
    assert torch.equal(lay.slot_map.cpu(), expect)
    assert lay.row_ptr.tolist() == [0, 2, 4, 4, 6]
    assert lay.csr_cols.tolist() == [0, 2, 1, 2, 1, 2]
    assert lay.col_ptr.tolist() == [0, 1, 3, 6]
    assert lay.csc_slots.tolist() == [0, 2, 4, 1, 3, 5]
    assert lay.csc_rows.tolist() == [0, 1, 3, 0, 1, 3]
    assert lay.chunk_ptr.tolist() == [0, 1, 2, 2, 3]

    # the same results through layout= and slot_map= (ids then trusted) as through the ids alone
    blocks = _blocks(idx.numel())
    x, dy, w = _rand(17, 48, dtype=torch.float32), _rand(17, 64, dtype=torch.float32), _rand(64, 48, dtype=torch.float32)
    for kw in ({"layout": lay}, {"slot_map": sm}):
        assert torch.equal(bsk.block_delta_matmul(x, blocks, idx, 64, **kw), bsk.block_delta_matmul(x, blocks, idx, 64))
        assert torch.equal(bsk.block_delta_grad_input(dy, blocks, idx, 48, **kw),
                           bsk.block_delta_grad_input(dy, blocks, idx, 48))
        assert torch.equal(bsk.block_grad_blocks(dy, x, idx, B, **kw), bsk.block_grad_blocks(dy, x, idx, B))
        assert torch.equal(bsk.block_delta_linear(x, w, blocks, idx, **kw), bsk.block_delta_linear(x, w, blocks, idx))
        assert torch.equal(bsk.block_grad_input(dy, w, blocks, idx, **kw), bsk.block_grad_input(dy, w, blocks, idx))
    # the reference module exposes the same slot-map builder
    assert torch.equal(ref.build_block_slot_map(idx, shape, B), sm)


# --------------------------------------------------------------------- bad inputs


def _ok_args():
    d_out, d_in = 64, 32
    idx = torch.tensor([0, 3, 5], dtype=torch.int32, device=DEV)
    return dict(
        x=_rand(5, d_in, dtype=torch.float32), dy=_rand(5, d_out, dtype=torch.float32),
        w=_rand(d_out, d_in, dtype=torch.float32), blocks=_blocks(3), idx=idx,
    )


def _all_calls(a, idx=None, blocks=None):
    idx = a["idx"] if idx is None else idx
    blocks = a["blocks"] if blocks is None else blocks
    return [
        lambda: bsk.block_delta_matmul(a["x"], blocks, idx, 64),
        lambda: bsk.block_delta_grad_input(a["dy"], blocks, idx, 32),
        lambda: bsk.block_grad_blocks(a["dy"], a["x"], idx, B),
        lambda: bsk.block_delta_linear(a["x"], a["w"], blocks, idx),
        lambda: bsk.block_grad_input(a["dy"], a["w"], blocks, idx),
        lambda: bsk.build_block_slot_map(idx, (64, 32), B),
        lambda: bsk.build_block_layout(idx, (64, 32), B),
    ]


@pytest.mark.parametrize(
    "ids, match",
    [
        ([0, 3, 8], "out of range"),  # grid is 4 x 2 = 8 tiles
        ([-1, 3, 5], "out of range"),
        ([3, 0, 5], "sorted"),
        ([0, 3, 3], "duplicates"),
    ],
)
def test_bad_block_ids(ids, match):
    a = _ok_args()
    idx = torch.tensor(ids, dtype=torch.int32, device=DEV)
    for call in _all_calls(a, idx=idx):
        with pytest.raises(ValueError, match=match):
            call()


def test_bad_index_dtype_and_shape():
    a = _ok_args()
    for call in _all_calls(a, idx=a["idx"].long()):
        with pytest.raises(TypeError, match="int32"):
            call()
    with pytest.raises(ValueError, match="one id per block"):
        bsk.block_delta_matmul(a["x"], a["blocks"], a["idx"][:2], 64)
    with pytest.raises(ValueError, match="one id per block"):
        bsk.block_delta_linear(a["x"], a["w"], a["blocks"], a["idx"][:2])
    with pytest.raises(ValueError, match="1-D"):
        bsk.block_grad_blocks(a["dy"], a["x"], a["idx"].view(1, 3), B)


def test_bad_shapes_and_dtypes():
    a = _ok_args()
    x, dy, w, blocks, idx = a["x"], a["dy"], a["w"], a["blocks"], a["idx"]
    # weight dims not multiples of the block size
    with pytest.raises(ValueError, match="multiple of the block size"):
        bsk.block_delta_linear(_rand(5, 40, dtype=torch.float32), _rand(64, 40, dtype=torch.float32), blocks, idx)
    with pytest.raises(ValueError, match="multiple of the block size"):
        bsk.block_delta_matmul(x, blocks, idx, 60)
    with pytest.raises(ValueError, match="multiple of the block size"):
        bsk.block_grad_blocks(_rand(5, 72, dtype=torch.float32), x, idx, B)
    # activations / weight mismatch
    with pytest.raises(ValueError, match="last dimension"):
        bsk.block_delta_linear(_rand(5, 48, dtype=torch.float32), w, blocks, idx)
    with pytest.raises(ValueError, match="last dimension"):
        bsk.block_grad_input(_rand(5, 48, dtype=torch.float32), w, blocks, idx)
    with pytest.raises(ValueError, match="leading"):
        bsk.block_grad_blocks(dy[:4], x, idx, B)
    # blocks
    with pytest.raises(ValueError, match=r"\[n, B, B\]"):
        bsk.block_delta_matmul(x, blocks[:, :, :8], idx, 64)
    with pytest.raises(ValueError, match="power of two"):
        bsk.block_delta_matmul(x, torch.randn(3, 8, 8, device=DEV), idx, 64)
    with pytest.raises(ValueError, match="power of two"):
        bsk.block_grad_blocks(dy, x, idx, 8)
    with pytest.raises(TypeError, match="blocks"):
        bsk.block_delta_linear(x, w, blocks.to(torch.int32), idx)
    # dtype mismatches
    with pytest.raises(TypeError, match="same dtype"):
        bsk.block_grad_blocks(dy.half(), x, idx, B)
    with pytest.raises(TypeError, match="bias"):
        bsk.block_delta_linear(x, w, blocks, idx, torch.zeros(64, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="bias"):
        bsk.block_delta_linear(x, w, blocks, idx, torch.zeros(32, device=DEV))
    with pytest.raises(TypeError, match="x must have dtype"):
        bsk.block_delta_matmul(x.to(torch.int32), blocks, idx, 64)
    with pytest.raises(TypeError, match="weight"):
        bsk.block_delta_linear(x, w.to(torch.int64), blocks, idx)
    # out= checks
    with pytest.raises(TypeError, match="out must have dtype"):
        bsk.block_delta_matmul(x, blocks, idx, 64, torch.zeros(5, 64, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="out must have shape"):
        bsk.block_delta_matmul(x, blocks, idx, 64, torch.zeros(5, 32, device=DEV))
    with pytest.raises(ValueError, match="out must have shape"):
        bsk.block_grad_blocks(dy, x, idx, B, out=torch.zeros(2, B, B, device=DEV))
    with pytest.raises(TypeError, match="out must have dtype"):
        bsk.block_grad_blocks(dy, x, idx, B, out=torch.zeros(3, B, B, dtype=torch.float64, device=DEV))
    # slot_map / layout
    with pytest.raises(ValueError, match="slot_map must have shape"):
        bsk.block_delta_linear(x, w, blocks, idx, slot_map=torch.zeros(2, 4, dtype=torch.int32, device=DEV))
    with pytest.raises(TypeError, match="slot_map must be an int32"):
        bsk.block_grad_input(dy, w, blocks, idx, slot_map=torch.zeros(4, 2, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="layout was built"):
        bsk.block_delta_matmul(x, blocks, idx, 64, layout=bsk.build_block_layout(idx, (64, 64), B))
    with pytest.raises(TypeError, match="layout must be"):
        bsk.block_delta_matmul(x, blocks, idx, 64, layout=object())
