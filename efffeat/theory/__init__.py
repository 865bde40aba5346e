"""Theory that can be checked: what a network *should* become when trained, predicted from its initialisation.

For the loss ``½ Σ_{α∈A} (z_α − y_α)²`` and full-batch gradient descent with learning rate η (docs/MATH.md):

- `kernel_gd` (``predict.py``): leading order (LO) — the network trains like a linear model on its initial
  features, so ``z_T(x) = z0(x) − H(x, A) H_AA⁻¹ [I − (I − η H_AA)^T] r0`` with ``r0 = z0(A) − y``, in closed
  form by the eigendecomposition of ``H_AA``; ``steps=None`` is the T → ∞ limit (kernel regression); ``ridge``
  adds weight decay towards θ0 (kernel ridge regression in the limit).
- `nlo_predict` (``predict.py``): the next-to-leading-order correction from the differential of the NTK (the
  dNTK, or meta-kernel, ``dH(x0; x1, x2) = Σ_μν ψ_μν(x0) φ_μ(x1) φ_ν(x2)``, see `dntk`), as a finite-T sum and
  its T → ∞ closed form. It is exact to first order in ψ; the full order-1/width correction of a deep network
  also needs the ddNTK terms, which Taylorized training with ``order=3`` contains.
- `dntk` and `kernel_predict` (``dntk.py``): the dNTK of a model at θ0, and the LO (or NLO) prediction straight
  from a model, its θ0 and the training data (it builds the kernels, then calls `kernel_gd` or `nlo_predict`).
- `taylorized_train` and `TaylorizedModel` (``taylor.py``): train the order-k Taylor polynomial of a network
  around θ0 (Bai et al. 2020) with any loss, optimizer and data: Taylor-mode propagation through an
  ``nn.Sequential`` of the layers in ``taylor.TAYLOR_MODE_RULES`` (Linear, `FanInScale`, Tanh, ReLU, Identity),
  nested forward-mode derivatives (jvp's) for any other model (``TaylorizedModel.mode`` says which); no Hessian
  is formed.
- `ntk_mlp`, `FanInScale` and `relu_ntk` (``ntk_mlp.py``): an MLP in NTK parameterisation, its layer scaling,
  and the infinite-width NTK of its one-hidden-layer ReLU version.

``predict.py`` holds the pure functions of kernels (tensors in, tensors out; no model, `DualModel` or features)
and imports no other file here; ``dntk.py`` builds a model's kernels and hands them to it; ``taylor.py`` and
``ntk_mlp.py`` stand apart (Taylor mode knows `FanInScale`).

Index conventions. Scalar outputs: kernels ``[N, N]`` / ``[M, N]``, targets ``[N]``. Vector outputs (K
components): kernels ``[N, K, N, K]`` / ``[M, K, N, K]`` with targets ``[N, K]``, or equivalently the flattened
kernels ``[N*K, N*K]`` / ``[M*K, N*K]`` whose pair index is ``n*K + k`` (row-major). Learning rates are for the
*summed* loss; for the mean over the |A| training examples pass ``lr / |A|``.
"""

from __future__ import annotations

from .dntk import dntk, kernel_predict
from .ntk_mlp import FanInScale, ntk_mlp, relu_ntk
from .predict import Prediction, kernel_gd, nlo_predict
from .taylor import TaylorizedModel, taylorized_train

__all__ = [
    "FanInScale",
    "Prediction",
    "TaylorizedModel",
    "dntk",
    "kernel_gd",
    "kernel_predict",
    "nlo_predict",
    "ntk_mlp",
    "relu_ntk",
    "taylorized_train",
]
