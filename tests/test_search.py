"""Streaming max-activation search against brute force, and synthetic inputs by gradient ascent."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import bridge, mlp, perturbed
from torch import nn
from torch.func import functional_call

import efffeat as ef
from efffeat.search import TopK, max_activating, synthesize
from efffeat.spectra import eigenfeatures

F64 = torch.float64


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = mlp(4, (7,), 3, act=nn.ReLU).to(F64)
    with torch.no_grad():
        model[0].bias[6] = -1e3  # a dead unit: its features are 0 on every input (ties)
    init = perturbed(model, 0.2, seed=1)
    with torch.no_grad():
        model[0].bias[6] = init["0.bias"][6] = -1e3
    dual = ef.DualModel(model, init, readout="output", order="nlo", progress=False)
    x = torch.randn(50, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    return dual, x, dual.features(x)


def brute_top(values: torch.Tensor, k: int, largest: bool = True):
    """Top-k of ``[N, K]`` values over (example, component) pairs by one stable sort of everything."""
    flat = values.reshape(-1)
    order = torch.sort(flat, descending=largest, stable=True).indices[:k]
    return order // values.shape[1], order % values.shape[1], flat[order]


def dense_values(feats, positions, weights) -> torch.Tensor:
    """``[N, K]``: ``Σ_m w_m φ_{p_m}`` from the dense feature matrix."""
    return feats.dense()[:, :, positions] @ weights


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("by", ["value", "contribution"])
def test_streaming_top_k_equals_brute_force(setup, by, largest):
    dual, x, feats = setup
    eig = eigenfeatures(feats, k=3)
    ids, delta = feats.ids, feats.flat_delta()

    def pos(fid):
        return [ids.index(fid)]

    def neuron(i):
        return [ids.index(f"0.weight[{i},{j}]") for j in range(4)] + [ids.index(f"0.bias[{i}]")]

    def row_sum(fb):
        return fb.delta_z().sum(1)

    single = torch.tensor(pos("0.weight[2,1]"))
    d1 = eig.directions(1)
    cases = {
        "0.weight[2,1]": dense_values(feats, single, torch.ones(1, dtype=F64) if by == "value" else delta[single]),
        "2.bias[1]": dense_values(feats, torch.tensor(pos("2.bias[1]")), delta[[ids.index("2.bias[1]")]])
        if by == "contribution"
        else dense_values(feats, torch.tensor(pos("2.bias[1]")), torch.ones(1, dtype=F64)),
        "0.weight[3,:]": dense_values(feats, torch.tensor(neuron(3)), delta[neuron(3)]),
        "2.weight[:,0]": dense_values(
            feats,
            torch.tensor([ids.index(f"2.weight[{o},0]") for o in range(3)]),
            delta[[ids.index(f"2.weight[{o},0]") for o in range(3)]],
        ),
        "0.weight": dense_values(feats, torch.arange(28), delta[:28]),
        "0.weight[6,0]": dense_values(feats, torch.tensor(pos("0.weight[6,0]")), torch.ones(1, dtype=F64)),
        "eigen[0]": feats.dense() @ (eig.directions(0) * ((delta @ eig.directions(0)) if by == "contribution" else 1)),
        "eigen[1]": feats.dense() @ (d1 * ((delta @ d1) if by == "contribution" else 1)),
        "row_sum": feats.delta_z().sum(1, keepdim=True).expand(-1, 3),
    }
    specs = [
        "0.weight[2,1]",
        "2.bias[1]",
        "0.weight[3,:]",
        "2.weight[:,0]",
        "0.weight",
        "0.weight[6,0]",
        eig[0],
        (eig, 1),
        row_sum,
    ]
    top = max_activating(dual, x, specs, k=7, by=by, batch_size=9, largest=largest, progress=False)
    assert top.features == list(cases)
    for label, values in cases.items():
        idx, comp, val = brute_top(values, 7, largest)
        got = top[label]
        assert torch.equal(got.indices, idx) and torch.equal(got.components, comp), label
        assert torch.allclose(got.values, val, atol=1e-12), label
    assert torch.equal(top["0.weight[6,0]"].values, torch.zeros(7, dtype=F64))  # ties: the first examples
    assert torch.equal(top["0.weight[6,0]"].indices, torch.tensor([0, 0, 0, 1, 1, 1, 2]))
    assert top[eig[0]] is top["eigen[0]"] and top[(eig, 1)] is top["eigen[1]"] and top[row_sum] is top[8]


def test_any_iterable_of_batches_gives_the_same_result(setup):
    dual, x, _ = setup
    y = torch.zeros(50)
    want = max_activating(dual, x, "0.weight[1,:]", k=5, progress=False)
    for data in (
        [(x[i : i + 8], y[i : i + 8]) for i in range(0, 50, 8)],
        (xb for xb in x.split(13)),
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16),
    ):
        got = max_activating(dual, data, ["0.weight[1,:]"], k=5, progress=False)
        assert torch.equal(got[0].indices, want[0].indices) and torch.allclose(got[0].values, want[0].values)


def test_top_k_results_examples_and_state(setup):
    dual, x, _ = setup
    top = max_activating(dual, (x, torch.arange(50)), ["0.weight[1,2]", "2.weight"], k=4, progress=False)
    entry = top["0.weight[1,2]"]
    assert torch.equal(entry.examples(x), x[entry.indices])
    assert torch.equal(entry.examples((x, torch.arange(50)))[1], entry.indices)
    back = TopK.from_state(*top.to_state())
    assert back.features == top.features and back.meta == top.meta
    for label in top:
        assert torch.equal(back[label].indices, top[label].indices)
        assert torch.equal(back[label].values, top[label].values)
        assert torch.equal(back[label].components, top[label].components)
    assert "TopK(k=4" in repr(top)
    with pytest.raises(ef.DataError, match="tensor data"):
        entry.examples([x])


def test_head_group_of_a_bridge(setup):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bridge(n_layers=1, d_vocab=7, n_ctx=3, normalization=None)
        model.eval()
        init = perturbed(model, 0.05, seed=3)
        dual = ef.DualModel(model, init, readout=2, order="init", dtype=F64, progress=False)
        tokens = torch.randint(0, 7, (10, 3), generator=torch.Generator().manual_seed(4))
        feats = dual.features(tokens)
        top = max_activating(dual, tokens, "blocks.0.attn.head[1]", k=3, batch_size=4, progress=False)
    group = ef.groups.group_positions(feats.ids, "blocks.0.attn.head[1]", n_heads=4)
    assert len(group) == 3 * (16 * 4 + 4) + 16 * 4
    values = feats.dense()[:, group] @ feats.flat_delta()[group]
    idx, _, val = brute_top(values[:, None], 3)
    assert torch.equal(top[0].indices, idx) and torch.allclose(top[0].values, val, atol=1e-12)
    with pytest.raises(ef.ConfigError, match="integer"):
        synthesize(dual, "blocks.0.attn.head[1]", progress=False)


def test_bad_input_gives_clear_errors(setup):
    dual, x, _ = setup
    with pytest.raises(ef.DataError, match="larger than the data"):
        max_activating(dual, x[:3], "0.weight[1,2]", k=10, progress=False)
    with pytest.raises(ef.DataError, match="empty"):
        max_activating(dual, x[:0], "0.weight[1,2]", progress=False)
    with pytest.raises(ef.DataError, match="empty"):
        max_activating(dual, [], "0.weight[1,2]", progress=False)
    with pytest.raises(ef.FeatureIdError, match="Did you mean '0.weight'"):
        max_activating(dual, x, "0.wieght[1,2]", progress=False)
    with pytest.raises(ef.ConfigError, match="by="):
        max_activating(dual, x, "0.weight[1,2]", by="rms", progress=False)
    with pytest.raises(ef.ConfigError, match="returned"):
        max_activating(dual, x, lambda fb: fb.delta_z()[:2], progress=False)
    with pytest.raises(ef.ConfigError, match="cannot search"):
        max_activating(dual, x, [3.5], progress=False)
    with pytest.raises(ef.FeatureIdError, match="not among"):
        max_activating(dual, x, "0.weight[1,2]", k=2, progress=False)["0.weight[1,3]"]
    scalar = ef.DualModel(dual.model, {k: dual.theta_init[k] for k in dual.theta_init}, readout=0, progress=False)
    with pytest.raises(ef.DataError, match="larger than the data"):
        max_activating(scalar, x[:3], "0.weight[1,2]", k=4, progress=False)


# ---- synthesis -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["init", "nlo", "trained", "path"])
def test_directional_value_matches_features_and_its_input_gradient(setup, order):
    dual, x, _ = setup
    feats = dual.features(x[:6], order=order)
    w = {n: torch.zeros_like(p) for n, p in dual.theta_trained.items()}
    w["0.weight"][1, 2], w["2.bias"][0] = 0.7, -0.3
    xs = x[:6].clone().requires_grad_(True)
    value = dual.directional(xs, w, order)
    want = 0.7 * feats.column("0.weight[1,2]") - 0.3 * feats.column("2.bias[0]")
    assert torch.allclose(value.detach(), want, atol=1e-12)
    if order != "init":
        return
    (grad,) = torch.autograd.grad(value[:, 0].sum(), xs)
    ref = torch.zeros_like(grad)  # d/dx of ∂z_0/∂W[1,2] by double backward, one example at a time
    for n in range(6):
        xn = x[n : n + 1].clone().requires_grad_(True)
        params = {k: v.clone().requires_grad_(True) for k, v in dual.theta_init.items()}
        z = functional_call(dual.model, params, (xn,))[0, 0]
        g_w, g_b = torch.autograd.grad(z, [params["0.weight"], params["2.bias"]], create_graph=True)
        (ref[n],) = torch.autograd.grad(0.7 * g_w[1, 2] - 0.3 * g_b[0], xn, allow_unused=True)
    assert torch.allclose(grad, ref, atol=1e-12)


def test_synthesize_raises_the_feature_value(setup):
    dual, x, _ = setup
    top = max_activating(dual, x, "0.weight[1,:]", k=2, progress=False)["0.weight[1,:]"]
    start = x[top.indices].clone()  # the unit is active there, so the ascent has a gradient
    out = synthesize(
        dual,
        "0.weight[1,:]",
        init=start,
        component=0,
        steps=60,
        lr=0.05,
        l2=1e-3,
        tv=1e-3,
        clamp=(-2.0, 2.0),
        progress=False,
    )
    assert out.shape == start.shape and float(out.abs().max()) <= 2.0
    before = dual.directional(start, _group_direction(dual, "0.weight[1,:]"))[:, 0]
    after = dual.directional(out, _group_direction(dual, "0.weight[1,:]"))[:, 0]
    assert bool((after > before).all())
    one = synthesize(dual, "0.weight[1,2]", component=1, steps=5, progress=False, seed=3)
    assert one.shape == (1, 4) and torch.equal(
        one, synthesize(dual, "0.weight[1,2]", component=1, steps=5, progress=False, seed=3)
    )
    with pytest.raises(ef.ConfigError, match="component="):
        synthesize(dual, "0.weight[1,2]", steps=1, progress=False)
    with pytest.raises(ef.ConfigError, match="integer"):
        synthesize(dual, "0.weight[1,2]", init=torch.zeros(1, 4, dtype=torch.long), progress=False)


def _group_direction(dual, gid):
    w = {n: torch.zeros_like(p) for n, p in dual.theta_trained.items()}
    w["0.weight"][1] = dual.delta["0.weight"][1]
    w["0.bias"][1] = dual.delta["0.bias"][1]
    assert gid == "0.weight[1,:]"
    return w
