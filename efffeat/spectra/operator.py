"""The effective kernel of some parameter tensors as a linear operator, for Lanczos on the factors.

With J the ``[N·K, P_sel]`` feature matrix (rows: (example, component) pairs, example-major at ``n·K + k``;
columns: the selected parameters in slot order) the kernel is ``J Jᵀ``; its products need two passes over
the factors and never the ``[N·K, N·K]`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..features import EffectiveFeatures


class KernelOperator:
    """``J Jᵀ`` of the tensors `params` (state_dict or named_parameters names; None: all) of `features`."""

    def __init__(self, features: EffectiveFeatures, params: Sequence[str] | None = None):
        self.features = features
        names = set(features.param_names(params))
        self.slots = [s for s in features.slots if s.name in names]
        self.n_pairs = features.n_examples * features.n_outputs

    @property
    def n_params(self) -> int:
        return sum(s.numel for s in self.slots)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def jvp(self, w: Tensor) -> Tensor:
        """``[N·K]``: ``J w`` for ``w [P_sel]`` (the selected tensors, in slot order)."""
        out = torch.zeros(self.features.n_examples, self.features.n_outputs, dtype=w.dtype, device=w.device)
        start = 0
        for s in self.slots:
            out += self.features.factors[s.name].matvec(w[start : start + s.numel])
            start += s.numel
        return out.reshape(-1)

    def vjp(self, u: Tensor) -> Tensor:
        """``[P_sel]``: ``Jᵀ u`` for ``u [N·K]``."""
        c = u.reshape(self.features.n_examples, self.features.n_outputs)
        return torch.cat([self.features.factors[s.name].rmatvec(c) for s in self.slots])

    def matvec(self, u: Tensor) -> Tensor:
        """``[N·K]``: ``J Jᵀ u``."""
        return self.jvp(self.vjp(u))

    def dense(self) -> Tensor:
        """``[N·K, N·K]`` the kernel matrix, from the factors' Gram products."""
        return self.features.kernel(params=self.names, reduce="flatten")
