"""efffeat: interpretability with effective features.

A trained network is, to next-to-leading order in 1/width, a linear regression on *effective features* —
per-parameter gradient features corrected by second-derivative meta-features (Roberts, Yaida & Hanin,
*The Principles of Deep Learning Theory*). efffeat extracts them with hooks in factored form, builds the
dual regression model ``f(x; θ*) = f(x; θ0) + Σ_μ Δθ_μ φ^E_μ(x)`` and ranks, searches and visualises them.
"""

from __future__ import annotations

from . import baselines, distributed, io, metrics, spectral, theory, viz, zoo
from .capture import FallbackWarning
from .compare import ComparisonTable, compare
from .dual import ORDERS, DualModel
from .errors import (
    ConfigError,
    DataError,
    EfffeatError,
    FeatureIdError,
    InitStateError,
    MemoryBudgetError,
    NonFiniteError,
    ReadoutError,
    SaveFileError,
    UnsupportedModelError,
)
from .factors import DenseFactor, LowRankFactor
from .features import EffectiveFeatures
from .ids import FeatureIds
from .io import load, save
from .kernels import Eigenfeatures, eigenfeatures
from .nn import TransposedLinear
from .ranking import FeatureTable, rank
from .readout import Readout
from .search import TopK, max_activating, synthesize
from .viz import report

__version__ = "0.1.0"

__all__ = [
    "ComparisonTable",
    "ConfigError",
    "DataError",
    "DenseFactor",
    "DualModel",
    "EffectiveFeatures",
    "EfffeatError",
    "Eigenfeatures",
    "FallbackWarning",
    "FeatureIdError",
    "FeatureIds",
    "FeatureTable",
    "InitStateError",
    "LowRankFactor",
    "MemoryBudgetError",
    "NonFiniteError",
    "ORDERS",
    "Readout",
    "ReadoutError",
    "SaveFileError",
    "TopK",
    "TransposedLinear",
    "UnsupportedModelError",
    "baselines",
    "compare",
    "distributed",
    "eigenfeatures",
    "io",
    "load",
    "max_activating",
    "metrics",
    "rank",
    "report",
    "save",
    "spectral",
    "synthesize",
    "theory",
    "viz",
    "zoo",
]
