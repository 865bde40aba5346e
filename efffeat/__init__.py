"""efffeat: interpretability with effective features.

A trained network is, to next-to-leading order in 1/width, a linear regression on *effective features* —
per-parameter gradient features corrected by second-derivative meta-features (Roberts, Yaida & Hanin,
*The Principles of Deep Learning Theory*). efffeat extracts them with hooks in factored form, builds the
dual regression model ``f(x; θ*) = f(x; θ0) + Σ_μ Δθ_μ φ^E_μ(x)`` and ranks, searches and visualises them.

``import efffeat`` loads the engine only; the parts that need plotly, scipy, scikit-learn or TransformerLens
(`viz`, `report`, `baselines`, `compare`, `register_baseline`, `theory`, `zoo`, `distributed`) load on first
use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import groups, ids, io, readouts, spectra
from ._version import __version__
from .analysis import Analysis, analyse
from .dual import INIT_KINDS, ORDERS, CompletenessWarning, DualModel, PrecisionWarning
from .errors import (
    ConfigError,
    DataError,
    EfffeatError,
    FeatureIdError,
    InitStateError,
    MemoryBudgetError,
    MissingDependencyError,
    NonFiniteError,
    ReadoutError,
    SaveFileError,
    UnsupportedModelError,
)
from .factors import DenseFactor, EmbeddingFactor, LowRankFactor
from .features import EffectiveFeatures
from .ids import FeatureIds, ParsedId
from .ids import parse as parse_id
from .io import load, save
from .nn import TransposedLinear
from .ranking import Criterion, FeatureTable, per_example_norms, rank, register_criterion
from .readout import Readout
from .rules import FallbackWarning, Rule, register_rule
from .search import TopK, max_activating, synthesize
from .spectra import KernelChange, Spectrum, eigenfeatures, kernel_change, weight_change

if TYPE_CHECKING:
    from . import baselines, distributed, metrics, theory, viz, zoo
    from .baselines import register_baseline
    from .baselines.compare import ComparisonTable, compare
    from .viz import report

# name -> (module, attribute or None for the module itself), imported on first access
_LAZY: dict[str, tuple[str, str | None]] = {
    "baselines": (".baselines", None),
    "distributed": (".distributed", None),
    "metrics": (".baselines.metrics", None),
    "theory": (".theory", None),
    "viz": (".viz", None),
    "zoo": (".zoo", None),
    "compare": (".baselines.compare", "compare"),
    "ComparisonTable": (".baselines.compare", "ComparisonTable"),
    "report": (".viz", "report"),
    "register_baseline": (".baselines", "register_baseline"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'efffeat' has no attribute {name!r}")
    module, attr = _LAZY[name]
    loaded = importlib.import_module(module, __name__)
    value = loaded if attr is None else getattr(loaded, attr)
    globals()[name] = value
    return value


__all__ = [
    "ORDERS",
    "INIT_KINDS",
    "Analysis",
    "ComparisonTable",
    "CompletenessWarning",
    "ConfigError",
    "Criterion",
    "DataError",
    "DenseFactor",
    "EmbeddingFactor",
    "DualModel",
    "EffectiveFeatures",
    "EfffeatError",
    "FallbackWarning",
    "FeatureIdError",
    "FeatureIds",
    "ParsedId",
    "parse_id",
    "FeatureTable",
    "InitStateError",
    "KernelChange",
    "LowRankFactor",
    "MemoryBudgetError",
    "MissingDependencyError",
    "NonFiniteError",
    "PrecisionWarning",
    "Readout",
    "ReadoutError",
    "Rule",
    "SaveFileError",
    "Spectrum",
    "TopK",
    "TransposedLinear",
    "UnsupportedModelError",
    "__version__",
    "analyse",
    "baselines",
    "compare",
    "distributed",
    "eigenfeatures",
    "groups",
    "ids",
    "io",
    "kernel_change",
    "load",
    "max_activating",
    "metrics",
    "per_example_norms",
    "rank",
    "readouts",
    "register_baseline",
    "register_criterion",
    "register_rule",
    "report",
    "save",
    "spectra",
    "synthesize",
    "theory",
    "viz",
    "weight_change",
    "zoo",
]
