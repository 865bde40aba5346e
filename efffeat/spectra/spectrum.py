"""Eigenfeatures and spectra of effective kernels: one `Spectrum` type, its cliffs, and the solvers.

With J the ``[N·K, P]`` feature matrix (rows: (example, component) pairs, **example-major** at ``n·K + k``,
the one flattening convention of efffeat; columns: the parameters of the chosen tensors, or all) the
effective kernel is ``J Jᵀ``. Its top eigenpairs ``J Jᵀ u_i = λ_i u_i`` give

- sample-space eigenfunctions ``u_i`` (unit norm over the ``N·K`` pairs): the directions in function space
  the kernel regresses on first;
- parameter-space directions ``d_i = Jᵀ u_i / √λ_i`` (unit norm, the right singular vectors of J): the
  eigenfeature's value at any input x is the projection ``φ^E(x) · d_i`` (``= √λ_i u_i`` on the data).

Solvers: `eigenfeatures` (Lanczos — ARPACK's implicitly restarted Lanczos, ``scipy.sparse.linalg.eigsh`` — on
the factored operator, two passes over the factors per step, or an exact dense ``eigh`` for small ``N·K``),
`flattened_modes` (through the ``P × P`` Gram ``Jᵀ J``, for models with few parameters) and `eigenmodes`
(any symmetric kernel matrix, e.g. a layerwise or output-reduced kernel from `EffectiveFeatures.kernel`).
Ridged spectra (``ridge · mean(diag)`` added to the diagonal) keep the eigenvalues positive so that drop
ratios — the spectrum's **cliffs** — are defined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import io
from .._check import one_of, positive_int
from .._memory import check_fits
from .._savable import register
from ..errors import ConfigError, DataError, SaveFileError
from ..features import EffectiveFeatures, component_weights
from ..ids import FeatureIds, ParamSlot
from .operator import KernelOperator

METHODS = ("auto", "dense", "lanczos")
DEFAULT_RIDGE = 1e-8
# method="auto" forms the kernel densely up to this many (example, component) pairs.
_DENSE_PAIRS = 2048
# Rows of the dense feature matrix built at once by `flattened_modes` (elements).
_DENSE_CHUNK_ELEMENTS = 1 << 24


class Cliff(NamedTuple):
    """The largest ratio ``λ_i / λ_{i+1}`` among the top eigenvalues: the first `index` + 1 stand apart."""

    index: int | None
    ratio: float


def spectral_cliffs(eigenvalues: Tensor, n: int | None = None, min_ratio: float = 10.0) -> list[int]:
    """Positions i of the spectrum's cliffs: the drop ``λ_i / λ_{i+1}`` after mode i is large.

    eigenvalues: ``[k]`` decreasing and positive (a ridged spectrum). With `n`, the n largest drops;
    otherwise every drop of at least `min_ratio`. Sorted ascending.
    """
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    if lam.ndim != 1 or lam.shape[0] < 2:
        raise ConfigError("spectral_cliffs needs a 1-d spectrum of at least two eigenvalues")
    if bool((lam <= 0).any()):
        raise DataError("spectral_cliffs needs positive eigenvalues; add a ridge (eigenmodes does)")
    ratio = lam[:-1] / lam[1:]
    if n is not None:
        top = torch.topk(ratio, min(n, ratio.shape[0])).indices
        return sorted(int(i) for i in top)
    return [int(i) for i in torch.nonzero(ratio >= min_ratio).flatten()]


def drop_ratios(eigenvalues: Tensor, positions: Sequence[int]) -> list[float]:
    """``λ_i / λ_{i+1}`` at each position i (the height of a cliff)."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    return [float(lam[i] / lam[i + 1]) for i in positions]


@dataclass
class Eigenfeature:
    """Handle on eigenfeature `index` of a `Spectrum` (what ``spectrum[i]`` returns)."""

    source: Spectrum
    index: int
    _prefix = "eigen"  # the id's name: eigen[i], change[i] (a class constant, not a field)

    @property
    def id(self) -> str:
        layer = self.source.meta.get("layer")
        where = f"@{'+'.join(layer)}" if layer else ""
        return f"{self._prefix}[{self.index}]{where}"

    @property
    def value(self) -> float:
        """λ_i, the eigenvalue."""
        return float(self.source.values[self.index])

    def direction(self) -> Tensor:
        """``[P]`` the unit parameter-space direction ``d_i``."""
        return self.source.directions(self.index)


@register
@dataclass
class Spectrum:
    """Top eigenpairs of a kernel, largest first.

    Attributes:
        values: ``[k]`` eigenvalues (sums over examples, not means; plus `ridge` when one was added), descending.
        functions: ``[N, k]`` (one row per kernel row: scalar readouts, reduced kernels) or ``[N, K, k]``
            (example, component) — unit sample-space eigenvectors ``u_i``; `eigenfeatures` makes each
            one's largest-magnitude entry positive.
        direction_matrix: ``[k, P_sel]`` parameter directions ``d_i = Jᵀu_i/√λ_i`` over the tensors in `params`
            (in slot order), or None for the spectrum of a kernel matrix; `directions(i)` embeds one in ``[P]``.
        slots: the model's parameter slots (the full feature axis) when there are directions; params: names
            of the tensors the kernel covers.
        ridge: the absolute ridge added to the diagonal (0 for none).
        meta: JSON-able description (``method``, ``order``, ``layer``, ``reduce``, ...).
    """

    values: Tensor
    functions: Tensor
    direction_matrix: Tensor | None = None
    slots: list[ParamSlot] | None = None
    params: list[str] | None = None
    ridge: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> Eigenfeature:
        if self.direction_matrix is None:
            raise ConfigError(
                "this spectrum comes from a kernel matrix and has no parameter directions; use "
                "ef.eigenfeatures(features) for eigenfeatures that can be searched and visualised"
            )
        if not -len(self) <= i < len(self):
            raise IndexError(f"eigenfeature {i} out of range for {len(self)} eigenpairs")
        return Eigenfeature(self, i % len(self))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def eigenvectors(self) -> Tensor:
        """``[R, k]``: the eigenvectors as columns over the kernel's R rows (example-major pairs)."""
        return self.functions.reshape(-1, len(self))

    def modes(self, start: int, stop: int) -> Tensor:
        """``[R, stop - start]``: eigenvectors ``start … stop − 1`` as columns."""
        if not 0 <= start < stop <= len(self):
            raise ConfigError(f"modes {start}:{stop} are outside the {len(self)} eigenmodes kept")
        return self.eigenvectors[:, start:stop]

    @property
    def cliff(self) -> Cliff:
        """The largest gap ratio ``λ_i/λ_{i+1}`` among the top values (``inf`` where ``λ_{i+1} = 0``)."""
        if len(self) < 2:
            return Cliff(None, math.nan)
        v = self.values.tolist()
        ratios = [a / b if b > 0 else (math.inf if a > 0 else 1.0) for a, b in zip(v[:-1], v[1:])]
        i = max(range(len(ratios)), key=lambda j: (ratios[j], -j))
        return Cliff(i, ratios[i])

    def cliffs(self, n: int | None = None, min_ratio: float = 10.0) -> list[int]:
        """`spectral_cliffs` of the eigenvalues."""
        return spectral_cliffs(self.values, n=n, min_ratio=min_ratio)

    @property
    def n_features(self) -> int:
        assert self.slots is not None
        return self.slots[-1].offset + self.slots[-1].numel

    @property
    def ids(self) -> FeatureIds:
        """The model's feature ids (the axis of `directions`)."""
        if self.slots is None:
            raise ConfigError("this spectrum comes from a kernel matrix and has no feature axis")
        return FeatureIds(self.slots)

    def directions(self, i: int) -> Tensor:
        """``[P]``: the unit parameter-space direction of eigenfeature i (zeros outside `params`)."""
        if self.direction_matrix is None or self.slots is None or self.params is None:
            raise ConfigError("this spectrum comes from a kernel matrix and has no parameter directions")
        return self._embed(self.direction_matrix[i])

    def _embed(self, selected_vector: Tensor) -> Tensor:
        """``[P]``: a vector over the tensors in `params` (``[P_sel]``, slot order), zeros elsewhere."""
        assert self.slots is not None and self.params is not None
        out = torch.zeros(self.n_features, dtype=selected_vector.dtype)
        start = 0
        selected = set(self.params)
        for s in self.slots:
            if s.name in selected:
                out[s.offset : s.offset + s.numel] = selected_vector[start : start + s.numel]
                start += s.numel
        return out

    def project(self, features: EffectiveFeatures) -> Tensor:
        """``[N', (K,) k]``: every eigenfeature's value ``φ^E(x)·d_i`` on other features of the same model."""
        if self.direction_matrix is None or self.params is None:
            raise ConfigError("this spectrum comes from a kernel matrix and has no parameter directions")
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
            f"Spectrum(k={len(self)}, values=[{shown}], cliff=after {cliff.index} (×{cliff.ratio:.3g}), "
            f"layer={layer if layer else 'all'}, method={self.meta.get('method')!r})"
        )

    # ---- persistence ----------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {"values": self.values, "functions": self.functions}
        if self.direction_matrix is not None:
            tensors["direction_matrix"] = self.direction_matrix
        meta = {
            "slots": None if self.slots is None else [s.to_json() for s in self.slots],
            "params": self.params,
            "ridge": self.ridge,
            "meta": dict(self.meta),
        }
        return tensors, meta

    @classmethod
    def validate_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Refuse (`SaveFileError`) a spectrum whose eigenpairs and directions do not fit together."""
        m = io.record(
            meta,
            "meta",
            {
                "slots": io.nullable(io.slots),
                "params": io.nullable(io.list_of(io.text(), unique=True)),
                "ridge": io.number(0),
                "meta": io.dict_of(),
            },
        )
        values = io.tensor(tensors, "values", "float", ndim=1)
        functions = io.tensor(tensors, "functions", "float", ndim=(2, 3))
        if functions.shape[-1] != len(values):
            io.invalid("tensor 'functions'", f"[N, (K,) {len(values)}] (one column per eigenvalue)", functions.shape)
        if m["slots"] is None and m["params"] is None:
            io.tensor_names(tensors, {"values", "functions"})
            return
        if m["slots"] is None or m["params"] is None:
            raise SaveFileError("meta.slots and meta.params are both given (parameter directions) or both null")
        numel = {s.name: s.numel for s in m["slots"]}
        unknown = [p for p in m["params"] if p not in numel]
        if unknown:
            io.invalid("meta.params", "names of the slots' parameters", unknown)
        io.tensor_names(tensors, {"values", "functions", "direction_matrix"})
        io.tensor(tensors, "direction_matrix", "float", shape=(len(values), sum(numel[p] for p in m["params"])))

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Spectrum:
        slots = None if meta["slots"] is None else [ParamSlot.from_json(s) for s in meta["slots"]]
        params = None if meta["params"] is None else list(meta["params"])
        return cls(
            tensors["values"],
            tensors["functions"],
            tensors.get("direction_matrix"),
            slots,
            params,
            float(meta["ridge"]),
            dict(meta["meta"]),
        )


# ---- eigenfeatures of the factored kernel -------------------------------------------------------------------
def eigenfeatures(
    features: EffectiveFeatures,
    k: int = 10,
    layer: str | Sequence[str] | None = None,
    method: str = "auto",
    tol: float | None = None,
    seed: int = 0,
) -> Spectrum:
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
    one_of("method", method, METHODS)
    params = [layer] if isinstance(layer, str) else (None if layer is None else list(layer))
    op = KernelOperator(features, params)
    n = op.n_pairs
    positive_int("k", k)
    if k > n:
        raise DataError(
            f"k={k} eigenpairs asked of a kernel over {n} (example, component) pairs; pass k ≤ {n} or more data"
        )
    dense = method == "dense" or (method == "auto" and n <= _DENSE_PAIRS) or k == n
    if dense:
        values, vectors = _dense_top(op, k)
    else:
        if tol is None:
            tol = 1e-10 if features.dtype == torch.float64 else 1e-5
        values, vectors = _lanczos_top(op, k, tol, seed)
    vectors = _fix_signs(vectors)
    directions = torch.stack([_direction(op, vectors[:, i], values[i]) for i in range(k)])
    functions = vectors.reshape(features.n_examples, features.n_outputs, k)
    if features.scalar:
        functions = functions[:, 0]
    meta = {
        "method": "dense" if dense else "lanczos",
        "order": features.order,
        "layer": None if params is None else [s.state_name for s in op.slots],
        "scalar": features.scalar,
    }
    return Spectrum(values, functions, directions, features.ids.slots, op.names, 0.0, meta)


def _dense_top(op: KernelOperator, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of the formed kernel; ``eigh`` runs in float64 (LAPACK's float32 solver fails on ill-conditioned
    kernels, e.g. those of trained toy models of superposition)."""
    kernel = op.dense()
    evals, evecs = torch.linalg.eigh(kernel.to(torch.float64))
    return evals.flip(0)[:k].clamp_min(0).to(kernel.dtype), evecs.flip(1)[:, :k].to(kernel.dtype)


def _lanczos_top(op: KernelOperator, k: int, tol: float, seed: int) -> tuple[Tensor, Tensor]:
    from scipy.sparse.linalg import LinearOperator, eigsh

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


# ---- spectra of kernel matrices, and through the parameter-space Gram --------------------------------------------
def eigenmodes(kernel: Tensor, k: int | None = None, ridge: float = DEFAULT_RIDGE) -> Spectrum:
    """Eigenvectors of a symmetric kernel ``[N, N]`` after adding ``ridge · mean(diag)`` to its diagonal.

    Computed in float64 (``torch.linalg.eigh``); returns the top `k` (all when None), largest first.
    """
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ConfigError(
            f"expected a square kernel [N, N], got shape {tuple(kernel.shape)}; reduce a [N, K, N, K] kernel "
            "first, e.g. features.kernel(reduce='flatten' | 'diagonal' | 'pairs')"
        )
    if not bool(torch.isfinite(kernel).all()):
        raise DataError("the kernel holds NaN or inf; check the features (completeness) and the model")
    n = kernel.shape[0]
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ConfigError(f"k must be between 1 and N = {n}, got {k}")
    sym = kernel.to(torch.float64)
    sym = (sym + sym.T) / 2
    shift = ridge * float(sym.diagonal().mean())
    vals, vecs = torch.linalg.eigh(sym + shift * torch.eye(n, dtype=sym.dtype, device=sym.device))
    return Spectrum(vals.flip(0)[:k], vecs.flip(1)[:, :k], ridge=shift, meta={"n_rows": n})


def flattened_modes(
    feats: EffectiveFeatures,
    k: int,
    params: str | Sequence[str] | None = None,
    output_weights: Tensor | Sequence[float] | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> Spectrum:
    """Top-k eigenpairs of the flattened kernel ``[N·K, N·K]`` through the ``P × P`` Gram ``Jᵀ S J``.

    ``J [N·K, P]`` (rows scaled by ``s_k = √w_k``, the `output_weights` — importance rescaling) has the
    kernel ``J Jᵀ`` and the Gram ``Jᵀ J`` with the same non-zero eigenvalues; the kernel's eigenvectors are
    ``J v / √λ`` and the Gram's eigenvectors v are the parameter directions. Rows of J are formed a chunk of
    examples at a time, so this suits models with a small P (the kernel's rank is at most P); the ridge
    shifts every eigenvalue by ``ridge · mean(diag)`` as in `eigenmodes`.
    """
    chosen = set(feats.param_names(params))
    names = [s.name for s in feats.slots if s.name in chosen]
    n, kk = feats.n_examples, feats.n_outputs
    sizes = [feats.factors[name].numel for name in names]
    p = sum(sizes)
    if not 1 <= k <= min(p, n * kk):
        raise ConfigError(f"k must be between 1 and min(P, K·N) = {min(p, n * kk)} (the kernel's rank bound), got {k}")
    check_fits(p * p, torch.float64, f"the parameter-space Gram [{p}, {p}]", "restrict params= to fewer tensors")
    s = component_weights(output_weights, kk, feats.z_init).to(torch.float64).sqrt()
    step = max(1, _DENSE_CHUNK_ELEMENTS // max(1, kk * p))

    def rows(start: int) -> Tensor:  # [n_chunk, K, P], scaled
        sub = slice(start, min(start + step, n))
        parts = [feats.factors[name].rows(sub).dense().to(torch.float64) for name in names]
        dense = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        if dense.shape[1] != kk:
            dense = dense.expand(dense.shape[0], kk, p)
        return dense * s[None, :, None]

    gram = torch.zeros(p, p, dtype=torch.float64, device=feats.device)
    for start in range(0, n, step):
        j = rows(start).reshape(-1, p)
        gram += j.T @ j
    shift = ridge * float(gram.diagonal().sum()) / (n * kk)
    vals, vecs = torch.linalg.eigh((gram + gram.T) / 2)
    vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k]
    if bool((vals <= 0).any()):
        raise DataError(f"the flattened kernel has rank {int((vals > 0).sum())} < k = {k}; ask for fewer modes")
    out = torch.empty(n, kk, k, dtype=torch.float64, device=feats.device)
    for start in range(0, n, step):
        block = rows(start) @ vecs / vals.sqrt()  # [n_chunk, K, k]
        out[start : start + block.shape[0]] = block
    meta = {"n_rows": kk * n, "reduce": "flatten", "order": feats.order, "method": "gram"}
    return Spectrum(vals + shift, out, vecs.T.contiguous(), feats.ids.slots, names, shift, meta)
