"""Norm layers' elementwise affine parameters: ``∂z/∂γ = Σ_t δ_t ⊙ x̂_t``, ``∂z/∂β = Σ_t δ_t`` per example."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..factors import DenseFactor, Factor
from .base import Rule, position_sum, present, register_rule


def affine_terms(delta: Tensor, normalised: Tensor | None, d: int, weight: bool, bias: bool) -> dict[str, Factor]:
    """The factors of an elementwise gain (``δ ⊙ x̂`` summed over positions) and shift (``δ`` summed), ``[n, K, d]``."""
    n, k = delta.shape[:2]
    dd = delta.reshape(n, k, -1, d)
    out: dict[str, Factor] = {}
    if weight:
        assert normalised is not None
        out["weight"] = DenseFactor(position_sum(dd * normalised.reshape(n, 1, -1, d)))
    if bias:
        out["bias"] = DenseFactor(position_sum(dd))
    return out


@register_rule(nn.LayerNorm)
class LayerNormRule(Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        return present(module, "weight", "bias")

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> Tensor:
        x = args[0]
        dims = tuple(range(x.ndim - len(module.normalized_shape), x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).square().mean(dim=dims, keepdim=True)
        return (x - mean) / torch.sqrt(var + module.eps)

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Factor]:
        d = module.weight.numel() if module.weight is not None else rec[0].numel()
        return affine_terms(delta, rec, d, module.weight is not None, module.bias is not None)
