"""`compare`: effective features and the baselines, scored side by side on the same run, data and budget.

Every method gets the same analysis data (``run.data``) and the same number of units (``n_units``):

=================  ====================================================================================
method             its units
=================  ====================================================================================
``"effective"``    the top-``n_units`` effective features by RMS contribution (`efffeat.rank`): single
                   parameters for TMS, neurons of the probed layer (``"W[j,:]"`` with the bias) otherwise
``"eigen"``        the top-``n_units`` eigenfeatures of the effective kernel (`efffeat.eigenfeatures`)
``"neurons"``      the ``n_units`` units of the probed layer with the largest activation variance
``"sae"``, …       a dictionary (`efffeat.baselines.dictionary`) with ``n_units`` components fitted to the
                   probed layer's activations (PCA/ICA: at most the layer width)
=================  ====================================================================================

How units meet the ground truth (the common space), per zoo model:

- **TMS and teacher–student** — directions in input space, scored against the ground-truth directions
  (TMS: the input axes; teacher–student: the planted ``U``) by MMCS, the number of distinct true directions
  that are some unit's best match, the mean fraction of a unit inside the true span, and polysemanticity.
  Probed layer W₁ (``[h, d]``: TMS ``encoder``, teacher–student the first Linear); a neuron j is the row W₁[j]
  (the input direction it reads); a dictionary component c in the layer's activation space is pulled back to
  W₁ᵀc; an effective parameter W₁[j, i] is input axis i, a TMS decoder bias b_i is axis i (it writes output
  i), a neuron group is its row W₁[j]; an eigenfeature is the top right singular vector of its parameter
  direction's W₁ block (the input direction that perturbation reads).
- **digits** — functions over the data: top-20 label purity and class selectivity of |unit value|
  (effective neuron groups: their contribution ``Σ_{μ∈G} Δθ_μ φ^E_μ(x)``; eigen: the eigenfunctions;
  dictionaries: their codes). Probed layer: the first hidden layer after its ReLU.
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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._savable import register
from ..errors import ConfigError
from . import metrics
from .dictionary import METHODS as DICTIONARY_METHODS
from .dictionary import dictionary
from .neurons import neurons

METHODS = ("effective", "eigen", "neurons", *DICTIONARY_METHODS)


@dataclass(frozen=True)
class _Setting:
    """Where a zoo model is probed: the activation layer and the weight whose rows are its units."""

    layer: str  # module name for `neurons`
    at: str  # "output" or "input" of that module
    weight: str  # state_dict name of W₁ (the layer's incoming weight)
    group: str  # `rank` group for the effective units
    n_units: int


def _setting(run) -> _Setting:
    kind = run.kind
    if kind == "tms":
        return _Setting("encoder", "output", "encoder.weight", "param", run.config["n_features"])
    if kind == "teacher_student":
        return _Setting("1", "output", "0.weight", "neuron", 8)
    if kind == "digits_mlp":
        return _Setting("1", "output", "0.weight", "neuron", 16)
    if kind == "modular_addition":
        from .zoo.modular_addition import MLP_OUT

        return _Setting(MLP_OUT, "input", "blocks.0.mlp.in.weight", "neuron", 16)
    raise ConfigError(f"compare knows the zoo models tms, teacher_student, digits_mlp, modular_addition; got {kind!r}")


@dataclass
class _Units:
    """One method's units: ``directions [n, d]`` in input space and/or ``functions [N, n]`` over the data."""

    directions: Tensor | None = None
    functions: Tensor | None = None
    fvu: float | None = None


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
    def from_state(cls, tensors: dict[str, Tensor], meta: dict) -> ComparisonTable:
        return cls([dict(r) for r in meta["rows"]], dict(meta["meta"]))


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
        run: a trained `efffeat.zoo.Run`.
        methods: any of ``"effective", "eigen", "neurons", "sae", "minibatch-dl", "ica", "pca", "nmf"``.
        n_units: units per method (default: TMS n_features, teacher–student 8, digits 16, modular addition 16).
        order: the effective-feature order for ``"effective"`` and ``"eigen"``.
        seed: seeds the dictionaries and Lanczos.
        method_options: extra keyword arguments per dictionary method, e.g. ``{"sae": {"l1": 0.3}}``.

    Returns:
        `ComparisonTable`, one row per method.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    setting = _setting(run)
    n_units = setting.n_units if n_units is None else n_units
    if not isinstance(n_units, int) or n_units < 1:
        raise ConfigError(f"n_units must be a positive integer, got {n_units!r}")
    options = method_options or {}
    acts = neurons(run.model, run.data, setting.layer, setting.at)
    w1 = run.model.state_dict()[setting.weight].detach().to(torch.float64)
    meta: dict[str, Any] = {"kind": run.kind, "n_units": n_units, "order": order, "n_examples": acts.n_examples}
    feats = None
    if {"effective", "eigen"} & set(methods):
        from ..dual import DualModel

        start = time.perf_counter()
        dual = DualModel(
            run.model, init=run.init_state, readout=run.readout, order=order, dtype=torch.float64, progress=progress
        )
        feats = dual.features(run.data)
        meta["features_s"] = time.perf_counter() - start
        meta["completeness"] = feats.completeness()
    rows = []
    for method in methods:
        start = time.perf_counter()
        if method == "nmf" and bool((acts.values < 0).any()):
            rows.append({"method": method, "note": "not applicable: the probed activations take negative values"})
            continue
        if method == "effective":
            units = _effective(feats, setting, w1, n_units, run.kind)
        elif method == "eigen":
            units = _eigen(feats, setting, w1, n_units, seed)
        elif method == "neurons":
            top = acts.values.var(dim=0).argsort(descending=True, stable=True)[:n_units]
            units = _Units(w1[top], acts.values[:, top])
        else:
            fitted = dictionary(acts.values, method, n_units, random_state=seed, **options.get(method, {}))
            units = _Units(
                fitted.components_.double() @ w1,
                fitted.transform(acts.values),
                metrics.fvu(acts.values, fitted.reconstruct(acts.values)),
            )
        count = units.functions.shape[1] if units.functions is not None else units.directions.shape[0]
        row = {"method": method, "units": int(count)}
        row.update(_score(run, units))
        if units.fvu is not None:
            row["fvu"] = units.fvu
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    return ComparisonTable(rows, meta)


def _effective(feats, setting: _Setting, w1: Tensor, n_units: int, kind: str) -> _Units:
    from ..groups import group_positions
    from ..ranking import rank

    table = rank(feats, by="contribution", group=setting.group)
    if setting.group == "param":  # TMS: a parameter of W₁[j, i] or of the decoder bias b_i is input axis i
        ids = list(table.ids[:n_units])
        axes = [feats.ids.parse(i).index[-1] for i in ids]
        return _Units(torch.eye(w1.shape[1], dtype=torch.float64)[axes])
    prefix = f"{setting.weight}["
    ids = [i for i in table.ids if i.startswith(prefix)][:n_units]
    rows = [int(i[len(prefix) :].split(",")[0]) for i in ids]
    delta = feats.flat_delta()
    functions = []
    for gid in ids:
        masked = torch.zeros_like(delta)
        pos = group_positions(feats.ids, gid)
        masked[pos] = delta[pos]
        functions.append(feats.matvec(masked).reshape(feats.n_examples, -1).sum(dim=1))
    return _Units(w1[rows], torch.stack(functions, dim=1))


def _eigen(feats, setting: _Setting, w1: Tensor, n_units: int, seed: int) -> _Units:
    from ..spectra import eigenfeatures

    eig = eigenfeatures(feats, k=min(n_units, feats.n_examples * feats.n_outputs), seed=seed)
    slot = feats.ids.slot(setting.weight)
    directions = []
    for i in range(len(eig)):
        block = eig.directions(i)[slot.offset : slot.offset + slot.numel].reshape(slot.shape).double()
        directions.append(torch.linalg.svd(block, full_matrices=False).Vh[0])
    functions = eig.functions if eig.functions.ndim == 2 else eig.functions.square().sum(dim=1).sqrt()
    return _Units(torch.stack(directions), functions)


def _score(run, units: _Units) -> dict[str, float]:
    kind = run.kind
    if kind in ("tms", "teacher_student"):
        truth, d = run.ground_truth, units.directions
        out = {"mmcs": metrics.mmcs(truth, d), "matched": metrics.n_matched(truth, d)}
        out["in_span"] = float(metrics.subspace_alignment(d, truth).mean()) if kind == "teacher_student" else None
        out["polysemanticity"] = float(metrics.polysemanticity(d, truth).mean())
        return out
    if kind == "digits_mlp":
        labels = run.data[1]
        f = units.functions.abs()
        return {
            "purity@20": float(metrics.top_k_purity(f, labels, 20).mean()),
            "selectivity": float(metrics.class_selectivity(f, labels).mean()),
        }
    from ..spectra.fourier import fourier_alignment
    from ..zoo import run_key_frequencies

    tokens = run.data[0]
    freqs = run_key_frequencies(run)
    align = fourier_alignment(units.functions, tokens[:, 0], tokens[:, 1], run.config["p"], freqs)
    return {"fourier": float(align.mean()), "key_freqs": " ".join(str(k) for k in freqs)}
