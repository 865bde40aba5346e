"""How well a block of eigenvectors lines up with a family of known features (overlaps, argmax matches)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError


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
            "the same inputs (for a flattened kernel, lift the features to the N·K example-major rows)"
        )
    q = orthonormal_columns(modes)
    f = orthonormal_columns(features, center=center)
    return float((q.T @ f).square().sum())


def argmax_features(modes: Tensor, indicators: Tensor) -> Tensor:
    """``[d]``: for each mode, the indicator column it aligns with most (largest ``|cos|``).

    modes: ``[R, d]``; indicators: ``[R, C]`` ground-truth directions on the same R rows (e.g. a feature's value
    on each input, lifted to the example-major rows of a flattened kernel).
    """
    if modes.shape[0] != indicators.shape[0]:
        raise ConfigError(f"modes have {modes.shape[0]} rows but the indicators have {indicators.shape[0]}")
    m = modes.to(torch.float64)
    z = indicators.to(torch.float64)
    cos = (z / z.norm(dim=0).clamp_min(1e-300)).T @ (m / m.norm(dim=0).clamp_min(1e-300))  # [C, d]
    return cos.abs().argmax(dim=0)
