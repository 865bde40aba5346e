"""The dual regression model: completeness by order (docs/MATH.md §5, checks 3, 4, 5) and its invariants."""

from __future__ import annotations

import pytest
import torch
from _models import bridge, mlp, perturbed
from torch import nn

import efffeat as ef

F64 = torch.float64


def trained_tanh_mlp(seed: int = 0, steps: int = 200):
    torch.manual_seed(seed)
    model = mlp(3, (16, 16), 1, nn.Tanh).to(F64)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(64, 3, dtype=F64)
    y = torch.sin(x.sum(1, keepdim=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    return model, init, x


def test_two_layer_linear_net_is_exactly_quadratic():
    torch.manual_seed(0)
    model = mlp(4, (5,), 3, nn.Identity, bias=True).to(F64)
    init = perturbed(model, 0.5)
    x = torch.randn(20, 4, dtype=F64)
    res = {o: ef.DualModel(model, init, order=o, progress=False).completeness(x) for o in ef.ORDERS}
    assert res["nlo"] <= 1e-12
    assert res["path"] <= 1e-12  # Gauss–Legendre is exact for the quadratic path
    assert res["init"] > 1e-2 and res["trained"] > 1e-2


def test_path_with_eight_nodes_on_a_trained_tanh_mlp():
    model, init, x = trained_tanh_mlp()
    dual = ef.DualModel(model, init, readout=0, order="path", nodes=8, progress=False)
    assert dual.completeness(x) <= 1e-8
    assert dual.features(x).completeness() <= 1e-8


def test_nlo_beats_init_and_trained_on_a_small_step():
    model, init, x = trained_tanh_mlp(steps=20)
    res = {o: ef.DualModel(model, init, readout=0, order=o, progress=False).completeness(x) for o in ef.ORDERS}
    assert res["nlo"] < res["init"] and res["nlo"] < res["trained"]
    assert res["path"] < res["nlo"]


def test_residual_scaling_with_the_step():
    """Halving Δθ divides the init/trained residual by ~4 and the nlo residual by ~8 (absolute norms)."""
    torch.manual_seed(1)
    model = mlp(3, (8,), 2, nn.Tanh).to(F64)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    direction = {k: torch.randn_like(v) for k, v in theta0.items()}
    x = torch.randn(16, 3, dtype=F64)

    def residual(order: str, eps: float) -> float:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(theta0[name] + eps * direction[name])
        feats = ef.DualModel(model, theta0, order=order, progress=False).features(x)
        return float(feats.residual().norm())

    for order, factor in [("init", 4), ("trained", 4), ("nlo", 8)]:
        ratio = residual(order, 0.02) / residual(order, 0.01)
        assert factor * 0.8 < ratio < factor * 1.25, (order, ratio)


@pytest.mark.parametrize("order", ef.ORDERS)
def test_directional_and_factored_dual_models_agree(order):
    model, init, x = trained_tanh_mlp(seed=2, steps=30)
    dual = ef.DualModel(model, init, readout="output", order=order, nodes=3, progress=False)
    feats = dual.features(x, batch_size=10)
    assert torch.allclose(dual.predict(x, batch_size=7), feats.prediction(), rtol=1e-10, atol=1e-12)
    assert dual.completeness(x) == pytest.approx(feats.completeness(), rel=1e-8)
    assert torch.allclose(dual.outputs(x), feats.z_trained, rtol=1e-13, atol=1e-15)
    assert torch.allclose(dual.outputs(x, at="init"), feats.z_init, rtol=1e-13, atol=1e-15)


def test_contributions_sum_to_the_output_change_for_path():
    model, init, x = trained_tanh_mlp(seed=3, steps=50)
    feats = ef.DualModel(model, init, readout=0, order="path", nodes=8, progress=False).features(x)
    total = feats.contributions(list(range(feats.n_features))).sum(-1)
    assert torch.allclose(total, feats.delta_z(), atol=1e-8)


def test_data_forms_and_batch_size_give_the_same_features():
    model, init, x = trained_tanh_mlp(seed=4, steps=10)
    dual = ef.DualModel(model, init, readout=0, order="nlo", progress=False)
    ref = dual.features(x, batch_size=64).dense()
    y = torch.zeros(len(x))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    for data, bs in [(x, 7), ((x, y), 13), (loader, 1), ([x[:30], x[30:]], 1)]:
        assert torch.allclose(dual.features(data, batch_size=bs).dense(), ref, rtol=1e-12, atol=1e-14)


def test_the_model_is_left_untouched():
    model = bridge(n_layers=1, d_vocab=5)
    init = perturbed(model, 0.05)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    x = torch.randint(0, 5, (4, 3))
    ef.DualModel(model, init, order="nlo", progress=False).features(x)
    for n, p in model.named_parameters():
        assert p is before[n][0] and isinstance(p, nn.Parameter) and torch.equal(p, before[n][1])


def test_float64_copy_and_readout_with_targets():
    torch.manual_seed(5)
    model = mlp(3, (6,), 4, nn.ReLU)
    init = perturbed(model, 0.1)
    x, y = torch.randn(10, 3), torch.randint(0, 4, (10,))

    def correct_logit(out, batch):
        return out.gather(1, batch[1][:, None])[:, 0]

    dual = ef.DualModel(model, init, readout=correct_logit, order="trained", dtype=F64, progress=False)
    feats = dual.features((x, y), batch_size=4)
    assert feats.dtype == F64 and feats.scalar and feats.dense().shape == (10, dual.n_features)
    assert next(model.parameters()).dtype == torch.float32  # the user's model is not cast
    assert torch.allclose(feats.z_trained[:, 0], model(x).gather(1, y[:, None])[:, 0].double(), atol=1e-6)


def test_a_model_that_cannot_be_copied_for_another_dtype_gets_a_clear_error():
    model = mlp(3, (4,), 1)
    init = perturbed(model, 0.1)
    model.cache = torch.ones(2, requires_grad=True) * 2  # a non-leaf tensor kept from some earlier graph
    with pytest.raises(ef.UnsupportedModelError, match=r"model.to\(torch.float64\)"):
        ef.DualModel(model, init, dtype=F64)
    assert ef.DualModel(model, init).dtype == torch.float32
