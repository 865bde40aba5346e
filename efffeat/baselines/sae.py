"""A sparse autoencoder in torch with the scikit-learn estimator interface.

``f = ReLU(W_enc (x − b_dec) + b_enc)``, ``x̂ = W_dec f + b_dec``, loss ``mean ‖x − x̂‖² + l1 · mean Σ_j f_j``
with the decoder's columns renormalised to unit length after every step (so the L1 penalty cannot be dodged by
shrinking codes). Trained by Adam on minibatches drawn by a seeded generator.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError


def as_matrix(X, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[N, d]`` float tensor from an array or tensor; `DataError` for anything else."""
    t = torch.as_tensor(np.asarray(X) if not isinstance(X, Tensor) else X.detach()).to(dtype)
    if t.ndim != 2 or t.shape[0] == 0:
        raise DataError(f"X must be a non-empty [n_samples, n_features] matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise DataError("X contains NaN or inf; clean it before fitting")
    return t


def _like(result: Tensor, X) -> Tensor | np.ndarray:
    return result if isinstance(X, Tensor) else result.numpy()


class SparseAutoencoder:
    """ReLU sparse autoencoder with unit-norm decoder columns (scikit-learn style).

    Args:
        n_latents: dictionary size; l1: sparsity penalty; steps, lr, batch_size: Adam training;
        decoder_bias: learn ``b_dec`` (initialised at the data mean) or fix it at 0;
        random_state: seed of the initialisation and of the minibatches; progress: tqdm bar.

    Fitted attributes: ``components_ [n_latents, d]`` (unit-norm decoder directions), ``encoder_weight_
    [n_latents, d]``, ``encoder_bias_ [n_latents]``, ``decoder_bias_ [d]``, ``n_dead_`` (latents never active
    on the training data), ``loss_curve_``.
    """

    def __init__(
        self,
        n_latents: int,
        l1: float = 0.1,
        steps: int = 2000,
        lr: float = 1e-2,
        batch_size: int = 512,
        decoder_bias: bool = True,
        random_state: int = 0,
        progress: bool = False,
    ):
        if n_latents < 1:
            raise ConfigError(f"n_latents must be positive, got {n_latents}")
        if l1 < 0 or steps < 0 or lr <= 0 or batch_size < 1:
            raise ConfigError(
                f"need l1 ≥ 0, steps ≥ 0, lr > 0 and batch_size ≥ 1; got {l1}, {steps}, {lr}, {batch_size}"
            )
        self.n_latents = n_latents
        self.l1 = l1
        self.steps = steps
        self.lr = lr
        self.batch_size = batch_size
        self.decoder_bias = decoder_bias
        self.random_state = random_state
        self.progress = progress

    def _encode(self, x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
        return torch.relu((x - b_dec) @ w_enc.T + b_enc)

    def fit(self, X, y=None) -> SparseAutoencoder:
        """Fit on ``X [n_samples, d]``; returns self."""
        x = as_matrix(X)
        n, d = x.shape
        gen = torch.Generator().manual_seed(self.random_state)
        w_dec = torch.randn(d, self.n_latents, generator=gen)
        w_dec /= w_dec.norm(dim=0, keepdim=True)
        w_enc = w_dec.T.clone().requires_grad_(True)
        w_dec.requires_grad_(True)
        b_enc = torch.zeros(self.n_latents, requires_grad=True)
        b_dec = (x.mean(dim=0) if self.decoder_bias else torch.zeros(d)).requires_grad_(self.decoder_bias)
        params = [w_enc, w_dec, b_enc] + ([b_dec] if self.decoder_bias else [])
        opt = torch.optim.Adam(params, lr=self.lr)
        losses = []
        for _ in tqdm(range(self.steps), desc="sae", disable=None if self.progress else True, leave=False):
            xb = x[torch.randint(n, (min(self.batch_size, n),), generator=gen)]
            f = self._encode(xb, w_enc, b_enc, b_dec)
            loss = (f @ w_dec.T + b_dec - xb).square().sum(dim=1).mean() + self.l1 * f.sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                w_dec /= w_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)
            losses.append(float(loss.detach()))
        self.components_ = w_dec.detach().T.contiguous()
        self.encoder_weight_ = w_enc.detach().clone()
        self.encoder_bias_ = b_enc.detach().clone()
        self.decoder_bias_ = b_dec.detach().clone()
        self.loss_curve_ = losses
        self.n_dead_ = self.dead_latents(x)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise ConfigError("this SparseAutoencoder is not fitted yet; call fit(X) first")

    def transform(self, X) -> Tensor | np.ndarray:
        """``[n_samples, n_latents]`` non-negative codes (a tensor for tensor input, else an array)."""
        self._check_fitted()
        x = as_matrix(X)
        with torch.no_grad():
            return _like(self._encode(x, self.encoder_weight_, self.encoder_bias_, self.decoder_bias_), X)

    def inverse_transform(self, codes) -> Tensor | np.ndarray:
        """``[n_samples, d]``: ``codes W_decᵀ + b_dec``."""
        self._check_fitted()
        return _like(as_matrix(codes) @ self.components_ + self.decoder_bias_, codes)

    def fit_transform(self, X, y=None) -> Tensor | np.ndarray:
        return self.fit(X).transform(X)

    def dead_latents(self, X) -> int:
        """How many latents are zero on every row of X."""
        codes = torch.as_tensor(self.transform(as_matrix(X)))
        return int((codes.amax(dim=0) <= 0).sum())
