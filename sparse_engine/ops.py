"""Autograd Functions of the sparse-adapter layers.

Each Function saves the minimum (the activations and references to the frozen weight and
the adapter storage) and calls the implementations of the layer's ``backend.Kernels``: the
Triton launchers (``sparse_engine.kernels.*``) or their plain-PyTorch twins
(``sparse_engine.kernels.reference``), which share signatures.

Three storage phases of a layer:

* search phase, element or block: dense fp32 Ŵ + bool mask M (``MaskedDeltaLinear``);
* fixed phase, element: fp32 values + int32 sorted flat indices (``CompactDeltaLinear``);
* fixed phase, block: fp32 ``[n, B, B]`` blocks + int32 block ids (``BlockDeltaLinear``);
  with the Triton kernels the block search phase also runs through the block kernels
  (``BlockSearchDeltaLinear``: the kept tiles of Ŵ gathered per step).

The score pass of Algorithm 1 runs ``MaskedDeltaLinear`` with ``score_sink`` set: its
backward hands the mask score (computed from dYᵀX) to the sink instead of producing a
gradient for Ŵ, so no dense gradient is stored in ``.grad``.
"""
from __future__ import annotations

from typing import Callable

import torch

from sparse_engine.backend import Kernels
from sparse_engine.kernels import reference as ref


def _bias_grad(dy: torch.Tensor, bias: torch.Tensor | None, needed: bool):
    if bias is None or not needed:
        return None
    return dy.reshape(-1, dy.shape[-1]).sum(0).to(bias.dtype)


class MaskedDeltaLinear(torch.autograd.Function):
    """y = x (W + Ŵ⊙M)ᵀ + b with dense Ŵ (search phase). ``mask=None``: mask ignored."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, mask, kernels: Kernels, score_sink: Callable | None):
        impl = kernels.masked_delta
        ctx.save_for_backward(x, weight, delta, mask, bias)
        ctx.impl, ctx.score_sink = impl, score_sink
        return impl.masked_delta_linear(x, weight, delta, mask, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, delta, mask, bias = ctx.saved_tensors
        impl = ctx.impl
        dy = dy.contiguous()
        dx = impl.masked_delta_grad_input(dy, weight, delta, mask) if ctx.needs_input_grad[0] else None
        ddelta = None
        if ctx.score_sink is not None:
            ctx.score_sink(dy, x)
        elif ctx.needs_input_grad[3]:
            ddelta = impl.masked_delta_grad_delta(dy, x, mask)
        return dx, None, _bias_grad(dy, bias, ctx.needs_input_grad[2]), ddelta, None, None, None


class CompactDeltaLinear(torch.autograd.Function):
    """y = x (W + ΔW)ᵀ + b with ΔW as compact fp32 values at int32 flat indices (fixed phase)."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, layout, kernels: Kernels):
        impl = kernels.masked_delta
        ctx.save_for_backward(x, weight, values, indices, bias)
        ctx.impl, ctx.layout = impl, layout
        return impl.compact_delta_linear(x, weight, values, indices, bias, layout=layout)

    @staticmethod
    def backward(ctx, dy):
        x, weight, values, indices, bias = ctx.saved_tensors
        impl, layout = ctx.impl, ctx.layout
        dy = dy.contiguous()
        dx = impl.compact_grad_input(dy, weight, values, indices, layout=layout) if ctx.needs_input_grad[0] else None
        dvalues = impl.compact_grad_values(dy, x, indices, layout=layout) if ctx.needs_input_grad[3] else None
        return dx, None, _bias_grad(dy, bias, ctx.needs_input_grad[2]), dvalues, None, None, None


class BlockDeltaLinear(torch.autograd.Function):
    """y = x (W + ΔW)ᵀ + b with ΔW as ``[n, B, B]`` blocks at int32 block ids (block fixed phase).

    ``layout``: the Triton kernels' ``BlockLayout`` of ``block_indices`` (None for the reference).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, blocks, block_indices, layout, kernels: Kernels):
        impl = kernels.block_sparse
        ctx.save_for_backward(x, weight, blocks, block_indices, bias)
        ctx.impl, ctx.layout = impl, layout
        return impl.block_delta_linear(x, weight, blocks, block_indices, _bias_like(bias, x), layout=layout)

    @staticmethod
    def backward(ctx, dy):
        x, weight, blocks, block_indices, bias = ctx.saved_tensors
        dx, dblocks = _block_backward(ctx, dy, x, weight, blocks, block_indices)
        return dx, None, _bias_grad(dy, bias, ctx.needs_input_grad[2]), dblocks, None, None, None


class BlockSearchDeltaLinear(torch.autograd.Function):
    """Search phase of a block-sparse layer through the block kernels: y = x (W + Ŵ⊙M)ᵀ + b
    with M made of whole B×B tiles (``block_indices``, sorted tile ids).

    The kept tiles of the dense Ŵ are gathered into ``[n, B, B]`` blocks (keep-ratio-sized),
    so forward and dX are the fused block GEMMs and dŴ is the sampled product at the kept
    tiles only, scattered into a dense gradient that is zero outside the mask (what the
    masked-dense path gives, for a fraction of the flops). ``layout``: the kernels'
    ``BlockLayout`` of the mask's tiles (its ``block_indices`` are the kept tile ids).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, layout, kernels: Kernels):
        impl = kernels.block_sparse
        block_indices = layout.block_indices
        blocks = ref.gather_blocks(delta.detach(), block_indices, layout.block_size)
        ctx.save_for_backward(x, weight, blocks, block_indices, bias)
        ctx.impl, ctx.layout, ctx.shape = impl, layout, tuple(delta.shape)
        return impl.block_delta_linear(x, weight, blocks, block_indices, _bias_like(bias, x), layout=layout)

    @staticmethod
    def backward(ctx, dy):
        x, weight, blocks, block_indices, bias = ctx.saved_tensors
        dx, dblocks = _block_backward(ctx, dy, x, weight, blocks, block_indices)
        ddelta = None if dblocks is None else ref.densify_blocks(dblocks, block_indices, ctx.shape)
        return dx, None, _bias_grad(dy, bias, ctx.needs_input_grad[2]), ddelta, None, None


def _bias_like(bias, x):
    """The bias in the activations' dtype (as F.linear under autocast): the block launchers,
    like the reference, take one dtype for both."""
    return bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)


def _block_backward(ctx, dy, x, weight, blocks, block_indices):
    impl, layout = ctx.impl, ctx.layout
    dy = dy.contiguous()
    dx = impl.block_grad_input(dy, weight, blocks, block_indices, layout=layout) if ctx.needs_input_grad[0] else None
    dblocks = None
    if ctx.needs_input_grad[3]:
        dblocks = impl.block_grad_blocks(dy, x, block_indices, blocks.shape[-1], layout=layout)
    return dx, dblocks


def delta_score(dy, x, delta, score: str, block_size: int | None, kernels: Kernels) -> torch.Tensor:
    """Mask score from dYᵀX, per element or per B×B tile (see ``reference.delta_score``)."""
    return kernels.masked_delta.delta_score(dy, x, delta, score, block_size)


def delta_grad(dy, x, kernels: Kernels) -> torch.Tensor:
    """G = dYᵀX, dense fp32 ``[d_out, d_in]`` (what data-parallel ranks sum before a nonlinear score)."""
    return kernels.masked_delta.masked_delta_grad_delta(dy, x, None)


def delta_score_topk(dy, x, delta, k: int, score: str, kernels: Kernels) -> torch.Tensor:
    """int32 sorted flat indices of the ``k`` largest element scores; the Triton version
    writes no dense score (see ``masked_delta.delta_score_topk``)."""
    return kernels.masked_delta.delta_score_topk(dy, x, delta, k, score)
