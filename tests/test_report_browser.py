"""The HTML report as a person sees it: opened offline in headless Chromium, drawn, without console errors.

Skipped (with the reason) where no Chromium is installed; ``make test`` installs it when apt is available.
"""

from __future__ import annotations

import re
import struct
import zlib

import numpy as np
import pytest
from _models import trained_digits_mlp
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


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    model, init, x, y = trained_digits_mlp(80, nn.ReLU, steps=20)
    dual = ef.DualModel(model, init=init, readout=correct_logit, progress=False)
    comparison = [{"method": "effective", "purity": 0.9}, {"method": "neurons", "purity": 0.6}]
    path = tmp_path_factory.mktemp("report") / "report.html"
    return viz.report(dual, (x, y), path, top=2, n_eigen=6, comparison=comparison)


def test_report_renders_offline_without_console_errors(report_path):
    dom = render(report_path, dump_dom=True, size=(1280, 1600))
    assert dom.console == [], f"the page logged to the console: {dom.console}"
    divs = re.findall(r'<div id="[0-9a-f-]+" class="plotly-graph-div[^"]*"', dom.stdout)
    assert len(divs) == 5  # ranking, two dashboards, spectrum, comparison
    assert len(re.findall(r'class="[^"]*\bjs-plotly-plot\b', dom.stdout)) == 5  # plotly.js drew each of them
    assert dom.stdout.count('class="main-svg"') >= 5
    assert "Summary" in dom.stdout and "completeness residual" in dom.stdout


def test_report_screenshot_is_drawn(report_path, tmp_path):
    png = tmp_path / "report.png"
    shot = render(report_path, screenshot=png, size=(1100, 1000))
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
