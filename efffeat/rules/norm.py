"""Norm layers' elementwise affine parameters: ``∂z/∂γ = Σ_t δ_t ⊙ x̂_t``, ``∂z/∂β = Σ_t δ_t`` per example.

x̂ is the normalised input, recorded in the forward pass; t runs over every position the gain is shared by.

==================  ====================================  ==============================================
module              x̂                                      gain axis
==================  ====================================  ==============================================
``nn.LayerNorm``    per position, over normalized_shape    trailing ``normalized_shape``
``nn.RMSNorm``      ``x · rsqrt(mean(x²) + eps)``          trailing ``normalized_shape``
``nn.GroupNorm``    per example and group                  channels (axis 1)
``nn.BatchNorm*d``  with the running statistics (eval)     channels (axis 1)
==================  ====================================  ==============================================

Batch norm in training mode, or without running statistics, normalises with the statistics of the batch: an
example's output depends on the other examples, so it has no per-example features, and it is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..factors import DenseFactor, Factor
from .base import Rule, position_sum, present, register_rule


def affine_terms(delta: Tensor, normalised: Tensor | None, d: int, weight: bool, bias: bool) -> dict[str, Factor]:
    """The factors of an elementwise gain (``δ ⊙ x̂`` summed over positions) and shift (``δ`` summed), ``[n, K, d]``.

    The parameters cover the trailing d entries of the output (``[n, ..., *normalized_shape]``).
    """
    n, k = delta.shape[:2]
    dd = delta.reshape(n, k, -1, d)
    out: dict[str, Factor] = {}
    if weight:
        assert normalised is not None
        out["weight"] = DenseFactor(position_sum(dd * normalised.reshape(n, 1, -1, d)))
    if bias:
        out["bias"] = DenseFactor(position_sum(dd))
    return out


def channel_terms(delta: Tensor, normalised: Tensor, weight: bool, bias: bool) -> dict[str, Factor]:
    """`affine_terms` for parameters on the channel axis 1 (``[n, C, *spatial]``): sums over the spatial positions."""
    n, k, c = delta.shape[:3]
    dd = delta.reshape(n, k, c, -1)
    out: dict[str, Factor] = {}
    if weight:
        out["weight"] = DenseFactor(position_sum(dd * normalised.reshape(n, 1, c, -1), dim=3))
    if bias:
        out["bias"] = DenseFactor(position_sum(dd, dim=3))
    return out


def _trailing(x: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(range(x.ndim - len(shape), x.ndim))


@register_rule(nn.LayerNorm)
class LayerNormRule(Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        return present(module, "weight", "bias")

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> Tensor:
        x = args[0]
        dims = _trailing(x, module.normalized_shape)
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).square().mean(dim=dims, keepdim=True)
        return (x - mean) / torch.sqrt(var + module.eps)

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Factor]:
        d = module.weight.numel() if module.weight is not None else rec[0].numel()
        return affine_terms(delta, rec, d, module.weight is not None, module.bias is not None)


@register_rule(nn.RMSNorm)
class RMSNormRule(Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        return present(module, "weight")

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> Tensor:
        x = args[0]
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps  # torch's default
        return x * torch.rsqrt(x.square().mean(dim=_trailing(x, module.normalized_shape), keepdim=True) + eps)

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Factor]:
        return affine_terms(delta, rec, module.weight.numel(), weight=True, bias=False)


@register_rule(nn.GroupNorm)
class GroupNormRule(Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        return present(module, "weight", "bias")

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> Tensor:
        x = args[0]
        grouped = x.reshape(x.shape[0], module.num_groups, -1)
        mean = grouped.mean(-1, keepdim=True)
        var = (grouped - mean).square().mean(-1, keepdim=True)  # biased, as F.group_norm
        return ((grouped - mean) / torch.sqrt(var + module.eps)).reshape(x.shape)

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Factor]:
        return channel_terms(delta, rec, module.weight is not None, module.bias is not None)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(Rule):
    """Eval mode with running statistics: ``x̂ = (x − running_mean) / √(running_var + eps)`` per channel."""

    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        return present(module, "weight", "bias")

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> Tensor:
        x = args[0]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - module.running_mean.view(shape)) / torch.sqrt(module.running_var.view(shape) + module.eps)

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Factor]:
        return channel_terms(delta, rec, module.weight is not None, module.bias is not None)
