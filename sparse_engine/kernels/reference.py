"""Plain-PyTorch reference twin of every kernel.

These functions are the CPU path of the engine, the ground truth of the kernel tests and
the "dense PyTorch reference" that every benchmark compares against. They favour
clarity over memory: several materialise the dense (d_out, d_in) delta.

Conventions shared with the Triton launchers:

* ``x``: activations ``[..., d_in]`` in the base dtype; ``dy``: ``[..., d_out]``.
* ``weight``: the frozen base weight ``[d_out, d_in]`` (bf16 on GPU, fp32 on CPU).
* ``delta``: dense trainable Ŵ ``[d_out, d_in]`` fp32 (search phase); ``mask``: bool
  ``[d_out, d_in]`` or ``None`` for "mask ignored" (the score pass of Algorithm 1).
* ``values`` fp32 ``[nnz]`` + ``indices`` int32 ``[nnz]`` sorted flat row-major indices
  (element fixed phase); ``blocks`` fp32 ``[n, B, B]`` + ``block_indices`` int32 ``[n]``
  sorted flat block ids ``row_block * (d_in // B) + col_block`` (block fixed phase).
* The effective weight ``W + ΔW`` is formed in fp32 and cast to the activations' dtype
  before the matmul; gradients of adapter values are returned in fp32.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from .runtime import SCORES


# ----------------------------------------------------------------------------- helpers


def _flatten_tokens(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # -1 is ambiguous for 0 features


def densify_compact(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Dense fp32 ``[d_out, d_in]`` matrix holding ``values`` at flat ``indices``, zeros elsewhere."""
    dense = torch.zeros(shape[0] * shape[1], dtype=torch.float32, device=values.device)
    dense[indices.long()] = values.float()
    return dense.view(shape)


def _tile_rows_cols(block_indices: torch.Tensor, d_in: int, bs: int):
    ids = block_indices.long()
    return ids // (d_in // bs), ids % (d_in // bs)


def densify_blocks(blocks: torch.Tensor, block_indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Dense fp32 ``[d_out, d_in]`` matrix with each ``blocks[i]`` placed at tile ``block_indices[i]``."""
    d_out, d_in = shape
    bs = blocks.shape[-1]
    dense = torch.zeros(d_out, d_in, dtype=torch.float32, device=blocks.device)
    rows, cols = _tile_rows_cols(block_indices, d_in, bs)
    # Indexing the [rows, B, cols, B] view writes the tiles in place, no permuted copy of the matrix.
    dense.view(d_out // bs, bs, d_in // bs, bs)[rows, :, cols, :] = blocks.float()
    return dense


def gather_blocks(dense: torch.Tensor, block_indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """The ``[n, B, B]`` tiles of ``dense`` at flat block ids ``block_indices`` (a copy)."""
    d_out, d_in = dense.shape
    bs = block_size
    rows, cols = _tile_rows_cols(block_indices, d_in, bs)
    return dense.reshape(d_out // bs, bs, d_in // bs, bs)[rows, :, cols, :]


def block_sum(scores: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum of ``scores`` over each non-overlapping ``B×B`` tile: ``[d_out/B, d_in/B]``."""
    d_out, d_in = scores.shape
    bs = block_size
    return scores.reshape(d_out // bs, bs, d_in // bs, bs).sum(dim=(1, 3))


def _linear_with(x: torch.Tensor, effective_weight_fp32: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, effective_weight_fp32.to(x.dtype), bias)


def _weight_grad_fp32(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """G = dYᵀ X over all tokens, accumulated in fp32."""
    return _flatten_tokens(dy).float().t() @ _flatten_tokens(x).float()


# ------------------------------------------------------- element-sparse, search phase


def masked_delta_linear(x, weight, delta, mask, bias=None):
    """y = x (W + Ŵ⊙M)ᵀ + b; ``mask=None`` means the mask is ignored (W + Ŵ)."""
    effective = weight.float() + (delta if mask is None else delta * mask)
    return _linear_with(x, effective, bias)


def masked_delta_grad_input(dy, weight, delta, mask):
    """dX = dY (W + Ŵ⊙M)."""
    effective = weight.float() + (delta if mask is None else delta * mask)
    return dy @ effective.to(dy.dtype)


def masked_delta_grad_delta(dy, x, mask):
    """dŴ = (dYᵀ X) ⊙ M in fp32 (dense, search phase)."""
    grad = _weight_grad_fp32(dy, x)
    return grad if mask is None else grad * mask


def delta_score(dy, x, delta, score: str = "mcs", block_size: int | None = None):
    """Mask-update score from G = dYᵀX (fp32): per element, or summed per ``B×B`` tile.

    mcs = Ŵ⊙G (signed), snip = |Ŵ⊙G|, gm = |G|, wm = |Ŵ| (dy and x unused).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if score == "wm":
        scores = delta.float().abs()
    else:
        grad = _weight_grad_fp32(dy, x)
        if score == "mcs":
            scores = delta.float() * grad
        elif score == "snip":
            scores = (delta.float() * grad).abs()
        else:
            scores = grad.abs()
    return scores if block_size is None else block_sum(scores, block_size)


# -------------------------------------------------------- element-sparse, fixed phase


def compact_effective_weight(weight, values, indices):
    flat = weight.float().flatten().index_add(0, indices.long(), values.float())
    return flat.view(weight.shape)


def compact_delta_linear(x, weight, values, indices, bias=None, layout=None):
    """y = x (W + ΔW)ᵀ + b with ΔW given by compact ``values`` at flat ``indices`` (``layout``:
    the launchers' index layout, which the twin does not need)."""
    return _linear_with(x, compact_effective_weight(weight, values, indices), bias)


def compact_grad_input(dy, weight, values, indices, layout=None):
    return dy @ compact_effective_weight(weight, values, indices).to(dy.dtype)


def compact_grad_values(dy, x, indices, layout=None):
    """d values = (dYᵀ X) at the kept flat indices, fp32 ``[nnz]`` (dense product, then gather)."""
    return _weight_grad_fp32(dy, x).flatten()[indices.long()]


# ---------------------------------------------------------- block-sparse, fixed phase


def block_effective_weight(weight, blocks, block_indices):
    return weight.float() + densify_blocks(blocks, block_indices, tuple(weight.shape))


def block_delta_linear(x, weight, blocks, block_indices, bias=None, *, layout=None):
    """y = x (W + ΔW)ᵀ + b with ΔW given by ``B×B`` blocks at flat block ids."""
    return _linear_with(x, block_effective_weight(weight, blocks, block_indices), bias)


def block_grad_input(dy, weight, blocks, block_indices, *, layout=None):
    return dy @ block_effective_weight(weight, blocks, block_indices).to(dy.dtype)


def block_grad_blocks(dy, x, block_indices, block_size: int, *, layout=None):
    """d blocks = (dYᵀ X) at the kept tiles, fp32 ``[n, B, B]`` (dense product, then gather)."""
    return gather_blocks(_weight_grad_fp32(dy, x), block_indices, block_size)


# ----------------------------------- block-sparse extras (owner: block_sparse kernels)
# Reference twins of the delta-only launchers of ``sparse_engine/kernels/block_sparse.py`` and the
# per-tile slot map shared by both backends.


def build_block_slot_map(block_indices, shape, block_size: int = 16):
    """int32 ``[d_out/B, d_in/B]`` map: the position in ``blocks`` of the tile's block, -1 if absent.

    Validates ``block_indices`` (int32, 1-D, sorted, unique, in range) and the shape.
    """
    d_out, d_in = (int(s) for s in shape)
    if block_size < 1 or d_out % block_size or d_in % block_size:
        raise ValueError(f"block_size {block_size} must divide the weight shape {(d_out, d_in)}")
    n_rb, n_cb = d_out // block_size, d_in // block_size
    validate_block_indices(block_indices, n_rb, n_cb)
    n = block_indices.numel()
    slot_map = torch.full((n_rb * n_cb,), -1, dtype=torch.int32, device=block_indices.device)
    slot_map[block_indices.long()] = torch.arange(n, dtype=torch.int32, device=block_indices.device)
    return slot_map.view(n_rb, n_cb)


def validate_block_indices(block_indices, n_rb: int, n_cb: int) -> None:
    """Raise unless ``block_indices`` is an int32 1-D sorted unique tensor of ids in ``[0, n_rb·n_cb)``."""
    if not isinstance(block_indices, torch.Tensor) or block_indices.dtype != torch.int32:
        raise TypeError(f"block_indices must be an int32 tensor, got {getattr(block_indices, 'dtype', type(block_indices))}")
    if block_indices.dim() != 1:
        raise ValueError(f"block_indices must be 1-D, got shape {tuple(block_indices.shape)}")
    n = block_indices.numel()
    if n:
        # one device-to-host transfer for all four facts
        step = block_indices[1:].long() - block_indices[:-1].long()
        lo, hi, n_dup, n_down = torch.stack(
            [block_indices.min().long(), block_indices.max().long(), (step == 0).sum(), (step < 0).sum()]
        ).tolist()
        if lo < 0 or hi >= n_rb * n_cb:
            raise ValueError(f"block_indices out of range [0, {n_rb * n_cb}) for a {n_rb}x{n_cb} block grid: [{lo}, {hi}]")
        if n_dup:
            raise ValueError("block_indices contain duplicates")
        if n_down:
            raise ValueError("block_indices must be sorted ascending")


def block_delta_matmul(x, blocks, block_indices, d_out: int, out=None):
    """y (+)= x ΔWᵀ with ΔW ``[d_out, d_in]`` given by blocks (cast to x's dtype); ``out`` given: accumulate."""
    delta = densify_blocks(blocks, block_indices, (d_out, x.shape[-1])).to(x.dtype)
    y = F.linear(x, delta)
    return y if out is None else out.add_(y)


def block_delta_grad_input(dy, blocks, block_indices, d_in: int, out=None):
    """dX (+)= dY ΔW with ΔW ``[d_out, d_in]`` given by blocks (cast to dy's dtype); ``out`` given: accumulate."""
    delta = densify_blocks(blocks, block_indices, (dy.shape[-1], d_in)).to(dy.dtype)
    dx = dy @ delta
    return dx if out is None else out.add_(dx)


# ------------------------------ end of block-sparse extras (owner: block_sparse kernels)


# ------------------------------------------------------------------------------ top-k


BRACKET_MIN_NUMEL = 1 << 18
"""Inputs with at least this many entries take the bracketed CPU path of
:func:`topk_flat_indices` (below it a full ``torch.topk`` is cheap enough)."""
_BRACKET_SAMPLE = 1 << 15  # sampled entries: the bracket spans about ±5 standard deviations of a rank estimate
_BRACKET_SEED = 0x5EED  # a private generator: the path taken is reproducible and the global RNG untouched


def topk_flat_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """int32 sorted flat indices of the ``k`` largest entries of ``scores``.

    Ties at the threshold are broken by the lower flat index; +0.0 and -0.0 are equal.
    NaN is never selected: when fewer than ``k`` entries are not NaN, all of those are
    returned (fewer than ``k``).

    Large CPU inputs avoid a full ``torch.topk``: a sample brackets the threshold, the
    entries above the bracket's lower end are compacted once, and the exact k-th value is
    found among them (same result; see ``_bracketed_candidates``).
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k < 0 or k > n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if k == 0:
        return torch.zeros(0, dtype=torch.int32, device=flat.device)
    if flat.device.type == "cpu" and n >= BRACKET_MIN_NUMEL and flat.is_floating_point():
        found = _bracketed_candidates(flat, k)
        if found is not None:
            return _take_top(*found, k)
    valid = ~torch.isnan(flat)
    if k >= int(valid.count_nonzero()):
        return valid.nonzero().flatten().to(torch.int32)
    clean = torch.where(valid, flat, torch.full_like(flat, float("-inf")))
    threshold = torch.topk(clean, k, sorted=False).values.min()
    return _take_top(None, flat, threshold, k)


def _take_top(index, values, threshold, k: int) -> torch.Tensor:
    """int32 flat indices of the first ``k`` entries of ``values`` by value (descending), then
    index (ascending): all those above the k-th largest value ``threshold``, then the
    lowest-index ties. ``index`` holds the sorted flat indices of ``values`` (None: their own
    positions). NaN compares false, so it is never kept."""
    keep = values >= threshold
    if int(keep.count_nonzero()) > k:  # more ties than places: the lowest indices win
        keep = values > threshold
        ties = (values == threshold).nonzero().flatten()
        keep[ties[: k - int(keep.count_nonzero())]] = True
    if index is None:
        return keep.nonzero().flatten().to(torch.int32)
    return index.index_select(0, keep.nonzero().flatten())  # nonzero + gather: faster than masked_select on the CPU


def _bracketed_candidates(flat: torch.Tensor, k: int):
    """(flat indices, values, exact k-th largest value) of the entries >= a lower bound taken
    from a sample, or None when the bound fails (fewer than k entries above it: an unlucky
    sample, or fewer than k non-NaN entries), which sends the caller to the full path.

    Exact by construction: with at least k entries >= lo, everything below lo ranks after
    the k-th, so the k-th largest of the candidates is the k-th largest of ``flat``. An
    upper bound hi from the same sample narrows the final ``kthvalue`` to the entries in
    [lo, hi] when fewer than k lie above hi. One compare, one count and one compaction of
    the whole input; the rest works on ~k candidates.
    """
    n = flat.numel()
    stride = n // _BRACKET_SAMPLE
    g = torch.Generator().manual_seed(_BRACKET_SEED)
    # one random entry per stride: covers every part of the tensor (rows and columns alike)
    pos = torch.arange(_BRACKET_SAMPLE) * stride + torch.randint(stride, (_BRACKET_SAMPLE,), generator=g)
    sample = flat[pos]
    sample = torch.sort(sample[~torch.isnan(sample)], descending=True).values
    # about k·s/n sampled entries are >= the k-th largest value; bracket it by ±margin ranks
    p = k / n
    rank = p * _BRACKET_SAMPLE
    margin = 5.0 * math.sqrt(_BRACKET_SAMPLE * p * (1.0 - p)) + 4.0
    lo_rank = math.ceil(rank + margin)
    if lo_rank >= sample.numel():
        return None  # no lower bound inside the sample: the candidates would be the whole input
    lo = sample[lo_rank]
    above_lo = flat >= lo
    if int(above_lo.count_nonzero()) < k:
        return None
    index = above_lo.nonzero().flatten().to(torch.int32)
    values = flat.index_select(0, index)
    hi_rank = math.floor(rank - margin)
    if hi_rank >= 0:
        hi = sample[hi_rank]
        n_over = int((values > hi).count_nonzero())
        if n_over < k:
            middle = values.index_select(0, (values <= hi).nonzero().flatten())
            threshold = torch.kthvalue(middle, middle.numel() - (k - n_over) + 1).values
            return index, values, threshold
    threshold = torch.kthvalue(values, values.numel() - k + 1).values
    return index, values, threshold


def kept_masks(indices: list[torch.Tensor], shapes) -> list[torch.Tensor]:
    """bool masks of the given shapes (each layer's score / tile-grid shape) with the units at
    the flat ``indices`` (a top-k result) set: one zero fill and one scatter per layer."""
    if len(indices) != len(shapes):
        raise ValueError(f"got {len(indices)} index tensors but {len(shapes)} shapes")
    masks = []
    for idx, shape in zip(indices, shapes):
        mask = torch.zeros(math.prod(shape), dtype=torch.bool, device=idx.device)
        mask[idx.long()] = True
        masks.append(mask.view(*shape))
    return masks


def topk_per_layer(scores: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
    """Per-layer top-k: ``ks[i]`` kept from ``scores[i]`` (element or tile scores)."""
    if len(scores) != len(ks):
        raise ValueError(f"got {len(scores)} score tensors but {len(ks)} values of k")
    return [topk_flat_indices(s, k) for s, k in zip(scores, ks)]


def topk_global(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """One threshold over all layers (layer drop, Eq. 5-6): exactly ``k`` kept overall.

    Ties are broken by layer order first, then by flat index within the layer.
    """
    sizes = [s.numel() for s in scores]
    picked = topk_flat_indices(torch.cat([s.reshape(-1).float() for s in scores]), k).long()
    out, start = [], 0
    for size in sizes:
        sel = picked[(picked >= start) & (picked < start + size)] - start
        out.append(sel.to(torch.int32))
        start += size
    return out


# ------------------------------------------------ top-k from Ŵ and G (twin of topk_mask.py)
# The reference of sparse_engine/kernels/topk_mask.py's fused launcher.


def delta_grad_score(delta, grad, score: str = "mcs", block_size: int | None = None) -> torch.Tensor:
    """Score of one layer from Ŵ and G = dYᵀX (fp32), per element or summed per ``B×B`` tile.

    mcs = Ŵ⊙G (signed), snip = |Ŵ⊙G|, gm = |G| (``delta`` unused), wm = |Ŵ| (``grad`` unused).
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if score == "wm":
        scores = delta.float().abs()
    elif score == "gm":
        scores = grad.float().abs()
    else:
        scores = delta.float() * grad.float()
        if score == "snip":
            scores = scores.abs()
    return scores if block_size is None else block_sum(scores, block_size)


def topk_from_delta_grad(deltas, grads, score: str = "mcs", ks=None, global_k=None, block_size=None):
    """Per-layer (``ks``) or global (``global_k``) top-k of :func:`delta_grad_score` of each layer.

    Returns int32 sorted flat element indices, or flat block ids ``row_block * (d_in // B) +
    col_block`` when ``block_size`` is given. Same tie and NaN rules as :func:`topk_flat_indices`.
    """
    if (ks is None) == (global_k is None):
        raise ValueError("give exactly one of ks (per-layer k) or global_k")
    n = len(deltas) if deltas is not None else len(grads)
    scores = [
        delta_grad_score(None if deltas is None else deltas[i], None if grads is None else grads[i], score, block_size)
        for i in range(n)
    ]
    return topk_per_layer(scores, ks) if ks is not None else topk_global(scores, global_k)


# ------------------------------------------- masked_delta.py: the score-pass top-k


def delta_score_topk(dy, x, delta, k: int, score: str = "mcs") -> torch.Tensor:
    """Twin of ``masked_delta.delta_score_topk``: int32 sorted flat indices of the ``k``
    largest element scores (dense fp32 score, then :func:`topk_flat_indices`)."""
    return topk_flat_indices(delta_score(dy, x, delta, score), k)


# ------------------------------------------- multi-adapter serving (twins of sparse_engine/kernels/multi_adapter.py)
# Twins of the segmented multi-adapter launchers, and the CPU serving path: per segment, only
# the slot's kept entries are read and no dense ΔW is formed. Element pools: the slot's CSR
# extent wrapped as a torch sparse matrix without copying. Block pools: the segment's x slices
# gathered per kept block, one batched 16×16 matmul, the products summed into their block rows,
# in chunks small enough to stay in cache. Picked by measurement against torch's BSR, a CSR
# copy, gather/index_add and a dense rebuild: docs/serving.md, "CPU path".

SERVING_CHUNK = 1 << 19
"""Gathered activation scalars per chunk of the CPU block path (2 MiB in fp32): the gathered
slices and their products stay in cache, and a chunk is large enough (4096 blocks at 8
tokens) that the per-call cost of the four torch ops stays small."""


@functools.cache
def _sparse_constructors_quiet() -> None:
    """Build one sparse matrix with torch's once-per-process "beta" warning silenced, so the
    serving path neither prints it nor pays a warnings filter on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.sparse_csr_tensor(torch.tensor([0, 1], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                                torch.ones(1), (1, 1), check_invariants=False)


def _rounded(values, value_dtype, compute_dtype):
    """``values`` rounded to ``value_dtype`` and held in ``compute_dtype`` (a view when both match)."""
    if values.dtype != value_dtype:
        values = values.to(value_dtype)
    return values if values.dtype == compute_dtype else values.to(compute_dtype)


def _element_product(xs, row_ptr_line, start, end, cols, values, d_out, value_dtype):
    """``xs · ΔWᵀ`` (``[tokens, d_out]``, in xs's dtype) for the slot whose CSR entries are
    ``[start, end)`` of the pool (``row_ptr_line``: their absolute row pointers): torch's CSR
    product over a view of the pool, only the kept entries."""
    crow = row_ptr_line - start if start else row_ptr_line
    col = cols[start:end]
    if crow.dtype != torch.int32:
        crow = crow.to(torch.int32)
    if col.dtype != torch.int32:  # int16 pools (the Triton layout): widened per call, copies the ids
        col = col.to(torch.int32)
    vals = _rounded(values[start:end], value_dtype, xs.dtype)
    _sparse_constructors_quiet()
    mat = torch.sparse_csr_tensor(crow, col, vals, (d_out, xs.shape[-1]), check_invariants=False)
    return (mat @ xs.t()).t()


def _block_product(xs, row_ptr_line, start, end, cols, blocks, d_out, value_dtype):
    """``xs · ΔWᵀ`` (``[tokens, d_out]``, in xs's dtype) for the slot whose blocks are
    ``[start, end)`` of the pool: each kept block times its 16-column slice of the tokens
    (gathered), summed into its block row; only the kept blocks are read."""
    n_tok, d_in = xs.shape
    bs = blocks.shape[-1]
    n_rb, n_cb = d_out // bs, d_in // bs
    # the block row of every kept block; int64: index_add_ takes 4x as long with int32 ids
    rows = torch.repeat_interleave((row_ptr_line[1:] - row_ptr_line[:-1]).long())
    cols = cols[start:end]
    blocks = blocks[start:end]
    chunk = max(16, SERVING_CHUNK // (n_tok * bs))
    acc = xs.new_zeros(n_rb, n_tok, bs)
    if n_tok == 1:  # one matrix-vector product per block, [B, B] @ [B, 1]: torch's fastest bmm form here
        x_cols = xs.view(n_cb, bs, 1)
    else:  # [tokens, B] @ [B, B] per block
        x_cols = xs.view(n_tok, n_cb, bs).transpose(0, 1).contiguous()  # [column block, token, B]
    for a in range(0, end - start, chunk):
        x_blk = x_cols.index_select(0, cols[a:a + chunk])
        w_blk = _rounded(blocks[a:a + chunk], value_dtype, xs.dtype)
        prod = torch.bmm(w_blk, x_blk).view(-1, 1, bs) if n_tok == 1 else torch.bmm(x_blk, w_blk.transpose(1, 2))
        acc.index_add_(0, rows[a:a + chunk], prod)
    return acc.transpose(0, 1).reshape(n_tok, d_out)


def _multi_delta(x, out, token_order, seg_slots, seg_offsets, row_ptr, cols, values, product):
    """``out[tokens of segment i] += x[...] · ΔW_{seg_slots[i]}ᵀ``; values are cast to x's dtype,
    products accumulate in fp32 (fp64 for fp64 inputs), one rounding into ``out``."""
    n_sel = int(token_order.numel())
    if n_sel == 0 or seg_slots.numel() == 0:
        return out
    d_out = int(out.shape[-1])
    compute = torch.promote_types(x.dtype, torch.float32)
    offsets, tokens = seg_offsets.tolist(), token_order.tolist()
    starts, ends = row_ptr[:, 0].tolist(), row_ptr[:, -1].tolist()  # every slot's extent [start, end)
    for i, slot in enumerate(seg_slots.tolist()):
        a, b = offsets[i], offsets[i + 1]
        start, end = starts[slot], ends[slot]
        if b <= a or end <= start:  # no tokens, or an adapter with nothing in this layer
            continue
        # a segment's tokens are ascending; consecutive ones (one request, or a decode row) are a view
        run = slice(tokens[a], tokens[b - 1] + 1) if tokens[b - 1] - tokens[a] == b - a - 1 else None
        toks = token_order[a:b]
        xs = x[run] if run is not None else x.index_select(0, toks)
        if xs.dtype != compute:
            xs = xs.to(compute)
        ys = product(xs, row_ptr[slot], start, end, cols, values, d_out, x.dtype)  # [tokens, d_out]
        if out.dtype != compute:  # the sum is added to out read in fp32 and rounded once
            ys = (out[run] if run is not None else out.index_select(0, toks)).to(compute) + ys
            ys = ys.to(out.dtype)
            if run is not None:
                out[run] = ys
            else:
                out.index_copy_(0, toks.long(), ys)
        elif run is not None:
            out[run] += ys
        else:
            out.index_add_(0, toks.long(), ys)  # int64 ids: index_add_ is several times slower with int32
    return out


def multi_block_delta(x, out, token_order, seg_slots, seg_offsets, row_ptr, block_cols, blocks, **_):
    """``out[tokens of segment i] += x[...] · ΔW_{seg_slots[i]}ᵀ`` (block pool), in place; returns ``out``."""
    return _multi_delta(x, out, token_order, seg_slots, seg_offsets, row_ptr, block_cols, blocks, _block_product)


def multi_element_delta(x, out, token_order, seg_slots, seg_offsets, row_ptr, cols, values, **_):
    """``out[tokens of segment i] += x[...] · ΔW_{seg_slots[i]}ᵀ`` (element pool), in place; returns ``out``."""
    return _multi_delta(x, out, token_order, seg_slots, seg_offsets, row_ptr, cols, values, _element_product)


# --------------------------------------- end of multi-adapter serving (owner: sparse_engine/kernels/multi_adapter.py)
