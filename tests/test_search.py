"""Streaming max-activation search against brute force, and synthetic inputs by gradient ascent."""

from __future__ import annotations

import copy
import math
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


def brute_top(values: torch.Tensor, k: int, largest: bool = True, skip_zeros: bool = True):
    """Top-k of ``[N, K]`` values over (example, component) pairs by one stable sort of everything; exact zeros
    are left out when any value is not zero (and `skip_zeros`)."""
    flat = values.reshape(-1)
    pairs = torch.arange(flat.numel())
    if skip_zeros and bool((flat != 0).any()):
        pairs = pairs[flat != 0]
    order = pairs[torch.sort(flat[pairs], descending=largest, stable=True).indices[:k]]
    return order // values.shape[1], order % values.shape[1], flat[order]


def dense_values(feats, positions, weights) -> torch.Tensor:
    """``[N, K]``: ``Σ_m w_m φ_{p_m}`` from the dense feature matrix."""
    return feats.dense()[:, :, positions] @ weights


@pytest.mark.parametrize("pending", [1, 200, None])  # values held before a merge: every batch, a few, all at the end
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("by", ["value", "contribution"])
def test_streaming_top_k_equals_brute_force(setup, by, largest, pending, monkeypatch):
    if pending is not None:
        monkeypatch.setattr(ef.search, "_PENDING_ELEMENTS", pending)
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
    with pytest.raises(ef.ConfigError, match="unknown by 'rms'"):
        max_activating(dual, x, "0.weight[1,2]", by="rms", progress=False)
    with pytest.raises(ef.ConfigError, match="skip_zeros"):
        max_activating(dual, x, "0.weight[1,2]", skip_zeros=1, progress=False)
    with pytest.raises(ef.ConfigError, match="one direction"):
        max_activating(dual, x, eigenfeatures(dual.features(x), k=1)[0], by="norm", progress=False)
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


# ---- group semantics: signed contributions, exact zeros, norms, positions --------------------------------
def correct_logit(output, batch):
    return output.gather(1, batch[1][:, None])[:, 0]


def test_group_lists_skip_zero_ties_and_the_bottom_list_is_most_negative():
    torch.manual_seed(0)
    model = mlp(5, (6,), 4).to(F64)
    init = perturbed(model, 0.3, seed=5)
    x = torch.randn(60, 5, dtype=F64, generator=torch.Generator().manual_seed(6))
    y = torch.arange(60) % 4
    feats = ef.DualModel(model, init, readout=correct_logit, order="trained", progress=False).features((x, y))
    gid = "2.weight[1,:]"  # the output row of class 1 with its bias: it takes no part in the other classes' logits
    pos = ef.groups.group_positions(feats.ids, gid)
    want = feats.dense()[:, pos] @ feats.flat_delta()[pos]
    assert int((want == 0).sum()) == 45 and bool((want[y == 1] != 0).all())
    top = max_activating(feats, gid, k=20)[gid]
    assert len(top.values) == 15 and bool((top.values != 0).all()) and top.n_zero == 45
    assert torch.allclose(top.values, torch.sort(want[y == 1], descending=True).values, atol=1e-12)
    bottom = max_activating(feats, gid, k=8, largest=False)[gid]
    assert torch.allclose(bottom.values, torch.sort(want[y == 1]).values[:8], atol=1e-12)  # the most negative first
    assert bool((bottom.values < 0).all()) and bottom.n_zero == 45
    plain = max_activating(feats, gid, k=20, skip_zeros=False)[gid]
    idx, _, val = brute_top(want[:, None], 20, skip_zeros=False)
    assert torch.equal(plain.indices, idx) and torch.allclose(plain.values, val, atol=1e-12)
    assert bool((plain.values == 0).any())
    assert plain.n_zero == 45 - int((plain.values == 0).sum())
    back = TopK.from_state(*max_activating(feats, gid, k=20).to_state())
    assert back[gid].n_zero == 45 and "(45 at 0 not listed)" in repr(back)


def test_norm_of_a_group_is_the_norm_of_its_features(setup):
    dual, x, feats = setup
    ids = feats.ids
    groups = {
        "0.weight[3,:]": [ids.index(f"0.weight[3,{j}]") for j in range(4)] + [ids.index("0.bias[3]")],
        "2.weight[:,0]": [ids.index(f"2.weight[{o},0]") for o in range(3)],
        "0.weight": list(range(28)),
        "0.weight[2,1]": [ids.index("0.weight[2,1]")],
    }
    top = max_activating(dual, x, list(groups), k=6, by="norm", batch_size=9, progress=False)
    for gid, pos in groups.items():
        want = feats.dense()[:, :, pos].square().sum(-1).sqrt()
        assert torch.allclose(ef.search.feature_values(feats, gid, by="norm"), want, atol=1e-12)
        idx, comp, val = brute_top(want, 6)
        assert torch.equal(top[gid].indices, idx) and torch.equal(top[gid].components, comp), gid
        assert torch.allclose(top[gid].values, val, atol=1e-12)
    signed = ef.search.feature_values(feats, "0.weight[3,:]", by="value")
    pos = torch.tensor(groups["0.weight[3,:]"])
    assert torch.allclose(signed, feats.dense()[:, :, pos] @ feats.flat_delta()[pos], atol=1e-12)


class TokenModel(nn.Module):
    """Embedding → Linear per position → tanh → flatten → Linear: a readout that reads every position (layers
    wide enough that their factors stay low-rank, one rank term per position)."""

    def __init__(self, vocab: int = 12, d: int = 16, h: int = 16, t: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, h)
        self.out = nn.Linear(t * h, 1)

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.embed(tokens))).flatten(1))


def test_position_values_split_a_group_over_its_sequence_positions():
    torch.manual_seed(0)
    model = TokenModel().to(F64)
    init = perturbed(model, 0.3, seed=7)
    tokens = torch.randint(0, 12, (9, 5), generator=torch.Generator().manual_seed(8))
    feats = ef.DualModel(model, init, readout=0, order="trained", progress=False).features(tokens)
    per_position, shared = ef.search.position_values(feats, "mix.weight[2,:]", by="contribution")
    assert per_position.shape == (9, 1, 5) and shared.shape == (9, 1)
    # by hand: the cotangent δ_t of unit 2's pre-activation at each position, times ΔW_2 · a_t (and Δb_2, shared)
    y = model.mix(model.embed(tokens))
    y.retain_grad()
    model.out(torch.tanh(y).flatten(1)).sum().backward()
    a = model.embed(tokens).detach()
    d_w, d_b = dict(model.named_parameters())["mix.weight"].detach() - init["mix.weight"], (
        dict(model.named_parameters())["mix.bias"].detach() - init["mix.bias"]
    )
    want = y.grad[:, :, 2] * (a @ d_w[2])
    assert torch.allclose(per_position[:, 0], want, atol=1e-12)
    assert torch.allclose(shared[:, 0], y.grad[:, :, 2].sum(1) * d_b[2], atol=1e-12)
    total = ef.search.feature_values(feats, "mix.weight[2,:]", by="contribution")
    assert torch.allclose(per_position.sum(2) + shared, total, atol=1e-12)
    token_row, _ = ef.search.position_values(feats, "embed.weight[4,:]", by="contribution")
    assert bool((token_row[:, 0][tokens != 4] == 0).all()) and bool((token_row[:, 0][tokens == 4] != 0).any())


def test_position_values_fold_the_rank_terms_of_every_quadrature_node():
    torch.manual_seed(0)
    model = TokenModel(d=32, h=32).to(F64)  # 2 nodes × 5 positions of rank terms stay low-rank
    init = perturbed(model, 0.3, seed=7)
    tokens = torch.randint(0, 12, (9, 5), generator=torch.Generator().manual_seed(8))
    feats = ef.DualModel(model, init, readout=0, order="path", nodes=2, progress=False).features(tokens)
    per_position, shared = ef.search.position_values(feats, "mix.weight[2,:]", by="contribution", n_positions=5)
    assert per_position.shape == (9, 1, 5)
    total = ef.search.feature_values(feats, "mix.weight[2,:]", by="contribution")
    assert torch.allclose(per_position.sum(2) + shared, total, atol=1e-12)
    # the split of one weight's value: the quadrature-weighted sum of each node's own split at θ0 + t Δθ
    got, _ = ef.search.position_values(feats, "mix.weight[2,3]", n_positions=5)
    want = torch.zeros_like(got)
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for t, w in zip(*ef.dual.gauss_legendre(2)):
        at_node = copy.deepcopy(model)
        at_node.load_state_dict({k: init[k] + t * (trained[k] - init[k]) for k in trained})
        node = ef.DualModel(at_node, init, readout=0, order="trained", progress=False).features(tokens)
        want += w * ef.search.position_values(node, "mix.weight[2,3]", n_positions=5)[0]
    assert torch.allclose(got, want, atol=1e-12) and bool(got.abs().sum() > 0)
    with pytest.raises(ef.ConfigError, match="n_positions"):
        ef.search.position_values(feats, "mix.weight[2,:]", n_positions=0)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_the_top_k_of_a_batch_is_that_of_the_stable_sort(largest, k):
    """`_stable_top` (candidates by topk, then a stable sort of them) picks exactly what a stable sort of each
    whole row picks, with many ties and infinities."""
    from efffeat.search import _stable_top

    g = torch.Generator().manual_seed(k)
    key = torch.randint(-3, 4, (6, 500), generator=g).to(F64)
    key[0] = 0.0  # one value throughout
    key[1, ::3] = -math.inf
    key[2, ::2] = math.inf
    want = torch.sort(key, dim=1, descending=largest, stable=True).indices[:, :k]
    assert torch.equal(_stable_top(key, k, largest), want)
