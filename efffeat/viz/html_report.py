"""`report`: one self-contained HTML page per analysis (plotly's JavaScript inlined, so it opens offline)."""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from ..errors import ConfigError
from . import figures
from .dashboard import feature_dashboard

ALL_ORDERS = ("init", "nlo", "trained", "path")
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
    dual: Any,
    data: Any,
    path: str | os.PathLike,
    *,
    features: Any = None,
    table: Any = None,
    eigen: Any = None,
    comparison: Any = None,
    orders: Sequence[str] = ALL_ORDERS,
    by: str = "contribution",
    group: str = "neuron",
    top: int = 5,
    n_eigen: int = 20,
    title: str | None = None,
    figures_extra: Mapping[str, go.Figure] | None = None,
    dashboard_options: Mapping[str, Any] | None = None,
) -> Path:
    """Write one HTML report of an analysis to `path` (atomically) and return the path.

    Sections: the summary (model, parameters, examples, readout, the completeness of every order), the
    ranking, the dashboards of the `top` ranked features, the spectrum of the effective kernel, the
    comparison with baselines when `comparison` is given, and any `figures_extra` ({title: figure}).

    Args:
        dual: the `DualModel`.
        data: a tensor of inputs or an ``(inputs, targets)`` tuple (the examples shown in the dashboards).
        path: the ``.html`` file to write; its directory must exist.
        features, table, eigen: precomputed ``dual.features(data)``, ``ef.rank(...)`` and
            ``ef.eigenfeatures(...)``; computed here when None (`by`, `group`, `n_eigen`).
        comparison: an ``ef.compare`` `ComparisonTable` (or its records).
        orders: the orders whose completeness the summary lists.
        dashboard_options: extra keyword arguments of `feature_dashboard` (``input_kind``, ``decode``...).

    Example::

        ef.report(dual, run.data, "runs/tms/report.html")
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(
            f"cannot write the report to {str(path)!r}: the directory {str(path.parent)!r} does not exist"
        )
    if not isinstance(top, int) or top < 0:
        raise ConfigError(f"top must be a non-negative integer, got {top!r}")
    if features is None:
        features = dual.features(data)
    if table is None:
        from ..ranking import rank

        table = rank(features, by=by, group=group)
    if eigen is None and n_eigen:
        from ..kernels import eigenfeatures

        # the kernel J Jᵀ has rank at most min(N·K, P): no more eigenpairs are worth asking for
        eigen = eigenfeatures(features, k=min(n_eigen, features.n_examples * features.n_outputs, dual.n_features))
    completeness = {o: dual.completeness(data, order=o) for o in orders}
    sections = [("summary", "Summary", _summary_html(dual, features, completeness))]
    sections.append(("ranking", "Ranking", _figure_html(figures.ranking(table, top=30))))
    options = dict(dashboard_options or {})
    dashboards = [
        f"<h3>{i + 1}. {html.escape(fid)}</h3>"
        + _figure_html(feature_dashboard(dual, fid, data=data, features=features, table=table, **options))
        for i, fid in enumerate(table.ids[:top])
    ]
    if dashboards:
        sections.append(("dashboards", f"Top {len(dashboards)} features", "\n".join(dashboards)))
    if eigen is not None:
        sections.append(("spectrum", "Spectrum of the effective kernel", _figure_html(figures.spectrum(eigen))))
    if comparison is not None:
        body = _records_html(figures.as_records(comparison)) + _figure_html(figures.comparison(comparison))
        sections.append(("comparison", "Comparison with baselines", body))
    for name, fig in (figures_extra or {}).items():
        sections.append((_anchor(name), name, _figure_html(fig)))
    title = title or f"efffeat report: {type(dual.model).__name__}"
    _write_atomic(path, _page(title, _subtitle(dual, features), sections))
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


def _subtitle(dual: Any, features: Any) -> str:
    return (
        f"{type(dual.model).__name__} · {dual.n_features:,} parameters · {features.n_examples:,} examples · "
        f"order {features.order} · completeness residual {features.completeness():.3g}"
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


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
