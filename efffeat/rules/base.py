"""The rule registry: which module types have factored per-example gradients, and how they are computed.

A rule is one object per module family. During a hooked forward pass efffeat calls, for every module a rule
covers, ``rule.record(module, args)`` on the module's inputs and adds a probe to its output; after the
backward pass it calls ``rule.terms(module, record, delta)`` with the output cotangent of every example and
readout component. The terms are `efffeat.factors.Factor` objects — `LowRankFactor` outer products for
anything linear in a weight matrix, `DenseFactor` for small tensors — whose tensors may carry forward-mode
tangents (the ``"nlo"`` order); efffeat resolves those itself.

Register a rule for your own module type (the pattern of Opacus's ``register_grad_sampler``)::

    @ef.register_rule(Scale)
    class ScaleRule(ef.Rule):
        def claims(self, module):                  # the parameters this rule computes
            return {"s": module.s}

        def terms(self, module, rec, delta):       # rec: the input x; delta: [n, K, *y.shape[1:]]
            n, k = delta.shape[:2]
            g = (delta * rec[:, None]).reshape(n, k, -1, module.s.numel()).sum(2)
            return {"s": ef.DenseFactor(g)}        # [n, K, numel]

A parameter that a rule claims but that is also used outside the module is caught on the first batch (the
factored gradient sum is compared with autograd's) and computed by the exact per-example fallback instead.

**Rules with their own forward.** Some modules apply their parameters inside a functional, where a forward
hook sees neither the projections nor their inputs (``nn.MultiheadAttention`` slices ``in_proj_weight`` inside
``F.multi_head_attention_forward``, and never calls ``out_proj`` as a module). Such a rule overrides
`Rule.forward`: during the capture pass it replaces the module's forward (and is removed again on every exit
path), computes the same output from the module's own parameter tensors, and marks with ``tap(name, tensor)``
the intermediate tensors whose cotangents `Rule.terms` needs. The module's submodules are not hooked: the rule
covers their parameters too. To decline an input it does not handle, the rule returns the module's own output
and taps nothing; the module's parameters then go to the fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..factors import Factor


class Rule:
    """How one module type turns (recorded input side, output cotangent δ) into per-parameter factors.

    Subclasses implement `claims` and `terms`; `record` defaults to the module's first positional input.
    """

    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        """``{attribute name: parameter}`` of the parameters this rule computes for `module` (``{}``: none)."""
        raise NotImplementedError

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        """What `terms` needs from the module's positional inputs (called in the forward pass)."""
        return args[0]

    def terms(self, module: nn.Module, rec: Any, delta: Any) -> dict[str, Factor]:
        """``{attribute: factor [n, K, ...]}`` from the record and the output cotangent ``delta [n, K, *out[1:]]``.

        For a rule with its own `forward`, delta is ``{tap name: [n, K, *tapped.shape[1:]]}``.
        """
        raise NotImplementedError

    def forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], tap: Callable[[str, Tensor], Tensor]
    ) -> tuple[Any, Any]:
        """Optional: ``(output, record)`` of the module computed by the rule itself during the capture pass.

        ``tap(name, tensor)`` marks a tensor ``[n, ...]`` whose cotangent `terms` receives as ``delta[name]``,
        and returns the tensor to use downstream. Rules without a forward of their own are served by a forward
        hook (`record` on the inputs, the cotangent of the output).
        """
        raise NotImplementedError


def has_own_forward(rule: Rule) -> bool:
    """Whether the rule computes its module's output itself during capture (`Rule.forward`)."""
    return type(rule).forward is not Rule.forward


def present(module: nn.Module, *attrs: str) -> dict[str, Tensor]:
    """The attributes of `module` among `attrs` that hold an ``nn.Parameter``."""
    return {a: getattr(module, a) for a in attrs if isinstance(getattr(module, a, None), nn.Parameter)}


def rank_terms(t: Tensor, n: int, k: int, d: int) -> Tensor:
    """``[n, k, R, d]``: every leading position of a ``[n, (k,) ..., d]`` tensor becomes a rank term."""
    return t.reshape(n, k, -1, d)


def position_sum(t: Tensor, dim: int = 2) -> Tensor:
    """The sum over positions (a rank axis); a view, not a copy, when there is one position."""
    return t.squeeze(dim) if t.shape[dim] == 1 else t.sum(dim)


_BY_TYPE: dict[type, tuple[Rule, bool]] = {}
# Rules for classes of optional packages, by qualified name, so that those packages are never imported here.
_BY_NAME: dict[str, tuple[Rule, bool]] = {}


def register_rule(*module_types: type | str, subclasses: bool = False) -> Callable[[Any], Any]:
    """Class decorator: use this `Rule` (instantiated once) for modules of these types.

    module_types: classes, or qualified class names (``"package.module.Class"``) of optional packages.
    subclasses: also cover subclasses (found along the MRO; the nearest registered class wins). Exact types
    take precedence, and a later registration replaces an earlier one for the same type.
    """
    if not module_types:
        raise TypeError("register_rule needs at least one module type")

    def decorate(rule_cls: Any) -> Any:
        rule = rule_cls() if isinstance(rule_cls, type) else rule_cls
        if not isinstance(rule, Rule):
            raise TypeError(f"register_rule decorates a subclass of efffeat.Rule, got {rule_cls!r}")
        for t in module_types:
            if isinstance(t, str):
                _BY_NAME[t] = (rule, subclasses)
            elif isinstance(t, type) and issubclass(t, nn.Module):
                _BY_TYPE[t] = (rule, subclasses)
            else:
                raise TypeError(f"register_rule takes nn.Module subclasses or qualified names, got {t!r}")
        return rule_cls

    return decorate


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def rule_for(module: nn.Module) -> Rule | None:
    """The rule registered for the module's type, or for its nearest ancestor class registered with subclasses."""
    for i, cls in enumerate(type(module).__mro__):
        found = _BY_TYPE.get(cls) or _BY_NAME.get(_qualname(cls))
        if found is not None and (i == 0 or found[1]):
            return found[0]
    return None
