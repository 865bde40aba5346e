"""The learned kernel: eigenfeatures of the kernel change ``ΔΘ = Θ_order − Θ_against``, and the weight change ΔW.

The effective kernel of a trained network, ``Θ_order = J_a J_aᵀ`` (J_a the ``[N·K, P]`` features at the order,
rows example-major ``n·K + k``), holds what training added *and* what was already there at initialisation:
the isotropic ``x·x′`` part of a random first layer, the near-constant mode of ReLU units. Subtracting the
initial kernel ``Θ_init = J_b J_bᵀ`` leaves the change (docs/MATH.md §6)::

    ΔΘ = J_a J_aᵀ − J_b J_bᵀ = [J_a J_b] diag(I, −I) [J_a J_b]ᵀ

ΔΘ is symmetric but indefinite: `kernel_change` keeps the eigenvalues' signs and ranks them by |λ|. An
eigenvector u belongs to the pair ``(J_aᵀu, J_bᵀu)``: ``‖J_aᵀu‖² − ‖J_bᵀu‖² = λ``, and its value at a new input x
is the Nyström extension ``u(x) = [φ_a(x)·J_aᵀu − φ_b(x)·J_bᵀu − m] / λ`` (m the training mean that centring
removed). `KernelChange` keeps both vectors; its single parameter direction (what ``ef.max_activating``, the
dashboards and ``change[i].direction()`` evaluate) is the change of the features along u, ``(J_a − J_b)ᵀu``,
normalised. Per parameter tensor its block ``[d_out, d_in]`` has a top right singular vector: the input
direction that layer reads (`KernelChange.input_directions`, `KernelChange.subspace`).

``center=True`` (the default) takes the eigenpairs of ``H ΔΘ H``, ``H = I − 11ᵀ/N`` over the examples of each
readout component: without it the top eigenvector of a ReLU network or of logits is the change of the
near-constant mode.

`weight_change` is the plain parameter-space view: per tensor, the singular vectors of ``ΔW = W* − W0`` and their
share of ``‖Δθ‖²``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import io
from .._check import one_of, positive_int
from .._savable import register
from ..dual import ORDERS, CompletenessWarning, DualModel
from ..errors import ConfigError, DataError
from ..features import EffectiveFeatures
from ..ids import FeatureIds
from .operator import KernelOperator
from .spectrum import _DENSE_PAIRS, METHODS, Cliff, Eigenfeature, Spectrum, _fix_signs, spectral_cliffs

# What `KernelChange.directions` / `blocks` / `input_directions` read: the change (J_a − J_b)ᵀu, J_aᵀu or J_bᵀu.
KINDS = ("change", "order", "against")
# How `KernelChange.subspace` weighs each eigenvector's block: |λ|, √|λ| or equally.
WEIGHTS = ("abs", "sqrt", "none")
# A dual model whose completeness residual is above this explains too little of the network to read its features.
INCOMPLETE = 0.5


def warn_if_incomplete(residual: float, order: str, what: str) -> None:
    """One `CompletenessWarning` when the dual model at `order` leaves more than half of the change unexplained."""
    if residual > INCOMPLETE:
        warnings.warn(
            f"{what} come from the dual model at order {order!r}, whose completeness residual is {residual:.3g} "
            f"(> {INCOMPLETE}): those features do not explain what the network learned. Use order='path' (add "
            "nodes= for ReLU networks, whose quadrature error falls like 1/nodes)",
            CompletenessWarning,
            stacklevel=3,
        )


@dataclass
class ChangeEigenfeature(Eigenfeature):
    """Handle on eigenfeature `index` of a `KernelChange` (what ``change[i]`` returns); `value` is the signed λ."""

    source: KernelChange
    _prefix = "change"

    def direction(self, kind: str = "change") -> Tensor:
        """``[P]`` the unit parameter direction of `kind` (`KernelChange.directions`)."""
        return self.source.directions(self.index, kind)


@register
@dataclass
class KernelChange(Spectrum):
    """Top eigenpairs of ``ΔΘ = Θ_order − Θ_against`` (or of ``Θ_order`` alone), ranked by |λ|.

    Attributes (besides `Spectrum`'s):
        values: ``[k]`` signed eigenvalues, largest |λ| first.
        functions: ``[N, k]`` or ``[N, K, k]`` unit eigenvectors u_i (centred when ``meta["center"]``).
        direction_matrix: ``[k, P_sel]`` the unit change directions ``(J_a − J_b)ᵀu_i / ‖·‖`` (``J_aᵀu_i`` when
            there is no `against`).
        order_directions: ``[k, P_sel]`` ``J_aᵀu_i``, unnormalised; against_directions: ``[k, P_sel]``
            ``J_bᵀu_i``, or None for the kernel itself.
        offsets: ``[K, k]`` the per-component training mean of ``ΔΘ u_i`` that centring removed (zeros when
            uncentred), for the Nyström extension `project`.
        meta: ``method``, ``matvecs``, ``seconds``, ``center``, ``order``, ``against``, ``layer``,
            ``component``, ``readout``, ``nodes`` and ``completeness`` (``{"order": r_a, "against": r_b}``).
    """

    order_directions: Tensor | None = None
    against_directions: Tensor | None = None
    offsets: Tensor | None = None

    def __getitem__(self, i: int) -> ChangeEigenfeature:
        if not -len(self) <= i < len(self):
            raise IndexError(f"eigenfeature {i} out of range for {len(self)} eigenpairs")
        return ChangeEigenfeature(self, i % len(self))

    @property
    def cliff(self) -> Cliff:
        """The largest ratio ``|λ_i| / |λ_{i+1}|`` among the top values."""
        return Spectrum(self.values.abs(), self.functions).cliff

    def cliffs(self, n: int | None = None, min_ratio: float = 10.0) -> list[int]:
        """`spectral_cliffs` of |λ|."""
        return spectral_cliffs(self.values.abs(), n=n, min_ratio=min_ratio)

    # ---- parameter directions ------------------------------------------------------------------------
    def _selected(self, i: int, kind: str) -> Tensor:
        """``[P_sel]`` the unit vector of `kind` for eigenfeature i."""
        one_of("kind", kind, KINDS)
        if kind == "change":
            assert self.direction_matrix is not None
            return self.direction_matrix[i]
        if kind == "against" and self.against_directions is None:
            raise ConfigError("this is the spectrum of one kernel (against=None): it has no 'against' directions")
        assert self.order_directions is not None
        v = self.order_directions[i] if kind == "order" else self.against_directions[i]  # type: ignore[index]
        return v / v.norm().clamp_min(1e-300)

    def directions(self, i: int, kind: str = "change") -> Tensor:
        """``[P]``: the unit parameter direction of eigenfeature i (zeros outside `params`).

        kind: ``"change"`` ``(J_a − J_b)ᵀu`` (default; what search and dashboards evaluate), ``"order"`` ``J_aᵀu``
        or ``"against"`` ``J_bᵀu``.
        """
        return self._embed(self._selected(i, kind))

    def blocks(self, i: int, kind: str = "change") -> dict[str, Tensor]:
        """``{state_dict name: tensor of that parameter's shape}``: the parts of direction i on each tensor."""
        direction = self._selected(i, kind)
        out, start = {}, 0
        chosen = set(self.params or ())
        for s in self.slots or ():
            if s.name in chosen:
                out[s.state_name] = direction[start : start + s.numel].reshape(s.shape)
                start += s.numel
        return out

    def tensor_shares(self, i: int, kind: str = "change") -> dict[str, float]:
        """``{state_dict name: share of ‖d_i‖²}`` of direction i on each tensor, largest first (they sum to 1):
        where in the network the mode lives."""
        sq = {name: float(b.square().sum()) for name, b in self.blocks(i, kind).items()}
        total = sum(sq.values()) or 1.0
        return {name: sq[name] / total for name in sorted(sq, key=lambda n: -sq[n])}

    def _block(self, i: int, param: str, kind: str) -> Tensor:
        """``[d0, d1]`` the block of direction i on `param` (trailing axes flattened)."""
        slot = FeatureIds(self.slots or []).slot(param)
        if slot.name not in set(self.params or ()):
            raise ConfigError(
                f"{param!r} is not among the tensors this kernel covers ({', '.join(self.params or ())}); pass "
                "layer=None (every parameter) or include it in layer="
            )
        block = self.blocks(i, kind)[slot.state_name]
        return block.reshape(block.shape[0], -1) if block.ndim > 1 else block[None]

    def input_directions(self, param: str, kind: str = "change") -> Tensor:
        """``[k, d_in]``: per eigenfeature, the top right singular vector of its `param` block ``[d_out, d_in]``
        (the input direction that layer reads), largest entry positive."""
        rows = [
            torch.linalg.svd(self._block(i, param, kind).double(), full_matrices=False).Vh[0] for i in range(len(self))
        ]
        return _fix_signs(torch.stack(rows).T).T

    def subspace(self, param: str, n: int, top: int | None = None, weight: str = "abs", kind: str = "change") -> Tensor:
        """``[n, d_in]``: the top-n right singular vectors of the stacked `param` blocks of the `top` first
        eigenfeatures (all when None), each block normalised and weighted by ``weight`` of its eigenvalue
        (``"abs"`` |λ|, ``"sqrt"`` √|λ|, ``"none"``): the input subspace the learned kernel reads."""
        one_of("weight", weight, WEIGHTS)
        top = len(self) if top is None else min(positive_int("top", top), len(self))
        rows = []
        for i in range(top):
            block = self._block(i, param, kind).double()
            lam = abs(float(self.values[i]))
            w = {"abs": lam, "sqrt": math.sqrt(lam), "none": 1.0}[weight]
            rows.append(block / block.norm().clamp_min(1e-300) * math.sqrt(w))
        stacked = torch.cat(rows)
        positive_int("n", n)
        if n > min(stacked.shape):
            raise ConfigError(
                f"n={n} directions asked of {top} blocks of shape {tuple(rows[0].shape)}; pass n ≤ {min(stacked.shape)}"
            )
        return _fix_signs(torch.linalg.svd(stacked, full_matrices=False).Vh[:n].T).T

    # ---- values on other data ------------------------------------------------------------------------
    def project(self, features: EffectiveFeatures, against: EffectiveFeatures | None = None) -> Tensor:
        """``[N', (K,) k]`` on features of other data (same model and readout).

        Without `against`: ``φ^E(x)·d_i``, the features along the unit change direction (what search evaluates).
        With the `against` order's features too: the Nyström extension of the eigenfunctions,
        ``u_i(x) = [φ_a(x)·J_aᵀu_i − φ_b(x)·J_bᵀu_i − m_i] / λ_i``, which on the training data is u_i itself.
        """
        features = self._as_component(features)
        if against is None:
            return super().project(features)
        against = self._as_component(against)
        for f, want, role in (
            (features, self.meta.get("order"), "features"),
            (against, self.meta.get("against"), "against"),
        ):
            if f.order != want:
                raise ConfigError(f"{role} are at order {f.order!r}; this kernel change was computed at {want!r}")
        if against.n_examples != features.n_examples:
            raise ConfigError("features and against must hold the same examples")
        assert self.order_directions is not None and self.against_directions is not None and self.offsets is not None
        op_a, op_b = KernelOperator(features, self.params), KernelOperator(against, self.params)
        dt = features.dtype
        cols = [
            op_a.jvp(self.order_directions[i].to(dt)) - op_b.jvp(self.against_directions[i].to(dt))
            for i in range(len(self))
        ]
        out = torch.stack(cols, dim=-1).reshape(features.n_examples, features.n_outputs, len(self))
        out = (out - self.offsets.to(dt)) / self.values.to(dt)
        return out[:, 0] if features.scalar else out

    def _as_component(self, features: EffectiveFeatures) -> EffectiveFeatures:
        c = self.meta.get("component")
        return features if c is None or features.n_outputs == 1 else component_features(features, c)

    def __repr__(self) -> str:
        shown = ", ".join(f"{v:.4g}" for v in self.values[:6].tolist()) + (", ..." if len(self) > 6 else "")
        m = self.meta
        what = f"Θ_{m.get('order')}" + (f" − Θ_{m['against']}" if m.get("against") else "")
        res = (m.get("completeness") or {}).get("order")
        done = "" if res is None else f", completeness({m.get('order')})={res:.3g}"
        return (
            f"KernelChange({what}, k={len(self)}, values=[{shown}], centred={m.get('center')}, "
            f"layer={m.get('layer') or 'all'}, method={m.get('method')!r}{done})"
        )

    # ---- persistence ---------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        tensors, meta = super().to_state()
        for name in ("order_directions", "against_directions", "offsets"):
            value = getattr(self, name)
            if value is not None:
                tensors[name] = value
        return tensors, meta

    @classmethod
    def validate_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """`Spectrum`'s checks, then the two orders' directions ``[k, P_sel]`` and the centring offsets ``[K, k]``."""
        extra = ("order_directions", "against_directions", "offsets")
        Spectrum.validate_state({k: t for k, t in tensors.items() if k not in extra}, meta)
        values = tensors["values"]
        if "direction_matrix" in tensors:
            shape = tuple(tensors["direction_matrix"].shape)
            for name in extra[:2]:
                if name in tensors:
                    io.tensor(tensors, name, "float", shape=shape)
        if "offsets" in tensors:
            io.tensor(tensors, "offsets", "float", ndim=2)
            offsets = tensors["offsets"]
            if offsets.shape[1] != len(values):
                io.invalid("tensor 'offsets'", f"[K, {len(values)}] (one column per eigenvalue)", offsets.shape)

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> KernelChange:
        base = Spectrum.from_state(tensors, meta)
        return cls(
            base.values,
            base.functions,
            base.direction_matrix,
            base.slots,
            base.params,
            base.ridge,
            base.meta,
            tensors.get("order_directions"),
            tensors.get("against_directions"),
            tensors.get("offsets"),
        )


# ---- the solver -------------------------------------------------------------------------------------------
def component_features(features: EffectiveFeatures, component: int) -> EffectiveFeatures:
    """The features of readout component `component` alone (a scalar readout), from a vector readout's factors."""
    k = features.n_outputs
    if isinstance(component, bool) or not isinstance(component, int) or not -k <= component < k:
        raise ConfigError(
            f"component must be an integer in 0..{k - 1} (the readout has {k} components), got {component!r}"
        )
    c = component % k
    w = torch.zeros(k, dtype=features.dtype, device=features.device)
    w[c] = 1
    return EffectiveFeatures(
        {name: f.output_sum(w) for name, f in features.factors.items()},
        features.ids,
        features.delta,
        features.z_init[:, c : c + 1],
        features.z_trained[:, c : c + 1],
        features.order,
        True,
        {**features.meta, "component": c},
    )


def kernel_change(
    source: DualModel | EffectiveFeatures,
    data: Any = None,
    *,
    order: str | None = None,
    against: str | EffectiveFeatures | None = "init",
    k: int = 10,
    layer: str | Sequence[str] | None = None,
    component: int | None = None,
    center: bool = True,
    method: str = "auto",
    tol: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> KernelChange:
    """Top-`k` eigenpairs (by |λ|, signed) of the kernel change ``Θ_order − Θ_against`` on `data`, factored.

    Args:
        source: a `DualModel` (its features at `order` and at `against` are computed on `data`) or the
            `EffectiveFeatures` at the order (then `against` is the features to subtract, or None).
        data: with a `DualModel`: a tensor, ``(inputs, targets)`` or an iterable of batches.
        order: the order of Θ_order (default the dual model's; ``"path"`` explains a network far from init).
        against: the kernel subtracted: an order name (default ``"init"``, Θ_init), `EffectiveFeatures` of
            the same examples, or None for the eigenfeatures of Θ_order itself (signed, centred like the rest).
        k: eigenpairs kept (at most N·K).
        layer: restrict J to one parameter tensor or a list (state_dict or parameter names), as in
            `eigenfeatures`. The layer kernels of a first layer carry the isotropic ``x·x′`` of the inputs:
            the whole-network change is usually the one to read.
        component: for a vector readout, the kernel of readout component `component` alone (``[N, N]``).
        center: eigenpairs of ``H ΔΘ H`` (each readout component centred over the examples).
        method: ``"dense"`` (form both kernels, ``eigh``), ``"lanczos"`` (ARPACK on the factored operator
            ``u ↦ J_a(J_aᵀu) − J_b(J_bᵀu)``, which="LM") or ``"auto"`` (dense up to 2048 pairs).
        tol: Lanczos relative accuracy (default 1e-10 in float64, 1e-5 in float32); seed: its start vector.
        batch_size: examples per batch when computing features from a `DualModel`.

    Returns:
        `KernelChange` (a `Spectrum`): ``values`` signed, ``functions``, ``directions(i, kind)``, ``blocks``,
        ``input_directions(param)``, ``subspace(param, n)``, ``project``; ``meta["completeness"]`` holds the
        residual of both orders. A `CompletenessWarning` says so when the order's residual is above 0.5.

    Example::

        change = ef.kernel_change(dual, x, order="path")          # ΔΘ = Θ_path − Θ_init, centred
        change.values, change.functions[:, 0], change.input_directions("0.weight")
        ef.max_activating(dual, x, change[0], k=16)
    """
    fa, fb = _feature_pair(source, data, order, against, batch_size)
    if component is not None:
        fa = component_features(fa, component)
        fb = None if fb is None else component_features(fb, component)
    one_of("method", method, METHODS)
    if not isinstance(center, bool):
        raise ConfigError(f"center must be True or False, got {center!r}")
    params = [layer] if isinstance(layer, str) else (None if layer is None else list(layer))
    op_a = KernelOperator(fa, params)
    op_b = None if fb is None else KernelOperator(fb, params)
    n = op_a.n_pairs
    positive_int("k", k)
    if k > n:
        raise DataError(
            f"k={k} eigenpairs asked of a kernel over {n} (example, component) pairs; pass k ≤ {n} or more data"
        )
    start = time.perf_counter()
    shape = (fa.n_examples, fa.n_outputs)
    dense = method == "dense" or (method == "auto" and n <= _DENSE_PAIRS) or k == n
    matvecs = 0
    if dense:
        values, vectors = _dense_top(op_a, op_b, k, center, shape)
    else:
        tol = tol if tol is not None else (1e-10 if fa.dtype == torch.float64 else 1e-5)
        values, vectors, matvecs = _lanczos_top(op_a, op_b, k, center, shape, tol, seed)
    vectors = _fix_signs(vectors)
    dt = fa.dtype
    vd = vectors.to(dt)
    order_dirs = torch.stack([op_a.vjp(vd[:, i]) for i in range(k)])
    against_dirs = None if op_b is None else torch.stack([op_b.vjp(vd[:, i]) for i in range(k)])
    change = order_dirs if against_dirs is None else order_dirs - against_dirs
    unit = change / change.norm(dim=1, keepdim=True).clamp_min(1e-300)
    applied = torch.stack(
        [op_a.jvp(order_dirs[i]) - (0 if against_dirs is None else op_b.jvp(against_dirs[i])) for i in range(k)], dim=1
    ).reshape(*shape, k)
    offsets = applied.mean(dim=0) if center else torch.zeros(shape[1], k, dtype=dt, device=fa.device)
    functions = vectors.to(dt).reshape(*shape, k)
    if fa.scalar:
        functions = functions[:, 0]
    residuals = {"order": fa.completeness(), "against": None if fb is None else fb.completeness()}
    meta = {
        "method": "dense" if dense else "lanczos",
        "matvecs": matvecs,
        "seconds": time.perf_counter() - start,
        "center": center,
        "order": fa.order,
        "against": None if fb is None else fb.order,
        "layer": None if params is None else [s.state_name for s in op_a.slots],
        "component": fa.meta.get("component"),
        "scalar": fa.scalar,
        "readout": fa.meta.get("readout"),
        "nodes": fa.meta.get("nodes") if fa.order == "path" else None,
        "completeness": residuals,
    }
    warn_if_incomplete(residuals["order"], fa.order, "These kernel eigenfeatures")
    return KernelChange(
        values.to(dt), functions, unit, fa.ids.slots, op_a.names, 0.0, meta, order_dirs, against_dirs, offsets
    )


def subtracted_features(dual: DualModel, data: Any, order: str, batch_size: int | None) -> EffectiveFeatures:
    """The features at `order` whose kernel a kernel change subtracts. Their own completeness residual is not
    the result's (that of the order is, and `kernel_change` warns about it), so it raises no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompletenessWarning)
        return dual.features(data, batch_size, order=order)


def _feature_pair(
    source: DualModel | EffectiveFeatures, data: Any, order: str | None, against: Any, batch_size: int
) -> tuple[EffectiveFeatures, EffectiveFeatures | None]:
    """The features at the order and those to subtract (None: the kernel itself), checked to pair up."""
    if isinstance(source, DualModel):
        if data is None:
            raise ConfigError("pass the data: kernel_change(dual, data, ...)")
        if isinstance(against, str):
            one_of("against", against, ORDERS)
            if against == (order or source.order):
                raise ConfigError(f"order and against are both {against!r}: their kernel change is zero")
        fa = source.features(data, batch_size, order=order)  # the dual model checks (and resolves) the order
        fb = subtracted_features(source, data, against, batch_size) if isinstance(against, str) else against
    elif isinstance(source, EffectiveFeatures):
        if data is not None:
            raise ConfigError("features already hold their data: call kernel_change(features, against=other_features)")
        if order is not None and order != source.order:
            raise ConfigError(f"the features are at order {source.order!r}, not {order!r}; compute them at {order!r}")
        if isinstance(against, str):
            raise ConfigError(
                f"against={against!r} needs a model to compute those features: pass the DualModel and data, "
                "or against=<EffectiveFeatures at that order>"
            )
        fa, fb = source, against
    else:
        raise ConfigError(
            f"kernel_change takes a DualModel with data or EffectiveFeatures, got {type(source).__name__}"
        )
    if fb is not None:
        if not isinstance(fb, EffectiveFeatures):
            raise ConfigError(f"against must be an order name, EffectiveFeatures or None, got {type(fb).__name__}")
        same = (
            fb.slots == fa.slots
            and fb.n_examples == fa.n_examples
            and fb.n_outputs == fa.n_outputs
            and torch.allclose(fb.z_trained, fa.z_trained)
        )
        if not same:
            raise ConfigError(
                "the features to subtract come from another model, data or readout; compute both with the same "
                "DualModel on the same data"
            )
        if fb is fa or fb.order == fa.order:
            raise ConfigError(f"order and against are both {fa.order!r}: their kernel change is zero")
    return fa, fb


def _center(u: Tensor, shape: tuple[int, int]) -> Tensor:
    """``H u``: each readout component of ``u [N·K]`` minus its mean over the examples."""
    v = u.reshape(shape)
    return (v - v.mean(dim=0, keepdim=True)).reshape(-1)


def _dense_top(
    op_a: KernelOperator, op_b: KernelOperator | None, k: int, center: bool, shape: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Top-k by |λ| of the formed ``(H)(K_a − K_b)(H)`` (``eigh`` in float64)."""
    d = op_a.dense().to(torch.float64)
    if op_b is not None:
        d = d - op_b.dense().to(torch.float64)
    if center:
        n, kk = shape
        d4 = d.reshape(n, kk, n, kk)
        d4 = d4 - d4.mean(dim=0, keepdim=True) - d4.mean(dim=2, keepdim=True) + d4.mean(dim=(0, 2), keepdim=True)
        d = d4.reshape(n * kk, n * kk)
    evals, evecs = torch.linalg.eigh((d + d.T) / 2)
    top = torch.sort(evals.abs(), descending=True, stable=True).indices[:k]
    return evals[top], evecs[:, top]


def _lanczos_top(
    op_a: KernelOperator,
    op_b: KernelOperator | None,
    k: int,
    center: bool,
    shape: tuple[int, int],
    tol: float,
    seed: int,
) -> tuple[Tensor, Tensor, int]:
    """Top-k by |λ| (ARPACK, which="LM") of ``u ↦ (H)(J_a J_aᵀ − J_b J_bᵀ)(H) u``; returns the matvec count."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    dt = op_a.features.dtype
    n = op_a.n_pairs
    count = 0

    def mv(x: np.ndarray) -> np.ndarray:
        nonlocal count
        count += 1
        u = torch.from_numpy(np.ascontiguousarray(x.reshape(-1))).to(dt)
        if center:
            u = _center(u, shape)
        r = op_a.matvec(u) - (0 if op_b is None else op_b.matvec(u))
        if center:
            r = _center(r, shape)
        return r.to(torch.float64).numpy()

    v0 = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    lin = LinearOperator((n, n), matvec=mv, dtype=np.float64)
    evals, evecs = eigsh(lin, k=k, which="LM", v0=v0, tol=tol, ncv=min(n, max(2 * k + 1, 20)))
    top = np.argsort(-np.abs(evals), kind="stable")
    return torch.from_numpy(evals[top].copy()), torch.from_numpy(evecs[:, top].copy()), count


# ---- the weight change ------------------------------------------------------------------------------------
@dataclass
class WeightChange:
    """The singular value decomposition of one parameter tensor's change ``ΔW = W* − W0``.

    Attributes:
        name: the tensor's state_dict name; shape: its shape (trailing axes are flattened: ``[d0, d1]``; a
            vector is one row ``[1, d]``).
        share: ``‖ΔW‖² / ‖Δθ‖²``, the tensor's share of the whole parameter change.
        singular_values: ``[r]`` the top singular values σ_i; shares: ``[r]`` ``σ_i² / ‖Δθ‖²``.
        left: ``[d0, r]`` left singular vectors (which output units change together).
        right: ``[r, d1]`` right singular vectors: the input directions the layer's change reads.
    """

    name: str
    shape: tuple[int, ...]
    share: float
    singular_values: Tensor
    shares: Tensor
    left: Tensor
    right: Tensor


def weight_change(source: DualModel | EffectiveFeatures, k: int = 10) -> dict[str, WeightChange]:
    """Per parameter tensor, the top-`k` singular directions of ``ΔW = W* − W0`` and their share of ``‖Δθ‖²``.

    Returns ``{state_dict name: WeightChange}``, the tensors that changed most first. Right singular vectors
    are the input directions a layer's change reads (``weight_change(dual)["0.weight"].right``); each has its
    largest entry positive.
    """
    if not isinstance(source, DualModel | EffectiveFeatures):
        raise ConfigError(f"weight_change takes a DualModel or EffectiveFeatures, got {type(source).__name__}")
    positive_int("k", k)
    delta = source.delta
    total = sum(float(d.double().square().sum()) for d in delta.values())
    if total == 0:
        raise DataError("the model has not changed (Δθ = 0): train it, or pass the state_dict saved before training")
    out = {}
    for slot in source.ids.slots:
        d = delta[slot.name].detach().double()
        matrix = d.reshape(d.shape[0], -1) if d.ndim > 1 else d.reshape(1, -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        r = min(k, s.shape[0])
        signs = torch.sign(vh[:r].gather(1, vh[:r].abs().argmax(dim=1, keepdim=True)))[:, 0]
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        out[slot.state_name] = WeightChange(
            slot.state_name,
            tuple(slot.shape),
            float(s.square().sum()) / total,
            s[:r],
            s[:r].square() / total,
            u[:, :r] * signs,
            vh[:r] * signs[:, None],
        )
    return dict(sorted(out.items(), key=lambda item: -item[1].share))
