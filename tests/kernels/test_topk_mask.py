"""Batched top-k selection (sparse_engine/kernels/topk_mask.py) against sparse_engine/kernels/reference.py, index for index.

The launchers must return exactly the reference's int32 sorted indices: same threshold, same
tie rule (lower flat index, layer order in global mode), same NaN rule. On CPU the kernels run
under TRITON_INTERPRET=1 (tests/conftest.py). bf16 runs on CPU too: the kernels widen bf16 by
a bit shift (no bf16 arithmetic), which is exact in the interpreter.

Three configurations cover the three ways to a threshold:
* ``DEFAULT``: small layers are sampled whole, so the sample gives the exact threshold;
* ``SUB``: every layer is subsampled (small chunks, small blocks), so the bracket pass
  compacts candidates and the threshold comes from the candidate radix select (or from
  the fallback when the bracket misses);
* ``FALLBACK``: no candidate capacity, so every non-trivial group takes the full-input radix.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

try:
    from sparse_engine.kernels import reference as ref
    from sparse_engine.kernels import runtime
    from sparse_engine.kernels import topk_mask as tk
except ImportError:  # repo not installed (pip install -e .): import the folder directly
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from kernels import reference as ref
    from kernels import runtime
    from kernels import topk_mask as tk

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

DEFAULT = tk.with_config(block=1024, buf_chunk=1024, scan_chunk=4, run_chunk=64, chunks_per_program=8)
SUB = tk.with_config(block=512, full_sample_max=0, sample_chunk=8, sample_every=4, chunks_per_program=8,
                     buf_chunk=512, scan_chunk=4, run_chunk=16, cap_frac=1.0, margin_sd=4.0)
FALLBACK = tk.with_config(block=512, full_sample_max=0, sample_chunk=8, sample_every=4, chunks_per_program=8,
                          buf_chunk=512, scan_chunk=4, run_chunk=16, cap_frac=0.0, cap_slack=0)
CONFIGS = {"default": DEFAULT, "sub": SUB, "fallback": FALLBACK}

SHAPES = [(1, 1), (3, 7), (48, 16), (64, 64)]


def _same(got, want, ctx=""):
    assert len(got) == len(want), ctx
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.int32, f"{ctx} layer {i}: dtype {g.dtype}"
        g, w = g.cpu(), w.cpu()
        assert torch.equal(g, w), f"{ctx} layer {i}: {g.numel()} vs {w.numel()} indices, first diff at " \
            f"{(g[:min(g.numel(), w.numel())] != w[:min(g.numel(), w.numel())]).nonzero()[:1].tolist()}"


def _rand_layers(dtype=torch.float32, shapes=SHAPES, scale=1.0):
    return [(torch.randn(*s, device=DEV) * scale).to(dtype) for s in shapes]


def _ks(layers, fracs=(1.0, 0.5, 0.1, 0.3)):
    return [max(0, min(t.numel(), int(round(f * t.numel())))) for t, f in zip(layers, fracs)]


# ------------------------------------------------------------------------ random inputs


@pytest.mark.parametrize("cfg,dtype", [("default", torch.float32), ("default", torch.float16),
                                       ("default", torch.bfloat16), ("sub", torch.float32),
                                       ("sub", torch.bfloat16), ("fallback", torch.float32),
                                       ("fallback", torch.float16)])
def test_per_layer_random(cfg, dtype):
    layers = _rand_layers(dtype)
    ks = _ks(layers)
    got, stats = tk.topk_per_layer(layers, ks, config=CONFIGS[cfg], return_stats=True)
    _same(got, ref.topk_per_layer(layers, ks), f"{cfg} {dtype}")
    if cfg == "sub" and dtype == torch.float32:  # the bracket must have worked for the big layer
        assert stats.candidates + stats.exact_bracket >= 1, stats
    if cfg == "fallback":
        assert stats.fallback >= 1, stats


@pytest.mark.parametrize("cfg", ["default", "sub", "fallback"])
def test_global_random(cfg):
    layers = _rand_layers(torch.float32)
    layers[2] = layers[2] * 3.0  # layers of different scales: some lose everything
    total = sum(t.numel() for t in layers)
    for k in (517, total - 3):
        _same(tk.topk_global(layers, k, config=CONFIGS[cfg]), ref.topk_global(layers, k), f"{cfg} k={k}")


def test_candidate_path_taken_on_a_larger_layer():
    """A 128x128 layer, subsampled: the bracket holds the threshold and candidates resolve it."""
    x = [torch.randn(128, 128, device=DEV)]
    cfg = tk.with_config(block=2048, full_sample_max=0, sample_chunk=16, sample_every=4, chunks_per_program=8,
                         buf_chunk=1024, cap_frac=1.0, margin_sd=6.0)
    for k in (1, 1638, 8192):
        got, stats = tk.topk_per_layer(x, [k], config=cfg, return_stats=True)
        _same(got, ref.topk_per_layer(x, [k]), f"k={k}")
    assert stats.candidates == 1 and stats.fallback == 0, stats
    assert 0 < stats.candidate_keys < 128 * 128 // 2, stats


def test_layers_of_very_different_sizes_and_mixed_dtypes():
    layers = [torch.randn(1, 1, device=DEV), torch.randn(3, 7, device=DEV).half(),
              torch.randn(48, 16, device=DEV).bfloat16(), torch.randn(64, 64, device=DEV)]
    ks = [1, 20, 1, 4095]
    _same(tk.topk_per_layer(layers, ks, config=SUB), ref.topk_per_layer(layers, ks))
    _same(tk.topk_global(layers, 2000, config=SUB), ref.topk_global(layers, 2000))


# --------------------------------------------------------------------------------- ties


def _tie_layers():
    g = torch.Generator().manual_seed(1)
    few = torch.tensor([-1.5, 0.0, 2.0, 7.0])[torch.randint(0, 4, (48, 16), generator=g)]
    signed_zero = torch.where(torch.rand(32, 32, generator=g) < 0.5, torch.tensor(0.0), torch.tensor(-0.0))
    signed_zero[3, 3] = 1e-30
    signed_zero[7, 1] = -1e-30
    return [t.to(DEV) for t in (
        torch.full((20, 30), 0.25),  # all equal
        torch.zeros(17, 9),  # all zero
        signed_zero,  # +0.0 and -0.0 mixed, one tiny positive, one tiny negative
        few,  # few distinct values
        -torch.rand(40, 40, generator=g) - 1.0,  # all negative
        torch.round(torch.randn(64, 64, generator=g) * 2) / 2,  # heavy ties, signed
    )]


@pytest.mark.parametrize("cfg", ["default", "sub"])
def test_heavy_ties_per_layer(cfg):
    layers = _tie_layers()
    ks = [37, 150, 513, 300, 1, 2048]
    _same(tk.topk_per_layer(layers, ks, config=CONFIGS[cfg]), ref.topk_per_layer(layers, ks), cfg)


@pytest.mark.parametrize("cfg", ["default", "sub"])
def test_heavy_ties_global(cfg):
    layers = _tie_layers()
    for k in (1111, 4000):
        _same(tk.topk_global(layers, k, config=CONFIGS[cfg]), ref.topk_global(layers, k), f"{cfg} k={k}")


@pytest.mark.parametrize("dtype,cfg", [(torch.float16, "default"), (torch.bfloat16, "sub")])
def test_half_precision_ties_nan_inf(dtype, cfg):
    """fp16/bf16 scores select on their own 16-bit keys: same order and ties as in fp32."""
    layers = [t.to(dtype) for t in _tie_layers() + _nan_inf_layers()]
    layers[1][0, :3] = torch.tensor([6e-8, -6e-8, 1e-40]).to(dtype)  # subnormals (fp16) / flush (bf16)
    ks = [5, 150, 1000, 767, 1599, 100, 700, 3, 63, 2000]
    _same(tk.topk_per_layer(layers, ks, config=CONFIGS[cfg]), ref.topk_per_layer(layers, ks), f"{dtype} {cfg}")
    _same(tk.topk_global(layers, 5000, config=CONFIGS[cfg]), ref.topk_global(layers, 5000), f"{dtype} {cfg}")


# ---------------------------------------------------------------------- NaN, inf, edges


def _nan_inf_layers():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(48, 16, generator=g)
    a[torch.rand(48, 16, generator=g) < 0.2] = float("nan")
    a[0, :4] = float("inf")
    a[1, :3] = float("-inf")
    all_nan = torch.full((3, 7), float("nan"))
    b = torch.full((8, 8), float("-inf"))
    b[2, 2] = float("nan")
    b[5, 5] = -1e38
    c = torch.randn(64, 64, generator=g)
    c[::3, ::5] = float("nan")
    return [t.to(DEV) for t in (a, all_nan, b, c)]


@pytest.mark.parametrize("cfg", ["default", "sub"])
def test_nan_and_inf(cfg):
    layers = _nan_inf_layers()
    n_valid = [int((~torch.isnan(t)).sum()) for t in layers]
    for ks in ([4, 21, 2, 100], [n_valid[0], 5, 63, n_valid[3] + 1]):
        _same(tk.topk_per_layer(layers, ks, config=CONFIGS[cfg]), ref.topk_per_layer(layers, ks), f"{cfg} {ks}")
    sum(t.numel() for t in layers)
    for k in (700, sum(n_valid) + 1):
        _same(tk.topk_global(layers, k, config=CONFIGS[cfg]), ref.topk_global(layers, k), f"{cfg} k={k}")


@pytest.mark.parametrize("cfg", ["default", "sub"])
def test_k_zero_one_n(cfg):
    layers = _rand_layers()
    for ks in ([0, 1, 0, 1], [1, 21, 768, 0]):
        _same(tk.topk_per_layer(layers, ks, config=CONFIGS[cfg]), ref.topk_per_layer(layers, ks), f"{cfg} {ks}")
    total = sum(t.numel() for t in layers)
    for k in ((0, 1, total) if cfg == "sub" else (total,)):
        _same(tk.topk_global(layers, k, config=CONFIGS[cfg]), ref.topk_global(layers, k), f"{cfg} k={k}")


def test_empty_layers():
    x = [torch.randn(0, 5, device=DEV), torch.randn(4, 4, device=DEV), torch.empty(0, device=DEV)]
    _same(tk.topk_per_layer(x, [0, 3, 0]), ref.topk_per_layer(x, [0, 3, 0]))
    _same(tk.topk_global(x, 5), ref.topk_global(x, 5))


def test_determinism_across_runs():
    """Same selection on every run, in every mode (the passes use atomics on a GPU)."""
    layers = [_tie_layers()[5], _rand_layers()[3]]
    ks = [999, 2000]
    gen = torch.Generator().manual_seed(5)
    deltas = [torch.randn(48, 32, generator=gen).to(DEV), torch.randn(16, 64, generator=gen).to(DEV)]
    grads = [torch.randn(48, 32, generator=gen).to(DEV), torch.randn(16, 64, generator=gen).to(DEV)]
    runs = {
        "per-layer": lambda: tk.topk_per_layer(layers, ks, config=SUB),
        "global": lambda: tk.topk_global(layers, 4321, config=SUB),
        "fused": lambda: tk.topk_from_delta_grad(deltas, grads, "mcs", ks=[300, 200], config=SUB),
        "fused global block": lambda: tk.topk_from_delta_grad(deltas, grads, "snip", global_k=3, block_size=16),
    }
    for run in runs.values():
        first = run()
        for _ in range(2):
            _same(run(), first)


def test_default_config_runs():
    layers = _rand_layers()
    ks = _ks(layers)
    _same(tk.topk_per_layer(layers, ks), ref.topk_per_layer(layers, ks))


# -------------------------------------------------------------------- fused from Ŵ and G

FUSED_SHAPES = [(16, 32), (48, 16), (64, 64), (32, 48)]


def _dg(dtype=torch.float32, shapes=FUSED_SHAPES, integer=False):
    g = torch.Generator().manual_seed(3)
    if integer:  # small integers: every product and tile sum is exact in fp32, in any order
        d = [torch.randint(-4, 5, s, generator=g).float() for s in shapes]
        gr = [torch.randint(-4, 5, s, generator=g).float() for s in shapes]
    else:
        d = [torch.randn(*s, generator=g) * 0.1 for s in shapes]
        gr = [torch.randn(*s, generator=g) for s in shapes]
    return [t.to(DEV, dtype) for t in d], [t.to(DEV, dtype) for t in gr]


@pytest.mark.parametrize("score", ["mcs", "snip", "gm", "wm"])
def test_fused_element_per_layer_and_global(score):
    d, g = _dg()
    d[2][5, 5] = -0.0
    g[2][5, 5] = 3.0
    ks = [50, 100, 400, 0]
    _same(tk.topk_from_delta_grad(d, g, score, ks=ks, config=SUB),
          ref.topk_from_delta_grad(d, g, score, ks=ks), f"{score} per layer")
    _same(tk.topk_from_delta_grad(d, g, score, global_k=900, config=DEFAULT),
          ref.topk_from_delta_grad(d, g, score, global_k=900), f"{score} global")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_element_half_inputs(dtype):
    d, g = _dg(dtype)
    ks = [10, 200, 1000, 300]
    _same(tk.topk_from_delta_grad(d, g, "mcs", ks=ks, config=DEFAULT), ref.topk_from_delta_grad(d, g, "mcs", ks=ks))


def test_fused_wm_and_gm_need_only_one_input():
    d, g = _dg()
    ks = [3, 30, 300, 100]
    _same(tk.topk_from_delta_grad(d, None, "wm", ks=ks), ref.topk_from_delta_grad(d, None, "wm", ks=ks))
    _same(tk.topk_from_delta_grad(None, g, "gm", ks=ks), ref.topk_from_delta_grad(None, g, "gm", ks=ks))


@pytest.mark.parametrize("score", ["mcs", "snip", "gm", "wm"])
def test_fused_block_exact_sums(score):
    d, g = _dg(integer=True)  # integer tiles: many ties between tile sums, sums exact in any order
    ks = [1, 2, 7, 3]
    _same(tk.topk_from_delta_grad(d, g, score, ks=ks, block_size=16),
          ref.topk_from_delta_grad(d, g, score, ks=ks, block_size=16), f"{score} B=16")
    _same(tk.topk_from_delta_grad(d, g, score, global_k=9, block_size=16),
          ref.topk_from_delta_grad(d, g, score, global_k=9, block_size=16), f"{score} B=16 global")
    if score == "mcs":
        ks = [10, 20, 100, 0]
        _same(tk.topk_from_delta_grad(d, g, score, ks=ks, block_size=4),
              ref.topk_from_delta_grad(d, g, score, ks=ks, block_size=4), f"{score} B=4")


def test_fused_block_random_floats():
    """Random floats: tile sums match block_sum to rounding; selection is the reference's on them."""
    d, g = _dg()
    cfg = tk.with_config(tiles_per_program=4)
    ours = tk.delta_grad_tile_scores(d, g, "mcs", 16, config=cfg)
    for o, dd, gg in zip(ours, d, g):
        want = ref.block_sum(dd.double() * gg.double(), 16)
        torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-6)
    ks = [1, 2, 8, 4]
    _same(tk.topk_from_delta_grad(d, g, "mcs", ks=ks, block_size=16, config=cfg), ref.topk_per_layer(ours, ks))
    snip8 = tk.delta_grad_tile_scores(d, g, "snip", 8)
    _same(tk.topk_from_delta_grad(d, g, "snip", global_k=10, block_size=8), ref.topk_global(snip8, 10))


def test_fused_block_nan_tile_never_selected():
    d, g = _dg(integer=True)
    g[0][3, 3] = float("nan")  # poisons tile (0, 0) of layer 0
    picked = tk.topk_from_delta_grad(d, g, "gm", ks=[2, 1, 1, 1], block_size=16)
    assert picked[0].tolist() == [1]
    _same(picked, ref.topk_from_delta_grad(d, g, "gm", ks=[2, 1, 1, 1], block_size=16))


# ----------------------------------------------------------------------------- bad input


# ---------------------------------------------------------- single read (bits + candidates)

BITS_CFG = tk.with_config(block=256, full_sample_max=0, sample_chunk=8, sample_every=4, chunks_per_program=8,
                          buf_chunk=512, scan_chunk=4, run_chunk=16, cap_frac=1.0, margin_sd=4.0, min_sample=64)


def _tied_layers():
    """Many distinct values with a few ties each: the bracket spans several values (lo < hi) and
    the threshold value is shared by units in different blocks; plus NaN, -0.0 and a partial block."""
    g = torch.Generator().manual_seed(11)
    layers = [torch.randint(-200, 201, (37, 53), generator=g).float() * 0.25,
              torch.randn(100, 33, generator=g),
              torch.randint(-300, 301, (20, 64), generator=g).float()]
    layers[1][3, :7] = float("nan")
    layers[0][0, :5] = -0.0
    layers[0][1, :9] = 0.0
    return [t.to(DEV) for t in layers]


@pytest.mark.parametrize("global_mode", [False, True])
def test_single_read_path_matches_reference_and_two_reads(global_mode):
    layers = _tied_layers()
    two_reads = tk.with_config(**{**BITS_CFG.__dict__, "single_read": False})
    for ks in ([700, 1234, 300], [1, 3290, 1279], [980, 1650, 640]):
        if global_mode:
            k = sum(ks)
            want = ref.topk_global(layers, k)
            got, stats = tk.topk_global(layers, k, config=BITS_CFG, return_stats=True)
            two, two_stats = tk.topk_global(layers, k, config=two_reads, return_stats=True)
            _same(two, want, f"two reads k={k}")
        else:
            want = ref.topk_per_layer(layers, ks)
            got, stats = tk.topk_per_layer(layers, ks, config=BITS_CFG, return_stats=True)
            two, two_stats = tk.topk_per_layer(layers, ks, config=two_reads, return_stats=True)
            _same(two, want, f"two reads ks={ks}")
        assert two_stats.single_read == 0, two_stats
        _same(got, want, f"single read ks={ks}")
        assert stats.single_read >= 1, stats  # the path under test really ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_read_path_fused_sources(dtype):
    d, g = _dg(dtype, shapes=[(48, 80), (64, 64), (32, 112)])
    ks = [1500, 400, 2000]
    got, stats = tk.topk_from_delta_grad(d, g, "mcs", ks=ks, config=BITS_CFG, return_stats=True)
    _same(got, ref.topk_from_delta_grad(d, g, "mcs", ks=ks), f"{dtype} per layer")
    assert stats.single_read >= 1, stats
    _same(tk.topk_from_delta_grad(d, g, "snip", global_k=3000, config=BITS_CFG),
          ref.topk_from_delta_grad(d, g, "snip", global_k=3000), f"{dtype} global")


def test_single_read_not_used_for_16_bit_keys():
    layers = [t.bfloat16() for t in _tied_layers()]
    ks = [700, 1234, 300]
    got, stats = tk.topk_per_layer(layers, ks, config=BITS_CFG, return_stats=True)
    _same(got, ref.topk_per_layer(layers, ks))
    assert stats.single_read == 0, stats


def test_offset_alignment_hint_is_a_true_divisor():
    """The kernels promise the compiler that every layer offset is a multiple of this value."""
    assert runtime.offset_alignment([0, 128, 4096]) == 16
    assert runtime.offset_alignment([0, 24]) == 8
    assert runtime.offset_alignment([0, 6, 16]) == 2
    assert runtime.offset_alignment([0, 3]) == 1
    assert runtime.offset_alignment([0]) == 16


def test_layers_at_unaligned_offsets_of_one_buffer():
    """Views into one storage at odd element offsets (no 16-byte alignment) select correctly."""
    buf = torch.randn(5 + 1100 + 3 + 700, device=DEV)
    layers = [buf[5:1105].view(20, 55), buf[1108:1808].view(35, 20)]
    cfg = tk.with_config(block=256, full_sample_max=0, sample_chunk=8, sample_every=4, chunks_per_program=8,
                         buf_chunk=512, scan_chunk=4, run_chunk=16, cap_frac=1.0)
    ks = [110, 349]
    got, stats = tk.topk_per_layer(layers, ks, config=cfg, return_stats=True)
    assert stats.offset_alignment == 1  # the offsets 0 and 1103 share no power of two
    _same(got, ref.topk_per_layer(layers, ks), "unaligned views")


def test_bad_inputs():
    x = [torch.randn(4, 4, device=DEV), torch.randn(2, 3, device=DEV)]
    with pytest.raises(ValueError, match="k"):
        tk.topk_per_layer(x, [17, 1])
    with pytest.raises(ValueError, match="k"):
        tk.topk_per_layer(x, [-1, 1])
    with pytest.raises(ValueError, match="2 score tensors but 1"):
        tk.topk_per_layer(x, [1])
    with pytest.raises(ValueError, match="k"):
        tk.topk_global(x, 23)
    with pytest.raises(ValueError, match="non-empty"):
        tk.topk_per_layer([], [])
    with pytest.raises(ValueError, match="non-empty"):
        tk.topk_global([], 0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tk.topk_per_layer([torch.arange(6, device=DEV)], [1])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tk.topk_global([torch.randn(3, device=DEV).double()], 1)
    with pytest.raises(TypeError, match="int"):
        tk.topk_per_layer(x, [1.5, 1])
    with pytest.raises(TypeError, match="bool"):
        tk.topk_per_layer(x, [True, 1])
    d, g = _dg()
    with pytest.raises(TypeError, match="bool"):
        tk.topk_from_delta_grad(d, g, ks=[1, 1, 1, 1], block_size=True)
    with pytest.raises(ValueError, match="shape"):
        tk.topk_from_delta_grad(d, [g[1], g[0], g[2], g[3]], ks=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="same length"):
        tk.topk_from_delta_grad(d, g[:2], ks=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="does not divide"):
        tk.topk_from_delta_grad(d, g, ks=[1, 1, 1, 1], block_size=5)
    with pytest.raises(ValueError, match="exactly one"):
        tk.topk_from_delta_grad(d, g, ks=[1, 1, 1, 1], global_k=3)
    with pytest.raises(ValueError, match="exactly one"):
        tk.topk_from_delta_grad(d, g)
    with pytest.raises(ValueError, match="score"):
        tk.topk_from_delta_grad(d, g, "abs", ks=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="needs grads"):
        tk.topk_from_delta_grad(d, None, "mcs", ks=[1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"ks\[1\]"):
        tk.topk_from_delta_grad(d, g, ks=[1, 10**6, 1, 1])
    with pytest.raises(ValueError, match="global_k"):
        tk.topk_from_delta_grad(d, g, global_k=28, block_size=16)  # only 2 + 3 + 16 + 6 = 27 tiles
    with pytest.raises(TypeError, match="float32"):
        tk.topk_from_delta_grad([t.int() for t in d], [t.int() for t in g], ks=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="2-D"):
        tk.topk_from_delta_grad([d[0].reshape(-1)], [g[0].reshape(-1)], ks=[1])


def test_stats_describe_each_call():
    """Statistics come back with the call they describe (no module state): groups, trivial
    groups and blocks follow the inputs, and a later call leaves an earlier result unchanged."""
    layers = _rand_layers()  # 1, 21, 768 and 4096 units
    ks = [0, 21, 100, 4000]  # nothing, everything, and two real selections
    per_layer = tk.topk_per_layer(layers, ks, config=SUB, return_stats=True)
    assert isinstance(per_layer, tk.Selection)
    first = per_layer.stats
    glob = tk.topk_global(layers, 5, config=SUB, return_stats=True).stats
    assert per_layer.stats == first
    assert (first.groups, first.trivial) == (4, 2) and (glob.groups, glob.trivial) == (1, 0)
    assert first.blocks == glob.blocks == sum(-(-t.numel() // SUB.block) for t in layers)
    assert first.exact_bracket + first.candidates + first.fallback == 2, first
    assert first.sampled_units > 0 and first.offset_alignment == 16
    assert isinstance(tk.topk_per_layer(layers, ks, config=SUB), list)  # the twin's return type
    _same(per_layer.indices, ref.topk_per_layer(layers, ks))


def test_kept_masks_mark_exactly_the_selection():
    layers = [torch.randn(5, 7, device=DEV), torch.randn(0, 3, device=DEV), torch.randn(33, device=DEV)]
    kept = tk.topk_global(layers, 20)
    masks = tk.kept_masks(kept, [t.shape for t in layers])
    for t, idx, m in zip(layers, kept, masks):
        assert m.shape == t.shape and m.dtype == torch.bool
        assert torch.equal(m.reshape(-1).nonzero().flatten().to(torch.int32), idx)
    assert sum(int(m.sum()) for m in masks) == 20
