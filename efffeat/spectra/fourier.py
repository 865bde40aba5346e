"""Fourier analysis of modular arithmetic: bases, the embedding's spectrum, key frequencies, feature families.

Values ``v`` are residues mod p; frequency f has the pair of features ``cos(2π f v / p), sin(2π f v / p)``
(Nanda et al. 2023, "Progress measures for grokking"; Lin 2025 for the families of eNTK modes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError, DataError


def fourier_basis(values: Tensor, p: int, frequencies: Sequence[int] | None = None, constant: bool = False) -> Tensor:
    """``[N, 2F]``: ``cos(2π f v / p), sin(2π f v / p)`` for each frequency f (default ``1 … ⌊p/2⌋``), in pairs.

    constant: start with a column of ones (the zero frequency).
    """
    v = torch.as_tensor(values).to(torch.float64) % p
    freqs = list(range(1, p // 2 + 1)) if frequencies is None else [int(f) for f in frequencies]
    if not freqs:
        raise ConfigError("frequencies is empty; pass at least one frequency in 1 … p // 2")
    ang = 2 * math.pi * torch.tensor(freqs, dtype=torch.float64)[None, :] * v[:, None] / p  # [N, F]
    out = torch.stack([ang.cos(), ang.sin()], dim=2).reshape(v.shape[0], 2 * len(freqs))
    return torch.cat([torch.ones(v.shape[0], 1, dtype=torch.float64), out], dim=1) if constant else out


def dft_matrix(p: int) -> Tensor:
    """``[p, p]`` orthonormal rows over ``a = 0..p-1``: constant, then ``cos, sin`` of frequency 1, 2, …"""
    basis = fourier_basis(torch.arange(p), p, constant=True)[:, :p].T
    return basis / basis.norm(dim=1, keepdim=True)


def frequency_norms(embedding: Tensor) -> Tensor:
    """``[p // 2]``: the norm of the embedding's Fourier component at each frequency k = 1 … p // 2.

    embedding: ``[p, d_model]``, the rows of the number tokens 0..p-1 (cos and sin of a frequency combined).
    """
    e = torch.as_tensor(embedding).detach().to(torch.float64)
    p = e.shape[0]
    coeffs = dft_matrix(p) @ e  # [p, d_model]
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


def modadd_fourier_families(
    a: Tensor, b: Tensor, p: int, frequencies: Sequence[int] | None = None
) -> dict[str, Tensor]:
    """Fourier families of modular addition inputs ``(a, b)``, each ``[N, 2F]`` (``inputs`` is ``[N, 4F]``).

    ``sum``: F(a + b); ``difference``: F(a − b); ``a``, ``b``: one input alone; ``inputs``: [F(a), F(b)] (the
    single-input modes); ``input_sum``: F(a) + F(b) (the per-input sum modes); ``products``: cos/sin of ωa, ωb
    and their four products, which span cos/sin ω(a ± b) (``[N, 8F]``).
    """
    fa, fb = fourier_basis(a, p, frequencies), fourier_basis(b, p, frequencies)
    ca, sa = fa[:, 0::2], fa[:, 1::2]
    cb, sb = fb[:, 0::2], fb[:, 1::2]
    products = torch.stack([ca, sa, cb, sb, ca * cb, ca * sb, sa * cb, sa * sb], dim=2).reshape(fa.shape[0], -1)
    return {
        "sum": fourier_basis(torch.as_tensor(a) + torch.as_tensor(b), p, frequencies),
        "difference": fourier_basis(torch.as_tensor(a) - torch.as_tensor(b), p, frequencies),
        "a": fa,
        "b": fb,
        "inputs": torch.cat([fa, fb], dim=1),
        "input_sum": fa + fb,
        "products": products,
    }


def fourier_alignment(functions: Tensor, a: Tensor, b: Tensor, p: int, freqs: Sequence[int]) -> Tensor:
    """``[m]``: the fraction of each function's variance over the pairs that the key-frequency features explain.

    functions: ``[N, m]`` values on the pairs ``(a[n], b[n])``; mean-centred, projected on the orthonormalised
    centred ``products`` family of `modadd_fourier_families`. 1 = the function lives on the key frequencies,
    ≈ 8·len(freqs)/N for noise.
    """
    f = torch.as_tensor(functions).detach().to(torch.float64)
    if f.ndim == 1:
        f = f[:, None]
    if f.shape[0] != len(a):
        raise DataError(f"functions have {f.shape[0]} rows but there are {len(a)} pairs (a, b)")
    feats = modadd_fourier_families(a, b, p, freqs)["products"]
    q, _ = torch.linalg.qr(feats - feats.mean(dim=0))
    f = f - f.mean(dim=0)
    return (q.T @ f).square().sum(dim=0) / f.square().sum(dim=0).clamp_min(1e-30)
