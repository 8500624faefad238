"""The shared runtime of the Triton kernels: availability, interpreter mode, autotune defaults.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function is defined (the
test suite's conftest does it on machines without CUDA). In the interpreter bf16 is held
as uint16 and its arithmetic is wrong, so kernels upcast loaded tiles to fp32 behind the
``UPCAST_BF16`` constexpr that launchers pass as ``INTERPRET``.
"""
from __future__ import annotations

import importlib.util
import os

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
SCORES = ("mcs", "snip", "gm", "wm")  # the scores the kernels compute (the engine adds "gd" on top)
HAS_TRITON: bool = importlib.util.find_spec("triton") is not None


def triton_usable_for(tensor) -> bool:
    """True when a Triton kernel can run on ``tensor``: CUDA with Triton, or the CPU interpreter."""
    if not HAS_TRITON:
        return False
    if tensor.is_cuda:
        return True
    return INTERPRET and tensor.device.type == "cpu"



def matching_config(configs, defaults):
    """The first of ``configs`` equal to one of ``defaults`` (``(kwargs, num_warps, num_stages)``,
    in order of preference), or None: the one config kept when autotuning is switched off."""
    for want, warps, stages in defaults:
        for c in configs:
            if c.kwargs == want and c.num_warps == warps and c.num_stages == stages:
                return c
    return None
