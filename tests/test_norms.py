"""Per-example gradient norms (`EffectiveFeatures.sq_norms`, `ef.per_example_norms`) against the norms of
plain-autograd per-example gradients (float64)."""

from __future__ import annotations

import pytest
import torch
from _models import bridge, init_params, mlp, params_of, perturbed
from _reference import reference_features
from torch import nn

import efffeat as ef

F64 = torch.float64


def reference_sq_norms(model, init, x, readout, order, names=None):
    """``[N, K]`` squared norms of the per-example features over the tensors `names` (all if None)."""
    j = reference_features(model, init_params(model, init), params_of(model), x, readout, order, 3)
    if names is None:
        return j.square().sum(-1)
    offsets, start = {}, 0
    for n, p in model.named_parameters():
        offsets[n] = (start, start + p.numel())
        start += p.numel()
    return sum(j[..., slice(*offsets[n])].square().sum(-1) for n in names)


def close(a, b, tol=1e-12):
    return float((a - b).norm()) <= tol * float(b.norm())


@pytest.mark.parametrize("order", ["init", "nlo", "trained", "path"])
@pytest.mark.parametrize("readout", ["output", 0])
def test_mlp_sq_norms(order, readout):
    torch.manual_seed(0)
    model = mlp(4, (6, 5), 3, nn.Tanh).to(F64)
    init = perturbed(model, 0.2)
    x = torch.randn(7, 4, dtype=F64)
    ref_readout = (lambda out: out) if readout == "output" else (lambda out: out[:, :1])
    feats = ef.DualModel(model, init, readout=readout, order=order, nodes=3, progress=False).features(x, batch_size=3)
    want = reference_sq_norms(model, init, x, ref_readout, order)
    got = feats.sq_norms()
    assert got.shape == ((7, 3) if readout == "output" else (7,))
    assert close(got if readout == "output" else got[:, None], want)
    parts = feats.sq_norms(by_tensor=True)
    assert list(parts) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert close(sum(parts.values()), got)
    layer = reference_sq_norms(model, init, x, ref_readout, order, ["2.weight", "2.bias"])
    sub = feats.sq_norms(params=["2.weight", "2.bias"])
    assert close(sub if readout == "output" else sub[:, None], layer)


@pytest.mark.parametrize("order", ["trained", "nlo"])
def test_sequence_and_embedding_sq_norms_of_a_transformer_bridge(order):
    model = bridge(n_layers=1).to(F64)
    init = perturbed(model, 0.05, seed=1)
    x = torch.randint(0, 11, (5, 3), generator=torch.Generator().manual_seed(2))

    def last(out):
        return out[:, -1, :4]

    feats = ef.DualModel(model, init, readout=lambda out, batch: last(out), order=order, progress=False).features(x)
    assert close(feats.sq_norms(), reference_sq_norms(model, init, x, last, order))
    parts = feats.sq_norms(by_tensor=True)
    assert "embed.weight" in parts and "blocks.0.attn.q.weight" in parts
    name = {s.state_name: s.name for s in feats.slots}["embed.weight"]
    assert close(parts["embed.weight"], reference_sq_norms(model, init, x, last, order, [name]))


def test_per_example_norms_stream_and_group():
    torch.manual_seed(3)
    model = mlp(3, (5,), 2, nn.Tanh).to(F64)
    init = perturbed(model, 0.3)
    x = torch.randn(9, 3, dtype=F64)
    dual = ef.DualModel(model, init, readout="output", order="trained", progress=False)
    want = reference_sq_norms(model, init, x, lambda out: out, "trained")
    total = ef.per_example_norms(dual, x, batch_size=4)
    assert total.shape == (9, 2) and close(total.square(), want)
    layer = ef.per_example_norms(dual, x, group="0.weight", batch_size=2)
    assert close(layer.square(), reference_sq_norms(model, init, x, lambda out: out, "trained", ["0.weight"]))
    both = ef.per_example_norms(dual, x, group=["0.weight", "0.bias"])
    assert close(both.square(), reference_sq_norms(model, init, x, lambda out: out, "trained", ["0.weight", "0.bias"]))
    per = ef.per_example_norms(dual, x, group="module", batch_size=5)
    assert set(per) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert close(sum(t.square() for t in per.values()), want)
    scalar = ef.DualModel(model, init, readout=1, order="nlo", progress=False)
    ref = reference_sq_norms(model, init, x, lambda out: out[:, 1:], "nlo")[:, 0]
    assert close(ef.per_example_norms(scalar, x, batch_size=4).square(), ref)


def test_per_example_norms_check_the_group_before_any_work():
    model = mlp(3, (5,), 2)
    dual = ef.DualModel(model, perturbed(model, 0.1), progress=False)
    not_data = object()  # would fail only once streaming started
    with pytest.raises(ef.FeatureIdError, match="0.wieght"):
        ef.per_example_norms(dual, not_data, group="0.wieght")
    with pytest.raises(ef.ConfigError, match="group must be"):
        ef.per_example_norms(dual, not_data, group=[])
    with pytest.raises(ef.ConfigError, match="batch_size"):
        ef.per_example_norms(dual, not_data, batch_size=0)
