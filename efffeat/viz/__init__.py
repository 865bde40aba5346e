"""Figures and reports: what a user looks at (plotly).

Every function takes results (features, rankings, eigenfeatures, weights, spectra, comparison tables) and draws
them; the computing is done by the rest of efffeat (a zoo run's own figures: ``run.recipe.figures(run)``).

- `feature_dashboard`: one feature, group, eigenfeature or neuron on one page — a `Dashboard` (its plotly
  figure, and token sequences as highlighted HTML), shown as it is in a notebook.
- `ranking`, `spectrum`, `tms_geometry`, `fourier`, `comparison`, `scaling`: one figure each.
- `report`: one self-contained HTML file per analysis, with a legend per section and a warning when the
  completeness residual is large.
"""

from __future__ import annotations

from .dashboard import Dashboard, feature_dashboard
from .figures import comparison, fourier, ranking, scaling, spectrum, tms_geometry
from .html_report import report

__all__ = [
    "Dashboard",
    "comparison",
    "feature_dashboard",
    "fourier",
    "ranking",
    "report",
    "scaling",
    "spectrum",
    "tms_geometry",
]
