"""Eigenfeatures: the top eigenpairs of the effective kernel, from the factored feature operator.

With J the ``[N·K, P]`` feature matrix (rows: example-major pairs ``(n, k)`` at ``n·K + k``; columns: the
parameters of the chosen layer, or all), the effective kernel is ``J Jᵀ``. Its top eigenpairs
``J Jᵀ u_i = λ_i u_i`` give

- sample-space eigenfunctions ``u_i`` (unit norm over the ``N·K`` pairs): the directions in function space
  the kernel regresses on first;
- parameter-space directions ``d_i = Jᵀ u_i / √λ_i`` (unit norm, the right singular vectors of J): the
  eigenfeature's value at any input x is the projection ``φ^E(x) · d_i`` (``= √λ_i u_i`` on the data).

The eigenpairs come from Lanczos iteration (ARPACK's implicitly restarted Lanczos, ``scipy.sparse.linalg.eigsh``)
on the operator ``u ↦ J (Jᵀ u)``, two passes over the factors per step — the kernel matrix is never formed.
For small ``N·K`` an exact dense path (``features.kernel()`` and ``eigh``) is cheaper; ``method="auto"`` picks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor

from .errors import ConfigError, DataError
from .features import EffectiveFeatures
from .ids import FeatureIds, ParamSlot

METHODS = ("auto", "dense", "lanczos")
# method="auto" forms the kernel densely up to this many (example, component) pairs.
_DENSE_PAIRS = 2048


class KernelOperator:
    """The effective kernel ``J Jᵀ`` of some parameter tensors as an operator on ``[N·K]`` vectors.

    features: the effective features; params: restrict J to these tensors (state_dict or named_parameters
    names; None: all). Pairs are example-major: ``(n, k)`` at row ``n·K + k``.
    """

    def __init__(self, features: EffectiveFeatures, params: Sequence[str] | None = None):
        self.features = features
        names = [s.name for s in features.slots] if params is None else [features.ids.slot(p).name for p in params]
        self.slots = [s for s in features.slots if s.name in set(names)]
        self.n_pairs = features.n_examples * features.n_outputs

    @property
    def n_params(self) -> int:
        return sum(s.numel for s in self.slots)

    def jvp(self, w: Tensor) -> Tensor:
        """``[N·K]``: ``J w`` for ``w [P_sel]`` (the selected tensors, in slot order)."""
        out = torch.zeros(self.features.n_examples, self.features.n_outputs, dtype=w.dtype, device=w.device)
        start = 0
        for s in self.slots:
            out += self.features.factors[s.name].matvec(w[start : start + s.numel])
            start += s.numel
        return out.reshape(-1)

    def vjp(self, u: Tensor) -> Tensor:
        """``[P_sel]``: ``Jᵀ u`` for ``u [N·K]``."""
        c = u.reshape(self.features.n_examples, self.features.n_outputs)
        return torch.cat([self.features.factors[s.name].rmatvec(c) for s in self.slots])

    def matvec(self, u: Tensor) -> Tensor:
        """``[N·K]``: ``J Jᵀ u``."""
        return self.jvp(self.vjp(u))

    def dense(self) -> Tensor:
        """``[N·K, N·K]`` the kernel matrix, from the factors' Gram products."""
        names = [s.name for s in self.slots]
        k = self.features.kernel(params=names)
        return k.reshape(self.n_pairs, self.n_pairs)


class Cliff(NamedTuple):
    """The largest ratio ``λ_i / λ_{i+1}`` among the top eigenvalues: the first `index` + 1 stand apart."""

    index: int | None
    ratio: float


def eigenfeatures(
    features: EffectiveFeatures,
    k: int = 10,
    layer: str | Sequence[str] | None = None,
    method: str = "auto",
    tol: float | None = None,
    seed: int = 0,
) -> Eigenfeatures:
    """Top-`k` eigenpairs of the effective kernel ``J Jᵀ`` (flattened example-major over readout components).

    Args:
        features: effective features of a dataset.
        k: number of eigenpairs (at most N·K).
        layer: restrict to one parameter tensor (or a list), by state_dict or named_parameters name: the
            layerwise kernel. None: every parameter.
        method: ``"lanczos"`` (factored operator), ``"dense"`` (form the kernel, ``eigh``) or ``"auto"``
            (dense up to 2048 pairs).
        tol: Lanczos relative accuracy (default 1e-10 in float64, 1e-5 in float32).
        seed: seeds the Lanczos start vector.

    Example::

        eig = ef.eigenfeatures(feats, k=10)
        eig.values, eig.functions[:, 0], eig.directions(0), eig.cliff
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method={method!r}; choose one of {', '.join(repr(m) for m in METHODS)}")
    params = [layer] if isinstance(layer, str) else (None if layer is None else list(layer))
    op = KernelOperator(features, params)
    n = op.n_pairs
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise DataError(
            f"k={k} eigenpairs asked of a kernel over {n} (example, component) pairs; pass k ≤ {n} or more data"
        )
    dense = method == "dense" or (method == "auto" and n <= _DENSE_PAIRS) or k == n
    if dense:
        values, vectors = _dense_top(op, k)
        used = "dense"
    else:
        if tol is None:
            tol = 1e-10 if features.dtype == torch.float64 else 1e-5
        values, vectors = _lanczos_top(op, k, tol, seed)
        used = "lanczos"
    vectors = _fix_signs(vectors)
    directions = torch.stack([_direction(op, vectors[:, i], values[i]) for i in range(k)])
    functions = vectors.reshape(features.n_examples, features.n_outputs, k)
    if features.scalar:
        functions = functions[:, 0]
    meta = {
        "method": used,
        "order": features.order,
        "layer": None if params is None else [s.state_name for s in op.slots],
        "scalar": features.scalar,
    }
    return Eigenfeatures(values, functions, directions, features.ids.slots, [s.name for s in op.slots], meta)


def _dense_top(op: KernelOperator, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of the formed kernel; ``eigh`` runs in float64 (LAPACK's float32 solver fails on ill-conditioned
    kernels, e.g. those of trained toy models of superposition)."""
    kernel = op.dense()
    evals, evecs = torch.linalg.eigh(kernel.to(torch.float64))
    return evals.flip(0)[:k].clamp_min(0).to(kernel.dtype), evecs.flip(1)[:, :k].to(kernel.dtype)


def _lanczos_top(op: KernelOperator, k: int, tol: float, seed: int) -> tuple[Tensor, Tensor]:
    f = op.features
    n = op.n_pairs

    def mv(x: np.ndarray) -> np.ndarray:
        u = torch.from_numpy(np.ascontiguousarray(x.reshape(-1))).to(f.dtype)
        return op.matvec(u).to(torch.float64).numpy()

    v0 = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    lin = LinearOperator((n, n), matvec=mv, dtype=np.float64)
    ncv = min(n, max(2 * k + 1, 20))
    evals, evecs = eigsh(lin, k=k, which="LA", v0=v0, tol=tol, ncv=ncv)
    order = np.argsort(-evals, kind="stable")
    values = torch.from_numpy(evals[order].copy()).to(f.dtype).clamp_min(0)
    return values, torch.from_numpy(evecs[:, order].copy()).to(f.dtype)


def _fix_signs(vectors: Tensor) -> Tensor:
    """Make each eigenvector's largest-magnitude entry positive (eigenvectors are defined up to sign)."""
    pick = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pick, torch.arange(vectors.shape[1])])
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def _direction(op: KernelOperator, u: Tensor, value: Tensor) -> Tensor:
    """``[P_sel]``: ``Jᵀ u / √λ`` (zero for λ = 0)."""
    if float(value) <= 0:
        return torch.zeros(op.n_params, dtype=u.dtype, device=u.device)
    return op.vjp(u) / value.sqrt()


@dataclass
class Eigenfeature:
    """Handle on eigenfeature `index` of an `Eigenfeatures` (what ``eig[i]`` returns)."""

    source: Eigenfeatures
    index: int

    @property
    def id(self) -> str:
        layer = self.source.meta.get("layer")
        where = f"@{'+'.join(layer)}" if layer else ""
        return f"eigen[{self.index}]{where}"

    @property
    def value(self) -> float:
        """λ_i, the eigenvalue."""
        return float(self.source.values[self.index])

    def direction(self) -> Tensor:
        """``[P]`` the unit parameter-space direction ``d_i``."""
        return self.source.directions(self.index)


@dataclass
class Eigenfeatures:
    """Top-k eigenpairs of an effective kernel.

    Attributes:
        values: ``[k]`` eigenvalues λ of ``J Jᵀ`` (sums over examples, not means), descending.
        functions: ``[N, k]`` (scalar readout) or ``[N, K, k]``: unit sample-space eigenvectors ``u_i``,
            each with its largest-magnitude entry positive.
        direction_matrix: ``[k, P_sel]``: parameter directions ``d_i = Jᵀu_i/√λ_i`` over the tensors in
            `params` (in slot order); `directions(i)` embeds one in the full ``[P]`` axis.
        slots: the model's parameter slots (the full feature axis); params: names of the tensors the kernel
            covers (all, or the `layer`).
        meta: ``method`` (``"dense"`` or ``"lanczos"``), ``order``, ``layer`` (state names or None), ``scalar``.
    """

    values: Tensor
    functions: Tensor
    direction_matrix: Tensor
    slots: list[ParamSlot]
    params: list[str]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> Eigenfeature:
        if not -len(self) <= i < len(self):
            raise IndexError(f"eigenfeature {i} out of range for {len(self)} eigenpairs")
        return Eigenfeature(self, i % len(self))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def n_features(self) -> int:
        return self.slots[-1].offset + self.slots[-1].numel

    @property
    def cliff(self) -> Cliff:
        """The largest gap ratio ``λ_i/λ_{i+1}`` among the top values (``inf`` where ``λ_{i+1} = 0``)."""
        if len(self) < 2:
            return Cliff(None, math.nan)
        v = self.values.tolist()
        ratios = [a / b if b > 0 else (math.inf if a > 0 else 1.0) for a, b in zip(v[:-1], v[1:])]
        i = max(range(len(ratios)), key=lambda j: (ratios[j], -j))
        return Cliff(i, ratios[i])

    def directions(self, i: int) -> Tensor:
        """``[P]``: the unit parameter-space direction of eigenfeature i (zeros outside `params`)."""
        out = torch.zeros(self.n_features, dtype=self.direction_matrix.dtype)
        start = 0
        selected = set(self.params)
        for s in self.slots:
            if s.name in selected:
                out[s.offset : s.offset + s.numel] = self.direction_matrix[i, start : start + s.numel]
                start += s.numel
        return out

    def project(self, features: EffectiveFeatures) -> Tensor:
        """``[N', (K,) k]``: every eigenfeature's value ``φ^E(x)·d_i`` on other features of the same model."""
        if features.n_features != self.n_features:
            raise ConfigError(
                f"these eigenfeatures belong to a model with {self.n_features} parameters, the features "
                f"have {features.n_features}; use features of the same model"
            )
        op = KernelOperator(features, self.params)
        out = torch.stack([op.jvp(d.to(features.dtype)) for d in self.direction_matrix], dim=-1)
        out = out.reshape(features.n_examples, features.n_outputs, len(self))
        return out[:, 0] if features.scalar else out

    def __repr__(self) -> str:
        shown = ", ".join(f"{v:.4g}" for v in self.values[:6].tolist()) + (", ..." if len(self) > 6 else "")
        cliff = self.cliff
        layer = self.meta.get("layer")
        return (
            f"Eigenfeatures(k={len(self)}, values=[{shown}], cliff=after {cliff.index} (×{cliff.ratio:.3g}), "
            f"layer={layer if layer else 'all'}, method={self.meta.get('method')!r})"
        )

    # ---- persistence ----------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {"values": self.values, "functions": self.functions, "direction_matrix": self.direction_matrix}
        meta = {
            "kind": "Eigenfeatures",
            "slots": [[s.name, s.state_name, list(s.shape), s.offset] for s in self.slots],
            "params": list(self.params),
            "meta": dict(self.meta),
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Eigenfeatures:
        slots = [ParamSlot(n, s, tuple(shape), off) for n, s, shape, off in meta["slots"]]
        return cls(
            tensors["values"],
            tensors["functions"],
            tensors["direction_matrix"],
            slots,
            list(meta["params"]),
            dict(meta["meta"]),
        )

    @property
    def ids(self) -> FeatureIds:
        """The model's feature ids (the axis of `directions`)."""
        return FeatureIds(self.slots)
