"""Theory that can be checked: what a network *should* become when trained, predicted from its initialisation.

For the loss ``½ Σ_{α∈A} (z_α − y_α)²`` and full-batch gradient descent with learning rate η (math.md §1, §3):

- `kernel_gd`: leading order (LO) — the network trains like a linear model on its initial features, so
  ``z_T(x) = z0(x) − H(x, A) H_AA⁻¹ [I − (I − η H_AA)^T] r0`` with ``r0 = z0(A) − y``, in closed form by the
  eigendecomposition of ``H_AA``; ``steps=None`` is the T → ∞ limit (kernel regression); ``ridge`` adds weight
  decay towards θ0 (kernel ridge regression in the limit).
- `nlo_predict`: the next-to-leading-order correction from the differential of the NTK (the dNTK, or
  meta-kernel, ``dH(x0; x1, x2) = Σ_μν ψ_μν(x0) φ_μ(x1) φ_ν(x2)``, see `dntk`), as a finite-T sum and its
  T → ∞ closed form. It is exact to first order in ψ; the full order-1/width correction of a deep network
  also needs the ddNTK terms, which Taylorized training with ``order=3`` contains.
- `taylorized_train`: train the order-k Taylor polynomial of a network around θ0 (Bai et al. 2020) with any
  loss, optimizer and data: Taylor-mode propagation through ``nn.Sequential`` MLPs, nested forward-mode
  derivatives (jvp's) for any other model; no Hessian is formed.
- `kernel_predict`: the LO (or NLO) prediction straight from a model, its θ0 and the training data.
- `ntk_mlp` and `relu_ntk`: an MLP in NTK parameterisation, and the infinite-width NTK of its
  one-hidden-layer ReLU version.

Index conventions. Scalar outputs: kernels ``[N, N]`` / ``[M, N]``, targets ``[N]``. Vector outputs (K
components): kernels ``[N, K, N, K]`` / ``[M, K, N, K]`` with targets ``[N, K]``, or equivalently the flattened
kernels ``[N*K, N*K]`` / ``[M*K, N*K]`` whose pair index is ``n*K + k`` (row-major). Learning rates are for the
*summed* loss; for the mean over the |A| training examples pass ``lr / |A|``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from itertools import cycle
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp, vmap
from tqdm.auto import tqdm

from ._data import as_batches, batch_to
from ._memory import check_fits
from ._swap import ParameterSwap
from .dual import DualModel, init_parameters
from .errors import ConfigError, DataError, NonFiniteError
from .features import EffectiveFeatures
from .readout import ReadoutSpec

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class Prediction(NamedTuple):
    """A predicted trained network: outputs on the training points ``train [N(, K)]`` and on ``test [M(, K)]``."""

    train: Tensor
    test: Tensor


# ---- the kernel problem ----------------------------------------------------------------------------------
class _Problem(NamedTuple):
    """A kernel problem on flat pair indices: ``h [A, A]``, ``h_test [B, A]``, ``y, z0 [A]``, ``z0_test [B]``."""

    h: Tensor
    h_test: Tensor
    y: Tensor
    z0: Tensor
    z0_test: Tensor
    n_outputs: int | None  # K, or None for scalar targets

    def prediction(self, train: Tensor, test: Tensor) -> Prediction:
        if self.n_outputs is None:
            return Prediction(train, test)
        return Prediction(train.reshape(-1, self.n_outputs), test.reshape(-1, self.n_outputs))


def _problem(k_train: Tensor, k_test_train: Tensor, y: Tensor, z0_train: Tensor, z0_test: Tensor) -> _Problem:
    """Check shapes and values, and flatten to pair indices (conventions in the module docstring)."""
    named = {"K_train": k_train, "K_test_train": k_test_train, "y": y, "z0_train": z0_train, "z0_test": z0_test}
    for name, t in named.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise DataError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name} holds NaN or inf; recompute it (float64 helps for large kernels)")
    if y.ndim not in (1, 2):
        raise DataError(f"y must be [N] or [N, K], got shape {tuple(y.shape)}")
    n = y.shape[0]
    k = None if y.ndim == 1 else y.shape[1]
    kk = k or 1
    if k_train.ndim == 4:
        if tuple(k_train.shape) != (n, kk, n, kk) or k is None:
            raise DataError(
                f"K_train of shape {tuple(k_train.shape)} needs targets y [N, K] with the same N and K; "
                f"got y of shape {tuple(y.shape)}"
            )
        k_train = k_train.reshape(n * kk, n * kk)
    if k_test_train.ndim == 4:
        if tuple(k_test_train.shape[1:]) != (kk, n, kk) or k is None:
            raise DataError(f"K_test_train must be [M, {kk}, {n}, {kk}], got {tuple(k_test_train.shape)}")
        k_test_train = k_test_train.reshape(-1, n * kk)
    if tuple(k_train.shape) != (n * kk, n * kk):
        raise DataError(
            f"K_train must be [N, N] (scalar outputs), [N, K, N, K] or [N*K, N*K]; got {tuple(k_train.shape)} "
            f"for targets of shape {tuple(y.shape)}"
        )
    if k_test_train.ndim != 2 or k_test_train.shape[1] != n * kk or k_test_train.shape[0] % kk:
        raise DataError(f"K_test_train must be [M, {n * kk}] (flat pairs), got {tuple(k_test_train.shape)}")
    if tuple(z0_train.shape) != tuple(y.shape):
        raise DataError(f"z0_train must have the shape of y {tuple(y.shape)}, got {tuple(z0_train.shape)}")
    m = k_test_train.shape[0] // kk
    want = (m,) if k is None else (m, k)
    if tuple(z0_test.shape) != want:
        raise DataError(f"z0_test must be {list(want)} to match K_test_train, got {tuple(z0_test.shape)}")
    dtype = torch.promote_types(k_train.dtype, y.dtype)
    flat = [t.to(dtype).reshape(-1) for t in (y, z0_train, z0_test)]
    return _Problem(k_train.to(dtype), k_test_train.to(dtype), *flat, k)


def _check_lr_steps(lr: float, steps: int | None) -> None:
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0 or not math.isfinite(lr):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
        raise ConfigError(f"steps must be a non-negative integer, or None for the converged limit; got {steps!r}")


def _spectrum(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``κ [A]``, ``E [A, A]`` of the symmetric kernel ``h = E diag(κ) Eᵀ``, and the mask of its null modes."""
    h = 0.5 * (h + h.T)
    kappa, e = torch.linalg.eigh(h)
    tol = h.shape[0] * torch.finfo(h.dtype).eps * 100 * float(kappa.abs().max().clamp_min(1e-300))
    if float(kappa.min()) < -tol:
        raise DataError(
            f"K_train is not positive semi-definite (smallest eigenvalue {float(kappa.min()):.3g}); "
            "pass a Gram matrix of features, e.g. from DualModel.kernel"
        )
    return kappa, e, kappa <= tol


def _converges(lr: float, s: Tensor, live: Tensor) -> None:
    worst = float((lr * s[live]).max()) if bool(live.any()) else 0.0
    if worst >= 2:
        raise ConfigError(
            f"gradient descent diverges: lr × largest kernel eigenvalue = {worst:.3g} ≥ 2, so there is no "
            f"converged limit; use lr < {2 / float(s[live].max()):.3g} or give a finite number of steps"
        )


def kernel_gd(
    K_train: Tensor,
    K_test_train: Tensor,
    y: Tensor,
    z0_train: Tensor,
    z0_test: Tensor,
    lr: float,
    steps: int | None = None,
    ridge: float = 0.0,
) -> Prediction:
    """Leading-order prediction: a linear model on fixed features after `steps` full-batch GD steps.

    Loss ``½ Σ_α (z_α − y_α)² + ½ ridge ‖θ − θ0‖²`` (``ridge`` = weight decay towards θ0), learning rate `lr`,
    from the outputs `z0`. With ``H = E diag(κ) Eᵀ`` and ``s = κ + ridge`` the sample-space weights are
    ``c_T = E diag((1 − (1 − lr s)^T) / s) Eᵀ (y − z0_train)`` and the prediction is ``z0 + H c_T``; ``steps=None``
    gives ``(1/s)``, i.e. kernel (ridge) regression ``z0 + H_xA (H_AA + ridge I)⁻¹ (y − z0_A)``. Null modes of
    ``H_AA`` (with ``ridge=0``) cannot be trained and are dropped, i.e. the pseudo-inverse.

    Args:
        K_train: ``[N, N]``, ``[N, K, N, K]`` or ``[N*K, N*K]``: the kernel among training points.
        K_test_train: ``[M, N]``, ``[M, K, N, K]`` or ``[M*K, N*K]``: between other points and the training points.
        y: ``[N]`` or ``[N, K]`` targets; z0_train: ``[N(, K)]``, z0_test: ``[M(, K)]`` outputs at θ0.
        lr: learning rate of the summed loss; steps: number of GD steps, None for the converged limit.
        ridge: weight decay towards θ0 (≥ 0).

    Returns:
        `Prediction` ``(train [N(, K)], test [M(, K)])``.
    """
    _check_lr_steps(lr, steps)
    if not isinstance(ridge, int | float) or isinstance(ridge, bool) or not ridge >= 0 or not math.isfinite(ridge):
        raise ConfigError(f"ridge must be a non-negative number, got {ridge!r}")
    p = _problem(K_train, K_test_train, y, z0_train, z0_test)
    kappa, e, null = _spectrum(p.h)
    s = kappa.clamp_min(0) + ridge
    live = s > 0 if ridge > 0 else ~null
    if steps is None:
        _converges(lr, s, live)
        gain = torch.where(live, 1 / torch.where(live, s, 1), 0)
    else:
        gain = torch.where(live, (1 - (1 - lr * s) ** steps) / torch.where(live, s, 1), 0)
        if not bool(torch.isfinite(gain).all()):
            raise NonFiniteError(
                f"gradient descent diverges to inf within {steps} steps (lr × largest eigenvalue = "
                f"{lr * float(s.max()):.3g} > 2); lower the learning rate"
            )
    c = e @ (gain * (e.T @ (p.y - p.z0)))
    return p.prediction(p.z0 + p.h @ c, p.z0_test + p.h_test @ c)


def nlo_predict(
    K_train: Tensor,
    K_test_train: Tensor,
    dH: Tensor,
    y: Tensor,
    z0_train: Tensor,
    z0_test: Tensor,
    lr: float,
    steps: int | None = None,
) -> Prediction:
    """The LO prediction plus the dNTK correction (math.md §3), after `steps` GD steps or converged.

    With ``M = I − lr H`` (``H = H_AA``), ``r⁰(t) = M^t r0``, ``c(t) = H⁻¹(I − M^t) r0``, the correction per GD step
    is ``S_δ(t) = lr Σ_α G_δα(t) r⁰_α(t) + (lr²/2) Σ_αα' dH_δαα' r⁰_α(t) r⁰_α'(t)`` with
    ``G_δα = Σ_α' (dH_αδα' + dH_δαα') c_α'(t)``, and
    ``z^NLO_δ(T) = z^LO_δ(T) + Σ_{t<T} S_δ(t) − H_δA H⁻¹ Σ_{t<T} (I − M^{T−1−t}) S_A(t)``. For ``steps=None`` the
    closed form of the eigenbasis is used (training points stay fitted exactly). The correction is first order
    in the meta-features ψ; the ddNTK terms of the same order in 1/width are not included.

    Args:
        K_train, K_test_train, y, z0_train, z0_test, lr, steps: as in `kernel_gd`.
        dH: the dNTK ``dH(x0; x1, x2)`` with x0, x1 running over the training points *followed by* the other
            points and x2 over the training points: ``[N+M, N+M, N]``, ``[N+M, K, N+M, K, N, K]`` or flat
            ``[(N+M)K, (N+M)K, NK]`` — what ``dntk(model, init, cat([x_train, x_test]), x_train)`` returns.

    Returns:
        `Prediction` ``(train, test)``.
    """
    _check_lr_steps(lr, steps)
    p = _problem(K_train, K_test_train, y, z0_train, z0_test)
    a, b = p.h.shape[0], p.h.shape[0] + p.h_test.shape[0]
    if not isinstance(dH, Tensor) or dH.numel() != b * b * a:
        got = tuple(dH.shape) if isinstance(dH, Tensor) else type(dH).__name__
        raise DataError(
            f"dH must hold dH(x0; x1, x2) for x0, x1 over the {b} (train, then test) output pairs and x2 over "
            f"the {a} training pairs, i.e. [{b}, {b}, {a}] once flattened; got {got}"
        )
    if not bool(torch.isfinite(dH).all()):
        raise NonFiniteError("dH holds NaN or inf; recompute it in float64")
    d = dH.to(p.h.dtype).reshape(b, b, a)
    kappa, e, null = _spectrum(p.h)
    if bool(null.any()):
        raise DataError(
            "K_train is singular (repeated training points?); the NLO correction needs a positive-definite "
            "training kernel: drop duplicate points"
        )
    h_all = torch.cat([p.h, p.h_test])  # [B, A]: H_δA for δ over train then test
    z0_all = torch.cat([p.z0, p.z0_test])
    q = 1 - lr * kappa
    r_hat = e.T @ (p.z0 - p.y)
    d_train_first = d[:a]  # dH_αδα' [A, B, A]
    d_pairs = d[:, :a]  # dH_δαα' [B, A, A]
    if steps is None:
        _converges(lr, kappa, ~null)
        c_inf = e @ (r_hat / kappa)
        ka, kb = kappa[:, None], kappa[None, :]
        drift = (1 - lr * kb) / (kb * (ka + kb - lr * ka * kb))  # F_ab
        m_mat = e @ (r_hat[:, None] * r_hat[None, :] * drift) @ e.T  # 𝓜_{α'α}
        # D_δ = Σ_{t≥0} S_δ(t): the drift of the training features (𝓜) plus ½ c∞ᵀ dH_δ c∞
        s_sum = torch.einsum("adb,ba->d", d_train_first, m_mat) + 0.5 * torch.einsum(
            "dab,a,b->d", d_pairs, c_inf, c_inf
        )
        s_proj = e.T @ s_sum[:a]
        z_lo = z0_all - h_all @ c_inf
    else:
        s_sum = torch.zeros(b, dtype=p.h.dtype, device=p.h.device)
        s_proj = torch.zeros(a, dtype=p.h.dtype, device=p.h.device)
        for t in range(steps):
            r_t = e @ (q**t * r_hat)
            c_t = e @ ((1 - q**t) / kappa * r_hat)
            g = torch.einsum("adb,b->da", d_train_first, c_t) + torch.einsum("dab,b->da", d_pairs, c_t)
            s = lr * (g @ r_t) + 0.5 * lr**2 * torch.einsum("dab,a,b->d", d_pairs, r_t, r_t)
            s_sum += s
            s_proj += (1 - q ** (steps - 1 - t)) * (e.T @ s[:a])
        z_lo = z0_all - h_all @ (e @ ((1 - q**steps) / kappa * r_hat))
    z = z_lo + s_sum - h_all @ (e @ (s_proj / kappa))
    return p.prediction(z[:a], z[a:])


# ---- kernels of a model -----------------------------------------------------------------------------------
# Largest number of tangent entries (directions × parameters) one vmapped dNTK call may hold.
_DNTK_CHUNK_ELEMENTS = 1 << 25


def _tangents(feats: EffectiveFeatures, rows: slice) -> dict[str, Tensor]:
    """``{name: [n*K, *shape]}``: the feature vectors φ of examples `rows` (every readout component) as tangents."""
    return {s.name: feats.factors[s.name].rows(rows).dense().reshape(-1, *s.shape) for s in feats.slots}


def _dntk(dual: DualModel, x: Tensor, x2: Tensor | None, progress: bool) -> Tensor:
    """``[M, K, M, K, N, K]``: dH(x0; x1, x2) for x0, x1 ∈ x and x2 ∈ x2 (x when None), at θ0 of `dual`.

    Per direction φ(x2), one nested jvp ``∂_{φ(x1)} ∂_{φ(x2)} z(x0)`` over the batch x0, vmapped over the φ(x1).
    """
    x = batch_to(x, dual.device, dual.dtype)
    feats = dual.features(x, order="init")
    feats2 = feats if x2 is None else dual.features(batch_to(x2, dual.device, dual.dtype), order="init")
    m, kk, n = feats.n_examples, feats.n_outputs, feats2.n_examples
    check_fits(
        m * kk * feats.n_features,
        dual.dtype,
        what=f"the {m * kk} feature vectors the dNTK is built from",
        alternative="compute the dNTK on fewer points (it is meant for small datasets)",
    )
    first = _tangents(feats, slice(None))
    chunk = max(1, _DNTK_CHUNK_ELEMENTS // feats.n_features)
    theta = dual.theta_init

    def z(p: dict[str, Tensor]) -> Tensor:
        return dual.readout(dual.call(p, x), x)  # [M, K]

    out = torch.zeros(m, kk, m, kk, n, kk, dtype=dual.dtype, device=dual.device)
    with torch.no_grad():
        for j in tqdm(range(n), desc="dNTK", disable=None if progress else True, leave=False):
            second = _tangents(feats2, slice(j, j + 1))
            for k in range(kk):
                v2 = {name: t[k] for name, t in second.items()}

                def along_v2(p: dict[str, Tensor], v2: dict[str, Tensor] = v2) -> Tensor:
                    return jvp(z, (p,), (v2,))[1]

                def along_v1_v2(v1: dict[str, Tensor]) -> Tensor:
                    return jvp(along_v2, (theta,), (v1,))[1]  # ψ(x0)[v1, φ(x2)]  [M, K]

                values = vmap(along_v1_v2, chunk_size=chunk)(first)  # [M*K (x1), M, K (x0)]
                out[:, :, :, :, j, k] = values.reshape(m, kk, m, kk).permute(2, 3, 0, 1)
    return out


def _squeezed(t: Tensor, scalar: bool, axes: int) -> Tensor:
    """Drop the K axes (every second axis) of a ``[n1, K, n2, K, ...]`` tensor for a scalar readout."""
    return t[(slice(None), 0) * axes] if scalar else t


def dntk(
    model: nn.Module,
    init: Mapping[str, Tensor],
    x: Tensor,
    x2: Tensor | None = None,
    readout: ReadoutSpec = "output",
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Tensor:
    """The dNTK (meta-kernel) at θ0: ``dH(x0; x1, x2) = Σ_μν ψ_μν(x0) φ_μ(x1) φ_ν(x2)``.

    Each entry is the second directional derivative of ``z(x0)`` along the feature vectors φ(x1) and φ(x2)
    (one nested jvp over all x0 at once); the Hessian ψ is never formed. Cost: ``|x|·K × |x2|·K`` nested jvps
    over the batch `x` (half that when x2 is x), so it is meant for small datasets.

    Args:
        model, init, readout, dtype: as for `DualModel` (the model's current parameters are not used).
        x: ``[M, ...]`` inputs for x0 and x1; x2: ``[N, ...]`` inputs for x2 (default: x).

    Returns:
        ``[M, M, N]`` for a scalar readout, ``[M, K, M, K, N, K]`` for a K-vector readout.
    """
    dual = DualModel(model, init=init, readout=readout, order="init", dtype=dtype, progress=progress)
    out = _dntk(dual, x, x2, progress)
    return _squeezed(out, bool(dual.readout.scalar), 3)


def kernel_predict(
    model: nn.Module,
    init: Mapping[str, Tensor],
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    lr: float,
    steps: int | None = None,
    nlo: bool = False,
    ridge: float = 0.0,
    readout: ReadoutSpec = "output",
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Prediction:
    """Predict the network trained by full-batch GD on ``½ Σ (z − y_train)²`` from its initial kernels.

    LO (`kernel_gd` on the NTK at θ0, from the factored features) or, with ``nlo=True``, LO plus the dNTK
    correction (`nlo_predict`; it has no ridge form).

    Args:
        model, init, readout, dtype: as for `DualModel`; the prediction starts from θ0 = init.
        x_train: ``[N, ...]``; y_train: ``[N]`` (scalar readout) or ``[N, K]``; x_test: ``[M, ...]``.
        lr, steps, ridge: as in `kernel_gd`.

    Returns:
        `Prediction` ``(train [N(, K)], test [M(, K)])``.
    """
    if nlo and ridge:
        raise ConfigError("the NLO correction is derived for plain gradient descent; use ridge=0 with nlo=True")
    dual = DualModel(model, init=init, readout=readout, order="init", dtype=dtype, progress=progress)
    x_all = torch.cat([x_train, x_test])
    feats = dual.features(x_all)
    n, scalar = x_train.shape[0], feats.scalar
    kernel, z0 = feats.kernel(), feats.z_init  # [B, B] or [B, K, B, K]; [B, K]
    if scalar:
        k_train, k_test, z0 = kernel[:n, :n], kernel[n:, :n], z0[:, 0]
    else:
        k_train, k_test = kernel[:n, :, :n], kernel[n:, :, :n]
    y = torch.as_tensor(y_train, dtype=dual.dtype, device=dual.device)
    if scalar and y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif not scalar and y.ndim == 1 and feats.n_outputs == 1:
        y = y[:, None]
    if not nlo:
        return kernel_gd(k_train, k_test, y, z0[:n], z0[n:], lr, steps, ridge)
    d = _squeezed(_dntk(dual, x_all, x_train, progress), scalar, 3)
    return nlo_predict(k_train, k_test, d, y, z0[:n], z0[n:], lr, steps)


# ---- NTK-parameterised MLPs and their infinite-width kernel ------------------------------------------------
class FanInScale(nn.Module):
    """``x ↦ x / √fan_in``: the NTK parameterisation's layer scaling, placed in front of an ``nn.Linear``."""

    def __init__(self, fan_in: int) -> None:
        super().__init__()
        self.fan_in = fan_in

    def forward(self, x: Tensor) -> Tensor:
        return x * self.fan_in**-0.5

    def extra_repr(self) -> str:
        return f"fan_in={self.fan_in}"


def ntk_mlp(
    d_in: int,
    width: int,
    depth: int = 1,
    d_out: int = 1,
    activation: str = "tanh",
    bias: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """An MLP in NTK parameterisation: ``z^{l+1} = W^{l+1} σ(z^l) / √n_l + b^{l+1}``, every W and b ~ N(0, 1).

    Built from `FanInScale` + ``nn.Linear`` so efffeat's factored rules cover every parameter. `depth` hidden
    layers of `width` units; activation ``"tanh" | "relu" | "gelu"``.
    """
    if activation not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; choose one of {', '.join(_ACTIVATIONS)}")
    for name, v in (("d_in", d_in), ("width", width), ("depth", depth), ("d_out", d_out)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = d_in
    for _ in range(depth):
        layers += [FanInScale(fan_in), nn.Linear(fan_in, width, bias=bias), _ACTIVATIONS[activation]()]
        fan_in = width
    layers += [FanInScale(fan_in), nn.Linear(fan_in, d_out, bias=bias)]
    model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
    return model


def relu_ntk(x: Tensor, x2: Tensor | None = None) -> Tensor:
    """``[N, M]``: the infinite-width NTK of ``ntk_mlp(d, n, depth=1, activation="relu", bias=False)``.

    ``H(x, x') = ‖x‖‖x'‖ (sin θ + (π − θ) cos θ) / (2π d) + (x·x' / d)(π − θ) / (2π)``, θ the angle between x and
    x' (output-layer plus hidden-layer terms; Cho & Saul's arc-cosine kernels). x: ``[N, d]``, x2: ``[M, d]``.
    """
    x2 = x if x2 is None else x2
    if x.ndim != 2 or x2.ndim != 2 or x.shape[1] != x2.shape[1]:
        raise DataError(f"x and x2 must be [N, d] and [M, d] with the same d, got {tuple(x.shape)}, {tuple(x2.shape)}")
    d = x.shape[1]
    dot = x @ x2.T
    norms = x.norm(dim=1)[:, None] * x2.norm(dim=1)[None, :]
    cos = torch.where(norms > 0, dot / torch.where(norms > 0, norms, 1), 0).clamp(-1, 1)
    theta = torch.arccos(cos)
    output_layer = norms * (torch.sin(theta) + (math.pi - theta) * cos) / (2 * math.pi * d)
    hidden_layer = dot / d * (math.pi - theta) / (2 * math.pi)
    return output_layer + hidden_layer


# ---- Taylorized training -------------------------------------------------------------------------------
# Layers `_taylor_coefficients` propagates Taylor series through (nn.Identity passes them on unchanged).
_TAYLOR_MODE_LAYERS = (nn.Linear, FanInScale, nn.Tanh, nn.ReLU, nn.Identity)


def _directional_derivatives(
    f: Callable[[dict[str, Tensor]], Tensor], at: dict[str, Tensor], direction: dict[str, Tensor], order: int
) -> tuple[Tensor, ...]:
    """``(f(θ), D f(θ)[v], …, D^order f(θ)[v, …, v])`` by `order` nested jvp's (cost ~2^order forward passes)."""

    def derivatives(k: int) -> Callable[[dict[str, Tensor]], tuple[Tensor, ...]]:
        if k == 0:
            return lambda p: (f(p),)
        inner = derivatives(k - 1)

        def g(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            primal, tangent = jvp(inner, (p,), (direction,))
            return (*primal, tangent[-1])

        return g

    return derivatives(order)(at)


def _taylor_mode_supported(model: nn.Module) -> bool:
    """True for an ``nn.Sequential`` of layers with a Taylor-mode rule (`_taylor_coefficients`)."""
    return isinstance(model, nn.Sequential) and all(isinstance(m, _TAYLOR_MODE_LAYERS) for m in model)


def _taylor_coefficients(
    model: nn.Sequential, x: Tensor, theta0: dict[str, Tensor], delta: dict[str, Tensor], order: int
) -> list[Tensor]:
    """``[g_0, …, g_order]`` with ``f(x; θ0 + tΔ) = Σ_j g_j t^j + O(t^{order+1})``, by Taylor-mode propagation.

    The same coefficients as `_directional_derivatives` (``g_j = D^j f[Δ^j] / j!``) at the cost of about
    ``order + 1`` forward passes instead of ``2^order``: every layer maps the Taylor coefficients of its input
    to those of its output (a Linear layer's weights are exactly linear in t; tanh follows ``y' = (1 − y²) x'``).
    """
    xs = [x] + [torch.zeros_like(x)] * order
    for name, layer in model.named_children():
        if isinstance(layer, nn.Linear):
            w0, dw = theta0[f"{name}.weight"], delta[f"{name}.weight"]
            ys = [F.linear(xs[0], w0)] + [F.linear(xs[j], w0) + F.linear(xs[j - 1], dw) for j in range(1, order + 1)]
            if layer.bias is not None:
                ys[0] = ys[0] + theta0[f"{name}.bias"]
                if order >= 1:
                    ys[1] = ys[1] + delta[f"{name}.bias"]
            xs = ys
        elif isinstance(layer, FanInScale):
            xs = [layer(xj) for xj in xs]
        elif isinstance(layer, nn.ReLU):
            mask = (xs[0] > 0).to(xs[0].dtype)
            xs = [xj * mask for xj in xs]
        elif isinstance(layer, nn.Tanh):
            ys = [torch.tanh(xs[0])]
            ss = [1 - ys[0] ** 2]  # Taylor coefficients of tanh'(x(t)) = 1 − y(t)²
            for j in range(1, order + 1):
                ys.append(sum(i * xs[i] * ss[j - i] for i in range(1, j + 1)) / j)
                ss.append(-sum(ys[i] * ys[j - i] for i in range(j + 1)))
            xs = ys
    return xs


def _buffer_name(param: str) -> str:
    return "theta_init__" + param.replace(".", "__")


class TaylorizedModel(nn.Module):
    """The order-k Taylor polynomial of a network in its parameters around θ0.

    ``forward(x) = Σ_{j≤k} D^j f(x; θ0)[θ − θ0, …] / j!`` where θ are this module's trainable parameters (those of
    ``self.network``, a copy of the model, starting at θ0) and θ0 is kept in buffers. ``order=1`` is the
    linearised (NTK) model, 2 the quadratic model (dNTK), 3 adds the ddNTK terms. Train it like any module;
    `taylorized_train` does so with the same loss, optimizer and data as the real network.

    Attributes (after `taylorized_train`): ``losses_ [steps]``, the training loss at each step.
    """

    def __init__(
        self, model: nn.Module, init: Mapping[str, Tensor], order: int, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if not isinstance(order, int) or isinstance(order, bool) or order < 1:
            raise ConfigError(f"order must be a positive integer (1, 2 or 3 are the useful ones), got {order!r}")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        network = copy.deepcopy(model)
        if dtype is not None:
            network = network.to(dtype)
        theta0 = init_parameters(network, init)
        with torch.no_grad():
            for n, p in network.named_parameters():
                p.copy_(theta0[n])
        self.network = network
        self._swap = ParameterSwap(network)
        self.order = order
        self._taylor_mode = _taylor_mode_supported(network)
        self._names = list(theta0)
        for n in self._names:
            self.register_buffer(_buffer_name(n), theta0[n].clone())
        self.losses_: Tensor | None = None

    @property
    def theta_init(self) -> dict[str, Tensor]:
        """θ0 by named_parameters name of `network`."""
        return {n: self.get_buffer(_buffer_name(n)) for n in self._names}

    @property
    def dtype(self) -> torch.dtype:
        return self.get_buffer(_buffer_name(self._names[0])).dtype

    @property
    def device(self) -> torch.device:
        return self.get_buffer(_buffer_name(self._names[0])).device

    def forward(self, x: Any) -> Tensor:
        """The Taylor polynomial's output for inputs `x` (same shape as the network's output)."""
        theta0 = self.theta_init
        delta = {n: p - theta0[n] for n, p in self.network.named_parameters()}
        if self._taylor_mode:
            return sum(_taylor_coefficients(self.network, x, theta0, delta, self.order))
        terms = _directional_derivatives(lambda p: self._swap.call(p, x), theta0, delta, self.order)
        return sum(t / math.factorial(j) for j, t in enumerate(terms))

    def predict(self, x: Tensor) -> Tensor:
        """``[N, ...]``: the trained Taylor model's output on any inputs (no gradient)."""
        with torch.no_grad():
            return self(batch_to(x, self.device, self.dtype)).detach()

    def extra_repr(self) -> str:
        return f"order={self.order}"


def _training_batches(data: Any) -> Iterator[Any]:
    """Full batch for a tensor tuple ``(inputs, targets)``; otherwise the iterable's batches, cycled."""
    if isinstance(data, tuple):
        as_batches(data, batch_size=1)  # validates
        return cycle([data])
    return cycle(as_batches(data, batch_size=1))


def taylorized_train(
    model: nn.Module,
    init: Mapping[str, Tensor],
    order: int,
    data: Any,
    loss: Callable[[Tensor, Tensor], Tensor],
    optimizer: Callable[[Any], torch.optim.Optimizer],
    steps: int,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> TaylorizedModel:
    """Train the order-k Taylor expansion of `model` around θ0 (Bai et al. 2020, "Taylorized training").

    Args:
        model: the architecture (its current parameters are not used; it is copied, never modified).
        init: θ0, the model's ``state_dict()`` at initialisation.
        order: 1 (linearised/NTK), 2 (quadratic/dNTK) or 3 (adds the ddNTK terms). A step costs about
            ``order + 1`` forward passes for an ``nn.Sequential`` of Linear/tanh/ReLU layers, ``2^order`` otherwise.
        data: ``(inputs, targets)`` for full-batch training (every step sees the whole tuple), or an iterable of
            ``(inputs, targets)`` batches, cycled one step per batch.
        loss: ``loss(output, targets) -> scalar``, e.g. ``lambda z, y: 0.5 * (z - y).square().sum()``.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``, e.g. ``lambda p: torch.optim.SGD(p, lr=0.1)``.
        steps: optimizer steps.
        dtype: train in this dtype (e.g. ``torch.float64``); inputs and targets are cast to it.

    Returns:
        the trained `TaylorizedModel`; ``.predict(x)`` evaluates it on any inputs, ``.losses_`` the loss curve.
    """
    if not callable(loss) or not callable(optimizer):
        raise ConfigError(
            "loss must be callable(output, targets) and optimizer a factory callable(params), e.g. "
            "optimizer=lambda p: torch.optim.SGD(p, lr=0.1)"
        )
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"steps must be a non-negative integer, got {steps!r}")
    taylor = TaylorizedModel(model, init, order, dtype)
    opt = optimizer(taylor.network.parameters())
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(opt).__name__}")
    batches = _training_batches(data)
    losses = []
    for step in tqdm(range(steps), desc=f"Taylorized training (order {order})", disable=None if progress else True):
        batch = batch_to(next(batches), taylor.device, taylor.dtype)
        if not isinstance(batch, tuple | list) or len(batch) < 2:
            raise DataError("each training batch must be (inputs, targets)")
        value = loss(taylor(batch[0]), batch[1])
        if not bool(torch.isfinite(value.detach())):
            raise NonFiniteError(
                f"the Taylorized model's loss is {float(value.detach())} at step {step}; lower the learning rate"
            )
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    taylor.losses_ = torch.tensor(losses, dtype=torch.float64)
    return taylor
