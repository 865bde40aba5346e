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


def test_subspace_metrics_do_not_depend_on_the_basis():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(10, 2, generator=g, dtype=torch.float64))[0].T  # [2, 10]
    rotation = torch.tensor([[0.6, 0.8], [-0.8, 0.6]], dtype=torch.float64)
    assert metrics.subspace_share(3 * rotation @ basis, basis) == pytest.approx(1.0)
    assert metrics.principal_angles(rotation @ basis, basis).tolist() == pytest.approx([0.0, 0.0], abs=1e-5)
    # one direction in the plane, one orthogonal to it: half the plane, angles 0° and 90°
    outside = torch.linalg.qr(torch.cat([basis.T, torch.randn(10, 1, generator=g, dtype=torch.float64)], 1))[0][:, 2]
    mixed = torch.stack([basis[0], outside])
    assert metrics.subspace_share(mixed, basis) == pytest.approx(0.5)
    assert metrics.principal_angles(mixed, basis).tolist() == pytest.approx([0.0, 90.0], abs=1e-5)
    # the recall of a larger span, and the chance level n/d of a random one
    assert metrics.subspace_share(torch.cat([mixed, basis[1:]]), basis) == pytest.approx(1.0)
    random = [metrics.subspace_share(torch.randn(4, 10, generator=g), basis) for _ in range(400)]
    assert sum(random) / len(random) == pytest.approx(0.4, abs=0.03)
    with pytest.raises(DataError, match="different spaces"):
        metrics.subspace_share(torch.eye(3), basis)


def test_signed_functions_count_as_their_two_ends():
    labels = torch.tensor([0] * 20 + [1] * 20 + [2] * 20)
    steps = torch.arange(20, dtype=torch.float64)
    contrast = torch.cat([2 * steps + 2, -(2 * steps + 1), torch.zeros(20)])[:, None]  # class 0 against class 1
    ends = metrics.signed_ends(contrast)
    assert ends.shape == (60, 2) and torch.equal(ends[:, 1], (-contrast[:, 0]).clamp_min(0))
    from efffeat.baselines import label_scores

    scores = label_scores(contrast, labels)
    assert scores["purity@20 ±"] == pytest.approx(1.0)  # each end is one class
    assert scores["purity@20"] == pytest.approx(0.5)  # |f| merges the two classes
    positive = torch.rand(60, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(metrics.signed_ends(positive), positive.double())  # one end: kept as it is
    assert metrics.signed_ends(torch.randn(60, 5)).shape == (60, 6)  # ⌈5/2⌉ functions, two ends each


def test_fourier_power_of_functions_on_pairs():
    p = 13
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    w = 2 * math.pi / p
    g = torch.Generator().manual_seed(0)
    functions = torch.stack(
        [
            torch.cos(3 * w * (a + b)),
            torch.sin(5 * w * a) * torch.cos(5 * w * b) + 0.5 * torch.cos(2 * w * b),
            torch.randn(p * p, generator=g, dtype=torch.float64),
        ],
        dim=1,
    )
    power = metrics.frequency_power(functions, a, b, p)
    assert power.shape == (3, p // 2) and power[:2].sum(1).tolist() == pytest.approx([1.0, 1.0])
    assert power[2].sum() < 0.5  # modes mixing two frequencies belong to none
    assert power[0, 2] == pytest.approx(1.0) and power[1, [1, 4]].sum() == pytest.approx(1.0)
    conc = metrics.fourier_concentration(functions, a, b, p, n_frequencies=2)
    assert conc[:2].tolist() == pytest.approx([1.0, 1.0]) and conc[2] < 0.6
    noise = 1e-3 * torch.randn(p * p, 6, generator=g, dtype=torch.float64)
    neurons = torch.stack([torch.cos(3 * w * a + k) + 0.3 * torch.cos(5 * w * b) for k in range(6)], dim=1) + noise
    assert metrics.key_frequencies_of(neurons, a, b, p) == [3, 5]  # the frequencies above the noise floor
    assert metrics.key_frequencies_of(neurons, a, b, p, n=1) == [3]
    assert metrics.jaccard([2, 5], [5, 17]) == pytest.approx(1 / 3) and metrics.jaccard([], []) == 1.0
    with pytest.raises(DataError, match="exactly once"):
        metrics.frequency_power(functions, a, torch.zeros_like(b), p)


def test_polynomial_r2():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 2, generator=g, dtype=torch.float64)
    y = z[:, 0] * z[:, 1] ** 2 - z[:, 0] + 0.3
    assert metrics.polynomial_r2(y, z, 3) == pytest.approx(1.0)
    assert metrics.polynomial_r2(y, z, 2) < 0.9
    assert metrics.polynomial_r2(torch.randn(300, generator=g), z, 3) < 0.15


def test_dictionary_options_are_the_estimators_own():
    from efffeat.baselines.dictionary import estimator_options

    assert {"l1", "steps", "lr"} <= set(estimator_options("sae")) and "n_latents" not in estimator_options("sae")
    assert "whiten" in estimator_options("ica") and "random_state" not in estimator_options("pca")
    with pytest.raises(ConfigError, match="unknown dictionary method"):
        estimator_options("kmeans")
