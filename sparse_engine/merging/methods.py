"""The merge methods: one small function per method built from ``parts``, each method's
defaults and how its per-expert weights are formed, all in one table (:data:`REGISTRY`),
and the hyper-parameter checks. Definitions and normalisation: docs/merging.md."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from sparse_engine.merging.parts import (
    SIGN_METHODS,
    Part,
    accumulate,
    chunks,
    crumbs,
    dare_drop,
    disjoint_mean,
    elect_sign,
    trim_top,
)


@dataclass
class LayerContext:
    """What a method may read besides the parts: the overlap Σ_i M_i (filled while the parts
    stream), the trim basis, the count dtype and DARE's seeded generator."""

    masks: torch.Tensor | None
    basis: str
    cdtype: torch.dtype
    generator: torch.Generator | None


# Each method takes the layer's zeroed fp32 accumulator, the experts' parts as (expert index,
# Part), streamed (one alive at a time, except where a method must keep them), the per-expert
# weights w, the resolved hyper-parameters and the layer's context; it returns the merged
# layer (flat).
MergeFunction = Callable[[torch.Tensor, Iterable[tuple[int, Part]], list[float], dict, LayerContext], torch.Tensor]


def merge_weighted_sum(acc, parts, w, params, ctx):
    """average (w = 1/n), task arithmetic (w = λ·weight): Σ_i w_i·ΔW_i."""
    for i, part in parts:
        accumulate(acc, part, w[i])
    return acc


def merge_overlap_average(acc, parts, w, params, ctx):
    """Eq. 4: Σ_i ΔW_i / max(Σ_i M_i, 1), each entry averaged over the experts that hold it."""
    for _, part in parts:
        accumulate(acc, part, 1.0)
    for c in chunks(acc.numel()):
        acc[c].div_(ctx.masks[c].clamp(min=1))
    return acc


def merge_magnitude_prune(acc, parts, w, params, ctx):
    """Each expert trimmed to its largest |values| (density), then summed with its weight."""
    for i, part in parts:
        accumulate(acc, trim_top(part, params["density"], ctx.basis), w[i])
    return acc


def merge_ties(acc, parts, w, params, ctx):
    """TIES: trim, elect a sign per entry, average the experts that agree with it."""
    kept = [(i, trim_top(part, params["density"], ctx.basis)) for i, part in parts]
    return disjoint_mean(acc, kept, w, elect_sign(acc, kept, params["sign"]), ctx.cdtype)


def merge_dare_linear(acc, parts, w, params, ctx):
    """DARE: drop entries at random (rate p), rescale the rest by 1/(1-p), sum with weights."""
    for i, part in parts:
        accumulate(acc, dare_drop(part, params["drop_rate"], params["rescale"], ctx.generator), w[i])
    return acc


def merge_dare_ties(acc, parts, w, params, ctx):
    """DARE's random drop, then TIES's sign election and disjoint mean."""
    kept = [(i, dare_drop(part, params["drop_rate"], params["rescale"], ctx.generator)) for i, part in parts]
    return disjoint_mean(acc, kept, w, elect_sign(acc, kept, params["sign"]), ctx.cdtype)


def merge_breadcrumbs(acc, parts, w, params, ctx):
    """Breadcrumbs: drop the smallest (β) and the largest (γ) |values| of each expert, then sum."""
    for i, part in parts:
        accumulate(acc, crumbs(part, params["beta"], params["gamma"], ctx.basis), w[i])
    return acc


WEIGHTINGS = ("scaled", "mean", "one")  # w_i = λ·weights_i; 1/N (no λ, no weights); 1 (Eq. 4 divides itself)


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its function, its hyper-parameters' defaults, how w_i is formed, whether
    it draws from the seeded generator and whether it reads the overlap Σ_i M_i."""

    merge: MergeFunction
    defaults: dict
    weighting: str = "scaled"
    draws: bool = False
    needs_overlap: bool = False

    @property
    def takes_weights(self) -> bool:
        return self.weighting == "scaled"

    def expert_weights(self, lam: float, weights: list[float]) -> list[float]:
        n = len(weights)
        if self.weighting == "mean":
            return [1.0 / n] * n
        if self.weighting == "one":
            return [1.0] * n
        return [lam * x for x in weights]


# The one source of the method names (in this order in the CLI) and of their defaults (our
# choices; see docs/merging.md).
REGISTRY = {
    "overlap_average": MergeMethod(merge_overlap_average, {}, weighting="one", needs_overlap=True),
    "average": MergeMethod(merge_weighted_sum, {}, weighting="mean"),
    "task_arithmetic": MergeMethod(merge_weighted_sum, {"lam": 0.3}),
    "ties": MergeMethod(merge_ties, {"lam": 1.0, "density": 0.2, "sign": "total"}),
    "dare_linear": MergeMethod(merge_dare_linear, {"lam": 0.3, "drop_rate": 0.9, "rescale": True}, draws=True),
    "dare_ties": MergeMethod(merge_dare_ties, {"lam": 1.0, "drop_rate": 0.9, "rescale": True, "sign": "total"},
                             draws=True),
    "breadcrumbs": MergeMethod(merge_breadcrumbs, {"lam": 0.3, "beta": 0.85, "gamma": 0.01}),
    "magnitude_prune": MergeMethod(merge_magnitude_prune, {"lam": 1.0, "density": 0.2}),
}
METHODS = tuple(REGISTRY)
DEFAULTS = {name: method.defaults for name, method in REGISTRY.items()}
ALIASES = {"eq4": "overlap_average", "sparse_average": "overlap_average", "ta": "task_arithmetic",
           "dare": "dare_linear", "uniform": "average"}


def canonical_method(method: str) -> str:
    """The method's name in :data:`METHODS` (aliases resolved); an unknown name raises."""
    m = ALIASES.get(method, method) if isinstance(method, str) else method
    if m not in REGISTRY:
        raise ValueError(f"unknown merge method {method!r}; choose from {list(METHODS)} "
                         f"(aliases: {sorted(ALIASES)})")
    return m


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def resolve_params(method: str, **overrides) -> dict:
    """The method's hyper-parameters: its defaults updated with the non-None ``overrides``.

    Unknown or irrelevant names raise, so a typo never silently does nothing.
    """
    method = canonical_method(method)
    params = dict(DEFAULTS[method])
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in params:
            raise ValueError(f"merge method {method!r} takes no parameter {key!r} (it takes {sorted(params) or 'none'})")
        params[key] = value
    for key in ("density", "drop_rate", "beta", "gamma"):
        if key in params:
            params[key] = _fraction(key, params[key])
    if "lam" in params:
        lam = params["lam"]
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise ValueError(f"lam (λ) must be a finite number, got {lam!r}")
        params["lam"] = float(lam)
    if "sign" in params and params["sign"] not in SIGN_METHODS:
        raise ValueError(f"sign must be one of {SIGN_METHODS}, got {params['sign']!r}")
    if "rescale" in params:
        params["rescale"] = bool(params["rescale"])
    if method == "breadcrumbs" and params["beta"] + params["gamma"] > 1.0:
        raise ValueError(f"breadcrumbs: beta + gamma must be <= 1, got {params['beta']} + {params['gamma']}")
    return params
