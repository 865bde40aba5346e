"""`report`: one self-contained HTML page per analysis (plotly's JavaScript inlined, so it opens offline)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from .._atomic import write_text_atomic
from .._check import integer
from ..dual import ORDERS
from ..errors import ConfigError
from . import figures
from .dashboard import feature_dashboard

_PLOT_CONFIG = {"displaylogo": False, "responsive": True}
_CHOSEN = " class='chosen'"

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; }
header { background: #1d2b45; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 22px; } header p { margin: 4px 0 0; color: #c5cde0; font-size: 14px; }
main { max-width: 1200px; margin: 0 auto; padding: 16px 32px 48px; }
section { background: #fff; border: 1px solid #e1e5ec; border-radius: 6px; padding: 12px 20px; margin: 16px 0; }
h2 { font-size: 18px; margin: 6px 0 10px; } h3 { font-size: 15px; margin: 18px 0 4px; font-family: monospace; }
table.data { border-collapse: collapse; font-size: 14px; margin: 6px 0 10px; }
table.data th, table.data td { border-bottom: 1px solid #e1e5ec; padding: 4px 14px 4px 0; text-align: left; }
table.data th { color: #55607a; font-weight: 600; }
td.num { font-variant-numeric: tabular-nums; }
p.note { color: #55607a; font-size: 13px; margin: 4px 0; }
div.legend { color: #3a4356; font-size: 13px; background: #f3f6fb; border-left: 3px solid #9fb3d6;
             padding: 6px 12px; margin: 4px 0 12px; } div.legend p { margin: 4px 0; }
div.warning { background: #fff4e5; border: 1px solid #f0b45b; border-left: 5px solid #e08a00; color: #5a3a00;
              padding: 10px 16px; margin: 16px 0; border-radius: 4px; font-size: 14px; }
div.warning b { color: #8a4b00; }
tr.chosen td { font-weight: 600; }
nav a { color: #c5cde0; margin-right: 14px; font-size: 13px; }
"""


def report(
    source: Any,
    *args: Any,
    comparison: Any = None,
    orders: Sequence[str] = ORDERS,
    top: int = 5,
    change_top: int = 2,
    title: str | None = None,
    figures_extra: Mapping[str, go.Figure] | None = None,
    dashboard_options: Mapping[str, Any] | None = None,
    **analysis_options: Any,
) -> Path:
    """Write one HTML report of an analysis to `path` (atomically) and return the path.

    ``report(analysis, path)`` reports an `efffeat.Analysis` (nothing it already holds is computed again);
    ``report(dual, data, path, by=..., group=..., n_eigen=...)`` analyses `data` first (options as
    `efffeat.Analysis`). Sections: the summary (model, parameters, examples, readout, what θ0 is, the
    completeness of each of `orders`, each computed once, and notes on θ0 and precision), the ranking, the
    dashboards of the `top` ranked features, the spectrum of the effective kernel, what training changed (the
    eigenfeatures of the kernel change ΔΘ = Θ_order − Θ_init, the top `change_top` with dashboards), the
    comparison with baselines when `comparison` is given, and any `figures_extra` ({title: figure}).

    Args:
        source: an `efffeat.Analysis`, or a `DualModel` followed by its data.
        path: the ``.html`` file to write; its directory must exist.
        comparison: an ``ef.compare`` `ComparisonTable` (or its records).
        dashboard_options: extra keyword arguments of `feature_dashboard` (``input_kind``, ``decode``...).

    Example::

        ef.report(ef.analyse(dual, run.data), "runs/tms/report.html")
    """
    from ..analysis import Analysis

    if isinstance(source, Analysis):
        if len(args) != 1 or analysis_options:
            raise ConfigError("report(analysis, path): an Analysis already holds its data and settings")
        an, (path,) = source, args
    else:
        if len(args) != 2:
            raise ConfigError("report(dual, data, path) or report(analysis, path)")
        an, path = Analysis(source, args[0], **analysis_options), args[1]
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(
            f"cannot write the report to {str(path)!r}: the directory {str(path.parent)!r} does not exist"
        )
    integer("top", top, minimum=0)
    integer("change_top", change_top, minimum=0)
    dual, data, features, table = an.dual, an.data, an.features, an.table
    completeness = an.completeness_by_order(orders)
    residual = an.completeness()
    sections = [("summary", "Summary", _summary_html(dual, features, completeness, residual))]
    sections.append(("ranking", "Ranking", _ranking_legend(table) + _figure_html(figures.ranking(table, top=30))))
    options = dict(dashboard_options or {})
    dashboards = [
        f"<h3>{i + 1}. {html.escape(fid)}</h3>"
        + _dashboard_html(
            feature_dashboard(dual, fid, data=data, features=features, table=table, completeness=residual, **options)
        )
        for i, fid in enumerate(table.ids[:top])
    ]
    if dashboards:
        body = _dashboards_legend() + "\n".join(dashboards)
        sections.append(("dashboards", f"Top {len(dashboards)} features", body))
    if an.spectrum is not None:
        body = _spectrum_legend() + _figure_html(figures.spectrum(an.spectrum))
        sections.append(("spectrum", "Spectrum of the effective kernel", body))
    change = an.kernel_change
    if change is not None and len(change):
        shown = [
            f"<h3>mode {i}: λ = {float(change.values[i]):.4g}</h3>"
            + _dashboard_html(
                feature_dashboard(
                    dual, i, data=data, features=features, eigen=change, completeness=residual, **options
                )
            )
            for i in range(min(change_top, len(change)))
        ]
        body = _change_legend(change) + _modes_html(change) + _figure_html(figures.spectrum(change)) + "".join(shown)
        sections.append(("change", "What training changed: the kernel change ΔΘ", body))
    if comparison is not None:
        body = _records_html(figures.as_records(comparison)) + _figure_html(figures.comparison(comparison))
        sections.append(("comparison", "Comparison with baselines", body))
    for name, fig in (figures_extra or {}).items():
        sections.append((_anchor(name), name, _figure_html(fig)))
    title = title or f"efffeat report: {type(dual.model).__name__}"
    warning = completeness_warning(residual, features.order, completeness)
    write_text_atomic(path, _page(title, _subtitle(dual, features, residual), warning, sections))
    return path


# Residuals above these read as "a sizeable part unexplained" and "the expansion has broken down".
LARGE_RESIDUAL = 0.3
BROKEN_RESIDUAL = 1.0


def completeness_legend(residual: float, order: str) -> str:
    """What the completeness residual of the features shown (at `order`) means, as a paragraph of HTML."""
    return (
        "<p><b>Completeness residual</b> r = ‖Σ<sub>μ</sub> Δθ<sub>μ</sub> φᴱ<sub>μ</sub> − Δz‖ / ‖Δz‖: how much "
        "of the trained network's change Δz = f(x; θ*) − f(x; θ0) over the data the dual model "
        "f(x; θ0) + Σ Δθ·φᴱ leaves unexplained, in norm. 0 is exact; 0.1 leaves 10 %; above 1 the dual "
        "model is further from the trained network than the untrained one is. The expansions around one point "
        "(<code>init</code>, <code>nlo</code>, <code>trained</code>) are faithful only while Δθ is small; "
        "<code>path</code> integrates the features along θ0 → θ* and is exact up to quadrature error. "
        f"This report shows the features of order <code>{html.escape(order)}</code>: r = {residual:.3g}.</p>"
    )


def completeness_warning(residual: float, order: str, by_order: Mapping[str, float] | None = None) -> str:
    """A warning box (HTML) when the residual of the features shown is large, naming the order to use instead;
    empty when the residual is small."""
    if not residual > LARGE_RESIDUAL:  # NaN-safe: a NaN residual warns too
        return ""
    others = {o: r for o, r in (by_order or {}).items() if o != order}
    best = min(others, key=lambda o: others[o], default=None)
    advice = (
        f"The order with the smallest residual here is <code>{html.escape(best)}</code> "
        f"(r = {others[best]:.3g}): analyse with <code>order={best!r}</code>."
        if best is not None and others[best] < residual
        else "Use <code>order='path'</code> with more <code>nodes</code>, which is exact up to quadrature error."
    )
    if residual > BROKEN_RESIDUAL:
        what = (
            f"the dual model of order <code>{html.escape(order)}</code> is further from the trained network than "
            "the untrained network is: the expansion around one point has broken down for this model"
        )
    else:
        what = f"the features of order <code>{html.escape(order)}</code> leave {residual:.0%} of the change unexplained"
    return (
        f"<div class='warning'><b>Completeness residual {residual:.3g}:</b> {what}. Rankings, contributions and "
        f"shares below describe the dual model, not the network itself. {advice}</div>"
    )


def _summary_html(dual: Any, features: Any, completeness: Mapping[str, float], residual: float) -> str:
    k = features.n_outputs
    readout = "scalar: one number per example" if features.scalar else f"{k} components per example"
    rows = [
        ("model", type(dual.model).__name__),
        ("parameters (features per readout component)", f"{dual.n_features:,}"),
        ("examples", f"{features.n_examples:,}"),
        ("readout", f"{dual.readout.name} ({readout})"),
        ("order of the features shown", f"{features.order} (completeness residual {residual:.3g})"),
        ("θ0", dual.init_what),
        ("|Δθ| = |θ* − θ0|", f"{dual.delta_norm():.4g}"),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    orders = "".join(
        f"<tr{_CHOSEN if o == features.order else ''}><td>{html.escape(o)}</td><td class='num'>{c:.3g}</td></tr>"
        for o, c in completeness.items()
    )
    legend = completeness_legend(residual, features.order)
    if not features.scalar:
        legend += (
            f"<p><b>Readout components.</b> The readout gives {k} numbers per example (e.g. one logit per class, "
            "one loss per position). Every feature has a value for each (example, component) pair; rankings "
            "sum over all of them, and each dashboard draws the component the feature contributes most to, "
            "named in its subtitle as <i>readout component k</i>.</p>"
        )
    boxes = "".join(f"<div class='warning'><b>Note:</b> {html.escape(n)}.</div>" for n in dual.notes)
    return (
        f"{boxes}<table class='data'>{body}</table><div class='legend'>{legend}</div>"
        f"<table class='data'><tr><th>order</th><th>completeness residual</th></tr>{orders}</table>"
    )


def _change_legend(change: Any) -> str:
    m = change.meta
    residuals = m.get("completeness") or {}
    done = ", ".join(f"{k} {residuals[k]:.3g}" for k in ("order", "against") if residuals.get(k) is not None)
    return (
        "<div class='legend'><p>The kernel of the trained network, Θ = Σ<sub>μ</sub> φᴱ<sub>μ</sub>(x) "
        "φᴱ<sub>μ</sub>(x′), holds what training added <i>and</i> what the random initialisation already had. "
        f"Its change ΔΘ = Θ<sub>{html.escape(str(m.get('order')))}</sub> − Θ<sub>init</sub> keeps only what "
        "training changed. Its eigenfunctions (centred over the examples, ranked by |λ|; a negative λ is a "
        "direction training removed) are the learned modes; each has a direction in parameter space, the "
        "change of the features along it, whose largest parts are listed per tensor. Below: the modes' "
        "examples, values and weight pictures, as for a feature."
        + (f" Completeness residuals of the two kernels' features: {html.escape(done)}." if done else "")
        + "</p></div>"
    )


def _modes_html(change: Any, n_modes: int = 10, n_tensors: int = 3) -> str:
    """One row per mode: λ, and the tensors that carry most of its parameter direction (share of ‖d‖²)."""
    rows = []
    for i in range(min(n_modes, len(change))):
        shares = list(change.tensor_shares(i).items())[:n_tensors]
        where = ", ".join(f"{html.escape(name)} {share:.0%}" for name, share in shares)
        rows.append(f"<tr><td>{i}</td><td class='num'>{float(change.values[i]):.4g}</td><td>{where}</td></tr>")
    head = "<tr><th>mode</th><th>λ</th><th>where its direction lies (share of ‖d‖²)</th></tr>"
    return f"<table class='data'>{head}{''.join(rows)}</table>"


def _ranking_legend(table: Any) -> str:
    return (
        "<div class='legend'><p>Each bar is one "
        + ("feature" if table.group == "param" else f"group of features ({html.escape(str(table.group))})")
        + f", scored by <code>{html.escape(table.by)}</code> over every (example, component) pair: "
        "<code>contribution</code> is the root-mean-square of its contribution Δθ·φᴱ to the readout change "
        "(a group: of its members' together, √Σ of their mean squares, so members that cancel still count); "
        "<code>net_contribution</code> the root-mean-square of a group's summed contribution (what it does "
        "together); <code>variance</code> the variance of "
        "its values; <code>learned</code> how far its features moved from the NTK features at θ0; "
        "<code>weight</code> |Δθ|.</p></div>"
    )


def _dashboards_legend() -> str:
    return (
        "<div class='legend'>"
        "<p><b>Examples.</b> A single feature's examples are ordered by its value φᴱ(x); a group's (a neuron's "
        "weights and bias, an input's column, a head) by its <i>signed contribution</i> Σ<sub>μ∈G</sub> "
        "Δθ<sub>μ</sub> φᴱ<sub>μ</sub>(x), its share of the readout change at x: the top list pushes the readout "
        "up most, the bottom list (most negative first) down most. Examples where the value is exactly 0 (a unit "
        "that is off, a class the readout does not read) are left out and counted. Token sequences are "
        "highlighted by the part of that value each position carries (orange up, blue down; hover for the "
        "number).</p>"
        "<p><b>Histograms.</b> For a single feature: its value and its contribution. For a group: "
        "‖φᴱ<sub>G</sub>(x)‖, how strongly its features respond to x whatever the sign of Δθ (the "
        "activation-like view), and its signed contribution.</p>"
        "<p><b>Σ|c| of Σ|Δz|</b> is the sum over examples of the feature's |contribution| relative to the sum of "
        "the readout changes |Δz|. It can exceed 100 %: contributions of different features cancel, so one "
        "feature can push the readout further than the net change that remains once the others pushed "
        "back.</p>"
        "<p><b>Pictures.</b> The feature's weights θ* and their change Δθ in the layer's own shape: an image's "
        "pixels, convolution kernels, positions × dimensions, bars for vectors, Fourier spectra over a cyclic "
        "vocabulary; a single weight is marked. A head shows its attention patterns on its top sequences.</p>"
        "</div>"
    )


def _spectrum_legend() -> str:
    return (
        "<div class='legend'><p>Eigenvalues of the effective kernel Σ<sub>μ</sub> φᴱ<sub>μ</sub>(x) "
        "φᴱ<sub>μ</sub>(x′) over the data, largest first: the directions in function space the dual "
        "regression uses most. A <i>cliff</i> (a large drop between consecutive eigenvalues) separates the modes "
        "that stand apart. A kernel change can have negative eigenvalues: they are drawn by |λ|, marked "
        "negative.</p></div>"
    )


def _dashboard_html(dash: Any) -> str:
    return dash.examples_html + _figure_html(dash.figure)


def _subtitle(dual: Any, features: Any, completeness: float) -> str:
    return (
        f"{type(dual.model).__name__} · {dual.n_features:,} parameters · {features.n_examples:,} examples · "
        f"order {features.order} · completeness residual {completeness:.3g}"
    )


def _records_html(records: list[dict[str, Any]]) -> str:
    if not records:
        return ""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    cells = ("".join(f"<td>{html.escape(_cell(r.get(k)))}</td>" for k in keys) for r in records)
    rows = "".join(f"<tr>{c}</tr>" for c in cells)
    return f"<table class='data'><tr>{head}</tr>{rows}</table>"


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _figure_html(fig: go.Figure) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config=_PLOT_CONFIG)


def _anchor(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "figure"


def _page(title: str, subtitle: str, warning: str, sections: list[tuple[str, str, str]]) -> str:
    nav = "".join(f"<a href='#{a}'>{html.escape(h)}</a>" for a, h, _ in sections)
    body = "\n".join(f"<section id='{a}'><h2>{html.escape(h)}</h2>\n{c}\n</section>" for a, h, c in sections)
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n"
        f"<script type='text/javascript'>{get_plotlyjs()}</script>\n</head>\n<body>\n"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p><nav>{nav}</nav></header>\n"
        f"<main>\n{warning}{body}\n</main>\n</body>\n</html>\n"
    )
