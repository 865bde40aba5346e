"""Spectra of effective kernels: eigenfeatures, cliffs, feature families, Fourier analysis, tracking.

The one kernel entry is `efffeat.EffectiveFeatures.kernel` (full, layerwise, output-reduced; rows flattened
example-major ``n·K + k`` wherever the readout components are flattened); everything here works on it or on
the factored operator behind it.

=================  ==========================================================================================
file               what
=================  ==========================================================================================
``operator.py``    `KernelOperator`: ``J Jᵀ`` of chosen tensors as an operator on the factors
``spectrum.py``    `Spectrum` (eigenvalues, eigenfunctions, parameter directions, cliffs), `eigenfeatures`
                   (Lanczos / dense), `flattened_modes` (``P × P`` Gram), `eigenmodes` (any kernel matrix)
``change.py``      `kernel_change` (eigenfeatures of ΔΘ = Θ_order − Θ_init, signed, factored): `KernelChange`;
                   `weight_change` (singular vectors of ΔW per tensor)
``families.py``    `overlap` of eigenvector blocks with feature families, `argmax_features`
``fourier.py``     Fourier bases and families of modular arithmetic, embedding key frequencies
``tracking.py``    `track` an analysis over checkpoints and its derivative
=================  ==========================================================================================

The protocol of eNTK feature identification (Lin 2025, arXiv 2510.00468) is these options on any features:
layerwise kernels (``params=``), output reductions (``reduce="flatten" | "diagonal" | "pairs"``) with
importance weights, a ridge of ``1e-8 · mean(diag)`` before eigenvectors, overlaps ``‖Qᵀ F‖²_F`` with
families, cliffs of the spectrum, and tracking over training.
"""

from __future__ import annotations

from ..features import REDUCTIONS, importance_weights, reduce_outputs
from .change import ChangeEigenfeature, KernelChange, WeightChange, component_features, kernel_change, weight_change
from .families import argmax_features, orthonormal_columns, overlap
from .fourier import (
    dft_matrix,
    fourier_alignment,
    fourier_basis,
    frequency_norms,
    key_frequencies,
    modadd_fourier_families,
)
from .operator import KernelOperator
from .spectrum import (
    DEFAULT_RIDGE,
    METHODS,
    Cliff,
    Eigenfeature,
    Spectrum,
    drop_ratios,
    eigenfeatures,
    eigenmodes,
    flattened_modes,
    spectral_cliffs,
)
from .tracking import Tracking, central_difference, track

__all__ = [
    "DEFAULT_RIDGE",
    "METHODS",
    "REDUCTIONS",
    "ChangeEigenfeature",
    "Cliff",
    "Eigenfeature",
    "KernelChange",
    "KernelOperator",
    "Spectrum",
    "Tracking",
    "WeightChange",
    "argmax_features",
    "central_difference",
    "component_features",
    "dft_matrix",
    "drop_ratios",
    "eigenfeatures",
    "eigenmodes",
    "flattened_modes",
    "fourier_alignment",
    "fourier_basis",
    "frequency_norms",
    "importance_weights",
    "kernel_change",
    "key_frequencies",
    "modadd_fourier_families",
    "orthonormal_columns",
    "overlap",
    "reduce_outputs",
    "spectral_cliffs",
    "track",
    "weight_change",
]
