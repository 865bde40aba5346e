"""`compare`: effective features and the baselines, scored side by side on the same run, data and budget.

Every method (`efffeat.baselines.Baseline`, the table of methods in `efffeat.baselines.base`) gets the same
analysis data (``run.data``), the same probed layer and the same number of units (``n_units``). The run's recipe
says where its model is probed (``Recipe.probe``: the layer, and the weight W₁ ``[h, d]`` whose rows are its
units) and how units meet its ground truth (``Recipe.score``), so a zoo model brings its own comparison:

- **TMS and teacher–student** — directions in input space against the ground-truth directions (TMS: the input
  axes; teacher–student: the planted ``U``), `efffeat.baselines.direction_scores`. Probed layer W₁: TMS
  ``encoder`` (effective units: single parameters), teacher–student the first Linear.
- **digits** — functions over the data: top-20 label purity and class selectivity of |unit value|
  (`efffeat.baselines.label_scores`). Probed layer: the first hidden layer after its ReLU.
- **modular addition** — functions over all p² pairs: the fraction of each unit's variance on the key
  Fourier frequencies of the embedding (`efffeat.spectra.fourier_alignment`). Probed layer: the MLP's hidden units.

``fvu`` is the dictionary's fraction of variance unexplained on the probed activations. Effective features are
computed in float64 (the kernel of a trained TMS is ill-conditioned, so its small eigenpairs need it); the
table's meta holds the dual model's completeness residual, so a reader sees how well the dual model describes
the network the features come from.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import io
from .._check import positive_int
from .._savable import register
from ..errors import ConfigError
from .base import Context, baseline
from .neurons import neurons


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


def compare(
    run,
    methods: Sequence[str] = ("effective", "eigen", "neurons", "sae", "pca"),
    n_units: int | None = None,
    order: str = "nlo",
    seed: int = 0,
    progress: bool = False,
    method_options: dict[str, dict] | None = None,
) -> ComparisonTable:
    """Score effective features and the baselines on a trained zoo `run` (see the module docs for the protocol).

    Args:
        run: a trained `efffeat.zoo.Run` whose recipe has a ``probe`` and a ``score``.
        methods: registered baselines (`efffeat.baselines.BASELINES`): ``"effective", "eigen", "neurons",
            "sae", "minibatch-dl", "ica", "pca", "nmf"`` and any added with `register_baseline`.
        n_units: units per method (default: the recipe's probe's: TMS n_features, teacher–student 8, digits
            16, modular addition 16).
        order: the effective-feature order for the methods that read them (``"effective"``, ``"eigen"``).
        seed: seeds the dictionaries and Lanczos.
        method_options: extra keyword arguments of a method's units, e.g. ``{"sae": {"l1": 0.3}}``.

    Returns:
        `ComparisonTable`, one row per method.
    """
    chosen = [baseline(m) for m in methods]
    recipe = run.recipe
    if recipe.probe is None or recipe.score is None:
        missing = " and ".join(name for name in ("probe", "score") if getattr(recipe, name) is None)
        raise ConfigError(
            f"the {run.kind} recipe has no {missing}, so compare cannot score it: give its Recipe probe= (where "
            "its model is read, an efffeat.baselines.Probe) and score= (how units meet its ground truth)"
        )
    probe = recipe.probe(run.config)
    n_units = positive_int("n_units", probe.n_units if n_units is None else n_units)
    options = method_options or {}
    acts = neurons(run.model, run.data, probe.layer, probe.at)
    weight = run.model.state_dict()[probe.weight].detach().to(torch.float64)
    meta: dict[str, Any] = {"kind": run.kind, "n_units": n_units, "order": order, "n_examples": acts.n_examples}
    feats = None
    if any(b.needs_features for b in chosen):
        from ..dual import DualModel

        start = time.perf_counter()
        dual = DualModel(
            run.model, init=run.init_state, readout=run.readout, order=order, dtype=torch.float64, progress=progress
        )
        feats = dual.features(run.data)
        meta["features_s"] = time.perf_counter() - start
        meta["completeness"] = feats.completeness()
    context = Context(run, probe, acts, weight, feats)
    rows = []
    for method in chosen:
        start = time.perf_counter()
        reason = method.not_applicable(context) if method.not_applicable is not None else None
        if reason is not None:
            rows.append({"method": method.name, "note": f"not applicable: {reason}"})
            continue
        units = method.units(context, n_units, seed, **options.get(method.name, {}))
        if units.functions is not None:
            count = units.functions.shape[1]
        elif units.directions is not None:
            count = units.directions.shape[0]
        else:
            raise ConfigError(
                f"baseline {method.name!r} returned Units with neither directions [n, d] nor functions [N, n]; "
                "its units function must return at least one"
            )
        row = {"method": method.name, "units": int(count)}
        row.update(recipe.score(run, units))
        if units.fvu is not None:
            row["fvu"] = units.fvu
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    return ComparisonTable(rows, meta)
