"""Baselines effective features are compared against: neurons, sparse autoencoders and dictionary learning."""

from __future__ import annotations

from .dictionary import METHODS, Dictionary, dictionary
from .neurons import NeuronActivations, neurons
from .sae import SparseAutoencoder

__all__ = ["METHODS", "Dictionary", "NeuronActivations", "SparseAutoencoder", "dictionary", "neurons"]
