"""The reference top-k (``sparse_engine/kernels/reference.py``: ``topk_flat_indices`` and the per-layer /
global wrappers) against an independent oracle: a stable sort on (-score, flat index), NaN
last, the first k taken and sorted by index.

Large CPU inputs (at least ``BRACKET_MIN_NUMEL`` entries) take a sampled-bracket path
instead of a full ``torch.topk``; every case runs below and above that size, so both paths
must give exactly the documented result: ties at the threshold go to the lower flat index,
+0.0 equals -0.0, NaN is never selected, scores are signed (MCS), fp32 / fp16 / bf16.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

try:
    from sparse_engine.kernels import reference as ref
except ImportError:  # repo not installed (pip install -e .): import the folder directly
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from kernels import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMALL = (37, 29)  # 1073 entries: the full torch.topk path
LARGE = (ref.BRACKET_MIN_NUMEL // 512 + 3, 512)  # just above the bracket threshold


def ranking(scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flat indices ordered by (-value, index) with NaN last, and the number of non-NaN entries."""
    flat = scores.reshape(-1).double()  # exact for every tested dtype
    nan = torch.isnan(flat)
    key = torch.where(nan, torch.zeros_like(flat), -flat) + 0.0  # + 0.0 turns -0.0 into +0.0
    order = torch.argsort(key, stable=True)  # by -value, equal values by index
    order = order[torch.argsort(nan[order].to(torch.int8), stable=True)]  # NaN last, order kept
    return order, int((~nan).sum())


def first_k(ranked: tuple[torch.Tensor, int], k: int) -> torch.Tensor:
    order, n_valid = ranked
    return torch.sort(order[: min(k, n_valid)]).values.to(torch.int32)


def oracle(scores: torch.Tensor, k: int) -> torch.Tensor:
    """int32 sorted flat indices of the first k entries ordered by (-value, index), NaN excluded."""
    return first_k(ranking(scores), k)


def python_oracle(values: list[float], k: int) -> list[int]:
    """The same rule in plain Python (checks ``oracle`` itself on small inputs)."""
    ranked = sorted((i for i, v in enumerate(values) if not math.isnan(v)), key=lambda i: (-values[i], i))
    return sorted(ranked[:k])


def make(kind: str, shape, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "random":  # G-like: per-row and per-column scales, signed
        rows, cols = torch.rand(shape[0], 1, generator=g), torch.rand(1, shape[1], generator=g)
        x = torch.randn(shape, generator=g) * rows * cols
    elif kind == "ties":  # seven values only: thresholds fall inside long runs of ties
        x = torch.randint(-3, 4, shape, generator=g).float()
    elif kind == "negative":  # every score below zero
        x = -torch.rand(shape, generator=g) - 0.5
    elif kind == "nan":  # 10% NaN among random values
        x = torch.randn(shape, generator=g)
        x[torch.rand(shape, generator=g) < 0.1] = math.nan
    elif kind == "mostly-nan":  # 70% NaN: k can exceed the non-NaN count
        x = torch.randn(shape, generator=g)
        x[torch.rand(shape, generator=g) < 0.7] = math.nan
    elif kind == "equal":
        x = torch.full(shape, 0.25)
    elif kind == "signed-zeros":  # +0.0 and -0.0 mixed, a few ±inf and ones
        x = torch.where(torch.rand(shape, generator=g) < 0.5, 0.0, -0.0)
        flat = x.view(-1)
        flat[torch.randint(n, (n // 50,), generator=g)] = 1.0
        flat[torch.randint(n, (n // 100,), generator=g)] = math.inf
        flat[torch.randint(n, (n // 100,), generator=g)] = -math.inf
    else:
        raise ValueError(kind)
    return x.to(dtype)


def ks_for(n: int) -> list[int]:
    return sorted({0, 1, 7, int(0.01 * n), int(0.1 * n), n // 2, int(0.99 * n), n - 1, n})


KINDS = ["random", "ties", "negative", "nan", "mostly-nan", "equal", "signed-zeros"]


def test_oracle_matches_plain_python():
    for kind in KINDS:
        x = make(kind, (13, 11), torch.float32, seed=3)
        values = x.reshape(-1).tolist()
        for k in ks_for(x.numel()):
            assert oracle(x, k).tolist() == python_oracle(values, k), (kind, k)


@pytest.mark.parametrize("shape", [SMALL, LARGE], ids=["small", "large"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_topk_flat_indices_matches_oracle(kind, dtype, shape):
    x = make(kind, shape, dtype)
    ranked = ranking(x)
    for k in ks_for(x.numel()):
        got = ref.topk_flat_indices(x, k)
        assert got.dtype == torch.int32
        assert torch.equal(got, first_k(ranked, k)), (kind, dtype, shape, k)


def test_large_cpu_input_does_not_run_a_full_topk(monkeypatch):
    """The point of the bracketed path: no torch.topk over the whole input."""
    x = make("random", LARGE, torch.float32)
    want = {k: oracle(x, k) for k in (int(0.01 * x.numel()), int(0.1 * x.numel()))}

    def refuse(*args, **kwargs):
        raise AssertionError("torch.topk was called on a large CPU input")

    monkeypatch.setattr(torch, "topk", refuse)
    for k, expected in want.items():
        assert torch.equal(ref.topk_flat_indices(x, k), expected)


@pytest.mark.parametrize("tail_values", ["largest", "smallest"])
def test_inputs_that_mislead_the_sample(tail_values):
    """Entries past the last whole sampling stride hold the largest (or smallest) values, so
    the sample misjudges the threshold's rank (the bracket's upper end lies below the
    threshold, or its lower end above it): the result must still be exact."""
    g = torch.Generator().manual_seed(1)
    n = ref.BRACKET_MIN_NUMEL + ref.BRACKET_MIN_NUMEL // 8 - 1  # an 11% tail after the whole strides
    tail = n // 9
    x = torch.randn(n, generator=g)
    x[-tail:] = torch.randn(tail, generator=g) + (20.0 if tail_values == "largest" else -20.0)
    ranked = ranking(x)
    for k in (tail, n // 2, n - tail - 5):
        assert torch.equal(ref.topk_flat_indices(x, k), first_k(ranked, k)), (tail_values, k)


def test_global_rng_untouched():
    x = make("random", LARGE, torch.float32)
    state = torch.get_rng_state()
    ref.topk_flat_indices(x, x.numel() // 10)
    assert torch.equal(torch.get_rng_state(), state)


def test_k_out_of_range_names_the_bounds():
    x = torch.zeros(5)
    for k in (-1, 6):
        with pytest.raises(ValueError, match=r"k must be in \[0, 5\]"):
            ref.topk_flat_indices(x, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_per_layer_and_global_match_oracle(dtype):
    layers = [make("ties", LARGE, dtype, seed=5), make("random", SMALL, dtype, seed=6),
              make("nan", (LARGE[0], LARGE[1] // 2), dtype, seed=7)]
    ks = [layers[0].numel() // 10, 5, layers[2].numel() // 3]
    for got, x, k in zip(ref.topk_per_layer(layers, ks), layers, ks):
        assert torch.equal(got, oracle(x, k))
    # global: one ranking over the concatenation, ties by layer order then index
    ranked = ranking(torch.cat([t.reshape(-1).float() for t in layers]))
    for k in (sum(ks), ranked[0].numel() // 2):
        want = first_k(ranked, k).long()
        got = ref.topk_global(layers, k)
        start = 0
        for t, idx in zip(layers, got):
            part = want[(want >= start) & (want < start + t.numel())] - start
            assert torch.equal(idx, part.to(torch.int32))
            start += t.numel()
