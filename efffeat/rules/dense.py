"""Layers linear in a weight matrix: ``nn.Linear`` and `efffeat.nn.TransposedLinear` (a tied transposed weight).

Per example ``∂z/∂W = Σ_t δ_t a_tᵀ`` over every leading position t of the input (sequence positions, image
rows...), ``∂z/∂b = Σ_t δ_t``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..factors import DenseFactor, Factor, LowRankFactor
from ..nn import TransposedLinear
from .base import Rule, present, rank_terms, register_rule


@register_rule(nn.Linear)
class LinearRule(Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        return present(module, "weight", "bias")

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Factor]:
        n, k = delta.shape[:2]
        u = rank_terms(delta, n, k, delta.shape[-1])
        out: dict[str, Factor] = {"weight": LowRankFactor(u, rank_terms(rec, n, 1, rec.shape[-1]))}
        if module.bias is not None:
            out["bias"] = DenseFactor(u.sum(dim=2))
        return out


@register_rule(TransposedLinear)
class TransposedLinearRule(Rule):
    """``y = x Wᵀᵀ + b`` with W borrowed from another Linear: the gradient of W is ``a δᵀ`` (transposed)."""

    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        claimed = present(module, "bias")
        claimed["source.weight"] = module.source.weight
        return claimed

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Factor]:
        n, k = delta.shape[:2]
        v = rank_terms(delta, n, k, delta.shape[-1])
        out: dict[str, Factor] = {"source.weight": LowRankFactor(rank_terms(rec, n, 1, rec.shape[-1]), v)}
        if module.bias is not None:
            out["bias"] = DenseFactor(v.sum(dim=2))
        return out
