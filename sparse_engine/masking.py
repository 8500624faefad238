"""Mask scores, top-k selection and the mask schedule of Algorithm 1.

* ``compute_scores``: the extra forward/backward of the current batch with the mask
  ignored (loss of W + Ŵ); each layer's backward hands its score (from dYᵀX) to a sink,
  so no dense gradient lands in ``.grad`` and no other parameter's gradient is touched.
* ``select``: exactly k units kept per layer (k = keep_ratio·d_out·d_in elements, or
  keep_ratio·d_out·d_in/B² tiles), ties broken by the lower flat index; with layer drop
  one global threshold over every layer's scores keeps k = Σ k_l units overall (Eq. 5-6).
* ``apply_masks``: new masks in, optimizer moments of entries that left the mask cleared
  (they keep their value, frozen, and restart with fresh moments if selected again).
* ``freeze_masks``: the switch to compact storage, carrying the kept entries' optimizer
  state over and dropping the dense Ŵ, its gradient and its state.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn as nn

from sparse_engine import ops
from sparse_engine.config import SparseAdapterConfig
from sparse_engine.kernels import reference as ref
from sparse_engine.layers import FIXED, SparseAdapterLinear

GD_REGROW_FRACTION = 0.5
"""Grow-and-drop (score ``gd``): half of k goes to the current mask's largest |Ŵ|, the rest
is grown by |g| among the other entries (the split is ours; the paper does not give one)."""


def _inner_optimizer(optimizer):
    # accelerate's AcceleratedOptimizer (used by the HF Trainer) wraps the torch optimizer.
    return getattr(optimizer, "optimizer", optimizer)


@contextlib.contextmanager
def score_mode(model: nn.Module, layers: dict[str, SparseAdapterLinear], sinks: dict[str, Callable]):
    """Mask ignored, score sinks set, and only the adapters requiring grad."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, layer in layers.items():
            layer.delta.requires_grad_(True)
            layer.mask_ignored = True
            layer.score_sink = sinks[name]
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for layer in layers.values():
            layer.mask_ignored = False
            layer.score_sink = None


def compute_scores(
    model: nn.Module,
    layers: dict[str, SparseAdapterLinear],
    loss_fn: Callable[[], torch.Tensor],
    config: SparseAdapterConfig,
) -> dict[str, torch.Tensor]:
    """Per-layer mask scores (element ``[d_out, d_in]`` or tile ``[d_out/B, d_in/B]``).

    ``loss_fn`` runs the forward of the current batch and returns the loss; it is called
    once, with every adapter's mask ignored. For ``gd`` the score is |g| (the grow score).
    """
    search = {n: l for n, l in layers.items() if l.phase != FIXED}
    kind = "gm" if config.score == "gd" else config.score
    scores: dict[str, torch.Tensor] = {}

    def sink_for(name: str, layer: SparseAdapterLinear):
        def sink(dy, x):
            s = ops.delta_score(dy, x, layer.delta.detach(), kind, layer.block_size, layer.backend)
            scores[name] = s if name not in scores else scores[name] + s

        return sink

    if kind == "wm":
        return {n: ref.delta_score(None, None, l.delta.detach(), "wm", l.block_size) for n, l in search.items()}
    with score_mode(model, search, {n: sink_for(n, l) for n, l in search.items()}):
        loss = loss_fn()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss of the score pass is {loss.item()}; training has diverged")
        loss.backward()
    missing = set(search) - set(scores)
    if missing:
        raise RuntimeError(f"the score pass did not reach adapter layers {sorted(missing)[:3]}")
    for name, s in scores.items():
        if torch.isnan(s).any():
            raise FloatingPointError(f"NaN in the mask score of {name}")
    return scores


def _topk_impl(config: SparseAdapterConfig, tensor: torch.Tensor):
    return ops.kernel_module("topk_mask", config.backend, tensor)


def select(
    scores: dict[str, torch.Tensor],
    layers: dict[str, SparseAdapterLinear],
    config: SparseAdapterConfig,
) -> dict[str, torch.Tensor]:
    """int32 sorted kept units per layer (elements, or tiles when block-sparse)."""
    names = list(scores)
    if not names:
        return {}
    if config.score == "gd":
        return {n: _grow_and_drop(scores[n], layers[n], config) for n in names}
    impl = _topk_impl(config, scores[names[0]])
    ks = [config.kept_count(*layers[n].shape) for n in names]
    tensors = [scores[n] for n in names]
    kept = impl.topk_global(tensors, sum(ks)) if config.layer_drop else impl.topk_per_layer(tensors, ks)
    return dict(zip(names, kept))


def _grow_and_drop(grow_score: torch.Tensor, layer: SparseAdapterLinear, config: SparseAdapterConfig) -> torch.Tensor:
    k = config.kept_count(*layer.shape)
    n_keep = k - int(math.floor(GD_REGROW_FRACTION * k))
    weight_mag = ref.delta_score(None, None, layer.delta.detach(), "wm", layer.block_size)
    current = torch.zeros(weight_mag.numel(), dtype=torch.bool, device=weight_mag.device)
    current[layer.kept_units().long()] = True
    drop_score = torch.where(current, weight_mag.reshape(-1), torch.full_like(weight_mag.reshape(-1), -math.inf))
    kept = ref.topk_flat_indices(drop_score, min(n_keep, int(current.sum()))).long()
    chosen = torch.zeros_like(current)
    chosen[kept] = True
    grow = torch.where(chosen, torch.full_like(drop_score, -math.inf), grow_score.reshape(-1).float())
    grown = ref.topk_flat_indices(grow, k - kept.numel()).long()
    return torch.sort(torch.cat([kept, grown])).values.to(torch.int32)


def _clear_state_outside(optimizer, param: torch.Tensor, keep: torch.Tensor) -> None:
    if optimizer is None:
        return
    state = _inner_optimizer(optimizer).state.get(param)
    if not state:
        return
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(~keep, 0)


def apply_masks(layers: dict[str, SparseAdapterLinear], kept: dict[str, torch.Tensor], optimizer=None) -> None:
    """Install new masks. Optimizer moments of every entry outside its new mask are cleared."""
    for name, units in kept.items():
        layer = layers[name]
        mask = layer.set_mask(units)
        _clear_state_outside(optimizer, layer.delta, mask)


def update_masks(model, layers, loss_fn, config: SparseAdapterConfig, optimizer=None) -> dict[str, int]:
    """One mask update of Algorithm 1; returns the kept units per layer."""
    scores = compute_scores(model, layers, loss_fn, config)
    kept = select(scores, layers, config)
    apply_masks(layers, kept, optimizer)
    return {n: int(k.numel()) for n, k in kept.items()}


def replace_parameter(optimizer, old: nn.Parameter, new: nn.Parameter, gather: torch.Tensor | None = None) -> None:
    """Put ``new`` where ``old`` is in ``optimizer``; with ``gather``, move the state along.

    State tensors shaped like ``old`` become ``state.reshape(-1)[gather]`` in ``new``'s
    shape (kept entries' Adam moments carried over); without ``gather`` the state is dropped.
    """
    if optimizer is None:
        return
    inner = _inner_optimizer(optimizer)
    for group in inner.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = inner.state.pop(old, None)
    if state and gather is not None:
        inner.state[new] = {
            key: (value.reshape(-1)[gather].view(new.shape).clone()
                  if torch.is_tensor(value) and value.shape == old.shape else value)
            for key, value in state.items()
        }


def freeze_masks(layers: dict[str, SparseAdapterLinear], optimizer=None) -> None:
    """Switch every search-phase layer to compact storage, moving its optimizer state along."""
    for layer in layers.values():
        if layer.phase == FIXED:
            continue
        old = layer.delta
        gather = layer.freeze()
        replace_parameter(optimizer, old, layer.delta, gather)
