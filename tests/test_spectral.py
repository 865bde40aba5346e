"""Spectral protocol: reductions, layerwise kernels, ridge, flattened modes, Fourier overlaps, cliffs, tracking."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from _models import TiedTMS, mlp, perturbed
from torch import nn

import efffeat as ef
from efffeat import spectra as sp
from efffeat.factors import DenseFactor, LowRankFactor, factor_gram

F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]


def random_kernel(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A symmetric PSD ``[n, k, n, k]`` kernel J Jᵀ."""
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(n * k, 7, generator=g, dtype=F64)
    return (j @ j.T).reshape(n, k, n, k)


def loop_reduce(kern: torch.Tensor, reduce: str, w: torch.Tensor) -> torch.Tensor:
    n, k, m, _ = kern.shape
    s = w.sqrt()
    if reduce == "flatten":
        out = torch.zeros(k * n, k * m, dtype=F64)
        for a in range(n):
            for i in range(k):
                for b in range(m):
                    for j in range(k):
                        out[a * k + i, b * k + j] = s[i] * s[j] * kern[a, i, b, j]
        return out
    out = torch.zeros(n, m, dtype=F64)
    for a in range(n):
        for b in range(m):
            if reduce == "diagonal":
                out[a, b] = sum(w[i] * kern[a, i, b, i] for i in range(k)) / k
            else:
                out[a, b] = sum(s[i] * s[j] * kern[a, i, b, j] for i in range(k) for j in range(k)) / k**2
    return out


@pytest.mark.parametrize("reduce", sp.REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_reduce_outputs_matches_loops(reduce, weighted):
    kern = random_kernel(5, 3)
    w = sp.importance_weights(0.7, 3, beta=0.5) if weighted else torch.ones(3, dtype=F64)
    got = sp.reduce_outputs(kern, reduce, w if weighted else None)
    assert torch.allclose(got, loop_reduce(kern, reduce, w), rtol=1e-12, atol=1e-12)


def test_importance_weights():
    w = sp.importance_weights(0.8, 4, beta=0.3)
    assert torch.allclose(w, torch.tensor([0.8 ** (0.3 * i) for i in range(4)], dtype=F64))
    assert torch.equal(sp.importance_weights(0.8, 3, beta=0.0), torch.ones(3, dtype=F64))


def trained_mlp(seed: int = 0):
    torch.manual_seed(seed)
    model = mlp(4, (6,), 3, act=nn.Tanh).to(F64)
    init = perturbed(model, 0.3, seed=seed)
    x = torch.randn(9, 4, dtype=F64)
    return model, init, x


@pytest.mark.parametrize("order", ["trained", "nlo"])
@pytest.mark.parametrize("reduce", sp.REDUCTIONS)
def test_effective_kernel_matches_full_kernel(order, reduce):
    model, init, x = trained_mlp()
    feats = ef.DualModel(model, init, readout="output", order=order, progress=False).features(x)
    w = sp.importance_weights(0.6, 3)
    for params in (None, ["0.weight"], ["2.weight", "2.bias"]):
        full = feats.kernel(params=params)
        for weights in (None, w):
            got = feats.kernel(params=params, reduce=reduce, output_weights=weights)
            want = sp.reduce_outputs(full, reduce, weights)
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (params, weights)


def test_layerwise_kernels_sum_to_full_kernel():
    model, init, x = trained_mlp(1)
    feats = ef.DualModel(model, init, order="trained", progress=False).features(x)
    total = feats.kernel(reduce="diagonal")
    parts = sum(feats.kernel(params=[s.name], reduce="diagonal") for s in feats.slots)
    assert torch.allclose(total, parts, rtol=1e-12)


@pytest.mark.parametrize("dims", [(3, 4), (9, 11)])  # dense-cheaper and low-rank-cheaper layouts
def test_output_sum_with_component_dependent_factors(dims):
    g = torch.Generator().manual_seed(3)
    d0, d1 = dims
    f = LowRankFactor(
        torch.randn(5, 4, 2, d0, generator=g, dtype=F64), torch.randn(5, 4, 2, d1, generator=g, dtype=F64)
    )
    c = torch.randn(4, generator=g, dtype=F64)
    summed = f.output_sum(c)
    want = torch.einsum("nkp,k->np", f.dense(), c)
    assert torch.allclose(summed.dense()[:, 0], want, rtol=1e-12)
    assert torch.allclose(factor_gram(summed, summed)[:, 0, :, 0], want @ want.T, rtol=1e-12)
    dense = DenseFactor(f.dense())
    assert torch.allclose(dense.output_sum(c).dense()[:, 0], want, rtol=1e-12)


def test_eigenmodes_ridge_and_order():
    kern = sp.reduce_outputs(random_kernel(8, 2, seed=1), "pairs")
    spec = sp.eigenmodes(kern, k=5)
    shift = 1e-8 * float(kern.diagonal().mean())
    assert spec.ridge == pytest.approx(shift, rel=1e-12)
    assert bool((spec.values[:-1] >= spec.values[1:]).all())
    want = torch.linalg.eigvalsh(kern).flip(0)[:5] + shift
    assert torch.allclose(spec.values, want, rtol=1e-10, atol=1e-12)
    v = spec.eigenvectors
    assert torch.allclose(v.T @ v, torch.eye(5, dtype=F64), atol=1e-10)
    assert torch.allclose((kern + shift * torch.eye(8, dtype=F64)) @ v, v * spec.values, atol=1e-9)
    # a rank-deficient kernel: the ridge makes every eigenvalue positive
    low = torch.ones(6, 6, dtype=F64)
    assert bool((sp.eigenmodes(low).values > 0).all())


def test_flattened_modes_match_dense_flattened_kernel():
    torch.manual_seed(0)
    model = TiedTMS(6, 2).to(F64)
    init = perturbed(model, 0.2)
    x = torch.rand(10, 6, dtype=F64)
    feats = ef.DualModel(model, init, order="trained", progress=False).features(x)
    w = sp.importance_weights(0.8, 6, beta=0.3)
    dense = sp.eigenmodes(feats.kernel(reduce="flatten", output_weights=w), k=8)
    fact = sp.flattened_modes(feats, 8, output_weights=w)
    assert torch.allclose(fact.values, dense.values, rtol=1e-8)
    assert fact.ridge == pytest.approx(dense.ridge, rel=1e-10)
    proj = fact.eigenvectors @ fact.eigenvectors.T
    assert torch.allclose(proj, dense.eigenvectors @ dense.eigenvectors.T, atol=1e-7)
    with pytest.raises(ef.ConfigError, match="rank bound"):
        sp.flattened_modes(feats, 10_000)


def test_fourier_overlap_with_itself_is_rank():
    p = 29
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).T
    fam = sp.modadd_fourier_families(a, b, p)
    assert sp.overlap(fam["sum"], fam["sum"]) == pytest.approx(28, abs=1e-9)
    assert sp.overlap(fam["inputs"], fam["inputs"]) == pytest.approx(56, abs=1e-9)
    assert sp.overlap(fam["sum"], fam["difference"]) == pytest.approx(0, abs=1e-9)
    assert sp.overlap(fam["inputs"], fam["input_sum"]) == pytest.approx(28, abs=1e-9)
    # even p: the sine at p/2 vanishes, so the family has rank p - 1
    f10 = sp.fourier_basis(torch.arange(10), 10)
    assert sp.orthonormal_columns(f10, center=True).shape[1] == 9
    assert sp.overlap(torch.eye(10, dtype=F64), f10) == pytest.approx(9, abs=1e-9)


def test_overlap_of_random_subspace_is_its_expected_fraction():
    g = torch.Generator().manual_seed(0)
    n, d, m = 400, 40, 10
    modes = torch.randn(n, d, generator=g, dtype=F64)
    feats = torch.randn(n, m, generator=g, dtype=F64)
    ov = sp.overlap(modes, feats)
    assert 0 <= ov <= m
    assert ov == pytest.approx(m * d / n, rel=0.5)
    inside = modes[:, :m] @ torch.randn(m, m, generator=g, dtype=F64)
    assert sp.overlap(modes, inside, center=False) == pytest.approx(m, abs=1e-9)


def test_spectral_cliffs_on_a_block_spectrum():
    lam = torch.cat([torch.tensor([1e5]), torch.full((56,), 100.0), torch.full((56,), 1.0), torch.full((20,), 1e-3)])
    lam = lam * (1 - 1e-3 * torch.arange(lam.shape[0]))  # slight slope inside blocks
    assert sp.spectral_cliffs(lam) == [0, 56, 112]
    assert sp.spectral_cliffs(lam, n=2) == [0, 112]
    assert sp.drop_ratios(lam, [56])[0] == pytest.approx(100, rel=1e-2)
    with pytest.raises(ef.DataError):
        sp.spectral_cliffs(torch.tensor([1.0, 0.0]))


def test_central_difference_and_tracking():
    x = torch.arange(0, 100, 10, dtype=F64)
    d = sp.central_difference(x**2, x)
    assert torch.allclose(d[1:-1], 2 * x[1:-1])  # exact for quadratics on a uniform grid
    assert float(d[0]) == pytest.approx(10.0) and float(d[-1]) == pytest.approx(170.0)
    xs = torch.tensor([0.0, 1.0, 3.0, 7.0])
    assert torch.allclose(sp.central_difference(3 * xs + 1, xs), torch.full((4,), 3.0, dtype=F64))
    sigmoid = {int(e): 1 / (1 + math.exp(-(e - 40) / 5)) for e in range(0, 100, 10)}
    tr = sp.track(list(sigmoid.items()), analyse=lambda s: s, progress=False)
    assert tr.peak_epoch == 40
    assert torch.allclose(tr.derivative, sp.central_difference(tr.values, tr.epochs))
    with pytest.raises(ef.DataError):
        sp.track([(0, 1.0)], analyse=float, progress=False)


def test_argmax_features():
    ind = torch.eye(4, dtype=F64)
    modes = torch.stack([ind[2] + 0.1 * ind[0], -ind[1]], dim=1)
    assert sp.argmax_features(modes, ind).tolist() == [2, 1]


def test_results_round_trip():
    spec = sp.eigenmodes(sp.reduce_outputs(random_kernel(6, 2), "diagonal"), k=3)
    spec.meta["reduce"] = "diagonal"
    back = sp.Spectrum.from_state(*spec.to_state())
    assert torch.equal(back.values, spec.values) and torch.equal(back.eigenvectors, spec.eigenvectors)
    assert back.ridge == spec.ridge and back.meta == spec.meta
    tr = sp.track([(0, 0.0), (10, 1.0), (20, 4.0)], analyse=float, progress=False)
    tb = sp.Tracking.from_state(*tr.to_state())
    assert all(torch.equal(getattr(tb, k), getattr(tr, k)) for k in ("epochs", "values", "derivative"))


def test_bad_input_errors():
    kern = random_kernel(3, 2)
    with pytest.raises(ef.ConfigError, match="unknown reduce"):
        sp.reduce_outputs(kern, "trace")
    with pytest.raises(ef.ConfigError, match="one entry per readout component"):
        sp.reduce_outputs(kern, "pairs", torch.ones(3))
    with pytest.raises(ef.ConfigError, match="square"):
        sp.eigenmodes(kern)
    with pytest.raises(ef.ConfigError, match="same inputs"):
        sp.overlap(torch.eye(4), torch.eye(5))
    with pytest.raises(ef.ConfigError, match="outside"):
        sp.eigenmodes(torch.eye(3)).modes(2, 5)


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "reproduce_entk_features", REPO / "scripts/reproduce_entk_features.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_reproduce_script_quick(capsys):
    _load_script().main(["--quick", "--no-progress"])
    out = capsys.readouterr().out
    for title in ("mod-add MLP", "grokking diagnostic", "1-layer transformer", "kernel routes", "TMS"):
        assert title in out


@pytest.mark.parametrize("ku, kv", [(4, 1), (1, 4), (4, 4), (1, 1)])
def test_diagonal_gram_layouts(ku, kv):
    g = torch.Generator().manual_seed(5)
    f = LowRankFactor(
        torch.randn(6, ku, 2, 3, generator=g, dtype=F64), torch.randn(6, kv, 2, 5, generator=g, dtype=F64)
    )
    w = torch.rand(4, generator=g, dtype=F64)
    dense = f.dense().expand(6, 4, 15)
    want = torch.einsum("nkp,mkp,k->nm", dense, dense, w)
    assert torch.allclose(f.diagonal_gram(w), want, rtol=1e-12)
    assert torch.allclose(DenseFactor(f.dense()).diagonal_gram(w), want, rtol=1e-12)
