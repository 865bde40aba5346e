"""efffeat never changes the user's model, and refuses a model that changed, is random or mixes its examples.

The model's parameters, buffers, ``requires_grad`` flags, per-module modes and hooks are bit-identical after
every public call, also after an error; Δθ is read once and a later change of the model is refused; θ0 is
evaluated with the init state's buffers.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from _models import mlp, perturbed
from torch import nn

import efffeat as ef

HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()},
        "params": [(n, id(p), type(p), p.requires_grad) for n, p in model.named_parameters()],
        "modes": [(n, m.training) for n, m in model.named_modules()],
        "hooks": [(n, [dict(getattr(m, h)) for h in HOOKS]) for n, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["params"] == before["params"]
    assert after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"]
    assert before["state"].keys() == after["state"].keys()
    for key, (tensor, values) in before["state"].items():
        now, _ = after["state"][key]
        assert now is tensor, key
        assert now.dtype == values.dtype and torch.equal(now.detach(), values), key


def trained_bn_model(seed: int = 0) -> tuple[nn.Module, dict, torch.Tensor]:
    """Linear → BatchNorm → Tanh → Dropout → a frozen Linear+BatchNorm block → Linear, trained a few steps in
    training mode (so the running statistics moved), then in eval mode."""
    torch.manual_seed(seed)
    frozen = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2), frozen, nn.Linear(6, 2))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for p in frozen.parameters():
        p.requires_grad_(False)
    x = torch.randn(32, 3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(20):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    return model, init, x[:12]


@pytest.fixture
def bn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ef.FallbackWarning)  # batch norm has no factored rule
        yield trained_bn_model()


def test_every_public_call_leaves_the_model_bit_identical(bn):
    model, init, x = bn
    before = snapshot(model)
    dual = ef.DualModel(model, init, readout="output", order="nlo", nodes=2, progress=False)
    feats = dual.features(x, batch_size=5)
    list(dual.iter_features(x, batch_size=4, need="features"))
    for order in ef.ORDERS:
        dual.completeness(x, order=order)
    dual.predict(x)
    dual.outputs(x, at="init")
    dual.directional(x, dual.delta)
    ef.DualModel.supported(model)
    table = ef.rank(feats, by="contribution", group="neuron")
    ef.max_activating(dual, x, table.ids[:2], k=3, progress=False)
    an = ef.analyse(dual, x, n_eigen=2)
    an.completeness_by_order()
    ef.baselines.neurons(model, x, layer="2")
    auto = ef.DualModel(model, init, readout=0, progress=False)
    auto.features(x)
    ef.DualModel(model, init, dtype=torch.float64, progress=False).features(x)
    assert_unchanged(model, before)


def _fails(fn) -> None:
    with pytest.raises(ef.EfffeatError):
        fn()


def test_the_model_is_bit_identical_after_errors(bn):
    model, init, x = bn
    before = snapshot(model)
    dual = ef.DualModel(model, init, order="nlo", progress=False)
    nan = x.clone()
    nan[3, 1] = float("nan")
    _fails(lambda: dual.features(nan))
    _fails(lambda: dual.features(torch.randn(4, 5)))  # the model rejects the width
    _fails(lambda: ef.DualModel(model, init, readout=lambda out, b: out[:, 9], progress=False).features(x))
    _fails(lambda: ef.DualModel(model, init, readout=lambda out, b: out.detach()[:, 0], progress=False).features(x))
    _fails(lambda: ef.DualModel(model, {**init, "1.running_mean": torch.zeros(5)}))
    _fails(lambda: ef.baselines.neurons(model, x, layer="nope"))
    assert_unchanged(model, before)
    model.train()  # the user switches modes after building: refused before any forward, stats untouched
    before = snapshot(model)
    _fails(lambda: dual.features(x))
    _fails(lambda: dual.completeness(x))
    _fails(lambda: ef.DualModel(model, init))
    assert_unchanged(model, before)


def test_a_training_model_with_a_frozen_eval_block_keeps_its_modes(bn):
    """neurons() used to restore modes with model.train(was_training), turning a frozen batch norm back on."""
    model, init, x = bn
    model.train()
    model[1].eval()
    model[3].eval()
    model[4].eval()
    before = snapshot(model)
    values = ef.baselines.neurons(model, x, layer="2").values
    assert_unchanged(model, before)
    assert not model[4][1].training and model.training
    feats = ef.DualModel(model, init, order="init", progress=False).features(x)  # nothing random in train mode
    assert_unchanged(model, before)
    with torch.no_grad():
        model.eval()
        assert torch.equal(values, torch.tanh(model[1](model[0](x))))
    assert feats.n_examples == len(x)


def test_init_buffers_are_used_at_theta0_and_checked(bn):
    model, init, x = bn
    at_init = copy.deepcopy(model)
    at_init.load_state_dict(init)
    dual = ef.DualModel(model, init, order="nlo", progress=False)
    want = at_init(x)
    assert float((dual.outputs(x, at="init") - want).abs().max()) <= 1e-6
    assert float((dual.features(x).z_init - want).abs().max()) <= 1e-6
    # the model's own (trained) running statistics are not θ0's: the old behaviour was off by this much
    params_only = {k: v for k, v in init.items() if "running" not in k and "num_batches" not in k}
    with pytest.warns(UserWarning, match=r"no entry for the buffer\(s\) 1.running_mean"):
        stale = ef.DualModel(model, params_only, order="nlo", progress=False)
    assert float((stale.outputs(x, at="init") - want).abs().max()) > 1e-2
    with pytest.raises(ef.InitStateError, match=r"init buffer '1.running_mean' has shape \(5,\)"):
        ef.DualModel(model, {**init, "1.running_mean": torch.zeros(5)})


# ---- Δθ is read once ----------------------------------------------------------------------------------------
def test_one_more_optimiser_step_after_building_is_refused():
    torch.manual_seed(0)
    model = mlp(3, (8,), 2)
    init = perturbed(model, 0.3)
    x = torch.randn(20, 3)
    dual = ef.DualModel(model, init, order="nlo", progress=False)
    first = dual.features(x).completeness()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()
    for call in (dual.features, dual.completeness, dual.predict, lambda d: dual.directional(d, dual.delta)):
        with pytest.raises(ef.ConfigError, match=r"model changed since this DualModel was built \(parameter 0.weight"):
            call(x)
    fresh = ef.DualModel(model, init, order="nlo", progress=False).features(x)
    assert fresh.completeness() != first


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m[0].weight.data.add_(1e-3),  # bypasses the version counter
        lambda m: m.load_state_dict({k: v + 1 for k, v in m.state_dict().items()}),
        lambda m: setattr(m[2], "bias", nn.Parameter(m[2].bias.detach().clone())),  # same values, a new tensor
    ],
)
def test_any_change_of_the_parameters_is_caught(edit):
    torch.manual_seed(0)
    model = mlp(3, (4,), 2)
    dual = ef.DualModel(model, perturbed(model, 0.1), order="init", progress=False)
    with torch.no_grad():
        edit(model)
    with pytest.raises(ef.ConfigError, match="build a new ef.DualModel"):
        dual.features(torch.randn(3, 3))


def test_a_change_between_the_batches_of_one_call_is_caught_at_the_next_batch_or_call():
    torch.manual_seed(0)
    model = mlp(3, (4,), 2)
    dual = ef.DualModel(model, perturbed(model, 0.1), order="init", progress=False)
    x = torch.randn(12, 3)

    def batches(edit):
        for i, xb in enumerate(x.split(4)):
            if i == 1:
                with torch.no_grad():
                    edit()
            yield xb

    # an in-place step moves the version counter: refused before the second batch is computed
    with pytest.raises(ef.ConfigError, match=r"model changed since this DualModel was built \(parameter 0.weight"):
        list(dual.iter_features(batches(lambda: model[0].weight.add_(1e-3))))
    dual = ef.DualModel(model, perturbed(model, 0.1), order="init", progress=False)
    # a write through .data does not: the call runs on, and the next call refuses the model
    list(dual.iter_features(batches(lambda: model[0].weight.data.add_(1e-3))))
    with pytest.raises(ef.ConfigError, match="build a new ef.DualModel"):
        dual.features(x)


def test_the_dual_model_does_not_share_storage_with_the_user_parameters():
    torch.manual_seed(0)
    model = mlp(3, (4,), 2)
    dual = ef.DualModel(model, perturbed(model, 0.1), order="init", progress=False)
    for name, p in model.named_parameters():
        assert dual.theta_trained[name].data_ptr() != p.data_ptr() and torch.equal(dual.theta_trained[name], p)


# ---- random or batch-coupled models --------------------------------------------------------------------------
def eval_mlp_with(*middle: nn.Module) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), *middle, nn.Linear(16, 2))
    return model.eval(), perturbed(model, 0.3)


def test_a_dropout_child_left_in_training_mode_is_refused():
    """The finding: model.eval() but one Dropout(0.005) child in train mode gave kernels differing by 3.87."""
    model, init = eval_mlp_with(nn.Dropout(0.005))
    model[2].train()
    before = snapshot(model)
    with pytest.raises(ef.UnsupportedModelError, match=r"training mode \(2\) — 2: Dropout\(p=0.005\).*model.eval"):
        ef.DualModel(model, init)
    model[2].eval()
    dual = ef.DualModel(model, init, order="nlo", progress=False)
    model[2].train()  # switched back after building: refused at the next call
    with pytest.raises(ef.UnsupportedModelError, match="Dropout"):
        dual.features(torch.randn(8, 3))
    assert_unchanged(model, before)


def test_large_dropout_gets_the_dropout_message_not_a_vmap_one():
    model, init = eval_mlp_with(nn.Dropout(0.5))
    model[2].train()
    with pytest.raises(ef.UnsupportedModelError, match="Dropout") as info:
        ef.DualModel(model, init)
    assert "vmap" not in str(info.value)


def test_batch_norm_without_running_statistics_in_eval_mode_is_refused():
    """The finding: batch size 256 vs 4 changed the kernel by 12.1 and completeness from 0.042 to 0.794."""
    model, init = eval_mlp_with(nn.BatchNorm1d(16, affine=False, track_running_stats=False))
    with pytest.raises(ef.UnsupportedModelError, match="2: BatchNorm1d has no running statistics"):
        ef.DualModel(model, init)


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(F.dropout(torch.tanh(self.lin(x)), 0.05, training=True))


def test_functional_dropout_is_caught_by_the_double_evaluation_without_drawing_the_users_numbers():
    model = FunctionalDropout()
    dual = ef.DualModel(model, perturbed(model, 0.1), order="nlo", progress=False)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with pytest.raises(
        ef.UnsupportedModelError, match=r"not deterministic.*first at module '<root>' \(FunctionalDropout\)"
    ):
        dual.features(torch.randn(64, 3, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.get_rng_state(), state)


class CentreOverBatch(nn.Module):
    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def test_a_layer_mixing_the_examples_of_a_batch_is_named():
    model, init = eval_mlp_with(CentreOverBatch())
    with pytest.raises(
        ef.UnsupportedModelError, match=r"depends on the other examples.*module '2' \(CentreOverBatch\)"
    ):
        ef.DualModel(model, init, order="init", progress=False).features(torch.randn(16, 3))


class CountingBuffer(nn.Module):
    """Writes its buffer in every forward (a custom running statistic)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x


def test_a_forward_that_writes_its_buffers_is_refused_and_the_buffer_restored():
    model, init = eval_mlp_with(CountingBuffer())
    before = snapshot(model)
    with pytest.raises(ef.UnsupportedModelError, match=r"writes its buffers in its forward \(2.calls\)"):
        ef.DualModel(model, init, order="init", progress=False).features(torch.randn(4, 3))
    assert_unchanged(model, before)


def test_a_forward_that_edits_its_parameters_in_place_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4, max_norm=0.5), nn.Flatten(), nn.Linear(12, 1))
    init = perturbed(model, 0.5)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ef.FallbackWarning)
        dual = ef.DualModel(model, init, order="init", progress=False)
        with pytest.raises(ef.UnsupportedModelError, match=r"changes its parameters in place.*0 \(Embedding\)"):
            dual.features(torch.randint(0, 6, (5, 3)))
    assert_unchanged(model, before)
