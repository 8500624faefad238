"""The served layer: the base ``nn.Linear`` once for the batch, then each row's delta."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine.layers import LinearWrapper

if TYPE_CHECKING:
    from sparse_engine.serving.library import AdapterLibrary


class MultiAdapterLinear(LinearWrapper):
    """Drop-in for a target ``nn.Linear``: ``y = x·Wᵀ + b`` once for the batch, then each
    row's sparse delta from the library (rows with no adapter keep the base output)."""

    def __init__(self, base: nn.Linear, library: AdapterLibrary, name: str):
        super().__init__()
        self.base = base
        self.name = name
        self.library = library  # a plain attribute: the library is not a submodule

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layer={self.name!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base.weight, self.base.bias)
        return self.library.apply(self.name, x, y)
