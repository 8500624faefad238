"""The kernel backend of a layer, decided once: the Triton launchers or their PyTorch twins.

``resolve(setting, device)`` turns a backend setting (``auto``, ``triton``, ``reference``)
and the device of a layer's tensors into one ``Kernels`` object. The autograd Functions
(``ops``), the layers' index layouts and mask selection (``masking``) all take that object;
the two sides share signatures, so no caller asks which side it holds.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType

import torch

from sparse_engine.config import BACKENDS
from sparse_engine.kernels import runtime
from sparse_engine.kernels import reference as ref

_TRITON_MODULES = {
    "masked_delta": "sparse_engine.kernels.masked_delta",
    "block_sparse": "sparse_engine.kernels.block_sparse",
    "topk": "sparse_engine.kernels.topk_mask",
}


@dataclass(frozen=True)
class Kernels:
    """The implementations one layer runs with. ``triton`` is False for the reference twins."""

    triton: bool
    masked_delta: ModuleType  # element search/fixed phase: fused masked-delta GEMMs, score pass
    block_sparse: ModuleType  # block phases: block-sparse GEMMs
    topk: ModuleType  # mask selection: batched top-k

    @property
    def name(self) -> str:
        return "triton" if self.triton else "reference"

    def compact_layout(self, indices: torch.Tensor, shape):
        """The launchers' index layout of compact element indices (None: the twins need none)."""
        return self.masked_delta.build_compact_layout(indices, shape) if self.triton else None

    def block_layout(self, block_indices: torch.Tensor, shape, block_size: int):
        """The launchers' index layout of kept tiles (None: the twins need none)."""
        return self.block_sparse.build_block_layout(block_indices, shape, block_size) if self.triton else None


REFERENCE = Kernels(triton=False, masked_delta=ref, block_sparse=ref, topk=ref)


def resolve(setting: str, tensor: torch.Tensor) -> Kernels:
    """The kernels for data living on ``tensor``'s device: Triton on CUDA (or in the CPU
    interpreter) for ``auto``/``triton``, the reference otherwise; ``triton`` where Triton
    cannot run is an error."""
    if setting not in BACKENDS:
        raise ValueError(f"unknown backend {setting!r}; choose from {BACKENDS}")
    if setting == "reference":
        return REFERENCE
    usable = runtime.triton_usable_for(tensor)
    if setting == "triton" and not usable:
        raise RuntimeError(
            "backend='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 set before import "
            f"for the CPU interpreter); got a {tensor.device.type} tensor, triton installed: {runtime.HAS_TRITON}"
        )
    if not usable or (setting == "auto" and not tensor.is_cuda):
        return REFERENCE
    return _triton_kernels(strict=setting == "triton")


@functools.lru_cache(maxsize=2)
def _triton_kernels(strict: bool) -> Kernels:
    try:
        modules = {kind: importlib.import_module(path) for kind, path in _TRITON_MODULES.items()}
    except ImportError as exc:
        if strict:
            raise RuntimeError(f"the Triton kernels are not available: {exc}") from exc
        return REFERENCE
    return Kernels(triton=True, **modules)

