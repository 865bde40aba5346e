"""Layer rules: factored per-example gradients per module family, the registry, and the exact fallback.

=======================  =====================================================================================
file                     covers
=======================  =====================================================================================
``base.py``              `Rule` (incl. rules with their own forward), `register_rule` (public), `rule_for`
``dense.py``             ``nn.Linear`` and its subclasses, `efffeat.nn.TransposedLinear`
``conv.py``              ``nn.Conv1d``, ``nn.Conv2d`` (any stride, padding, dilation, groups, padding mode)
``attention.py``         ``nn.MultiheadAttention`` (its own forward during capture)
``recurrent.py``         ``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` (their own forward during capture, step by step)
``embedding.py``         ``nn.Embedding``
``norm.py``              ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` (eval)
``transformer_lens.py``  TransformerLens ``NormalizationBridge`` (by name; TransformerLens is not imported)
``fallback.py``          exact per-example Jacobians for everything else (``torch.func``, or an autograd loop)
=======================  =====================================================================================

A new family is one file here with ``@register_rule(ModuleType)`` on a `Rule` subclass, imported below.
"""

from __future__ import annotations

from . import attention, conv, dense, embedding, norm, recurrent, transformer_lens  # noqa: F401  (registration)
from .base import Rule, register_rule, rule_for
from .fallback import Fallback, FallbackWarning, batch_gradient, describe, describe_reasons

__all__ = [
    "Fallback",
    "FallbackWarning",
    "Rule",
    "batch_gradient",
    "describe",
    "describe_reasons",
    "register_rule",
    "rule_for",
]
