"""Segmented multi-adapter delta kernels (sparse_engine/kernels/multi_adapter.py) against their reference twins.

On CPU the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1):
fp32/fp16 here, bf16 only with CUDA. Shapes are small on purpose.
"""
import pytest
import torch
from sparse_engine.kernels import runtime
from sparse_engine.kernels import reference as ref

pytestmark = pytest.mark.skipif(not runtime.HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not runtime.INTERPRET:  # pragma: no cover - conftest sets it
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from sparse_engine.kernels import multi_adapter as ma

B = 16


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _block_pool(shape, n_slots, gen, density=0.35, empty=(), dtype=torch.float32):
    """A block pool with ``n_slots`` slots (those in ``empty`` own nothing), stored like the library."""
    d_out, d_in = shape
    n_rb, n_cb = d_out // B, d_in // B
    row_ptr = torch.zeros(n_slots + 1, n_rb + 1, dtype=torch.int32)  # one spare, never-used slot row
    blocks, cols, off = [], [], 0
    for s in range(n_slots):
        if s in empty:
            continue
        ids = (torch.rand(n_rb * n_cb, generator=gen) < density).nonzero().flatten()
        counts = torch.bincount(ids // n_cb, minlength=n_rb)
        row_ptr[s, 0] = off
        row_ptr[s, 1:] = off + torch.cumsum(counts, 0)
        blocks.append(torch.randn(len(ids), B, B, generator=gen))
        cols.append((ids % n_cb).to(torch.int32))
        off += len(ids)
    # spare capacity past the used end, filled with garbage that must never be read
    blocks.append(torch.full((3, B, B), float("nan")))
    cols.append(torch.zeros(3, dtype=torch.int32))
    return row_ptr, torch.cat(cols), torch.cat(blocks).to(dtype)


def _element_pool(shape, n_slots, gen, density=0.15, empty=(), col_dtype=torch.int16, dtype=torch.float32):
    d_out, d_in = shape
    row_ptr = torch.zeros(n_slots, d_out + 1, dtype=torch.int32)
    vals, cols, off = [], [], 0
    for s in range(n_slots):
        if s in empty:
            continue
        ids = (torch.rand(d_out * d_in, generator=gen) < density).nonzero().flatten()
        counts = torch.bincount(ids // d_in, minlength=d_out)
        row_ptr[s, 0] = off
        row_ptr[s, 1:] = off + torch.cumsum(counts, 0)
        vals.append(torch.randn(len(ids), generator=gen))
        cols.append((ids % d_in).to(col_dtype))
        off += len(ids)
    vals.append(torch.full((5,), float("nan")))
    cols.append(torch.zeros(5, dtype=col_dtype))
    return row_ptr, torch.cat(cols), torch.cat(vals).to(dtype)


def _segments(n_tokens, n_slots, gen, n_seg=4, frac=0.8):
    """Random token subset grouped into ``n_seg`` segments with random (possibly repeated) slots."""
    n_sel = max(n_seg, int(n_tokens * frac))
    token_order = torch.randperm(n_tokens, generator=gen)[:n_sel].to(torch.int32)
    cuts = torch.sort(torch.randperm(n_sel - 1, generator=gen)[: n_seg - 1] + 1).values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([n_sel])]).to(torch.int32)
    slots = torch.randint(0, n_slots, (n_seg,), generator=gen).to(torch.int32)
    return token_order, slots, offsets


def _to(device, *ts):
    return [t.to(device) for t in ts]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("block_m", [16, None])
def test_block_matches_reference(dtype, tol, block_m):
    gen = torch.Generator().manual_seed(1)
    shape, n_tokens, n_slots = (96, 64), 45, 4
    row_ptr, cols, blocks = _block_pool(shape, n_slots, gen, empty=(2,))
    token_order, slots, offsets = _segments(n_tokens, n_slots, gen, n_seg=5)
    x = torch.randn(n_tokens, shape[1], generator=gen)
    base = torch.randn(n_tokens, shape[0], generator=gen)
    expect = ref.multi_block_delta(x.to(dtype).double(), base.double().clone(), token_order, slots, offsets,
                                   row_ptr, cols, blocks.double())
    xd, out = _to(DEVICE, x.to(dtype), base.to(dtype).clone())
    args = _to(DEVICE, token_order, slots, offsets, row_ptr, cols, blocks)
    got = ma.multi_block_delta(xd, out, *args, block_m=block_m)
    assert got is out
    assert _rel(got.cpu(), expect) < tol
    untouched = torch.ones(n_tokens, dtype=torch.bool)
    untouched[token_order.long()] = False
    assert torch.equal(got.cpu()[untouched], base.to(dtype)[untouched])  # rows without adapter: base output


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("col_dtype", [torch.int16, torch.int32])
def test_element_matches_reference(dtype, tol, col_dtype):
    gen = torch.Generator().manual_seed(2)
    shape, n_tokens, n_slots = (48, 40), 37, 3
    row_ptr, cols, vals = _element_pool(shape, n_slots, gen, empty=(1,), col_dtype=col_dtype)
    token_order, slots, offsets = _segments(n_tokens, n_slots, gen, n_seg=4)
    x = torch.randn(n_tokens, shape[1], generator=gen)
    base = torch.randn(n_tokens, shape[0], generator=gen)
    expect = ref.multi_element_delta(x.to(dtype).double(), base.double().clone(), token_order, slots, offsets,
                                     row_ptr, cols, vals.double())
    out = base.to(dtype).clone().to(DEVICE)
    got = ma.multi_element_delta(x.to(dtype).to(DEVICE), out, *_to(DEVICE, token_order, slots, offsets, row_ptr,
                                                                   cols, vals))
    assert _rel(got.cpu(), expect) < tol
    untouched = torch.ones(n_tokens, dtype=torch.bool)
    untouched[token_order.long()] = False
    assert torch.equal(got.cpu()[untouched], base.to(dtype)[untouched])


def test_decode_like_segments_and_strided_input():
    """One token per row, singleton segments, a slot used by many rows, a non-contiguous x."""
    gen = torch.Generator().manual_seed(3)
    shape, n_tokens, n_slots = (64, 32), 20, 5
    row_ptr, cols, blocks = _block_pool(shape, n_slots, gen)
    order = torch.sort(torch.randint(0, n_slots, (n_tokens,), generator=gen))
    slots_per_row, rows = order.values, order.indices
    seg_slots, counts = torch.unique_consecutive(slots_per_row, return_counts=True)
    offsets = torch.cat([torch.tensor([0]), torch.cumsum(counts, 0)]).to(torch.int32)
    wide = torch.randn(n_tokens, 2 * shape[1], generator=gen)
    x = wide[:, ::2]  # stride 2 along features
    base = torch.randn(n_tokens, shape[0], generator=gen)
    token_order, seg_slots = rows.to(torch.int32), seg_slots.to(torch.int32)
    expect = ref.multi_block_delta(x.double(), base.double().clone(), token_order, seg_slots, offsets, row_ptr,
                                   cols, blocks.double())
    got = ma.multi_block_delta(x.to(DEVICE), base.clone().to(DEVICE),
                               *_to(DEVICE, token_order, seg_slots, offsets, row_ptr, cols, blocks))
    assert _rel(got.cpu(), expect) < 1e-5


def test_build_tiles_covers_every_segment_once():
    slots = torch.tensor([3, 0, 7], dtype=torch.int32)
    offsets = torch.tensor([0, 5, 5, 41], dtype=torch.int32)  # middle segment empty
    tiles = ma.build_tiles(slots, offsets, 41, 16)
    assert tiles.shape == (41 // 16 + 3, 3)
    live = tiles[tiles[:, 2] > tiles[:, 1]].tolist()
    assert live == [[3, 0, 5], [7, 5, 21], [7, 21, 37], [7, 37, 41]]
    assert (tiles[len(live):] == 0).all()


def test_empty_inputs_leave_out_untouched():
    gen = torch.Generator().manual_seed(4)
    row_ptr, cols, blocks = _block_pool((32, 32), 2, gen)
    x, out = torch.randn(6, 32).to(DEVICE), torch.randn(6, 32).to(DEVICE)
    keep = out.clone()
    empty = torch.zeros(0, dtype=torch.int32)
    ma.multi_block_delta(x, out, *_to(DEVICE, empty, empty, torch.zeros(1, dtype=torch.int32), row_ptr, cols, blocks))
    assert torch.equal(out, keep)


def test_bad_arguments_raise():
    gen = torch.Generator().manual_seed(5)
    row_ptr, cols, blocks = _block_pool((32, 32), 2, gen)
    x, out = torch.randn(4, 32), torch.randn(4, 32)
    tok, slots, offs = torch.arange(4, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="token_order"):
        ma.multi_block_delta(x, out, tok.long(), slots, offs, row_ptr, cols, blocks)
    with pytest.raises(ValueError, match="seg_offsets"):
        ma.multi_block_delta(x, out, tok, slots, offs[:1], row_ptr, cols, blocks)
    with pytest.raises(ValueError, match="row_ptr"):
        ma.multi_block_delta(x, out, tok, slots, offs, row_ptr[:, :2], cols, blocks)
    with pytest.raises(ValueError, match="block_m"):
        ma.multi_block_delta(x, out, tok, slots, offs, row_ptr, cols, blocks, block_m=24)
    with pytest.raises(ValueError, match="x \\[T, d_in\\]"):
        ma.multi_block_delta(x[:3], out, tok, slots, offs, row_ptr, cols, blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 arithmetic needs CUDA (wrong in the interpreter)")
def test_bf16_on_cuda():  # pragma: no cover - GPU only
    gen = torch.Generator().manual_seed(6)
    shape, n_tokens = (256, 128), 300
    row_ptr, cols, blocks = _block_pool(shape, 6, gen, dtype=torch.bfloat16)
    erow, ecols, evals = _element_pool(shape, 6, gen, dtype=torch.bfloat16)
    token_order, slots, offsets = _segments(n_tokens, 6, gen, n_seg=9)
    x = torch.randn(n_tokens, shape[1], generator=gen).bfloat16()
    base = torch.randn(n_tokens, shape[0], generator=gen).bfloat16()
    for fn, pool in ((ma.multi_block_delta, (row_ptr, cols, blocks)), (ma.multi_element_delta, (erow, ecols, evals))):
        expect = getattr(ref, fn.__name__)(x.double(), base.double().clone(), token_order, slots, offsets,
                                           pool[0], pool[1], pool[2].double())
        got = fn(x.cuda(), base.clone().cuda(), *_to("cuda", token_order, slots, offsets, *pool))
        assert _rel(got.cpu(), expect) < 1e-2


def test_block_m_holds_the_longest_segment():
    """Every segment of up to 128 tokens is one tile (its adapter read once), whatever the mean."""
    assert [ma.choose_block_m(n) for n in (1, 16, 17, 32, 33, 64, 65, 128, 1000)] == [16, 16, 32, 32, 64, 64, 128,
                                                                                        128, 128]
    slots = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    offsets = torch.tensor([0, 40, 41, 42, 43], dtype=torch.int32)  # one long segment, three singletons
    gen = torch.Generator().manual_seed(7)
    row_ptr, cols, blocks = _block_pool((32, 32), 4, gen)
    x, base = torch.randn(43, 32, generator=gen), torch.randn(43, 32, generator=gen)
    token_order = torch.randperm(43, generator=gen).to(torch.int32)
    expect = ref.multi_block_delta(x.double(), base.double().clone(), token_order, slots, offsets, row_ptr, cols,
                                   blocks.double())
    got = ma.multi_block_delta(x.to(DEVICE), base.clone().to(DEVICE),
                               *_to(DEVICE, token_order, slots, offsets, row_ptr, cols, blocks))  # block_m chosen: 64
    assert _rel(got.cpu(), expect) < 1e-5
    tiles = ma.build_tiles(slots, offsets, 43, ma.choose_block_m(40))
    assert (tiles[:, 2] > tiles[:, 1]).sum() == 4
