"""The methods `efffeat.compare` scores: a `Baseline` turns a probed model into units, `register_baseline` adds one.

A model is probed at one layer (`Probe`: named by a zoo run's recipe, or given to `compare`); every method
receives the same `Context` (the model and its θ0, the analysis data, the probed activations ``[N, h]``, the
layer's incoming weight W₁ ``[h, d]``, and effective features on demand) and returns `Units`: ``directions
[n, d]`` in W₁'s input space and/or ``functions [N, n]`` over the data. The run's recipe (or `compare`'s
``truth=`` / ``labels=``) scores them.

Effective units are read from what training *changed* — ΔW = W* − W0 and the kernel change ΔΘ — never from the
trained weights, whose random initial part a neuron baseline already carries:

==================== =================================================================================
method               its units
==================== =================================================================================
``"effective"``      the top-``n_units`` effective groups by RMS contribution (`efffeat.rank`, the probe's
                     group): a parameter W₁[j, i] or a bias b_i is input axis i (``group="param"``); a
                     neuron group is the **change of its row, ΔW₁[j]**, its function its contribution
                     ``Σ_{μ∈G} Δθ_μ φ^E_μ(x)`` (per readout component with ``Probe.per_component``, pooled
                     by RMS; else summed over components)
``"weight-change"``  the top right singular vectors of ΔW₁ (`efffeat.weight_change`): directions only
``"kernel-change"``  eigenfeatures of the centred kernel change ``ΔΘ = Θ_order − Θ_init``
                     (`efffeat.kernel_change`): the top right singular vector of the W₁ block of each
                     change direction ``(J_a − J_b)ᵀu``; its function the eigenfunction u (per readout
                     component with ``Probe.per_component``, pooled by |λ|; else its norm over components)
``"kernel-subspace"`` the input subspace the kernel change reads: top singular vectors of the stacked,
                     |λ|-weighted W₁ blocks of the top-``top`` eigenfeatures (`KernelChange.subspace`)
``"eigen"``          the same for the centred kernel Θ_order itself (no subtraction): what the kernel holds,
                     initialisation included
``"neurons"``        the ``n_units`` probed units with the largest activation variance: the trained row
                     W₁[j] and the activation
``"agop"``           reference, not effective features: top right singular vectors of the input gradients
                     ``∇ₓ readout`` over the data (the average gradient outer product)
``"sae"``, …         a dictionary (`efffeat.baselines.dictionary`) with ``n_units`` components fitted to the
                     probed activations (PCA/ICA: at most the layer width), pulled back to W₁ᵀc, its
                     function the codes; ``fvu`` its fraction of variance unexplained
``"effective-label"`` LABEL-USING: ``"effective"`` with the readout each example's true-class logit
``"label-control"``  LABEL-USING control with no training dynamics: ``a_j(x) · W₂[y(x), j]`` for the same
                     neurons (W₂ the weight reading the probed units, ``Probe.out_weight``)
==================== =================================================================================

A new method is one `Baseline` passed to `register_baseline`::

    def random_directions(context, n_units, seed):
        gen = torch.Generator().manual_seed(seed)
        return Units(directions=torch.randn(n_units, context.weight.shape[1], generator=gen, dtype=torch.float64))

    register_baseline(Baseline("random", random_directions))
    ef.compare(run, methods=["effective", "random"])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .._check import one_of
from .._data import batch_inputs
from ..errors import ConfigError
from . import metrics
from .dictionary import METHODS as DICTIONARY_METHODS
from .dictionary import NONNEGATIVE, dictionary, estimator_options
from .neurons import NeuronActivations

if TYPE_CHECKING:
    from ..dual import DualModel
    from ..features import EffectiveFeatures
    from ..readout import ReadoutSpec

# What a comparison scores: directions in W₁'s input space (ground-truth directions) or functions over the data.
SCORED = ("directions", "functions")


def correct_logit(output: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Readout ``[N]``: the logit of each example's true class (sequence outputs: at the last position).

    It reads the label (``batch[1]``): a readout for label-using comparisons and for training, not for
    label-free features.
    """
    logits = output[:, -1] if output.ndim == 3 else output
    return logits.gather(1, batch[1][:, None].long())[:, 0]


@dataclass(frozen=True)
class Probe:
    """Where `compare` reads a model, and how its units are scored.

    Attributes:
        layer: the module whose activations are read (a name of ``model.named_modules()``).
        weight: the ``state_dict`` name of W₁ ``[h, d]``, the layer's incoming weight: row j is the input
            direction unit j reads.
        at: ``"output"`` or ``"input"`` of that module (`efffeat.baselines.neurons`).
        group: the `efffeat.rank` group of the effective units: ``"param"`` (single parameters, each an input
            axis) or ``"neuron"`` (rows of W₁).
        n_units: the units per method when `compare` is not given ``n_units``.
        readout: the readout the effective methods use (None: the run's or the dual model's). It must not read
            the labels when units are scored against labels.
        per_component: build function units per readout component and pool them (a vector readout such as
            all class logits: each class's contributions or kernel change over all examples).
        scored: ``"directions"`` (against ground-truth directions) or ``"functions"`` (over the data).
        out_weight: the ``state_dict`` name of W₂ ``[K, h]``, the weight that reads the probed units (for the
            ``"label-control"`` method), or None.
    """

    layer: str
    weight: str
    at: str = "output"
    group: str = "neuron"
    n_units: int = 8
    readout: ReadoutSpec | None = None
    per_component: bool = False
    scored: str = "directions"
    out_weight: str | None = None

    def __post_init__(self) -> None:
        one_of("Probe.scored", self.scored, SCORED)
        one_of("Probe.at", self.at, ("output", "input"))


@dataclass
class Units:
    """One method's units: ``directions [n, d]`` in W₁'s input space and/or ``functions [N, n]`` over the data.

    fvu: the fraction of the probed activations' variance the method leaves unexplained, when it reconstructs
    them (dictionaries), else None.
    """

    directions: Tensor | None = None
    functions: Tensor | None = None
    fvu: float | None = None


@dataclass
class Context:
    """What every method's units are computed from: one model, probed at one layer, on one dataset.

    Attributes:
        model: the trained network (θ*); init_state: its state at initialisation (θ0).
        data: the analysis data (a tensor, ``(inputs, targets)`` or an iterable of batches).
        probe: where it is probed; readout: the readout of the effective methods (label-free).
        activations: the probed activations over the data (``activations.values [N, h]``).
        weight: ``[h, d]`` float64, W₁ (``probe.weight``); directions live in its input space (d).
        truth: ``[n_true, d]`` ground-truth directions, or None; labels: ``[N]`` class labels, or None.
        run: the zoo run when the model is one, else None.
        order, nodes: the effective-feature order (and path nodes) of `features`.
        used: ``(order, completeness residual)`` of every feature set a method read at `order` (`compare` resets
            it); the order is the one the features were computed at.
    """

    model: nn.Module
    init_state: Mapping[str, Tensor]
    data: Any
    probe: Probe
    readout: ReadoutSpec
    activations: NeuronActivations
    weight: Tensor
    truth: Tensor | None = None
    labels: Tensor | None = None
    run: Any = None
    order: str = "path"
    nodes: int = 4
    progress: bool = False
    used: list[tuple[str, float]] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)

    def dual(self, label: bool = False) -> DualModel:
        """The float64 `DualModel` of the probe's readout (``label=True``: the true-class logit)."""
        from ..dual import DualModel

        key = ("dual", label)
        if key not in self._cache:
            readout = correct_logit if label else self.readout
            self._cache[key] = DualModel(
                self.model,
                init=self.init_state,
                readout=readout,
                order=self.order,
                nodes=self.nodes,
                dtype=torch.float64,
                progress=self.progress,
            )
        return self._cache[key]

    def features(self, order: str | None = None, label: bool = False) -> EffectiveFeatures:
        """The effective features of the data at `order` (default the comparison's), computed once.

        label: with the true-class-logit readout (LABEL-USING methods only; needs ``labels``).
        """
        key = ("features", order, label)
        if key not in self._cache:
            data = self.data
            if label:
                if self.labels is None:
                    raise ConfigError("a label-using method needs labels: pass compare(..., labels=[N] class labels)")
                data = (batch_inputs(self.data), self.labels)
            feats = self.dual(label).features(data, order=order)
            self._cache[key] = (feats, feats.completeness())
        feats, residual = self._cache[key]
        if order is None:  # the comparison's own order, as the dual model resolved it
            self.used.append((feats.order, residual))
        return feats


@dataclass(frozen=True)
class Baseline:
    """A method `compare` scores.

    Attributes:
        name: the ``methods=`` name.
        units: ``(context, n_units, seed, **options) -> Units``; options are ``compare``'s
            ``method_options[name]``.
        not_applicable: ``context -> reason or None``; a reason skips the method and becomes the row's note.
        note: a note every row of the method carries (e.g. ``"LABEL-USING"``).
        options: ``() -> names`` of the options `units` accepts (default: its keyword parameters after
            ``seed``); `compare` refuses any other.
    """

    name: str
    units: Callable[..., Units]
    not_applicable: Callable[[Context], str | None] | None = None
    note: str | None = None
    options: Callable[[], Collection[str]] | None = None

    def accepted_options(self) -> list[str] | None:
        """The option names `compare`'s ``method_options[name]`` may hold (None: any, for ``**options``)."""
        if self.options is not None:
            return sorted(self.options())
        params = list(inspect.signature(self.units).parameters.values())[3:]
        if any(p.kind == p.VAR_KEYWORD for p in params):
            return None
        return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


BASELINES: dict[str, Baseline] = {}


def register_baseline(baseline: Baseline) -> Baseline:
    """Make a `Baseline` available as ``ef.compare(run, methods=[..., baseline.name])``."""
    if not isinstance(baseline, Baseline):
        raise ConfigError(f"register_baseline takes a Baseline(name, units, ...), got {type(baseline).__name__}")
    if not isinstance(baseline.name, str) or not baseline.name:
        raise ConfigError(f"a baseline's name must be a non-empty string, got {type(baseline.name).__name__}")
    if not callable(baseline.units):
        raise ConfigError(f"baseline {baseline.name!r}: units must be a function (context, n_units, seed) -> Units")
    BASELINES[baseline.name] = baseline
    return baseline


def baseline(name: str) -> Baseline:
    """The registered baseline called `name`."""
    if not isinstance(name, str):
        raise ConfigError(
            f"methods are named by strings such as 'effective' or 'pca', got a {type(name).__name__}; "
            "pass the data as compare(model, data, ...) or data=, and methods= as a list of names"
        )
    if name not in BASELINES:
        raise ConfigError(
            f"unknown method {name!r}; choose from {', '.join(BASELINES)} or add one with "
            "efffeat.baselines.register_baseline"
        )
    return BASELINES[name]


# ---- the methods -----------------------------------------------------------------------------------------
def _top_neurons(context: Context, feats: EffectiveFeatures, n: int | None) -> tuple[list[str], list[int]]:
    """The ids and W₁ rows of the top-n neuron groups of W₁ by RMS contribution (all when n is None)."""
    from ..ranking import rank

    table = rank(feats, by="contribution", group="neuron")
    prefix = f"{context.probe.weight}["
    ids = [i for i in table.ids if i.startswith(prefix)][:n]
    return ids, [int(i[len(prefix) :].split(",")[0]) for i in ids]


def _contributions(feats: EffectiveFeatures, ids: list[str]) -> Tensor:
    """``[N, K, m]``: each group's contribution ``Σ_{μ∈G} Δθ_μ φ^E_μ(x)``."""
    from ..groups import group_positions

    delta = feats.flat_delta()
    out = []
    for gid in ids:
        masked = torch.zeros_like(delta)
        pos = group_positions(feats.ids, gid)
        masked[pos] = delta[pos]
        out.append(feats.matvec(masked).reshape(feats.n_examples, -1))
    return torch.stack(out, dim=2)


def _weight_change_rows(context: Context) -> Tensor:
    """``[h, d]`` float64: ΔW₁ = W₁* − W₁(θ0)."""
    init = context.init_state[context.probe.weight].detach().to(torch.float64)
    return context.weight - init


def _effective(context: Context, n_units: int, seed: int, label: bool = False) -> Units:
    feats = context.features(label=label)
    probe = context.probe
    if probe.group == "param":  # a parameter of W₁[j, i] or of an output bias b_i is input axis i
        from ..ranking import rank

        table = rank(feats, by="contribution", group="param")
        axes = [feats.ids.parse(i).index[-1] for i in table.ids[:n_units]]
        return Units(torch.eye(context.weight.shape[1], dtype=torch.float64)[axes])
    delta_rows = _weight_change_rows(context)
    pooled = probe.per_component and feats.n_outputs > 1 and not label
    ids, rows = _top_neurons(context, feats, None if pooled else n_units)
    contributions = _contributions(feats, ids)  # [N, K, m]
    if not pooled:
        return Units(delta_rows[rows], contributions.sum(dim=1))
    score = contributions.square().mean(dim=0)  # [K, m]
    best = torch.sort(score.T.reshape(-1), descending=True, stable=True).indices[:n_units]  # (group, component)
    group, comp = best // feats.n_outputs, best % feats.n_outputs
    return Units(delta_rows[[rows[g] for g in group.tolist()]], contributions[:, comp, group])


def _label_control(context: Context, n_units: int, seed: int) -> Units:
    feats = context.features(label=True)
    _, rows = _top_neurons(context, feats, n_units)
    assert context.labels is not None and context.probe.out_weight is not None
    w2 = context.model.state_dict()[context.probe.out_weight].detach().to(torch.float64)  # [K, h]
    acts = context.activations.values.to(torch.float64)[:, rows]
    return Units(context.weight[rows], acts * w2[context.labels.long()][:, rows])


def _weight_change(context: Context, n_units: int, seed: int) -> Units:
    right = torch.linalg.svd(_weight_change_rows(context), full_matrices=False).Vh
    return Units(directions=right[:n_units])


def _kernel_units(against: str | None, context: Context, n_units: int, seed: int, center: bool = True) -> Units:
    """Eigenfeatures of the centred ``Θ_order − Θ_against`` (or of Θ_order): W₁-block input directions and
    eigenfunctions, pooled over readout components by |λ| when the probe asks for it."""
    from ..spectra.change import kernel_change

    fa = context.features()
    fb = None if against is None else context.features(order=against)
    n_pairs = fa.n_examples * fa.n_outputs
    components = range(fa.n_outputs) if context.probe.per_component and fa.n_outputs > 1 else [None]
    pool: list[tuple[float, Tensor, Tensor]] = []
    for c in components:
        k = min(n_units, fa.n_examples if c is not None else n_pairs)
        kc = kernel_change(fa, against=fb, k=k, component=c, center=center, seed=seed)
        dirs = kc.input_directions(context.probe.weight)
        funcs = kc.functions if kc.functions.ndim == 2 else kc.functions.norm(dim=1)
        pool += [(abs(float(kc.values[i])), dirs[i], funcs[:, i]) for i in range(len(kc))]
    pool.sort(key=lambda item: -item[0])
    pool = pool[:n_units]
    return Units(torch.stack([d for _, d, _ in pool]), torch.stack([f for _, _, f in pool], dim=1))


def _kernel_subspace(context: Context, n_units: int, seed: int, top: int = 4, center: bool = True) -> Units:
    from ..spectra.change import kernel_change

    fa, fb = context.features(), context.features(order="init")
    kc = kernel_change(fa, against=fb, k=min(top, fa.n_examples * fa.n_outputs), center=center, seed=seed)
    rows = context.weight.shape[0] * len(kc)
    return Units(directions=kc.subspace(context.probe.weight, min(n_units, rows, context.weight.shape[1])))


def _neurons(context: Context, n_units: int, seed: int) -> Units:
    acts = context.activations.values
    top = acts.var(dim=0).argsort(descending=True, stable=True)[:n_units]
    return Units(context.weight[top], acts[:, top])


def _agop(context: Context, n_units: int, seed: int) -> Units:
    """Top right singular vectors of the input gradients of every readout component, ``[N·K, d]``."""
    from ..readout import Readout

    readout = Readout(context.readout)
    x = batch_inputs(context.data).detach().to(torch.float64).requires_grad_(True)
    batch = (x, *context.data[1:]) if isinstance(context.data, tuple) else x
    model = context.dual().model
    z = readout(model(x), batch)
    grads = [torch.autograd.grad(z[:, c].sum(), x, retain_graph=True)[0] for c in range(z.shape[1])]
    stacked = torch.cat(grads).reshape(-1, x.shape[1])
    return Units(directions=torch.linalg.svd(stacked, full_matrices=False).Vh[:n_units])


def _dictionary(method: str, context: Context, n_units: int, seed: int, **options: Any) -> Units:
    """Components ordered by the activation variance they explain (code variance × ‖component‖²)."""
    acts = context.activations.values
    fitted = dictionary(acts, method, n_units, random_state=seed, **options)
    components, codes = fitted.components_.double(), fitted.transform(acts).double()
    order = (codes.var(dim=0) * components.square().sum(dim=1)).argsort(descending=True, stable=True)
    return Units(components[order] @ context.weight, codes[:, order], metrics.fvu(acts, fitted.reconstruct(acts)))


# ---- when a method does not apply ------------------------------------------------------------------------
def _signed_activations(context: Context) -> str | None:
    negative = bool((context.activations.values < 0).any())
    return "the probed activations take negative values" if negative else None


def _directions_only(context: Context) -> str | None:
    return (
        "it gives directions only, and this comparison scores functions"
        if context.probe.scored == "functions"
        else None
    )


def _needs_change(context: Context) -> str | None:
    return "the kernel change against init is zero at order 'init'" if context.dual().order == "init" else None


def _needs_labels(context: Context) -> str | None:
    if context.probe.scored != "functions" or context.labels is None:
        return "it needs class labels and a comparison scored over functions"
    return None


def _needs_out_weight(context: Context) -> str | None:
    return _needs_labels(context) or (
        None if context.probe.out_weight is not None else "the probe names no out_weight W₂ reading the probed units"
    )


def _float_inputs(context: Context) -> str | None:
    reason = _directions_only(context)
    if reason is not None:
        return reason
    if not isinstance(context.data, Tensor | tuple):
        return "it needs the data as a tensor or an (inputs, ...) tuple"
    x = batch_inputs(context.data)
    if not x.is_floating_point() or x.ndim != 2 or x.shape[1] != context.weight.shape[1]:
        return "the model's inputs are not the probed weight's input space [N, d]"
    return None


def _first(*checks: Callable[[Context], str | None]) -> Callable[[Context], str | None]:
    def check(context: Context) -> str | None:
        return next((r for r in (c(context) for c in checks) if r is not None), None)

    return check


_LABEL_USING = "LABEL-USING: the readout is each example's true-class logit"
register_baseline(Baseline("effective", _effective, options=lambda: []))
register_baseline(Baseline("weight-change", _weight_change, not_applicable=_directions_only))
register_baseline(Baseline("kernel-change", partial(_kernel_units, "init"), _needs_change, options=lambda: ["center"]))
register_baseline(
    Baseline(
        "kernel-subspace", _kernel_subspace, _first(_directions_only, _needs_change), options=lambda: ["top", "center"]
    )
)
register_baseline(Baseline("eigen", partial(_kernel_units, None), options=lambda: ["center"]))
register_baseline(Baseline("neurons", _neurons))
register_baseline(
    Baseline("agop", _agop, not_applicable=_float_inputs, note="reference: input gradients, not effective features")
)
for _method in DICTIONARY_METHODS:
    register_baseline(
        Baseline(
            _method,
            partial(_dictionary, _method),
            not_applicable=_signed_activations if _method in NONNEGATIVE else None,
            options=partial(estimator_options, _method),
        )
    )
register_baseline(Baseline("effective-label", partial(_effective, label=True), _needs_labels, _LABEL_USING, lambda: []))
register_baseline(
    Baseline("label-control", _label_control, _needs_out_weight, "LABEL-USING control: a_j(x)·W₂[y(x), j], no training")
)
