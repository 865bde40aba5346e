"""Eigenfeatures of the effective kernel against a dense eigendecomposition of J Jᵀ (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from _models import mlp, perturbed
from torch import nn

import efffeat as ef
from efffeat.spectra import Cliff, KernelOperator, Spectrum, eigenfeatures

F64 = torch.float64


@pytest.fixture(scope="module")
def feats():
    torch.manual_seed(0)
    model = mlp(5, (12, 10), 3, act=nn.Tanh).to(F64)
    init = perturbed(model, 0.2, seed=1)
    dual = ef.DualModel(model, init, readout="output", order="nlo", progress=False)
    return dual.features(torch.randn(30, 5, dtype=F64, generator=torch.Generator().manual_seed(2)))


@pytest.fixture(scope="module")
def scalar_feats():
    torch.manual_seed(3)
    model = mlp(4, (16,), 1, act=nn.Tanh).to(F64)
    init = perturbed(model, 0.2, seed=4)
    dual = ef.DualModel(model, init, readout=0, order="trained", progress=False)
    return dual.features(torch.randn(40, 4, dtype=F64, generator=torch.Generator().manual_seed(5)))


def jacobian(feats, layer=None) -> torch.Tensor:
    """``[N·K, P_sel]`` dense feature matrix, example-major rows."""
    j = feats.dense().reshape(feats.n_examples * feats.n_outputs, feats.n_features)
    if layer is None:
        return j
    s = feats.ids.slot(layer)
    return j[:, s.offset : s.offset + s.numel]


def max_principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = torch.linalg.svdvals(a.T @ b).clamp(max=1.0)
    return float(torch.arccos(cos.min()))


@pytest.mark.parametrize("method", ["dense", "lanczos"])
@pytest.mark.parametrize("layer", [None, "2.weight", "0.bias"])
def test_matches_dense_eigh(feats, method, layer):
    k = 5
    j = jacobian(feats, layer)
    evals, evecs = torch.linalg.eigh(j @ j.T)
    want_values, want_vectors = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    eig = eigenfeatures(feats, k=k, layer=layer, method=method)
    assert eig.meta["method"] == method
    assert float(((eig.values - want_values).abs() / want_values).max()) <= 1e-6
    u = eig.functions.reshape(-1, k)
    assert max_principal_angle(u, want_vectors) <= 1e-4
    assert torch.allclose(u.T @ u, torch.eye(k, dtype=F64), atol=1e-10)


def test_scalar_readout_and_lanczos_agree(scalar_feats):
    a = eigenfeatures(scalar_feats, k=4, method="dense")
    b = eigenfeatures(scalar_feats, k=4, method="lanczos")
    assert a.functions.shape == (40, 4)
    assert float(((a.values - b.values).abs() / a.values).max()) <= 1e-10
    assert torch.allclose(a.functions, b.functions, atol=1e-8)  # signs are fixed by the largest entry


def test_directions_are_right_singular_vectors(feats):
    layer = "2.weight"
    eig = eigenfeatures(feats, k=4, layer=layer, method="lanczos")
    j = jacobian(feats)
    s = feats.ids.slot(layer)
    for i in range(4):
        d = eig.directions(i)
        assert d.shape == (feats.n_features,)
        assert math.isclose(float(d.norm()), 1.0, rel_tol=1e-9)
        outside = torch.ones(feats.n_features, dtype=torch.bool)
        outside[s.offset : s.offset + s.numel] = False
        assert bool((d[outside] == 0).all())
        u = eig.functions[..., i].reshape(-1)
        assert torch.allclose(j @ d, eig.values[i].sqrt() * u, atol=1e-9)
        inside = d[s.offset : s.offset + s.numel]
        assert torch.allclose(inside, jacobian(feats, layer).T @ u / eig.values[i].sqrt(), atol=1e-12)
    assert eig[1].direction().equal(eig.directions(1)) and eig[1].value == float(eig.values[1])
    assert torch.allclose(eig.project(feats), eig.functions * eig.values.sqrt(), atol=1e-9)


def test_operator_products_match_dense(feats):
    op = KernelOperator(feats, ["0.weight", "4.bias"])
    j = torch.cat([jacobian(feats, "0.weight"), jacobian(feats, "4.bias")], dim=1)
    g = torch.Generator().manual_seed(6)
    u = torch.randn(op.n_pairs, dtype=F64, generator=g)
    w = torch.randn(op.n_params, dtype=F64, generator=g)
    assert torch.allclose(op.vjp(u), j.T @ u, atol=1e-12)
    assert torch.allclose(op.jvp(w), j @ w, atol=1e-12)
    assert torch.allclose(op.matvec(u), j @ (j.T @ u), atol=1e-10)
    assert torch.allclose(op.dense(), j @ j.T, atol=1e-10)


def test_cliff_is_the_largest_gap_ratio():
    slots = [ef.ids.ParamSlot("w", "w", (3,), 0)]

    def make(v):
        return Spectrum(torch.tensor(v, dtype=F64), torch.zeros(2, len(v)), torch.zeros(len(v), 3), slots, ["w"])

    assert make([10.0, 9.0, 1.0, 0.9]).cliff == Cliff(1, 9.0)
    assert make([4.0, 1.0, 0.0]).cliff == Cliff(1, math.inf)
    assert make([4.0]).cliff.index is None


def test_same_seed_identical_and_state_round_trip(feats):
    a = eigenfeatures(feats, k=3, method="lanczos", seed=1)
    b = eigenfeatures(feats, k=3, method="lanczos", seed=1)
    assert torch.equal(a.values, b.values) and torch.equal(a.functions, b.functions)
    back = Spectrum.from_state(*a.to_state())
    assert torch.equal(back.values, a.values) and torch.equal(back.functions, a.functions)
    assert torch.equal(back.directions(2), a.directions(2))
    assert back.meta == a.meta and back.params == a.params and back.slots == a.slots
    assert "Spectrum(k=3" in repr(back) and a[0].id == "eigen[0]"


def test_full_rank_request_uses_the_dense_path(scalar_feats):
    eig = eigenfeatures(scalar_feats, k=40, method="lanczos")
    assert eig.meta["method"] == "dense" and len(eig) == 40


def test_bad_input_gives_clear_errors(feats):
    with pytest.raises(ef.DataError, match="k=91"):
        eigenfeatures(feats, k=91)
    with pytest.raises(ef.ConfigError, match="positive"):
        eigenfeatures(feats, k=0)
    with pytest.raises(ef.ConfigError, match="method"):
        eigenfeatures(feats, method="svd")
    with pytest.raises(ef.FeatureIdError, match="Did you mean"):
        eigenfeatures(feats, layer="2.weigth")
