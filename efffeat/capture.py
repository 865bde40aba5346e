"""Hooks that pull factored per-example gradients out of a network.

For every module a rule covers (`efffeat.rules`) a forward hook records what the rule needs from the layer
input and adds a zero "probe" tensor to the layer output; the gradient of the readout with respect to that
probe is the output cotangent δ of every example at once. The rule turns (record, δ) into factors — an outer
product for dense layers.

Forward-mode tangents: when the parameters are dual tensors (``torch.autograd.forward_ad``) with tangent Δθ,
the same pass yields the tangents ȧ and δ̇ along Δθ (forward-over-reverse), which is what the ``"nlo"``
effective features ``φ + ½ ψΔθ`` need — the Hessian ψ is never formed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ._data import Batch, batch_len, call_model
from ._swap import ParameterSwap
from .factors import Factor, sum_factors
from .readout import Readout
from .rules import Rule, rule_for


@dataclass
class HookedLayer:
    """A module with a factored rule, and the model parameters (by name) its terms belong to."""

    path: str
    module: nn.Module
    rule: Rule
    params: dict[str, str]  # rule attribute -> named_parameters() name


def hooked_layers(model: nn.Module, exclude: set[str]) -> list[HookedLayer]:
    """Every module whose rule claims at least one parameter not in `exclude`."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    layers = []
    for path, module in model.named_modules():
        rule = rule_for(module)
        if rule is None:
            continue
        params = {a: name_of[id(p)] for a, p in rule.claims(module).items() if id(p) in name_of}
        params = {a: n for a, n in params.items() if n not in exclude}
        if params:
            layers.append(HookedLayer(path, module, rule, params))
    return layers


@dataclass
class Support:
    """Which parameters of a model a rule covers, before anything runs (`efffeat.DualModel.supported`).

    Attributes:
        factored: ``{parameter: "module path (Type) via RuleName"}``.
        fallback: ``{parameter: "module path (Type): reason"}`` — computed by the exact per-example fallback.

    The first batch of a run may still move a factored parameter to the fallback, when it is also used
    outside the module that holds it (its factored gradient sum then differs from autograd's).
    """

    factored: dict[str, str] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{len(self.factored)} parameter tensors factored, {len(self.fallback)} by the fallback"]
        lines += [f"  factored  {n:<40} {how}" for n, how in self.factored.items()]
        lines += [f"  fallback  {n:<40} {why}" for n, why in self.fallback.items()]
        return "\n".join(lines)

    __repr__ = __str__


def support(model: nn.Module) -> Support:
    """The rules' coverage of every parameter of `model` (see `Support`)."""
    out = Support()
    for layer in hooked_layers(model, exclude=set()):
        where = f"{layer.path or '<root>'} ({type(layer.module).__name__})"
        for name in layer.params.values():
            out.factored[name] = f"{where} via {type(layer.rule).__name__}"
    holders = {}
    for path, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), f"{path or '<root>'} ({type(module).__name__})")
    for name, p in model.named_parameters():
        if name not in out.factored:
            out.fallback[name] = f"{holders.get(id(p), '<root>')}: no rule for this module type"
    return out


@dataclass
class BatchCapture:
    """What one hooked pass over a batch produced."""

    factors: dict[str, Factor]  # named_parameters() name -> factor [n, K, ...]
    readout: Tensor  # [n, K] readout values at the evaluation point
    non_batched: set[str]  # parameters whose layer output had no per-example leading axis


def capture_batch(
    swap: ParameterSwap,
    layers: list[HookedLayer],
    params: dict[str, Tensor],
    batch: Batch,
    readout: Readout,
    tangent: dict[str, Tensor] | None = None,
) -> BatchCapture:
    """Factored per-example gradients of the readout for the hooked layers' parameters.

    params: every ``named_parameters()`` tensor at the evaluation point θ; tangent: Δθ for the ``"nlo"``
    features ``φ(θ) + ½ ψ(θ)Δθ`` (None for plain features ``φ(θ)``).
    """
    n = batch_len(batch)
    records: list[tuple[HookedLayer, Any, Tensor]] = []
    non_batched: set[str] = set()

    def make_hook(layer: HookedLayer) -> Callable:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
            if not isinstance(output, Tensor) or output.ndim == 0 or output.shape[0] != n:
                non_batched.update(layer.params.values())
                return None
            probe = torch.zeros(output.shape, dtype=output.dtype, device=output.device, requires_grad=True)
            records.append((layer, layer.rule.record(module, args), probe))
            return output + probe

        return hook

    handles = [layer.module.register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        with fwAD.dual_level():
            if tangent is not None:
                params = {k: fwAD.make_dual(p, tangent[k]) for k, p in params.items()}
            output = call_model(swap, params, batch)
            r = readout(output, batch)  # [n, K]
            probes = [p for _, _, p in records]
            k_out = r.shape[1]
            deltas: list[list[Tensor]] = [[] for _ in probes]
            if probes and r.requires_grad:
                for k in range(k_out):
                    grads = torch.autograd.grad(r[:, k].sum(), probes, retain_graph=k + 1 < k_out, allow_unused=True)
                    for i, g in enumerate(grads):
                        deltas[i].append(torch.zeros_like(probes[i]) if g is None else g)
            else:
                for i, p in enumerate(probes):
                    deltas[i] = [torch.zeros_like(p)] * k_out
            acc: dict[str, list[Factor]] = {}
            for (layer, rec, _), ds in zip(records, deltas):
                delta = torch.stack(ds, dim=1)  # [n, K, *out_shape[1:]]
                for attr, term in layer.rule.terms(layer.module, rec, delta).items():
                    if attr in layer.params:
                        acc.setdefault(layer.params[attr], []).append(term.with_tangents())
            r_primal = fwAD.unpack_dual(r).primal.detach()
    finally:
        for h in handles:
            h.remove()
    factors = {name: sum_factors(parts) for name, parts in acc.items() if name not in non_batched}
    return BatchCapture(factors, r_primal, non_batched)
