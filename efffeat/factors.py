"""Factored per-example gradients of one parameter tensor, and all the algebra on them.

A dense layer's per-example gradient is an outer product: ``∂z/∂W = δ aᵀ`` (δ the cotangent at the layer
output, a its input), summed over sequence positions, uses of a tied weight, orders of the expansion and
quadrature nodes. `LowRankFactor` keeps those outer products as two factor tensors and never builds
``[N, d_out, d_in]``; `EmbeddingFactor` keeps an embedding table's gradient as the looked-up token ids and
their cotangents (the one-hot side is never stored); `DenseFactor` holds gradients that have no such structure
(biases, norms, the per-example fallback). All implement the `Factor` interface below, written as matmuls over
the stored tensors; nothing outside this module needs to know which layout a factor has.

Kernels of many factors at once (`gram_sum`) fold a layer's bias into its weight's Gram, join small dense
factors into one GEMM, compute only the upper block triangle of a self-kernel, and contract sequence layers
position pair by position pair straight into the output.

Shapes: N examples, K readout components, R rank terms; a factor's K axis may be 1 when it does not depend
on the readout component (a layer input is shared by every component) and broadcasts.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

# Largest temporary (elements) that a chunked reduction over the examples may allocate.
_CHUNK_ELEMENTS = 1 << 22
# Chunks (elements) that stay in cache while they are reduced.
_CACHE_ELEMENTS = 1 << 18
# Largest temporary (elements) of one block of a kernel (each of the two products of a term pair).
_BLOCK_ELEMENTS = 1 << 24
# Example blocks of a self-kernel (only blocks on and above the diagonal are computed): rows of a block, and at
# most this many blocks a side (few large operations keep a multi-threaded run from waiting on each one).
_SYMMETRIC_BLOCK_ROWS = 512
_SYMMETRIC_BLOCKS = 8
# Dense factors smaller than this (elements) are joined into one matrix, so that their Grams are one GEMM.
_JOIN_ELEMENTS = 1 << 24


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

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.state().values())

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
        """``[N, K]`` (``[N, K, G]``): ``Σ_m w_m G[n, k, flat_m]`` for the sparse weight vector(s) `sel` on this
        parameter."""

    @abstractmethod
    def selected_terms(self, sel: Selection) -> Tensor:
        """``[N, K, R(, G)]``: `selected` split over the factor's R rank terms (sequence positions, uses, orders);
        a layout without rank terms gives ``R = 1``. Summed over axis 2 it is `selected`."""

    @abstractmethod
    def sq_sum(self, weights: Tensor | None = None) -> Tensor:
        """``[numel]`` (a new tensor): ``Σ_{n,k} w[n, k] G[n, k]²`` entrywise (``w [N, K]`` defaults to 1)."""

    @abstractmethod
    def sq_norms(self) -> Tensor:
        """``[N, K]``: the squared norm ``‖G[n, k]‖²`` of every example's gradient, per readout component."""

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
    def stacked_outputs(self, w: Tensor) -> Factor:
        """A factor with K axis 1 whose per-example gradient ``G̃[n]`` holds every ``√w_k G[n, k]`` (K·numel entries,
        in an order of the layout's choosing; layouts of one parameter choose alike).

        Its Gram is the component-diagonal kernel: ``⟨G̃[n], G̃'[m]⟩ = Σ_k w_k ⟨G[n, k], G'[m, k]⟩``.
        """

    def diagonal_gram(self, w: Tensor) -> Tensor:
        """``[N, N]``: ``Σ_k w_k ⟨G[n, k], G[m, k]⟩`` for ``w [K]``."""
        return factor_gram(self.stacked_outputs(w))[:, 0, :, 0]

    @abstractmethod
    def state(self) -> dict[str, Tensor]:
        """The stored tensors by name (``{"u", "v"}``, ``{"ids", "v", "num_embeddings"}`` or ``{"g"}``);
        `from_state` inverts it."""

    @abstractmethod
    def with_tangents(self) -> Factor:
        """``T + ½ Ṫ`` of a factor whose tensors are forward-mode duals with tangents ``Ṫ`` along Δθ.

        Tensors without a tangent count as constants; plain tensors give the primal factor.
        """

    # ---- layout-specific parts of the module's functions ------------------------------------------------------
    def _without_zero_terms(self) -> Factor:
        """The same factor without rank terms that are zero for every example (at least one term is kept)."""
        return self

    def _dense_is_cheaper(self) -> bool:
        """True when ``[N, K, numel]`` takes less memory than the stored layout."""
        return False

    @abstractmethod
    def _add_gram(self, other: Factor, acc: _GramSum) -> None:
        """Register ``⟨G[n, k], G'[m, l]⟩`` with the accumulator (`other` has this factor's class)."""


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
    elif set(tensors) == {"ids", "v", "num_embeddings"}:
        ids, v, rows = tensors["ids"], tensors["v"], tensors["num_embeddings"]
        if not (ids.ndim == 2 and v.ndim == 4 and tuple(ids.shape) == (v.shape[0], v.shape[2]) and rows.numel() == 1):
            raise ValueError(f"ids [N, R] and v [N, K, R, d] disagree: {tuple(ids.shape)}, {tuple(v.shape)}")
        n_rows = int(rows.reshape(-1)[0])
        if ids.dtype != torch.long or (ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < n_rows):
            raise ValueError(f"ids must be int64 token ids below num_embeddings = {n_rows}")
        factor = EmbeddingFactor(ids, v, n_rows)
    elif set(tensors) == {"g"}:
        if tensors["g"].ndim != 3:
            raise ValueError(f"g must be [N, K, numel], got shape {tuple(tensors['g'].shape)}")
        factor = DenseFactor(tensors["g"])
    else:
        raise ValueError(f"a factor's state holds u and v, ids, v and num_embeddings, or g; got {sorted(tensors)}")
    matrix = shape is not None and len(shape) == 2 and not isinstance(factor, DenseFactor)
    fits = shape is None or (factor.shape == tuple(shape) if matrix else factor.numel == math.prod(shape))
    if not fits:
        raise ValueError(f"the factor does not fit a parameter of shape {list(shape or ())}")
    return factor


@dataclass(frozen=True)
class Selection:
    """Sparse weight vectors on one parameter tensor: ``w [m]`` — or ``[m, G]``, G vectors evaluated at once —
    at row-major positions ``flat [m]`` of ``shape`` (a position may repeat: its weights add)."""

    shape: tuple[int, ...]
    flat: Tensor  # [m]
    w: Tensor  # [m] or [m, G]

    @cached_property
    def block(self) -> tuple[Tensor, Tensor, Tensor]:
        """For a matrix ``[d0, d1]``: the rows ``[I]`` and columns ``[J]`` the weights touch, and the weights as a
        dense block ``[I, J]`` (``[I, J, G]``)."""
        d1 = self.shape[1]
        rows, r_at = torch.unique(self.flat // d1, return_inverse=True)
        cols, c_at = torch.unique(self.flat % d1, return_inverse=True)
        block = torch.zeros(len(rows), len(cols), *self.w.shape[1:], dtype=self.w.dtype)
        return rows, cols, block.index_put_((r_at, c_at), self.w, accumulate=True)


def _split_dual(t: Tensor) -> tuple[Tensor, Tensor | None]:
    primal, tangent = fwAD.unpack_dual(t)
    return primal.detach(), None if tangent is None else tangent.detach()


def _sq_norm(t: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """``Σ t²`` over `dim`: one reduction pass, no squared copy of `t`."""
    return torch.linalg.vector_norm(t, dim=dim).square()


def _component_weights(weights: Tensor, k: int) -> Tensor:
    """``weights [n, K]`` for a factor whose K axis is `k`: summed over the components when the factor has one."""
    return weights.sum(1, keepdim=True) if k == 1 and weights.shape[1] != 1 else weights


def _stack_components(t: Tensor, s: Tensor) -> Tensor:
    """``[n, K, R, d] → [n, 1, R, K·d]``: each component's rows scaled by ``s_k`` and laid side by side."""
    n, k, r, d = t.shape
    return (t * s[None, :, None, None]).transpose(1, 2).reshape(n, 1, r, k * d)


def _pad_terms(t: Tensor, k: int, r: int) -> Tensor:
    """``t [n, K', R', ...]`` with its K axis expanded to `k` and zero rank terms appended up to `r`."""
    t = t.expand(t.shape[0], k, *t.shape[2:]) if t.shape[1] != k else t
    if t.shape[2] == r:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], k, r - t.shape[2], *t.shape[3:])], dim=2)


def _nonzero_terms(*tensors: Tensor) -> Tensor:
    """``[R]``: rank terms (axis 2) that are non-zero somewhere in every one of `tensors`. A term non-zero in the
    first example is; only the others are looked for in every example (a float's ``any``: NaN counts as non-zero)."""
    keep = torch.ones(tensors[0].shape[2], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        found = t[:1].flatten(3).any(dim=3).any(dim=1)[0]
        doubtful = torch.nonzero(~found).reshape(-1)
        start, step = 1, 8
        while len(doubtful) and start < t.shape[0]:  # growing blocks of examples, until each doubtful term is seen
            hit = t[start : start + step, :, doubtful].flatten(3).any(dim=3).any(dim=1).any(dim=0)
            found[doubtful[hit]] = True
            doubtful = doubtful[~hit]
            start, step = start + step, 4 * step
        keep &= found
    return keep


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

    def _gradients(self, start: int, stop: int) -> Tensor:
        """``[n, K, d0, d1]``: the per-example gradient matrices of examples ``start:stop``."""
        return torch.matmul(self.u[start:stop].transpose(-1, -2), self.v[start:stop])

    def _gradient_chunks(self, elements: int = _CHUNK_ELEMENTS) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, stop, [n, K, d0, d1])`` per-example gradients in chunks of at most `elements` (one example at
        least)."""
        step = max(1, elements // max(1, self.n_outputs * self.numel))
        for start in range(0, self.n_examples, step):
            stop = min(self.n_examples, start + step)
            yield start, stop, self._gradients(start, stop)

    def _per_example_is_cheaper(self) -> bool:
        """True when forming each example's ``[d0, d1]`` gradient beats the ``R(R+1)/2`` rank-pair products of an
        entrywise square. The rank-pair route is one large GEMM; the per-example route is memory-bound (about four
        passes over ``[d0, d1]`` per example and component, whatever R), so it wins from about eight rank terms
        per readout component on."""
        r = self.rank
        return r * (r + 1) // 2 > 4 * self.n_outputs * r

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
        return self.selected_terms(sel).sum(2)

    def selected_terms(self, sel: Selection) -> Tensor:
        """``Σ_ij u_i B_ij(g) v_j`` per term: through the products ``u_i v_j [.., I·J]`` when there are no more
        rows than weight columns G, else through ``u B [.., J, G]`` (the smaller intermediate)."""
        rows, cols, block = sel.block  # [I, J(, G)]
        block = block.to(self.u.dtype)
        u, v = self.u.index_select(-1, rows), self.v.index_select(-1, cols)  # [n, Ku, R, I], [n, Kv, R, J]
        g = block.shape[2] if block.ndim == 3 else 1
        if len(rows) <= g:
            out = (u[..., :, None] * v[..., None, :]).flatten(-2) @ block.reshape(-1, g)  # [n, K, R, G]
            return out if block.ndim == 3 else out[..., 0]
        ub = (u @ block.reshape(len(rows), -1)).unflatten(-1, block.shape[1:])
        return (ub * (v if block.ndim == 2 else v[..., None])).sum(dim=3)

    def sq_sum(self, weights: Tensor | None = None) -> Tensor:
        """Either per example ``Σ_n G_n²`` from the gradients formed in chunks (many rank terms), or
        ``G² = Σ_{r≤s} (2 − [r=s]) (u_r ⊙ u_s) ⊗ (v_r ⊙ v_s)``, one matmul over the ``(n, k, r ≤ s)`` axis in which
        the side shared by every readout component is not repeated K times (the other is summed over k first)."""
        u, v = self.u, self.v
        n, ku, r, d0 = u.shape
        kv, d1 = v.shape[1], v.shape[-1]
        out = torch.zeros(d0, d1, dtype=u.dtype, device=u.device)
        if r > 1 and self._per_example_is_cheaper():
            for start, stop, g in self._gradient_chunks(_CACHE_ELEMENTS):
                if weights is None:
                    for one in g.reshape(-1, d0, d1):  # example by example while the chunk is in cache
                        out.addcmul_(one, one)
                    continue
                sq = g.square_().mul_(_component_weights(weights[start:stop], g.shape[1])[:, :, None, None])
                for one in sq.reshape(-1, d0, d1):
                    out += one
            return out.reshape(-1)
        pairs = [(i, j) for i in range(r) for j in range(i, r)]
        step = max(1, _CHUNK_ELEMENTS // max(1, max(ku, kv) * len(pairs) * (d0 + d1)))
        for s in range(0, n, step):
            uu, vv = self._rank_pair_products(pairs, s, s + step)  # [n, Ku, pairs, d0], [n, Kv, pairs, d1]
            w = None if weights is None else weights[s : s + step, :, None, None]
            if kv == 1:
                uu = uu if w is None else uu * w
                uu = uu.sum(1, keepdim=True) if uu.shape[1] > 1 else uu
            elif ku == 1:
                vv = vv if w is None else vv * w
                vv = vv.sum(1, keepdim=True) if vv.shape[1] > 1 else vv
            elif w is not None:
                uu = uu * w
            out.addmm_(uu.reshape(-1, d0).T, vv.reshape(-1, d1))
        return out.reshape(-1)

    def _rank_pair_products(self, pairs: list[tuple[int, int]], start: int, stop: int) -> tuple[Tensor, Tensor]:
        """``u_r ⊙ u_s`` and ``(2 − [r=s]) v_r ⊙ v_s`` of examples ``start:stop`` for the rank-term pairs given."""
        u, v = self.u[start:stop], self.v[start:stop]
        if pairs == [(0, 0)]:
            return u.square(), v.square()
        uu = u.new_empty(u.shape[0], u.shape[1], len(pairs), u.shape[-1])
        vv = v.new_empty(v.shape[0], v.shape[1], len(pairs), v.shape[-1])
        for p, (i, j) in enumerate(pairs):
            torch.mul(u[:, :, i], u[:, :, j], out=uu[:, :, p])
            torch.mul(v[:, :, i], v[:, :, j], out=vv[:, :, p])
            if i != j:
                vv[:, :, p] *= 2
        return uu, vv

    def sq_norms(self) -> Tensor:
        """``‖Σ_r u_r ⊗ v_r‖² = Σ_{r,s} (u_r·u_s)(v_r·v_s)``: ``‖u‖²‖v‖²`` for one term, two batched ``[R, R]`` Grams
        for several (or the formed gradients when they are smaller than the rank-term Grams)."""
        u, v = self.u, self.v
        r, (d0, d1) = self.rank, self.shape
        if r == 1:
            return _sq_norm(u[:, :, 0], -1) * _sq_norm(v[:, :, 0], -1)
        if r * (d0 + d1) > d0 * d1:
            return torch.cat([_sq_norm(g, (2, 3)) for _, _, g in self._gradient_chunks()])
        return ((u @ u.transpose(-1, -2)) * (v @ v.transpose(-1, -2))).sum(dim=(2, 3))

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

    def stacked_outputs(self, w: Tensor) -> Factor:
        """The side that depends on the component carries the stacking (``[K·d0, d1]`` or ``[d0, K·d1]`` as a
        matrix); when both do, each component is a block of rank terms, or dense when that is smaller."""
        s = w.sqrt()
        u, v = self.u, self.v
        ku, kv = u.shape[1], v.shape[1]
        if ku == 1 and kv == 1:
            return LowRankFactor(u * w.sum().sqrt(), v)
        if kv == 1:
            return LowRankFactor(_stack_components(u, s), v)
        if ku == 1:
            return LowRankFactor(u, _stack_components(v, s))
        n, k, r, d0 = u.shape
        d1 = v.shape[-1]
        if k * r * (k * d0 + d1) > k * d0 * d1:
            return DenseFactor((self.dense() * s[None, :, None]).reshape(n, 1, -1))
        blocks = torch.zeros(n, k, r, k, d0, dtype=u.dtype, device=u.device)
        blocks[:, torch.arange(k), :, torch.arange(k)] = (u * s[None, :, None, None]).transpose(0, 1)
        return LowRankFactor(blocks.reshape(n, 1, k * r, k * d0), v.reshape(n, 1, k * r, d1))

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
        # (u + ½u̇) ⊗ v + u ⊗ ½v̇: the rank-2 NLO factor of a dense layer, written in place into its rank terms
        r = u.shape[2]
        uu = u.new_empty(u.shape[0], u.shape[1], 2 * r, u.shape[3])
        vv = v.new_empty(v.shape[0], v.shape[1], 2 * r, v.shape[3])
        torch.add(u, u_dot, alpha=0.5, out=uu[:, :, :r])
        uu[:, :, r:] = u
        vv[:, :, :r] = v
        torch.mul(v_dot, 0.5, out=vv[:, :, r:])
        return LowRankFactor(uu, vv)

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

    def _dense_is_cheaper(self) -> bool:
        return self.dense_is_cheaper()

    def _without_zero_terms(self) -> LowRankFactor:
        if self.rank <= 1:
            return self
        keep = _nonzero_terms(self.u, self.v)
        if bool(keep.all()):
            return self
        if not bool(keep.any()):
            keep[0] = True
        return LowRankFactor(self.u[:, :, keep], self.v[:, :, keep])

    # ---- kernels -------------------------------------------------------------------------------------------
    def _bias_terms(self, bias: Factor) -> list[float] | None:
        """``c [R]`` with ``bias[n, k] = Σ_r c_r u[n, k, r]`` (to rounding) if `bias` is a dense factor of that form:
        the bias of a dense layer is the sum of its weight's output-side terms (all of them; those of the value
        part of the NLO order's rank-2 factor, the first half). None when it is not."""
        if not isinstance(bias, DenseFactor) or bias.g.shape != (self.n_examples, self.u.shape[1], self.shape[0]):
            return None
        r = self.rank
        g = bias.g
        if r == 1 and torch.equal(self.u[:, :, 0], g):  # one term: nothing to round
            return [1.0]
        eps = torch.finfo(self.dtype).eps
        scale = float(g.norm())
        for lead in dict.fromkeys((r, r // 2)):
            if lead < 1:
                continue
            terms = self.u[:, :, :lead]
            bound = 8 * (lead + 2) * eps * (scale + float(terms.norm()) * math.sqrt(lead))
            if float((terms.sum(2) - g).norm()) <= bound:
                return [1.0] * lead + [0.0] * (r - lead)
        return None

    def _gram_pair_cost(self, other: LowRankFactor, symmetric: bool) -> tuple[float, float]:
        """Multiply-adds per (n, m) pair of examples of the rank-pair route and of the per-example gradient route."""
        r, s = self.rank, other.rank
        pairs = r * (r + 1) / 2 if symmetric else r * s
        d0, d1 = self.shape
        pair = pairs * (self.u.shape[1] * other.u.shape[1] * d0 + self.v.shape[1] * other.v.shape[1] * d1)
        dense = self.n_outputs * other.n_outputs * d0 * d1
        dense += d0 * d1 * (self.n_outputs * r / other.n_examples + other.n_outputs * s / self.n_examples)
        return pair, dense

    def _add_gram(self, other: Factor, acc: _GramSum) -> None:
        assert isinstance(other, LowRankFactor)
        pair, dense = self._gram_pair_cost(other, acc.symmetric)
        if self.rank * other.rank > 1 and 2 * dense < pair:  # the pair products are GEMMs: a margin in their favour
            acc.add_columns(self._gradient_columns(), None if acc.symmetric else other._gradient_columns())
            return
        mine = _by_term(self.u), _by_term(self.v)
        theirs = mine if other is self else (_by_term(other.u), _by_term(other.v))
        for r in range(self.rank):
            for s in range(r if acc.symmetric else 0, other.rank):
                acc.add_product(_term_product(mine, theirs, r, s), off_diagonal=acc.symmetric and s != r)

    def _gradient_columns(self) -> Callable[[], Iterator[Tensor]]:
        """Chunks ``[N·K, c]`` of the flattened per-example gradients (``c`` whole rows of W at a time)."""

        def chunks() -> Iterator[Tensor]:
            u, v = self.u, self.v
            n, k, (d0, d1) = self.n_examples, self.n_outputs, self.shape
            step = max(1, _BLOCK_ELEMENTS // max(1, n * k * d1))
            for i in range(0, d0, step):
                g = torch.matmul(u[..., i : i + step].transpose(-1, -2), v)  # [n, K, step, d1]
                yield g.expand(n, k, *g.shape[2:]).reshape(n * k, -1)

        return chunks


def _by_term(t: Tensor) -> Tensor:
    """``[N, K, R, d] → [R, N, K, d]``, contiguous: each rank term's rows are one matrix for a GEMM."""
    return t.movedim(2, 0).contiguous() if t.shape[2] > 1 else t.movedim(2, 0)


def _term_product(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], r: int, s: int) -> _Product:
    """The Gram of term r of one factor and term s of another (``[R, N, K, d]`` u and v of each, `_by_term`) on a
    block of rows and columns, as the two matrices whose entrywise product it is: ``(u_r·u'_s)`` and ``(v_r·v'_s)``."""
    (ua, va), (ub, vb) = a, b

    def product(i0: int, i1: int, j0: int, j1: int) -> tuple[Tensor, Tensor]:
        uu = ua[r, i0:i1].reshape(-1, ua.shape[-1]) @ ub[s, j0:j1].reshape(-1, ub.shape[-1]).T
        vv = va[r, i0:i1].reshape(-1, va.shape[-1]) @ vb[s, j0:j1].reshape(-1, vb.shape[-1]).T
        return uu.view(i1 - i0, ua.shape[2], j1 - j0, ub.shape[2]), vv.view(i1 - i0, va.shape[2], j1 - j0, vb.shape[2])

    return product


@dataclass
class EmbeddingFactor(Factor):
    """Per-example gradient of an embedding table ``E [num_embeddings, d]``:
    ``G[n, k] = Σ_r e_{ids[n, r]} ⊗ v[n, k, r]``, the cotangent of each looked-up row added to that row (e the
    standard basis); the one-hot side is never stored.

    ids: ``[N, R]`` token ids; v: ``[N, K, R, d]``. Terms whose v is zero contribute nothing (padding rows).
    """

    ids: Tensor
    v: Tensor
    num_embeddings: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.v.shape[-1])

    @property
    def numel(self) -> int:
        return self.num_embeddings * self.v.shape[-1]

    @property
    def n_examples(self) -> int:
        return self.v.shape[0]

    @property
    def n_outputs(self) -> int:
        return self.v.shape[1]

    @property
    def rank(self) -> int:
        return self.v.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.v.dtype

    @property
    def device(self) -> torch.device:
        return self.v.device

    def _with(self, v: Tensor, ids: Tensor | None = None) -> EmbeddingFactor:
        return EmbeddingFactor(self.ids if ids is None else ids, v, self.num_embeddings)

    def rows(self, index: Tensor | slice) -> EmbeddingFactor:
        return self._with(self.v[index], self.ids[index])

    def to(self, device: torch.device | str) -> EmbeddingFactor:
        return self._with(self.v.to(device), self.ids.to(device))

    def to_lowrank(self) -> LowRankFactor:
        """The same gradients with the one-hot side stored (``[N, 1, R, num_embeddings]``)."""
        onehot = torch.nn.functional.one_hot(self.ids, self.num_embeddings).to(self.dtype)
        return LowRankFactor(onehot[:, None], self.v)

    def dense(self) -> Tensor:
        n, k, r, d = self.v.shape
        out = torch.zeros(n, k, self.num_embeddings, d, dtype=self.dtype, device=self.device)
        out.scatter_add_(2, self.ids[:, None, :, None].expand(n, k, r, d), self.v)
        return out.reshape(n, k, -1)

    def to_dense(self) -> DenseFactor:
        return DenseFactor(self.dense())

    def matvec(self, w: Tensor) -> Tensor:
        looked_up = w.reshape(self.shape)[self.ids]  # [N, R, d]
        return (self.v * looked_up[:, None]).sum(dim=(2, 3))

    def _row_sums(self, c: Tensor) -> Tensor:
        """``[N, R, d]``: ``Σ_k c[n, k] v[n, k, r]``."""
        if self.v.shape[1] == 1:
            return self.v[:, 0] * c.sum(1)[:, None, None]
        return torch.einsum("nk,nkrd->nrd", c, self.v)

    def rmatvec(self, c: Tensor) -> Tensor:
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return out.index_add_(0, self.ids.reshape(-1), self._row_sums(c).reshape(-1, self.shape[1])).reshape(-1)

    def entries(self, flat: Tensor) -> Tensor:
        d = self.shape[1]
        hit = (self.ids[:, :, None] == (flat // d)[None, None, :]).to(self.dtype)  # [N, R, m]
        return (self.v[..., flat % d] * hit[:, None]).sum(dim=2)

    def selected(self, sel: Selection) -> Tensor:
        return self.selected_terms(sel).sum(2)

    def selected_terms(self, sel: Selection) -> Tensor:
        rows, cols, block = sel.block  # [I, J(, G)]
        hit = (self.ids[:, :, None] == rows[None, None, :]).to(self.dtype)[:, None]  # [N, 1, R, I]
        by_row = block.to(self.dtype).transpose(0, 1).reshape(len(cols), -1)  # [J, I·G]
        vb = (self.v[..., cols] @ by_row).unflatten(-1, (len(rows), *block.shape[2:]))
        return (vb * (hit if block.ndim == 2 else hit[..., None])).sum(dim=3)

    def _example_rows(self) -> tuple[Tensor, Tensor]:
        """Each example's gradient rows: ``(keys [U], rows [U, K, d])`` with ``key = n·num_embeddings + token`` over
        the distinct (example, token) pairs, the cotangents of repeated tokens summed."""
        n, k, r, d = self.v.shape
        key = (torch.arange(n, device=self.device)[:, None] * self.num_embeddings + self.ids).reshape(-1)
        keys, at = torch.unique(key, return_inverse=True)
        rows = torch.zeros(len(keys), k, d, dtype=self.dtype, device=self.device)
        return keys, rows.index_add_(0, at, self.v.transpose(1, 2).reshape(n * r, k, d))

    def sq_sum(self, weights: Tensor | None = None) -> Tensor:
        """Per example the rows of repeated tokens are summed, squared and added to their token's row."""
        keys, rows = self._example_rows()
        sq = rows.square_()
        if weights is not None:
            sq = sq.mul_(_component_weights(weights, sq.shape[1])[keys // self.num_embeddings][:, :, None])
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return out.index_add_(0, keys % self.num_embeddings, sq.sum(1)).reshape(-1)

    def sq_norms(self) -> Tensor:
        """``Σ_{r,s} [ids_r = ids_s] (v_r·v_s)``."""
        same = (self.ids[:, :, None] == self.ids[:, None, :]).to(self.dtype)  # [N, R, R]
        return ((self.v @ self.v.transpose(-1, -2)) * same[:, None]).sum(dim=(2, 3))

    def scaled(self, w: float) -> EmbeddingFactor:
        return self if w == 1.0 else self._with(self.v * w)

    def negated(self) -> EmbeddingFactor:
        return self._with(-self.v)

    def output_sum(self, c: Tensor) -> EmbeddingFactor:
        if self.v.shape[1] == 1:
            return self._with(self.v * c.sum())
        return self._with(torch.einsum("nkrd,k->nrd", self.v, c)[:, None])

    def stacked_outputs(self, w: Tensor) -> EmbeddingFactor:
        if self.v.shape[1] == 1:
            return self._with(self.v * w.sum().sqrt())
        v = _stack_components(self.v, w.sqrt())
        return EmbeddingFactor(self.ids, v, self.num_embeddings)

    def state(self) -> dict[str, Tensor]:
        rows = torch.tensor([self.num_embeddings], dtype=torch.long)
        return {"ids": self.ids, "v": self.v, "num_embeddings": rows}

    def with_tangents(self) -> EmbeddingFactor:
        v, v_dot = _split_dual(self.v)
        return self._with(v if v_dot is None else v + 0.5 * v_dot)

    def _dense_is_cheaper(self) -> bool:
        return self.rank * (1 + self.n_outputs * self.shape[1]) > self.n_outputs * self.numel

    def _without_zero_terms(self) -> EmbeddingFactor:
        if self.rank <= 1:
            return self
        keep = _nonzero_terms(self.v)
        if bool(keep.all()):
            return self
        if not bool(keep.any()):
            keep[0] = True
        return EmbeddingFactor(self.ids[:, keep], self.v[:, :, keep], self.num_embeddings)

    def _add_gram(self, other: Factor, acc: _GramSum) -> None:
        """``Σ_{r,s} [ids_r = ids'_s] (v_r·v'_s)``: per pair of terms a comparison of token ids and one GEMM."""
        assert isinstance(other, EmbeddingFactor)
        ka, kb, d = self.v.shape[1], other.v.shape[1], self.shape[1]
        va, ia = _by_term(self.v), self.ids.T.contiguous()  # [R, N, K, d], [R, N]
        vb, ib = (va, ia) if other is self else (_by_term(other.v), other.ids.T.contiguous())
        for r in range(self.rank):
            for s in range(r if acc.symmetric else 0, other.rank):

                def product(i0: int, i1: int, j0: int, j1: int, r: int = r, s: int = s) -> tuple[Tensor, Tensor]:
                    same = ia[r, i0:i1, None] == ib[s, None, j0:j1]
                    vv = va[r, i0:i1].reshape(-1, d) @ vb[s, j0:j1].reshape(-1, d).T
                    return same.to(self.dtype).view(i1 - i0, 1, j1 - j0, 1), vv.view(i1 - i0, ka, j1 - j0, kb)

                acc.add_product(product, off_diagonal=acc.symmetric and s != r)


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
        return self.selected(sel).unsqueeze(2)

    def sq_sum(self, weights: Tensor | None = None) -> Tensor:
        sq = self.g.square()
        if weights is not None:
            sq = sq * _component_weights(weights, sq.shape[1])[:, :, None]
        return sq.sum(dim=(0, 1))

    def sq_norms(self) -> Tensor:
        return _sq_norm(self.g, -1)

    def scaled(self, w: float) -> DenseFactor:
        return self if w == 1.0 else DenseFactor(self.g * w)

    def negated(self) -> DenseFactor:
        return DenseFactor(-self.g)

    def output_sum(self, c: Tensor) -> DenseFactor:
        if self.g.shape[1] == 1:
            return DenseFactor(self.g * c.sum())
        return DenseFactor(torch.einsum("nkp,k->np", self.g, c)[:, None])

    def stacked_outputs(self, w: Tensor) -> DenseFactor:
        if self.g.shape[1] == 1:
            return DenseFactor(self.g * w.sum().sqrt())
        return DenseFactor((self.g * w.sqrt()[None, :, None]).reshape(self.g.shape[0], 1, -1))

    def state(self) -> dict[str, Tensor]:
        return {"g": self.g}

    def with_tangents(self) -> DenseFactor:
        g, g_dot = _split_dual(self.g)
        return DenseFactor(g if g_dot is None else g + 0.5 * g_dot)

    def _add_gram(self, other: Factor, acc: _GramSum) -> None:
        assert isinstance(other, DenseFactor)
        acc.add_dense(self.g, None if acc.symmetric else other.g)


# ---- kernels of many factors ---------------------------------------------------------------------------------
_Product = Callable[[int, int, int, int], tuple[Tensor, Tensor]]


def _edges(n: int, rows: int) -> list[tuple[int, int]]:
    """``[(start, stop)]``: `n` split into near-equal blocks of at most `rows`."""
    blocks = max(1, math.ceil(n / max(1, rows)))
    cuts = [round(i * n / blocks) for i in range(blocks + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


class _GramSum:
    """Accumulates ``Σ_i ⟨G_i[n, k], G'_i[m, l]⟩`` into ``out [N, K, M, L]``.

    Factors register entrywise products of two matrices per pair of rank terms (`add_product`), or dense column
    chunks whose products are GEMMs straight into `out` (`add_dense`, `add_columns`); `finish` runs them over
    blocks of the output, so that each block stays in cache while every factor adds to it. A self-kernel
    (`symmetric`) computes the blocks on and above the diagonal and mirrors them; of a pair of different rank
    terms only (r, s) is registered, its (s, r) partner being the transpose of (r, s) at the mirrored block.
    """

    def __init__(self, out: Tensor, symmetric: bool):
        self.out = out
        self.symmetric = symmetric
        self.products: list[_Product] = []
        self.off_diagonal: list[_Product] = []
        self.dense: list[tuple[Tensor, Tensor | None]] = []
        self.columns: list[tuple[Callable[[], Iterator[Tensor]], Callable[[], Iterator[Tensor]] | None]] = []

    def add_product(self, product: _Product, off_diagonal: bool = False) -> None:
        (self.off_diagonal if off_diagonal else self.products).append(product)

    def add_dense(self, g: Tensor, h: Tensor | None) -> None:
        self.dense.append((g, h))

    def add_columns(self, left: Callable[[], Iterator[Tensor]], right: Callable[[], Iterator[Tensor]] | None) -> None:
        self.columns.append((left, right))

    def _flat(self, t: Tensor, k: int) -> Tensor:
        """``[N, K', c] → [N·k, c]`` (the K axis expanded to the kernel's)."""
        return t.expand(t.shape[0], k, t.shape[-1]).reshape(-1, t.shape[-1])

    def _joined_dense(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        """The dense factors as ``[N·K, c]`` matrices, small ones side by side so that their Grams are one GEMM."""
        n, k, m, l = self.out.shape
        group: list[tuple[Tensor, Tensor | None]] = []
        size = 0

        def flush() -> Iterator[tuple[Tensor, Tensor | None]]:
            if group:
                left = torch.cat([self._flat(g, k) for g, _ in group], dim=1)
                right = None if self.symmetric else torch.cat([self._flat(h, l) for _, h in group], dim=1)  # type: ignore[arg-type]
                yield left, right

        for g, h in self.dense:
            if g.numel() > _JOIN_ELEMENTS:
                yield self._flat(g, k), None if h is None else self._flat(h, l)
                continue
            if size + g.numel() > _JOIN_ELEMENTS:
                yield from flush()
                group, size = [], 0
            group.append((g, h))
            size += g.numel()
        yield from flush()

    def _column_chunks(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        yield from self._joined_dense()
        for left, right in self.columns:
            if right is None:
                yield from ((a, None) for a in left())
            else:
                yield from zip(left(), right())

    def _blocks(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        n, k, m, l = self.out.shape
        if self.symmetric:  # at least `_SYMMETRIC_BLOCK_ROWS` rows, at most `_SYMMETRIC_BLOCKS` blocks a side
            rows = max(_SYMMETRIC_BLOCK_ROWS, math.ceil(n / _SYMMETRIC_BLOCKS))
            rows = min(rows, max(1, math.isqrt(_BLOCK_ELEMENTS // (k * l))))
            edges = _edges(n, rows)
            return [(a, b) for i, a in enumerate(edges) for b in edges[i:]]
        return [(a, (0, m)) for a in _edges(n, max(1, _BLOCK_ELEMENTS // (k * m * l)))]

    def finish(self) -> Tensor:
        out = self.out
        n, k, m, l = out.shape
        blocks = self._blocks()
        for (i0, i1), (j0, j1) in blocks:  # blocks outer: the output block stays in cache across the factors
            block = out[i0:i1, :, j0:j1, :]
            for product in self.products:
                block.addcmul_(*product(i0, i1, j0, j1))
            if self.off_diagonal:  # pairs (r, s) here; their (s, r) partners: the transposed (r, s) at (j, i)
                mirrored = out.new_zeros(j1 - j0, k, i1 - i0, l)
                for product in self.off_diagonal:
                    mirrored.addcmul_(*product(j0, j1, i0, i1))
                    if i0 != j0:
                        block.addcmul_(*product(i0, i1, j0, j1))
                if i0 == j0:
                    block += mirrored
                block += mirrored.permute(2, 3, 0, 1)
        for left, right in self._column_chunks():
            right = left if right is None else right
            for (i0, i1), (j0, j1) in blocks:
                block = out[i0:i1, :, j0:j1, :].view((i1 - i0) * k, (j1 - j0) * l)
                block.addmm_(left[i0 * k : i1 * k], right[j0 * l : j1 * l].T)
        if self.symmetric:  # mirror the upper blocks into the lower ones, block by block
            edges = sorted({a for a, _ in blocks})
            for i, (i0, i1) in enumerate(edges):
                for j0, j1 in edges[:i]:
                    out[i0:i1, :, j0:j1, :] = out[j0:j1, :, i0:i1, :].permute(2, 3, 0, 1)
        return out


def _same_layout(a: Factor, b: Factor) -> tuple[Factor, Factor]:
    """`a` and `b` in one layout class (the more structured one both can take)."""
    if type(a) is type(b):
        return a, b
    kinds = (LowRankFactor, EmbeddingFactor)
    if isinstance(a, kinds) and isinstance(b, kinds):
        return _as_lowrank(a), _as_lowrank(b)
    return a.to_dense(), b.to_dense()


def _as_lowrank(f: Factor) -> LowRankFactor:
    if isinstance(f, EmbeddingFactor):
        return f.to_lowrank()
    assert isinstance(f, LowRankFactor)
    return f


def _fold_biases(
    left: list[Factor], right: list[Factor], bias_of: Mapping[int, int]
) -> tuple[list[Factor], list[Factor]]:
    """Join each weight with its bias (``bias_of``: position of a weight → position of its bias) wherever the
    bias's gradient is a sum of the weight's output-side terms on both sides: ``[W | b]`` has the gradient
    ``Σ_r u_r ⊗ [v_r, c_r]``, whose Gram is the two Grams at the cost of one."""
    left, right = list(left), list(right)
    dropped = set()
    for w, b in bias_of.items():
        lw, rw = left[w], right[w]
        if type(lw) is not LowRankFactor or type(rw) is not LowRankFactor:
            continue
        c_left = lw._bias_terms(left[b])
        c_right = c_left if rw is lw and right[b] is left[b] else rw._bias_terms(right[b])
        if c_left is None or c_right is None:
            continue
        left[w] = _with_bias_column(lw, c_left)
        right[w] = left[w] if rw is lw else _with_bias_column(rw, c_right)
        dropped.add(b)
    keep = [i for i in range(len(left)) if i not in dropped]
    return [left[i] for i in keep], [right[i] for i in keep]


def _with_bias_column(f: LowRankFactor, c: list[float]) -> LowRankFactor:
    """The factor of ``[W | b]``: ``c_r`` appended to every v term (one more column in each GEMM, which costs
    nothing measurable, where a separate bias Gram costs a GEMM over the output side)."""
    v = f.v
    column = torch.tensor(c, dtype=v.dtype, device=v.device)[None, None, :, None].expand(*v.shape[:3], 1)
    return LowRankFactor(f.u, torch.cat([v, column], dim=-1))


def gram_sum(
    left: Sequence[Factor],
    right: Sequence[Factor] | None = None,
    out: Tensor | None = None,
    bias_of: Mapping[int, int] | None = None,
) -> Tensor:
    """``[N, K, M, L]``: ``Σ_i ⟨G_{left_i}[n, k], G_{right_i}[m, l]⟩``, the kernel of several parameter tensors.

    right: the same tensors' factors over a second set of examples; None for the self-kernel of `left` (only its
    upper block triangle is computed). out: contiguous ``[N, K, M, L]`` to add to in place. bias_of: position
    of a weight in the lists → position of its layer's bias, folded into the weight's Gram where the bias's
    gradient is the sum of the weight's output-side terms (checked; otherwise both are computed apart).
    """
    other = left if right is None else right
    if out is None:
        first = left[0]
        k = max(f.n_outputs for f in left)
        l = max(f.n_outputs for f in other)
        out = torch.zeros(first.n_examples, k, other[0].n_examples, l, dtype=first.dtype, device=first.device)
    symmetric = right is None
    lefts, rights = _fold_biases(list(left), list(other), bias_of or {})
    acc = _GramSum(out, symmetric)
    for a, b in zip(lefts, rights):
        a, b = _same_layout(a, b)
        a._add_gram(b, acc)
    return acc.finish()


def factor_gram(a: Factor, b: Factor | None = None, out: Tensor | None = None) -> Tensor:
    """``[N, K, M, K']`` inner products of the per-example gradients of one parameter in two factors (b None: a's
    self-kernel). With `out` (contiguous ``[N, K, M, K']``) they are added to it in place."""
    return gram_sum([a], None if b is None or b is a else [b], out)


# ---- joining factors -------------------------------------------------------------------------------------------
def sum_factors(parts: list[Factor]) -> Factor:
    """One factor for the sum of several over the same examples (uses of a tied weight, quadrature nodes...)."""
    if len(parts) == 1:
        return parts[0]
    kinds = {type(p) for p in parts}
    if kinds == {EmbeddingFactor} and len({p.num_embeddings for p in parts}) == 1:  # type: ignore[attr-defined]
        embeddings: list[EmbeddingFactor] = parts  # type: ignore[assignment]
        k = max(p.n_outputs for p in embeddings)
        v = torch.cat([p.v.expand(p.n_examples, k, *p.v.shape[2:]) for p in embeddings], dim=2)
        return EmbeddingFactor(torch.cat([p.ids for p in embeddings], dim=1), v, embeddings[0].num_embeddings)
    if kinds <= {LowRankFactor, EmbeddingFactor}:
        return LowRankFactor.cat_rank([_as_lowrank(p) for p in parts])
    return DenseFactor(torch.stack([p.to_dense().g for p in parts]).sum(0))


def difference(a: Factor, b: Factor) -> Factor:
    """The factor of ``G_a − G_b`` (low-rank factors join their rank terms; nothing is densified needlessly)."""
    return sum_factors([a, b.negated()])


def cat_examples(factors: list[Factor]) -> Factor:
    """Concatenate per-batch factors of one parameter along the example axis.

    Factors with different ranks (sequences of different lengths) are zero-padded to a common rank; if any
    batch is dense, the result is dense.
    """
    if len(factors) == 1:
        return factors[0]
    kinds = {type(f) for f in factors}
    if kinds == {LowRankFactor}:
        low: list[LowRankFactor] = factors  # type: ignore[assignment]
        r = max(f.rank for f in low)
        k_u = max(f.u.shape[1] for f in low)
        k_v = max(f.v.shape[1] for f in low)
        u = torch.cat([_pad_terms(f.u, k_u, r) for f in low])
        return LowRankFactor(u, torch.cat([_pad_terms(f.v, k_v, r) for f in low]))
    if kinds == {EmbeddingFactor} and len({f.num_embeddings for f in factors}) == 1:  # type: ignore[attr-defined]
        emb: list[EmbeddingFactor] = factors  # type: ignore[assignment]
        r = max(f.rank for f in emb)
        k = max(f.n_outputs for f in emb)
        ids = torch.cat([_pad_terms(f.ids[:, None], 1, r)[:, 0] for f in emb])
        return EmbeddingFactor(ids, torch.cat([_pad_terms(f.v, k, r) for f in emb]), emb[0].num_embeddings)
    if kinds <= {LowRankFactor, EmbeddingFactor}:
        return cat_examples([_as_lowrank(f) for f in factors])
    return DenseFactor(torch.cat([f.to_dense().g for f in factors]))


def compact(f: Factor) -> Factor:
    """The smaller layout of a factor: rank terms that are zero for every example dropped, and dense per-example
    gradients when they take less memory than the factored layout."""
    f = f._without_zero_terms()
    return f.to_dense() if f._dense_is_cheaper() else f


def gather_examples(
    f: Factor, all_gather: Callable[[Tensor], list[Tensor]], any_true: Callable[[bool], bool]
) -> Factor:
    """The factor of every process's examples, concatenated in process order.

    all_gather: a tensor of this process → the tensors of every process (first dims may differ); any_true: a
    flag of this process → whether any process's flag is set (one dense shard makes every shard dense).
    """
    if any_true(isinstance(f, DenseFactor)):
        return DenseFactor(torch.cat(all_gather(f.to_dense().g)))
    if isinstance(f, EmbeddingFactor):
        parts = zip(all_gather(f.ids), all_gather(f.v))
        return cat_examples([EmbeddingFactor(ids, v, f.num_embeddings) for ids, v in parts])
    assert isinstance(f, LowRankFactor)
    us, vs = all_gather(f.u), all_gather(f.v)
    return cat_examples([LowRankFactor(u, v) for u, v in zip(us, vs)])
