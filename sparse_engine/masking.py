"""Mask scores, top-k selection and the mask schedule of Algorithm 1.

* ``compute_scores``: the extra forward/backward of the current batch with the mask
  ignored (loss of W + Ŵ); each layer's backward hands its score (from dYᵀX) to a sink,
  so no dense gradient lands in ``.grad`` and no other parameter's gradient is touched.
* ``update_masks``: element layers on the Triton kernels (per-layer k) select their top k
  inside the score pass (histogram + select passes over dYᵀX): no dense score is written.
* ``select``: exactly k units kept per layer (k = keep_ratio·d_out·d_in elements, or
  keep_ratio·d_out·d_in/B² tiles), ties broken by the lower flat index; with layer drop
  one global threshold over every layer's scores keeps k = Σ k_l units overall (Eq. 5-6).
* ``apply_masks``: new masks in; entries that leave the mask keep their value (frozen) and
  restart with fresh optimizer moments if selected again. With ``compact_search`` (the
  default) the layer moves to compact storage at the first update and the kept entries'
  optimizer state moves with them; otherwise the moments outside the mask are cleared.
* ``freeze_masks``: the switch to the fixed phase, dropping every dense Ŵ and its state.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable

import torch
import torch.nn as nn

from sparse_engine import distributed, ops
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
            layer.sync_search_delta()
            layer.search_delta.requires_grad_(True)
            layer.mask_ignored = True
            layer.score_sink = sinks[name]
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for layer in layers.values():
            layer.mask_ignored = False
            layer.score_sink = None
            if not layer.dense_storage:
                layer.search_delta.requires_grad_(False)


def compute_scores(
    model: nn.Module,
    layers: dict[str, SparseAdapterLinear],
    loss_fn: Callable[[], torch.Tensor],
    config: SparseAdapterConfig,
    group=None,
) -> dict[str, torch.Tensor]:
    """Per-layer mask scores (element ``[d_out, d_in]`` or tile ``[d_out/B, d_in/B]``).

    ``loss_fn`` runs the forward of the current batch and returns the loss; it is called
    once, with every adapter's mask ignored. For ``gd`` the score is |g| (the grow score).
    With a data-parallel ``group`` the scores are those of the sum of the ranks' losses.
    """
    return _score_pass(model, layers, loss_fn, config, {}, group)[0]


def _score_pass(model, layers, loss_fn, config, direct_ks: dict[str, int], group=None):
    """The score pass: (dense scores, kept units of the layers in ``direct_ks``).

    A layer in ``direct_ks`` that runs once in the forward gets its top ``direct_ks[name]``
    elements selected inside its backward by ``ops.delta_score_topk`` (histogram and select
    passes over dYᵀX, no dense score); one that runs more than once (a shared module) needs
    its scores summed over the calls and falls back to the dense score. Calls are counted
    before the backward starts, so activation checkpointing's recomputed forwards (during
    the backward) do not count.

    With a data-parallel ``group`` each layer keeps what the ranks must sum (its score if the
    score is linear in G, else G itself), and the sums are taken after the backward, in model
    order, before the scores are formed.
    """
    search = {n: l for n, l in layers.items() if l.phase != FIXED}
    kind = "gm" if config.score == "gd" else config.score
    scores: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    forward_calls = dict.fromkeys(search, 0)
    reduce_grad = group is not None and kind not in distributed.LINEAR_SCORES

    def sink_for(name: str, layer: SparseAdapterLinear):
        def sink(dy, x):
            if name in direct_ks and forward_calls[name] == 1:
                units = ops.delta_score_topk(dy, x, layer.search_delta.detach(), direct_ks[name], kind,
                                             layer.kernels)
                if units.numel() < direct_ks[name]:  # NaN scores are never selected
                    raise FloatingPointError(f"NaN in the mask score of {name}")
                kept[name] = units
                return
            if reduce_grad:
                s = ops.delta_grad(dy, x, layer.kernels)
            else:
                s = ops.delta_score(dy, x, layer.search_delta.detach(), kind, layer.block_size, layer.kernels)
            scores[name] = s if name not in scores else scores[name] + s

        return sink

    def count_call(name):
        def hook(module, args, output):
            forward_calls[name] += 1

        return hook

    if kind == "wm":
        for layer in search.values():
            layer.sync_search_delta()
        return {n: ref.delta_score(None, None, l.search_delta.detach(), "wm", l.block_size)
                for n, l in search.items()}, {}
    hooks = [layer.register_forward_hook(count_call(name)) for name, layer in search.items()]
    with score_mode(model, search, {n: sink_for(n, l) for n, l in search.items()}):
        try:
            loss = loss_fn()
        finally:  # counting stops with the forward: recomputed forwards come in the backward
            for hook in hooks:
                hook.remove()
        diverged = not bool(torch.isfinite(loss))
        if group is not None:  # every rank raises, or none does
            diverged = distributed.any_rank(diverged, group)
        if diverged:
            raise FloatingPointError(f"the loss of the score pass is {loss.item()}; training has diverged")
        loss.backward()
    missing = set(search) - set(scores) - set(kept)
    if missing:
        raise RuntimeError(f"the score pass did not reach adapter layers {sorted(missing)[:3]}")
    if group is not None:
        names = [n for n in search if n in scores]
        distributed.all_reduce_sum_([scores[n] for n in names], group)
        if reduce_grad:
            scores = {n: ref.delta_grad_score(search[n].search_delta.detach(), scores[n], kind, search[n].block_size)
                      for n in names}
    for name, s in scores.items():
        if torch.isnan(s).any():
            raise FloatingPointError(f"NaN in the mask score of {name}")
    return scores, kept


def _selects_in_the_score_pass(layer: SparseAdapterLinear, config: SparseAdapterConfig, group=None) -> bool:
    """Element layers on the Triton kernels with a per-layer k pick their top k in the score
    pass itself; the rest (block tiles, layer drop's global k, ``gd``/``wm``, the reference
    backend, and data parallelism, whose scores must be summed over the ranks first) go
    through dense scores and ``select``."""
    return (
        group is None
        and layer.block_size is None
        and layer.phase != FIXED
        and not config.layer_drop
        and config.score in ("mcs", "snip", "gm")
        and layer.kernels.triton
    )


def _topk_impl(layers: dict[str, SparseAdapterLinear]):
    """The batched top-k of the layers' backend (one call covers every layer)."""
    return next(iter(layers.values())).kernels.topk


def select(
    scores: dict[str, torch.Tensor],
    layers: dict[str, SparseAdapterLinear],
    config: SparseAdapterConfig,
) -> dict[str, torch.Tensor]:
    """int32 sorted kept units per layer (elements, or tiles when block-sparse).

    Layer drop's global ties go to the earlier layer in ``layers``' (model) order, whatever
    order the scores were produced in (the score pass fills them in backward order).
    """
    names = [n for n in layers if n in scores]
    if len(names) != len(scores):
        raise KeyError(f"scores for layers that are not adapted: {sorted(set(scores) - set(names))[:3]}")
    if not names:
        return {}
    impl = _topk_impl(layers)
    if config.score == "gd":
        return _grow_and_drop({n: scores[n] for n in names}, layers, config, impl)
    ks = [config.kept_count(*layers[n].shape) for n in names]
    tensors = [scores[n] for n in names]
    kept = impl.topk_global(tensors, sum(ks)) if config.layer_drop else impl.topk_per_layer(tensors, ks)
    return dict(zip(names, kept))


def _select_by_weight_magnitude(layers: dict[str, SparseAdapterLinear], config: SparseAdapterConfig):
    """``wm``: top k of |Ŵ| straight from Ŵ (the Triton top-k computes |Ŵ| on the fly)."""
    names = list(layers)
    for name in names:
        layers[name].sync_search_delta()
    deltas = [layers[n].search_delta.detach() for n in names]
    ks = [config.kept_count(*layers[n].shape) for n in names]
    impl = _topk_impl(layers)
    per_layer, global_k = (None, sum(ks)) if config.layer_drop else (ks, None)
    kept = impl.topk_from_delta_grad(deltas, None, "wm", ks=per_layer, global_k=global_k, block_size=config.block_size)
    return dict(zip(names, kept))


def _grow_and_drop(grow_scores: dict[str, torch.Tensor], layers, config: SparseAdapterConfig, impl):
    """``gd``, all layers in two batched top-k calls: keep n_keep of each current mask by |Ŵ|,
    then grow the rest of k by |g| among the entries not kept (NaN marks the excluded ones:
    the top-k never selects NaN)."""
    names = list(grow_scores)
    ks = [config.kept_count(*layers[n].shape) for n in names]
    drop_scores, currents = [], []
    for name in names:
        layer = layers[name]
        layer.sync_search_delta()
        weight_mag = ref.delta_score(None, None, layer.search_delta.detach(), "wm", layer.block_size).reshape(-1)
        current = torch.zeros(weight_mag.numel(), dtype=torch.bool, device=weight_mag.device)
        current[layer.kept_units().long()] = True
        currents.append(current)
        drop_scores.append(weight_mag.masked_fill(~current, math.nan))
    n_keep = [min(k - int(math.floor(GD_REGROW_FRACTION * k)), int(c.sum())) for k, c in zip(ks, currents)]
    survivors = impl.topk_per_layer(drop_scores, n_keep)
    grow = []
    for name, kept in zip(names, survivors):
        score = grow_scores[name].reshape(-1).float().clone()
        score[kept.long()] = math.nan
        grow.append(score)
    grown = impl.topk_per_layer(grow, [k - kept.numel() for k, kept in zip(ks, survivors)])
    return {
        name: torch.sort(torch.cat([kept, new])).values.to(torch.int32)
        for name, kept, new in zip(names, survivors, grown)
    }


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
    """Install new masks. An entry newly in a mask starts with fresh optimizer moments; one
    that stays keeps its own."""
    for name, units in kept.items():
        layer = layers[name]
        if layer.compact_search:
            old, source = layer.keep_units(units)
            replace_parameter(optimizer, old, layer.delta, source)
        else:
            mask = layer.set_mask(units)
            _clear_state_outside(optimizer, layer.delta, mask)


def update_masks(model, layers, loss_fn, config: SparseAdapterConfig, optimizer=None, group=None) -> dict[str, int]:
    """One mask update of Algorithm 1; returns the kept units per layer.

    With a data-parallel ``group``, ``loss_fn`` is this rank's share of the global batch's
    loss; the scores are summed over the ranks and rank 0's selection is installed everywhere.
    """
    search = {n: l for n, l in layers.items() if l.phase != FIXED}
    if config.score == "wm":  # no gradient needed
        kept = _select_by_weight_magnitude(search, config) if search else {}
    else:
        direct_ks = {n: config.kept_count(*l.shape) for n, l in search.items()
                     if _selects_in_the_score_pass(l, config, group)}
        scores, kept = _score_pass(model, layers, loss_fn, config, direct_ks, group)
        kept.update(select(scores, layers, config))
    if group is not None:
        kept = distributed.broadcast_kept(kept, [n for n in search if n in kept], group)
    apply_masks(layers, kept, optimizer)
    return {n: int(k.numel()) for n, k in kept.items()}


def replace_parameter(optimizer, old: nn.Parameter, new: nn.Parameter, gather: torch.Tensor | None = None) -> None:
    """Put ``new`` where ``old`` is in ``optimizer`` (``new`` may be ``old``, rewritten in
    place); with ``gather``, move the state along.

    State tensors shaped like ``old`` become ``state.reshape(-1)[gather]`` in ``new``'s
    shape (kept entries' Adam moments carried over), zero where ``gather`` is -1 (entries new
    to the mask); without ``gather`` the state is dropped.
    """
    if optimizer is None:
        return
    inner = _inner_optimizer(optimizer)
    for group in inner.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = inner.state.pop(old, None)
    if state and gather is not None:
        shaped_otherwise = [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape != old.shape]
        if shaped_otherwise:
            # e.g. Adafactor's factored row/column moments: no per-entry state to carry over
            warnings.warn(
                f"optimizer state {shaped_otherwise} is not per entry; it restarts for the compact adapter",
                stacklevel=2,
            )
            return
        inner.state[new] = {
            key: (_gathered(value, gather).view(new.shape) if torch.is_tensor(value) and value.shape == old.shape
                  else value)
            for key, value in state.items()
        }


def _gathered(value: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """``value.reshape(-1)[gather]``, zero where ``gather`` is -1; always a new tensor."""
    flat = value.reshape(-1)
    if flat.numel() == 0:  # nothing was kept before (a dropped layer)
        return value.new_zeros(gather.shape)
    return flat[gather.clamp(min=0)].masked_fill_(gather < 0, 0)


def freeze_masks(layers: dict[str, SparseAdapterLinear], optimizer=None) -> None:
    """Switch every search-phase layer to compact storage, moving its optimizer state along."""
    for layer in layers.values():
        if layer.phase == FIXED:
            continue
        old = layer.delta
        gather = layer.freeze()
        if gather is not None:
            replace_parameter(optimizer, old, layer.delta, gather)
