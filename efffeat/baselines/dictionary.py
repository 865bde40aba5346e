"""One interface to the dictionary-learning baselines: a sparse autoencoder and scikit-learn's decompositions.

Every method returns a fitted `Dictionary` whose ``components_ [n_components, d]`` are directions in the data
space (for FastICA the columns of the mixing matrix, not the unmixing filters scikit-learn calls components).
PCA and FastICA find at most d components; asking for more gives d.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .sae import SparseAutoencoder, as_matrix

METHODS = ("sae", "minibatch-dl", "ica", "pca", "nmf")
NONNEGATIVE = ("nmf",)  # the methods that need non-negative data


@dataclass
class Dictionary:
    """A fitted dictionary: ``components_ [n_components, d]`` data-space directions, and the fitted estimator."""

    method: str
    estimator: Any
    components_: Tensor

    def transform(self, X) -> Tensor:
        """``[n_samples, n_components]`` codes (scores for PCA, sources for ICA)."""
        x = as_matrix(X)
        codes = self.estimator.transform(x if self.method == "sae" else x.double().numpy())
        return torch.as_tensor(codes, dtype=torch.float32)

    def reconstruct(self, X) -> Tensor:
        """``[n_samples, d]``: the data as the dictionary reconstructs it."""
        x = as_matrix(X)
        if self.method == "sae":
            return self.estimator.inverse_transform(self.estimator.transform(x))
        if self.method == "minibatch-dl":
            return self.transform(x) @ self.components_
        rec = self.estimator.inverse_transform(self.estimator.transform(x.double().numpy()))
        return torch.as_tensor(rec, dtype=torch.float32)


def estimator_options(method: str) -> list[str]:
    """The keyword arguments `dictionary` passes on to `method`'s estimator (its own settings)."""
    import inspect

    from sklearn.decomposition import NMF, PCA, FastICA, MiniBatchDictionaryLearning

    if method not in METHODS:
        raise ConfigError(f"unknown dictionary method {method!r}; choose one of {', '.join(METHODS)}")
    estimator = {"sae": SparseAutoencoder, "minibatch-dl": MiniBatchDictionaryLearning, "ica": FastICA, "pca": PCA}
    params = inspect.signature(estimator.get(method, NMF).__init__).parameters
    return sorted(set(params) - {"self", "n_components", "n_latents", "random_state"})


def dictionary(X, method: str, n_components: int, random_state: int = 0, **kwargs: Any) -> Dictionary:
    """Fit a dictionary to ``X [n_samples, d]``.

    method: ``"sae"`` (`SparseAutoencoder`), ``"minibatch-dl"`` (MiniBatchDictionaryLearning), ``"ica"``
    (FastICA), ``"pca"``, ``"nmf"`` (needs X ≥ 0). kwargs go to the estimator (e.g. ``l1=``, ``alpha=``).
    """
    from sklearn.decomposition import NMF, PCA, FastICA, MiniBatchDictionaryLearning

    if method not in METHODS:
        raise ConfigError(f"unknown dictionary method {method!r}; choose one of {', '.join(METHODS)}")
    if n_components < 1:
        raise ConfigError(f"n_components must be positive, got {n_components}")
    x = as_matrix(X)
    if method in NONNEGATIVE and bool((x < 0).any()):
        raise DataError(
            f"{method.upper()} needs non-negative data (e.g. post-ReLU activations); X has negative entries"
        )
    n, d = x.shape
    if method == "sae":
        est = SparseAutoencoder(n_components, random_state=random_state, **kwargs).fit(x)
        return Dictionary(method, est, est.components_)
    xn = x.double().numpy()
    if method == "minibatch-dl":
        kw = {"alpha": 0.1, "batch_size": 256, "max_iter": 5, "fit_algorithm": "cd", "transform_algorithm": "lasso_cd"}
        kw |= kwargs
        est = MiniBatchDictionaryLearning(n_components, random_state=random_state, **kw).fit(xn)
        comps = est.components_
    elif method == "ica":
        kw = {"whiten": "unit-variance", "max_iter": 1000} | kwargs
        est = FastICA(min(n_components, d, n), random_state=random_state, **kw).fit(xn)
        comps = est.mixing_.T
    elif method == "pca":
        est = PCA(min(n_components, d, n), random_state=random_state, **kwargs).fit(xn)
        comps = est.components_
    else:
        kw = {"init": "nndsvda", "max_iter": 500} | kwargs
        est = NMF(n_components, random_state=random_state, **kw).fit(xn)
        comps = est.components_
    return Dictionary(method, est, torch.as_tensor(np.ascontiguousarray(comps), dtype=torch.float32))
