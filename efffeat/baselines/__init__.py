"""Baselines effective features are compared against: neurons, sparse autoencoders and dictionary learning.

`efffeat.compare` scores every registered `Baseline` (`BASELINES`); a new one is one `register_baseline`.
"""

from __future__ import annotations

from .base import BASELINES, Baseline, Context, Probe, Units, register_baseline
from .dictionary import Dictionary, dictionary
from .neurons import NeuronActivations, neurons
from .sae import SparseAutoencoder
from .scores import direction_scores, label_scores

__all__ = [
    "BASELINES",
    "Baseline",
    "Context",
    "Dictionary",
    "NeuronActivations",
    "Probe",
    "SparseAutoencoder",
    "Units",
    "dictionary",
    "direction_scores",
    "label_scores",
    "neurons",
    "register_baseline",
]
