"""`compare`: every method scored on the same run, data and budget; the table prints and round-trips."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import efffeat as ef
import efffeat.zoo as zoo
from efffeat.baselines import BASELINES, Baseline, Units, metrics, register_baseline
from efffeat.baselines.compare import ComparisonTable, compare
from efffeat.errors import ConfigError


@pytest.fixture(scope="module")
def pentagon():
    with torch.random.fork_rng():
        return zoo.tms(sparsity=0.975, lr=1e-2, n_data=256, seed=0).train(500, progress=False)


def test_compare_tms_scores_every_method_in_input_space(pentagon):
    table = compare(pentagon, methods=("effective", "eigen", "neurons", "pca", "nmf"))
    assert [r["method"] for r in table.rows] == ["effective", "eigen", "neurons", "pca", "nmf"]
    assert table["neurons"]["units"] == 2 and table["effective"]["units"] == 5 and table["eigen"]["units"] == 5
    assert table["pca"]["units"] == 2  # PCA of 2-d activations has 2 components
    W = pentagon.model.W.detach().double()
    cos = (W / W.norm(dim=1, keepdim=True)).abs().max(dim=0).values  # neurons are the rows of W
    assert table["neurons"]["mmcs"] == pytest.approx(float(cos.mean()))
    for row in table.rows[:4]:
        assert 0 <= row["mmcs"] <= 1 + 1e-9 and 1 <= row["matched"] <= 5
    assert "not applicable" in table["nmf"]["note"]  # TMS hidden activations are signed
    assert 0 <= table.meta["completeness"] and table.meta["kind"] == "tms"
    text = str(table)
    assert "| method |" in text and "effective" in text


def test_compare_digits_scores_label_purity():
    run = zoo.digits_mlp(seed=0).train(150, progress=False)
    table = compare(run, methods=("effective", "neurons", "sae"), n_units=6, method_options={"sae": {"steps": 50}})
    for row in table.rows:
        assert row["units"] == 6 and 0 < row["purity@20"] <= 1 and -1 <= row["selectivity"] <= 1
    assert table["sae"]["fvu"] >= 0 and "fvu" not in table["neurons"]


def test_comparison_table_round_trips(tmp_path):
    rows = [
        {"method": "effective", "units": 5, "mmcs": 0.1 + 0.2, "note": None},
        {"method": "nmf", "note": "not applicable"},
    ]
    table = ComparisonTable(rows, {"kind": "tms", "completeness": 1 / 3})
    again = ComparisonTable.from_state(*table.to_state())
    assert again.to_records() == table.to_records() and again.meta == table.meta
    from efffeat import io

    loaded = io.load(io.save(table, tmp_path / "table.safetensors"))
    assert loaded.to_records() == table.to_records() and loaded.meta == table.meta


def test_compare_rejects_unknown_methods(pentagon):
    with pytest.raises(ConfigError, match="unknown method"):
        compare(pentagon, methods=("effective", "kmeans"))
    with pytest.raises(ConfigError, match="n_units"):
        compare(pentagon, methods=("neurons",), n_units=0)


@pytest.fixture
def mine():
    """A user's baseline, registered from outside the package: the top principal axes of the input data."""

    def principal_axes(context, n_units, seed, keep=None):
        x = context.run.data.double()
        vh = torch.linalg.svd(x - x.mean(dim=0), full_matrices=False).Vh
        return Units(directions=vh[: keep or n_units])

    register_baseline(Baseline("mine", principal_axes))
    yield
    del BASELINES["mine"]


def test_a_registered_baseline_is_compared_like_the_others(pentagon, mine):
    table = ef.compare(pentagon, methods=["neurons", "mine"])
    assert [r["method"] for r in table.rows] == ["neurons", "mine"]
    x = pentagon.data.double()
    want = torch.linalg.svd(x - x.mean(dim=0), full_matrices=False).Vh[:5]
    row = table["mine"]
    assert row["units"] == 5 and "fvu" not in row  # the probe's n_units: TMS n_features
    assert row["mmcs"] == pytest.approx(metrics.mmcs(pentagon.ground_truth, want))
    assert row["polysemanticity"] == pytest.approx(float(metrics.polysemanticity(want, pentagon.ground_truth).mean()))
    assert compare(pentagon, methods=["mine"], method_options={"mine": {"keep": 3}})["mine"]["units"] == 3
    with pytest.raises(ConfigError, match="register_baseline"):
        compare(pentagon, methods=("mine", "kmeans"))


def test_a_recipe_without_a_probe_cannot_be_compared():
    run = zoo.tms(n_data=16, seed=0)
    run.recipe = dataclasses.replace(run.recipe, probe=None)
    with pytest.raises(ConfigError, match="recipe has no probe.*probe="):
        compare(run, methods=("neurons",))
