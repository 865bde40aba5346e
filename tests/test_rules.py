"""The rule registry from the outside: a user's own rule, refusing unsupported layers, and the coverage report."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import Scale, init_params, params_of, perturbed
from _reference import reference_features, rel_err
from torch import nn

import efffeat as ef

F64 = torch.float64


class Gain(nn.Module):
    """``y = x ⊙ g + c`` on the last axis: a custom module no built-in rule knows."""

    def __init__(self, d: int):
        super().__init__()
        self.g = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.c = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return x * self.g + self.c


@ef.register_rule(Gain)
class GainRule(ef.Rule):
    """Per example ``∂z/∂g = Σ_t δ_t ⊙ x_t``, ``∂z/∂c = Σ_t δ_t`` (t: every leading position)."""

    def claims(self, module):
        return {"g": module.g, "c": module.c}

    def terms(self, module, rec, delta):
        n, k, d = delta.shape[0], delta.shape[1], delta.shape[-1]
        dd = delta.reshape(n, k, -1, d)
        return {
            "g": ef.DenseFactor((dd * rec.reshape(n, 1, -1, d)).sum(2)),
            "c": ef.DenseFactor(dd.sum(2)),
        }


def gain_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), Gain(6), nn.Tanh(), nn.Linear(6, 2)).to(F64)


@pytest.mark.parametrize("order", ["init", "nlo", "trained", "path"])
def test_a_user_rule_gives_exact_factored_features_without_fallback(order):
    model = gain_net()
    init = perturbed(model, 0.3)
    x = torch.randn(7, 4, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ef.FallbackWarning)
        dual = ef.DualModel(model, init, readout="output", order=order, nodes=3, progress=False)
        feats = dual.features(x, batch_size=3)
    assert dual.fallback_params == []
    ref = reference_features(model, init_params(model, init), params_of(model), x, lambda out: out, order, 3)
    assert rel_err(feats.dense(), ref) <= 1e-10
    assert ef.DualModel.supported(model).fallback == {}
    assert "via GainRule" in ef.DualModel.supported(model).factored["1.g"]


def test_fail_mode_error_names_the_unsupported_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Linear(4, 1)).to(F64)
    init = perturbed(model, 0.1)
    x = torch.randn(5, 3, dtype=F64)
    with pytest.raises(ef.UnsupportedModelError, match=r"1 \(Scale\): s.*register_rule"):
        ef.DualModel(model, init, fail_mode="error", progress=False).features(x)
    with pytest.warns(ef.FallbackWarning, match=r"1 \(Scale\)"):
        ef.DualModel(model, init, progress=False).features(x)
    with pytest.raises(ef.ConfigError, match="fail_mode"):
        ef.DualModel(model, init, fail_mode="ignore")


def test_supported_lists_coverage_before_any_run():
    model = nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3), Scale(3), nn.Linear(3, 2))
    report = ef.DualModel.supported(model)
    assert sorted(report.factored) == ["0.weight", "1.bias", "1.weight", "3.bias", "3.weight"]
    assert report.fallback == {"2.s": "2 (Scale): no rule for this module type"}
    assert "5 parameter tensors factored, 1 by the fallback" in str(report)


def test_register_rule_refuses_what_is_not_a_rule_or_a_module_type():
    with pytest.raises(TypeError, match="subclass of efffeat.Rule"):
        ef.register_rule(Gain)(object)
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        ef.register_rule(int)(GainRule)
    with pytest.raises(TypeError, match="at least one"):
        ef.register_rule()


def test_subclass_rules_follow_the_mro_only_when_asked():
    from efffeat.rules import rule_for

    class MyGain(Gain):
        pass

    assert rule_for(Gain(2)) is not None and rule_for(MyGain(2)) is None
    ef.register_rule(Gain, subclasses=True)(GainRule)
    try:
        assert isinstance(rule_for(MyGain(2)), GainRule)
    finally:
        ef.register_rule(Gain)(GainRule)
    assert rule_for(MyGain(2)) is None
