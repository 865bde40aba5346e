"""Small modules efffeat has factored rules for, beyond those of ``torch.nn``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TransposedLinear(nn.Module):
    """``y = x Wᵀᵀ + b = x W + b``: the transpose of another ``nn.Linear``'s weight, shared (tied) with it.

    The toy model of superposition uses one W twice, ``x' = ReLU(Wᵀ W x + b)``; writing the second use as a
    `TransposedLinear` of the first lets efffeat factor both uses of W (their gradients add). The source
    module is referenced, not registered, so W appears once in ``state_dict()``.

    source: the ``nn.Linear`` whose weight ``[d_out_src, d_in_src]`` this layer uses as a map
    ``[.., d_out_src] -> [.., d_in_src]``.
    """

    def __init__(self, source: nn.Linear, bias: bool = True):
        super().__init__()
        self._source = [source]  # a list keeps nn.Module from registering it as a child
        d_out = source.weight.shape[1]
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=source.weight.dtype)) if bias else None

    @property
    def source(self) -> nn.Linear:
        return self._source[0]

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[..., d_out_src]`` -> ``[..., d_in_src]``."""
        return F.linear(x, self.source.weight.t(), self.bias)

    def extra_repr(self) -> str:
        d_in, d_out = self.source.weight.shape
        return f"in_features={d_in}, out_features={d_out}, bias={self.bias is not None}, tied"
