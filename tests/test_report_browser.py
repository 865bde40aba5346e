"""The HTML report as a person sees it: opened offline in headless Chromium, drawn, without console errors —
for a digits CNN, a TransformerBridge on token sequences and the demo's toy model of superposition.

Skipped (with the reason) where no Chromium is installed; ``make test`` installs it when apt is available.
"""

from __future__ import annotations

import re
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from _models import bridge, perturbed
from torch import nn

import efffeat as ef
from efffeat import viz
from efffeat.viz._chromium import find_chromium, render
from efffeat.zoo.digits import correct_logit

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not found: install it (apt-get install chromium) or set $CHROMIUM"
)


def read_png(path) -> np.ndarray:
    """``[H, W, C]`` uint8 pixels of an 8-bit, non-interlaced PNG (all five row filters)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and interlace == 0, "only 8-bit non-interlaced PNGs"
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(chunks)), dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: a running sum along the row, per channel
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) & 255
        elif kind == 2:  # Up
            cur = (line + prev) & 255
        else:  # Average and Paeth depend on the reconstructed left neighbour: byte by byte
            cur = np.array(_sequential(line.tolist(), prev.tolist(), bpp, kind), dtype=np.int64)
        out[y] = cur
        prev = cur
    return out.reshape(height, width, bpp)


def _sequential(line: list[int], prev: list[int], bpp: int, kind: int) -> list[int]:
    cur = [0] * len(line)
    for i, v in enumerate(line):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        if kind == 3:
            cur[i] = (v + ((a + b) >> 1)) & 255
            continue
        c = prev[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        cur[i] = (v + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return cur


def drawn_fraction(pixels: np.ndarray) -> float:
    """Fraction of pixels that are not the page background (white)."""
    return float((pixels[..., :3] < 250).any(axis=-1).mean())


def dashboards(dom: str) -> list[str]:
    """The HTML of each ranked feature's dashboard of a rendered report (from its heading to the next)."""
    return [re.split(r"<h3>mode |<h2", part)[0] for part in re.split(r"<h3>\d+\. ", dom)[1:]]


@pytest.fixture(scope="module")
def cnn_report(tmp_path_factory):
    """A digits CNN (convolution through the exact fallback), its report with 2 dashboards."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.data[:80], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(d.target[:80])
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 10))
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ef.FallbackWarning)
        dual = ef.DualModel(model, init=init, readout=correct_logit, order="trained", progress=False)
        comparison = [{"method": "effective", "purity": 0.9}, {"method": "neurons", "purity": 0.6}]
        path = tmp_path_factory.mktemp("cnn") / "report.html"
        return viz.report(dual, (x, y), path, top=2, n_eigen=6, comparison=comparison)


@pytest.fixture(scope="module")
def bridge_report(tmp_path_factory):
    """A 2-layer TransformerBridge on token sequences, ranked by attention head, read at the answer's logit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bridge(n_layers=2, d_vocab=11, n_ctx=6, normalization=None, seed=1)
    model.eval()
    init = perturbed(model, 0.05, seed=2)
    tokens = torch.randint(0, 10, (40, 6), generator=torch.Generator().manual_seed(3))
    dual = ef.DualModel(model, init, readout=ef.readouts.logit(position=-1), order="trained", progress=False)
    an = ef.Analysis(dual, (tokens, tokens[:, 0]), group="head", n_eigen=4, n_change=4)
    return viz.report(an, tmp_path_factory.mktemp("bridge") / "report.html", top=2), an


@pytest.fixture(scope="module")
def tms_report(tmp_path_factory):
    """The demo's toy model of superposition, its NLO features (far from θ0: a large residual) and geometry."""
    run = ef.zoo.tms(n_features=5, n_hidden=2, sparsity=0.9, lr=1e-2, batch_size=256, n_data=256)
    run.train(steps=300, progress=False)
    dual = ef.DualModel(run.model, init=run.init_state, readout=run.readout, order="nlo", progress=False)
    an = ef.Analysis(dual, run.data, group="input", n_eigen=5, n_change=4)
    path = tmp_path_factory.mktemp("tms") / "report.html"
    return viz.report(an, path, top=2, figures_extra={"Geometry": ef.zoo.tms_geometry_figure(run)}), an


@pytest.mark.parametrize(
    ("which", "n_figures"),
    # ranking, 2 dashboards, spectrum, 1 more; the bridge and TMS: the kernel change's spectrum and 2 modes
    [("cnn_report", 5), ("bridge_report", 7), ("tms_report", 8)],
)
def test_reports_render_offline_without_console_errors(which, n_figures, request):
    found = request.getfixturevalue(which)
    path = found[0] if isinstance(found, tuple) else found
    dom = render(path, dump_dom=True, size=(1280, 1600))
    assert dom.console == [], f"the page logged to the console: {dom.console}"
    divs = re.findall(r'<div id="[0-9a-f-]+" class="plotly-graph-div[^"]*"', dom.stdout)
    assert len(divs) == n_figures
    assert len(re.findall(r'class="[^"]*\bjs-plotly-plot\b', dom.stdout)) == n_figures  # plotly.js drew each
    assert dom.stdout.count('class="main-svg"') >= n_figures
    assert "Summary" in dom.stdout and "Completeness residual</b> r =" in dom.stdout  # the legend
    assert "It can exceed 100 %" in dom.stdout
    changed = which != "cnn_report"
    assert ("What training changed: the kernel change ΔΘ" in dom.stdout) == changed
    assert ("<h3>mode 1: λ =" in dom.stdout) == changed


def test_token_dashboards_highlight_every_token_and_draw_the_heads_attention(bridge_report):
    path, an = bridge_report
    dom = render(path, dump_dom=True, size=(1280, 1600)).stdout
    heads = an.table.ids[:2]
    assert all(h.startswith("blocks.") and ".head[" in h for h in heads)
    for part in dashboards(dom):
        sequences = re.findall(r'<div class="ef-seq"', part)
        spans = re.findall(r'<span class="ef-tok" style="([^"]*)"', part)
        assert len(sequences) == 16 and len(spans) == 16 * 6  # top and bottom 8, one span per token
        assert sum("rgba(" in style for style in spans) > 16 * 3  # coloured by their position's part
        assert part.count('class="hm"') == 4  # the head's attention pattern on its 4 top sequences


def test_a_large_residual_is_explained_in_a_warning(tms_report):
    path, an = tms_report
    assert an.completeness() > 1  # the pentagon is far from θ0: the NLO expansion has broken down
    dom = render(path, dump_dom=True, size=(1280, 1600)).stdout
    warning = re.search(r'<div class="warning">(.*?)</div>', dom, re.S)
    assert warning is not None and "broken down" in warning.group(1) and "order='path'" in warning.group(1)
    assert f"order nlo · completeness residual {an.completeness():.3g}" in dom  # the header


def test_report_screenshot_is_drawn(cnn_report, tmp_path):
    png = tmp_path / "report.png"
    shot = render(cnn_report, screenshot=png, size=(1100, 1000))
    assert shot.console == []
    pixels = read_png(png)
    assert pixels.shape[:2] == (1000, 1100)
    assert drawn_fraction(pixels) > 0.2  # header bar, tables, bars: far from a blank page
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 100  # text and plot colours, not a flat fill


def test_the_checks_catch_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>notAFunction();</script></body></html>")
    png = tmp_path / "broken.png"
    shot = render(page, screenshot=png, size=(300, 200))
    assert any("notAFunction" in line for line in shot.console)
    assert drawn_fraction(read_png(png)) == 0.0
