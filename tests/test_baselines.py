"""Baselines (neurons, sparse autoencoder, dictionaries) and the metrics they are scored with."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from efffeat.baselines import NeuronActivations, SparseAutoencoder, dictionary, metrics, neurons
from efffeat.errors import ConfigError, DataError, FeatureIdError


@pytest.fixture(scope="module")
def sparse_coded():
    """Sharkey et al.'s setting: 64 unit atoms in 32 dims, 3 active per sample, non-negative codes."""
    from sklearn.datasets import make_sparse_coded_signal

    X, atoms, codes = make_sparse_coded_signal(
        n_samples=1024, n_components=64, n_features=32, n_nonzero_coefs=3, random_state=0
    )
    return np.abs(codes) @ atoms, atoms


def test_sae_and_dictionary_learning_recover_a_known_dictionary_pca_does_not(sparse_coded):
    X, atoms = sparse_coded
    sae = dictionary(X, "sae", 64, l1=0.3, steps=500, lr=1e-2, batch_size=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lasso sub-solver's convergence warnings
        dl = dictionary(X, "minibatch-dl", 64, alpha=0.3, max_iter=5, batch_size=256, positive_code=True)
    pca = dictionary(X, "pca", 64)
    assert metrics.mmcs(atoms, sae.components_) >= 0.9
    assert metrics.mmcs(atoms, dl.components_) >= 0.9
    assert metrics.mmcs(atoms, pca.components_) <= 0.6
    assert pca.components_.shape == (32, 32)  # PCA finds at most d directions
    assert metrics.fvu(X, sae.reconstruct(X)) < 0.1  # L1 shrinks the codes a little


def test_sparse_autoencoder_contract():
    gen = torch.Generator().manual_seed(0)
    X = torch.relu(torch.randn(256, 8, generator=gen))
    sae = SparseAutoencoder(12, l1=0.05, steps=50, random_state=1).fit(X)
    assert sae.components_.shape == (12, 8)
    assert torch.allclose(sae.components_.norm(dim=1), torch.ones(12), atol=1e-5)
    codes = sae.transform(X)
    assert isinstance(codes, torch.Tensor) and codes.shape == (256, 12) and bool((codes >= 0).all())
    assert isinstance(sae.transform(X.numpy()), np.ndarray)
    again = SparseAutoencoder(12, l1=0.05, steps=50, random_state=1).fit(X)
    assert torch.equal(again.components_, sae.components_) and again.loss_curve_ == sae.loss_curve_
    live = int((codes.amax(dim=0) > 0).sum())
    assert sae.n_dead_ == 12 - live
    sae.encoder_bias_[0] = -1e3  # latent 0 can never fire now
    assert sae.dead_latents(X) == sae.n_dead_ + (0 if sae.n_dead_ and codes[:, 0].max() == 0 else 1)
    no_bias = SparseAutoencoder(4, steps=5, decoder_bias=False).fit(X)
    assert torch.equal(no_bias.decoder_bias_, torch.zeros(8))
    with pytest.raises(ConfigError, match="not fitted"):
        SparseAutoencoder(3).transform(X)
    with pytest.raises(DataError, match="NaN"):
        SparseAutoencoder(3, steps=1).fit(X.clone().fill_(math.nan))


def test_dictionary_methods_share_one_interface():
    gen = torch.Generator().manual_seed(1)
    X = torch.relu(torch.randn(200, 6, generator=gen))
    for method in ("sae", "minibatch-dl", "ica", "pca", "nmf"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = dictionary(X, method, 4, steps=20) if method == "sae" else dictionary(X, method, 4)
            assert d.components_.shape == (4, 6), method
            assert d.transform(X).shape == (200, 4) and d.reconstruct(X).shape == (200, 6)
    from sklearn.decomposition import PCA, FastICA

    pca = dictionary(X, "pca", 3)
    assert np.allclose(pca.components_.numpy(), PCA(3, random_state=0).fit(X.double().numpy()).components_, atol=1e-6)
    assert metrics.fvu(X, pca.reconstruct(X)) < 1
    ica = dictionary(X, "ica", 3)
    ref = FastICA(3, random_state=0, whiten="unit-variance", max_iter=1000).fit(X.double().numpy())
    assert np.allclose(ica.components_.numpy(), ref.mixing_.T, atol=1e-5)  # data-space directions, not filters
    with pytest.raises(DataError, match="non-negative"):
        dictionary(X - 1, "nmf", 2)
    with pytest.raises(ConfigError, match="unknown dictionary method"):
        dictionary(X, "kmeans", 2)


def test_neurons_read_layer_outputs_and_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(40, 5)
    acts = neurons(model, x, "1", batch_size=16)
    want = torch.relu(model[0](x)).detach()
    assert torch.allclose(acts.values, want) and acts.n_examples == 40 and acts.n_features == 7
    assert torch.allclose(neurons(model, (x, torch.zeros(40)), "2", at="input").values, want)
    assert acts.ids[3] == "1[3]" and torch.equal(acts.column("1[3]"), want[:, 3])
    assert torch.equal(acts.columns([0, "1[2]"]), want[:, [0, 2]])
    assert torch.allclose(acts.sq_sums(), (want**2).sum(0)) and torch.allclose(acts.kernel(), want @ want.T)
    v, u = torch.randn(7), torch.randn(40)
    assert torch.allclose(acts.matvec(v), want @ v) and torch.allclose(acts.rmatvec(u), want.T @ u, atol=1e-5)
    again = NeuronActivations.from_state(*acts.to_state())
    assert torch.equal(again.values, acts.values) and again.layer == "1"
    assert acts.select_rows(slice(0, 4)).n_examples == 4
    with pytest.raises(FeatureIdError):
        acts.column("2[0]")
    with pytest.raises(FeatureIdError):
        acts.column(7)
    with pytest.raises(ConfigError, match="no module"):
        neurons(model, x, "fc9")
    with pytest.raises(ConfigError, match="at must be"):
        neurons(model, x, "1", at="middle")


def test_neurons_read_sequence_positions():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)

        def forward(self, t):
            return self.emb(t)

    model = Seq()
    tokens = torch.tensor([[0, 1, 2], [3, 4, 0]])
    assert torch.equal(neurons(model, tokens, "emb").values, model.emb.weight[[2, 0]].detach())
    assert torch.equal(neurons(model, tokens, "emb", position=0).values, model.emb.weight[[0, 3]].detach())


def test_alignment_metrics():
    eye = torch.eye(4)
    rot = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))[0]
    assert metrics.mmcs(eye, -eye[[2, 0, 3, 1]] * 3) == pytest.approx(1.0)
    assert metrics.mmcs(eye, eye[:2]) == pytest.approx(0.5 + 0.5 * 0.0)
    assert metrics.mmcs(rot.T, rot.T) == pytest.approx(1.0)
    assert metrics.n_matched(eye, eye[[0, 0, 1]]) == 2
    half = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert metrics.polysemanticity(half, eye).item() == pytest.approx(2.0)
    assert metrics.polysemanticity(eye, eye).tolist() == pytest.approx([1.0] * 4)
    assert metrics.subspace_alignment(half, eye[:1]).item() == pytest.approx(0.5)
    with pytest.raises(DataError, match="different spaces"):
        metrics.mmcs(eye, torch.eye(3))


def test_feature_dimensionality():
    angles = torch.arange(5) * 2 * math.pi / 5
    pentagon = torch.stack([torch.cos(angles), torch.sin(angles)])
    assert metrics.feature_dimensionality(pentagon).tolist() == pytest.approx([0.4] * 5)
    two = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1e-6]])
    assert metrics.feature_dimensionality(two).tolist()[:2] == pytest.approx([1.0, 1.0], abs=1e-6)
    antipodal = torch.tensor([[1.0, -1.0]])
    assert metrics.feature_dimensionality(antipodal).tolist() == pytest.approx([0.5, 0.5])


def test_label_and_sparsity_metrics():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    acts = torch.tensor([[3.0, 1.0], [2.0, 0.0], [1.0, 3.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.5]])
    assert metrics.top_k_purity(acts, labels, k=3).tolist() == pytest.approx([1.0, 2 / 3])
    sel = metrics.class_selectivity(acts, labels)
    assert sel[0].item() == pytest.approx(1.0) and 0 < sel[1].item() < 1
    assert metrics.l0(acts) == pytest.approx(7 / 6) and metrics.sparsity(acts) == pytest.approx(5 / 12)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    assert metrics.fvu(x, x) == 0 and metrics.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    with pytest.raises(DataError):
        metrics.top_k_purity(acts, labels, k=7)
