"""Fourier helpers for modular arithmetic: the embedding's spectrum, key frequencies, and alignment of functions
on the pairs (a, b) with the key-frequency Fourier features (Nanda et al. 2023, "Progress measures for grokking").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError, DataError


def fourier_basis(p: int) -> Tensor:
    """``[p, p]`` orthonormal rows over ``a = 0..p-1``: constant, then ``cos(2πka/p), sin(2πka/p)`` for k = 1, 2, …"""
    a = torch.arange(p, dtype=torch.float64)
    rows = [torch.ones(p, dtype=torch.float64)]
    for k in range(1, p // 2 + 1):
        rows += [torch.cos(2 * math.pi * k * a / p), torch.sin(2 * math.pi * k * a / p)]
    basis = torch.stack(rows[:p])
    return basis / basis.norm(dim=1, keepdim=True)


def frequency_norms(embedding: Tensor) -> Tensor:
    """``[p // 2]``: the norm of the embedding's Fourier component at each frequency k = 1 … p // 2.

    embedding: ``[p, d_model]``, the rows of the number tokens 0..p-1 (cos and sin of a frequency combined).
    """
    e = torch.as_tensor(embedding).detach().to(torch.float64)
    p = e.shape[0]
    coeffs = fourier_basis(p) @ e  # [p, d_model]
    return torch.stack([coeffs[2 * k - 1 : 2 * k + 1].norm() for k in range(1, p // 2 + 1)])


def key_frequencies(embedding: Tensor, n: int | None = None) -> list[int]:
    """The frequencies (1 … p // 2) that carry the embedding, strongest first.

    n: how many; by default the count before the largest drop (ratio of consecutive sorted norms) among the
    strongest half.
    """
    norms = frequency_norms(embedding)
    order = norms.argsort(descending=True)
    if n is None:
        s = norms[order]
        half = max(len(s) // 2, 1)
        ratios = s[:half] / s[1 : half + 1].clamp_min(1e-30)
        n = int(ratios.argmax()) + 1
    if not 1 <= n <= len(norms):
        raise ConfigError(f"n must be between 1 and {len(norms)} frequencies, got {n}")
    return [int(k) + 1 for k in order[:n]]


def fourier_features(a: Tensor, b: Tensor, p: int, freqs: list[int]) -> Tensor:
    """``[N, 8·len(freqs)]``: cos/sin of ``ωa``, ``ωb`` and their four products (which span cos/sin ω(a ± b))."""
    a, b = torch.as_tensor(a).to(torch.float64), torch.as_tensor(b).to(torch.float64)
    cols = []
    for k in freqs:
        w = 2 * math.pi * k / p
        ca, sa, cb, sb = torch.cos(w * a), torch.sin(w * a), torch.cos(w * b), torch.sin(w * b)
        cols += [ca, sa, cb, sb, ca * cb, ca * sb, sa * cb, sa * sb]
    return torch.stack(cols, dim=1)


def fourier_alignment(functions: Tensor, a: Tensor, b: Tensor, p: int, freqs: list[int]) -> Tensor:
    """``[m]``: the fraction of each function's variance over the pairs that the key-frequency features explain.

    functions: ``[N, m]`` values on the pairs ``(a[n], b[n])``; mean-centred, projected on the orthonormalised
    centred `fourier_features`. 1 = the function lives on the key frequencies, ≈ 8·len(freqs)/N for noise.
    """
    f = torch.as_tensor(functions).detach().to(torch.float64)
    if f.ndim == 1:
        f = f[:, None]
    if f.shape[0] != len(a):
        raise DataError(f"functions have {f.shape[0]} rows but there are {len(a)} pairs (a, b)")
    feats = fourier_features(a, b, p, freqs)
    q, _ = torch.linalg.qr(feats - feats.mean(dim=0))
    f = f - f.mean(dim=0)
    return (q.T @ f).square().sum(dim=0) / f.square().sum(dim=0).clamp_min(1e-30)
