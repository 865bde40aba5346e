"""`DualModel`: a trained network, its initialisation and a readout, seen as a regression on features.

``f(x; θ*) = f(x; θ0) + Σ_μ Δθ_μ φ^E_μ(x)`` with weights Δθ = θ* − θ0 and effective features φ^E of the
chosen order (docs/MATH.md §2):

======== ============================================= ==================================
order    φ^E_μ(x)                                      completeness error
======== ============================================= ==================================
init     φ_μ(x; θ0)  (NTK features)                     O(Δθ²)
nlo      φ_μ(x; θ0) + ½ Σ_ν ψ_μν(x) Δθ_ν                O(Δθ³); exact for quadratic models
trained  φ_μ(x; θ*)  (after-kernel)                     O(Δθ²)
path     ∫₀¹ φ_μ(x; θ0 + tΔθ) dt, Gauss–Legendre        quadrature error only
======== ============================================= ==================================
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jvp
from tqdm.auto import tqdm

from ._autodiff import autodiff_context
from ._data import as_batches, batch_inputs, batch_len, batch_to, check_finite_inputs, slice_batch
from ._swap import ParameterSwap
from .capture import Support, capture_batch, check_refusals, hooked_layers, support
from .errors import (
    ConfigError,
    DataError,
    EfffeatError,
    InitStateError,
    NonFiniteError,
    UnsupportedModelError,
)
from .factors import DenseFactor, Factor, compact, sum_factors
from .features import EffectiveFeatures
from .groups import n_heads_of
from .ids import FeatureIds, ParamSlot
from .readout import Readout, ReadoutSpec
from .rules import Fallback, batch_gradient, describe_reasons

ORDERS = ("init", "nlo", "trained", "path")
FAIL_MODES = ("fallback", "error")

# Modules whose train-mode forward is random or couples the examples of a batch.
_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def gauss_legendre(nodes: int) -> tuple[list[float], list[float]]:
    """Nodes and weights of ``nodes``-point Gauss–Legendre quadrature on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    return [float((xi + 1) / 2) for xi in x], [float(wi / 2) for wi in w]


def state_names(model: nn.Module) -> dict[str, str]:
    """``{named_parameters() name: state_dict() key}``, matched by tensor identity.

    They differ for TransformerLens bridges (``layers.0._original_component.…`` vs ``blocks.0.attn.q.weight``).
    """
    by_id = {id(v): k for k, v in model.state_dict(keep_vars=True).items()}
    return {n: by_id.get(id(p), n) for n, p in model.named_parameters()}


def init_parameters(model: nn.Module, init: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """θ0 by ``named_parameters()`` name, from the state dict saved at initialisation; checked against the model
    (missing or extra keys, shapes) and cast to each parameter's dtype and device."""
    trained = {n: p.detach() for n, p in model.named_parameters()}
    return _match_init(init, trained, state_names(model), set(model.state_dict()))


class DualModel:
    """A trained network as the dual regression model on its effective features.

    Args:
        model: the trained network (any ``nn.Module``); its parameters are θ*. It is not modified.
        init: its ``state_dict()`` at initialisation, θ0 (state_dict keys; named_parameters names work too).
        readout: ``"output"``, an output index, or ``callable(output, batch) -> [N] | [N, K]`` (`Readout`).
        order: ``"init" | "nlo" | "trained" | "path"``.
        nodes: Gauss–Legendre nodes for ``"path"``.
        dtype: compute in this dtype (e.g. ``torch.float64`` for validation) on a copy of the model.
        progress: tqdm progress bars over batches.
        fallback_chunk: examples per ``torch.func`` Jacobian chunk for parameters without a factored rule
            (None: as many as a share of the available memory holds).
        fail_mode: ``"fallback"`` computes parameters no rule covers by exact per-example Jacobians (with a
            `FallbackWarning` naming the modules); ``"error"`` refuses them with `UnsupportedModelError`.
            `DualModel.supported(model)` lists, before any run, which parameters are factored.

    Example::

        dual = ef.DualModel(model, init=init_state, readout="output", order="nlo")
        feats = dual.features(x)           # EffectiveFeatures, factored
        dual.completeness(x)               # relative residual of the dual model
    """

    def __init__(
        self,
        model: nn.Module,
        init: Mapping[str, Tensor],
        readout: ReadoutSpec = "output",
        order: str = "nlo",
        nodes: int = 4,
        dtype: torch.dtype | None = None,
        progress: bool = True,
        fallback_chunk: int | None = None,
        fail_mode: str = "fallback",
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_order(order)
        if fail_mode not in FAIL_MODES:
            raise ConfigError(f"fail_mode must be one of {', '.join(repr(m) for m in FAIL_MODES)}, got {fail_mode!r}")
        if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
            raise ConfigError(f"nodes must be a positive integer (Gauss–Legendre nodes), got {nodes!r}")
        _check_deterministic(model)
        if dtype is not None:
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ConfigError(f"dtype must be a floating torch.dtype such as torch.float64, got {dtype!r}")
            try:
                model = copy.deepcopy(model).to(dtype)
            except RuntimeError as e:  # e.g. a module caching a tensor of an earlier autograd graph
                raise UnsupportedModelError(
                    f"cannot copy the model to compute in {dtype} ({e}); cast it yourself with "
                    f"model.to({dtype}) and pass dtype=None"
                ) from e
        params = dict(model.named_parameters())
        if not params:
            raise UnsupportedModelError("the model has no parameters, so it has no features")
        self.model = model
        self.swap = ParameterSwap(model)
        self.order = order
        self.nodes = nodes
        self.progress = progress
        self.fallback_chunk = fallback_chunk
        self.fail_mode = fail_mode
        self.readout = Readout(readout)
        self.state_names = state_names(model)
        self.theta_trained = {n: p.detach() for n, p in params.items()}
        _check_finite(self.theta_trained, "trained parameter", "check the training run (learning rate?)")
        self.theta_init = _match_init(init, self.theta_trained, self.state_names, set(model.state_dict()))
        _check_finite(self.theta_init, "init state entry", "pass the state_dict saved before training")
        self.delta = {n: self.theta_trained[n] - self.theta_init[n] for n in params}
        slots, offset = [], 0
        for n, p in params.items():
            slots.append(ParamSlot(n, self.state_names[n], tuple(p.shape), offset))
            offset += p.numel()
        self.ids = FeatureIds(slots)
        self._plan: tuple[list, list[str]] | None = None

    @staticmethod
    def supported(model: nn.Module) -> Support:
        """Which of `model`'s parameters a factored rule covers and which the exact fallback would compute.

        Nothing runs; the first batch of a run may still move a parameter used outside its own module to the
        fallback (see `Support`).
        """
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        return support(model)

    # ---- properties ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(iter(self.theta_trained.values())).device

    @property
    def dtype(self) -> torch.dtype:
        floats = [p.dtype for p in self.theta_trained.values() if p.is_floating_point()]
        return floats[0] if floats else torch.get_default_dtype()

    @property
    def n_features(self) -> int:
        return len(self.ids)

    @property
    def fallback_params(self) -> list[str]:
        """Parameters computed by the ``torch.func`` fallback (known after the first batch)."""
        return [] if self._plan is None else list(self._plan[1])

    def __repr__(self) -> str:
        return (
            f"DualModel({type(self.model).__name__}, order={self.order!r}, readout={self.readout.name!r}, "
            f"P={self.n_features:,}, |Δθ|={self.delta_norm():.4g})"
        )

    def flat_delta(self) -> Tensor:
        """``[P]`` Δθ in feature order."""
        return torch.cat([self.delta[s.name].reshape(-1) for s in self.ids.slots])

    def delta_norm(self) -> float:
        return float(math.sqrt(sum(float(d.square().sum()) for d in self.delta.values())))

    # ---- evaluation --------------------------------------------------------------------------------------
    def call(self, params: Mapping[str, Tensor], batch: Any) -> Any:
        """The model's output on a batch, computed with `params` (``{named_parameters name: tensor}``)."""
        return self.swap.call(params, batch_inputs(batch))

    def _readouts(self, batch: Any, at: tuple[str, ...] = ("init", "trained")) -> dict[str, Tensor]:
        """``{point: [n, K]}`` readouts at ``"init"`` (θ0) and/or ``"trained"`` (θ*).

        The model's own error becomes a `DataError`; a non-finite readout a `NonFiniteError`.
        """
        out = {}
        with torch.no_grad():
            for point in at:
                params = self.theta_init if point == "init" else self.theta_trained
                try:
                    output = self.call(params, batch)
                except EfffeatError:
                    raise
                except Exception as e:  # the model's own message, whatever its type
                    x = batch_inputs(batch)
                    raise DataError(
                        f"the model rejected a batch of inputs with shape {tuple(x.shape)} and dtype {x.dtype}: "
                        f"{type(e).__name__}: {e}"
                    ) from e
                out[point] = _finite_readout(self.readout(output, batch), point)
        return out

    def _prepare(self, batch: Any, offset: int) -> Any:
        batch = batch_to(batch, self.device, self.dtype)
        check_finite_inputs(batch, offset)
        return batch

    def _batches(self, data: Any, batch_size: int, desc: str, progress: bool | None = None):
        batches = as_batches(data, batch_size)
        offset = 0
        for batch in tqdm(
            batches,
            total=batches.n_batches,
            desc=desc,
            disable=None if (self.progress if progress is None else progress) else True,
            leave=False,
        ):
            batch = self._prepare(batch, offset)
            n = batch_inputs(batch).shape[0]
            if n == 0:
                continue
            yield batch
            offset += n
        if offset == 0:
            raise DataError("data is empty; pass at least one example")

    def points(self, order: str | None = None) -> list[tuple[dict[str, Tensor], float, dict[str, Tensor] | None]]:
        """The (parameters, weight, tangent) evaluations whose weighted sum is the order's features."""
        order = _check_order(order or self.order)
        if order == "init":
            return [(self.theta_init, 1.0, None)]
        if order == "trained":
            return [(self.theta_trained, 1.0, None)]
        if order == "nlo":
            return [(self.theta_init, 1.0, self.delta)]
        ts, ws = gauss_legendre(self.nodes)
        return [({n: self.theta_init[n] + t * d for n, d in self.delta.items()}, w, None) for t, w in zip(ts, ws)]

    # ---- features ----------------------------------------------------------------------------------------
    def features(self, data: Any, batch_size: int = 256, order: str | None = None) -> EffectiveFeatures:
        """Effective features of `data` (tensor, ``(inputs, targets)`` tuple, or iterable of batches).

        order: overrides the model's order for this call.
        """
        return EffectiveFeatures.concat(list(self.iter_features(data, batch_size, order)), consume=True)

    def iter_features(
        self, data: Any, batch_size: int = 256, order: str | None = None, progress: bool | None = None
    ) -> Iterator[EffectiveFeatures]:
        """The effective features of `data` one batch at a time (for streaming work such as top-k search).

        progress: overrides the model's progress setting for this pass.
        """
        order = _check_order(order or self.order)
        meta = {
            "nodes": self.nodes,
            "readout": self.readout.name,
            "n_heads": n_heads_of(self.model),
        }
        # the readout at the first evaluation point comes with the capture; the others take one forward each
        captured = {"init": "init", "nlo": "init", "trained": "trained"}.get(order)
        for batch in self._batches(data, batch_size, f"features ({order})", progress):
            z = self._readouts(batch, tuple(p for p in ("init", "trained") if p != captured))
            layers, fallback = self._ensure_plan(batch)
            factors, z_first = self._batch_factors(batch, layers, fallback, order)
            if captured is not None:
                z[captured] = _finite_readout(z_first, captured)
            factors = {s.name: factors[s.name] for s in self.ids.slots}
            yield EffectiveFeatures(
                factors, self.ids, self.delta, z["init"], z["trained"], order, bool(self.readout.scalar), dict(meta)
            )

    def _batch_factors(
        self, batch: Any, layers: list, fallback: list[str], order: str
    ) -> tuple[dict[str, Factor], Tensor]:
        """The order's factors for one batch, and the ``[n, K]`` readout at its first evaluation point."""
        acc: dict[str, list[Factor]] = {}
        first: Tensor | None = None
        for params, weight, tangent in self.points(order):
            cap = capture_batch(self.swap, layers, params, batch, self.readout, tangent)
            first = cap.readout if first is None else first
            found = dict(cap.factors)
            if fallback:
                found.update(self._fallback(fallback, params, batch, tangent))
            for name, f in found.items():
                acc.setdefault(name, []).append(f.scaled(weight))
        assert first is not None
        return {name: compact(sum_factors(fs)) for name, fs in acc.items()}, first

    def _fallback(self, names: list[str], params, batch, tangent) -> dict[str, DenseFactor]:
        assert self._plan is not None and list(self._plan[1]) == list(names), "the plan's fallback (_ensure_plan)"
        return self._plan[1].factors(params, batch, tangent)

    def _ensure_plan(self, batch: Any) -> tuple[list, list[str]]:
        """Decide, on the first batch, which parameters the hooks cover exactly and which fall back.

        A parameter is factored when a rule claims it and the factored per-example gradients, summed over a
        few examples, equal autograd's gradient; anything else (no rule, a use outside the hooked layer, a
        module its parent never calls) goes to the exact per-example `Fallback`, which names the modules.
        """
        if self._plan is not None:
            return self._plan
        check_refusals(self.model)
        probe = slice_batch(batch, slice(0, 8))
        all_layers = hooked_layers(self.model, exclude=set())
        # distinct per-example weights: a layer that takes another axis for the examples' does not sum up right
        weights = torch.rand(batch_len(probe), generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
        true, r = batch_gradient(self.swap, self.readout, self.theta_trained, probe, weights)
        cap = capture_batch(self.swap, all_layers, self.theta_trained, probe, self.readout, plan=True)
        c = torch.zeros_like(r)
        c[:, 0] = weights.to(device=r.device, dtype=r.dtype)
        rtol = 1e-9 if self.dtype == torch.float64 else 2e-4
        total = math.sqrt(sum(float(g.square().sum()) for g in true.values()))
        mismatched = set()
        for name, f in cap.factors.items():
            got, want = f.rmatvec(c).detach(), true[name].reshape(-1)
            if float((got - want).norm()) > rtol * (float(want.norm()) + float(got.norm()) + total) + 1e-30:
                mismatched.add(name)
        claimed = {name for layer in all_layers for name in layer.params.values()}
        reasons = {}
        for name in self.theta_trained:
            if name in mismatched:
                reasons[name] = (
                    "its factored gradient differs from autograd's: the parameter is also used outside the layer "
                    "that holds it, or the module's forward is not the one its rule knows"
                )
            elif name in cap.factors:
                continue
            elif name not in claimed:
                reasons[name] = "no factored rule for the module type"
            elif name in cap.non_batched:
                reasons[name] = "the layer's output has no per-example leading axis"
            else:
                reasons[name] = "the module is not called as a module (its parent uses the parameter itself)"
        if self.fail_mode == "error" and reasons:
            raise UnsupportedModelError(
                f"{describe_reasons(self.model, reasons)} (fail_mode='error'); register a rule with "
                "@ef.register_rule(ModuleType), or pass fail_mode='fallback' for exact per-example Jacobians"
            )
        fallback = Fallback(self.swap, self.readout, reasons, self.fallback_chunk)
        self._plan = (hooked_layers(self.model, exclude=set(fallback)), fallback)
        return self._plan

    # ---- the dual model through directional derivatives -----------------------------------------------
    def linear_term(self, batch: Any, order: str | None = None) -> Tensor:
        """``[n, K]``: ``Σ_μ Δθ_μ φ^E_μ(x)`` for one prepared batch, by forward-mode directional derivatives.

        Independent of the factored capture: ``init``/``trained`` are one jvp, ``nlo`` adds ½ the second
        directional derivative (a jvp of a jvp), ``path`` is the quadrature of jvps.
        """
        return self.directional(batch, self.delta, order)

    def directional(self, batch: Any, direction: Mapping[str, Tensor], order: str | None = None) -> Tensor:
        """``[n, K]``: ``Σ_μ w_μ φ^E_μ(x)`` for a parameter-space `direction` w (``{name: tensor}``).

        The ``nlo`` features are ``φ + ½ ψΔθ``, so their directional derivative is ``φ·w + ½ wᵀψΔθ``: a jvp along w
        plus half a jvp along Δθ of that jvp. Differentiable with respect to the batch's inputs.
        """
        order = _check_order(order or self.order)
        direction = dict(direction)

        def f(p: dict[str, Tensor]) -> Tensor:
            with autodiff_context(self.model, forward_ad=True, what=f"the {order} dual model by forward mode"):
                return self.readout(self.call(p, batch), batch)

        def along_w(p: dict[str, Tensor]) -> Tensor:
            return jvp(f, (p,), (direction,))[1]

        if order == "nlo":
            return along_w(self.theta_init) + 0.5 * jvp(along_w, (self.theta_init,), (self.delta,))[1]
        return sum(w * along_w(p) for p, w, _ in self.points(order))

    def predict(self, data: Any, batch_size: int = 256, order: str | None = None) -> Tensor:
        """``[N(, K)]``: the dual model's prediction ``f(x; θ0) + Σ_μ Δθ_μ φ^E_μ(x)``."""
        out = []
        for batch in self._batches(data, batch_size, "predict"):
            z_init = self._readouts(batch, ("init",))["init"]
            out.append((z_init + self.linear_term(batch, order)).detach())
        return _squeeze(torch.cat(out), self.readout.scalar)

    def outputs(self, data: Any, at: str = "trained", batch_size: int = 256) -> Tensor:
        """``[N(, K)]``: the readout of the network at ``"trained"`` (θ*) or ``"init"`` (θ0)."""
        if at not in ("trained", "init"):
            raise ConfigError(f"at must be 'trained' or 'init', got {at!r}")
        out = [self._readouts(b, (at,))[at] for b in self._batches(data, batch_size, "outputs")]
        return _squeeze(torch.cat(out), self.readout.scalar)

    def completeness(self, data: Any, batch_size: int = 256, order: str | None = None) -> float:
        """Relative residual ``‖Σ_μ Δθ_μ φ^E_μ − Δz‖ / ‖Δz‖`` of the dual model over `data`."""
        res2 = scale2 = 0.0
        for batch in self._batches(data, batch_size, "completeness"):
            z = self._readouts(batch)
            dz = z["trained"] - z["init"]
            res2 += float((self.linear_term(batch, order).detach() - dz).square().sum())
            scale2 += float(dz.square().sum())
        if scale2 == 0:
            return 0.0 if res2 == 0 else math.inf
        return math.sqrt(res2 / scale2)



def _finite_readout(z: Tensor, point: str) -> Tensor:
    bad = ~torch.isfinite(z).all(dim=1)
    if bool(bad.any()):
        raise NonFiniteError(
            f"the readout at {point} ({'θ0' if point == 'init' else 'θ*'}) is NaN or inf for {int(bad.sum())} "
            f"example(s) of a batch of {len(z)} (first: example {int(torch.nonzero(bad)[0])} of the batch) although "
            "the inputs are finite; the model output overflowed or the readout is undefined there (log of 0?)"
        )
    return z


def _squeeze(t: Tensor, scalar: bool | None) -> Tensor:
    return t.squeeze(1) if scalar else t



def _check_order(order: str) -> str:
    if order not in ORDERS:
        raise ConfigError(f"unknown order {order!r}; choose one of {', '.join(repr(o) for o in ORDERS)}")
    return order


def _check_deterministic(model: nn.Module) -> None:
    if not model.training:
        return
    bad = [n or "<root>" for n, m in model.named_modules() if isinstance(m, _STOCHASTIC) and m.training]
    if bad:
        raise UnsupportedModelError(
            f"the model is in training mode and has layers that are random or mix the examples of a batch "
            f"({', '.join(bad[:5])}); features must be deterministic per example: call model.eval() first"
        )


def _check_finite(params: Mapping[str, Tensor], what: str, fix: str) -> None:
    for n, p in params.items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise NonFiniteError(f"{what} {n!r} holds {bad} NaN/inf value(s); {fix}")


def _match_init(
    init: Mapping[str, Tensor], trained: dict[str, Tensor], names: dict[str, str], state_keys: set[str]
) -> dict[str, Tensor]:
    """θ0 by named_parameters name, from a state dict keyed by state_dict (or named_parameters) names."""
    if not isinstance(init, Mapping):
        raise InitStateError(
            f"init must be the model's state_dict at initialisation (a mapping), got {type(init).__name__}; "
            "save it before training with {k: v.clone() for k, v in model.state_dict().items()}"
        )
    by_state = {s: n for n, s in names.items()}
    out: dict[str, Tensor] = {}
    for key, value in init.items():
        name = by_state.get(key, key if key in trained else None)
        if name is not None:
            out[name] = value
    extra = [k for k in init if k not in state_keys and k not in trained]
    if extra:
        shown = ", ".join(repr(k) for k in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise InitStateError(
            f"the init state has keys the model does not have: {shown}; pass the state_dict of this "
            "same architecture saved at initialisation"
        )
    missing = [names[n] for n in trained if n not in out]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InitStateError(
            f"the init state has no entry for {shown}; pass the full model.state_dict() saved at "
            "initialisation (efffeat needs θ0 for every parameter)"
        )
    for n, value in out.items():
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(trained[n].shape):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise InitStateError(
                f"init entry {names[n]!r} has shape {got} but the model's parameter has "
                f"{tuple(trained[n].shape)}; the init state belongs to a different architecture"
            )
    return {n: out[n].detach().to(device=trained[n].device, dtype=trained[n].dtype) for n in trained}
