"""Plotly figures of analysis results: rankings, spectra, TMS geometry, Fourier views, comparisons, scaling.

Each function takes a result (an object, a table, arrays) and draws it; none of them computes features,
kernels, scores or spectra, and none reads a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from .._check import integer
from ..errors import ConfigError, DataError
from ._inputs import to_numpy

TEMPLATE = "plotly_white"
COLORS = ("#3b6fb6", "#d1752b", "#3f9e5a", "#b8434e", "#7f5fb0", "#8c6d46", "#d36fb0", "#6f6f6f")


def ranking(table: Any, top: int = 30) -> go.Figure:
    """Horizontal bars of the best `top` rows of an ``ef.rank`` `FeatureTable` (rank 1 at the top)."""
    ids = list(table.ids[: min(top, len(table))])
    scores = to_numpy(table.scores)[: len(ids)]
    if not ids:
        raise DataError("the table is empty; there is nothing to draw")
    fig = go.Figure(
        go.Bar(
            x=scores,
            y=[f"{i + 1}. {fid}" for i, fid in enumerate(ids)],
            orientation="h",
            marker_color=COLORS[0],
            hovertemplate="%{y}<br>score %{x:.4g}<extra></extra>",
        )
    )
    order = (table.meta or {}).get("order") if hasattr(table, "meta") else None
    subtitle = f"group: {table.group}" + (f" · order {order}" if order else "")
    fig.update_layout(
        template=TEMPLATE,
        title={"text": f"Top {len(ids)} by {table.by}<br><sup>{subtitle}</sup>", "x": 0.01},
        xaxis_title=table.by,
        yaxis={"autorange": "reversed", "automargin": True},
        height=160 + 22 * len(ids),
        margin={"l": 20, "r": 30, "t": 70, "b": 50},
    )
    return fig


def _kernel_name(eigenfeatures: Any) -> str:
    """What a spectrum is of: the effective kernel, or the kernel change ``Θ_order − Θ_against``."""
    meta = getattr(eigenfeatures, "meta", None) or {}
    if meta.get("against"):
        return f"kernel change ΔΘ = Θ_{meta.get('order')} − Θ_{meta['against']}"
    return "effective kernel"


def spectrum(eigenfeatures: Any, cliffs: Sequence[int] | None = None) -> go.Figure:
    """Eigenvalues on a log scale, largest first, with the spectral cliff(s) marked.

    eigenfeatures: ``ef.eigenfeatures(...)`` (``.values``, ``.cliff``), a `Spectrum` (``.eigenvalues``) or a
    ``[k]`` tensor. cliffs: mode indices i after which the spectrum drops (default: the result's own, for a
    spectrum without negative values). A spectrum with negative eigenvalues (a kernel change) is drawn by |λ|,
    the negative ones as open red markers.
    """
    values = _eigenvalues(eigenfeatures)
    if values.size == 0:
        raise DataError("the spectrum is empty; there is nothing to draw")
    negative = values < 0
    if cliffs is None:
        cliffs = [] if negative.any() else _cliffs(eigenfeatures)
    cliffs = [int(c) for c in cliffs]
    magnitude = np.abs(values)
    modes = np.arange(len(values))
    fig = go.Figure(
        go.Scatter(
            x=modes,
            y=magnitude,
            mode="lines+markers",
            marker={
                "size": 7,
                "color": np.where(negative, COLORS[3], COLORS[0]).tolist(),
                "symbol": np.where(negative, "circle-open", "circle").tolist(),
            },
            line={"color": COLORS[0]},
            customdata=values,
            hovertemplate="mode %{x}<br>λ = %{customdata:.4g}<extra></extra>",
        )
    )
    for c in cliffs:
        if 0 <= c < len(values) - 1:
            drop = magnitude[c] / magnitude[c + 1] if magnitude[c + 1] > 0 else math.inf
            fig.add_vline(
                x=c + 0.5,
                line={"dash": "dash", "color": COLORS[3]},
                annotation_text=f"cliff after mode {c} (×{drop:.3g})",
                annotation_position="top right",
            )
    signed = f", {int(negative.sum())} negative (open markers)" if negative.any() else ""
    fig.update_layout(
        template=TEMPLATE,
        title={"text": f"Spectrum of the {_kernel_name(eigenfeatures)} ({len(values)} modes{signed})", "x": 0.01},
        xaxis_title="mode",
        yaxis={"type": "log", "title": "|eigenvalue|" if negative.any() else "eigenvalue", "exponentformat": "power"},
        height=420,
        margin={"l": 60, "r": 30, "t": 60, "b": 50},
    )
    return fig


def _eigenvalues(obj: Any) -> np.ndarray:
    for name in ("values", "eigenvalues"):
        v = getattr(obj, name, None)
        if v is not None and not callable(v):
            return to_numpy(v).reshape(-1)
    if isinstance(obj, Tensor | np.ndarray | Sequence):
        return to_numpy(obj).reshape(-1)
    raise ConfigError(
        f"spectrum() takes ef.eigenfeatures(...) results, a Spectrum or a tensor of eigenvalues, "
        f"got {type(obj).__name__}"
    )


def _cliffs(obj: Any) -> list[int]:
    cliff = getattr(obj, "cliff", None)
    if cliff is None and callable(getattr(obj, "cliffs", None)):
        cliff = obj.cliffs(n=1) if len(_eigenvalues(obj)) > 1 else []
    if cliff is None:
        return []
    if hasattr(cliff, "ratio"):  # an ef.eigenfeatures Cliff(index, ratio)
        cliff = cliff.index
    if cliff is None:
        return []
    if isinstance(cliff, int | np.integer):
        return [int(cliff)]
    if isinstance(cliff, Tensor):
        return [int(c) for c in cliff.reshape(-1)]
    return [int(c) for c in cliff]


def tms_geometry(w_trained: Any, w_init: Any = None) -> go.Figure:
    """Where a toy model of superposition puts each input feature in its hidden space.

    w_trained: the trained W ``[n_hidden, n_features]`` (column i: feature i's hidden direction); w_init: W at
    init ``[n_hidden, n_features]``, or None. Left: each feature's hidden direction ``W[:, i]`` (trained, solid;
    init, faint) — the hidden plane itself for two hidden units, else the plane of the trained W's top two
    singular directions. Right: the interference matrix ``WᵀW``. ``ef.zoo.tms_geometry_figure(run)`` draws a
    TMS run's.
    """
    w_trained = _tms_weight(w_trained, "w_trained")
    w_init = None if w_init is None else _tms_weight(w_init, "w_init")
    if w_init is not None and w_init.shape != w_trained.shape:
        raise DataError(f"w_init has shape {tuple(w_init.shape)}, w_trained {tuple(w_trained.shape)}; pass W at init")
    basis, plane = _plane(w_trained)
    n_features = w_trained.shape[1]
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.55, 0.45],
        subplot_titles=(f"hidden directions ({plane}; dotted: at init)", "interference WᵀW (trained)"),
        horizontal_spacing=0.12,
    )
    limit = 0.0
    for label, weights, faint in (("init", w_init, True), ("trained", w_trained, False)):
        if weights is None:
            continue
        xy = (basis.T @ weights).numpy()  # [2, n_features]
        limit = max(limit, float(np.abs(xy).max()))
        for i in range(n_features):
            color = COLORS[i % len(COLORS)]
            fig.add_trace(
                go.Scatter(
                    x=[0, xy[0, i]],
                    y=[0, xy[1, i]],
                    mode="lines+markers" if not faint else "lines",
                    line={"color": color, "width": 1.5 if faint else 3, "dash": "dot" if faint else "solid"},
                    marker={"size": [0, 9]},
                    opacity=0.45 if faint else 1.0,
                    name=f"x{i} ({label})",
                    legendgroup=f"x{i}",
                    showlegend=not faint,
                    hovertemplate=f"feature {i} ({label})<br>(%{{x:.3f}}, %{{y:.3f}})<extra></extra>",
                ),
                row=1,
                col=1,
            )
    gram = (w_trained.T @ w_trained).numpy()
    bound = float(np.abs(gram).max()) or 1.0
    fig.add_trace(
        go.Heatmap(
            z=gram,
            colorscale="RdBu",
            reversescale=True,
            zmin=-bound,
            zmax=bound,
            colorbar={"thickness": 12, "len": 0.8},
            hovertemplate="x%{y} · x%{x} = %{z:.3f}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    limit = 1.1 * (limit or 1.0)
    fig.update_xaxes(range=[-limit, limit], zeroline=True, title_text="direction 1", row=1, col=1)
    fig.update_yaxes(range=[-limit, limit], zeroline=True, scaleanchor="x", title_text="direction 2", row=1, col=1)
    fig.update_xaxes(title_text="feature", dtick=1 if n_features <= 20 else None, row=1, col=2)
    fig.update_yaxes(title_text="feature", autorange="reversed", dtick=1 if n_features <= 20 else None, row=1, col=2)
    fig.update_layout(
        template=TEMPLATE,
        title={
            "text": f"Toy model of superposition: {n_features} features in {w_trained.shape[0]} dimensions",
            "x": 0.01,
        },
        height=500,
        width=980,
        margin={"l": 60, "r": 30, "t": 80, "b": 90},
        legend={"orientation": "h", "x": 0.0, "y": -0.18, "xanchor": "left", "yanchor": "top"},
    )
    return fig


def _tms_weight(w: Any, name: str) -> Tensor:
    """``[n_hidden, n_features]`` float64 on the CPU."""
    if not isinstance(w, Tensor | np.ndarray) or w.ndim != 2:
        shape = tuple(w.shape) if isinstance(w, Tensor | np.ndarray) else type(w).__name__
        raise ConfigError(
            f"tms_geometry draws a toy model of superposition's W [n_hidden, n_features]; {name} is {shape} "
            "(ef.zoo.tms_geometry_figure(run) draws an ef.zoo.tms(...) run)"
        )
    return torch.as_tensor(w).detach().double().cpu()


def _plane(w: Tensor) -> tuple[Tensor, str]:
    """``[n_hidden, 2]`` orthonormal basis of the plane to draw in, and its name."""
    if w.shape[0] == 2:
        return torch.eye(2, dtype=w.dtype), "the hidden plane"
    if w.shape[0] == 1:
        return torch.tensor([[1.0, 0.0]], dtype=w.dtype), "one hidden unit"
    u = torch.linalg.svd(w, full_matrices=False).U[:, :2]
    return u, "top-2 singular plane of W"


def fourier(norms: Mapping[str, Any], key: Sequence[int], p: int, param: str = "embed.weight") -> go.Figure:
    """Fourier spectrum of a modular-addition model's token embedding, with its key frequencies labelled.

    norms: ``{name: [p // 2]}``, one bar series each: the norm of the embedding's Fourier component at each
    frequency 1 … p // 2 (``ef.spectra.frequency_norms`` of the rows of `param` for the number tokens 0 … p − 1),
    e.g. of θ* and of Δθ = θ* − θ0. key: the key frequencies, labelled on the first series
    (``ef.spectra.key_frequencies``). p: the modulus; param: the embedding's name (both for the title).
    ``ef.zoo.fourier_figure(run)`` draws a modular-addition run's.
    """
    p = integer("p", p, minimum=3)
    norms = {name: to_numpy(values).reshape(-1) for name, values in norms.items()}
    if not norms or any(len(values) != p // 2 for values in norms.values()):
        shapes = {name: len(values) for name, values in norms.items()}
        raise DataError(f"fourier() draws norms at the p // 2 = {p // 2} frequencies of p = {p}, got lengths {shapes}")
    key = [int(f) for f in key]
    if any(not 1 <= f <= p // 2 for f in key):
        raise DataError(f"key frequencies must be between 1 and p // 2 = {p // 2}, got {key}")
    freqs = np.arange(1, p // 2 + 1)
    first = next(iter(norms.values()))
    fig = go.Figure()
    for j, (name, values) in enumerate(norms.items()):
        fig.add_trace(
            go.Bar(
                x=freqs,
                y=values,
                name=name,
                marker_color=COLORS[j % len(COLORS)],
                hovertemplate=f"{name}<br>frequency %{{x}}: %{{y:.4g}}<extra></extra>",
            )
        )
    for f in key:
        fig.add_annotation(x=f, y=float(first[f - 1]), text=str(f), showarrow=True, arrowhead=0, ay=-18)
    fig.update_layout(
        template=TEMPLATE,
        title={
            "text": f"Fourier components of {param} over the tokens 0…{p - 1}<br><sup>key frequencies: "
            f"{', '.join(str(f) for f in key)}</sup>",
            "x": 0.01,
        },
        xaxis_title="frequency",
        yaxis_title="norm of the Fourier component",
        barmode="group",
        height=420,
        margin={"l": 60, "r": 30, "t": 80, "b": 50},
    )
    return fig


def comparison(table: Any) -> go.Figure:
    """One bar chart per metric of an ``ef.compare`` `ComparisonTable` (or a list of records), one bar per method."""
    records = as_records(table)
    labels, metrics = _columns(records)
    if not metrics:
        raise DataError("the comparison table has no numeric column to draw")
    names = [" · ".join(str(r[k]) for k in labels if r.get(k) is not None) or str(i) for i, r in enumerate(records)]
    n = len(metrics)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=metrics, vertical_spacing=0.18, horizontal_spacing=0.08)
    for j, metric in enumerate(metrics):
        values = [r.get(metric) for r in records]
        fig.add_trace(
            go.Bar(
                x=names,
                y=[np.nan if v is None else float(v) for v in values],
                marker_color=[COLORS[i % len(COLORS)] for i in range(len(names))],
                name=metric,
                hovertemplate="%{x}<br>" + metric + " = %{y:.4g}<extra></extra>",
            ),
            row=j // cols + 1,
            col=j % cols + 1,
        )
    fig.update_layout(
        template=TEMPLATE,
        title={"text": "Effective features against the baselines", "x": 0.01},
        showlegend=False,
        height=320 * rows + 60,
        margin={"l": 50, "r": 30, "t": 80, "b": 50},
    )
    return fig


def scaling(results: Any, x: str = "width", y: Sequence[str] | None = None) -> go.Figure:
    """Log–log lines of measured quantities against width (or `x`), each labelled with its fitted slope.

    results: records ``[{"width": 64, "lo_error": ..., ...}]``, a mapping ``{column: [values]}`` or an
    object with ``to_records()``; y: the columns to draw (default: every numeric column but `x` and ``seed``).
    Several records at one x (seeds) are drawn as points, their mean as the line.
    """
    records = as_records(results)
    if not records or x not in records[0]:
        found = list(records[0]) if records else []
        raise DataError(f"scaling() needs records with an {x!r} column, got columns {found}")
    _, numeric = _columns(records)
    columns = list(y) if y is not None else [c for c in numeric if c not in (x, "seed")]
    fig = go.Figure()
    for j, col in enumerate(columns):
        pts = np.array([(float(r[x]), float(r[col])) for r in records if r.get(col) is not None and r[col] > 0])
        if len(pts) == 0:
            continue
        xs = np.unique(pts[:, 0])
        means = np.array([np.exp(np.log(pts[pts[:, 0] == v, 1]).mean()) for v in xs])
        slope = np.polyfit(np.log(xs), np.log(means), 1)[0] if len(xs) > 1 else math.nan
        color = COLORS[j % len(COLORS)]
        if len(pts) > len(xs):
            fig.add_trace(
                go.Scatter(
                    x=pts[:, 0],
                    y=pts[:, 1],
                    mode="markers",
                    marker={"color": color, "size": 5},
                    opacity=0.4,
                    showlegend=False,
                    hoverinfo="skip",
                )
            )
        fig.add_trace(
            go.Scatter(x=xs, y=means, mode="lines+markers", line={"color": color}, name=f"{col} (slope {slope:.2f})")
        )
    fig.update_layout(
        template=TEMPLATE,
        title={"text": f"Scaling with {x}", "x": 0.01},
        xaxis={"type": "log", "title": x},
        yaxis={"type": "log", "title": "value"},
        height=440,
        margin={"l": 60, "r": 30, "t": 60, "b": 50},
    )
    return fig


def as_records(obj: Any) -> list[dict[str, Any]]:
    """Rows of a table: `to_records()`, a list of mappings, or a mapping of columns."""
    if hasattr(obj, "to_records"):
        return [dict(r) for r in obj.to_records()]
    if isinstance(obj, Mapping):
        keys = list(obj)
        n = len(obj[keys[0]]) if keys else 0
        return [{k: _plain(obj[k][i]) for k in keys} for i in range(n)]
    if isinstance(obj, Sequence) and all(isinstance(r, Mapping) for r in obj):
        return [dict(r) for r in obj]
    raise ConfigError(
        f"expected a table with to_records(), a list of records or a mapping of columns, got {type(obj).__name__}"
    )


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, Tensor | np.generic) and getattr(v, "ndim", 0) == 0 else v


def _columns(records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The label columns (all strings) and the numeric columns of some records, in order of appearance."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]

    def kinds(k: str) -> set[str]:
        out = set()
        for r in records:
            v = r.get(k)
            if v is None:
                continue
            out.add("str" if isinstance(v, str) else "num" if _is_number(v) else "other")
        return out

    labels = [k for k in keys if kinds(k) == {"str"}]
    numeric = [k for k in keys if kinds(k) == {"num"}]
    return labels, numeric


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool | np.bool_)
