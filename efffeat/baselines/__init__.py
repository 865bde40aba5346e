"""Baselines effective features are compared against: neurons, sparse autoencoders and dictionary learning.

`efffeat.compare` scores every registered `Baseline` (`BASELINES`) on a model read at a `Probe`; a new one is one
`register_baseline`. The effective methods read what training changed (ΔW, the kernel change ΔΘ), never the
trained weights.
"""

from __future__ import annotations

from .base import BASELINES, Baseline, Context, Probe, Units, correct_logit, register_baseline
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
    "correct_logit",
    "dictionary",
    "direction_scores",
    "label_scores",
    "neurons",
    "register_baseline",
]
