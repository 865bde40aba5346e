"""`Analysis`: each result computed once, and the journey features → rank → search → dashboard → report in one pass."""

from __future__ import annotations

import collections

import pytest
import torch
from _models import trained_digits_mlp

import efffeat as ef
from efffeat.dual import DualModel
from efffeat.zoo.digits import correct_logit


@pytest.fixture
def counted(monkeypatch):
    """A digits MLP's DualModel whose feature passes and completeness calls are counted."""
    model, init, x, y = trained_digits_mlp(120, torch.nn.ReLU, steps=30)
    dual = ef.DualModel(model, init, readout=correct_logit, order="nlo", progress=False)
    calls: collections.Counter = collections.Counter()
    iter_features, completeness = DualModel.iter_features, DualModel.completeness

    def counting_iter(self, *args, **kwargs):
        calls["feature passes"] += 1
        return iter_features(self, *args, **kwargs)

    def counting_completeness(self, data, batch_size=256, order=None):
        calls[f"completeness {order or self.order}"] += 1
        return completeness(self, data, batch_size, order)

    monkeypatch.setattr(DualModel, "iter_features", counting_iter)
    monkeypatch.setattr(DualModel, "completeness", counting_completeness)
    return dual, (x, y), calls


def test_the_journey_makes_one_feature_pass(counted, tmp_path):
    dual, data, calls = counted
    an = ef.analyse(dual, data, group="neuron", n_eigen=4)
    top = ef.max_activating(an.features, an.table.ids[:3], k=5)
    assert top.meta["n_examples"] == 120
    same = an.max_activating(an.table.ids[:3], k=5)
    assert all(torch.equal(top[i].indices, same[i].indices) for i in range(3))
    ef.viz.feature_dashboard(
        dual, an.table.ids[0], top, data=data, features=an.features, table=an.table, completeness=an.completeness()
    )
    ef.report(an, tmp_path / "report.html", top=2)
    ef.report(an, tmp_path / "again.html", top=1)
    assert calls["feature passes"] == 1
    assert {k: v for k, v in calls.items() if k.startswith("completeness")} == {
        f"completeness {o}": 1 for o in ef.ORDERS
    }


def test_searching_stored_features_equals_streaming_the_data(counted):
    dual, data, _ = counted
    feats = dual.features(data, batch_size=32)
    ids = ["0.weight[2,:]", "2.weight[1,3]", "0.weight[:,30]"]
    for by in ("value", "contribution"):
        for largest in (True, False):
            stored = ef.max_activating(feats, ids, k=7, by=by, largest=largest)
            streamed = ef.max_activating(dual, data, ids, k=7, by=by, largest=largest, batch_size=32, progress=False)
            for fid in ids:
                assert torch.equal(stored[fid].indices, streamed[fid].indices)
                torch.testing.assert_close(stored[fid].values, streamed[fid].values, rtol=1e-6, atol=1e-7)
    with pytest.raises(ef.ConfigError, match="already hold their data"):
        ef.max_activating(feats, data, ids)
    with pytest.raises(ef.ConfigError, match="DualModel's data or EffectiveFeatures"):
        ef.max_activating("features", data, ids)


def test_analysis_checks_its_settings_and_reuses_given_features(counted):
    dual, data, calls = counted
    with pytest.raises(ef.ConfigError, match="unknown by"):
        ef.Analysis(dual, data, by="loudness")
    with pytest.raises(ef.ConfigError, match="unknown group"):
        ef.Analysis(dual, data, group="layer")
    with pytest.raises(ef.ConfigError, match="order 'nlo'"):
        ef.Analysis(dual, data, features=dual.features(data, order="init"))
    feats = dual.features(data)
    an = ef.Analysis(dual, data, features=feats, n_eigen=0)
    assert an.features is feats and an.spectrum is None
    assert an.table.ids == ef.rank(feats, group="neuron").ids
    assert "computed=['features', 'table', 'spectrum']" in repr(an)
    assert calls["feature passes"] == 2  # the two dual.features calls above, none by the Analysis


def test_the_kernel_change_is_that_of_the_analysed_features(counted):
    dual, data, calls = counted
    an = ef.Analysis(dual, data, n_eigen=0, n_change=4)
    change = an.kernel_change
    assert an.kernel_change is change and calls["feature passes"] == 2  # one at the order, one at init
    alone = ef.kernel_change(dual, data, order="nlo", k=4)
    torch.testing.assert_close(change.values, alone.values, rtol=1e-5, atol=0)
    overlap = (change.direction_matrix @ alone.direction_matrix.T).abs().diagonal()
    assert overlap.min() > 1 - 1e-4
    assert change.meta["order"] == "nlo" and change.meta["against"] == "init"
    shares = change.tensor_shares(0)
    blocks = {name: float(b.square().sum()) for name, b in change.blocks(0).items()}
    assert list(shares) == sorted(blocks, key=lambda n: -blocks[n]) and sum(shares.values()) == pytest.approx(1.0)
    assert shares == pytest.approx({n: v / sum(blocks.values()) for n, v in blocks.items()})
    assert ef.viz.spectrum(change).layout.title.text.startswith("Spectrum of the kernel change ΔΘ = Θ_nlo − Θ_init")
    dash = ef.viz.feature_dashboard(dual, 1, data=data, features=an.features, eigen=change)
    assert "change[1]" in dash.figure.layout.title.text and "of the kernel change ΔΘ" in dash.figure.layout.title.text
    assert ef.Analysis(dual, data).kernel_change is None  # only on request
    assert ef.Analysis(dual, data, order="init", n_change=4).kernel_change is None  # ΔΘ = 0 at init


@pytest.mark.parametrize("kind", ["pretrained", "other"])
def test_a_theta0_that_is_no_initialisation_is_said_everywhere(kind, tmp_path):
    model, init, x, y = trained_digits_mlp(60, torch.nn.Tanh, steps=10)
    dual = ef.DualModel(model, init, readout=correct_logit, order="path", progress=False, init_kind=kind)
    an = ef.analyse(dual, (x, y), n_eigen=0, n_change=2)
    assert an.features.meta["init_kind"] == kind
    assert an.notes[0] == dual.init_note and "θ0 is" in dual.init_note
    page = ef.report(an, tmp_path / "r.html", top=0, change_top=1).read_text()
    assert "What training changed: the kernel change ΔΘ" in page and "mode 0: λ =" in page
    assert "<b>Note:</b> θ0 is" in page
    assert ("fine-tun" if kind == "pretrained" else "not a training run") in page
    assert ef.load(ef.save(an.features, tmp_path / "f.safetensors")).meta["init_kind"] == kind
    plain = ef.DualModel(model, init, readout=correct_logit, order="path", progress=False)
    assert plain.init_note is None and ef.Analysis(plain, (x, y)).notes == []
    with pytest.raises(ef.ConfigError, match="init_kind"):
        ef.DualModel(model, init, init_kind="random")
