"""Feature ids read once (`efffeat.ids.parse`), groups of every form, and ranking criteria as registrations."""

from __future__ import annotations

import pytest
import torch
from _models import mlp, perturbed

import efffeat as ef
from efffeat.ids import parse

F64 = torch.float64


@pytest.mark.parametrize(
    "fid, kind, tensor, index, layer",
    [
        ("0.weight[3,1]", "param", "0.weight", (3, 1), "0"),
        ("0.weight[3,:]", "neuron", "0.weight", (3, slice(None)), "0"),
        ("0.weight[:,1]", "input", "0.weight", (slice(None), 1), "0"),
        ("conv.weight[:,1,:,:]", "input", "conv.weight", (slice(None), 1, slice(None), slice(None)), "conv"),
        ("conv.weight[:,:,2,0]", "slice", "conv.weight", (slice(None), slice(None), 2, 0), "conv"),
        ("blocks.0.mlp.in.weight", "module", "blocks.0.mlp.in.weight", (), "blocks.0.mlp.in"),
        ("blocks.0.attn.head[2]", "head", "blocks.0.attn", (), "blocks.0.attn"),
    ],
)
def test_parse_reads_the_syntax_of_every_kind(fid, kind, tensor, index, layer):
    p = parse(f"  {fid} ")
    assert (p.kind, p.tensor, p.index, p.layer) == (kind, tensor, index, layer)
    assert p.head == (2 if kind == "head" else None)


def test_feature_ids_parse_checks_against_the_model():
    torch.manual_seed(0)
    model = mlp(4, (6,), 3).to(F64)
    feats = ef.DualModel(model, perturbed(model, 0.1), progress=False).features(torch.randn(5, 4, dtype=F64))
    p = feats.ids.parse("0.weight[3,:]")
    assert p.slot.state_name == "0.weight" and p.row == 3 and p.column is None
    whole = feats.ids.parse("2.bias")
    assert whole.kind == "module" and whole.index == (slice(None),)
    assert feats.ids.parse("2.bias[1]").kind == "param"
    for bad, message in [
        ("0.weight[3]", "take 2 indices"),
        ("0.weight[9,0]", "out of range"),
        ("0.weight[a,0]", "not an integer"),
        ("0.weigth[1,1]", "Did you mean '0.weight'"),
    ]:
        with pytest.raises(ef.FeatureIdError, match=message):
            feats.ids.parse(bad)


@pytest.fixture(scope="module")
def feats():
    torch.manual_seed(1)
    model = mlp(4, (6, 5), 3).to(F64)
    return ef.DualModel(model, perturbed(model, 0.2), progress=False).features(torch.randn(11, 4, dtype=F64))


def test_a_list_of_ids_ranks_like_the_same_mapping(feats):
    listed = ["0.weight[2,:]", "2.weight[:,4]", "4.weight", "0.weight[1,3]"]
    by_list = ef.rank(feats, group=listed)
    by_map = ef.rank(feats, group={g: [g] for g in listed})
    assert list(by_list.ids) == list(by_map.ids) and torch.equal(by_list.scores, by_map.scores)
    assert sorted(by_list.ids) == sorted(listed)
    assert by_list[by_list.ids.index("0.weight[2,:]")].size == 4 + 1  # the row and its bias entry


def test_a_predicate_groups_the_tensors_it_accepts(feats):
    table = ef.rank(feats, group=lambda name: name.endswith("weight"))
    assert sorted(table.ids) == ["0.weight", "2.weight", "4.weight"]
    module = ef.rank(feats, group="module")
    for row in table:
        assert row.score == pytest.approx(module[list(module.ids).index(row.id)].score, rel=1e-12)
    with pytest.raises(ef.ConfigError, match="accepts none"):
        ef.rank(feats, group=lambda name: False)


def test_bad_groups_are_refused_before_any_scoring(feats, monkeypatch):
    def fail(*_):
        raise AssertionError("scored before the group was checked")

    monkeypatch.setitem(ef.ranking.CRITERIA, "contribution", ef.Criterion("contribution", fail))
    bad = [("layer", "unknown group"), ("head", "q/k/v/o"), (["0.weight[99,:]"], "out of range"), (3, "kind")]
    for group, message in bad:
        with pytest.raises((ef.ConfigError, ef.FeatureIdError), match=message):
            ef.rank(feats, group=group)


def test_a_registered_criterion_ranks_and_aggregates(feats):
    crit = ef.register_criterion(ef.Criterion("squared_change", lambda f, _: f.flat_delta().square(), aggregate="sum"))
    try:
        table = ef.rank(feats, by="squared_change", group="module")
        delta = {s.state_name: feats.delta[s.name] for s in feats.slots}
        want = sorted(((float(d.square().sum()), n) for n, d in delta.items()), reverse=True)
        assert [(pytest.approx(v, rel=1e-12), n) for v, n in want] == [(r.score, r.id) for r in table]
        assert table.by == crit.name
    finally:
        del ef.ranking.CRITERIA["squared_change"]
    with pytest.raises(ef.ConfigError, match="unknown by"):
        ef.rank(feats, by="squared_change")
    with pytest.raises(ef.ConfigError, match="'rms' or 'sum'"):
        ef.register_criterion(ef.Criterion("x", lambda f, _: f.flat_delta(), aggregate="max"))
