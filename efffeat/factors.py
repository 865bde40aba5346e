"""Factored per-example gradients of one parameter tensor, and all the algebra on them.

A dense layer's per-example gradient is an outer product: ``∂z/∂W = δ aᵀ`` (δ the cotangent at the layer
output, a its input), summed over sequence positions, uses of a tied weight, orders of the expansion and
quadrature nodes. `LowRankFactor` keeps those outer products as two factor tensors and never builds
``[N, d_out, d_in]``; `DenseFactor` holds gradients that have no such structure (biases, norms, the
per-example fallback). Both implement the `Factor` interface below, written as matmuls over the stored
tensors; nothing outside this module needs to know which layout a factor has.

Shapes: N examples, K readout components, R rank terms; a factor's K axis may be 1 when it does not depend
on the readout component (a layer input is shared by every component) and broadcasts.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

# Largest intermediate (elements) a Gram chunk may allocate.
_GRAM_CHUNK_ELEMENTS = 1 << 21


class Factor(ABC):
    """Per-example gradients ``G [N, K, numel]`` of one parameter tensor, in some factored layout."""

    @property
    @abstractmethod
    def numel(self) -> int:
        """Entries of the parameter tensor."""

    @property
    @abstractmethod
    def n_examples(self) -> int: ...

    @property
    @abstractmethod
    def n_outputs(self) -> int:
        """K (a stored K axis of 1 broadcasts over the readout components)."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def rows(self, index: Tensor | slice) -> Factor:
        """The factor of a subset of the examples."""

    @abstractmethod
    def to(self, device: torch.device | str) -> Factor: ...

    @abstractmethod
    def dense(self) -> Tensor:
        """``[N, K, numel]`` per-example gradients, row-major over the parameter."""

    @abstractmethod
    def to_dense(self) -> DenseFactor: ...

    @abstractmethod
    def matvec(self, w: Tensor) -> Tensor:
        """``[N, K]``: ``⟨G[n, k], w⟩`` for a weight vector ``w [numel]``."""

    @abstractmethod
    def rmatvec(self, c: Tensor) -> Tensor:
        """``[numel]``: ``Σ_{n,k} c[n, k] G[n, k]`` for ``c [N, K]``."""

    @abstractmethod
    def entries(self, flat: Tensor) -> Tensor:
        """``[N, K, m]``: the gradient entries at row-major positions ``flat [m]``."""

    @abstractmethod
    def selected(self, sel: Selection) -> Tensor:
        """``[N, K]``: ``Σ_m w_m G[n, k, flat_m]`` for a sparse weight vector `sel` on this parameter."""

    @abstractmethod
    def selected_terms(self, sel: Selection) -> Tensor:
        """``[N, K, R]``: `selected` split over the factor's R rank terms (sequence positions, uses, orders);
        a layout without rank terms gives ``R = 1``. Summed over the last axis it is `selected`."""

    @abstractmethod
    def sq_sum(self, weights: Tensor | None = None) -> Tensor:
        """``[numel]``: ``Σ_{n,k} w[n, k] G[n, k]²`` entrywise (``w [N, K]`` defaults to 1)."""

    @abstractmethod
    def scaled(self, w: float) -> Factor:
        """The factor of ``w · G``."""

    @abstractmethod
    def negated(self) -> Factor:
        """The factor of ``−G``."""

    @abstractmethod
    def output_sum(self, c: Tensor) -> Factor:
        """The factor of ``Σ_k c_k G[n, k]`` (K axis of length 1), in whichever layout is smaller."""

    @abstractmethod
    def diagonal_gram(self, w: Tensor) -> Tensor:
        """``[N, N]``: ``Σ_k w_k ⟨G[n, k], G[m, k]⟩`` for ``w [K]``."""

    @abstractmethod
    def state(self) -> dict[str, Tensor]:
        """The stored tensors by name (``{"u", "v"}`` or ``{"g"}``); `from_state` inverts it."""

    @abstractmethod
    def with_tangents(self) -> Factor:
        """``T + ½ Ṫ`` of a factor whose tensors are forward-mode duals with tangents ``Ṫ`` along Δθ.

        Tensors without a tangent count as constants; plain tensors give the primal factor.
        """


def from_state(tensors: dict[str, Tensor], shape: tuple[int, ...] | None = None) -> Factor:
    """The factor whose `Factor.state` is `tensors`, of a parameter of `shape` when given.

    Raises ValueError for tensors that are no factor's state, or a factor of another shape.
    """
    if set(tensors) == {"u", "v"}:
        u, v = tensors["u"], tensors["v"]
        if not (u.ndim == v.ndim == 4 and u.shape[0] == v.shape[0] and u.shape[2] == v.shape[2] and u.dtype == v.dtype):
            raise ValueError(f"u [N, Ku, R, d0] and v [N, Kv, R, d1] disagree: {tuple(u.shape)}, {tuple(v.shape)}")
        if {u.shape[1], v.shape[1]} - {1, max(u.shape[1], v.shape[1])}:
            raise ValueError(f"u and v have K axes {u.shape[1]} and {v.shape[1]}; each must be 1 or K")
        factor: Factor = LowRankFactor(u, v)
        matrix = shape is not None and len(shape) == 2
        fits = shape is None or (factor.shape == tuple(shape) if matrix else factor.numel == math.prod(shape))
    elif set(tensors) == {"g"}:
        if tensors["g"].ndim != 3:
            raise ValueError(f"g must be [N, K, numel], got shape {tuple(tensors['g'].shape)}")
        factor = DenseFactor(tensors["g"])
        fits = shape is None or factor.numel == math.prod(shape)
    else:
        raise ValueError(f"a factor's state holds either u and v or g, got {sorted(tensors)}")
    if not fits:
        raise ValueError(f"the factor does not fit a parameter of shape {list(shape or ())}")
    return factor


@dataclass(frozen=True)
class Selection:
    """A sparse weight vector on one parameter tensor: ``w`` at row-major positions ``flat`` of ``shape``."""

    shape: tuple[int, ...]
    flat: Tensor  # [m]
    w: Tensor  # [m]

    @cached_property
    def block(self) -> tuple[Tensor, Tensor, Tensor]:
        """For a matrix ``[d0, d1]``: the rows and columns the weights touch, and the weights as a dense block."""
        d1 = self.shape[1]
        rows, r_at = torch.unique(self.flat // d1, return_inverse=True)
        cols, c_at = torch.unique(self.flat % d1, return_inverse=True)
        block = torch.zeros(len(rows), len(cols), dtype=self.w.dtype).index_put_((r_at, c_at), self.w, accumulate=True)
        return rows, cols, block


def _split_dual(t: Tensor) -> tuple[Tensor, Tensor | None]:
    primal, tangent = fwAD.unpack_dual(t)
    return primal.detach(), None if tangent is None else tangent.detach()


@dataclass
class LowRankFactor(Factor):
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

    @property
    def dtype(self) -> torch.dtype:
        return self.u.dtype

    @property
    def device(self) -> torch.device:
        return self.u.device

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
        u, v = self._uv()
        return torch.einsum("nkri,nkrj->nkij", u, v).reshape(u.shape[0], u.shape[1], -1)

    def to_dense(self) -> DenseFactor:
        return DenseFactor(self.dense())

    def matvec(self, w: Tensor) -> Tensor:
        uw = self.u @ w.reshape(self.shape)  # [N, Ku, R, d1]
        return (uw * self.v).sum(dim=(2, 3))

    def rmatvec(self, c: Tensor) -> Tensor:
        u, v = self._uv()
        cu = (u * c[:, :, None, None]).reshape(-1, u.shape[-1])
        return (cu.T @ v.reshape(-1, v.shape[-1])).reshape(-1)

    def entries(self, flat: Tensor) -> Tensor:
        i, j = flat // self.shape[1], flat % self.shape[1]
        return (self.u[..., i] * self.v[..., j]).sum(dim=2)

    def selected(self, sel: Selection) -> Tensor:
        rows, cols, block = sel.block
        return ((self.u[..., rows] @ block.to(self.u.dtype)) * self.v[..., cols]).sum(dim=(2, 3))

    def selected_terms(self, sel: Selection) -> Tensor:
        rows, cols, block = sel.block
        return ((self.u[..., rows] @ block.to(self.u.dtype)) * self.v[..., cols]).sum(dim=3)

    def sq_sum(self, weights: Tensor | None = None) -> Tensor:
        """``G² = Σ_{r,s} (u_r ⊙ u_s) ⊗ (v_r ⊙ v_s)``, a matmul over the ``(n, k, r, s)`` axis; the side that is
        shared by every readout component is not repeated K times (the other is summed over k first)."""
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

    def scaled(self, w: float) -> LowRankFactor:
        return self if w == 1.0 else LowRankFactor(self.u * w, self.v)

    def negated(self) -> LowRankFactor:
        return LowRankFactor(-self.u, self.v)

    def output_sum(self, c: Tensor) -> Factor:
        u, v = self.u, self.v
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

    def diagonal_gram(self, w: Tensor) -> Tensor:
        """When one factor is shared by every component (``Kv = 1``, a layer input), ``Σ_k (u_k·u'_k)`` is one
        matmul over the flattened ``(k, d0)`` axis, per pair of rank terms."""
        s = w.sqrt()
        u, v = self.u, self.v
        ku, kv = u.shape[1], v.shape[1]
        if ku > 1 and kv > 1:
            out = torch.zeros(u.shape[0], u.shape[0], dtype=u.dtype, device=u.device)
            for k in range(ku):
                part = LowRankFactor(u[:, k : k + 1] * s[k], v[:, k : k + 1])
                out += factor_gram(part, part)[:, 0, :, 0]
            return out
        if ku == 1 and kv == 1:
            return factor_gram(self, self)[:, 0, :, 0] * w.sum()
        shared, per_k = (v, u) if kv == 1 else (u, v)
        per_k = per_k * s[None, :, None, None]
        n, _, r, _ = per_k.shape
        out = torch.zeros(n, n, dtype=u.dtype, device=u.device)
        for i in range(r):
            a_i, b_i = per_k[:, :, i].reshape(n, -1), shared[:, 0, i]
            for j in range(r):
                out += (a_i @ per_k[:, :, j].reshape(n, -1).T) * (b_i @ shared[:, 0, j].T)
        return out

    def state(self) -> dict[str, Tensor]:
        return {"u": self.u, "v": self.v}

    def with_tangents(self) -> LowRankFactor:
        u, u_dot = _split_dual(self.u)
        v, v_dot = _split_dual(self.v)
        if u_dot is None and v_dot is None:
            return LowRankFactor(u, v)
        if u_dot is None:
            return LowRankFactor(u, v + 0.5 * v_dot)
        if v_dot is None:
            return LowRankFactor(u + 0.5 * u_dot, v)
        # (u + ½u̇) ⊗ v + u ⊗ ½v̇: the rank-2 NLO factor of a dense layer
        return LowRankFactor.cat_rank([LowRankFactor(u + 0.5 * u_dot, v), LowRankFactor(u, 0.5 * v_dot)])

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
class DenseFactor(Factor):
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

    @property
    def dtype(self) -> torch.dtype:
        return self.g.dtype

    @property
    def device(self) -> torch.device:
        return self.g.device

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

    def selected(self, sel: Selection) -> Tensor:
        return self.g[..., sel.flat] @ sel.w.to(self.g.dtype)

    def selected_terms(self, sel: Selection) -> Tensor:
        return self.selected(sel)[..., None]

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

    def scaled(self, w: float) -> DenseFactor:
        return self if w == 1.0 else DenseFactor(self.g * w)

    def negated(self) -> DenseFactor:
        return DenseFactor(-self.g)

    def output_sum(self, c: Tensor) -> DenseFactor:
        if self.g.shape[1] == 1:
            return DenseFactor(self.g * c.sum())
        return DenseFactor(torch.einsum("nkp,k->np", self.g, c)[:, None])

    def diagonal_gram(self, w: Tensor) -> Tensor:
        g = self.g * w.sqrt()[None, :, None] if self.g.shape[1] > 1 else self.g * w.sum().sqrt()
        flat = g.reshape(g.shape[0], -1)
        return flat @ flat.T

    def state(self) -> dict[str, Tensor]:
        return {"g": self.g}

    def with_tangents(self) -> DenseFactor:
        g, g_dot = _split_dual(self.g)
        return DenseFactor(g if g_dot is None else g + 0.5 * g_dot)


# ---- operations on several factors ---------------------------------------------------------------------------
def factor_gram(a: Factor, b: Factor, out: Tensor | None = None) -> Tensor:
    """``[N, K, M, K']`` inner products of the per-example gradients of one parameter in two factors.

    With `out` (contiguous ``[N, K, M, K']``) they are added to it in place, with no temporary of that size.
    """
    if out is None:
        out = torch.zeros(a.n_examples, a.n_outputs, b.n_examples, b.n_outputs, dtype=a.dtype, device=a.device)
    if isinstance(a, LowRankFactor) and isinstance(b, LowRankFactor):
        return a.gram(b, out)
    return a.to_dense().gram(b.to_dense(), out)


def sum_factors(parts: list[Factor]) -> Factor:
    """One factor for the sum of several over the same examples (uses of a tied weight, quadrature nodes...)."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, LowRankFactor) for p in parts):
        return LowRankFactor.cat_rank(parts)  # type: ignore[arg-type]
    return DenseFactor(torch.stack([p.to_dense().g for p in parts]).sum(0))


def difference(a: Factor, b: Factor) -> Factor:
    """The factor of ``G_a − G_b`` (low-rank factors join their rank terms; nothing is densified needlessly)."""
    return sum_factors([a, b.negated()])


def cat_examples(factors: list[Factor]) -> Factor:
    """Concatenate per-batch factors of one parameter along the example axis.

    Low-rank factors with different ranks (sequences of different lengths) are zero-padded to a common rank;
    if any batch is dense, the result is dense.
    """
    if len(factors) == 1:
        return factors[0]
    if all(isinstance(f, LowRankFactor) for f in factors):
        low: list[LowRankFactor] = factors  # type: ignore[assignment]
        r = max(f.rank for f in low)
        k_u = max(f.u.shape[1] for f in low)
        k_v = max(f.v.shape[1] for f in low)

        def pad(t: Tensor, k: int) -> Tensor:
            t = t.expand(t.shape[0], k, *t.shape[2:]) if t.shape[1] != k else t
            if t.shape[2] == r:
                return t
            return torch.cat([t, t.new_zeros(t.shape[0], k, r - t.shape[2], t.shape[3])], dim=2)

        return LowRankFactor(torch.cat([pad(f.u, k_u) for f in low]), torch.cat([pad(f.v, k_v) for f in low]))
    return DenseFactor(torch.cat([f.to_dense().g for f in factors]))


def compact(f: Factor) -> Factor:
    """The smaller layout of a factor: dense per-example gradients when they take less memory than u and v."""
    return f.to_dense() if isinstance(f, LowRankFactor) and f.dense_is_cheaper() else f


def gather_examples(
    f: Factor, all_gather: Callable[[Tensor], list[Tensor]], any_true: Callable[[bool], bool]
) -> Factor:
    """The factor of every process's examples, concatenated in process order.

    all_gather: a tensor of this process → the tensors of every process (first dims may differ); any_true: a
    flag of this process → whether any process's flag is set (one dense shard makes every shard dense).
    """
    if any_true(isinstance(f, DenseFactor)):
        return DenseFactor(torch.cat(all_gather(f.to_dense().g)))
    assert isinstance(f, LowRankFactor)
    us, vs = all_gather(f.u), all_gather(f.v)
    return cat_examples([LowRankFactor(u, v) for u, v in zip(us, vs)])
