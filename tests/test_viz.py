"""ef.viz: every figure draws the numbers of the result it is given (checked against autograd and the inputs)."""

from __future__ import annotations

import math
import os
import re
import warnings
from types import SimpleNamespace

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from _models import trained_digits_mlp
from plotly.offline import get_plotlyjs
from torch import nn

import efffeat as ef
from efffeat import _atomic as atomic
from efffeat import viz
from efffeat.baselines import neurons
from efffeat.ranking import rank
from efffeat.spectra import eigenfeatures, eigenmodes
from efffeat.zoo.digits import correct_logit

F64 = torch.float64


@pytest.fixture(scope="module")
def digits():
    """A 64-8-10 MLP briefly trained on 120 digits (float64), its θ0, and the data."""
    model, init, x, y = trained_digits_mlp(120, nn.Tanh, steps=30, dtype=F64)
    dual = ef.DualModel(model, init=init, readout=correct_logit, order="trained", progress=False)
    feats = dual.features((x, y))
    return SimpleNamespace(model=model, init=init, x=x, y=y, data=(x, y), dual=dual, feats=feats)


def per_example_grads(model, x, y) -> dict[str, torch.Tensor]:
    """``{name: [N, *shape]}`` gradients of the correct-class logit at the model's parameters, one per example."""
    out = {n: [] for n, _ in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        model(x[i : i + 1])[0, y[i]].backward()
        for n, p in model.named_parameters():
            out[n].append(p.grad.detach().clone())
    return {n: torch.stack(g) for n, g in out.items()}


def traces(fig, kind):
    return [t for t in fig.data if t.type == kind]


def titles(fig):
    return [a.text for a in fig.layout.annotations]


# ---- the dashboard ---------------------------------------------------------------------------------------
def test_dashboard_single_weight_draws_autograd_values(digits):
    fid = "0.weight[3,20]"
    grads = per_example_grads(digits.model, digits.x, digits.y)
    want = grads["0.weight"][:, 3, 20].numpy()
    delta = float(digits.dual.delta["0.weight"][3, 20])
    fig = viz.feature_dashboard(digits.dual, fid, data=digits.data, features=digits.feats, n_examples=6).figure
    hist_values, hist_contrib = traces(fig, "histogram")
    np.testing.assert_allclose(hist_values.x, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hist_contrib.x, delta * want, rtol=1e-10, atol=1e-12)
    # 6 top and 6 bottom examples as 8x8 images, in order of the autograd values
    images = [t for t in traces(fig, "heatmap") if t.colorscale and t.showscale is False and t.zmid is None]
    assert len(images) == 12
    shown = [int(m) for m in re.findall(r"#(\d+)", " ".join(titles(fig)))]
    top = np.argsort(-want, kind="stable")[:6]
    bottom = np.argsort(want, kind="stable")[:6]
    assert shown == list(top) + list(bottom)
    np.testing.assert_array_equal(images[0].z, digits.x[top[0]].reshape(8, 8).numpy())
    # θ* and Δθ of unit 3's incoming weights as 8x8 pictures, the entry (pixel 20 = row 2, col 4) marked
    pictures = [t for t in traces(fig, "heatmap") if t.zmid == 0]
    np.testing.assert_allclose(pictures[0].z, digits.model[0].weight[3].detach().reshape(8, 8).numpy())
    np.testing.assert_allclose(pictures[1].z, digits.dual.delta["0.weight"][3].reshape(8, 8).numpy())
    marks = traces(fig, "scatter")
    assert [(m.y[0], m.x[0]) for m in marks] == [(2, 4), (2, 4)]
    assert "completeness residual" in fig.layout.title.text and "order trained" in fig.layout.title.text


def test_dashboard_neuron_group_is_its_summed_contribution(digits):
    grads = per_example_grads(digits.model, digits.x, digits.y)
    d = digits.dual.delta
    want = (grads["0.weight"][:, 5] * d["0.weight"][5]).sum(1) + grads["0.bias"][:, 5] * d["0.bias"][5]
    norm = (grads["0.weight"][:, 5].square().sum(1) + grads["0.bias"][:, 5].square()).sqrt()
    fig = viz.feature_dashboard(digits.dual, "0.weight[5,:]", data=digits.data, features=digits.feats).figure
    norms, contributions = traces(fig, "histogram")
    np.testing.assert_allclose(norms.x, norm.numpy(), rtol=1e-10, atol=1e-12)  # how strongly its features respond
    np.testing.assert_allclose(contributions.x, want.numpy(), rtol=1e-10, atol=1e-12)  # its signed contribution
    assert "norm of its 65 features" in " ".join(titles(fig))  # 64 weights and the bias
    shown = [int(m) for m in re.findall(r"#(\d+)", " ".join(titles(fig)))]
    assert shown[:8] == torch.argsort(-want, stable=True)[:8].tolist()  # ordered by the signed contribution
    assert shown[8:] == torch.argsort(want, stable=True)[:8].tolist()  # the most negative first
    assert not traces(fig, "scatter")  # no single entry to mark


def test_dashboard_rank_and_score_from_the_table(digits):
    table = rank(digits.feats, by="contribution", group="neuron")
    fig = viz.feature_dashboard(digits.dual, table.ids[1], data=digits.data, features=digits.feats, table=table).figure
    assert f"rank 2 of {len(table)} by contribution (neuron), score {float(table.scores[1]):.4g}" in (
        fig.layout.title.text
    )


def test_dashboard_uses_the_top_k_it_is_given(digits):
    fid = "2.weight[4,:]"
    topk = SimpleNamespace(indices=torch.tensor([7, 3, 11]))
    fig = viz.feature_dashboard(
        digits.dual, fid, {fid: topk}, data=digits.data, features=digits.feats, n_examples=3
    ).figure
    assert [int(m) for m in re.findall(r"#(\d+)", " ".join(titles(fig)))][:3] == [7, 3, 11]


def test_dashboard_eigenfeature(digits):
    eig = eigenfeatures(digits.feats, k=4)
    fig = viz.feature_dashboard(digits.dual, eig[1], data=digits.data, features=digits.feats).figure
    values, contributions = traces(fig, "histogram")
    direction = eig.directions(1)
    projected = digits.feats.matvec(direction)  # φᴱ(x)·d_1
    np.testing.assert_allclose(values.x, projected.numpy(), rtol=1e-8, atol=1e-10)
    along = float(digits.feats.flat_delta() @ direction)
    np.testing.assert_allclose(contributions.x, along * projected.numpy(), rtol=1e-8, atol=1e-10)
    assert "eigenfeature 1 of 4" in fig.layout.title.text


def test_dashboard_neuron_activations(digits):
    acts = neurons(digits.model, digits.x, "1")  # the Tanh after the first layer
    fig = viz.feature_dashboard(digits.dual, "1[3]", data=digits.data, features=acts, n_examples=4).figure
    (hist,) = traces(fig, "histogram")
    want = torch.tanh(digits.model[0](digits.x))[:, 3].detach()
    np.testing.assert_allclose(hist.x, want.numpy(), rtol=1e-12)
    shown = [int(m) for m in re.findall(r"#(\d+)", " ".join(titles(fig)))]
    assert shown[:4] == torch.argsort(-want, stable=True)[:4].tolist()
    assert any("no contribution" in t for t in titles(fig))


def test_dashboard_tokens_as_highlighted_text_and_low_dimensional_inputs_as_tables():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 1))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tokens = torch.randint(0, 6, (30, 3))
    tokens[:, 2] = 6
    dual = ef.DualModel(model, init=init, readout=0, progress=False)
    names = {6: "="}
    dash = viz.feature_dashboard(
        dual, "2.weight[0,:]", data=tokens, n_examples=4, token_text=lambda t: names.get(t, str(t))
    )
    spans = re.findall(r"<span class='ef-tok'[^>]*>([^<]*)</span>", dash.examples_html)
    assert len(spans) == 2 * 4 * 3 and spans[2::3] == ["="] * 8  # one span per token of the top and bottom 4
    assert "no per-position split" in dash.examples_html  # the last Linear reads the flattened sequence
    # its row is drawn in the shape of what it reads: 3 positions × 4 embedding dimensions
    (theta, delta) = [t for t in traces(dash.figure, "heatmap")]
    np.testing.assert_allclose(theta.z, model[2].weight[0].detach().reshape(3, 4).numpy(), rtol=1e-6)
    table = viz.feature_dashboard(
        dual, "2.weight[0,:]", data=tokens, n_examples=4, input_kind="table", decode=lambda t: f"{t[0]} + {t[1]} ="
    ).figure
    texts = traces(table, "table")[0].cells.values[-1]
    assert len(texts) == 4 and all(re.fullmatch(r"\d \+ \d =", t) for t in texts)
    low = torch.randn(25, 3)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    init = {k: v.clone() for k, v in mlp.state_dict().items()}
    with torch.no_grad():
        mlp[0].weight.add_(0.2)
    fig = viz.feature_dashboard(
        ef.DualModel(mlp, init=init, readout=0, progress=False), "0.weight[1,2]", data=low
    ).figure
    first = traces(fig, "table")[0]
    i = int(first.cells.values[0][0])
    assert first.cells.values[-1][0] == "[" + ", ".join(f"{v:.3g}" for v in low[i].tolist()) + "]"


def test_dashboard_vector_readout_picks_the_component_it_contributes_to():
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight[2, 1] += 1.0
    x = torch.randn(20, 3)
    dual = ef.DualModel(model, init=init, readout="output", progress=False)
    fig = viz.feature_dashboard(dual, "weight[2,:]", data=x).figure
    assert "readout component 2" in fig.layout.title.text
    norms, contributions = traces(fig, "histogram")
    np.testing.assert_allclose(contributions.x, x[:, 1].numpy(), rtol=1e-6)  # only W[2, 1] changed, by 1
    np.testing.assert_allclose(norms.x, (x.square().sum(1) + 1).sqrt().numpy(), rtol=1e-6)  # weights and the bias
    with pytest.raises(ef.ConfigError, match="component=5"):
        viz.feature_dashboard(dual, "weight[2,:]", data=x, component=5)


def test_dashboard_bad_input(digits):
    with pytest.raises(ef.DataError, match="needs data="):
        viz.feature_dashboard(digits.dual, "0.weight[0,0]")
    with pytest.raises(ef.DataError, match="same data"):
        viz.feature_dashboard(digits.dual, "0.weight[0,0]", data=digits.x[:10], features=digits.feats)
    with pytest.raises(ef.FeatureIdError, match="Did you mean"):
        viz.feature_dashboard(digits.dual, "0.wieght[0,0]", data=digits.data, features=digits.feats)
    with pytest.raises(ef.ConfigError, match="input kind"):
        viz.feature_dashboard(digits.dual, "0.weight[0,0]", data=digits.data, features=digits.feats, input_kind="x")
    with pytest.raises(ef.ConfigError, match="image_shape"):
        viz.feature_dashboard(digits.dual, "0.weight[0,0]", data=digits.data, features=digits.feats, image_shape=(7, 9))


# ---- figures ---------------------------------------------------------------------------------------------
def test_ranking_draws_the_table_best_first(digits):
    table = rank(digits.feats, by="contribution", group="neuron")
    fig = viz.ranking(table, top=5)
    (bar,) = fig.data
    np.testing.assert_allclose(bar.x, table.scores[:5].numpy())
    assert list(bar.y) == [f"{i + 1}. {fid}" for i, fid in enumerate(table.ids[:5])]
    assert fig.layout.yaxis.autorange == "reversed"


def test_spectrum_log_scale_with_the_cliff(digits):
    eig = eigenfeatures(digits.feats, k=6)
    fig = viz.spectrum(eig)
    np.testing.assert_allclose(fig.data[0].y, eig.values.numpy())
    assert fig.layout.yaxis.type == "log"
    (line,) = fig.layout.shapes
    assert line.x0 == eig.cliff.index + 0.5
    kernel = torch.diag(torch.tensor([100.0, 90.0, 1.0, 0.5], dtype=F64))
    fig = viz.spectrum(eigenmodes(kernel))  # a Spectrum: its largest drop is after mode 1
    assert fig.layout.shapes[0].x0 == 1.5
    assert "×90" in fig.layout.annotations[0].text


def tms_like(n_features: int, n_hidden: int):
    torch.manual_seed(0)
    model = nn.Module()
    model.encoder = nn.Linear(n_features, n_hidden, bias=False)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.encoder.weight.mul_(2.0)
    model.W = model.encoder.weight
    return SimpleNamespace(model=model, init_state=init)


def test_tms_geometry_draws_each_feature_column():
    run = tms_like(5, 2)
    fig = ef.zoo.tms_geometry_figure(run)
    w = run.model.W.detach().double()
    trained = [t for t in traces(fig, "scatter") if t.showlegend]
    init = [t for t in traces(fig, "scatter") if not t.showlegend]
    assert len(trained) == len(init) == 5
    for i, t in enumerate(trained):
        np.testing.assert_allclose([t.x[1], t.y[1]], w[:, i].numpy(), rtol=1e-6)
    np.testing.assert_allclose([init[0].x[1], init[0].y[1]], run.init_state["encoder.weight"][:, 0].numpy())
    np.testing.assert_allclose(traces(fig, "heatmap")[0].z, (w.T @ w).numpy(), rtol=1e-6)
    run3 = tms_like(6, 3)
    fig = viz.tms_geometry(run3.model.W)
    w = run3.model.W.detach().double()
    ends = np.array([[t.x[1], t.y[1]] for t in traces(fig, "scatter") if t.showlegend])
    u = torch.linalg.svd(w, full_matrices=False).U[:, :2]
    np.testing.assert_allclose(ends, (u.T @ w).T.numpy(), rtol=1e-6, atol=1e-9)
    assert "singular plane" in " ".join(titles(fig))
    with pytest.raises(ef.ConfigError, match="toy model"):
        viz.tms_geometry(SimpleNamespace(model=nn.Linear(2, 2)))


def test_fourier_marks_the_planted_frequency():
    p, d = 13, 6
    a = torch.arange(p, dtype=F64)
    model = nn.Module()
    model.embed = nn.Embedding(p + 1, d).to(F64)
    init = {k: v.clone() * 0.01 for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.embed.weight[:p] = 0.01 * torch.randn(p, d, dtype=F64)
        model.embed.weight[:p, 0] += torch.cos(2 * math.pi * 4 * a / p)
        model.embed.weight[:p, 1] += torch.sin(2 * math.pi * 4 * a / p)
    run = SimpleNamespace(model=model, init_state=init, config={"p": p})
    fig = ef.zoo.fourier_figure(run, n_key=1)
    trained, learned = fig.data
    np.testing.assert_allclose(trained.y, ef.spectra.frequency_norms(model.embed.weight[:p].detach()).numpy())
    assert list(trained.x) == list(range(1, p // 2 + 1))
    assert [a.text for a in fig.layout.annotations] == ["4"]
    assert "key frequencies: 4" in fig.layout.title.text
    with pytest.raises(ef.ConfigError, match="token embedding"):
        ef.zoo.fourier_figure(run, param="nothing")
    with pytest.raises(ef.DataError, match="p // 2"):
        viz.fourier({"trained": trained.y[:-1]}, [4], p)  # norms at p // 2 frequencies, not fewer


def test_comparison_one_panel_per_metric():
    records = [
        {"method": "effective", "mmcs": 0.93, "purity": 0.8, "note": "x"},
        {"method": "neurons", "mmcs": 0.41, "purity": None, "note": "y"},
    ]
    fig = viz.comparison(records)
    assert [t.name for t in fig.data] == ["mmcs", "purity"]
    assert list(fig.data[0].x) == ["effective · x", "neurons · y"]
    np.testing.assert_allclose(fig.data[0].y, [0.93, 0.41])
    assert math.isnan(fig.data[1].y[1])
    with pytest.raises(ef.DataError, match="numeric"):
        viz.comparison([{"method": "a"}])


def test_scaling_labels_each_line_with_its_slope():
    widths = [64, 128, 256, 512]
    records = [{"width": w, "seed": s, "lo_error": (3 + s) / w, "dntk": 5 / w**2} for w in widths for s in range(2)]
    fig = viz.scaling(records)
    names = [t.name for t in fig.data if t.name]
    assert names == ["lo_error (slope -1.00)", "dntk (slope -2.00)"]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    fig = viz.scaling({"width": widths, "err": [1.0, 0.5, 0.25, 0.125]})
    assert fig.data[0].name == "err (slope -1.00)"


# ---- the report ------------------------------------------------------------------------------------------
def test_report_is_one_self_contained_file(digits, tmp_path):
    path = tmp_path / "report.html"
    records = [{"method": "effective", "mmcs": 0.9}, {"method": "neurons", "mmcs": 0.5}]
    an = ef.Analysis(digits.dual, digits.data, features=digits.feats, n_eigen=5)
    out = viz.report(an, path, top=2, comparison=records)
    assert out == path
    text = path.read_text()
    assert text.count(get_plotlyjs()) == 1  # plotly.js inline, once
    own = text.replace(get_plotlyjs(), "")
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*\bhref=|https?://", own)  # nothing fetched
    divs = re.findall(r'<div id="([0-9a-f-]+)" class="plotly-graph-div"', text)
    assert len(divs) == 1 + 2 + 1 + 1  # ranking, 2 dashboards, spectrum, comparison
    for section in ("summary", "ranking", "dashboards", "spectrum", "comparison"):
        assert f"<section id='{section}'>" in text
    for order in ef.ORDERS:
        value = digits.dual.completeness(digits.data, order=order)
        assert f"<td>{order}</td><td class='num'>{value:.3g}</td>" in text
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_report_is_written_atomically(digits, tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("previous report")

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(viz.html_report.figures, "spectrum", broken)
    with pytest.raises(RuntimeError, match="figure failed"):
        viz.report(ef.Analysis(digits.dual, digits.data, features=digits.feats, n_eigen=3), path, top=1)
    assert path.read_text() == "previous report"
    monkeypatch.undo()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        viz.report(ef.Analysis(digits.dual, digits.data, features=digits.feats, n_eigen=3), path, top=1)
    assert path.read_text() == "previous report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # the temporary file is gone
    monkeypatch.undo()
    with pytest.raises(ef.ConfigError, match="does not exist"):
        viz.report(ef.Analysis(digits.dual, digits.data, features=digits.feats), tmp_path / "missing" / "r.html")


def test_figures_are_valid_plotly(digits):
    for fig in (
        viz.ranking(rank(digits.feats)),
        viz.feature_dashboard(digits.dual, "2.weight[0,:]", data=digits.data, features=digits.feats).figure,
    ):
        assert isinstance(fig, go.Figure)
        go.Figure(fig.to_dict())  # round-trips through plotly's validation


# ---- pictures with meaning, zeros, signed spectra, the report's words ----------------------------------------
def heatmap_pictures(fig):
    return [t for t in traces(fig, "heatmap") if t.zmid == 0]


@pytest.fixture(scope="module")
def tiny_cnn():
    """A 1→2-channel 3×3 convolution, 2×2 max-pool and a Linear on 20 digits (float64; the exact fallback)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.data[:20], dtype=F64).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(d.target[:20])
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 10)).to(F64)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ef.FallbackWarning)  # convolutions are factored
        dual = ef.DualModel(model, init=init, readout=correct_logit, order="trained", progress=False)
        feats = dual.features((x, y))
    return SimpleNamespace(model=model, dual=dual, feats=feats, data=(x, y))


def test_convolution_filters_are_drawn_as_kernels(tiny_cnn):
    w = tiny_cnn.model[0].weight.detach()
    fig = viz.feature_dashboard(tiny_cnn.dual, "0.weight[1,0,2,1]", data=tiny_cnn.data, features=tiny_cnn.feats).figure
    theta, _ = heatmap_pictures(fig)
    np.testing.assert_array_equal(theta.z, w[1, 0].numpy())  # out channel 1's 3×3 kernel (one input channel)
    assert [(m.y[0], m.x[0]) for m in traces(fig, "scatter")] == [(2, 1), (2, 1)]  # the weight, marked
    fig = viz.feature_dashboard(tiny_cnn.dual, "0.weight", data=tiny_cnn.data, features=tiny_cnn.feats).figure
    theta, _ = heatmap_pictures(fig)
    z = np.array(theta.z, dtype=float)
    assert z.shape == (2 * 4 - 1, 3)  # out × in tiles of 3×3, one blank row between them
    np.testing.assert_array_equal(z[:3], w[0, 0].numpy())
    np.testing.assert_array_equal(z[4:], w[1, 0].numpy())
    assert np.isnan(z[3]).all()


def test_a_linear_row_is_drawn_in_the_shape_of_what_it_reads(tiny_cnn):
    w = tiny_cnn.model[4].weight.detach()  # reads the flattened [2, 3, 3] pooled maps
    fig = viz.feature_dashboard(tiny_cnn.dual, "4.weight[3,:]", data=tiny_cnn.data, features=tiny_cnn.feats).figure
    theta, _ = heatmap_pictures(fig)
    z = np.array(theta.z, dtype=float)
    assert z.shape == (3, 2 * 4 - 1)  # the two channels side by side
    np.testing.assert_array_equal(z[:, :3], w[3, :9].reshape(3, 3).numpy())
    np.testing.assert_array_equal(z[:, 4:], w[3, 9:].reshape(3, 3).numpy())


def test_norm_gains_are_bars_and_a_cyclic_embedding_is_a_fourier_spectrum():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 1)).to(F64)
    init = {k: v.clone() for k, v in mlp.state_dict().items()}
    with torch.no_grad():
        mlp[1].weight.add_(0.3 * torch.randn(6, dtype=F64))
    x = torch.randn(30, 4, dtype=F64)
    dual = ef.DualModel(mlp, init=init, readout=0, progress=False)
    fig = viz.feature_dashboard(dual, "1.weight[2]", data=x).figure
    theta, delta = traces(fig, "bar")
    np.testing.assert_allclose(theta.y, mlp[1].weight.detach().numpy())
    np.testing.assert_allclose(delta.y, (mlp[1].weight - init["1.weight"]).detach().numpy())
    assert list(theta.marker.line.width) == [0, 0, 2, 0, 0, 0]  # the gain of unit 2, outlined
    p = 7
    model = nn.Sequential(nn.Embedding(p + 1, 4), nn.Flatten(), nn.Linear(8, 1)).to(F64)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight[:p, 1] += torch.cos(2 * math.pi * 2 * torch.arange(p, dtype=F64) / p)
    tokens = torch.stack([torch.arange(14) % p, torch.full((14,), p)], dim=1)
    dual = ef.DualModel(model, init=init, readout=0, progress=False)
    fig = viz.feature_dashboard(dual, "0.weight[:,1]", data=tokens, cyclic=p).figure
    theta, delta = traces(fig, "bar")
    np.testing.assert_allclose(theta.y, ef.spectra.frequency_norms(model[0].weight[:p, 1:2].detach()).numpy())
    assert list(theta.x) == [1, 2, 3] and int(np.argmax(delta.y)) == 1  # Δθ is the planted frequency 2
    assert "over the 7 residues" in fig.layout.title.text


def test_a_group_top_list_skips_examples_where_it_takes_no_part(digits):
    fid = "2.weight[4,:]"  # the output row of digit 4: the correct-class logit reads it only on 4s
    dash = viz.feature_dashboard(digits.dual, fid, data=digits.data, features=digits.feats, n_examples=6)
    shown = [int(m) for m in re.findall(r"#(\d+)", " ".join(titles(dash.figure)))]
    fours = int((digits.y == 4).sum())
    assert all(int(digits.y[i]) == 4 for i in shown)  # top and bottom: only 4s, no example at 0
    assert titles(dash.figure).count(f"{len(digits.y) - fours} examples at exactly 0 not listed") == 2


def test_signed_spectra_use_the_magnitude_and_keep_the_sign(digits):
    from dataclasses import replace

    eig = eigenfeatures(digits.feats, k=4)
    signed = replace(eig, values=eig.values * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64))
    fig = viz.spectrum(signed)
    np.testing.assert_allclose(fig.data[0].y, eig.values.numpy())
    assert "2 negative" in fig.layout.title.text and fig.layout.yaxis.title.text == "|eigenvalue|"
    dash = viz.feature_dashboard(digits.dual, signed[1], data=digits.data, features=digits.feats)
    values, _ = traces(dash.figure, "histogram")
    np.testing.assert_allclose(values.x, digits.feats.matvec(eig.directions(1)).numpy(), rtol=1e-8, atol=1e-10)
    assert "(negative)" in dash.figure.layout.title.text
    top = ef.max_activating(digits.feats, signed[1], k=3)
    assert torch.equal(top[0].indices, ef.max_activating(digits.feats, eig[1], k=3)[0].indices)


def test_the_report_explains_its_numbers_and_warns_of_a_large_residual(digits, tmp_path):
    assert viz.html_report.completeness_warning(0.05, "nlo", {"init": 0.2}) == ""
    warning = viz.html_report.completeness_warning(0.5, "nlo", {"nlo": 0.5, "init": 0.9, "path": 0.01})
    assert "50% of the change unexplained" in warning and "order='path'" in warning
    assert "broken down" in viz.html_report.completeness_warning(1.3, "init", {"init": 1.3})
    an = ef.Analysis(digits.dual, digits.data, features=digits.feats, n_eigen=3)
    text = viz.report(an, tmp_path / "r.html", top=1).read_text()
    assert "Completeness residual</b> r =" in text and "It can exceed 100 %" in text
    assert f"order of the features shown</th><td>trained (completeness residual {an.completeness():.3g})" in text
    assert ("<div class='warning'>" in text) == (an.completeness() > viz.html_report.LARGE_RESIDUAL)


def test_a_dashboard_is_one_page_with_its_sequences(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 1))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(0.1)
    tokens = torch.randint(0, 7, (20, 3))
    dash = viz.feature_dashboard(
        ef.DualModel(model, init=init, readout=0, progress=False), "0.weight[2,:]", data=tokens
    )
    page = dash.write_html(tmp_path / "dashboard.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count(get_plotlyjs()) == 1
    assert page.index("ef-tokens") < page.index("plotly-graph-div")  # the sequences, then the figure
    assert dash.examples_html in dash.to_html(full_html=False, include_plotlyjs=False)
    assert [p.name for p in tmp_path.iterdir()] == ["dashboard.html"]
