"""TransformerLens 4.x bridges. Their attention and MLP projections are ``nn.Linear`` and their embeddings
``nn.Embedding`` (covered by those rules); ``NormalizationBridge`` normalises in Python and applies the wrapped
LayerNorm/RMSNorm's ``weight`` and ``bias`` itself, so it has a rule of its own. Registered by qualified name:
TransformerLens is never imported here."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..factors import Factor
from .base import Rule, present, register_rule
from .norm import affine_terms


@register_rule("transformer_lens.model_bridge.generalized_components.normalization.NormalizationBridge")
class NormalizationBridgeRule(Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        if module.use_native_layernorm_autograd or getattr(module.config, "layer_norm_folding", False):
            return {}  # the wrapped nn.LayerNorm runs, and its own rule applies
        comp = module.original_component
        return {f"original_component.{a}": p for a, p in present(comp, "weight", "bias").items()}

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> Tensor:
        x = args[0]
        if not module.uses_rms_norm:
            x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + getattr(module.config, "eps", 1e-5)).sqrt()

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Factor]:
        terms = affine_terms(delta, rec, delta.shape[-1], weight=True, bias=True)
        return {f"original_component.{a}": f for a, f in terms.items()}
