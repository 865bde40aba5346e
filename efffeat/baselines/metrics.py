"""Scores for learned units against ground truth: alignment, subspaces, purity, selectivity, Fourier structure,
sparsity, reconstruction.

Every function takes tensors or arrays and returns plain numbers or ``[n_units]`` tensors (float64).
Conventions: directions are rows (``[n, d]``); activations are ``[N, n_units]`` (examples × units).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DataError


def _t(x) -> Tensor:
    return torch.as_tensor(x).detach().to(torch.float64)


def _unit_rows(x, what: str) -> Tensor:
    x = _t(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"{what} must be a non-empty [n, d] matrix of row directions, got shape {tuple(x.shape)}")
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def cosines(a, b) -> Tensor:
    """``[n_a, n_b]``: |cos| between every row of `a` ``[n_a, d]`` and every row of `b` ``[n_b, d]``."""
    a, b = _unit_rows(a, "a"), _unit_rows(b, "b")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"directions live in different spaces: {a.shape[1]} vs {b.shape[1]} dimensions")
    return (a @ b.T).abs()


def mmcs(truth, learned) -> float:
    """Mean max cosine similarity: mean over ground-truth rows of the largest |cos| to any learned row.

    truth: ``[n_true, d]``; learned: ``[n_units, d]``. 1 = every true direction has a learned match.
    """
    return float(cosines(truth, learned).max(dim=1).values.mean())


def subspace_alignment(learned, basis) -> Tensor:
    """``[n_units]``: fraction of each learned row's squared norm inside ``span(basis)`` (basis ``[k, d]``)."""
    q, _ = torch.linalg.qr(_t(basis).T)  # [d, k]
    u = _unit_rows(learned, "learned")
    return (u @ q).square().sum(dim=1)


def n_matched(truth, learned) -> int:
    """How many distinct ground-truth rows are the best match (largest |cos|) of some learned row."""
    return int(cosines(learned, truth).argmax(dim=1).unique().numel())


def polysemanticity(learned, truth) -> Tensor:
    """``[n_units]``: participation ratio of each unit over the ground-truth directions.

    With ``p_j ∝ cos(unit, truth_j)²`` normalised to sum 1, returns ``1 / Σ_j p_j²``: 1 for a unit aligned with
    one true direction (monosemantic), n for one spread evenly over n.
    """
    c2 = (_unit_rows(learned, "learned") @ _unit_rows(truth, "truth").T).square()
    p = c2 / c2.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return 1 / p.square().sum(dim=1)


def feature_dimensionality(W) -> Tensor:
    """``[n_features]``: Elhage et al.'s per-feature dimensionality ``D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)²``.

    W: ``[n_hidden, n_features]``, column i is feature i's embedding. A feature with its own dimension has
    D = 1, the five features of a pentagon in 2 dimensions 2/5 each, an unrepresented feature ≈ 0.
    """
    W = _t(W)
    norms = W.norm(dim=0)
    unit = W / norms.clamp_min(1e-30)
    overlap = (unit.T @ W).square().sum(dim=1)  # Σ_j (Ŵ_i · W_j)²
    return norms.square() / overlap.clamp_min(1e-30)


def _activations(acts) -> Tensor:
    acts = _t(acts)
    if acts.ndim == 1:
        acts = acts[:, None]
    if acts.ndim != 2 or acts.shape[0] == 0:
        raise DataError(f"activations must be [N, n_units] with N > 0, got shape {tuple(acts.shape)}")
    return acts


def top_k_purity(acts, labels, k: int = 20) -> Tensor:
    """``[n_units]``: fraction of each unit's k most-activating examples that share their most common label."""
    acts, labels = _activations(acts), torch.as_tensor(labels).long()
    if labels.shape != acts.shape[:1]:
        raise DataError(f"labels must be [N] = [{acts.shape[0]}], got {tuple(labels.shape)}")
    if not 1 <= k <= acts.shape[0]:
        raise DataError(f"k must be between 1 and the number of examples ({acts.shape[0]}), got {k}")
    top = acts.topk(k, dim=0).indices.T  # [n_units, k]
    counts = torch.nn.functional.one_hot(labels[top], int(labels.max()) + 1).sum(dim=1)
    return counts.max(dim=1).values.double() / k


def class_selectivity(acts, labels) -> Tensor:
    """``[n_units]``: ``(μ_max − μ_rest) / (μ_max + μ_rest)`` of the class-mean |activation| (Morcos et al. 2018).

    μ_max: the largest class mean; μ_rest: the mean of the other class means. 1 = the unit responds to one
    class only, 0 = to all classes alike.
    """
    acts, labels = _activations(acts).abs(), torch.as_tensor(labels).long()
    classes = labels.unique()
    means = torch.stack([acts[labels == c].mean(dim=0) for c in classes])  # [n_classes, n_units]
    top = means.max(dim=0).values
    rest = (means.sum(dim=0) - top) / max(len(classes) - 1, 1)
    return (top - rest) / (top + rest).clamp_min(1e-30)


def l0(codes, threshold: float = 0.0) -> float:
    """Mean number of units per example with |code| > threshold."""
    return float((_activations(codes).abs() > threshold).sum(dim=1).double().mean())


def sparsity(codes, threshold: float = 0.0) -> float:
    """Fraction of (example, unit) entries with |code| ≤ threshold."""
    codes = _activations(codes)
    return float((codes.abs() <= threshold).double().mean())


def fvu(x, x_hat) -> float:
    """Fraction of variance unexplained: ``Σ ‖x − x̂‖² / Σ ‖x − mean(x)‖²`` over ``[N, d]`` data."""
    x, x_hat = _t(x), _t(x_hat)
    if x.shape != x_hat.shape:
        raise DataError(f"reconstruction shape {tuple(x_hat.shape)} differs from the data's {tuple(x.shape)}")
    total = (x - x.mean(dim=0)).square().sum()
    return float((x - x_hat).square().sum() / total.clamp_min(1e-30))


def _orthonormal_rows(x, what: str) -> Tensor:
    """``[d, r]`` an orthonormal basis of the row span of ``x [n, d]``."""
    x = _t(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"{what} must be a non-empty [n, d] matrix of row directions, got shape {tuple(x.shape)}")
    q, _ = torch.linalg.qr(x.T)
    return q


def principal_angles(learned, basis) -> Tensor:
    """``[min(n, k)]`` the principal angles (degrees, ascending) between ``span(learned [n, d])`` and
    ``span(basis [k, d])``."""
    ql, qb = _orthonormal_rows(learned, "learned"), _orthonormal_rows(basis, "basis")
    if ql.shape[0] != qb.shape[0]:
        raise DataError(f"directions live in different spaces: {ql.shape[0]} vs {qb.shape[0]} dimensions")
    cos = torch.linalg.svdvals(qb.T @ ql).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos))


def subspace_share(learned, basis) -> float:
    """``‖Q_Bᵀ Q_L‖²_F / k``: the share of ``span(basis [k, d])`` that ``span(learned [n, d])`` covers.

    The mean squared cosine of the k principal angles (with n ≥ k): 1 when the learned span contains the basis,
    ``n / d`` on average for a random n-dimensional span. With n = k it is symmetric in the two spans.
    """
    ql, qb = _orthonormal_rows(learned, "learned"), _orthonormal_rows(basis, "basis")
    if ql.shape[0] != qb.shape[0]:
        raise DataError(f"directions live in different spaces: {ql.shape[0]} vs {qb.shape[0]} dimensions")
    return float((qb.T @ ql).square().sum() / qb.shape[1])


def signed_ends(functions) -> Tensor:
    """``[N, 2m]``: the first ``m = ⌈n/2⌉`` of ``functions [N, n]`` as two units each, their positive end ``f⁺``
    and their negative end ``(−f)⁺``; non-negative functions are returned as they are (they have one end).

    The same unit budget for signed and non-negative methods: a signed function (an eigenfunction, a PCA or ICA
    code) is a contrast between the examples at its two ends, which ``|f|`` would merge.
    """
    f = _activations(functions)
    if not bool((f < 0).any()):
        return f
    half = f[:, : (f.shape[1] + 1) // 2]
    return torch.cat([half.clamp_min(0), (-half).clamp_min(0)], dim=1)


def _grid(functions, a, b, p: int) -> Tensor:
    """``[p, p, n]``: functions ``[p², n]`` over all pairs (a, b) placed at their pair."""
    f = _activations(functions)
    a, b = torch.as_tensor(a).long(), torch.as_tensor(b).long()
    if f.shape[0] != p * p or a.shape != (p * p,) or b.shape != (p * p,):
        raise DataError(f"Fourier scores need functions over all {p * p} pairs (a, b) of Z_{p}, got {f.shape[0]} rows")
    grid = torch.full((p, p, f.shape[1]), float("nan"), dtype=f.dtype)
    grid[a, b] = f
    if bool(torch.isnan(grid).any()):
        raise DataError(f"the pairs (a, b) do not cover Z_{p} × Z_{p} exactly once")
    return grid


def frequency_power(functions, a, b, p: int) -> Tensor:
    """``[n, p // 2]``: the fraction of each function's non-constant power on each frequency 1 … p // 2.

    The power of f(a, b) is ``|DFT₂(f − mean)|²`` over Z_p²; frequency k owns the modes (k₁, k₂) with
    ``{|k₁|, |k₂|} ⊆ {0, k}`` (cos and sin of ka, kb, k(a + b), k(a − b)). functions: ``[p², n]``, row r at
    the pair ``(a[r], b[r])``.
    """
    grid = _grid(functions, a, b, p)
    grid = grid - grid.mean(dim=(0, 1), keepdim=True)
    power = torch.fft.fft2(grid, dim=(0, 1)).abs().square()  # [p, p, n]
    k = torch.arange(p)
    fold = torch.minimum(k, p - k)
    k1, k2 = fold[:, None], fold[None, :]
    per = torch.stack(
        [power[((k1 == w) | (k1 == 0)) & ((k2 == w) | (k2 == 0))].sum(dim=0) for w in range(1, p // 2 + 1)], dim=1
    )  # [n, p // 2]
    return per / power.sum(dim=(0, 1))[:, None].clamp_min(1e-300)


def fourier_concentration(functions, a, b, p: int, n_frequencies: int = 6) -> Tensor:
    """``[n]``: the fraction of each function's non-constant power in its `n_frequencies` strongest frequencies
    (all p // 2 of them when there are fewer)."""
    power = frequency_power(functions, a, b, p)
    return power.topk(min(n_frequencies, power.shape[1]), dim=1).values.sum(dim=1)


def key_frequencies_of(functions, a, b, p: int, n: int | None = None) -> list[int]:
    """The key frequencies of a set of functions over Z_p² (e.g. MLP neurons): their normalised per-frequency
    power summed over the functions with variance, cut at the largest drop among the strongest half (or the top
    `n`), ascending."""
    f = _activations(functions)
    live = f.var(dim=0) > 1e-8 * float(f.var(dim=0).max())
    summed = frequency_power(f[:, live], a, b, p).sum(dim=0)
    values, order = summed.sort(descending=True)
    if n is None:
        half = max(2, len(values) // 2 + 1)
        n = int((values[: half - 1] / values[1:half].clamp_min(1e-300)).argmax()) + 1
    return sorted(int(i) + 1 for i in order[:n])


def jaccard(a, b) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two collections (1 for two empty ones)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def polynomial_r2(y, z, degree: int = 3) -> float:
    """R² of the least-squares fit of ``y [N]`` on every monomial of ``z [N, m]`` up to `degree` (with a constant):
    how much of a function is a polynomial of the coordinates z."""
    from itertools import combinations_with_replacement

    y, z = _t(y).reshape(-1), _t(z)
    if z.ndim != 2 or z.shape[0] != y.shape[0]:
        raise DataError(f"z must be [N, m] with N = {y.shape[0]} rows, got shape {tuple(z.shape)}")
    columns = [torch.ones(z.shape[0], dtype=torch.float64)]
    for d in range(1, degree + 1):
        columns += [z[:, list(c)].prod(dim=1) for c in combinations_with_replacement(range(z.shape[1]), d)]
    design = torch.stack(columns, dim=1)
    fit = design @ torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    total = (y - y.mean()).square().sum()
    return float(1 - (y - fit).square().sum() / total.clamp_min(1e-300))
