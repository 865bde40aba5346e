"""Invariants over random small networks (hypothesis, derandomised): determinism, completeness and its scaling
with the step, permutation symmetry of hidden units, and independence from the batch size."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import efffeat as ef
from efffeat.ranking import rank
from efffeat.search import max_activating

F64 = torch.float64
PROPERTY = settings(
    max_examples=6, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def networks(draw):
    """A random small tanh MLP (float64) with a seed for its data and Δθ direction."""
    d_in = draw(st.integers(1, 4))
    widths = tuple(draw(st.lists(st.integers(2, 6), min_size=1, max_size=2)))
    d_out = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return d_in, widths, d_out, seed


def build(spec, step: float, direction_seed: int | None = None):
    """(model at θ0 + step·D, init state θ0, data); θ0, D and data are functions of the seed only."""
    d_in, widths, d_out, seed = spec
    torch.manual_seed(seed)
    model = mlp(d_in, widths, d_out).to(F64)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed if direction_seed is None else direction_seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(step * torch.randn(p.shape, generator=g, dtype=F64))
    x = torch.randn(7, d_in, generator=g, dtype=F64)
    return model, init, x


def features(spec, step: float, order: str, nodes: int = 4, readout="output", batch_size: int = 256):
    model, init, x = build(spec, step)
    dual = ef.DualModel(model, init, readout=readout, order=order, nodes=nodes, progress=False)
    return dual.features(x, batch_size=batch_size)


def assert_same_factors(a: ef.EffectiveFeatures, b: ef.EffectiveFeatures) -> None:
    assert a.factors.keys() == b.factors.keys()
    for name, f in a.factors.items():
        g = b.factors[name]
        assert type(f) is type(g)
        for attr in ("u", "v") if isinstance(f, ef.LowRankFactor) else ("g",):
            assert torch.equal(getattr(f, attr), getattr(g, attr)), name


def assert_same_bits(a: ef.EffectiveFeatures, b: ef.EffectiveFeatures) -> None:
    assert_same_factors(a, b)
    assert torch.equal(a.z_init, b.z_init) and torch.equal(a.z_trained, b.z_trained)


# ---- determinism ------------------------------------------------------------------------------------------
@PROPERTY
@given(spec=networks(), order=st.sampled_from(ef.ORDERS))
def test_same_seed_gives_bitwise_identical_results(spec, order):
    runs = []
    for _ in range(2):
        model, init, x = build(spec, 0.3)
        dual = ef.DualModel(model, init, order=order, nodes=3, progress=False)
        feats = dual.features(x, batch_size=3)
        table = rank(feats, by="contribution", group="neuron")
        top = max_activating(dual, x, ["0.weight", table.ids[0]], k=3, by="contribution", progress=False)
        runs.append((feats, feats.kernel(), table, top))
    (fa, ka, ta, sa), (fb, kb, tb, sb) = runs
    assert_same_bits(fa, fb)
    assert torch.equal(ka, kb)
    assert list(ta.ids) == list(tb.ids) and torch.equal(ta.scores, tb.scores)
    for label in sa.features:
        assert torch.equal(sa[label].indices, sb[label].indices) and torch.equal(sa[label].values, sb[label].values)


# ---- completeness --------------------------------------------------------------------------------------------
@PROPERTY
@given(spec=networks())
def test_path_completeness_is_exact_to_quadrature_tolerance(spec):
    """Gauss–Legendre converges geometrically for an analytic path: 8 nodes ≪ 4 nodes, and tiny."""
    coarse, fine = (features(spec, 0.2, "path", nodes=n).completeness() for n in (4, 8))
    assert fine <= 1e-7
    assert fine <= coarse / 100 or fine <= 1e-12


def residual(spec, step: float, order: str) -> float:
    return float(features(spec, step, order).residual().norm())


@PROPERTY
@given(spec=networks())
def test_residuals_scale_with_the_step(spec):
    """Halving Δθ divides the `nlo` residual by ≈ 8 (O(Δθ³)) and the `init`/`trained` ones by ≈ 4 (O(Δθ²))."""
    step = 0.01
    for order, ratio in (("nlo", 8.0), ("init", 4.0), ("trained", 4.0)):
        big, small = residual(spec, step, order), residual(spec, step / 2, order)
        assert small > 0
        assert big / small == pytest.approx(ratio, rel=0.15), order


def test_nlo_is_exact_for_a_model_quadratic_in_its_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)).to(F64)  # linear in each layer: quadratic in θ
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(6, 3, dtype=F64)
    feats = ef.DualModel(model, init, order="nlo", progress=False).features(x)
    assert feats.completeness() <= 1e-12
    assert ef.DualModel(model, init, order="init", progress=False).features(x).completeness() > 1e-3


# ---- permutation symmetry ---------------------------------------------------------------------------------
def permuted(state: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same network with its hidden units reordered: unit i of the result is unit perm[i]."""
    out = dict(state)
    out["0.weight"], out["0.bias"] = state["0.weight"][perm], state["0.bias"][perm]
    out["2.weight"] = state["2.weight"][:, perm]
    return out


@PROPERTY
@given(spec=networks(), order=st.sampled_from(["nlo", "path"]), perm_seed=st.integers(0, 1000))
def test_permuting_hidden_units_permutes_features_and_keeps_module_scores(spec, order, perm_seed):
    d_in, widths, d_out, seed = spec
    spec = (d_in, widths[:1], d_out, seed)
    model, init, x = build(spec, 0.3)
    h = widths[0]
    perm = torch.randperm(h, generator=torch.Generator().manual_seed(perm_seed))
    twin = copy.deepcopy(model)
    twin.load_state_dict(permuted(model.state_dict(), perm))
    a = ef.DualModel(model, init, order=order, nodes=3, progress=False).features(x)
    b = ef.DualModel(twin, permuted(init, perm), order=order, nodes=3, progress=False).features(x)
    ids_b = [f"0.weight[{i},{j}]" for i in range(h) for j in range(d_in)] + [f"0.bias[{i}]" for i in range(h)]
    ids_b += [f"2.weight[{o},{i}]" for o in range(d_out) for i in range(h)]
    p = perm.tolist()
    ids_a = [f"0.weight[{p[i]},{j}]" for i in range(h) for j in range(d_in)] + [f"0.bias[{p[i]}]" for i in range(h)]
    ids_a += [f"2.weight[{o},{p[i]}]" for o in range(d_out) for i in range(h)]
    torch.testing.assert_close(b.columns(ids_b), a.columns(ids_a), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.kernel(), a.kernel(), rtol=1e-12, atol=1e-12)
    for by in ("contribution", "mean_contribution", "variance"):
        ta, tb = rank(a, by=by, group="module"), rank(b, by=by, group="module")
        got = dict(zip(tb.ids, tb.scores.tolist()))
        torch.testing.assert_close(torch.tensor([got[i] for i in ta.ids], dtype=F64), ta.scores, rtol=1e-12, atol=0)
        na, nb = rank(a, by=by, group="neuron"), rank(b, by=by, group="neuron")
        neuron_a = dict(zip(na.ids, na.scores.tolist()))
        for i in range(h):
            assert dict(zip(nb.ids, nb.scores.tolist()))[f"0.weight[{i},:]"] == pytest.approx(
                neuron_a[f"0.weight[{p[i]},:]"], rel=1e-12, abs=1e-300
            )


# ---- batch size ---------------------------------------------------------------------------------------------
@PROPERTY
@given(spec=networks(), order=st.sampled_from(ef.ORDERS), readout=st.sampled_from(["output", 0]))
def test_batch_size_does_not_change_results(spec, order, readout):
    whole = features(spec, 0.3, order, nodes=3, readout=readout)
    for batch_size in (1, 3):
        part = features(spec, 0.3, order, nodes=3, readout=readout, batch_size=batch_size)
        torch.testing.assert_close(part.dense(), whole.dense(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(part.kernel(), whole.kernel(), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(part.z_trained, whole.z_trained, rtol=1e-13, atol=1e-14)
        assert part.completeness() == pytest.approx(whole.completeness(), rel=1e-9, abs=1e-13)


# ---- the determinism probe and the lean pass -----------------------------------------------------------------
@PROPERTY
@given(
    spec=networks(), n=st.integers(1, 40), dtype=st.sampled_from([torch.float32, F64]), order=st.sampled_from(ef.ORDERS)
)
def test_deterministic_networks_pass_the_probe_and_lean_passes_give_the_same_factors(spec, n, dtype, order):
    """No false alarm: float noise of split batches is not mistaken for batch coupling, at any batch size; and
    skipping the readouts (need="features") changes no factor."""
    model, init, _ = build(spec, 0.3)
    x = torch.randn(n, spec[0], generator=torch.Generator().manual_seed(spec[3]), dtype=F64)
    dual = ef.DualModel(model, init, order=order, nodes=2, dtype=dtype, progress=False)
    full = dual.features(x, batch_size=16)
    lean = dual.features(x, batch_size=16, need="features")
    assert_same_factors(full, lean)
    assert lean.meta["completeness"] == pytest.approx(full.select_rows(slice(0, 16)).completeness(), rel=1e-6)
