"""Layer rules: factored per-example gradients per module family, the registry, and the exact fallback.

=====================  =====================================================================
file                   covers
=====================  =====================================================================
``base.py``            `Rule`, `register_rule` (public), `rule_for`
``dense.py``           ``nn.Linear``, `efffeat.nn.TransposedLinear`
``embedding.py``       ``nn.Embedding``
``norm.py``            ``nn.LayerNorm``
``transformer_lens.py`` TransformerLens ``NormalizationBridge`` (by name; TransformerLens is not imported)
``fallback.py``        per-example ``torch.func`` Jacobians for everything else
=====================  =====================================================================

A new family is one file here with ``@register_rule(ModuleType)`` on a `Rule` subclass, imported below.
"""

from __future__ import annotations

from . import dense, embedding, norm, transformer_lens  # noqa: F401  (registration)
from .base import Rule, register_rule, rule_for
from .fallback import FallbackWarning, describe, fallback_factors, warn_fallback

__all__ = ["FallbackWarning", "Rule", "describe", "fallback_factors", "register_rule", "rule_for", "warn_fallback"]
