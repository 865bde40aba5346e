"""Hooks that pull factored per-example gradients out of a network.

For every module a rule covers (`efffeat.rules`) a forward hook records what the rule needs from the layer
input and keeps the place of the layer output in the autograd graph (its gradient edge). One backward pass per
readout component, ``torch.autograd.grad(readout, edges)``, gives the output cotangent δ of every example at
once; no probe tensors are built, and no parameter gradient is computed. The rule turns (record, δ) into
factors — an outer product for dense layers.

- The edge is taken when the layer returns, so an in-place op on the output later (``ReLU(inplace=True)``)
  does not change which value δ belongs to; a layer called twice (tied weights) gives two calls.
- The parameters of the hooked layers are graph leaves for the pass, so every hooked output is in the graph.
- An output with a batch axis of 1 where the batch has n examples (a position embedding of ``[1, T]`` ids) is
  expanded to n, with the layer's inputs, so that every example gets its own cotangent.
- A rule with its own `Rule.forward` replaces its module's forward for the pass and marks the tensors it
  needs cotangents of (``nn.MultiheadAttention``: q, k, v and the output).

Forward-mode tangents: when the parameters are dual tensors (``torch.autograd.forward_ad``) with tangent Δθ,
the same pass yields the tangents ȧ and δ̇ along Δθ (forward-over-reverse), which is what the ``"nlo"``
effective features ``φ + ½ ψΔθ`` need — the Hessian ψ is never formed.

Every pass runs under `efffeat._autodiff.autodiff_context` (attention fast paths off, composite layer norm in
forward mode; raw failures become errors that name the module).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from ._autodiff import autodiff_context
from ._data import Batch, batch_len, call_model
from ._swap import ParameterSwap
from .errors import UnsupportedModelError
from .factors import Factor, sum_factors
from .readout import Readout
from .rules import Rule, rule_for
from .rules.base import has_own_forward


@dataclass
class HookedLayer:
    """A module with a factored rule, and the model parameters (by name) its terms belong to."""

    path: str
    module: nn.Module
    rule: Rule
    params: dict[str, str]  # rule attribute -> named_parameters() name

    @property
    def label(self) -> str:
        return f"{self.path or '<root>'} ({type(self.module).__name__})"


def _inside(path: str, parent: str) -> bool:
    return path != parent and (parent == "" or path.startswith(parent + "."))


def hooked_layers(model: nn.Module, exclude: set[str]) -> list[HookedLayer]:
    """Every module whose rule claims at least one parameter not in `exclude`.

    Submodules of a module whose rule has its own forward are covered by that rule, not hooked.
    """
    name_of = {id(p): n for n, p in model.named_parameters()}
    layers = []
    covered: list[str] = []
    for path, module in model.named_modules():
        if any(_inside(path, c) for c in covered):
            continue
        rule = rule_for(module)
        if rule is None:
            continue
        params = {a: name_of[id(p)] for a, p in rule.claims(module).items() if id(p) in name_of}
        if params and has_own_forward(rule):
            covered.append(path)
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
        for name in layer.params.values():
            out.factored[name] = f"{layer.label} via {type(layer.rule).__name__}"
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
    declined: set[str] = field(default_factory=set)  # parameters of modules whose rule declined the inputs


@dataclass
class _Tapped:
    """A layer output whose cotangent is wanted: its gradient edge (None: not in the graph) and its shape."""

    edge: GradientEdge | None
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


@dataclass
class _Call:
    """One call of a hooked layer: the rule's record and the tapped outputs (``""``: the module output)."""

    layer: HookedLayer
    record: Any
    taps: dict[str, _Tapped]


@contextmanager
def _forward_replaced(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """The module computes with `forward` inside the block; its own forward (or a user's override) after."""
    missing = object()
    saved = module.__dict__.get("forward", missing)
    module.forward = forward
    try:
        yield
    finally:
        if saved is missing:
            del module.forward
        else:
            module.forward = saved


def capture_batch(
    swap: ParameterSwap,
    layers: list[HookedLayer],
    params: dict[str, Tensor],
    batch: Batch,
    readout: Readout,
    tangent: dict[str, Tensor] | None = None,
    plan: bool = False,
) -> BatchCapture:
    """Factored per-example gradients of the readout for the hooked layers' parameters.

    params: every ``named_parameters()`` tensor at the evaluation point θ; tangent: Δθ for the ``"nlo"``
    features ``φ(θ) + ½ ψ(θ)Δθ`` (None for plain features ``φ(θ)``). plan: the first-batch pass that decides
    what is factored, where a layer output without a per-example axis is reported in ``non_batched``; on any
    other pass it is an error.
    """
    n = batch_len(batch)
    calls: list[_Call] = []
    non_batched: set[str] = set()
    declined: set[str] = set()

    def per_example(t: Any) -> Tensor | None:
        """`t` with a leading axis of n (a batch-1 tensor expanded), or None if it has none."""
        if not isinstance(t, Tensor) or t.ndim == 0 or t.shape[0] not in (1, n):
            return None
        return t if t.shape[0] == n else t.expand(n, *t.shape[1:])

    def batched(a: Any) -> Any:
        out = per_example(a)
        return a if out is None else out

    def tapped(t: Tensor) -> _Tapped:
        return _Tapped(get_gradient_edge(t) if t.requires_grad else None, t.shape, t.dtype, t.device)

    def hook_of(layer: HookedLayer) -> Callable:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor | None:
            out = per_example(output)
            if out is None:
                non_batched.update(layer.params.values())
                return None
            if out is not output:  # batch-broadcast: its inputs get the batch axis too
                args = tuple(batched(a) for a in args)
            calls.append(_Call(layer, layer.rule.record(module, args), {"": tapped(out)}))
            return None if out is output else out

        return hook

    def forward_of(layer: HookedLayer) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            taps: dict[str, _Tapped] = {}

            def tap(name: str, t: Tensor) -> Tensor:
                out = per_example(t)
                if out is None:
                    non_batched.update(layer.params.values())
                    return t
                taps[name] = tapped(out)
                return out

            output, record = layer.rule.forward(layer.module, args, kwargs, tap)
            if taps:
                calls.append(_Call(layer, record, taps))
            else:
                declined.update(layer.params.values())
            return output

        return forward

    wants_grad = {name for layer in layers for name in layer.params.values()}
    with ExitStack() as stack:
        for layer in layers:
            if has_own_forward(layer.rule):
                stack.enter_context(_forward_replaced(layer.module, forward_of(layer)))
            else:
                stack.callback(layer.module.register_forward_hook(hook_of(layer)).remove)
        what = "the nlo features (forward-over-reverse)" if tangent is not None else "the factored features"
        stack.enter_context(autodiff_context(swap.model, forward_ad=tangent is not None, what=what))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(fwAD.dual_level())
        point = {}
        for name, p in params.items():
            p = p.detach()
            if name in wants_grad:
                p = p.requires_grad_()
            point[name] = p if tangent is None else fwAD.make_dual(p, tangent[name])
        output = call_model(swap, point, batch)
        r = readout(output, batch)  # [n, K]
        deltas = _cotangents(r, calls)
        acc: dict[str, list[Factor]] = {}
        for call, ds in zip(calls, deltas):
            delta = ds[""] if "" in call.taps else ds
            for attr, term in call.layer.rule.terms(call.layer.module, call.record, delta).items():
                if attr in call.layer.params:
                    acc.setdefault(call.layer.params[attr], []).append(term.with_tangents())
        r_primal = fwAD.unpack_dual(r).primal.detach()
    if non_batched and not plan:
        layers_of = [layer.label for layer in layers if set(layer.params.values()) & non_batched]
        raise UnsupportedModelError(
            f"the output of {', '.join(layers_of)} has no leading axis of the {n} examples of this batch, although "
            "it had one on the first batch (examples along another axis, e.g. a sequence-first layout whose "
            "length equalled the batch size?); put the examples first, or pass batches of one size"
        )
    factors = {name: sum_factors(parts) for name, parts in acc.items() if name not in non_batched}
    return BatchCapture(factors, r_primal, non_batched, declined)


def _cotangents(r: Tensor, calls: list[_Call]) -> list[dict[str, Tensor]]:
    """``[{tap: δ [n, K, *shape[1:]]}]`` per call: the gradients of each readout component at the tapped outputs."""
    k_out = r.shape[1]
    taps = [t for call in calls for t in call.taps.values()]
    in_graph = [i for i, t in enumerate(taps) if t.edge is not None]
    found: list[Tensor | None] = [None] * len(taps)  # [K, n, *shape[1:]]
    if in_graph and r.requires_grad:
        for i, g in zip(in_graph, _backward(r, [taps[i].edge for i in in_graph])):
            found[i] = g
    flat = []
    for t, g in zip(taps, found):
        g = torch.zeros((k_out, *t.shape), dtype=t.dtype, device=t.device) if g is None else g
        flat.append(g.movedim(0, 1))  # a view: whoever needs [n, K, ...] contiguous copies it then
    out, i = [], 0
    for call in calls:
        out.append({name: flat[i + j] for j, name in enumerate(call.taps)})
        i += len(call.taps)
    return out


def _backward(r: Tensor, edges: list[GradientEdge]) -> list[Tensor | None]:
    """``[K, n, *shape[1:]]`` gradients of every component of the readout ``r [n, K]`` at `edges` (None: unused):
    one backward pass, batched over the K components (``is_grads_batched``: one GEMM of ``K·n`` rows per layer
    instead of K passes); an op without a batching rule for that falls back to one pass per component."""
    k_out = r.shape[1]
    if k_out == 1:
        return [None if g is None else g[None] for g in torch.autograd.grad(r.sum(), edges, allow_unused=True)]
    eye = torch.eye(k_out, dtype=r.dtype, device=r.device)[:, None, :].expand(k_out, *r.shape)
    try:
        return list(torch.autograd.grad(r, edges, eye, retain_graph=True, allow_unused=True, is_grads_batched=True))
    except RuntimeError:
        pass
    per_k = [torch.autograd.grad(r[:, k].sum(), edges, retain_graph=True, allow_unused=True) for k in range(k_out)]
    out: list[Tensor | None] = []
    for gs in zip(*per_k):
        used = next((g for g in gs if g is not None), None)
        out.append(None if used is None else torch.stack([torch.zeros_like(used) if g is None else g for g in gs]))
    return out
