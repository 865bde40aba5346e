"""The methods `efffeat.compare` scores: a `Baseline` turns a probed run into units, `register_baseline` adds one.

A run is probed at one layer (`Probe`, named by the run's recipe); every method receives the same `Context`
(the run, the probed activations ``[N, h]``, the layer's incoming weight W₁ ``[h, d]`` and, when a requested
method needs them, the run's effective features) and returns `Units`: ``directions [n, d]`` in W₁'s input
space and/or ``functions [N, n]`` over the data. The recipe scores them against its ground truth.

=================  ====================================================================================
method             its units
=================  ====================================================================================
``"effective"``    the top-``n_units`` effective features by RMS contribution (`efffeat.rank` with the
                   probe's group): a parameter W₁[j, i] or a bias b_i is input axis i (``group="param"``);
                   a neuron group ``"W₁[j,:]"`` is the row W₁[j], its function its contribution
                   ``Σ_{μ∈G} Δθ_μ φ^E_μ(x)`` summed over readout components
``"eigen"``        the top-``n_units`` eigenfeatures of the effective kernel (`efffeat.eigenfeatures`): the
                   top right singular vector of the eigenfeature's W₁ block (the input direction that
                   perturbation reads), its function the eigenfunction (its norm over readout components)
``"neurons"``      the ``n_units`` probed units with the largest activation variance: the row W₁[j] and
                   the activation
``"sae"``, …       a dictionary (`efffeat.baselines.dictionary`, one registration per method of it) with
                   ``n_units`` components fitted to the probed activations (PCA/ICA: at most the layer
                   width): a component c is pulled back to W₁ᵀc, its function the codes; ``fvu`` its
                   fraction of variance unexplained
=================  ====================================================================================

A new method is one `Baseline` passed to `register_baseline`::

    def random_directions(context, n_units, seed):
        gen = torch.Generator().manual_seed(seed)
        return Units(directions=torch.randn(n_units, context.weight.shape[1], generator=gen, dtype=torch.float64))

    register_baseline(Baseline("random", random_directions))
    ef.compare(run, methods=["effective", "random"])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import ConfigError
from . import metrics
from .dictionary import METHODS as DICTIONARY_METHODS
from .dictionary import NONNEGATIVE, dictionary
from .neurons import NeuronActivations

if TYPE_CHECKING:
    from ..features import EffectiveFeatures


@dataclass(frozen=True)
class Probe:
    """Where `compare` reads a model: the activation layer, and the weight whose rows are its units.

    Attributes:
        layer: the module whose activations are read (a name of ``model.named_modules()``).
        at: ``"output"`` or ``"input"`` of that module (`efffeat.baselines.neurons`).
        weight: the ``state_dict`` name of W₁ ``[h, d]``, the layer's incoming weight: row j is the input
            direction unit j reads.
        group: the `efffeat.rank` group of the effective units: ``"param"`` (single parameters, each an input
            axis) or ``"neuron"`` (rows of W₁).
        n_units: the units per method when `compare` is not given ``n_units``.
    """

    layer: str
    at: str
    weight: str
    group: str
    n_units: int


@dataclass
class Units:
    """One method's units: ``directions [n, d]`` in W₁'s input space and/or ``functions [N, n]`` over the data.

    fvu: the fraction of the probed activations' variance the method leaves unexplained, when it reconstructs
    them (dictionaries), else None.
    """

    directions: Tensor | None = None
    functions: Tensor | None = None
    fvu: float | None = None


@dataclass(frozen=True)
class Context:
    """What every method's units are computed from: one run, probed at one layer.

    Attributes:
        run: the trained zoo run (``run.model``, ``run.data``, ``run.ground_truth``, ``run.config``).
        probe: where it is probed.
        activations: the probed activations over ``run.data`` (``activations.values [N, h]``).
        weight: ``[h, d]`` float64, W₁ (``probe.weight``); directions live in its input space (d).
        features: the run's effective features on ``run.data`` (float64, at `compare`'s order) when a requested
            method ``needs_features``, else None.
    """

    run: Any
    probe: Probe
    activations: NeuronActivations
    weight: Tensor
    features: EffectiveFeatures | None = None


@dataclass(frozen=True)
class Baseline:
    """A method `compare` scores.

    Attributes:
        name: the ``methods=`` name.
        units: ``(context, n_units, seed, **options) -> Units``; options are ``compare``'s
            ``method_options[name]``.
        needs_features: `units` reads ``context.features`` (`compare` computes them once for every method).
        not_applicable: ``context -> reason or None``; a reason skips the method and becomes the row's note.
    """

    name: str
    units: Callable[..., Units]
    needs_features: bool = False
    not_applicable: Callable[[Context], str | None] | None = None


BASELINES: dict[str, Baseline] = {}


def register_baseline(baseline: Baseline) -> Baseline:
    """Make a `Baseline` available as ``ef.compare(run, methods=[..., baseline.name])``."""
    if not isinstance(baseline, Baseline):
        raise ConfigError(f"register_baseline takes a Baseline(name, units, ...), got {type(baseline).__name__}")
    if not isinstance(baseline.name, str) or not baseline.name:
        raise ConfigError(f"a baseline's name must be a non-empty string, got {baseline.name!r}")
    if not callable(baseline.units):
        raise ConfigError(f"baseline {baseline.name!r}: units must be a function (context, n_units, seed) -> Units")
    BASELINES[baseline.name] = baseline
    return baseline


def baseline(name: str) -> Baseline:
    """The registered baseline called `name`."""
    if name not in BASELINES:
        raise ConfigError(
            f"unknown method {name!r}; choose from {', '.join(BASELINES)} or add one with "
            "efffeat.baselines.register_baseline"
        )
    return BASELINES[name]


# ---- the methods -----------------------------------------------------------------------------------------
def _effective(context: Context, n_units: int, seed: int) -> Units:
    from ..groups import group_positions
    from ..ranking import rank

    feats, w1, probe = context.features, context.weight, context.probe
    assert feats is not None
    table = rank(feats, by="contribution", group=probe.group)
    if probe.group == "param":  # a parameter of W₁[j, i] or of an output bias b_i is input axis i
        axes = [feats.ids.parse(i).index[-1] for i in table.ids[:n_units]]
        return Units(torch.eye(w1.shape[1], dtype=torch.float64)[axes])
    prefix = f"{probe.weight}["
    ids = [i for i in table.ids if i.startswith(prefix)][:n_units]
    rows = [int(i[len(prefix) :].split(",")[0]) for i in ids]
    delta = feats.flat_delta()
    functions = []
    for gid in ids:
        masked = torch.zeros_like(delta)
        pos = group_positions(feats.ids, gid)
        masked[pos] = delta[pos]
        functions.append(feats.matvec(masked).reshape(feats.n_examples, -1).sum(dim=1))
    return Units(w1[rows], torch.stack(functions, dim=1))


def _eigen(context: Context, n_units: int, seed: int) -> Units:
    from ..spectra import eigenfeatures

    feats = context.features
    assert feats is not None
    eig = eigenfeatures(feats, k=min(n_units, feats.n_examples * feats.n_outputs), seed=seed)
    slot = feats.ids.slot(context.probe.weight)
    directions = []
    for i in range(len(eig)):
        block = eig.directions(i)[slot.offset : slot.offset + slot.numel].reshape(slot.shape).double()
        directions.append(torch.linalg.svd(block, full_matrices=False).Vh[0])
    functions = eig.functions if eig.functions.ndim == 2 else eig.functions.square().sum(dim=1).sqrt()
    return Units(torch.stack(directions), functions)


def _neurons(context: Context, n_units: int, seed: int) -> Units:
    acts = context.activations.values
    top = acts.var(dim=0).argsort(descending=True, stable=True)[:n_units]
    return Units(context.weight[top], acts[:, top])


def _dictionary(method: str, context: Context, n_units: int, seed: int, **options: Any) -> Units:
    acts = context.activations.values
    fitted = dictionary(acts, method, n_units, random_state=seed, **options)
    return Units(
        fitted.components_.double() @ context.weight,
        fitted.transform(acts),
        metrics.fvu(acts, fitted.reconstruct(acts)),
    )


def _signed_activations(context: Context) -> str | None:
    negative = bool((context.activations.values < 0).any())
    return "the probed activations take negative values" if negative else None


register_baseline(Baseline("effective", _effective, needs_features=True))
register_baseline(Baseline("eigen", _eigen, needs_features=True))
register_baseline(Baseline("neurons", _neurons))
for _method in DICTIONARY_METHODS:
    register_baseline(
        Baseline(
            _method,
            partial(_dictionary, _method),
            not_applicable=_signed_activations if _method in NONNEGATIVE else None,
        )
    )
