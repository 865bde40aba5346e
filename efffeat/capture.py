"""Hooks that pull factored per-example gradients out of a network.

For every module with a factored rule (``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``,
`efffeat.nn.TransposedLinear`, and therefore the Linear/Embedding layers inside TransformerLens bridges) a
forward hook records the layer input and adds a zero "probe" tensor to the layer output; the gradient of the
readout with respect to that probe is the output cotangent δ of every example at once. A layer's
per-example gradient is then built from (input, δ) by the rule — an outer product for dense layers.

Forward-mode tangents: when the parameters are dual tensors (``torch.autograd.forward_ad``) with tangent Δθ,
the same pass yields the tangents ȧ and δ̇ along Δθ (forward-over-reverse), which is what the ``"nlo"``
effective features ``φ + ½ ψΔθ`` need — the Hessian ψ is never formed.

Parameters no rule covers fall back to per-example Jacobians by ``torch.func`` (`fallback_factors`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev, jvp, vmap
from torch.utils._pytree import tree_map

from ._data import Batch, batch_inputs, batch_len, slice_batch
from ._swap import ParameterSwap
from .factors import DenseFactor, Factor, LowRankFactor
from .nn import TransposedLinear
from .readout import Readout


class FallbackWarning(UserWarning):
    """A parameter's features are computed by the slower ``torch.func`` per-example Jacobian fallback."""


# A rule term: ("lowrank", u [n, Ku, R, d0], v [n, Kv, R, d1]) or ("dense", g [n, K, numel]).
Term = tuple[str, Tensor, Tensor | None]


class _Rule:
    """How one module type turns (recorded input side, output cotangent δ) into per-parameter terms.

    `claims(module)` maps attribute names to the parameters the rule covers (`{}`: not handled);
    `record(module, args)` keeps what the rule needs from the input; `terms(module, rec, delta)` returns
    ``{attr: Term}`` with ``delta [n, K, *out_shape[1:]]``.
    """

    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        raise NotImplementedError

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> Tensor:
        return args[0]

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Term]:
        raise NotImplementedError


def _present(module: nn.Module, *attrs: str) -> dict[str, Tensor]:
    return {a: getattr(module, a) for a in attrs if isinstance(getattr(module, a, None), nn.Parameter)}


def _rows(t: Tensor, n: int, k: int, d: int) -> Tensor:
    """``[n, k, R, d]``: every leading position of a ``[n, (k,) ..., d]`` tensor becomes a rank term."""
    return t.reshape(n, k, -1, d)


class _LinearRule(_Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        return _present(module, "weight", "bias")

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Term]:
        n, k = delta.shape[:2]
        d_out, d_in = delta.shape[-1], rec.shape[-1]
        u = _rows(delta, n, k, d_out)
        out: dict[str, Term] = {"weight": ("lowrank", u, _rows(rec, n, 1, d_in))}
        if module.bias is not None:
            out["bias"] = ("dense", u.sum(dim=2), None)
        return out


class _TransposedLinearRule(_Rule):
    """``y = x Wᵀᵀ + b`` with W borrowed from another Linear: the gradient of W is ``a δᵀ`` (transposed)."""

    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        claimed = _present(module, "bias")
        claimed["source.weight"] = module.source.weight
        return claimed

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Term]:
        n, k = delta.shape[:2]
        d_out, d_in = delta.shape[-1], rec.shape[-1]
        v = _rows(delta, n, k, d_out)
        out: dict[str, Term] = {"source.weight": ("lowrank", _rows(rec, n, 1, d_in), v)}
        if module.bias is not None:
            out["bias"] = ("dense", v.sum(dim=2), None)
        return out


class _EmbeddingRule(_Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        if module.max_norm is not None:  # renormalises its weight in place: no clean derivative
            return {}
        return _present(module, "weight")

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Term]:
        n, k = delta.shape[:2]
        onehot = F.one_hot(rec.reshape(n, 1, -1), module.num_embeddings).to(delta.dtype)
        if module.padding_idx is not None:
            onehot[..., module.padding_idx] = 0
        return {"weight": ("lowrank", onehot, _rows(delta, n, k, delta.shape[-1]))}


class _LayerNormRule(_Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        return _present(module, "weight", "bias")

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> Tensor:
        x = args[0]
        dims = tuple(range(x.ndim - len(module.normalized_shape), x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).square().mean(dim=dims, keepdim=True)
        return (x - mean) / torch.sqrt(var + module.eps)

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Term]:
        n, k = delta.shape[:2]
        d = module.weight.numel() if module.weight is not None else rec[0].numel()
        dd = delta.reshape(n, k, -1, d)
        out: dict[str, Term] = {}
        if module.weight is not None:
            out["weight"] = ("dense", (dd * rec.reshape(n, 1, -1, d)).sum(dim=2), None)
        if module.bias is not None:
            out["bias"] = ("dense", dd.sum(dim=2), None)
        return out


class _BridgeNormRule(_Rule):
    """TransformerLens's ``NormalizationBridge``: it normalises in Python and applies the wrapped
    LayerNorm/RMSNorm's ``weight`` (optionally as ``1 + weight``) and ``bias`` itself."""

    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        if module.use_native_layernorm_autograd or getattr(module.config, "layer_norm_folding", False):
            return {}  # the wrapped nn.LayerNorm runs, and its own rule applies
        comp = module.original_component
        return {f"original_component.{a}": p for a, p in _present(comp, "weight", "bias").items()}

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> Tensor:
        x = args[0]
        if not module.uses_rms_norm:
            x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + getattr(module.config, "eps", 1e-5)).sqrt()

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Term]:
        n, k, d = delta.shape[0], delta.shape[1], delta.shape[-1]
        dd = delta.reshape(n, k, -1, d)
        return {
            "original_component.weight": ("dense", (dd * rec.reshape(n, 1, -1, d)).sum(dim=2), None),
            "original_component.bias": ("dense", dd.sum(dim=2), None),
        }


_RULES: dict[type, _Rule] = {
    nn.Linear: _LinearRule(),
    TransposedLinear: _TransposedLinearRule(),
    nn.Embedding: _EmbeddingRule(),
    nn.LayerNorm: _LayerNormRule(),
}


# Rules for classes of optional packages, by qualified name (so that those packages are never imported here).
_RULES_BY_NAME: dict[str, _Rule] = {
    "transformer_lens.model_bridge.generalized_components.normalization.NormalizationBridge": _BridgeNormRule(),
}


def rule_for(module: nn.Module) -> _Rule | None:
    """The factored rule for a module's exact type (subclasses may change the forward: no rule)."""
    cls = type(module)
    return _RULES.get(cls) or _RULES_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")


@dataclass
class HookedLayer:
    """A module with a factored rule, and the model parameters (by name) its terms belong to."""

    path: str
    module: nn.Module
    rule: _Rule
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


def _tangent(t: Tensor) -> tuple[Tensor, Tensor | None]:
    primal, tangent = fwAD.unpack_dual(t)
    return primal.detach(), None if tangent is None else tangent.detach()


def _combine(kind: str, a: Tensor, b: Tensor | None, nlo: bool) -> Factor:
    """The factor of one term; with ``nlo`` the term's tensors are duals and the result is ``T + ½ Ṫ``."""
    if kind == "dense":
        g, g_dot = _tangent(a)
        return DenseFactor(g if not nlo or g_dot is None else g + 0.5 * g_dot)
    assert b is not None
    u, u_dot = _tangent(a)
    v, v_dot = _tangent(b)
    if not nlo or (u_dot is None and v_dot is None):
        return LowRankFactor(u, v)
    if u_dot is None:
        return LowRankFactor(u, v + 0.5 * v_dot)
    if v_dot is None:
        return LowRankFactor(u + 0.5 * u_dot, v)
    # (u + ½u̇) ⊗ v + u ⊗ ½v̇: the rank-2 NLO factor of a dense layer
    return LowRankFactor.cat_rank([LowRankFactor(u + 0.5 * u_dot, v), LowRankFactor(u, 0.5 * v_dot)])


def _add(acc: dict[str, list[Factor]], name: str, f: Factor) -> None:
    acc.setdefault(name, []).append(f)


def sum_factors(parts: list[Factor]) -> Factor:
    """One factor for the sum of several (uses of a tied weight, nodes of a quadrature...)."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, LowRankFactor) for p in parts):
        return LowRankFactor.cat_rank(parts)  # type: ignore[arg-type]
    return DenseFactor(torch.stack([p.to_dense().g for p in parts]).sum(0))


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
    records: list[tuple[HookedLayer, Tensor, Tensor]] = []
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
            output = swap.call(params, batch_inputs(batch))
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
                for attr, (kind, a, b) in layer.rule.terms(layer.module, rec, delta).items():
                    if attr in layer.params:
                        _add(acc, layer.params[attr], _combine(kind, a, b, tangent is not None))
            r_primal = fwAD.unpack_dual(r).primal.detach()
    finally:
        for h in handles:
            h.remove()
    factors = {name: sum_factors(parts) for name, parts in acc.items() if name not in non_batched}
    return BatchCapture(factors, r_primal, non_batched)


def fallback_factors(
    swap: ParameterSwap,
    names: list[str],
    params: dict[str, Tensor],
    batch: Batch,
    readout: Readout,
    tangent: dict[str, Tensor] | None = None,
    chunk: int = 32,
) -> dict[str, DenseFactor]:
    """Per-example Jacobians of the readout w.r.t. the parameters `names`, by ``torch.func``.

    ``vmap(jacrev)`` over examples of the model called with swapped-in parameters, `chunk` examples at a
    time; with `tangent`, the ``"nlo"`` features ``J + ½ d/dε J(θ + εΔθ)`` via one ``jvp`` of the Jacobian computation.
    Returns ``{name: DenseFactor [n, K, numel]}``.
    """
    n = batch_len(batch)

    def jac(all_params: dict[str, Tensor], sub: Batch) -> dict[str, Tensor]:
        fb = {k: all_params[k] for k in names}
        rest = {k: v for k, v in all_params.items() if k not in fb}

        def one(p_fb: dict[str, Tensor], example: Batch) -> Tensor:
            ex = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
            out = swap.call({**rest, **p_fb}, batch_inputs(ex))
            return readout(out, ex)[0]  # [K]

        return vmap(jacrev(one), in_dims=(None, 0))(fb, sub)  # name -> [m, K, *shape]

    parts: dict[str, list[Tensor]] = {k: [] for k in names}
    for s in range(0, n, chunk):
        sub = slice_batch(batch, slice(s, s + chunk))
        if tangent is None:
            j = jac(params, sub)
        else:
            j0, j_dot = jvp(lambda p, sub=sub: jac(p, sub), (params,), (tangent,))
            j = {k: j0[k] + 0.5 * j_dot[k] for k in names}
        for k in names:
            parts[k].append(j[k].reshape(j[k].shape[0], j[k].shape[1], -1).detach())
    return {k: DenseFactor(torch.cat(v)) for k, v in parts.items()}


def warn_fallback(model: nn.Module, names: list[str], reason: str) -> None:
    """One line naming the modules whose parameters use the ``torch.func`` fallback."""
    owners: dict[str, list[str]] = {}
    modules = dict(model.named_modules())
    for name in names:
        path = name.rsplit(".", 1)[0] if "." in name else ""
        kind = type(modules.get(path, model)).__name__
        owners.setdefault(f"{path or '<root>'} ({kind})", []).append(name.rsplit(".", 1)[-1])
    listed = "; ".join(f"{m}: {', '.join(p)}" for m, p in owners.items())
    warnings.warn(
        f"efffeat: {reason} — per-example torch.func Jacobians (slower, exact) for {listed}",
        FallbackWarning,
        stacklevel=3,
    )
