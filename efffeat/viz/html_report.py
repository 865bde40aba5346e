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
nav a { color: #c5cde0; margin-right: 14px; font-size: 13px; }
"""


def report(
    source: Any,
    *args: Any,
    comparison: Any = None,
    orders: Sequence[str] = ORDERS,
    top: int = 5,
    title: str | None = None,
    figures_extra: Mapping[str, go.Figure] | None = None,
    dashboard_options: Mapping[str, Any] | None = None,
    **analysis_options: Any,
) -> Path:
    """Write one HTML report of an analysis to `path` (atomically) and return the path.

    ``report(analysis, path)`` reports an `efffeat.Analysis` (nothing it already holds is computed again);
    ``report(dual, data, path, by=..., group=..., n_eigen=...)`` analyses `data` first (options as
    `efffeat.Analysis`). Sections: the summary (model, parameters, examples, readout, the completeness of
    each of `orders`, each computed once), the ranking, the dashboards of the `top` ranked features, the
    spectrum of the effective kernel, the comparison with baselines when `comparison` is given, and any
    `figures_extra` ({title: figure}).

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
    dual, data, features, table = an.dual, an.data, an.features, an.table
    completeness = an.completeness_by_order(orders)
    sections = [("summary", "Summary", _summary_html(dual, features, completeness))]
    sections.append(("ranking", "Ranking", _figure_html(figures.ranking(table, top=30))))
    options = dict(dashboard_options or {})
    dashboards = [
        f"<h3>{i + 1}. {html.escape(fid)}</h3>"
        + _figure_html(
            feature_dashboard(
                dual, fid, data=data, features=features, table=table, completeness=an.completeness(), **options
            )
        )
        for i, fid in enumerate(table.ids[:top])
    ]
    if dashboards:
        sections.append(("dashboards", f"Top {len(dashboards)} features", "\n".join(dashboards)))
    if an.spectrum is not None:
        sections.append(("spectrum", "Spectrum of the effective kernel", _figure_html(figures.spectrum(an.spectrum))))
    if comparison is not None:
        body = _records_html(figures.as_records(comparison)) + _figure_html(figures.comparison(comparison))
        sections.append(("comparison", "Comparison with baselines", body))
    for name, fig in (figures_extra or {}).items():
        sections.append((_anchor(name), name, _figure_html(fig)))
    title = title or f"efffeat report: {type(dual.model).__name__}"
    write_text_atomic(path, _page(title, _subtitle(dual, features, an.completeness()), sections))
    return path


def _summary_html(dual: Any, features: Any, completeness: Mapping[str, float]) -> str:
    rows = [
        ("model", type(dual.model).__name__),
        ("parameters (features per readout component)", f"{dual.n_features:,}"),
        ("examples", f"{features.n_examples:,}"),
        ("readout", f"{dual.readout.name} ({'scalar' if features.scalar else f'{features.n_outputs} components'})"),
        ("order of the features shown", features.order),
        ("|Δθ| = |θ* − θ0|", f"{dual.delta_norm():.4g}"),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    orders = "".join(f"<tr><td>{html.escape(o)}</td><td class='num'>{c:.3g}</td></tr>" for o, c in completeness.items())
    return (
        f"<table class='data'>{body}</table>"
        "<p class='note'>Completeness residual ‖Σ Δθ·φᴱ − Δz‖ / ‖Δz‖ of the dual regression model at each order: "
        "0 means the effective features explain the trained network's change Δz exactly.</p>"
        f"<table class='data'><tr><th>order</th><th>completeness residual</th></tr>{orders}</table>"
    )


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


def _page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    nav = "".join(f"<a href='#{a}'>{html.escape(h)}</a>" for a, h, _ in sections)
    body = "\n".join(f"<section id='{a}'><h2>{html.escape(h)}</h2>\n{c}\n</section>" for a, h, c in sections)
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n"
        f"<script type='text/javascript'>{get_plotlyjs()}</script>\n</head>\n<body>\n"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p><nav>{nav}</nav></header>\n"
        f"<main>\n{body}\n</main>\n</body>\n</html>\n"
    )
