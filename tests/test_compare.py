"""`compare`: every method scored on the same model, data and budget; fair extractions; any model; the table."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import efffeat as ef
import efffeat.zoo as zoo
from efffeat.baselines import BASELINES, Baseline, Probe, Units, metrics, register_baseline
from efffeat.baselines.compare import ComparisonTable, compare
from efffeat.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pentagon():
    with torch.random.fork_rng():
        return zoo.tms(sparsity=0.975, lr=1e-2, n_data=256, seed=0).train(500, progress=False)


@pytest.fixture(scope="module")
def student():
    with torch.random.fork_rng():
        return zoo.teacher_student(hidden=32, n_train=512, seed=1).train(600, progress=False)


@pytest.fixture(scope="module")
def digits():
    with torch.random.fork_rng():
        return zoo.digits_mlp(hidden=(16,), seed=0).train(300, progress=False)


def test_compare_tms_scores_every_method_in_input_space(pentagon):
    methods = ("effective", "kernel-change", "eigen", "neurons", "pca", "nmf")
    table = compare(pentagon, methods=methods)
    assert [r["method"] for r in table.rows] == list(methods)
    assert table["neurons"]["units"] == 2 and table["effective"]["units"] == 5 and table["kernel-change"]["units"] == 5
    assert table["pca"]["units"] == 2  # PCA of 2-d activations has 2 components
    W = pentagon.model.W.detach().double()
    cos = (W / W.norm(dim=1, keepdim=True)).abs().max(dim=0).values  # neurons are the rows of W
    assert table["neurons"]["mmcs"] == pytest.approx(float(cos.mean()))
    for row in table.rows[:5]:
        assert 0 <= row["mmcs"] <= 1 + 1e-9 and 1 <= row["matched"] <= 5
    assert "not applicable" in table["nmf"]["note"]  # TMS hidden activations are signed
    # the rows that read effective features carry their order and completeness; the others do not
    for name in ("effective", "kernel-change", "eigen"):
        assert table[name]["order"] == "path" and 0 <= table[name]["completeness"] < 0.5
    assert "completeness" not in table["neurons"]
    assert table.meta["completeness"] == max(table[m]["completeness"] for m in ("effective", "kernel-change", "eigen"))
    assert table.meta["kind"] == "tms" and table.meta["nodes"] == 4
    text = str(table)
    assert "| method |" in text and "completeness" in text


def test_effective_units_are_read_from_the_change_not_the_trained_weights(student):
    """The effective directions are ΔW₁ rows of the top-ranked neurons: scored against exactly those rows they
    match (MMCS 1), and against the trained rows they do not."""
    dual = ef.DualModel(student.model, student.init_state, readout=0, order="path", dtype=torch.float64, progress=False)
    feats = dual.features(student.data)
    table = ef.rank(feats, by="contribution", group="neuron")
    rows = [ef.parse_id(i).row for i in table.ids if ef.parse_id(i).tensor == "0.weight"][:4]
    delta = (student.model.state_dict()["0.weight"] - student.init_state["0.weight"]).double()
    probe = Probe("1", "0.weight", n_units=4)
    got = compare(dual, student.data, probe=probe, truth=delta[rows], methods=["effective", "weight-change"])
    assert got["effective"]["mmcs"] == pytest.approx(1.0, abs=1e-12)
    trained = compare(dual, student.data, probe=probe, truth=student.model.state_dict()["0.weight"][rows])
    assert trained["effective"]["mmcs"] < 0.95
    right = torch.linalg.svd(delta, full_matrices=False).Vh[:4]
    assert compare(dual, student.data, probe=probe, truth=right, methods=["weight-change"])["weight-change"][
        "mmcs"
    ] == pytest.approx(1.0, abs=1e-12)


def test_teacher_student_is_scored_as_a_subspace(student):
    table = compare(student, methods=("weight-change", "kernel-change", "kernel-subspace", "neurons", "pca", "agop"))
    U = student.ground_truth.double()
    for row in table.rows:
        assert {"mmcs", "mmcs_rotated", "share", "recall", "in_span"} <= set(row), row["method"]
        assert 0 <= row["share"] <= row["recall"] + 1e-9 <= 1 + 1e-9
    # the change of a trained student reads the planted plane; its trained neurons do not
    assert table["weight-change"]["share"] > 0.8 and table["kernel-subspace"]["share"] > 0.8
    assert table["neurons"]["share"] < 0.6
    assert table["agop"]["note"].startswith("reference")
    x = student.data[0].double().requires_grad_(True)
    grads = torch.autograd.grad(student.model.double()(x).sum(), x)[0]
    student.model.float()
    want = torch.linalg.svd(grads, full_matrices=False).Vh[:2]
    assert table["agop"]["share"] == pytest.approx(metrics.subspace_share(want, U), abs=1e-6)


def test_digits_is_label_free_with_the_label_using_variant_marked(digits):
    methods = ("effective", "weight-change", "kernel-change", "neurons", "sae", "effective-label", "label-control")
    table = compare(digits, methods=methods, n_units=6, method_options={"sae": {"steps": 50}})
    assert table.meta["readout"] == "output"  # the effective methods read every logit, not the label
    for name in ("effective", "kernel-change", "neurons", "sae", "effective-label", "label-control"):
        row = table[name]
        assert row["units"] == 6 and 0 < row["purity@20"] <= 1 and 0 < row["purity@20 ±"] <= 1
    assert "not applicable" in table["weight-change"]["note"]  # directions only, this run scores functions
    assert table["effective-label"]["note"].startswith("LABEL-USING")
    assert table["label-control"]["note"].startswith("LABEL-USING control")
    assert "note" not in table["kernel-change"] and table["sae"]["fvu"] >= 0 and "fvu" not in table["neurons"]
    # the neurons are non-negative: both protocols agree on them
    assert table["neurons"]["purity@20 ±"] == table["neurons"]["purity@20"]


def test_compare_any_model_scored_by_labels():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x, y = torch.tensor(d.data[:400], dtype=torch.float32) / 16, torch.tensor(d.target[:400])
    model = nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    dual = ef.DualModel(model, init, readout="output", progress=False)
    probe = Probe("1", "0.weight", n_units=4, per_component=True, out_weight="2.weight")
    table = ef.compare(dual, x, probe=probe, labels=y, methods=["kernel-change", "neurons", "label-control"])
    assert table.meta["kind"] == "Sequential" and table["kernel-change"]["units"] == 4
    acts = model[1](model[0](x)).detach().double()
    top = acts.var(0).argsort(descending=True, stable=True)[:4]
    want = metrics.top_k_purity(acts[:, top], y, 20).mean()
    assert table["neurons"]["purity@20"] == pytest.approx(float(want))
    assert "LABEL-USING" in table["label-control"]["note"]


def test_errors_name_types_and_fixes_never_the_tensor(pentagon):
    dual = ef.DualModel(pentagon.model, pentagon.init_state, progress=False)
    x = pentagon.data
    with pytest.raises(ConfigError, match="needs probe=") as err:
        ef.compare(dual, x)
    assert "tensor(" not in str(err.value)
    with pytest.raises(ConfigError, match="got a Tensor") as err:
        ef.compare(pentagon, methods=x)
    assert "tensor(" not in str(err.value)
    with pytest.raises(ConfigError, match="methods are named by strings.*got a Tensor"):
        ef.compare(pentagon, methods=[x])
    with pytest.raises(ConfigError, match="compare takes a trained zoo run or a DualModel.*got a ToyModel"):
        ef.compare(pentagon.model, x)
    with pytest.raises(ConfigError, match="exactly one ground truth"):
        ef.compare(dual, x, probe=Probe("encoder", "encoder.weight"))
    with pytest.raises(ef.DataError, match="truth must be"):
        ef.compare(dual, x, probe=Probe("encoder", "encoder.weight"), truth=torch.eye(3))
    with pytest.raises(ConfigError, match="unknown method"):
        compare(pentagon, methods=("effective", "kmeans"))
    with pytest.raises(ConfigError, match="n_units"):
        compare(pentagon, methods=("neurons",), n_units=0)
    with pytest.raises(ConfigError, match="unknown order"):
        compare(pentagon, methods=("neurons",), order="auto-ish")


def test_method_options_are_checked_against_what_each_method_accepts(pentagon):
    with pytest.raises(ConfigError, match=r"method 'sae' takes no option\(s\) l2; the options it accepts: .*l1"):
        compare(pentagon, methods=["sae"], method_options={"sae": {"l2": 1.0}})
    with pytest.raises(ConfigError, match="method 'neurons' takes no option.*accepts: none"):
        compare(pentagon, methods=["neurons"], method_options={"neurons": {"k": 1}})
    with pytest.raises(ConfigError, match="'pca', which is not among the methods"):
        compare(pentagon, methods=["neurons"], method_options={"pca": {}})
    table = compare(pentagon, methods=["kernel-subspace"], method_options={"kernel-subspace": {"top": 2}})
    assert table["kernel-subspace"]["units"] == 4  # two stacked blocks [2, 5] span at most 4 input directions


def test_a_completeness_warning_once_when_the_dual_model_explains_too_little(pentagon):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = compare(pentagon, methods=("effective", "kernel-change", "eigen", "neurons"), order="nlo")
    said = [w for w in caught if "completeness residual" in str(w.message)]
    assert len(said) == 1 and "order 'nlo'" in str(said[0].message) and "order='path'" in str(said[0].message)
    assert table["effective"]["completeness"] > 0.5 and table["effective"]["order"] == "nlo"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compare(pentagon, methods=("effective",), order="path", nodes=16)
    assert not [w for w in caught if "completeness residual" in str(w.message)]


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


@pytest.fixture
def mine():
    """A user's baseline, registered from outside the package: the top principal axes of the input data."""

    def principal_axes(context, n_units, seed, keep=None):
        x = context.data.double()
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
    with pytest.raises(ConfigError, match="'mine' takes no option.*accepts: keep"):
        compare(pentagon, methods=["mine"], method_options={"mine": {"kept": 3}})


def test_a_directions_only_baseline_on_a_run_scored_by_functions_is_refused(digits):
    register_baseline(Baseline("axes", lambda context, n_units, seed: Units(directions=torch.eye(64)[:n_units])))
    try:
        with pytest.raises(ConfigError, match="'axes' returned directions only.*functions"):
            compare(digits, methods=["axes"])
    finally:
        del BASELINES["axes"]


def test_a_recipe_without_a_probe_cannot_be_compared():
    run = zoo.tms(n_data=16, seed=0)
    run.recipe = dataclasses.replace(run.recipe, probe=None)
    with pytest.raises(ConfigError, match="recipe has no probe.*probe="):
        compare(run, methods=("neurons",))


def test_reproduce_baselines_quick(capsys):
    spec = importlib.util.spec_from_file_location("reproduce_baselines", REPO / "scripts/reproduce_baselines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.main(["--quick", "--only", "tms-pentagon"])
    out = capsys.readouterr().out
    assert "TMS (5, 2), S = 0.975" in out and "completeness" in out


def test_compare_a_transformer_bridge_whose_parameter_names_are_not_its_state_names():
    from _models import bridge, perturbed

    model = bridge(normalization=None)
    init = perturbed(model, 0.05)
    tokens = torch.randint(0, 11, (24, 3), generator=torch.Generator().manual_seed(0))
    labels = tokens[:, 0] % 3
    dual = ef.DualModel(model, init, readout=0, progress=False)
    mlp_out = "blocks.0._original_component.mlp._original_component.fc_out"
    probe = Probe(mlp_out, "blocks.0.mlp.in.weight", at="input", n_units=3)
    table = ef.compare(dual, tokens, probe=probe, labels=labels, methods=["effective", "kernel-change", "neurons"])
    assert [r["units"] for r in table.rows] == [3, 3, 3]
    assert "not applicable" in ef.compare(dual, tokens, probe=probe, labels=labels, methods=["agop"])["agop"]["note"]
