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

``order="auto"`` (the default) picks one of them on the first data: ``nlo`` where it explains the trained
change, else ``path`` with as many nodes as it needs.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jvp
from tqdm.auto import tqdm

from . import _memory
from ._autodiff import ModelRaised, autodiff_context
from ._check import one_of
from ._data import (
    _leaves,
    as_batches,
    batch_len,
    batch_to,
    call_model,
    check_finite_inputs,
    describe_batch,
    slice_batch,
)
from ._swap import Forward, ParameterSwap
from .capture import Support, capture_batch, hooked_layers, support
from .errors import (
    ConfigError,
    DataError,
    EfffeatError,
    InitStateError,
    MemoryBudgetError,
    NonFiniteError,
    ReadoutError,
    UnsupportedModelError,
)
from .factors import DenseFactor, Factor, compact, sum_factors
from .features import ORDERS, EffectiveFeatures
from .groups import n_heads_of
from .ids import FeatureIds, ParamSlot
from .readout import Readout, ReadoutSpec
from .rules import Fallback, batch_gradient, describe, describe_reasons

AUTO = "auto"
FAIL_MODES = ("fallback", "error")
NEEDS = ("all", "features")
# What θ0 is (`DualModel.init_kind`): the network's own random initialisation, pretrained weights that were
# fine-tuned, or any other parameter setting (e.g. a re-initialised copy) — in a few words, and the note every
# result carries (None: nothing to say).
_INIT_KINDS: dict[str, tuple[str, str | None]] = {
    "initialisation": ("the network's random initialisation (Δθ is what training learned)", None),
    "pretrained": (
        "pretrained weights, then fine-tuned (Δθ is what fine-tuning changed)",
        "θ0 is a pretrained network, not a random initialisation: Δθ = θ* − θ0 and the effective features describe "
        "what fine-tuning changed, not what pretraining learned",
    ),
    "other": (
        "another parameter setting, not the network's initialisation (Δθ is not a training run)",
        "θ0 is not the network's initialisation (init_kind='other'): Δθ = θ* − θ0 is a difference between two "
        "parameter settings, not a training run, and the features explain that difference only",
    ),
}
INIT_KINDS = tuple(_INIT_KINDS)

# order="auto": nlo when its completeness residual is at most this on the first batch, else path with nodes
# added (from `nodes`, along _AUTO_NODES) until the residual is at most AUTO_PATH_RESIDUAL.
AUTO_NLO_RESIDUAL = 0.1
AUTO_PATH_RESIDUAL = 1e-3
AUTO_MAX_NODES = 16
_AUTO_NODES = (2, 3, 4, 6, 8, 12, 16)
# A result whose completeness residual exceeds this gets a `CompletenessWarning`.
WARN_RESIDUAL = 0.5
# The determinism probe and the auto decision look at this many examples of the first batch.
PROBE_EXAMPLES = 256

# the readout that comes with the capture at an order's first evaluation point (path has none: interior nodes)
_CAPTURED = {"init": "init", "nlo": "init", "trained": "trained"}


class CompletenessWarning(UserWarning):
    """The features of the order used explain less than half of the trained change (residual > 0.5)."""


class PrecisionWarning(UserWarning):
    """The model computes below float32: features, kernels and completeness carry its rounding errors."""


class Point(NamedTuple):
    """One evaluation of the features: parameters, quadrature weight, forward-mode tangent, buffers."""

    params: dict[str, Tensor]
    weight: float
    tangent: dict[str, Tensor] | None
    buffers: dict[str, Tensor] | None  # the init state's buffers at θ0; None: the model's own


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
        model: the trained network (any ``nn.Module``); its parameters are θ*, read when the `DualModel` is
            built. efffeat never changes it: its parameters, buffers, ``requires_grad`` flags, per-module
            train/eval modes and hooks are the same after every call, also after an error.
        init: its ``state_dict()`` at initialisation, θ0 (state_dict keys; named_parameters names work too).
            Its buffers (e.g. batch norm running statistics) are used wherever the model is evaluated at θ0;
            buffers it lacks are taken from the model.
        readout: ``"output"``, an output index, or ``callable(output, batch) -> [N] | [N, K]`` (`Readout`).
        order: ``"auto"`` (default), ``"init"``, ``"nlo"``, ``"trained"`` or ``"path"``. ``"auto"`` is decided on
            the first batch of the first data the model sees (a feature pass, `completeness`, `predict` or
            `resolve_order`): it measures the ``nlo`` completeness residual on up to 256 examples by directional
            derivatives and keeps ``nlo`` when the residual is ≤ 0.1, else takes ``path`` with nodes added (from
            `nodes`: 4, 6, 8, 12, 16) until the residual is ≤ 1e-3. Afterwards `order` and `nodes` hold the
            choice and `order_reason`, `order_completeness` say why. The decision costs two forward passes and
            one nested jvp on those examples, plus one jvp per node of each path tried.
        nodes: Gauss–Legendre nodes for ``"path"`` (for ``"auto"``: the first number tried).
        dtype: compute in this dtype (e.g. ``torch.float64`` for validation) on a copy of the model. A model
            below float32 gets a `PrecisionWarning` (and `precision_note`).
        progress: tqdm progress bars over batches.
        fallback_chunk: examples per ``torch.func`` Jacobian chunk for parameters without a factored rule
            (None: as many as a share of the available memory holds).
        fail_mode: ``"fallback"`` computes parameters no rule covers by exact per-example Jacobians (with a
            `FallbackWarning` naming the modules); ``"error"`` refuses them with `UnsupportedModelError`.
            `DualModel.supported(model)` lists, before any run, which parameters are factored.
        init_kind: what `init` is: ``"initialisation"`` (default: the network's own random initialisation, so
            Δθ is what training learned), ``"pretrained"`` (pretrained weights that were then fine-tuned: Δθ is
            what the fine-tuning changed, and the features say nothing of what pretraining learned) or
            ``"other"`` (any other parameter setting, e.g. a re-initialised copy: Δθ is a difference between two
            networks, not a training run). Anything but the default puts `init_note` in every result
            (``meta["init_kind"]``, `Analysis.notes`, the report).
        forward: ``callable(model, batch) -> output`` for batches the default convention does not cover. By
            default a tensor batch is ``model(x)``, a tuple/list ``(inputs, targets, ...)`` is ``model(inputs)``
            and a dict is ``model(**batch)`` (the Hugging Face way); the readout always gets the whole batch.

    The model must be a deterministic function of each example: layers that are random or mix the examples of a
    batch (dropout or batch norm in training mode, batch norm without running statistics, ...) are refused with
    `UnsupportedModelError` before anything runs, and the first batch is evaluated twice and split in two halves
    of a shuffled copy, so that any other randomness or coupling is refused naming the module responsible.
    θ* and Δθ are read when the `DualModel` is built: a later change of the model's parameters or buffers (one
    more optimiser step) is refused at the next call with `ConfigError` — build a new `DualModel` then.

    Every feature pass carries the completeness residual of its order in ``meta["completeness"]``; above 0.5 a
    `CompletenessWarning` (once per order) names the order that would explain the network.

    Example::

        dual = ef.DualModel(model, init=init_state, readout="output")   # order="auto"
        feats = dual.features(x)           # EffectiveFeatures, factored
        dual.order, dual.order_reason      # e.g. 'path', 'auto: the nlo residual 0.43 > 0.1 ...'
        feats.meta["completeness"]         # relative residual of the dual model on x

    A Hugging Face model takes its batches as dicts (eager attention: sdpa has no forward-mode derivative, which
    ``"nlo"``, ``"auto"`` and `completeness` need; position ids given per example keep the position embedding
    factored)::

        config._attn_implementation = "eager"
        model = transformers.BertModel(config).eval()
        dual = ef.DualModel(model, init, readout=lambda out, batch: out.pooler_output)
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                 "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
        feats = dual.features(batch)       # the mask reaches the model: model(**batch)
    """

    def __init__(
        self,
        model: nn.Module,
        init: Mapping[str, Tensor],
        readout: ReadoutSpec = "output",
        order: str = AUTO,
        nodes: int = 4,
        dtype: torch.dtype | None = None,
        progress: bool = True,
        fallback_chunk: int | None = None,
        fail_mode: str = "fallback",
        forward: Forward | None = None,
        init_kind: str = "initialisation",
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_order(order, allow_auto=True)
        if fail_mode not in FAIL_MODES:
            raise ConfigError(f"fail_mode must be one of {', '.join(repr(m) for m in FAIL_MODES)}, got {fail_mode!r}")
        if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
            raise ConfigError(f"nodes must be a positive integer (Gauss–Legendre nodes), got {nodes!r}")
        if forward is not None and not callable(forward):
            raise ConfigError(f"forward must be a callable(model, batch) -> output, got {type(forward).__name__}")
        one_of("init_kind", init_kind, INIT_KINDS)
        _check_modes(model)
        self._user_model = model
        copied = dtype is not None
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
        self.n_heads = n_heads_of(model)  # attention heads per layer, for head groups (None: not one number)
        self.forward = forward
        self.swap = ParameterSwap(model, forward)
        self.requested_order = order
        self.order = order
        self.nodes = nodes
        self.order_reason: str | None = None if order == AUTO else f"order={order!r} set on the DualModel"
        self.order_completeness: float | None = None
        self.progress = progress
        self.fallback_chunk = fallback_chunk
        self.fail_mode = fail_mode
        self.readout = Readout(readout)
        self.state_names = state_names(model)
        # θ* is a snapshot (the copy's own tensors when copied): nothing evaluated later writes to the user's tensors
        self.theta_trained = {n: p.detach() if copied else p.detach().clone() for n, p in params.items()}
        _check_finite(self.theta_trained, "trained parameter", "check the training run (learning rate?)")
        self.theta_init = _match_init(init, self.theta_trained, self.state_names, set(model.state_dict()))
        _check_finite(self.theta_init, "init state entry", "pass the state_dict saved before training")
        self.buffers_init = _init_buffers(init, model)
        self.delta = {n: self.theta_trained[n] - self.theta_init[n] for n in params}
        slots, offset = [], 0
        for n, p in params.items():
            slots.append(ParamSlot(n, self.state_names[n], tuple(p.shape), offset))
            offset += p.numel()
        self.ids = FeatureIds(slots)
        self.init_kind = init_kind
        self.init_what, self.init_note = _INIT_KINDS[init_kind]
        self.precision_note = _precision_note(self.dtype)
        if self.precision_note is not None:
            warnings.warn(f"efffeat: {self.precision_note}", PrecisionWarning, stacklevel=2)
        self._plan: tuple[list, list[str]] | None = None
        self._fingerprint = _fingerprint(self._user_model)
        self._handles = _handles(self._user_model)
        self._probed: tuple[bool, ...] | None = None  # the modes under which the determinism probe passed
        self._warned: set[tuple[str, int | None]] = set()
        self._activations: tuple[float, int] | None = None  # (activation entries per example, K) for batch sizes

    @property
    def notes(self) -> list[str]:
        """What a reader of any result of this model should know: θ0 is not a random initialisation
        (`init_note`), the model computes below float32 (`precision_note`)."""
        return [note for note in (self.init_note, self.precision_note) if note]

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

    # ---- the order -----------------------------------------------------------------------------------------
    def resolve_order(self, data: Any, batch_size: int | None = None) -> str:
        """The order, deciding ``"auto"`` on the first batch of `data` now if no data has decided it yet."""
        if self.order == AUTO:
            for index, offset, batch in self._batches(data, batch_size, "order"):
                with _on_batch(index, offset, batch):
                    self._decide_order(batch, offset)
                break
        return self.order

    def _order_for(self, order: str | None, batch: Any, offset: int) -> tuple[str, int, str]:
        """(order, nodes, reason) of one call: `order` when given, else the model's (deciding ``"auto"``)."""
        if order is not None:
            return _check_order(order), self.nodes, f"order={order!r} passed to this call"
        if self.order == AUTO:
            self._decide_order(batch, offset)
        assert self.order_reason is not None
        return self.order, self.nodes, self.order_reason

    def _explicit_order(self, order: str | None) -> str:
        """`order`, or the model's when it is decided; ``"auto"`` before any data is refused."""
        order = order or self.order
        if order == AUTO:
            raise ConfigError(
                "order='auto' is decided on the first data: call dual.resolve_order(data) (or any feature pass) "
                "first, or pass order= one of " + ", ".join(repr(o) for o in ORDERS)
            )
        return _check_order(order)

    def _decide_order(self, batch: Any, offset: int) -> None:
        """Resolve ``"auto"`` on (the first `PROBE_EXAMPLES` examples of) a prepared batch."""
        probe = slice_batch(batch, slice(0, PROBE_EXAMPLES))
        n = batch_len(probe)
        z = self._readouts(probe, offset)
        dz = z["trained"] - z["init"]

        def residual(order: str, nodes: int) -> float:
            return _relative(self._directional(probe, self.delta, order, nodes).detach() - dz, dz)

        r_nlo = residual("nlo", self.nodes)
        where = f"on the first {n} example{'s' if n > 1 else ''}"
        if r_nlo <= AUTO_NLO_RESIDUAL:
            self.order, self.order_completeness = "nlo", r_nlo
            self.order_reason = f"auto: the nlo residual {r_nlo:.3g} ≤ {AUTO_NLO_RESIDUAL:g} {where}"
            return
        tried: list[tuple[int, float]] = []
        for nodes in [k for k in _AUTO_NODES if k >= self.nodes] or [self.nodes]:
            tried.append((nodes, residual("path", nodes)))
            if tried[-1][1] <= AUTO_PATH_RESIDUAL:
                break
        nodes, r_path = tried[-1]
        steps = ", ".join(f"{k} node{'s' if k > 1 else ''} {r:.3g}" for k, r in tried)
        verdict = f"≤ {AUTO_PATH_RESIDUAL:g}" if r_path <= AUTO_PATH_RESIDUAL else _slow_quadrature(tried)
        self.order, self.nodes, self.order_completeness = "path", nodes, r_path
        self.order_reason = (
            f"auto: the nlo residual {r_nlo:.3g} > {AUTO_NLO_RESIDUAL:g} {where}, so path ({steps}: {verdict})"
        )

    # ---- evaluation --------------------------------------------------------------------------------------
    def call(self, params: Mapping[str, Tensor], batch: Any) -> Any:
        """The model's output on a batch, computed with `params` (``{named_parameters name: tensor}``)."""
        return call_model(self.swap, params, batch)

    def _readouts(self, batch: Any, offset: int, at: tuple[str, ...] = ("init", "trained")) -> dict[str, Tensor]:
        """``{point: [n, K]}`` readouts at ``"init"`` (θ0 and the init buffers) and/or ``"trained"`` (θ*).

        A non-finite readout is a `NonFiniteError`; the model's own errors are worded by `_on_batch`.
        """
        out: dict[str, Tensor] = {}
        if not at:
            return out
        # under the same backends as the capture (the MHA fast path, say, zeroes padded positions)
        with torch.no_grad(), autodiff_context(self.model, what="the readouts"):
            for point in at:
                at_init = point == "init"
                params, buffers = (self.theta_init, self.buffers_init) if at_init else (self.theta_trained, None)
                with self.swap.use({}, buffers):
                    output = self.call(params, batch)
                out[point] = _finite_readout(self.readout(output, batch), point, offset)
        return out

    def _prepare(self, batch: Any, offset: int) -> Any:
        batch = batch_to(batch, self.device, self.dtype)
        check_finite_inputs(batch, offset)
        return batch

    def _batches(
        self, data: Any, batch_size: int | None, desc: str, progress: bool | None = None
    ) -> Iterator[tuple[int, int, Any]]:
        """``(index, offset, batch)`` of the prepared, non-empty batches of `data`.

        Before each batch the model is checked for changes since the `DualModel` was built and for layers in a
        mode efffeat refuses; the first batch goes through the determinism probe. ``batch_size=None`` sizes
        the batches from the memory available (`_auto_batch_size`).
        """
        self._check_model()
        if batch_size is None:
            batch_size = self._auto_batch_size(data)
        batches = as_batches(data, batch_size)
        offset = 0
        bar = tqdm(
            batches,
            total=batches.n_batches,
            desc=desc,
            disable=None if (self.progress if progress is None else progress) else True,
            leave=False,
        )
        for index, raw in enumerate(bar):
            if index:
                self._check_model(quick=True)
            with _on_batch(index, offset, raw):
                batch = self._prepare(raw, offset)
                n = batch_len(batch)
                if n:
                    self._check_batch_behaviour(batch)
            if n == 0:
                continue
            yield index, offset, batch
            offset += n
        if offset == 0:
            raise DataError("data is empty; pass at least one example")

    def points(self, order: str | None = None, nodes: int | None = None) -> list[Point]:
        """The evaluations whose weighted sum is the order's features: (parameters, weight, tangent, buffers)."""
        order = self._explicit_order(order)
        if order == "init":
            return [Point(self.theta_init, 1.0, None, self.buffers_init)]
        if order == "trained":
            return [Point(self.theta_trained, 1.0, None, None)]
        if order == "nlo":
            return [Point(self.theta_init, 1.0, self.delta, self.buffers_init)]
        ts, ws = gauss_legendre(nodes or self.nodes)
        return [
            Point({n: self.theta_init[n] + t * d for n, d in self.delta.items()}, w, None, None) for t, w in zip(ts, ws)
        ]

    # ---- features ----------------------------------------------------------------------------------------
    def features(
        self, data: Any, batch_size: int | None = None, order: str | None = None, need: str = "all"
    ) -> EffectiveFeatures:
        """Effective features of `data` (a tensor, an ``(inputs, targets)`` tuple, a dict of model inputs, or an
        iterable of batches).

        batch_size: examples per batch; None sizes batches from the memory available now: the largest power
            of two ≤ 1024 whose estimated working memory (the activations of a forward on the first examples,
            times the cotangents and evaluation points of the order) fits in a quarter of it.
        order: overrides the model's order for this call.
        need: ``"all"`` (default) also computes the readouts z_init and z_trained, so the result has Δz,
            `completeness`, `prediction`; ``"features"`` skips the forward passes at θ0 and θ* that the
            order's capture does not make (ranking and search need only the factors and Δθ): such features
            refuse `completeness()`, and ``meta["completeness"]`` is measured on the first batch's first 256
            examples.

        ``meta`` holds ``"order_requested"``, ``"order_reason"``, ``"nodes"``, ``"completeness"`` (of these
        features: over all examples with ``need="all"``) and ``"completeness_examples"``, ``"readouts"`` (the
        points computed), ``"precision_note"`` (None at float32 and above), ``"readout"``, ``"n_heads"``.
        """
        parts = list(self.iter_features(data, batch_size, order, need=need))
        value = _joint_completeness(parts) if len(parts) > 1 and need == "all" else None
        feats = EffectiveFeatures.concat(parts, consume=True)
        if value is not None:
            feats.meta.update(completeness=value, completeness_examples=feats.n_examples)
            self._warn_completeness(feats.order, feats.meta["nodes"], value, feats.n_examples)
        return feats

    def iter_features(
        self,
        data: Any,
        batch_size: int | None = None,
        order: str | None = None,
        progress: bool | None = None,
        need: str = "all",
    ) -> Iterator[EffectiveFeatures]:
        """The effective features of `data` one batch at a time (for streaming work such as top-k search).

        progress: overrides the model's progress setting for this pass. need: as in `features`; a streaming job
        that reads only the factors and Δθ (a top-k search of feature values or contributions) passes
        ``need="features"`` and saves up to two forward passes per batch (every batch then lacks the same
        readouts). Every batch's ``meta["completeness"]`` is that of the first batch (with ``need="features"``: of its
        first 256 examples, ``meta["completeness_examples"]``).
        """
        one_of("need", need, NEEDS)
        if order is not None:
            _check_order(order)
        first: tuple[float, int] | None = None
        for index, offset, batch in self._batches(data, batch_size, "features", progress):
            with _on_batch(index, offset, batch):
                used, nodes, reason = self._order_for(order, batch, offset)
                feats = self._batch_features(batch, offset, used, nodes, ("init", "trained") if need == "all" else ())
                if first is None:
                    first = self._first_completeness(feats, batch, offset)
                    self._warn_completeness(used, nodes, *first)
                if need == "features":
                    feats = _keep_readouts(feats, (_CAPTURED[used],) if used in _CAPTURED else ())
                feats.meta.update(
                    order_requested=self.requested_order if order is None else order,
                    order_reason=reason,
                    completeness=first[0],
                    completeness_examples=first[1],
                )
            yield feats

    def _first_completeness(self, feats: EffectiveFeatures, batch: Any, offset: int) -> tuple[float, int]:
        """The completeness residual of a batch's features, and over how many examples: all of them when they have
        both readouts, else the first `PROBE_EXAMPLES`, with the readouts the capture did not give computed for
        those only."""
        if len(feats.meta["readouts"]) == 2:
            return feats.completeness(), feats.n_examples
        m = min(feats.n_examples, PROBE_EXAMPLES)
        head = feats.select_rows(slice(0, m))
        missing = tuple(p for p in ("init", "trained") if p != _CAPTURED.get(feats.order))
        z = self._readouts(slice_batch(batch, slice(0, m)), offset, missing)
        head.z_init, head.z_trained = z.get("init", head.z_init), z.get("trained", head.z_trained)
        head.meta["readouts"] = ["init", "trained"]
        return head.completeness(), m

    def _batch_features(
        self, batch: Any, offset: int, order: str, nodes: int, readouts: tuple[str, ...]
    ) -> EffectiveFeatures:
        """One batch's features at `order`, with the `readouts` asked for and the one the capture gives."""
        captured = _CAPTURED.get(order)
        z = self._readouts(batch, offset, tuple(p for p in readouts if p != captured))
        layers, fallback = self._ensure_plan(batch)
        factors, z_first = self._batch_factors(batch, layers, fallback, order, nodes)
        if captured is not None:
            z[captured] = _finite_readout(z_first, captured, offset)
        factors = {s.name: factors[s.name] for s in self.ids.slots}
        meta = {
            "nodes": nodes,
            "readout": self.readout.name,
            "n_heads": self.n_heads,
            "readouts": [p for p in ("init", "trained") if p in z],
            "precision_note": self.precision_note,
            "init_kind": self.init_kind,
        }
        missing = torch.full_like(z_first, math.nan)
        return EffectiveFeatures(
            factors,
            self.ids,
            self.delta,
            z.get("init", missing),
            z.get("trained", missing),
            order,
            bool(self.readout.scalar),
            meta,
        )

    def _batch_factors(
        self, batch: Any, layers: list, fallback: list[str], order: str, nodes: int | None = None
    ) -> tuple[dict[str, Factor], Tensor]:
        """The order's factors for one batch, and the ``[n, K]`` readout at its first evaluation point."""
        acc: dict[str, list[Factor]] = {}
        first: Tensor | None = None
        for params, weight, tangent, buffers in self.points(order, nodes):
            with self.swap.use({}, buffers):
                cap = capture_batch(self.swap, layers, params, batch, self.readout, tangent)
                found = dict(cap.factors)
                if fallback:
                    found.update(self._fallback(fallback, params, batch, tangent))
            first = cap.readout if first is None else first
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
            elif name in cap.declined:
                reasons[name] = (
                    "its rule does not take this call (packed or unbatched inputs, an LSTM with projections)"
                )
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
        plus half a jvp along Δθ of that jvp. Differentiable with respect to the batch's inputs. With
        ``order="auto"`` not yet decided, pass `order` or call `resolve_order` first.
        """
        self._check_model()
        order = self._explicit_order(order)
        with _on_batch(None, 0, batch):
            return self._directional(batch, dict(direction), order, self.nodes)

    def _directional(self, batch: Any, direction: dict[str, Tensor], order: str, nodes: int) -> Tensor:
        def f(p: dict[str, Tensor]) -> Tensor:
            with autodiff_context(self.model, forward_ad=True, what=f"the {order} dual model by forward mode"):
                return self.readout(self.call(p, batch), batch)

        def along_w(p: dict[str, Tensor]) -> Tensor:
            return jvp(f, (p,), (direction,))[1]

        total: Tensor | float = 0.0
        for params, weight, tangent, buffers in self.points(order, nodes):
            with self.swap.use({}, buffers):
                if tangent is None:
                    total = total + weight * along_w(params)
                else:  # the jvp of along_w returns along_w(θ0) as its primal
                    value, second = jvp(along_w, (params,), (tangent,))
                    total = total + weight * (value + 0.5 * second)
        assert isinstance(total, Tensor)
        return total

    def predict(self, data: Any, batch_size: int | None = None, order: str | None = None) -> Tensor:
        """``[N(, K)]``: the dual model's prediction ``f(x; θ0) + Σ_μ Δθ_μ φ^E_μ(x)``."""
        out = []
        for index, offset, batch in self._batches(data, batch_size, "predict"):
            with _on_batch(index, offset, batch):
                used, nodes, _ = self._order_for(order, batch, offset)
                z_init = self._readouts(batch, offset, ("init",))["init"]
                out.append((z_init + self._directional(batch, self.delta, used, nodes)).detach())
        return _squeeze(torch.cat(out), self.readout.scalar)

    def outputs(self, data: Any, at: str = "trained", batch_size: int | None = None) -> Tensor:
        """``[N(, K)]``: the readout of the network at ``"trained"`` (θ*) or ``"init"`` (θ0 and its buffers)."""
        if at not in ("trained", "init"):
            raise ConfigError(f"at must be 'trained' or 'init', got {at!r}")
        out = []
        for index, offset, batch in self._batches(data, batch_size, "outputs"):
            with _on_batch(index, offset, batch):
                out.append(self._readouts(batch, offset, (at,))[at])
        return _squeeze(torch.cat(out), self.readout.scalar)

    def completeness(self, data: Any, batch_size: int | None = None, order: str | None = None) -> float:
        """Relative residual ``‖Σ_μ Δθ_μ φ^E_μ − Δz‖ / ‖Δz‖`` of the dual model over `data`, by directional
        derivatives (no feature pass)."""
        res2 = scale2 = 0.0
        for index, offset, batch in self._batches(data, batch_size, "completeness"):
            with _on_batch(index, offset, batch):
                used, nodes, _ = self._order_for(order, batch, offset)
                z = self._readouts(batch, offset)
                dz = z["trained"] - z["init"]
                res2 += float((self._directional(batch, self.delta, used, nodes).detach() - dz).square().sum())
                scale2 += float(dz.square().sum())
        return _relative_residual(res2, scale2)

    # ---- honesty: the model is what it was, deterministic, and left as it is -------------------------------
    def _check_model(self, quick: bool = False) -> None:
        """Refuse a model whose parameters or buffers changed since the `DualModel` was built, or whose layers
        are now in a mode efffeat refuses (before anything runs on it).

        quick: between the batches of one call, compare only each tensor's object, storage and in-place version
        counter (`_handles`, microseconds); the value checksums run when those moved and at every call's start
        (a write through ``p.data`` does not move the version counter: it is seen at the next call).
        """
        if quick and _handles(self._user_model) == self._handles:
            _check_modes(self.model)
            return
        now = _fingerprint(self._user_model)
        if now != self._fingerprint:
            before = {entry[:2]: entry for entry in self._fingerprint}
            changed = [f"{kind} {name}" for kind, name, *rest in now if before.get((kind, name)) != (kind, name, *rest)]
            changed += [f"{kind} {name}" for kind, name in set(before) - {e[:2] for e in now}]
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise ConfigError(
                f"the model changed since this DualModel was built ({shown}); θ* and Δθ = θ* − θ0 were read then, "
                "so its features would mix two networks: build a new ef.DualModel(model, init) for the model as it "
                "is now"
            )
        self._handles = _handles(self._user_model)
        _check_modes(self.model)

    def _check_batch_behaviour(self, batch: Any) -> None:
        """The determinism probe, once per set of module modes: the first examples of `batch` evaluated twice,
        and as two halves of a shuffled copy, must agree to float noise; the model must not write its buffers
        or (in place) its parameters. Anything else is an `UnsupportedModelError` naming the module."""
        modes = tuple(m.training for m in self.model.modules())
        if self._probed == modes:
            return
        probe = slice_batch(batch, slice(0, PROBE_EXAMPLES))
        n = batch_len(probe)
        params = {k: v.clone() for k, v in self.theta_trained.items()}  # in-place writes would land here

        def run(sub: Any) -> Tensor:
            return self.readout(self.call(params, sub), sub).detach()

        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(self.device)
        halves = [slice_batch(slice_batch(probe, perm), s) for s in (slice(0, n // 2), slice(n // 2, n))]
        probing = autodiff_context(self.model, what="the determinism check")
        with torch.no_grad(), probing, _kept_state(self.model, self.swap) as written, _forked_rng(self.device):
            with _output_shapes(self.model) as shapes:
                first = _finite_readout(run(probe), "trained", 0)
            second = run(probe)
            split = torch.cat([run(h) for h in halves])[torch.argsort(perm)] if n > 1 else first
        if written:
            raise UnsupportedModelError(
                f"the model writes its buffers in its forward ({', '.join(written[:4])}); efffeat evaluates it "
                "many times, so it would change your model: put the layers in eval mode or keep that state elsewhere"
            )
        edited = [k for k, v in params.items() if not torch.equal(v, self.theta_trained[k])]
        if edited:
            raise UnsupportedModelError(
                f"the model changes its parameters in place in its forward ({describe(self.model, edited)}), e.g. "
                "nn.Embedding(max_norm=...) renormalising its weight; efffeat needs a forward that leaves them alone"
            )
        if self._activations is None:  # activation entries per example and readout width, for batch sizes
            self._activations = (sum(s.numel() for s in shapes if len(s) and s[0] == n) / n, first.shape[1])
        tol = _noise(self.dtype)
        if _differs(first, second, tol):
            where = self._first_differing_module(params, probe, None)
            raise UnsupportedModelError(
                f"the model is not deterministic: two evaluations of the same {n} examples differ by up to "
                f"{float((first - second).abs().max()):.3g}{where}; features must be a function of each example: "
                "put random layers in eval mode (model.eval()) or remove the randomness from the forward"
            )
        if _differs(first, split, tol):
            where = self._first_differing_module(params, probe, perm)
            raise UnsupportedModelError(
                f"the output for an example depends on the other examples of its batch: the same {n} examples "
                f"evaluated as two halves of a shuffled batch differ by up to {float((first - split).abs().max()):.3g}"
                f"{where}; features must be a function of each example: use per-example layers (batch norm with "
                "running statistics in eval mode, LayerNorm) instead of batch statistics"
            )
        self._probed = modes

    def _first_differing_module(self, params: dict[str, Tensor], probe: Any, perm: Tensor | None) -> str:
        """``" (first at module 'path' (Type))"``: the first module call whose inputs agree between two
        evaluations (twice the same batch, or the batch and its shuffled halves) and whose outputs do not."""
        n = batch_len(probe)

        def record(sub: Any) -> list[tuple[str, list[Tensor], list[Tensor]]]:
            with _recorded(self.model) as calls:
                self.call(params, sub)
            return calls

        h = n // 2
        probing = autodiff_context(self.model, what="the determinism check")
        with torch.no_grad(), probing, _kept_state(self.model, self.swap), _forked_rng(self.device):
            base = record(probe)
            if perm is None:
                others, parts = [record(probe)], [slice(0, n)]
            else:
                shuffled = slice_batch(probe, perm)
                others = [record(slice_batch(shuffled, slice(0, h))), record(slice_batch(shuffled, slice(h, n)))]
                parts = [perm[:h], perm[h:]]
        tol = _noise(self.dtype)
        for i, (name, args, outputs) in enumerate(base):
            if any(len(o) <= i or o[i][0] != name for o in others):
                return f" (the modules run differ from module {name!r} on)"
            same_in = _agree(args, [o[i][1] for o in others], parts, n, tol)
            if same_in and not _agree(outputs, [o[i][2] for o in others], parts, n, tol):
                return f" (first at module {name})"
        return ""

    def _auto_batch_size(self, data: Any) -> int:
        """Examples per batch from the memory available (`_memory.batch_size_for`), estimated once on the first
        examples of `data` (by the determinism probe's first forward): the activations of one forward, times the
        cotangents (one per readout component) and the factors of each evaluation point of the order. An
        iterable of batches brings its own sizes."""
        as_batches(data, 1)  # validates the data
        if not isinstance(data, Tensor | tuple | Mapping):
            return _memory.BATCH_CAP
        if self._activations is None:  # no probe has run yet: run it on the first examples, which measures them
            head = slice_batch(data, slice(0, PROBE_EXAMPLES))
            with _on_batch(0, 0, head):
                self._check_batch_behaviour(self._prepare(head, 0))
        assert self._activations is not None
        activations, k = self._activations
        order = "path" if self.order == AUTO else self.order  # before the decision: the costliest choice
        points = (AUTO_MAX_NODES if self.order == AUTO else self.nodes) if order == "path" else 1
        per_example = _element_size(self.dtype) * activations * (3 + k * (1 + points)) * (2 if order == "nlo" else 1)
        return _memory.batch_size_for(per_example)

    def _warn_completeness(self, order: str, nodes: int, value: float, n: int) -> None:
        """One `CompletenessWarning` per order (and node count) whose residual is above `WARN_RESIDUAL`."""
        key = (order, nodes if order == "path" else None)
        if not value > WARN_RESIDUAL or key in self._warned:
            return
        self._warned.add(key)
        if order == "path":
            fix = f"more Gauss–Legendre nodes (nodes={2 * nodes}) would explain the network"
        else:
            fix = (
                "the expansions around one point (init, nlo, trained) hold only near it: order='path' (the exact "
                "dual of the trained network) or order='auto' would explain it"
            )
        warnings.warn(
            f"efffeat: the {order!r} features leave a completeness residual of {value:.3g} (> {WARN_RESIDUAL:g}) "
            f"on {n} examples, so they explain little of what the network learned; {fix}",
            CompletenessWarning,
            stacklevel=3,
        )


# ---- helpers -------------------------------------------------------------------------------------------------
def _finite_readout(z: Tensor, point: str, offset: int = 0) -> Tensor:
    bad = ~torch.isfinite(z).all(dim=1)
    if bool(bad.any()):
        raise NonFiniteError(
            f"the readout at {point} ({'θ0' if point == 'init' else 'θ*'}) is NaN or inf for {int(bad.sum())} "
            f"example(s) of a batch of {len(z)} (first: example {int(torch.nonzero(bad)[0]) + offset}) although "
            "the inputs are finite; the model output overflowed or the readout is undefined there (log of 0?)"
        )
    return z


def _squeeze(t: Tensor, scalar: bool | None) -> Tensor:
    return t.squeeze(1) if scalar else t


def _relative(residual: Tensor, scale: Tensor) -> float:
    """``‖residual‖ / ‖scale‖`` (0 when both vanish, inf when only the scale does)."""
    r, s = float(residual.norm()), float(scale.norm())
    if s == 0:
        return 0.0 if r == 0 else math.inf
    return r / s


def _keep_readouts(feats: EffectiveFeatures, keep: tuple[str, ...]) -> EffectiveFeatures:
    """`feats` with only the readouts `keep`; the others are NaN and ``meta["readouts"]`` says which are real."""
    blank = torch.full_like(feats.z_init, math.nan)
    feats.z_init = feats.z_init if "init" in keep else blank
    feats.z_trained = feats.z_trained if "trained" in keep else blank
    feats.meta["readouts"] = [p for p in ("init", "trained") if p in keep]
    return feats


def _slow_quadrature(tried: list[tuple[int, float]]) -> str:
    """Why the path residual stayed above the target after the most nodes auto tries, with its measured rate.

    Gauss–Legendre converges fast along a smooth path; a kink (ReLU's σ′ jumps along the path) makes it first
    order, residual ∝ 1/nodes. The rate is the least-squares slope of log residual against log nodes.
    """
    n_last, r_last = tried[-1]
    head = f"still above {AUTO_PATH_RESIDUAL:g} at {n_last} nodes, the most auto tries"
    points = [(math.log(k), math.log(r)) for k, r in tried if r > 0]
    if len(points) < 2:
        return head
    mx = sum(a for a, _ in points) / len(points)
    my = sum(b for _, b in points) / len(points)
    slope = sum((a - mx) * (b - my) for a, b in points) / sum((a - mx) ** 2 for a, _ in points)
    if slope > -0.1:
        return f"{head}; more nodes do not bring it down (slope {slope:.2f} of log residual against log nodes)"
    log_needed = math.log(n_last) + math.log(r_last / AUTO_PATH_RESIDUAL) / -slope
    needed = f"≈ {math.exp(log_needed):.0f}" if log_needed < math.log(1e6) else "more than a million"
    kink = "; a slope near −1 means the path crosses kinks (ReLU)" if slope > -1.5 else ""
    return f"{head}; it falls like nodes^{slope:.2f}, so {needed} nodes would reach it{kink}"


def _check_order(order: Any, allow_auto: bool = False) -> str:
    choices = (*ORDERS, AUTO) if allow_auto else ORDERS
    if not isinstance(order, str) or order not in choices:
        raise ConfigError(f"unknown order {order!r}; choose one of {', '.join(repr(o) for o in choices)}")
    return order


def _precision_note(dtype: torch.dtype) -> str | None:
    """A sentence on the rounding of a model below float32 (None at float32 and above)."""
    if not dtype.is_floating_point or torch.finfo(dtype).bits >= 32:
        return None
    eps = torch.finfo(dtype).eps
    return (
        f"the model computes in {dtype} (machine epsilon {eps:.1g}): its features, kernels and completeness carry "
        f"relative errors of about {eps:.0e} or more; pass dtype=torch.float32 (or torch.float64) to compute on a "
        "copy in higher precision"
    )


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _noise(dtype: torch.dtype) -> float:
    """Relative differences below this are float noise (batch-size dependent summation order)."""
    return math.sqrt(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


def _differs(a: Tensor, b: Tensor, tol: float) -> bool:
    """Whether two readouts differ by more than `tol` relative to their largest entry."""
    if a.shape != b.shape:
        return True
    if not bool((torch.isfinite(a) == torch.isfinite(b)).all()):
        return True
    fa, fb = torch.nan_to_num(a), torch.nan_to_num(b)
    scale = max(float(fa.abs().max()) if fa.numel() else 0.0, float(fb.abs().max()) if fb.numel() else 0.0)
    return float((fa - fb).abs().max()) > tol * scale + 1e-30 if fa.numel() else False


def _agree(base: list[Tensor], others: list[list[Tensor]], parts: list, n: int, tol: float) -> bool:
    """Whether one module call's tensors agree with those of the other evaluation(s): the same batch again
    (one other, ``parts = [slice(0, n)]``), or the halves of a shuffled batch (rows `parts[i]` of `base`)."""
    for j, t in enumerate(base):
        got = [o[j] if j < len(o) else None for o in others]
        if any(g is None for g in got):
            return False
        if t.ndim and t.shape[0] == n and len(got) > 1:
            if not all(g.ndim and g.shape[0] == len(p) for g, p in zip(got, parts)):
                return False
            pieces = [(t[p], g) for p, g in zip(parts, got)]
        else:
            pieces = [(t, g) for g in got]
        if any(not a.is_floating_point() and not torch.equal(a, b) for a, b in pieces):
            return False
        if any(a.is_floating_point() and _differs(a.double(), b.double(), tol) for a, b in pieces):
            return False
    return True


@contextmanager
def _recorded(model: nn.Module) -> Iterator[list[tuple[str, list[Tensor], list[Tensor]]]]:
    """Every module call of the forwards in the block, as they finish: ``(module, input tensors, outputs)``."""
    calls: list[tuple[str, list[Tensor], list[Tensor]]] = []

    def make(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            label = f"{name!r} ({type(module).__name__})"
            calls.append((label, [t.detach() for t in _leaves((args, kwargs))], [t.detach() for t in _leaves(output)]))

        return hook

    handles = [m.register_forward_hook(make(n or "<root>"), with_kwargs=True) for n, m in model.named_modules()]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _output_shapes(model: nn.Module) -> Iterator[list[torch.Size]]:
    """The shape of every tensor every module returns in the block (activation sizes, nothing kept)."""
    shapes: list[torch.Size] = []

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        shapes.extend(t.shape for t in _leaves(output))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        yield shapes
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _kept_state(model: nn.Module, swap: ParameterSwap) -> Iterator[list[str]]:
    """Give back every buffer as it was when the block ends (its object and its values); the list yielded names
    the buffers the block wrote, filled in when it ends."""
    written: list[str] = []
    saved = [
        (name, module, attr, module._buffers[attr], module._buffers[attr].clone())
        for name, slots in swap.buffer_slots.items()
        for module, attr in slots
    ]
    try:
        yield written
    finally:
        for name, module, attr, original, values in saved:
            now = module._buffers[attr]
            if now is not original or not _same_values(original, values):
                module._buffers[attr] = original
                with torch.no_grad():
                    original.copy_(values)
                if name not in written:
                    written.append(name)


def _same_values(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.equal(a, b) or torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
    return bool(torch.equal(a, b))


@contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """The global random state as it was when the block ends (a random layer's probe draws no numbers of yours)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


@contextmanager
def _on_batch(index: int | None, offset: int, batch: Any) -> Iterator[None]:
    """Word an error raised while the model or the readout runs on a batch: efffeat errors pass (a readout
    error says which batch), the model's own error becomes a `DataError` with its message and the batch."""
    try:
        yield
    except ReadoutError as e:
        if index is None or "(batch " in str(e):
            raise
        raise ReadoutError(f"{e} (batch {index}, {_examples(offset, batch)})") from e
    except ModelRaised as e:
        cause = e.__cause__ if isinstance(e.__cause__, Exception) else e
        raise _model_error(index, offset, batch, cause) from cause
    except EfffeatError:
        raise
    except NotImplementedError as e:
        if not any(words in str(e).lower() for words in ("forward ad", "forward mode ad", "forward-mode")):
            raise _model_error(index, offset, batch, e) from e
        raise UnsupportedModelError(
            f"the model uses an operation without a forward-mode derivative ({e}); the 'nlo' order, order='auto' "
            "and completeness need forward-mode derivatives (torch.func.jvp): pass order='init', 'trained' or "
            "'path', whose features need reverse mode only"
        ) from e
    except Exception as e:  # the model's or the forward's own error, whatever its type
        if isinstance(e, torch.OutOfMemoryError | MemoryError) or "can't allocate memory" in str(e):
            raise MemoryBudgetError(
                f"the model ran out of memory on {_where(index, offset, batch)} ({type(e).__name__}: {e}); pass a "
                "smaller batch_size"
            ) from e
        raise _model_error(index, offset, batch, e) from e


def _examples(offset: int, batch: Any) -> str:
    try:
        n = batch_len(batch)
    except DataError:
        return f"examples from {offset}"
    return f"example {offset}" if n == 1 else f"examples {offset}–{offset + n - 1}"


def _where(index: int | None, offset: int, batch: Any) -> str:
    if index is None:
        return f"a batch ({describe_batch(batch)})"
    return f"batch {index} ({_examples(offset, batch)}; {describe_batch(batch)})"


def _model_error(index: int | None, offset: int, batch: Any, e: Exception) -> DataError:
    return DataError(f"the model rejected {_where(index, offset, batch)}: {type(e).__name__}: {e}")


def _check_modes(model: nn.Module) -> None:
    """Refuse, before anything runs, layers that are random, mix the examples of a batch or update their state."""
    bad = [(name or "<root>", why) for name, m in model.named_modules() if (why := _mode_problem(m)) is not None]
    if not bad:
        return
    training = any("training mode" in why for _, why in bad)
    names = ", ".join(name for name, _ in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    details = "; ".join(f"{name}: {why}" for name, why in bad[:5])
    fixes = []
    if training:
        fixes.append("call model.eval() first (efffeat leaves your model's modes as they are)")
    if not all("training mode" in why for _, why in bad):
        fixes.append("give batch norm running statistics (track_running_stats=True) or use LayerNorm")
    raise UnsupportedModelError(
        f"the model has layers that are random or mix the examples of a batch{' in training mode' if training else ''} "
        f"({names}) — {details}; features must be a deterministic function of each example: {' and '.join(fixes)}"
    )


def _mode_problem(m: nn.Module) -> str | None:
    """Why a module in its current mode makes features random or batch dependent, or None."""
    kind = type(m).__name__
    if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
        return f"{kind}(p={m.p}) drops units at random in training mode"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.training:
            return f"{kind} normalises by the batch's statistics and updates its running statistics in training mode"
        if m.running_mean is None or m.running_var is None:
            return f"{kind} has no running statistics, so it normalises by the batch's statistics in eval mode too"
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.training and m.track_running_stats:
        return f"{kind} updates its running statistics in training mode"
    if isinstance(m, nn.RNNBase) and m.training and m.dropout > 0:
        return f"{kind}(dropout={m.dropout}) drops units at random between layers in training mode"
    if isinstance(m, nn.MultiheadAttention) and m.training and m.dropout > 0:
        return f"{kind}(dropout={m.dropout}) drops attention weights at random in training mode"
    return None


def _handles(model: nn.Module) -> tuple:
    """Every parameter's and buffer's object, storage address and in-place version: what an optimiser step,
    ``load_state_dict`` or ``p.data = ...`` moves, at no cost."""
    tensors = [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]
    try:
        return tuple((id(t), t.data_ptr(), t._version) for t in tensors)
    except RuntimeError:  # inference-mode tensors keep no version counter: always the full check
        return (object(),)


def _fingerprint(model: nn.Module) -> tuple:
    """What identifies a model's state cheaply: every parameter and buffer by name, object, shape, dtype and
    value checksums (an optimiser step, ``load_state_dict`` or ``p.data = ...`` all change it)."""
    out = []
    with torch.no_grad():
        for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in named:
                x = torch.view_as_real(t.detach()) if t.is_complex() else t.detach()
                sums = [torch.sum(x, dtype=torch.float64)]
                if x.is_floating_point():
                    sums.append(torch.linalg.vector_norm(x, dtype=torch.float64))
                out.append((kind, name, id(t), tuple(t.shape), str(t.dtype), tuple(float(s).hex() for s in sums)))
    return tuple(out)


def _joint_completeness(parts: list[EffectiveFeatures]) -> float:
    """The completeness residual of batches' features taken together, ``(Σ_b ‖res_b‖² / Σ_b ‖Δz_b‖²)^½``; the
    first batch's residual is read back from its own completeness (`iter_features` measured it on all its
    examples), not computed again."""
    res2 = scale2 = 0.0
    for i, part in enumerate(parts):
        dz2 = float(part.delta_z().double().square().sum())
        first = part.meta["completeness"] if i == 0 and part.meta["completeness_examples"] == part.n_examples else None
        if first is not None and math.isfinite(first):
            res2 += first**2 * dz2
        else:
            res2 += float(part.residual().double().square().sum())
        scale2 += dz2
    return _relative_residual(res2, scale2)


def _relative_residual(res2: float, scale2: float) -> float:
    """``(Σ res² / Σ Δz²)^½``; 0 for an exact dual model of a network that did not move, inf when only Δz is 0."""
    if scale2 == 0:
        return 0.0 if res2 == 0 else math.inf
    return math.sqrt(res2 / scale2)


def _check_finite(params: Mapping[str, Tensor], what: str, fix: str) -> None:
    for n, p in params.items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise NonFiniteError(f"{what} {n!r} holds {bad} NaN/inf value(s); {fix}")


def _init_buffers(init: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The init state's buffers by ``named_buffers()`` name, shape-checked and cast like the model's own (copies);
    a buffer the init state lacks is not listed (the model's is used)."""
    keys = {id(v): k for k, v in model.state_dict(keep_vars=True).items()}
    persistent = set(keys.values())
    out, missing = {}, []
    for name, b in model.named_buffers():
        key = keys.get(id(b), name)
        value = init.get(key, init.get(name))
        if value is None:
            if key in persistent and b.is_floating_point():
                missing.append(key)
            continue
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(b.shape):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise InitStateError(
                f"init buffer {key!r} has shape {got} but the model's buffer has {tuple(b.shape)}; the init state "
                "belongs to a different architecture"
            )
        out[name] = value.detach().to(device=b.device, dtype=b.dtype).clone()
    if missing:
        warnings.warn(
            f"efffeat: the init state has no entry for the buffer(s) {', '.join(missing[:5])}; the model is evaluated "
            "at θ0 with their current (trained) values. Pass the full model.state_dict() saved at initialisation",
            stacklevel=3,
        )
    return out


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
