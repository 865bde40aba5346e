"""Effective features of every order against per-example autograd references (docs/MATH.md §5, checks 1, 2, 6)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import LinearTwice, RawTMS, Scale, TiedTMS, bridge, init_params, mlp, params_of, perturbed
from _reference import reference_features, rel_err
from torch import nn

import efffeat as ef

ORDERS = ["init", "nlo", "trained", "path"]
F64 = torch.float64


def last_logits(out):
    return out[:, -1]


def check(model, init, x, readout, ref_readout, order, tol, dtype=F64, nodes=3, expect_fallback=False):
    if dtype is not None:
        model = model.to(dtype)
        init = {k: v.to(dtype) if v.is_floating_point() else v for k, v in init.items()}
        x = x.to(dtype) if x.is_floating_point() else x
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dual = ef.DualModel(model, init, readout=readout, order=order, nodes=nodes, progress=False)
        feats = dual.features(x, batch_size=3)
    fell_back = any(issubclass(w.category, ef.FallbackWarning) for w in caught)
    assert fell_back == expect_fallback, [str(w.message) for w in caught]
    ref = reference_features(model, init_params(model, init), params_of(model), x, ref_readout, order, nodes)
    dense = feats.dense()
    if feats.scalar:
        dense = dense[:, None]
    assert dense.shape == ref.shape
    assert rel_err(dense, ref) <= tol
    return dual, feats, ref


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU, nn.GELU])
def test_mlp_vector_readout(order, act):
    torch.manual_seed(0)
    model = mlp(4, (6, 5), 3, act)
    init = perturbed(model, 0.3)
    x = torch.randn(7, 4)
    check(model, init, x, "output", lambda out: out, order, 1e-10)


@pytest.mark.parametrize("order", ORDERS)
def test_mlp_scalar_readouts(order):
    torch.manual_seed(1)
    model = mlp(3, (5,), 2, nn.Tanh)
    init = perturbed(model, 0.3)
    x = torch.randn(5, 3)
    _, feats, _ = check(model, init, x, 1, lambda out: out[:, 1:2], order, 1e-10)
    assert feats.scalar and feats.dense().ndim == 2
    # a callable readout returning [N]
    check(
        model,
        init,
        x,
        lambda out, batch: out[:, 0] * out[:, 1],
        lambda out: (out[:, 0] * out[:, 1])[:, None],
        order,
        1e-10,
    )


@pytest.mark.parametrize("order", ORDERS)
def test_tied_transposed_linear_is_factored(order):
    torch.manual_seed(2)
    model = TiedTMS(5, 2)
    with torch.no_grad():
        model.decoder.bias.fill_(0.2)
    init = perturbed(model, 0.2)
    x = torch.rand(6, 5)
    dual, feats, _ = check(model, init, x, "output", lambda out: out, order, 1e-10)
    assert dual.fallback_params == []
    assert isinstance(feats.factors["encoder.weight"], ef.LowRankFactor | ef.DenseFactor)


@pytest.mark.parametrize("order", ORDERS)
def test_raw_parameter_tms_uses_fallback(order):
    torch.manual_seed(3)
    model = RawTMS(5, 2)
    with torch.no_grad():
        model.b.fill_(0.1)
    init = perturbed(model, 0.2)
    x = torch.rand(6, 5)
    dual, _, _ = check(model, init, x, "output", lambda out: out, order, 1e-10, expect_fallback=True)
    assert dual.fallback_params == ["W", "b"]


@pytest.mark.parametrize("order", ORDERS)
def test_custom_module_fallback_next_to_factored_layers(order):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Tanh(), nn.Linear(4, 2))
    init = perturbed(model, 0.2)
    x = torch.randn(5, 3)
    dual, _, _ = check(model, init, x, "output", lambda out: out, order, 1e-10, expect_fallback=True)
    assert dual.fallback_params == ["1.s"]


def test_weight_used_outside_its_layer_is_detected():
    torch.manual_seed(5)
    model = LinearTwice(3)
    init = perturbed(model, 0.2)
    x = torch.randn(4, 3)
    dual, _, _ = check(model, init, x, "output", lambda out: out, "nlo", 1e-10, expect_fallback=True)
    assert dual.fallback_params == ["lin.weight"]


@pytest.mark.parametrize("order", ORDERS)
def test_embedding_with_padding_and_sequences(order):
    torch.manual_seed(6)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4, padding_idx=0)
            self.ln = nn.LayerNorm(4)
            self.lin = nn.Linear(4, 3)

        def forward(self, t):
            return self.lin(torch.tanh(self.ln(self.emb(t)))).sum(dim=1)

    model = Tokens()
    init = perturbed(model, 0.2)
    # the padding row is a constant in PyTorch (zero gradient), so training never moves it
    init["emb.weight"][0] = model.emb.weight.detach()[0]
    x = torch.randint(0, 7, (5, 4))
    x[0, 0] = 0
    check(model, init, x, "output", lambda out: out, order, 1e-10)


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("order", ORDERS)
def test_transformer_bridge_float32(n_layers, order):
    model = bridge(n_layers=n_layers, d_vocab=5)
    init = perturbed(model, 0.02, seed=n_layers)
    x = torch.randint(0, 5, (3, 3), generator=torch.Generator().manual_seed(0))
    dual, feats, _ = check(model, init, x, "output", last_logits, order, 1e-4, dtype=None, nodes=2)
    assert dual.fallback_params == []
    assert feats.ids[0].startswith("embed.weight[")
    assert "blocks.0.attn.q.weight" in {s.state_name for s in feats.slots}


def test_transformer_bridge_float64_nlo():
    model = bridge(n_layers=1)
    init = perturbed(model, 0.05, seed=3)
    x = torch.randint(0, 11, (3, 3), generator=torch.Generator().manual_seed(1))
    check(model, init, x, 2, lambda out: out[:, -1, 2:3], "nlo", 1e-9)


def test_kernel_equals_jacobian_gram():
    torch.manual_seed(7)
    model = mlp(4, (6, 6), 2, nn.Tanh).to(F64)
    init = perturbed(model, 0.2)
    x, x2 = torch.randn(6, 4, dtype=F64), torch.randn(4, 4, dtype=F64)
    for order in ORDERS:
        dual = ef.DualModel(model, init, readout="output", order=order, progress=False)
        f1, f2 = dual.features(x, batch_size=4), dual.features(x2)
        j1, j2 = f1.dense(), f2.dense()
        assert rel_err(f1.kernel(f2), torch.einsum("nkp,mlp->nkml", j1, j2)) <= 1e-10
        assert rel_err(f1.kernel(), torch.einsum("nkp,mlp->nkml", j1, j1)) <= 1e-10
        # layerwise kernel: one parameter tensor
        s = f1.ids.slot("2.weight")
        js = j1[..., s.offset : s.offset + s.numel]
        assert rel_err(f1.kernel(params=["2.weight"]), torch.einsum("nkp,mlp->nkml", js, js)) <= 1e-10
        scalar = ef.DualModel(model, init, readout=0, order=order, progress=False)
        assert scalar.features(x).kernel().shape == (6, 6)


def test_products_columns_and_contributions_match_dense():
    torch.manual_seed(8)
    model = mlp(3, (5,), 2, nn.Tanh).to(F64)
    init = perturbed(model, 0.3)
    x = torch.randn(9, 3, dtype=F64)
    feats = ef.DualModel(model, init, readout="output", order="nlo", progress=False).features(x, batch_size=4)
    dense = feats.dense()
    v = torch.randn(feats.n_features, dtype=F64)
    u = torch.randn(9, 2, dtype=F64)
    assert rel_err(feats.matvec(v), dense @ v) <= 1e-12
    assert rel_err(feats.rmatvec(u), torch.einsum("nk,nkp->p", u, dense)) <= 1e-12
    ids = ["0.weight[3,1]", "0.bias[4]", "2.weight[1,4]"]
    pos = [feats.ids.index(i) for i in ids]
    assert pos == [10, 19, 29]
    assert torch.equal(feats.columns(ids), dense[:, :, pos])
    assert torch.equal(feats.column("0.bias[4]"), dense[:, :, 19])
    d = feats.flat_delta()
    assert rel_err(feats.contributions(ids), dense[:, :, pos] * d[pos]) <= 1e-15
    assert rel_err(feats.sq_sums(), dense.square().sum(dim=(0, 1))) <= 1e-12
    # Σ_μ c_μ(x) equals the dual model's linear term
    total = (dense * d).sum(-1)
    assert rel_err(total, feats.prediction() - feats.z_init) <= 1e-12


def test_ids_are_readable_and_round_trip():
    model = mlp(3, (5,), 2)
    dual = ef.DualModel(model, perturbed(model, 0.1), progress=False)
    ids = dual.ids
    assert len(ids) == 3 * 5 + 5 + 5 * 2 + 2
    assert ids[0] == "0.weight[0,0]" and ids[16] == "0.bias[1]" and ids[-1] == "2.bias[1]"
    assert all(ids.index(ids[i]) == i for i in range(len(ids)))
    with pytest.raises(ef.FeatureIdError, match="Did you mean '0.weight'"):
        ids.index("0.weigth[1,1]")
    with pytest.raises(ef.FeatureIdError, match="out of range"):
        ids.index("0.weight[5,0]")


# ---- the capture: cotangents at the layer outputs themselves ------------------------------------------------------
class Reused(nn.Module):
    """One Linear called twice (tied by reuse), an in-place op on its output, and outputs that are views."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.seq = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        h = self.lin(h)  # second call of the same module
        h[:, :2].mul_(2.0)  # in place, through a view, after the layer returned
        s = self.seq(h[:, None, :].expand(-1, 3, -1))  # [N, 3, 6], a view of a matmul over the expanded input
        s = nn.functional.relu(s, inplace=True)
        return self.out(s.mean(1))


@pytest.mark.parametrize("order", ORDERS)
def test_capture_with_reuse_in_place_ops_and_views(order):
    torch.manual_seed(9)
    model = Reused()
    init = perturbed(model, 0.2)
    dual, _, _ = check(model, init, torch.randn(5, 4), "output", lambda out: out, order, 1e-10)
    assert dual.fallback_params == []


def test_capture_inside_no_grad_and_inference_of_the_user():
    torch.manual_seed(10)
    model = mlp(3, (4,), 2, nn.Tanh).to(F64)
    init = perturbed(model, 0.2)
    x = torch.randn(5, 3, dtype=F64)
    expected = ef.DualModel(model, init, order="nlo", progress=False).features(x).dense()
    with torch.no_grad():
        got = ef.DualModel(model, init, order="nlo", progress=False).features(x).dense()
    assert torch.equal(got, expected)


class SequenceFirst(nn.Module):
    """A Linear over a sequence-first layout [T, N, d]: its output's leading axis is not the examples'."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):  # x [N, 4]
        s = torch.tanh(self.seq(x[None].expand(3, -1, -1) * torch.arange(1.0, 4.0)[:, None, None]))
        return self.out(s.mean(0))


def test_a_layer_whose_leading_axis_is_not_the_examples_falls_back_even_when_sizes_coincide():
    torch.manual_seed(11)
    model = SequenceFirst()
    init = perturbed(model, 0.2)
    # batches of 3 examples, as long as the sequence: only distinct per-example weights in the first-batch check
    # tell the sequence axis from the examples
    dual, _, _ = check(model, init, torch.randn(5, 4), "output", lambda out: out, "nlo", 1e-10, expect_fallback=True)
    assert dual.fallback_params == ["seq.weight", "seq.bias"]
