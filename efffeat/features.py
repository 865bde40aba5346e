"""`EffectiveFeatures`: the factored store of one dataset's effective features at one order."""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import io
from ._check import one_of
from ._memory import batch_size_for, check_fits
from ._savable import register
from .errors import ConfigError, FeatureIdError, SaveFileError
from .factors import Factor, cat_examples, from_state, gram_sum
from .groups import absorbed_biases
from .ids import FeatureIds, ParamSlot

# Examples of per-example gradients `EffectiveFeatures.group_contribution_sq_sums` forms at most at once.
_GROUP_BLOCK = 64

# The orders of the effective features (`efffeat.DualModel`).
ORDERS = ("init", "nlo", "trained", "path")

# Output reductions of a kernel [N, K, M, K] (`EffectiveFeatures.kernel`, `reduce_outputs`).
REDUCTIONS = ("flatten", "diagonal", "pairs")


def component_weights(weights: Tensor | Sequence[float] | None, k: int, like: Tensor) -> Tensor:
    """``[K]`` per-component output weights ``w_k`` checked (finite, non-negative); ones when None."""
    if weights is None:
        return torch.ones(k, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.shape != (k,):
        raise ConfigError(f"output_weights must have one entry per readout component ({k}), got shape {tuple(w.shape)}")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ConfigError("output_weights must be finite and non-negative (they rescale kernel blocks by √(w_k w_l))")
    return w


def importance_weights(importance: float, n_outputs: int, beta: float = 1.0) -> Tensor:
    """``[K]`` output weights ``w_k = importance^(β k)``: the importance-weighted loss of toy models.

    ``β = 1`` weighs each output block by its loss weight (kernel blocks scaled by ``√(w_k w_l)``);
    ``β < 1`` softens it; ``β = 0`` is no rescaling.
    """
    if not importance > 0:
        raise ConfigError(f"importance must be positive, got {importance!r}")
    return torch.tensor(float(importance), dtype=torch.float64) ** (beta * torch.arange(n_outputs, dtype=torch.float64))


def reduce_outputs(kernel: Tensor, reduce: str = "pairs", weights: Tensor | Sequence[float] | None = None) -> Tensor:
    """Reduce the output axes of a kernel ``[N, K, M, K]`` with output weights ``w_k`` (``s_k = √w_k``):

    ============ ======================================================= ==========
    reduce       kernel                                                  shape
    ============ ======================================================= ==========
    flatten      ``s_k s_l K[n, k, m, l]`` at row ``n·K + k``, column     ``[NK, MK]``
                 ``m·K + l`` (example-major)
    diagonal     ``(1/K) Σ_k w_k K[n, k, m, k]``                          ``[N, M]``
    pairs        ``(1/K²) Σ_{k,l} s_k s_l K[n, k, m, l]``                 ``[N, M]``
    ============ ======================================================= ==========
    """
    one_of("reduce", reduce, REDUCTIONS)
    if kernel.ndim != 4 or kernel.shape[1] != kernel.shape[3]:
        raise ConfigError(f"expected a kernel [N, K, M, K], got shape {tuple(kernel.shape)}")
    n, k, m, _ = kernel.shape
    w = component_weights(weights, k, kernel)
    s = w.sqrt()
    if reduce == "flatten":
        return (kernel * s[None, :, None, None] * s[None, None, None, :]).reshape(n * k, m * k)
    if reduce == "diagonal":
        return torch.einsum("nkmk,k->nm", kernel, w) / k
    return torch.einsum("nkml,k,l->nm", kernel, s, s) / k**2


@register
@dataclass
class EffectiveFeatures:
    """Effective features ``φ^E_μ(x)`` of N examples, one per parameter entry μ (and readout component).

    Stored factored: per parameter tensor a `LowRankFactor` (outer products of layer inputs and output
    cotangents) or a `DenseFactor`. Everything below is a matmul over those factors; the ``[N, P]`` matrix
    exists only if `dense()` is called.

    Attributes:
        factors: ``{named_parameters() name: factor}``; parameters in `ids` order.
        ids: the P feature ids (`FeatureIds`, lazy).
        delta: ``{name: Δθ}`` = θ* − θ0, the dual model's regression weights.
        z_init: ``[N, K]`` readout at θ0; z_trained: ``[N, K]`` readout at θ*.
        order: ``"init" | "nlo" | "trained" | "path"``; scalar: readout is one number per example.
    """

    factors: dict[str, Factor]
    ids: FeatureIds
    delta: dict[str, Tensor]
    z_init: Tensor
    z_trained: Tensor
    order: str
    scalar: bool
    meta: dict = field(default_factory=dict)

    @staticmethod
    def concat(parts: list[EffectiveFeatures], consume: bool = False) -> EffectiveFeatures:
        """The features of several batches of examples (same model, order and readout) as one store.

        consume: empty each part's factors as soon as they are joined, so that memory peaks at the store plus one
        parameter tensor's factors rather than twice the store (the parts are unusable afterwards).
        """
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        factors = {}
        for name in list(first.factors):
            factors[name] = cat_examples([p.factors[name] for p in parts])
            if consume:
                for p in parts:
                    del p.factors[name]
        return EffectiveFeatures(
            factors,
            first.ids,
            first.delta,
            torch.cat([p.z_init for p in parts]),
            torch.cat([p.z_trained for p in parts]),
            first.order,
            first.scalar,
            dict(first.meta),
        )

    # ---- sizes -----------------------------------------------------------------------------------------
    @property
    def n_examples(self) -> int:
        return self.z_init.shape[0]

    @property
    def n_outputs(self) -> int:
        """K, the number of readout components (1 for a scalar readout)."""
        return self.z_init.shape[1]

    @property
    def n_features(self) -> int:
        return len(self.ids)

    @property
    def slots(self) -> list[ParamSlot]:
        return self.ids.slots

    @property
    def dtype(self) -> torch.dtype:
        return self.z_init.dtype

    @property
    def device(self) -> torch.device:
        return self.z_init.device

    def __repr__(self) -> str:
        k = "" if self.scalar else f", K={self.n_outputs}"
        kinds = {type(f).__name__.replace("Factor", "").lower() for f in self.factors.values()}
        return (
            f"EffectiveFeatures(order={self.order!r}, N={self.n_examples}{k}, P={self.n_features:,}, "
            f"tensors={len(self.factors)} ({'/'.join(sorted(kinds))}), completeness={self._completeness_text()})"
        )

    def _completeness_text(self) -> str:
        if len(self.meta.get("readouts", ("init", "trained"))) == 2:
            return f"{self.completeness():.3g}"
        return f"{self.meta.get('completeness', math.nan):.3g} on the first batch"

    def _out(self, t: Tensor) -> Tensor:
        """Drop the K axis (axis 1) for a scalar readout."""
        return t.squeeze(1) if self.scalar else t

    def _in(self, t: Tensor) -> Tensor:
        """Add the K axis to a ``[N]`` tensor for a scalar readout; check the shape."""
        t = torch.as_tensor(t, dtype=self.dtype, device=self.device)
        if self.scalar and t.ndim == 1:
            t = t[:, None]
        if tuple(t.shape) != (self.n_examples, self.n_outputs):
            want = f"[{self.n_examples}]" if self.scalar else f"[{self.n_examples}, {self.n_outputs}]"
            raise ConfigError(f"expected a tensor of shape {want}, got {tuple(t.shape)}")
        return t

    # ---- the flat parameter axis -----------------------------------------------------------------------
    def flat_delta(self) -> Tensor:
        """``[P]`` Δθ in feature order."""
        return torch.cat([self.delta[s.name].reshape(-1) for s in self.slots])

    def _split(self, v: Tensor) -> dict[str, Tensor]:
        v = torch.as_tensor(v, dtype=self.dtype, device=self.device)
        if v.shape != (self.n_features,):
            raise ConfigError(f"expected a vector of {self.n_features} entries (one per feature), got {tuple(v.shape)}")
        return {s.name: v[s.offset : s.offset + s.numel] for s in self.slots}

    # ---- products --------------------------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """``[N(, K)]``: ``Σ_μ φ^E_μ(x) v_μ`` for ``v [P]``."""
        parts = self._split(v)
        out = torch.zeros(self.n_examples, self.n_outputs, dtype=self.dtype, device=self.device)
        for name, f in self.factors.items():
            out += f.matvec(parts[name])
        return self._out(out)

    def rmatvec(self, u: Tensor) -> Tensor:
        """``[P]``: ``Σ_{x(,k)} u(x(, k)) φ^E_μ(x(, k))`` for ``u [N(, K)]``."""
        c = self._in(u)
        return torch.cat([self.factors[s.name].rmatvec(c) for s in self.slots])

    # ---- columns ---------------------------------------------------------------------------------------
    def _positions(self, ids: Sequence[str] | Sequence[int]) -> list[int]:
        return [self.ids.index(i) if isinstance(i, str) else _position(i) for i in ids]

    def columns(self, ids: Sequence[str] | Sequence[int]) -> Tensor:
        """``[N(, K), m]``: feature values ``φ^E`` for the ids (or flat positions) given."""
        pos = self._positions(ids)
        out = torch.empty(self.n_examples, self.n_outputs, len(pos), dtype=self.dtype, device=self.device)
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for col, p in enumerate(pos):
            if not 0 <= p < self.n_features:
                raise FeatureIdError(f"feature position {p} is out of range for {self.n_features} features")
            slot_i = self._slot_index(p)
            by_slot.setdefault(slot_i, []).append((col, p - self.slots[slot_i].offset))
        for slot_i, items in by_slot.items():
            slot = self.slots[slot_i]
            cols = torch.tensor([c for c, _ in items], device=self.device)
            local = torch.tensor([j for _, j in items], device=self.device)
            out[:, :, cols] = self.factors[slot.name].entries(local)
        return out.squeeze(1) if self.scalar else out

    def column(self, feature_id: str | int) -> Tensor:
        """``[N(, K)]``: one feature's values over the data."""
        return self.columns([feature_id])[..., 0]

    def contributions(self, ids: Sequence[str] | Sequence[int]) -> Tensor:
        """``[N(, K), m]``: ``c_μ(x) = Δθ_μ φ^E_μ(x)``, each feature's share of the output change."""
        pos = self._positions(ids)
        d = self.flat_delta()[torch.tensor(pos, device=self.device, dtype=torch.long)]
        return self.columns(pos) * d

    def _slot_index(self, p: int) -> int:
        return bisect.bisect_right([s.offset for s in self.slots], p) - 1

    # ---- the dual model --------------------------------------------------------------------------------
    def _readout(self, point: str) -> Tensor:
        """``[N, K]`` z_init or z_trained; refused when the feature pass skipped it (``need="features"``)."""
        if point not in self.meta.get("readouts", ("init", "trained")):
            raise ConfigError(
                f"these features were computed without the readout at {point} (need='features'), so they have no "
                "Δz, prediction or completeness; compute them with dual.features(data, need='all') "
                "(meta['completeness'] holds the residual measured on the first batch)"
            )
        return self.z_init if point == "init" else self.z_trained

    def delta_z(self) -> Tensor:
        """``[N(, K)]``: Δz = f(x; θ*) − f(x; θ0) under the readout."""
        return self._out(self._readout("trained") - self._readout("init"))

    def prediction(self) -> Tensor:
        """``[N(, K)]``: the dual model ``z0(x) + Σ_μ Δθ_μ φ^E_μ(x)``."""
        return self._out(self._readout("init")) + self.matvec(self.flat_delta())

    def residual(self) -> Tensor:
        """``[N(, K)]``: dual prediction minus the trained network's output."""
        return self.prediction() - self._out(self._readout("trained"))

    def completeness(self) -> float:
        """Relative residual ``‖Σ_μ Δθ_μ φ^E_μ − Δz‖ / ‖Δz‖`` over the data (0 = the dual model is exact)."""
        dz = self.delta_z()
        scale = dz.norm()
        res = self.residual().norm()
        return float(res / scale) if scale > 0 else (0.0 if res == 0 else math.inf)

    # ---- dense and kernels -----------------------------------------------------------------------------
    def dense(self) -> Tensor:
        """``[N, P]`` (scalar readout) or ``[N, K, P]``: every feature value, in `ids` order.

        Refused with `MemoryBudgetError` when it would not fit in the memory available.
        """
        check_fits(
            self.n_examples * self.n_outputs * self.n_features,
            self.dtype,
            what=f"the dense feature matrix [{self.n_examples}, {self.n_outputs}, {self.n_features}]",
            alternative="use matvec/rmatvec, columns(ids), kernel() or ef.rank, which work on the factors",
        )
        out = torch.cat([self.factors[s.name].dense() for s in self.slots], dim=2)
        return self._out(out)

    def kernel(
        self,
        other: EffectiveFeatures | None = None,
        params: Sequence[str] | str | None = None,
        reduce: str | None = None,
        output_weights: Tensor | Sequence[float] | None = None,
    ) -> Tensor:
        """The effective kernel ``Σ_μ φ^E_μ(x) φ^E_μ(x')``, from the factors' Gram products.

        Args:
            other: features of a second dataset (same model and order); None: these features.
            params: restrict the sum to these parameter tensors (a layerwise kernel), by state_dict or
                named_parameters name.
            reduce: None for ``[N, M]`` (scalar readout) or ``[N, K, M, K]``; ``"flatten"`` ``[N·K, M·K]``
                (example-major), ``"diagonal"`` or ``"pairs"`` ``[N, M]`` (`reduce_outputs`). The diagonal and
                pairs kernels of one feature set come from per-component Grams or one Gram of the weighted
                output sum, never through ``[N, K, N, K]``.
            output_weights: ``[K]`` weights ``w_k`` of the reduction (importance rescaling); None = 1.
        """
        other = self if other is None else other
        if other.slots != self.slots:
            raise ConfigError(
                "the two feature sets belong to models with different parameters; a kernel pairs features of the "
                "same architecture (compute both with the same DualModel)"
            )
        names = self.param_names(params)
        n, k, m, l = self.n_examples, self.n_outputs, other.n_examples, other.n_outputs
        if reduce is not None:
            one_of("reduce", reduce, REDUCTIONS)
            if l != k:
                raise ConfigError(
                    f"reduce={reduce!r} pairs the readout components of the two feature sets, which have {k} and {l}; "
                    "compute both with the same readout (or pass reduce=None)"
                )
        w = component_weights(output_weights, k, self.z_init)
        left = [self.factors[name] for name in names]
        right = None if other is self else [other.factors[name] for name in names]
        bias_of = self._bias_positions(names)
        if reduce in ("diagonal", "pairs"):
            check_fits(n * m, self.dtype, f"the kernel [{n}, {m}]", "compute it on fewer examples (select_rows)")
            if reduce == "pairs":  # one Gram of the weighted output sums
                c = w.sqrt() / k
                left = [f.output_sum(c) for f in left]
                right = None if right is None else [f.output_sum(c) for f in right]
            else:  # one Gram of the components laid side by side
                left = [f.stacked_outputs(w / k) for f in left]
                right = None if right is None else [f.stacked_outputs(w / k) for f in right]
            out = torch.zeros(n, 1, m, 1, dtype=self.dtype, device=self.device)
            return gram_sum(left, right, out, bias_of)[:, 0, :, 0]
        check_fits(
            n * k * m * l,
            self.dtype,
            what=f"the kernel [{n}, {k}, {m}, {l}]",
            alternative="compute it on fewer examples, in blocks of rows with select_rows(), or on disk with "
            "efffeat.distributed.kernel_to_disk",
        )
        out = gram_sum(left, right, torch.zeros(n, k, m, l, dtype=self.dtype, device=self.device), bias_of)
        if reduce is not None:
            return reduce_outputs(out, reduce, w)
        return out[:, 0, :, 0] if self.scalar and other.scalar else out

    def _bias_positions(self, names: list[str]) -> dict[int, int]:
        """``{position of a weight in names: position of its layer's bias}`` (the pairs of `groups.absorbed_biases`),
        for kernels that fold a bias into its weight's Gram."""
        by_state = {s.state_name: s.name for s in self.slots}
        at = {name: i for i, name in enumerate(names)}
        pairs = ((by_state[w], by_state[b]) for w, b in absorbed_biases(self.ids).items())
        return {at[w]: at[b] for w, b in pairs if w in at and b in at}

    def param_names(self, params: Sequence[str] | str | None = None) -> list[str]:
        """named_parameters() names of the tensors `params` names (state_dict or parameter names; all if None)."""
        if params is None:
            return [s.name for s in self.slots]
        if isinstance(params, str):
            params = [params]
        return [self.ids.slot(p).name for p in params]

    def select_rows(self, index: Tensor | slice) -> EffectiveFeatures:
        """The features of a subset of the examples (same ids and Δθ)."""
        return EffectiveFeatures(
            {k: f.rows(index) for k, f in self.factors.items()},
            self.ids,
            self.delta,
            self.z_init[index],
            self.z_trained[index],
            self.order,
            self.scalar,
            dict(self.meta),
        )

    def sq_sums(self, weights: Tensor | None = None) -> Tensor:
        """``[P]`` (a new tensor): ``Σ_{x,k} w(x, k) φ^E_μ(x, k)²`` for every feature at once, from the factors."""
        w = None if weights is None else self._in(weights)
        return torch.cat([self.factors[s.name].sq_sum(w) for s in self.slots])

    def group_contribution_sq_sums(self, pos: Tensor, gid: Tensor, n_groups: int) -> Tensor:
        """``[G]``: ``Σ_{x,k} (Σ_{μ∈G} Δθ_μ φ^E_μ(x, k))²``, each group's *summed* contribution squared and summed
        over the (example, component) pairs, for the groups of the feature positions ``pos [M]`` (group of each
        ``gid [M]`` in ``0..n_groups−1``; a position may be in several groups).

        Unlike the sum of the members' squares (`sq_sums`), contributions of one group that cancel cancel here.
        The per-example gradients of the tensors holding members are formed from the factors for a block of
        examples at a time, sized from the memory available; the ``[N, P]`` matrix never is.
        """
        delta = self.flat_delta()
        pos, gid = pos.to(self.device), gid.to(self.device)
        parts = []
        for s in self.slots:
            inside = (pos >= s.offset) & (pos < s.offset + s.numel)
            if bool(inside.any()):
                at = pos[inside]
                parts.append((s.name, at - s.offset, gid[inside], delta[at]))
        k = self.n_outputs
        widest = max((self.factors[name].numel for name, *_ in parts), default=1)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        block = batch_size_for(3 * k * (widest + n_groups) * itemsize, cap=min(_GROUP_BLOCK, self.n_examples))
        out = torch.zeros(n_groups, dtype=self.dtype, device=self.device)
        for start in range(0, self.n_examples, block):
            rows = slice(start, min(start + block, self.n_examples))
            sums = torch.zeros(n_groups, (rows.stop - rows.start) * k, dtype=self.dtype, device=self.device)
            for name, local, g, d in parts:
                grads = self.factors[name].rows(rows).dense().flatten(0, 1)  # [n_block·K, numel]
                sums.index_add_(0, g, (grads.T[local] * d[:, None]))  # one row added per member
            out += sums.square().sum(dim=1)
        return out

    def sq_norms(
        self, params: Sequence[str] | str | None = None, by_tensor: bool = False
    ) -> Tensor | dict[str, Tensor]:
        """``[N(, K)]``: ``‖φ^E(x, k)‖² = Σ_μ φ^E_μ(x, k)²``, the squared norm of every example's gradient (per readout
        component) over the tensors `params` (state_dict or named_parameters names; all if None), from the factors:
        ``‖u‖²‖v‖²`` for an outer product, the Grams of its rank terms for a sequence.

        by_tensor: ``{state_dict name: [N(, K)]}``, one entry per tensor, instead of their sum.
        """
        state = {s.name: s.state_name for s in self.slots}
        shape = (self.n_examples, self.n_outputs)
        parts = {state[name]: self.factors[name].sq_norms().expand(shape) for name in self.param_names(params)}
        if by_tensor:
            return {name: self._out(t) for name, t in parts.items()}
        total = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for t in parts.values():
            total += t
        return self._out(total)

    # ---- persistence ----------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        tensors: dict[str, Tensor] = {"z_init": self.z_init, "z_trained": self.z_trained}
        for name, f in self.factors.items():
            tensors.update({f"factors/{name}/{key}": t for key, t in f.state().items()})
        for name, d in self.delta.items():
            tensors[f"delta/{name}"] = d
        slots = [s.to_json() for s in self.slots]
        meta = {"order": self.order, "scalar": self.scalar, "slots": slots, "meta": self.meta}
        return tensors, meta

    @classmethod
    def validate_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Refuse (`SaveFileError`) a state whose fields, slots, factors and readouts do not fit together."""
        m = io.record(
            meta,
            "meta",
            {"order": io.text(ORDERS), "scalar": io.flag, "slots": io.slots, "meta": io.dict_of()},
        )
        io.record(
            m["meta"],
            "meta.meta",
            {},
            {"nodes": io.whole(1), "readout": io.text(), "n_heads": io.nullable(io.whole(1))},
            others=io.anything,
        )
        z_init = io.tensor(tensors, "z_init", "float", ndim=2)
        n, k = z_init.shape
        io.tensor(tensors, "z_trained", "float", shape=(n, k))
        if m["scalar"] and k != 1:
            io.invalid("meta.scalar", f"false for a readout of {k} components", True)
        names = {"z_init", "z_trained"}
        for s in m["slots"]:
            io.tensor(tensors, f"delta/{s.name}", "float", shape=s.shape)
            prefix = f"factors/{s.name}/"
            own = {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}
            try:
                f = from_state(own, s.shape)
            except ValueError as e:
                raise SaveFileError(f"the factor of {s.name!r}: {e}") from None
            if f.n_examples != n or f.n_outputs not in (1, k) or not f.dtype.is_floating_point:
                raise SaveFileError(f"the factor of {s.name!r} does not cover the {n} examples × {k} components")
            names |= {f"delta/{s.name}"} | {prefix + key for key in own}
        io.tensor_names(tensors, names)

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> EffectiveFeatures:
        slots = [ParamSlot.from_json(s) for s in meta["slots"]]
        factors = {}
        for s in slots:
            prefix = f"factors/{s.name}/"
            factors[s.name] = from_state(
                {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}, s.shape
            )
        delta = {s.name: tensors[f"delta/{s.name}"] for s in slots}
        return cls(
            factors,
            FeatureIds(slots),
            delta,
            tensors["z_init"],
            tensors["z_trained"],
            meta["order"],
            meta["scalar"],
            meta["meta"],
        )


def _position(i: object) -> int:
    """A flat feature position given as an integer (int, numpy or 0-d integer tensor)."""
    try:
        return operator.index(i)
    except TypeError:
        raise FeatureIdError(
            f"a feature is named by an id such as '0.weight[3,1]' or an integer position, got {i!r}"
        ) from None
