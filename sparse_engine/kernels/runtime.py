"""What every Triton kernel module shares: Triton availability, interpreter mode, the autotune
switch, the argument checks the launchers run before any launch, and small launch helpers.

It imports neither Triton nor a kernel (``sparse_engine.config`` imports it), so it works where
Triton is absent. ``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function is
defined (the test suite's conftest does it on machines without CUDA). In the interpreter bf16
is held as uint16 and its arithmetic is wrong, so kernels upcast loaded tiles to fp32 behind an
``UPCAST`` constexpr (:func:`upcast_bf16`).
"""
from __future__ import annotations

import importlib.util
import operator
import os

import torch

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
SCORES = ("mcs", "snip", "gm", "wm")  # the scores the kernels compute (the engine adds "gd" on top)
HAS_TRITON: bool = importlib.util.find_spec("triton") is not None
# Benchmark every fitting config on the first call of each shape class (GPU only). Off
# (SPARSE_ENGINE_AUTOTUNE=0, or set this attribute; read at each launch): one default config
# per kernel, which keeps first calls cheap (e.g. test suites on a GPU).
AUTOTUNE: bool = os.environ.get("SPARSE_ENGINE_AUTOTUNE", "1") != "0"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ Triton and the device


def require_triton(module: str) -> None:
    """The ImportError every kernel module raises on import when Triton is not installed (the
    engine then falls back to the reference twins)."""
    if not HAS_TRITON:
        raise ImportError(f"{module} needs Triton (pip install triton); without it use "
                          "sparse_engine.kernels.reference, the PyTorch twins of the same launchers")


def triton_usable_for(tensor) -> bool:
    """True when a Triton kernel can run on ``tensor``: CUDA with Triton, or the CPU interpreter."""
    if not HAS_TRITON:
        return False
    if tensor.is_cuda:
        return True
    return INTERPRET and tensor.device.type == "cpu"


def check_usable(tensor: torch.Tensor, family: str) -> None:
    """Refuse, before any launch, tensors on which the ``family`` kernels cannot run."""
    if not triton_usable_for(tensor):
        raise RuntimeError(
            f"the Triton {family} kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
            f"before import), got a tensor on {tensor.device}; use sparse_engine.kernels.reference there")


# ---------------------------------------------------------------------------- arguments


def _dtype_names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(t, name: str, allowed=FLOAT_DTYPES) -> torch.Tensor:
    check_tensor(t, name)
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {_dtype_names(allowed)}, got {t.dtype}")
    return t


def check_same_device(device: torch.device, **tensors) -> None:
    """Every tensor among ``tensors`` (None and non-tensors are skipped) lives on ``device``."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")


def check_block_size(block_size, name: str = "block_size") -> int:
    """A tensor-core tile edge: a power of two >= 16."""
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"{name} must be an int, got {type(block_size).__name__}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"{name} must be a power of two >= 16 for the Triton kernels, got {block_size}")
    return block_size


def check_count(value, limit: int, name: str) -> int:
    """An int in ``[0, limit]`` (a number of entries to keep, for example)."""
    if isinstance(value, bool):  # operator.index(True) is 1: a flag passed by mistake
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 0 or value > limit:
        raise ValueError(f"{name} must be in [0, {limit}] (the number of entries), got {value}")
    return value


def output(out, shape, dtype: torch.dtype, device: torch.device, *, name: str = "out",
           contiguous: bool = False) -> torch.Tensor:
    """``out`` checked against what the launch writes (shape, dtype, device), or a new tensor."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_tensor(out, name)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if out.device != device:
        raise ValueError(f"{name} is on {out.device}, expected {device}")
    if contiguous and not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


# ------------------------------------------------------------------------ launch helpers


def pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1): block extents, autotune buckets."""
    return 1 << max(0, int(n) - 1).bit_length()


def upcast_bf16(dtype: torch.dtype) -> bool:
    """The ``UPCAST`` constexpr: bf16 tiles continue as fp32 in the interpreter (its bf16 math is wrong)."""
    return bool(INTERPRET and dtype == torch.bfloat16)


def offset_alignment(offsets, most: int = 16) -> int:
    """The largest power of two, at most ``most``, dividing every element offset: a
    ``tl.multiple_of`` hint for offsets that come from a table (it lets loads vectorise)."""
    align = most
    for off in offsets:
        while off % align:
            align //= 2
    return align


def matching_config(configs, defaults):
    """The first of ``configs`` equal to one of ``defaults`` (``(kwargs, num_warps, num_stages)``,
    in order of preference), or None: the one config kept when autotuning is switched off."""
    for want, warps, stages in defaults:
        for c in configs:
            if c.kwargs == want and c.num_warps == warps and c.num_stages == stages:
                return c
    return None
