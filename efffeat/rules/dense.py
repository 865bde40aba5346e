"""Layers linear in a weight matrix: ``nn.Linear`` (and its subclasses) and `efffeat.nn.TransposedLinear` (a tied
transposed weight).

Per example ``∂z/∂W = Σ_t δ_t a_tᵀ`` over every leading position t of the input (sequence positions, image
rows...), ``∂z/∂b = Σ_t δ_t``. A Linear subclass whose forward computes something else is caught by the first-batch
check against autograd and computed by the fallback.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..factors import DenseFactor, Factor, LowRankFactor
from ..nn import TransposedLinear
from .base import Rule, position_sum, present, rank_terms, register_rule


@register_rule(nn.Linear, subclasses=True)
class LinearRule(Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        return present(module, "weight", "bias")

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Factor]:
        n, k = delta.shape[:2]
        u = rank_terms(delta, n, k, delta.shape[-1])
        out: dict[str, Factor] = {"weight": LowRankFactor(u, rank_terms(rec, n, 1, rec.shape[-1]))}
        if module.bias is not None:
            out["bias"] = DenseFactor(position_sum(u))
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
            out["bias"] = DenseFactor(position_sum(v))
        return out
