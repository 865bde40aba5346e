"""`EffectiveFeatures`: the factored store of one dataset's effective features at one order."""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._memory import check_fits
from .errors import ConfigError, FeatureIdError
from .factors import Factor, cat_examples, factor_gram
from .ids import FeatureIds, ParamSlot


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
            f"tensors={len(self.factors)} ({'/'.join(sorted(kinds))}), completeness={self.completeness():.3g})"
        )

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
    def delta_z(self) -> Tensor:
        """``[N(, K)]``: Δz = f(x; θ*) − f(x; θ0) under the readout."""
        return self._out(self.z_trained - self.z_init)

    def prediction(self) -> Tensor:
        """``[N(, K)]``: the dual model ``z0(x) + Σ_μ Δθ_μ φ^E_μ(x)``."""
        return self._out(self.z_init) + self.matvec(self.flat_delta())

    def residual(self) -> Tensor:
        """``[N(, K)]``: dual prediction minus the trained network's output."""
        return self.prediction() - self._out(self.z_trained)

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

    def kernel(self, other: EffectiveFeatures | None = None, params: Sequence[str] | None = None) -> Tensor:
        """The effective kernel ``Σ_μ φ^E_μ(x) φ^E_μ(x')``: ``[N, M]`` (scalar) or ``[N, K, M, K]``.

        other: features of a second dataset (same model and order); params: restrict the sum to these
        parameter tensors (a layerwise kernel), by state_dict or named_parameters name.
        """
        other = self if other is None else other
        if other.slots != self.slots:
            raise ConfigError(
                "the two feature sets belong to models with different parameters; a kernel pairs features of the "
                "same architecture (compute both with the same DualModel)"
            )
        names = self.param_names(params)
        n, k, m, l = self.n_examples, self.n_outputs, other.n_examples, other.n_outputs
        check_fits(
            n * k * m * l,
            self.dtype,
            what=f"the kernel [{n}, {k}, {m}, {l}]",
            alternative="compute it on fewer examples, in blocks of rows with select_rows(), or on disk with "
            "efffeat.distributed.kernel_to_disk",
        )
        out = torch.zeros(n, k, m, l, dtype=self.dtype, device=self.device)
        for name in names:
            factor_gram(self.factors[name], other.factors[name], out)
        return out[:, 0, :, 0] if self.scalar and other.scalar else out

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
        """``[P]``: ``Σ_{x,k} w(x, k) φ^E_μ(x, k)²`` for every feature at once, from the factors."""
        w = None if weights is None else self._in(weights)
        return torch.cat([self.factors[s.name].sq_sum(w) for s in self.slots])


def _position(i: object) -> int:
    """A flat feature position given as an integer (int, numpy or 0-d integer tensor)."""
    try:
        return operator.index(i)
    except TypeError:
        raise FeatureIdError(
            f"a feature is named by an id such as '0.weight[3,1]' or an integer position, got {i!r}"
        ) from None
