"""Kernels of a model at θ0: the dNTK (meta-kernel) `dntk`, and `kernel_predict`, which predicts the trained network
from a model, its θ0 and the data by building its kernels and handing them to ``predict.py``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap
from tqdm.auto import tqdm

from .._data import batch_to
from .._memory import check_fits
from ..dual import DualModel
from ..errors import ConfigError
from ..features import EffectiveFeatures
from ..readout import ReadoutSpec
from .predict import Prediction, kernel_gd, nlo_predict

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
