"""The shared kernel runtime (sparse_engine/kernels/runtime.py): launch helpers against plain-Python
definitions, the argument checks every launcher runs, and one refusal of devices the kernels
cannot run on, the same for all four kernel families."""
from __future__ import annotations

import random

import pytest
import torch

from sparse_engine.kernels import runtime

CUDA = torch.cuda.is_available()


def test_pow2_is_the_smallest_power_of_two_not_below_n():
    rng = random.Random(7)
    for n in [0, 1, 2, 3, 4, 5, 1023, 1024, 1025] + [rng.randrange(1, 1 << 40) for _ in range(200)]:
        p = runtime.pow2(n)
        assert p & (p - 1) == 0 and p >= max(n, 1), n
        assert p == 1 or p // 2 < n, n  # nothing smaller would do


def test_offset_alignment_divides_every_offset_and_is_the_largest_such():
    rng = random.Random(3)
    for _ in range(200):
        offsets = [rng.randrange(0, 5000) for _ in range(rng.randrange(1, 6))]
        a = runtime.offset_alignment(offsets)
        assert a in (1, 2, 4, 8, 16) and all(o % a == 0 for o in offsets), offsets
        assert a == 16 or any(o % (2 * a) for o in offsets), offsets


def test_upcast_only_for_bf16_in_the_interpreter(monkeypatch):
    for interpret in (False, True):
        monkeypatch.setattr(runtime, "INTERPRET", interpret)
        assert runtime.upcast_bf16(torch.bfloat16) is interpret
        assert not runtime.upcast_bf16(torch.float16) and not runtime.upcast_bf16(torch.float32)


def test_checks_name_the_argument_and_the_fix():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        runtime.check_tensor([1.0], "x")
    with pytest.raises(TypeError, match="x must have dtype float32, float16 or bfloat16, got torch.int64"):
        runtime.check_float(x.long(), "x")
    with pytest.raises(TypeError, match="x must have dtype float16, got torch.float32"):
        runtime.check_float(x, "x", allowed=(torch.float16,))
    with pytest.raises(ValueError, match="power of two >= 16"):
        runtime.check_block_size(24)
    with pytest.raises(TypeError, match="bool"):
        runtime.check_block_size(True)
    assert runtime.check_block_size(32) == 32
    with pytest.raises(TypeError, match="k must be an int, got bool"):
        runtime.check_count(True, 5, "k")
    with pytest.raises(ValueError, match=r"k must be in \[0, 5\]"):
        runtime.check_count(6, 5, "k")
    assert runtime.check_count(5, 5, "k") == 5
    with pytest.raises(ValueError, match="out must have shape"):
        runtime.output(torch.empty(3, 2), (2, 3), torch.float32, x.device)
    with pytest.raises(TypeError, match="out must have dtype"):
        runtime.output(x.half(), (2, 3), torch.float32, x.device)
    with pytest.raises(ValueError, match="contiguous"):
        runtime.output(torch.empty(3, 2).t(), (2, 3), torch.float32, x.device, contiguous=True)
    assert runtime.output(None, (2, 3), torch.float16, x.device).dtype == torch.float16
    if CUDA:
        with pytest.raises(ValueError, match="w is on cuda"):
            runtime.check_same_device(x.device, w=x.cuda(), none=None)


def _calls():
    """One valid call per kernel family, on CPU tensors."""
    from sparse_engine.kernels import block_sparse, masked_delta, multi_adapter, topk_mask

    x, w = torch.randn(3, 32), torch.randn(16, 32)
    blocks, ids = torch.randn(1, 16, 16), torch.tensor([1], dtype=torch.int32)
    i32 = dict(dtype=torch.int32)
    return {
        "masked-delta": lambda: masked_delta.masked_delta_linear(x, w, torch.zeros_like(w), None),
        "block-sparse": lambda: block_sparse.block_delta_linear(x, w, blocks, ids),
        "top-k": lambda: topk_mask.topk_per_layer([w], [3]),
        "multi-adapter": lambda: multi_adapter.multi_block_delta(
            x, torch.zeros(3, 16), torch.arange(3, **i32), torch.zeros(1, **i32), torch.tensor([0, 3], **i32),
            torch.tensor([[0, 1]], **i32), torch.tensor([1], **i32), blocks),
    }


@pytest.mark.skipif(CUDA or not runtime.HAS_TRITON, reason="checks the CPU refusal without the interpreter")
@pytest.mark.parametrize("family", ["masked-delta", "block-sparse", "top-k", "multi-adapter"])
def test_cpu_tensors_without_the_interpreter_are_refused_before_any_launch(family, monkeypatch):
    call = _calls()[family]
    monkeypatch.setattr(runtime, "INTERPRET", False)
    with pytest.raises(RuntimeError, match=f"the Triton {family} kernels need CUDA tensors"):
        call()


def test_a_missing_triton_is_one_import_error_naming_the_twins(monkeypatch):
    monkeypatch.setattr(runtime, "HAS_TRITON", False)
    with pytest.raises(ImportError, match="needs Triton.*kernels.reference"):
        runtime.require_triton("sparse_engine.kernels.topk_mask")
    assert not runtime.triton_usable_for(torch.zeros(1))
