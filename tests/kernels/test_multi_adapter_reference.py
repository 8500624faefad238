"""The CPU serving path: sparse_engine/kernels/reference.py's multi-adapter twins against an fp64 dense oracle.

The pools are built here from each slot's own (ids, values), laid out as AdapterLibrary lays
them out; the oracle is ``x · ΔWᵀ`` with ΔW densified in fp64 from those same (ids, values),
independently of the pool. No Triton needed.
"""
import pytest
import torch
from sparse_engine.kernels import reference as ref

B = 16


def _slot_entries(shape, kind, n_slots, gen, empty, density):
    """Per slot: sorted flat ids (elements or tiles) and values; slots in ``empty`` hold nothing."""
    d_out, d_in = shape
    units = (d_out // B) * (d_in // B) if kind == "block" else d_out * d_in
    out = []
    for s in range(n_slots):
        ids = torch.zeros(0, dtype=torch.long) if s in empty else (torch.rand(units, generator=gen) < density).nonzero().flatten()
        vals = torch.randn(len(ids), *((B, B) if kind == "block" else ()), generator=gen)
        out.append((ids, vals))
    return out


def _pool(shape, kind, entries, col_dtype):
    """(row_ptr, cols, values) as the library stores them: CSR lines of absolute offsets, one per
    slot (plus a spare zero row), and NaN garbage past the used end that must never be read."""
    d_out, d_in = shape
    per_line = d_in // B if kind == "block" else d_in
    n_lines = d_out // B if kind == "block" else d_out
    row_ptr = torch.zeros(len(entries) + 1, n_lines + 1, dtype=torch.int32)
    cols, vals, off = [], [], 0
    for s, (ids, v) in enumerate(entries):
        counts = torch.bincount(ids // per_line, minlength=n_lines)
        row_ptr[s, 0] = off
        row_ptr[s, 1:] = off + torch.cumsum(counts, 0)
        cols.append((ids % per_line).to(col_dtype))
        vals.append(v)
        off += len(ids)
    cols.append(torch.zeros(3, dtype=col_dtype))
    vals.append(torch.full((3, *vals[0].shape[1:]), float("nan")))
    return row_ptr, torch.cat(cols), torch.cat(vals)


def _dense(shape, kind, ids, vals):
    d_out, d_in = shape
    dense = torch.zeros(d_out, d_in, dtype=torch.float64)
    if kind == "block":
        n_cb = d_in // B
        for i, t in enumerate(ids.tolist()):
            r, c = divmod(t, n_cb)
            dense[r * B:(r + 1) * B, c * B:(c + 1) * B] = vals[i].double()
    else:
        dense.view(-1)[ids] = vals.double()
    return dense


def _plan(slot_of_token):
    """token_order / seg_slots / seg_offsets of a per-token slot list (-1: no adapter)."""
    tokens = [t for t, s in enumerate(slot_of_token) if s >= 0]
    tokens.sort(key=lambda t: slot_of_token[t])
    slots, offsets = [], [0]
    for t in tokens:
        if slots and slots[-1] == slot_of_token[t]:
            offsets[-1] += 1
        else:
            slots.append(slot_of_token[t])
            offsets.append(offsets[-1] + 1)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return i32(tokens), i32(slots), i32(offsets)


def _run(kind, *args):
    fn = ref.multi_block_delta if kind == "block" else ref.multi_element_delta
    return fn(*args)


LAYOUTS = {
    "mixed": lambda n_tok, n_slots, g: [int(v) for v in torch.randint(-1, n_slots, (n_tok,), generator=g)],
    "every token its own slot": lambda n_tok, n_slots, g: list(range(n_tok)),
    "one slot for all": lambda n_tok, n_slots, g: [2] * n_tok,
    "no adapter anywhere": lambda n_tok, n_slots, g: [-1] * n_tok,
}


@pytest.mark.parametrize("kind,shape", [("element", (37, 53)), ("block", (48, 80))])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_fp64_dense_oracle(kind, shape, layout, dtype):
    gen = torch.Generator().manual_seed(hash((kind, layout)) % 2**31)
    n_tok = 11
    n_slots = n_tok if layout == "every token its own slot" else 5
    entries = _slot_entries(shape, kind, n_slots, gen, empty={1}, density=0.3)
    row_ptr, cols, values = _pool(shape, kind, entries, torch.int32 if kind == "block" else torch.int16)
    slot_of = LAYOUTS[layout](n_tok, n_slots, gen)
    token_order, seg_slots, seg_offsets = _plan(slot_of)
    x = torch.randn(n_tok, shape[1], generator=gen, dtype=torch.float64).to(dtype)
    base = torch.randn(n_tok, shape[0], generator=gen, dtype=torch.float64).to(dtype)
    out = base.clone()
    got = _run(kind, x, out, token_order, seg_slots, seg_offsets, row_ptr, cols, values.to(dtype))
    assert got is out
    expect = base.double().clone()
    for t, s in enumerate(slot_of):
        if s >= 0:
            expect[t] += x[t].double() @ _dense(shape, kind, *entries[s]).t()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    err = float((got.double() - expect).norm() / expect.norm())
    assert err < tol, err  # NaN fails too
    untouched = [t for t, s in enumerate(slot_of) if s < 0 or s == 1]  # no adapter, or the empty one
    assert torch.equal(got[untouched], base[untouched])


@pytest.mark.parametrize("kind,shape", [("element", (40, 24)), ("block", (32, 48))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_adds_once_in_fp32(kind, shape, dtype):
    """Values rounded to x's dtype, products summed in fp32, one rounding into ``out``."""
    gen = torch.Generator().manual_seed(3)
    entries = _slot_entries(shape, kind, 3, gen, empty=set(), density=0.4)
    row_ptr, cols, values = _pool(shape, kind, entries, torch.int32)
    slot_of = [0, 2, -1, 1, 2, 0, 0]
    token_order, seg_slots, seg_offsets = _plan(slot_of)
    x = torch.randn(len(slot_of), shape[1], generator=gen).to(dtype)
    base = torch.randn(len(slot_of), shape[0], generator=gen).to(dtype)
    got = _run(kind, x, base.clone(), token_order, seg_slots, seg_offsets, row_ptr, cols, values)
    for t, s in enumerate(slot_of):
        if s < 0:
            assert torch.equal(got[t], base[t])
            continue
        ids, vals = entries[s]
        delta = _dense(shape, kind, ids, vals.to(dtype)).float()
        expect = (base[t].float() + x[t].float() @ delta.t()).to(dtype)
        torch.testing.assert_close(got[t], expect, rtol=2e-3 if dtype == torch.float16 else 1e-2, atol=1e-3)


@pytest.mark.parametrize("kind", ["element", "block"])
def test_no_dense_delta_is_formed(kind):
    """The CPU path costs what the kept entries cost: no allocation the size of ΔW (the dense
    twin it replaced allocated a [d_out, d_in] fp32 matrix per segment)."""
    shape = (512, 1024)
    gen = torch.Generator().manual_seed(4)
    entries = _slot_entries(shape, kind, 4, gen, empty=set(), density=0.05)
    row_ptr, cols, values = _pool(shape, kind, entries, torch.int32)
    token_order, seg_slots, seg_offsets = _plan([0, 1, 2, 3, 0, 1])
    x, out = torch.randn(6, shape[1], generator=gen), torch.zeros(6, shape[0])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        _run(kind, x, out, token_order, seg_slots, seg_offsets, row_ptr, cols, values)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < shape[0] * shape[1] * 4 // 8, largest
    assert out.abs().sum() > 0


@pytest.mark.parametrize("tokens_per_segment", [1, 2, 7])
def test_block_chunks_match_the_oracle(monkeypatch, tokens_per_segment):
    """The block path walks a slot's blocks in chunks: forced to its smallest chunk (16 blocks),
    a slot of ~50 blocks spans several, the last one partial, for one and several tokens."""
    monkeypatch.setattr(ref, "SERVING_CHUNK", 1)
    shape = (160, 176)  # 10 x 11 tiles
    gen = torch.Generator().manual_seed(tokens_per_segment)
    entries = _slot_entries(shape, "block", 3, gen, empty=set(), density=0.45)
    assert all(len(ids) > 32 for ids, _ in entries)
    row_ptr, cols, values = _pool(shape, "block", entries, torch.int32)
    slot_of = [s for s in (2, 0, 1) for _ in range(tokens_per_segment)]
    token_order, seg_slots, seg_offsets = _plan(slot_of)
    x = torch.randn(len(slot_of), shape[1], generator=gen)
    out = torch.full((len(slot_of), shape[0]), 0.5)
    ref.multi_block_delta(x, out, token_order, seg_slots, seg_offsets, row_ptr, cols, values)
    expect = torch.stack([0.5 + x[t].double() @ _dense(shape, "block", *entries[s]).t() for t, s in enumerate(slot_of)])
    err = float((out.double() - expect).norm() / expect.norm())
    assert err < 1e-6, err
