"""Scores for learned units against ground truth: alignment, purity, selectivity, sparsity, reconstruction.

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
