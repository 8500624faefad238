"""The served layer: the base ``nn.Linear`` once for the batch, then each row's delta."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from sparse_engine.serving.library import AdapterLibrary


class MultiAdapterLinear(nn.Module):
    """Drop-in for a target ``nn.Linear``: ``y = x·Wᵀ + b`` once for the batch, then each
    row's sparse delta from the library (rows with no adapter keep the base output)."""

    def __init__(self, base: nn.Linear, library: AdapterLibrary, name: str):
        super().__init__()
        self.base = base
        self.name = name
        self.library = library  # a plain attribute: the library is not a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layer={self.name!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.base.weight, self.base.bias)
        return self.library.apply(self.name, x, y)
