"""`compare`: effective features and the baselines, scored side by side on the same model, data and budget.

Every method (`efffeat.baselines.Baseline`, the table of methods in `efffeat.baselines.base`) gets the same
analysis data, the same probed layer and the same number of units (``n_units``). Where the model is read
(`efffeat.baselines.Probe`: the layer, the weight W₁ ``[h, d]`` whose rows are its units, the readout of the
effective methods) and how units meet the ground truth come from a zoo run's recipe (``Recipe.probe``,
``Recipe.score``) or, for any other model, from ``compare(dual, data, probe=..., truth=... | labels=...)``:

- **ground-truth directions** ``[n_true, d]`` in W₁'s input space (TMS: the input axes; teacher–student: the
  planted subspace U) — `efffeat.baselines.direction_scores`: MMCS, and for a subspace the share of it the top
  units span (principal angles), their recall, and the fraction of each unit inside it.
- **labels** ``[N]`` (digits; any classifier) — functions over the data: top-20 label purity and class
  selectivity of |unit value|, and purity with each signed function counted as its two ends
  (`efffeat.baselines.label_scores`). The effective methods use a readout that does not read the label; the
  label-using variant and its control are separate, marked methods.
- **modular addition** — functions over all p² pairs: Fourier concentration, power on the neurons' key
  frequencies and the key-frequency match (the recipe's score).

Effective features are computed in float64 at `order` (default ``"path"``, the order that explains a network
far from its initialisation). Each row that read them carries that order's completeness residual, the table's
meta holds it too, and a `UserWarning` says so once when it is above 0.5: such features do not explain the
network.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import io
from .._check import positive_int
from .._savable import register
from ..dual import CompletenessWarning
from ..errors import ConfigError, DataError
from .base import SCORED, Baseline, Context, Probe, Units, baseline
from .neurons import neurons
from .scores import direction_scores, label_scores


@register
class ComparisonTable:
    """Scores of every method on one run: rows of ``{column: value}`` plus the run's description in `meta`.

    ``print(table)`` shows a Markdown table; ``to_records()`` gives the rows as dicts.
    """

    def __init__(self, rows: list[dict[str, Any]], meta: dict[str, Any]):
        self.rows = rows
        self.meta = meta

    @property
    def columns(self) -> list[str]:
        cols: list[str] = []
        for row in self.rows:
            cols += [c for c in row if c not in cols]
        return cols

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, method: str) -> dict[str, Any]:
        for row in self.rows:
            if row["method"] == method:
                return row
        raise KeyError(f"no method {method!r} in this table; it has {[r['method'] for r in self.rows]}")

    def to_records(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows]

    def render(self) -> str:
        cols = self.columns
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
        head = ", ".join(f"{k}={_fmt(v)}" for k, v in self.meta.items() if k != "config")
        return f"{head}\n\n" + "\n".join(lines)

    def __repr__(self) -> str:
        return self.render()

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        """No tensors; rows and meta as JSON (Python's JSON round-trips floats exactly)."""
        return {}, {"rows": self.to_records(), "meta": dict(self.meta)}

    @classmethod
    def validate_state(cls, tensors: dict[str, Tensor], meta: dict) -> None:
        """Refuse (`SaveFileError`) rows that are not ``{"method": name, column: value}`` with distinct methods."""
        io.tensor_names(tensors, set())
        m = io.record(meta, "meta", {"rows": io.list_of(_row), "meta": io.dict_of()})
        io.list_of(io.text(), unique=True)([r["method"] for r in m["rows"]], "meta.rows' methods")

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict) -> ComparisonTable:
        return cls([dict(r) for r in meta["rows"]], dict(meta["meta"]))


def _row(value: Any, where: str) -> dict[str, Any]:
    """A table row: ``{"method": name, column: cell, ...}``."""
    return io.record(value, where, {"method": io.text()}, others=_cell)


def _cell(value: Any, where: str) -> Any:
    """A table cell: a number, a string, true/false or null."""
    if value is not None and not isinstance(value, int | float | str):
        io.invalid(where, "a number, a string, true/false or null", value)
    return value


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


DEFAULT_METHODS = ("effective", "weight-change", "kernel-change", "eigen", "neurons", "sae", "pca")


def compare(
    source: Any,
    data: Any = None,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    probe: Probe | None = None,
    truth: Tensor | None = None,
    labels: Tensor | None = None,
    n_units: int | None = None,
    order: str = "path",
    nodes: int = 4,
    seed: int = 0,
    progress: bool = False,
    method_options: dict[str, dict] | None = None,
) -> ComparisonTable:
    """Score effective features and the baselines on one model (see the module docs for the protocol).

    Args:
        source: a trained `efffeat.zoo.Run` (its recipe gives the probe, the data and the score) or a
            `DualModel` of any model (then pass `data`, `probe` and `truth` or `labels`).
        data: the analysis data for a `DualModel` (a tensor, ``(inputs, targets)`` or an iterable of
            batches); a run uses ``run.data``.
        methods: registered baselines (`efffeat.baselines.BASELINES`): ``"effective", "weight-change",
            "kernel-change", "kernel-subspace", "eigen", "neurons", "agop", "sae", "minibatch-dl", "ica", "pca",
            "nmf", "effective-label", "label-control"`` and any added with `register_baseline`. A method that
            does not apply (e.g. directions-only on a comparison over functions) gets a row with a note.
        probe: where the model is read (`efffeat.baselines.Probe`); a run's recipe gives its own.
        truth: ``[n_true, d]`` ground-truth directions in W₁'s input space (scores directions), or
        labels: ``[N]`` class labels of the data (scores functions, label-free readouts).
        n_units: units per method (default the probe's).
        order, nodes: the effective-feature order (and Gauss–Legendre nodes for ``"path"``).
        seed: seeds the dictionaries and Lanczos.
        method_options: keyword arguments of a method's units, e.g. ``{"sae": {"l1": 0.3}}``; names a method
            does not accept are refused with the ones it does.

    Returns:
        `ComparisonTable`, one row per method; rows of methods that read effective features carry ``order``
        and ``completeness``.

    Example::

        table = ef.compare(run)                                              # a zoo run
        probe = ef.baselines.Probe(layer="1", weight="0.weight", scored="functions", readout="output",
                                   per_component=True)
        table = ef.compare(dual, (x, y), probe=probe, labels=y)              # any model
    """
    chosen = _methods(methods)
    context, score = _context(source, data, probe, truth, labels, order, nodes, progress)
    n_units = positive_int("n_units", context.probe.n_units if n_units is None else n_units)
    options = _options(chosen, method_options)
    meta: dict[str, Any] = {
        "kind": getattr(context.run, "kind", type(context.model).__name__),
        "n_units": n_units,
        "order": order,
        "nodes": nodes if order == "path" else None,
        "readout": getattr(context.readout, "__name__", str(context.readout)),
        "n_examples": context.activations.n_examples,
    }
    with warnings.catch_warnings():  # the completeness warning is given once, for the whole table (below)
        warnings.simplefilter("ignore", CompletenessWarning)
        rows = [_method_row(method, context, n_units, seed, options, score) for method in chosen]
    read = [r for r in rows if "completeness" in r]
    if read:
        from ..spectra.change import warn_if_incomplete

        worst = max(read, key=lambda r: r["completeness"])
        meta["order"], meta["completeness"] = worst["order"], worst["completeness"]
        warn_if_incomplete(worst["completeness"], worst["order"], "compare's effective units")
    return ComparisonTable(rows, meta)


def _method_row(
    method: Baseline, context: Context, n_units: int, seed: int, options: dict, score: Any
) -> dict[str, Any]:
    """One method's row: its units scored, with the order and completeness of the features it read."""
    start = time.perf_counter()
    reason = method.not_applicable(context) if method.not_applicable is not None else None
    if reason is not None:
        return {"method": method.name, "note": f"not applicable: {reason}"}
    context.used.clear()
    units = method.units(context, n_units, seed, **options.get(method.name, {}))
    _check_units(method.name, units, context.probe.scored)
    count = units.functions.shape[1] if units.functions is not None else units.directions.shape[0]  # type: ignore[union-attr]
    row: dict[str, Any] = {"method": method.name, "units": int(count)}
    row.update(score(units))
    if units.fvu is not None:
        row["fvu"] = units.fvu
    if context.used:
        row["order"] = context.used[0][0]
        row["completeness"] = max(residual for _, residual in context.used)
    row["seconds"] = time.perf_counter() - start
    if method.note is not None:
        row["note"] = method.note
    return row


def _methods(methods: Any) -> list:
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, Sequence) or isinstance(methods, Tensor):
        raise ConfigError(f"methods must be a list of method names, got a {type(methods).__name__}")
    if not methods:
        raise ConfigError("methods is empty; name at least one method, e.g. methods=['effective', 'neurons']")
    return [baseline(m) for m in methods]


def _options(chosen: list, method_options: Any) -> dict[str, dict]:
    if method_options is None:
        return {}
    if not isinstance(method_options, dict):
        raise ConfigError(
            f"method_options must be {{method: {{option: value}}}}, got a {type(method_options).__name__}"
        )
    names = {m.name: m for m in chosen}
    for name, opts in method_options.items():
        if name not in names:
            raise ConfigError(
                f"method_options names {name!r}, which is not among the methods compared ({', '.join(names)})"
            )
        if not isinstance(opts, dict):
            raise ConfigError(f"method_options[{name!r}] must be a dict of options, got a {type(opts).__name__}")
        accepted = names[name].accepted_options()
        unknown = sorted(set(opts) - set(accepted)) if accepted is not None else []
        if unknown:
            allowed = ", ".join(accepted) if accepted else "none"
            raise ConfigError(
                f"method {name!r} takes no option(s) {', '.join(unknown)}; the options it accepts: {allowed}"
            )
    return method_options


def _check_units(name: str, units: Any, scored: str) -> None:
    if not isinstance(units, Units):
        raise ConfigError(f"baseline {name!r} returned a {type(units).__name__}; its units function must return Units")
    if units.functions is None and units.directions is None:
        raise ConfigError(
            f"baseline {name!r} returned Units with neither directions [n, d] nor functions [N, n]; "
            "its units function must return at least one"
        )
    if scored == "functions" and units.functions is None:
        raise ConfigError(
            f"baseline {name!r} returned directions only, but this comparison scores functions over the data "
            "(labels or Fourier power): return Units(functions=[N, n]) too"
        )
    if scored == "directions" and units.directions is None:
        raise ConfigError(
            f"baseline {name!r} returned functions only, but this comparison scores directions against the ground "
            "truth: return Units(directions=[n, d]) in the probed weight's input space too"
        )


def _in_dtype_of(model: Any, data: Any) -> Any:
    """Tensor (or tuple) data with floating inputs cast to the model's floating dtype (a float64 DualModel's copy)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if isinstance(data, Tensor) and data.is_floating_point() and dtype is not None:
        return data.to(dtype)
    if isinstance(data, tuple) and data and isinstance(data[0], Tensor):
        return (_in_dtype_of(model, data[0]), *data[1:])
    return data


def _context(source, data, probe, truth, labels, order, nodes, progress) -> tuple[Context, Any]:
    """The `Context` every method reads, and the function that scores one method's `Units`."""
    from ..dual import DualModel

    if isinstance(source, DualModel):
        if data is None:
            raise ConfigError("pass the data the model is compared on: compare(dual, data, probe=..., labels=...)")
        if not isinstance(probe, Probe):
            raise ConfigError(
                "compare on a DualModel needs probe=efffeat.baselines.Probe(layer=..., weight=...): the layer whose "
                f"units are compared and its incoming weight; got {type(probe).__name__}"
            )
        if (truth is None) == (labels is None):
            raise ConfigError("give exactly one ground truth: truth=[n_true, d] directions or labels=[N] class labels")
        scored = "directions" if truth is not None else "functions"
        probe = dataclasses.replace(probe, scored=scored)
        init = {source.state_names[name]: value for name, value in source.theta_init.items()}  # state_dict keys
        model, readout, run = source.model, source.readout.spec if probe.readout is None else probe.readout, None
        truth = None if truth is None else torch.as_tensor(truth).detach().to(torch.float64)
        labels = None if labels is None else torch.as_tensor(labels).detach().long()
    elif hasattr(source, "recipe") and hasattr(source, "init_state"):
        run = source
        if data is not None:
            raise ConfigError("a zoo run is compared on its own data (run.data); pass data= only with a DualModel")
        recipe = run.recipe
        if recipe.probe is None or recipe.score is None:
            missing = " and ".join(name for name in ("probe", "score") if getattr(recipe, name) is None)
            raise ConfigError(
                f"the {run.kind} recipe has no {missing}, so compare cannot score it: give its Recipe probe= (where "
                "its model is read, an efffeat.baselines.Probe) and score= (how units meet its ground truth)"
            )
        probe = probe if probe is not None else recipe.probe(run.config)
        model, init, data, readout = (
            run.model,
            run.init_state,
            run.data,
            run.readout if probe.readout is None else probe.readout,
        )
        truth = run.ground_truth
        labels = data[1] if isinstance(data, tuple) and not data[1].is_floating_point() else None
    else:
        raise ConfigError(
            f"compare takes a trained zoo run or a DualModel with data, got a {type(source).__name__}; wrap a model as "
            "ef.DualModel(model, init=state_dict_at_init)"
        )
    if probe.scored not in SCORED:
        raise ConfigError(f"probe.scored must be one of {SCORED}, got {probe.scored!r}")
    acts = neurons(model, _in_dtype_of(model, data), probe.layer, probe.at)
    state = model.state_dict()
    if probe.weight not in state or state[probe.weight].ndim != 2:
        found = ", ".join(k for k, v in state.items() if v.ndim == 2)
        raise ConfigError(
            f"probe.weight {probe.weight!r} is not a weight matrix [h, d] of the model; its matrices: {found}"
        )
    weight = state[probe.weight].detach().to(torch.float64)
    if truth is not None and (truth.ndim != 2 or truth.shape[1] != weight.shape[1]):
        raise DataError(
            f"truth must be [n_true, {weight.shape[1]}] directions in the input space of {probe.weight!r}, got "
            f"shape {tuple(truth.shape)}"
        )
    if labels is not None and labels.shape != (acts.n_examples,):
        raise DataError(
            f"labels must be [N] = [{acts.n_examples}] (one per example of the data), got {tuple(labels.shape)}"
        )
    context = Context(model, init, data, probe, readout, acts, weight, truth, labels, run, order, nodes, progress)
    context.dual()  # the dual model checks the order and nodes before any method runs
    if run is not None:
        return context, lambda units: run.recipe.score(run, units)
    if truth is not None:
        return context, lambda units: direction_scores(truth, units.directions, subspace=True)
    return context, lambda units: label_scores(units.functions, labels)
