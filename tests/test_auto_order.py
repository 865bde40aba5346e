"""An honest dual model: order="auto", the completeness every result carries and its warning, feature passes that
skip the readouts ranking does not need, and batches sized from the memory available."""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import mlp, perturbed
from torch import nn

import efffeat as ef
import efffeat._memory

F64 = torch.float64


def stepped(step: float, act: type[nn.Module] = nn.Tanh, seed: int = 0):
    """A float64 MLP moved `step` (relative to its weights) from its initialisation, and data."""
    torch.manual_seed(seed)
    model = mlp(3, (12, 12), 2, act).to(F64)
    init = perturbed(model, step, seed)
    x = torch.randn(300, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return model, init, x


def test_the_four_orders_stay_concrete_and_auto_is_the_default():
    assert ef.ORDERS == ("init", "nlo", "trained", "path")
    model, init, _ = stepped(0.01)
    dual = ef.DualModel(model, init, progress=False)
    assert dual.order == "auto" and dual.requested_order == "auto" and dual.order_reason is None
    with pytest.raises(ef.ConfigError, match="unknown order 'auto'"):
        dual.features(torch.zeros(2, 3, dtype=F64), order="auto")


def test_auto_keeps_nlo_near_initialisation():
    model, init, x = stepped(0.02)
    dual = ef.DualModel(model, init, progress=False)
    feats = dual.features(x)
    assert dual.order == feats.order == "nlo"
    assert (
        dual.order_reason.startswith("auto: the nlo residual")
        and "≤ 0.1 on the first 256 examples" in dual.order_reason
    )
    first = dual.completeness(x[:256], order="nlo")
    assert dual.order_completeness == pytest.approx(first, rel=1e-9) and first <= 0.1
    assert feats.meta["order_requested"] == "auto" and feats.meta["order_reason"] == dual.order_reason
    assert feats.meta["completeness"] == pytest.approx(feats.completeness(), rel=1e-12)
    assert feats.meta["completeness_examples"] == len(x)


def test_auto_takes_path_with_the_nodes_it_needs_far_from_initialisation():
    model, init, x = stepped(0.6)
    dual = ef.DualModel(model, init, progress=False)
    assert dual.resolve_order(x) == "path"
    probe = x[:256]
    assert dual.completeness(probe, order="nlo") > 0.1
    assert dual.completeness(probe) <= 1e-3  # at the chosen nodes
    fewer = [k for k in (2, 3, 4, 6, 8, 12, 16) if 4 <= k < dual.nodes]
    assert fewer, "the step should need more than the first node count"
    coarser = ef.DualModel(model, init, order="path", nodes=fewer[-1], progress=False)
    assert coarser.completeness(probe) > 1e-3  # the node count before it did not suffice
    assert f"{dual.nodes} nodes" in dual.order_reason and "≤ 0.001" in dual.order_reason
    feats = dual.features(x)
    assert feats.order == "path" and feats.meta["nodes"] == dual.nodes and feats.completeness() <= 1e-3


def test_auto_stops_at_sixteen_nodes_and_says_so():
    """A ReLU net far from initialisation: the path is not smooth, quadrature converges slowly."""
    model, init, x = stepped(1.0, nn.ReLU)
    dual = ef.DualModel(model, init, progress=False)
    dual.resolve_order(x)
    assert dual.order == "path" and dual.nodes == 16
    assert "still above 0.001 at 16 nodes" in dual.order_reason
    assert dual.order_completeness == pytest.approx(dual.completeness(x[:256]), rel=1e-9)


def test_a_poor_order_warns_once_and_names_path():
    """The finding: far from initialisation nlo explains less than init (the demo printed init 1.02, nlo 1.22)."""
    model, init, x = stepped(1.0)
    dual = ef.DualModel(model, init, order="nlo", progress=False)
    with pytest.warns(ef.CompletenessWarning, match=r"'nlo' features leave a completeness residual .* order='path'"):
        feats = dual.features(x, batch_size=100)
    assert feats.meta["completeness"] == pytest.approx(feats.completeness(), rel=1e-12) and feats.completeness() > 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", ef.CompletenessWarning)
        dual.features(x[:50])  # once per order
        ef.DualModel(model, init, order="path", nodes=8, progress=False).features(x)  # path explains it
    an = ef.Analysis(dual, x, features=feats)
    assert any("order='path'" in note for note in an.notes)


def test_resolving_needs_data_and_analysis_decides_on_its_data():
    model, init, x = stepped(0.6)
    dual = ef.DualModel(model, init, progress=False)
    with pytest.raises(ef.ConfigError, match=r"decided on the first data: call dual.resolve_order\(data\)"):
        dual.directional(x[:2], dual.delta)
    an = ef.Analysis(dual, x, n_eigen=0)
    assert an.order == "path" == dual.order and an.order_reason == dual.order_reason
    assert an.table.meta["order"] == "path" and an.features.meta["order_reason"].startswith("auto:")
    assert dual.directional(x[:2], dual.delta).shape == (2, 2)


# ---- only the forwards the job needs ---------------------------------------------------------------------
def count_forwards(dual: ef.DualModel):
    """{"init": forwards at θ0, "other": other forwards} of the model, counted by a hook."""
    counts = {"init": 0, "other": 0}
    first_weight = next(n for n in dual.theta_init if n.endswith("weight"))
    module = dual.model.get_submodule(first_weight.rsplit(".", 1)[0])

    def hook(mod, args):
        counts["init" if mod.weight is dual.theta_init[first_weight] else "other"] += 1

    return counts, module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("order", ["trained", "path"])
def test_a_ranking_pass_makes_no_forward_at_theta0(order):
    model, init, x = stepped(0.3)
    dual = ef.DualModel(model, init, order=order, nodes=2, progress=False)
    full = dual.features(x, batch_size=100)  # the first pass also runs the probe and the plan
    counts, handle = count_forwards(dual)
    try:
        again = dual.features(x, batch_size=100)
        all_counts = dict(counts)
        counts.update(init=0, other=0)
        lean = dual.features(x, batch_size=100, need="features")
    finally:
        handle.remove()
    points = 1 if order == "trained" else 2
    assert all_counts == {"init": 3, "other": 3 * points + (0 if order == "trained" else 3)}
    # the first batch still measures completeness (θ0 and θ* readouts), the other two batches skip them
    assert counts == {"init": 1, "other": 3 * points + (0 if order == "trained" else 1)}
    assert torch.equal(lean.kernel(), again.kernel()) and torch.equal(full.kernel(), again.kernel())
    assert lean.meta["readouts"] == (["trained"] if order == "trained" else [])
    assert lean.meta["completeness"] == pytest.approx(dual.features(x[:100]).completeness(), rel=1e-12)
    with pytest.raises(ef.ConfigError, match=r"without the readout at (init|trained) \(need='features'\).*need='all'"):
        lean.completeness()
    assert "on the first batch" in repr(lean)
    table, lean_table = ef.rank(full, by="contribution"), ef.rank(lean, by="contribution")
    assert list(table.ids) == list(lean_table.ids) and torch.equal(table.scores, lean_table.scores)


# ---- batch sizes from the memory budget -----------------------------------------------------------------------
def test_batches_are_sized_from_the_memory_available(monkeypatch):
    model, init, x = stepped(0.1)
    dual = ef.DualModel(model, init, order="nlo", progress=False)
    roomy = [f.n_examples for f in dual.iter_features(x)]
    assert roomy == [300]  # all of it at once: up to 1024 examples per batch
    activations, k = dual._activations
    per_example = 8 * activations * (3 + k * 2) * 2  # float64, nlo: one point, forward-mode tangents
    with monkeypatch.context() as patch:
        patch.setattr(efffeat._memory, "available_bytes", lambda: int(4 * 40 * per_example))
        tight = list(dual.iter_features(x))
        patch.setattr(efffeat._memory, "available_bytes", lambda: 1)
        assert {f.n_examples for f in dual.iter_features(x[:3])} == {1}
    assert [f.n_examples for f in tight] == [32] * 9 + [12]  # the largest power of two ≤ 40
    torch.testing.assert_close(
        ef.EffectiveFeatures.concat(tight).kernel(), dual.features(x, batch_size=300).kernel(), rtol=1e-12, atol=1e-13
    )


def test_auto_reports_how_slowly_a_kinked_path_converges():
    model, init, x = stepped(0.6, act=nn.ReLU)
    dual = ef.DualModel(model, init, progress=False)
    assert dual.resolve_order(x) == "path" and dual.nodes == 16
    reason = dual.order_reason
    assert "still above 0.001 at 16 nodes" in reason and "nodes would reach it" in reason and "(ReLU)" in reason
    slope = float(reason.split("falls like nodes^")[1].split(",")[0])
    assert -1.5 < slope < -0.5  # first order: σ′ jumps along the path
