"""Factored per-example gradients of one parameter tensor.

A dense layer's per-example gradient is an outer product: ``∂z/∂W = δ aᵀ`` (δ the cotangent at the layer
output, a its input), summed over sequence positions, uses of a tied weight, orders of the expansion and
quadrature nodes. `LowRankFactor` keeps those outer products as two factor tensors and never builds
``[N, d_out, d_in]``; `DenseFactor` holds gradients that have no such structure (biases, LayerNorm, the
``torch.func`` fallback). Both expose the same operations, written as matmuls over the stored tensors.

Shapes: N examples, K readout components, R rank terms; a factor's K axis may be 1 when it does not depend
on the readout component (a layer input is shared by every component) and broadcasts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Largest intermediate (elements) a Gram chunk may allocate.
_GRAM_CHUNK_ELEMENTS = 1 << 21


@dataclass
class LowRankFactor:
    """Per-example gradient of a matrix parameter ``W [d0, d1]``: ``G[n, k] = Σ_r u[n, k, r] ⊗ v[n, k, r]``.

    u: ``[N, Ku, R, d0]``; v: ``[N, Kv, R, d1]`` with Ku, Kv ∈ {1, K}.
    """

    u: Tensor
    v: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[-1], self.v.shape[-1])

    @property
    def numel(self) -> int:
        return self.u.shape[-1] * self.v.shape[-1]

    @property
    def n_examples(self) -> int:
        return self.u.shape[0]

    @property
    def n_outputs(self) -> int:
        return max(self.u.shape[1], self.v.shape[1])

    @property
    def rank(self) -> int:
        return self.u.shape[2]

    def _uv(self) -> tuple[Tensor, Tensor]:
        """u and v with their K axes expanded to a common K (views, no copy)."""
        k = self.n_outputs
        u, v = self.u, self.v
        return u.expand(u.shape[0], k, *u.shape[2:]), v.expand(v.shape[0], k, *v.shape[2:])

    def rows(self, index: Tensor | slice) -> LowRankFactor:
        return LowRankFactor(self.u[index], self.v[index])

    def to(self, device: torch.device | str) -> LowRankFactor:
        return LowRankFactor(self.u.to(device), self.v.to(device))

    def dense(self) -> Tensor:
        """``[N, K, d0 * d1]`` per-example gradients, row-major over ``W``."""
        u, v = self._uv()
        return torch.einsum("nkri,nkrj->nkij", u, v).reshape(u.shape[0], u.shape[1], -1)

    def to_dense(self) -> DenseFactor:
        return DenseFactor(self.dense())

    def matvec(self, w: Tensor) -> Tensor:
        """``[N, K]``: ``⟨G[n, k], W⟩`` for a weight vector ``w [d0 * d1]``."""
        uw = self.u @ w.reshape(self.shape)  # [N, Ku, R, d1]
        return (uw * self.v).sum(dim=(2, 3))

    def rmatvec(self, c: Tensor) -> Tensor:
        """``[d0 * d1]``: ``Σ_{n,k} c[n, k] G[n, k]`` for ``c [N, K]``."""
        u, v = self._uv()
        cu = (u * c[:, :, None, None]).reshape(-1, u.shape[-1])
        return (cu.T @ v.reshape(-1, v.shape[-1])).reshape(-1)

    def entries(self, flat: Tensor) -> Tensor:
        """``[N, K, m]``: the gradient entries at row-major positions ``flat [m]``."""
        i, j = flat // self.shape[1], flat % self.shape[1]
        return (self.u[..., i] * self.v[..., j]).sum(dim=2)

    def sq_sum(self, weights: Tensor | None = None) -> Tensor:
        """``[d0 * d1]``: ``Σ_{n,k} w[n, k] G[n, k]²`` entrywise (``w`` defaults to 1), without forming G.

        ``G² = Σ_{r,s} (u_r ⊙ u_s) ⊗ (v_r ⊙ v_s)``, a matmul over the ``(n, k, r, s)`` axis; the side that is
        shared by every readout component is not repeated K times (the other is summed over k first).
        """
        u, v = self.u, self.v
        n, ku, r, d0 = u.shape
        kv, d1 = v.shape[1], v.shape[-1]
        out = torch.zeros(d0, d1, dtype=u.dtype, device=u.device)
        step = max(1, _GRAM_CHUNK_ELEMENTS // max(1, max(ku, kv) * r * r * (d0 + d1)))
        for s in range(0, n, step):
            uu = u[s : s + step, :, :, None, :] * u[s : s + step, :, None, :, :]  # [n, Ku, r, r, d0]
            vv = v[s : s + step, :, :, None, :] * v[s : s + step, :, None, :, :]  # [n, Kv, r, r, d1]
            w = None if weights is None else weights[s : s + step, :, None, None, None]
            if kv == 1:
                uu = (uu if w is None else uu * w).sum(1, keepdim=True)
            elif ku == 1:
                vv = (vv if w is None else vv * w).sum(1, keepdim=True)
            elif w is not None:
                uu = uu * w
            out += uu.reshape(-1, d0).T @ vv.reshape(-1, d1)
        return out.reshape(-1)

    def gram(self, other: LowRankFactor, out: Tensor) -> Tensor:
        """Adds ``⟨G[n, k], G'[m, l]⟩ = Σ_{r,s} (u·u')(v·v')`` to ``out [N, K, M, K']``, chunked over n."""
        n, m = self.n_examples, other.n_examples
        per_row = self.n_outputs * self.rank * m * other.n_outputs * other.rank
        step = max(1, _GRAM_CHUNK_ELEMENTS // max(1, per_row))
        for s in range(0, n, step):
            uu = torch.einsum("nkri,mlsi->nkrmls", self.u[s : s + step], other.u)
            vv = torch.einsum("nkrj,mlsj->nkrmls", self.v[s : s + step], other.v)
            if uu.shape == torch.broadcast_shapes(uu.shape, vv.shape):
                prod = uu.mul_(vv)
            elif vv.shape == torch.broadcast_shapes(uu.shape, vv.shape):
                prod = vv.mul_(uu)
            else:
                prod = uu * vv
            out[s : s + step] += prod.sum(dim=(2, 5))
        return out

    @staticmethod
    def cat_rank(factors: list[LowRankFactor]) -> LowRankFactor:
        """Sum of factors, stored by concatenating their rank terms."""
        k_u = max(f.u.shape[1] for f in factors)
        k_v = max(f.v.shape[1] for f in factors)
        k = max(k_u, k_v)
        if any(f.u.shape[1] != k_u for f in factors):
            k_u = k
        if any(f.v.shape[1] != k_v for f in factors):
            k_v = k
        us = [f.u.expand(f.u.shape[0], k_u, *f.u.shape[2:]) for f in factors]
        vs = [f.v.expand(f.v.shape[0], k_v, *f.v.shape[2:]) for f in factors]
        return LowRankFactor(torch.cat(us, dim=2), torch.cat(vs, dim=2))

    def dense_is_cheaper(self) -> bool:
        """True when ``[K, d0*d1]`` per example is smaller than the factors."""
        low = self.u.shape[1] * self.rank * self.shape[0] + self.v.shape[1] * self.rank * self.shape[1]
        return low > self.n_outputs * self.numel


@dataclass
class DenseFactor:
    """Per-example gradients of a parameter as a dense ``g [N, K, numel]`` (row-major)."""

    g: Tensor

    @property
    def numel(self) -> int:
        return self.g.shape[-1]

    @property
    def n_examples(self) -> int:
        return self.g.shape[0]

    @property
    def n_outputs(self) -> int:
        return self.g.shape[1]

    def rows(self, index: Tensor | slice) -> DenseFactor:
        return DenseFactor(self.g[index])

    def to(self, device: torch.device | str) -> DenseFactor:
        return DenseFactor(self.g.to(device))

    def dense(self) -> Tensor:
        return self.g

    def to_dense(self) -> DenseFactor:
        return self

    def matvec(self, w: Tensor) -> Tensor:
        return self.g @ w

    def rmatvec(self, c: Tensor) -> Tensor:
        return torch.einsum("nk,nkp->p", c, self.g)

    def entries(self, flat: Tensor) -> Tensor:
        return self.g[..., flat]

    def sq_sum(self, weights: Tensor | None = None) -> Tensor:
        sq = self.g.square()
        if weights is not None:
            sq = sq * weights[:, :, None]
        return sq.sum(dim=(0, 1))

    def gram(self, other: DenseFactor, out: Tensor) -> Tensor:
        """Adds ``⟨g[n, k], g'[m, l]⟩`` to ``out [N, K, M, K']`` (one matmul)."""
        n, k, p = self.g.shape
        m, l, _ = other.g.shape
        flat = out.view(n * k, m * l)
        flat.addmm_(self.g.reshape(n * k, p), other.g.reshape(m * l, p).T)
        return out


Factor = LowRankFactor | DenseFactor


def factor_gram(a: Factor, b: Factor, out: Tensor | None = None) -> Tensor:
    """``[N, K, M, K']`` inner products of the per-example gradients of one parameter in two factors.

    With `out` (contiguous ``[N, K, M, K']``) they are added to it in place, with no temporary of that size.
    """
    if out is None:
        out = torch.zeros(a.n_examples, a.n_outputs, b.n_examples, b.n_outputs, dtype=_dtype(a), device=_device(a))
    if isinstance(a, LowRankFactor) and isinstance(b, LowRankFactor):
        return a.gram(b, out)
    return a.to_dense().gram(b.to_dense(), out)


def _dtype(f: Factor) -> torch.dtype:
    return f.u.dtype if isinstance(f, LowRankFactor) else f.g.dtype


def _device(f: Factor) -> torch.device:
    return f.u.device if isinstance(f, LowRankFactor) else f.g.device


def cat_examples(factors: list[Factor]) -> Factor:
    """Concatenate per-batch factors of one parameter along the example axis.

    Low-rank factors with different ranks (sequences of different lengths) are zero-padded to a common rank;
    if any batch is dense, the result is dense.
    """
    if len(factors) == 1:
        return factors[0]
    if all(isinstance(f, LowRankFactor) for f in factors):
        r = max(f.rank for f in factors)
        k_u = max(f.u.shape[1] for f in factors)
        k_v = max(f.v.shape[1] for f in factors)

        def pad(t: Tensor, k: int) -> Tensor:
            t = t.expand(t.shape[0], k, *t.shape[2:]) if t.shape[1] != k else t
            if t.shape[2] == r:
                return t
            return torch.cat([t, t.new_zeros(t.shape[0], k, r - t.shape[2], t.shape[3])], dim=2)

        return LowRankFactor(torch.cat([pad(f.u, k_u) for f in factors]), torch.cat([pad(f.v, k_v) for f in factors]))
    return DenseFactor(torch.cat([f.to_dense().g for f in factors]))


def compact(f: Factor) -> Factor:
    """The smaller layout of a factor: dense per-example gradients when they take less memory than u and v."""
    return f.to_dense() if isinstance(f, LowRankFactor) and f.dense_is_cheaper() else f
