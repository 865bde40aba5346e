"""Predictions from kernels alone: pure functions, tensors in and tensors out, no model.

`kernel_gd` (leading order) and `nlo_predict` (plus the dNTK correction) predict full-batch gradient descent on
``½ Σ_{α∈A} (z_α − y_α)²`` from the kernels at θ0; the index conventions are in the `efffeat.theory` docstring.
Kernels of an actual model come from ``dntk.py`` (`kernel_predict` builds them and calls these functions).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._check import integer, real
from ..errors import ConfigError, DataError, NonFiniteError


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
    """Check shapes and values, and flatten to pair indices (conventions in the `efffeat.theory` docstring)."""
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


def _lr_steps(lr: float, steps: int | None) -> tuple[float, int | None]:
    """`lr` (> 0) and `steps` (≥ 0, or None for the converged limit), checked."""
    lr = real("lr", lr, minimum=0, strict=True)
    return lr, None if steps is None else integer("steps (or None for the converged limit)", steps, minimum=0)


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
    lr, steps = _lr_steps(lr, steps)
    ridge = real("ridge", ridge, minimum=0)
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
    """The LO prediction plus the dNTK correction (docs/MATH.md), after `steps` GD steps or converged.

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
    lr, steps = _lr_steps(lr, steps)
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
