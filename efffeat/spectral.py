"""Spectral analysis of effective kernels: eigenmodes, spectral cliffs, Fourier overlaps, tracking over training.

The protocol of eNTK feature identification (Lin 2025, arXiv 2510.00468), as options on any effective features:

- a **layerwise** kernel sums over one parameter tensor (or a few) instead of all of them (``params=``);
- a vector readout gives a kernel ``[N, K, N, K]``; its output axes are reduced by ``reduce=``:

  ============ ======================================================= ==========
  reduce       kernel                                                  shape
  ============ ======================================================= ==========
  flatten      ``s_k s_l K[n, k, m, l]`` at row ``k·N + n``, column     ``[KN, KN]``
               ``l·N + m`` (output-major)
  diagonal     ``(1/K) Σ_k w_k K[n, k, m, k]``                          ``[N, N]``
  pairs        ``(1/K²) Σ_{k,l} s_k s_l K[n, k, m, l]``                 ``[N, N]``
  ============ ======================================================= ==========

  with optional output weights ``w_k`` (importance rescaling, ``s_k = √w_k``; `importance_weights`);
- eigenvectors are taken after a ridge of ``1e-8 · mean(diag)`` (`eigenmodes`), sorted by decreasing eigenvalue;
- the alignment of a block of eigenvectors with a family of features is the **overlap** ``‖Qᵀ F‖²_F``, Q an
  orthonormal basis of the block and F the mean-centred, orthonormalised features (`overlap`); it lies in
  ``[0, min(rank Q, rank F)]``. `fourier_basis` and `modadd_fourier_families` build the Fourier families of
  modular addition;
- large gaps of the spectrum are **cliffs** (`spectral_cliffs`); an analysis repeated over checkpoints gives a
  series and its central-difference derivative (`track`).

The diagonal and pairs reductions are computed from the factors, without the ``[N, K, N, K]`` kernel; the
flattened kernel's top eigenmodes come from the ``P × P`` Gram matrix of the features (`flattened_modes`) when
``K·N`` is larger than P.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._memory import check_fits
from .errors import ConfigError, DataError
from .factors import DenseFactor, Factor, LowRankFactor, factor_gram
from .features import EffectiveFeatures

REDUCTIONS = ("flatten", "diagonal", "pairs")
DEFAULT_RIDGE = 1e-8

# Rows of the dense feature matrix built at once by `flattened_modes` (elements).
_DENSE_CHUNK_ELEMENTS = 1 << 24


# ---- output weights and reductions -------------------------------------------------------------------------
def importance_weights(importance: float, n_outputs: int, beta: float = 1.0) -> Tensor:
    """``[K]`` output weights ``w_k = importance^(β k)``: the importance-weighted loss of toy models.

    ``β = 1`` weighs each output block by its loss weight (kernel blocks scaled by ``√(w_k w_l)``);
    ``β < 1`` softens it; ``β = 0`` is no rescaling.
    """
    if not importance > 0:
        raise ConfigError(f"importance must be positive, got {importance!r}")
    return torch.tensor(float(importance), dtype=torch.float64) ** (beta * torch.arange(n_outputs, dtype=torch.float64))


def _check_reduce(reduce: str) -> str:
    if reduce not in REDUCTIONS:
        raise ConfigError(f"unknown reduce {reduce!r}; choose one of {', '.join(repr(r) for r in REDUCTIONS)}")
    return reduce


def _weights(output_weights: Tensor | Sequence[float] | None, k: int, like: Tensor) -> Tensor:
    if output_weights is None:
        return torch.ones(k, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(output_weights, dtype=like.dtype, device=like.device)
    if w.shape != (k,):
        raise ConfigError(f"output_weights must have one entry per readout component ({k}), got shape {tuple(w.shape)}")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ConfigError("output_weights must be finite and non-negative (they rescale kernel blocks by √(w_k w_l))")
    return w


def reduce_outputs(kernel: Tensor, reduce: str = "pairs", output_weights: Tensor | None = None) -> Tensor:
    """Reduce the output axes of a kernel ``[N, K, M, K]`` (see the module table).

    Returns ``[K·N, K·M]`` for ``"flatten"`` (output-major rows ``k·N + n``), ``[N, M]`` otherwise.
    """
    _check_reduce(reduce)
    if kernel.ndim != 4 or kernel.shape[1] != kernel.shape[3]:
        raise ConfigError(f"expected a kernel [N, K, M, K], got shape {tuple(kernel.shape)}")
    n, k, m, _ = kernel.shape
    w = _weights(output_weights, k, kernel)
    s = w.sqrt()
    if reduce == "flatten":
        scaled = kernel * s[None, :, None, None] * s[None, None, None, :]
        return scaled.permute(1, 0, 3, 2).reshape(k * n, k * m)
    if reduce == "diagonal":
        return torch.einsum("nkmk,k->nm", kernel, w) / k
    return torch.einsum("nkml,k,l->nm", kernel, s, s) / k**2


def _diagonal_gram(f: Factor, w: Tensor) -> Tensor:
    """``[N, N]``: ``Σ_k w_k ⟨G[n, k], G[m, k]⟩`` as few large matmuls.

    When one factor is shared by every component (``Kv = 1``, a layer input), ``Σ_k (u_k·u'_k)`` is one matmul
    over the flattened ``(k, d0)`` axis, per pair of rank terms.
    """
    s = w.sqrt()
    if isinstance(f, DenseFactor):
        g = f.g * s[None, :, None] if f.g.shape[1] > 1 else f.g * w.sum().sqrt()
        flat = g.reshape(g.shape[0], -1)
        return flat @ flat.T
    u, v = f.u, f.v
    ku, kv = u.shape[1], v.shape[1]
    if ku > 1 and kv > 1:
        out = torch.zeros(u.shape[0], u.shape[0], dtype=u.dtype, device=u.device)
        for k in range(ku):
            part = LowRankFactor(u[:, k : k + 1] * s[k], v[:, k : k + 1])
            out += factor_gram(part, part)[:, 0, :, 0]
        return out
    if ku == 1 and kv == 1:
        return factor_gram(f, f)[:, 0, :, 0] * w.sum()
    shared, per_k = (v, u) if kv == 1 else (u, v)
    per_k = per_k * s[None, :, None, None]
    n, _, r, _ = per_k.shape
    out = torch.zeros(n, n, dtype=u.dtype, device=u.device)
    for i in range(r):
        a_i, b_i = per_k[:, :, i].reshape(n, -1), shared[:, 0, i]
        for j in range(r):
            out += (a_i @ per_k[:, :, j].reshape(n, -1).T) * (b_i @ shared[:, 0, j].T)
    return out


def _output_sum(f: Factor, c: Tensor) -> Factor:
    """The factor of ``Σ_k c_k G[n, k]`` (K axis of length 1), in whichever layout is smaller."""
    if isinstance(f, DenseFactor):
        if f.g.shape[1] == 1:
            return DenseFactor(f.g * c.sum())
        return DenseFactor(torch.einsum("nkp,k->np", f.g, c)[:, None])
    u, v = f.u, f.v
    ku, kv = u.shape[1], v.shape[1]
    if ku == 1 and kv == 1:
        return LowRankFactor(u * c.sum(), v)
    if kv == 1:
        return LowRankFactor(torch.einsum("nkrd,k->nrd", u, c)[:, None], v)
    if ku == 1:
        return LowRankFactor(u, torch.einsum("nkrd,k->nrd", v, c)[:, None])
    n, k, r, d0 = u.shape
    d1 = v.shape[-1]
    if k * r * (d0 + d1) > d0 * d1:
        return DenseFactor(torch.einsum("nkri,nkrj,k->nij", u, v, c).reshape(n, 1, d0 * d1))
    return LowRankFactor((u * c[None, :, None, None]).reshape(n, 1, k * r, d0), v.reshape(n, 1, k * r, d1))


def effective_kernel(
    feats: EffectiveFeatures,
    params: str | Sequence[str] | None = None,
    reduce: str = "pairs",
    output_weights: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """The effective kernel of `feats`, restricted to `params` (layerwise) and reduced over its outputs.

    Args:
        feats: effective features of N examples with K readout components (K = 1 for a scalar readout).
        params: parameter tensors to sum over (state_dict or named_parameters names); None = all.
        reduce: ``"flatten" | "diagonal" | "pairs"`` (module table); irrelevant when K = 1.
        output_weights: ``[K]`` weights w_k (importance rescaling); None = 1.

    Returns:
        ``[K·N, K·N]`` (flatten, output-major) or ``[N, N]``. The diagonal and pairs kernels are built from
        the factors (per-component Grams, or one Gram of the weighted output sum), never as ``[N, K, N, K]``.
    """
    _check_reduce(reduce)
    names = feats.param_names(params)
    n, k = feats.n_examples, feats.n_outputs
    w = _weights(output_weights, k, feats.z_init)
    if reduce == "flatten":
        check_fits(n * n * k * k, feats.dtype, f"the flattened kernel [{k * n}, {k * n}]", _FLATTEN_ALTERNATIVE)
        full = feats.kernel(params=names)
        return reduce_outputs(full if full.ndim == 4 else full[:, None, :, None], "flatten", w)
    check_fits(n * n, feats.dtype, f"the kernel [{n}, {n}]", "compute it on fewer examples (select_rows)")
    out = torch.zeros(n, n, dtype=feats.dtype, device=feats.device)
    for name in names:
        f = feats.factors[name]
        if reduce == "pairs":
            summed = _output_sum(f, w.sqrt() / k)
            out += factor_gram(summed, summed)[:, 0, :, 0]
        else:
            out += _diagonal_gram(f, w) / k
    return out


_FLATTEN_ALTERNATIVE = "use flattened_modes(feats, k), which works from the P × P Gram of the features"


# ---- eigenmodes --------------------------------------------------------------------------------------------
@dataclass
class Spectrum:
    """Top eigenmodes of a kernel, largest first.

    Attributes:
        eigenvalues: ``[k]`` eigenvalues of the ridged kernel, decreasing.
        eigenvectors: ``[N, k]`` orthonormal eigenvectors (columns), N rows of the (reduced) kernel.
        ridge: the ridge added to the diagonal (absolute, ``ridge_rel · mean(diag)``).
        meta: JSON-able description (reduce, params, order, ...).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    ridge: float
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.eigenvalues.shape[0]

    def modes(self, start: int, stop: int) -> Tensor:
        """``[N, stop - start]``: eigenvectors ``start … stop − 1``."""
        if not 0 <= start < stop <= len(self):
            raise ConfigError(f"modes {start}:{stop} are outside the {len(self)} eigenmodes kept")
        return self.eigenvectors[:, start:stop]

    def cliffs(self, n: int | None = None, min_ratio: float = 10.0) -> list[int]:
        """`spectral_cliffs` of the eigenvalues."""
        return spectral_cliffs(self.eigenvalues, n=n, min_ratio=min_ratio)

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        return (
            {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors},
            {"ridge": self.ridge, "meta": dict(self.meta)},
        )

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict) -> Spectrum:
        return cls(tensors["eigenvalues"], tensors["eigenvectors"], float(meta["ridge"]), dict(meta["meta"]))


def eigenmodes(kernel: Tensor, k: int | None = None, ridge: float = DEFAULT_RIDGE) -> Spectrum:
    """Eigenvectors of a symmetric kernel ``[N, N]`` after adding ``ridge · mean(diag)`` to its diagonal.

    Computed in float64 (``torch.linalg.eigh``); returns the top `k` (all when None), largest first.
    """
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ConfigError(
            f"expected a square kernel [N, N], got shape {tuple(kernel.shape)}; reduce a [N, K, N, K] kernel "
            "first with reduce_outputs(kernel, 'flatten' | 'diagonal' | 'pairs')"
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
    return Spectrum(vals.flip(0)[:k], vecs.flip(1)[:, :k], shift, {"n_rows": n})


def flattened_modes(
    feats: EffectiveFeatures,
    k: int,
    params: str | Sequence[str] | None = None,
    output_weights: Tensor | Sequence[float] | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> Spectrum:
    """Top-k eigenmodes of the flattened kernel ``[K·N, K·N]`` through the ``P × P`` Gram ``JᵀSJ`` of the features.

    ``J [K·N, P]`` (output-major rows, scaled by ``s_k = √w_k``) has the kernel ``J Jᵀ`` and the Gram ``Jᵀ J``
    with the same non-zero eigenvalues; the kernel's eigenvectors are ``J v / √λ``. Rows of J are formed a
    chunk of examples at a time, so this suits models with a small P (the kernel's rank is at most P); the
    ridge shifts every eigenvalue by ``ridge · mean(diag)`` as in `eigenmodes`.
    """
    names = feats.param_names(params)
    n, kk = feats.n_examples, feats.n_outputs
    sizes = [feats.factors[name].numel for name in names]
    p = sum(sizes)
    if not 1 <= k <= min(p, n * kk):
        raise ConfigError(f"k must be between 1 and min(P, K·N) = {min(p, n * kk)} (the kernel's rank bound), got {k}")
    check_fits(p * p, torch.float64, f"the parameter-space Gram [{p}, {p}]", "restrict params= to fewer tensors")
    s = _weights(output_weights, kk, feats.z_init).to(torch.float64).sqrt()
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
    out = torch.empty(kk, n, k, dtype=torch.float64, device=feats.device)
    for start in range(0, n, step):
        block = rows(start) @ vecs / vals.sqrt()  # [n_chunk, K, k]
        out[:, start : start + block.shape[0]] = block.transpose(0, 1)
    return Spectrum(vals + shift, out.reshape(kk * n, k), shift, {"n_rows": kk * n, "reduce": "flatten"})


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


# ---- feature families and overlaps -------------------------------------------------------------------------
def fourier_basis(values: Tensor, p: int, frequencies: Sequence[int] | None = None) -> Tensor:
    """``[N, 2F]``: ``cos(2π f v / p), sin(2π f v / p)`` for each frequency f (default ``1 … ⌊p/2⌋``), in pairs."""
    v = torch.as_tensor(values).to(torch.float64) % p
    freqs = list(range(1, p // 2 + 1)) if frequencies is None else [int(f) for f in frequencies]
    if not freqs:
        raise ConfigError("frequencies is empty; pass at least one frequency in 1 … p // 2")
    ang = 2 * math.pi * torch.tensor(freqs, dtype=torch.float64)[None, :] * v[:, None] / p  # [N, F]
    return torch.stack([ang.cos(), ang.sin()], dim=2).reshape(v.shape[0], 2 * len(freqs))


def modadd_fourier_families(
    a: Tensor, b: Tensor, p: int, frequencies: Sequence[int] | None = None
) -> dict[str, Tensor]:
    """Fourier families of modular addition inputs ``(a, b)``, each ``[N, 2F]`` (``inputs`` is ``[N, 4F]``).

    ``sum``: F(a + b); ``difference``: F(a − b); ``a``, ``b``: one input alone; ``inputs``: [F(a), F(b)] (the
    single-input modes); ``input_sum``: F(a) + F(b) (the per-input sum modes).
    """
    fa, fb = fourier_basis(a, p, frequencies), fourier_basis(b, p, frequencies)
    return {
        "sum": fourier_basis(torch.as_tensor(a) + torch.as_tensor(b), p, frequencies),
        "difference": fourier_basis(torch.as_tensor(a) - torch.as_tensor(b), p, frequencies),
        "a": fa,
        "b": fb,
        "inputs": torch.cat([fa, fb], dim=1),
        "input_sum": fa + fb,
    }


def orthonormal_columns(x: Tensor, center: bool = False, rtol: float = 1e-8) -> Tensor:
    """``[N, r]``: an orthonormal basis of the column span of ``x [N, m]`` (float64), r its numerical rank.

    center: subtract each column's mean first (drops the constant mode). Directions with singular value below
    ``rtol · σ_max`` are dropped, so the basis has exactly the rank of x.
    """
    x = torch.as_tensor(x).to(torch.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ConfigError(f"expected a matrix [N, m] of column vectors, got shape {tuple(x.shape)}")
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    u, sv, _ = torch.linalg.svd(x, full_matrices=False)
    if sv.numel() == 0 or float(sv[0]) == 0.0:
        return u[:, :0]
    return u[:, sv > rtol * sv[0]]


def overlap(modes: Tensor, features: Tensor, center: bool = True) -> float:
    """``‖Qᵀ F‖²_F``: how much of the feature family lies in the span of the modes.

    modes: ``[N, d]`` eigenvectors (columns); Q is an orthonormal basis of their span. features: ``[N, m]``;
    F is an orthonormal basis of their (mean-centred when `center`) span. The value lies in
    ``[0, min(rank Q, rank F)]``; it equals rank F when the family lies inside the span of the modes.
    """
    if modes.shape[0] != features.shape[0]:
        raise ConfigError(
            f"modes have {modes.shape[0]} rows but the features have {features.shape[0]}; evaluate both on "
            "the same inputs (for a flattened kernel, lift the features to K·N rows)"
        )
    q = orthonormal_columns(modes)
    f = orthonormal_columns(features, center=center)
    return float((q.T @ f).square().sum())


def argmax_features(modes: Tensor, indicators: Tensor) -> Tensor:
    """``[d]``: for each mode, the indicator column it aligns with most (largest ``|cos|``).

    modes: ``[R, d]``; indicators: ``[R, C]`` ground-truth directions on the same R rows (e.g. a feature's value
    on each input, lifted to the output-major rows of a flattened kernel).
    """
    if modes.shape[0] != indicators.shape[0]:
        raise ConfigError(f"modes have {modes.shape[0]} rows but the indicators have {indicators.shape[0]}")
    m = modes.to(torch.float64)
    z = indicators.to(torch.float64)
    cos = (z / z.norm(dim=0).clamp_min(1e-300)).T @ (m / m.norm(dim=0).clamp_min(1e-300))  # [C, d]
    return cos.abs().argmax(dim=0)


# ---- tracking over training --------------------------------------------------------------------------------
def central_difference(values: Tensor | Sequence[float], epochs: Tensor | Sequence[float] | None = None) -> Tensor:
    """``[T]`` derivative of a series: central differences inside, one-sided at the two ends.

    ``d_i = (y_{i+1} − y_{i−1}) / (x_{i+1} − x_{i−1})``; x defaults to ``0 … T−1``.
    """
    y = torch.as_tensor(values, dtype=torch.float64)
    x = torch.arange(y.shape[0]) if epochs is None else torch.as_tensor(epochs)
    x = x.to(torch.float64)
    if y.ndim != 1 or y.shape[0] < 2 or x.shape != y.shape:
        raise ConfigError("central_difference needs matching 1-d series of at least two points")
    if bool((x[1:] <= x[:-1]).any()):
        raise ConfigError("epochs must be strictly increasing")
    d = torch.empty_like(y)
    d[0] = (y[1] - y[0]) / (x[1] - x[0])
    d[-1] = (y[-1] - y[-2]) / (x[-1] - x[-2])
    d[1:-1] = (y[2:] - y[:-2]) / (x[2:] - x[:-2])
    return d


@dataclass
class Tracking:
    """A scalar analysis over training checkpoints and its derivative.

    Attributes:
        epochs: ``[T]``; values: ``[T]`` the analysis at each checkpoint; derivative: ``[T]`` its central
        difference with respect to the epoch.
    """

    epochs: Tensor
    values: Tensor
    derivative: Tensor

    @property
    def peak_epoch(self) -> int:
        """The epoch where the derivative is largest."""
        return int(self.epochs[int(self.derivative.argmax())])

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        return {"epochs": self.epochs, "values": self.values, "derivative": self.derivative}, {}

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict) -> Tracking:
        return cls(tensors["epochs"], tensors["values"], tensors["derivative"])


def track(checkpoints: Iterable[tuple[int, Any]], analyse: Callable[[Any], float], progress: bool = True) -> Tracking:
    """Run ``analyse(state)`` on each ``(epoch, state)`` checkpoint; return the series and its derivative.

    state is whatever the checkpoints hold (a state_dict, a model); `analyse` returns one number, e.g. the
    overlap of a block of eigenmodes with a feature family.
    """
    epochs, values = [], []
    items = list(checkpoints)
    for epoch, state in tqdm(items, desc="checkpoints", disable=None if progress else True, leave=False):
        epochs.append(float(epoch))
        values.append(float(analyse(state)))
    if len(values) < 2:
        raise DataError(f"track needs at least two checkpoints, got {len(values)}")
    e = torch.tensor(epochs, dtype=torch.float64)
    v = torch.tensor(values, dtype=torch.float64)
    return Tracking(e, v, central_difference(v, e))
