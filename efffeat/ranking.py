"""Rank effective features, and groups of them, by how much they matter.

Every score comes from the factors with matmuls (``sq_sums``, ``rmatvec``); the ``[N, P]`` feature matrix is
never formed. A ranking criterion (`Criterion`) summarises, over N examples and K readout components, one of
the per-example quantities that `efffeat.max_activating` sorts examples by — the value ``φ^E_μ(x, k)`` or the
contribution ``c_μ(x, k) = Δθ_μ φ^E_μ(x, k)``:

=======================  ==========================================================  ==============
``by``                   per-feature score                                           group score
=======================  ==========================================================  ==============
``"contribution"``       RMS of the contribution: ``√(Σ_{x,k} c² / NK)``              ``√Σ_{μ∈G} s_μ²``
``"mean_contribution"``  signed mean of the contribution ``Σ_{x,k} c_μ / NK``         ``Σ_{μ∈G} s_μ``
``"variance"``           ``(1/K) Σ_k Var_x φ^E_μ(x, k)`` (population variance)         ``Σ_{μ∈G} s_μ``
``"learned"``            RMS of ``φ^E_μ − φ_μ(θ0)`` (needs ``init=``)                  ``√Σ_{μ∈G} s_μ²``
``"weight"``             ``|Δθ_μ|``                                                  ``√Σ_{μ∈G} s_μ²``
``"net_contribution"``   as ``"contribution"``                                       RMS of ``Σ_{μ∈G} c_μ``
=======================  ==========================================================  ==============

Group scores are exact aggregates, not samples: for the RMS scores the group score is the root of the summed
mean squares, ``√(Σ_{μ∈G} Σ_{x,k} c_μ(x, k)² / NK)`` — normalised by the number of (example, component)
pairs, *not* by the group size, so a group's score is the total energy of its members and a one-member
group scores like that member. The ``"mean_contribution"`` of a group is the mean of the group's summed
contribution ``Σ_{μ∈G} c_μ(x, k)`` (its share of the mean output change); its ``"variance"`` is the trace of
the members' covariance.

``"net_contribution"`` scores a group by what it does *together*: the RMS over (example, component) of its
summed contribution ``√(Σ_{x,k} (Σ_{μ∈G} c_μ(x, k))² / NK)``, the number a dashboard's signed contribution
histogram shows. Where the members push the readout in opposite directions (a linear head whose rows cancel,
an embedding) a group can have a large ``"contribution"`` energy and a small net one; rank by both to see
which groups moved the output and which only moved. It forms the per-example gradients of the grouped tensors
a block of examples at a time (``N·P`` multiply-adds), so it costs more than the other criteria.

Tables are sorted by score, descending; signed scores are sorted by magnitude. Ties keep feature order
(stable sort), so a ranking is deterministic. Groups are those of `efffeat.groups` (``group=``).

A new criterion is one `Criterion` passed to `register_criterion`.

`per_example_norms` is the other view of the same squared features: summed over the parameters instead of over
the examples, the norm of every example's gradient (what differentially private training clips, and what says
which examples move a layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import groups, io
from ._check import positive_int
from ._savable import register
from .dual import DualModel
from .errors import ConfigError, SaveFileError
from .factors import difference
from .features import ORDERS, EffectiveFeatures
from .ids import FeatureIds, ParamSlot


@dataclass(frozen=True)
class Criterion:
    """A ranking score.

    Attributes:
        name: the ``by=`` name.
        score: ``(features, init features or None) -> [P]`` per-feature scores.
        aggregate: how members' scores combine into a group's: ``"rms"`` (``√Σ s²``) or ``"sum"`` (``Σ s``).
        signed: the score has a sign; tables sort by its magnitude.
        needs_init: `score` needs the features at init (``rank(..., init=...)``).
        group_score: ``(features, positions [M], group of each [M], number of groups) -> [G]`` scores of groups
            that are not aggregates of their members' scores (``"net_contribution"``); `aggregate` is then unused.
    """

    name: str
    score: Callable[[EffectiveFeatures, EffectiveFeatures | None], Tensor]
    aggregate: str = "rms"
    signed: bool = False
    needs_init: bool = False
    group_score: Callable[[EffectiveFeatures, Tensor, Tensor, int], Tensor] | None = None


CRITERIA: dict[str, Criterion] = {}


def register_criterion(criterion: Criterion) -> Criterion:
    """Make a `Criterion` available as ``ef.rank(..., by=criterion.name)``."""
    if criterion.aggregate not in ("rms", "sum"):
        raise ConfigError(f"a criterion aggregates by 'rms' or 'sum', got {criterion.aggregate!r}")
    CRITERIA[criterion.name] = criterion
    return criterion


def criterion(by: str) -> Criterion:
    """The registered criterion called `by`."""
    if by not in CRITERIA:
        raise ConfigError(f"unknown by={by!r}; choose one of {', '.join(repr(b) for b in CRITERIA)}")
    return CRITERIA[by]


def _n_pairs(features: EffectiveFeatures) -> int:
    return features.n_examples * features.n_outputs


def _component_sums(features: EffectiveFeatures) -> Tensor:
    """``[K, P]``: ``Σ_x φ^E_μ(x, k)`` for every readout component, one rmatvec each."""
    n, k = features.n_examples, features.n_outputs
    rows = []
    for j in range(k):
        c = torch.zeros(n, k, dtype=features.dtype, device=features.device)
        c[:, j] = 1
        rows.append(features.rmatvec(c[:, 0] if features.scalar else c))
    return torch.stack(rows)


def _learned(features: EffectiveFeatures, init: EffectiveFeatures | None) -> Tensor:
    assert init is not None
    return (features_difference(features, init).sq_sums() / _n_pairs(features)).sqrt()


def _variance(features: EffectiveFeatures, _init: EffectiveFeatures | None) -> Tensor:
    mean = _component_sums(features) / features.n_examples  # [K, P]
    return (features.sq_sums() / _n_pairs(features) - mean.square().mean(0)).clamp_min(0)


def _contribution(features: EffectiveFeatures, _init: EffectiveFeatures | None) -> Tensor:
    """``√(Δθ² Σ_{x,k} φ² / NK)``, in place on the fresh sums (no temporaries the size of P)."""
    d = features.flat_delta()
    return features.sq_sums().mul_(d).mul_(d).mul_(1.0 / _n_pairs(features)).sqrt_()


register_criterion(Criterion("contribution", _contribution))
register_criterion(
    Criterion(
        "mean_contribution",
        lambda f, _: f.flat_delta() * _component_sums(f).sum(0) / _n_pairs(f),
        aggregate="sum",
        signed=True,
    )
)
register_criterion(Criterion("variance", _variance, aggregate="sum"))
register_criterion(Criterion("learned", _learned, needs_init=True))
register_criterion(Criterion("weight", lambda f, _: f.flat_delta().abs()))


def _net_contribution(features: EffectiveFeatures, pos: Tensor, gid: Tensor, n_groups: int) -> Tensor:
    return (features.group_contribution_sq_sums(pos, gid, n_groups) / _n_pairs(features)).sqrt()


register_criterion(Criterion("net_contribution", _contribution, group_score=_net_contribution))

BY = tuple(CRITERIA)  # the criteria efffeat ships; `CRITERIA` also holds those registered later
GROUPS = groups.KINDS


# The description `rank` gives a table (`FeatureTable.meta`), as a save file must hold it.
_TABLE_META = {
    "n_examples": io.whole(0),
    "n_outputs": io.whole(1),
    "order": io.text(ORDERS),
    "n_features": io.whole(0),
}


# ---- the ranking ---------------------------------------------------------------------------------------
def rank(
    features: EffectiveFeatures,
    by: str = "contribution",
    group: groups.GroupSpec = "param",
    top: int | None = None,
    init: EffectiveFeatures | None = None,
    n_heads: int | None = None,
) -> FeatureTable:
    """Score every feature (or group of features) and sort, from the factors.

    Args:
        features: effective features of a dataset (``dual.features(data)``).
        by: a registered criterion (module docstring): ``"contribution" | "mean_contribution" | "variance" |
            "learned" | "weight" | "net_contribution"``.
        group: ``"param" | "neuron" | "input" | "module" | "head"``, a list of ids, ``{name: [ids]}`` or a
            predicate over tensor names (`efffeat.groups`).
        top: keep only the best `top` rows.
        init: features of the same data at init (``dual.features(data, order="init")``), needed for
            ``by="learned"``.
        n_heads: attention heads per layer for ``group="head"`` (default: ``features.meta["n_heads"]``).

    Returns:
        `FeatureTable` sorted by score, descending.

    Example::

        table = ef.rank(feats, by="contribution", group="neuron", top=20)
        print(table)                   # rank, id, score
        table.ids[0], table.scores[0]
    """
    crit = criterion(by)
    if top is not None:
        positive_int("top", top)
    if crit.needs_init and init is None:
        raise ConfigError(
            f"by={by!r} compares the features with those at init: pass "
            "init=dual.features(data, order='init') computed on the same data"
        )
    grouped = None
    if not (isinstance(group, str) and group == "param"):
        heads = n_heads if n_heads is not None else features.meta.get("n_heads")
        grouped = groups.partition(features.ids, group, heads)  # checked before any scoring
    if grouped is None:
        scores, labels, sizes = crit.score(features, init), None, None
    else:
        names, pos, gid = grouped
        if crit.group_score is not None:
            scores = crit.group_score(features, pos, gid, len(names))
        else:
            per_feature = crit.score(features, init)
            values = per_feature.square() if crit.aggregate == "rms" else per_feature
            scores = torch.zeros(len(names), dtype=values.dtype).index_add_(0, gid, values[pos])
            scores = scores.sqrt() if crit.aggregate == "rms" else scores
        labels = names
        sizes = torch.zeros(len(names), dtype=torch.long).index_add_(0, gid, torch.ones_like(gid))
    order, values = _sort_descending(scores.abs() if crit.signed else scores, top)
    values = scores[order] if crit.signed else values
    meta = {
        "n_examples": features.n_examples,
        "n_outputs": features.n_outputs,
        "order": features.order,
        "n_features": features.n_features,
    }
    group_name = group if isinstance(group, str) else "custom"
    if labels is None:
        ones = torch.ones(1, dtype=torch.long).expand(len(order))  # one feature a row: a view, not P integers
        return FeatureTable(_Labels(features.ids, order), values, group_name, by, ones, meta)
    return FeatureTable([labels[i] for i in order.tolist()], values, group_name, by, sizes[order], meta)


def _sort_descending(key: Tensor, top: int | None = None) -> tuple[Tensor, Tensor]:
    """The positions of `key` by descending value, ties in position order (the stable sort), and the values in
    that order; all ``P`` of them, or the first `top`.

    float32 keys on the CPU (fewer than 2³¹, no NaN) are packed into one int64 each — the order-preserving
    integer of the float's bits above the position — and sorted by numpy's vectorised sort (``top``: after a
    linear-time partition); the packed keys are distinct, so any sort of them is the stable sort of the floats,
    and the sorted values are read back from them without a gather. Anything else goes to torch's stable sort.
    """
    p = key.numel()
    bits = max(1, (p - 1).bit_length())
    low = float(key.min()) if p and key.dtype == torch.float32 else 0.0  # NaN if there is one
    if key.dtype != torch.float32 or key.device.type != "cpu" or bits > 31 or low != low:
        values, order = torch.sort(key, descending=True, stable=True)
        return (order, values) if top is None else (order[:top], values[:top])
    key = key.detach().contiguous()
    if low <= 0:
        key = key + 0.0  # −0 ties with +0
    floats = key.numpy()
    positions, zeros = None, None
    if low == 0:  # zeros sort last, in position order: only the others need sorting (unseen tokens' rows...)
        positions = np.flatnonzero(floats)
        if len(positions) > p - p // 8:
            positions = None
        else:
            zeros = np.flatnonzero(floats == 0)
            floats = floats[positions]
    as_int = floats.view(np.int32)
    if low < 0:  # negative floats: larger bits are smaller numbers
        np.bitwise_xor(as_int, 0x7FFFFFFF, out=as_int, where=as_int < 0)
    top_key = (2**31 - 1) << bits
    packed = np.multiply(as_int, -(1 << bits), dtype=np.int64)  # ((2³¹ − 1 − int) << bits) + position
    if positions is None:
        packed += np.arange(top_key, top_key + p, dtype=np.int64)
    else:
        packed += positions
        packed += top_key
    if top is not None and top < len(packed):
        packed = np.partition(packed, top - 1)[:top]
    packed.sort()
    m = len(packed)
    rest = np.empty(0, dtype=np.int64) if zeros is None else zeros[: len(zeros) if top is None else max(0, top - m)]
    order, values = np.empty(m + len(rest), dtype=np.int64), np.zeros(m + len(rest), dtype=np.float32)
    sorted_int = (2**31 - 1) - (packed >> bits)
    if low < 0:
        np.bitwise_xor(sorted_int, 0x7FFFFFFF, out=sorted_int, where=sorted_int < 0)
    values[:m] = sorted_int.astype(np.int32).view(np.float32)  # the zeros after them stay 0
    np.bitwise_and(packed, (1 << bits) - 1, out=order[:m])
    order[m:] = rest
    return torch.from_numpy(order), torch.from_numpy(values)


def per_example_norms(
    dual: DualModel,
    data: Any,
    group: str | Sequence[str] | None = None,
    batch_size: int = 256,
    order: str | None = None,
    progress: bool | None = None,
) -> Tensor | dict[str, Tensor]:
    """The norm ``‖φ^E(x, k)‖ = √Σ_μ φ^E_μ(x, k)²`` of every example's gradient, per readout component, streamed
    over `data` one batch of features at a time (each batch's factors are dropped after use; the lean capture,
    ``need="features"``, without the readouts the norms do not need).

    The features are those of the dual model's order (``order=`` overrides it): at ``"trained"`` these are the
    per-example gradient norms of the readout that differentially private training clips. Computed from the
    factors (``‖δ‖²‖a‖²`` for a dense layer; the Grams of the position terms for a sequence layer), never from
    per-example gradients.

    Args:
        dual: the dual model.
        data: tensor, ``(inputs, targets)`` tuple, or iterable of batches.
        group: None — over every parameter, ``[N(, K)]``; a tensor name (state_dict or named_parameters name) or
            a list of them — over those tensors together, ``[N(, K)]``; ``"module"`` — one norm per tensor,
            ``{state_dict name: [N(, K)]}``.
        batch_size: examples per batch of features.
        progress: overrides the model's progress setting.

    Example::

        norms = ef.per_example_norms(dual, x)                      # [N]: which examples move the model most
        layer = ef.per_example_norms(dual, x, group="0.weight")    # [N]: ... this layer
        by_tensor = ef.per_example_norms(dual, x, group="module")  # {"0.weight": [N], "0.bias": [N], ...}
    """
    positive_int("batch_size", batch_size)
    by_tensor = isinstance(group, str) and group == "module"
    names = None if group is None or by_tensor else _tensor_names(dual.ids, group)
    parts = [
        feats.sq_norms(names, by_tensor=by_tensor)
        for feats in dual.iter_features(data, batch_size, order=order, progress=progress, need="features")
    ]
    if by_tensor:
        return {name: torch.cat([p[name] for p in parts]).sqrt() for name in parts[0]}  # type: ignore[index]
    return torch.cat(parts).sqrt()  # type: ignore[arg-type]


def _tensor_names(ids: FeatureIds, group: str | Sequence[str]) -> list[str]:
    """named_parameters() names of a tensor name or a list of them, checked."""
    listed = [group] if isinstance(group, str) else group
    if isinstance(listed, Mapping) or not isinstance(listed, Sequence) or not listed:
        raise ConfigError(
            f"group must be None, 'module', a tensor name or a non-empty list of tensor names, got {group!r}"
        )
    return [ids.slot(name).name for name in listed]


def feature_scores(features: EffectiveFeatures, by: str, init: EffectiveFeatures | None = None) -> Tensor:
    """``[P]`` per-feature score `by` (see the module docstring), from the factors."""
    crit = criterion(by)
    if crit.needs_init and init is None:
        raise ConfigError(f"by={by!r} needs init=dual.features(data, order='init') computed on the same data")
    return crit.score(features, init)


def features_difference(a: EffectiveFeatures, b: EffectiveFeatures) -> EffectiveFeatures:
    """Factored ``φ_a − φ_b`` of two feature sets of the same model and data (e.g. ``"nlo"`` minus ``"init"``).

    Low-rank factors are joined by concatenating rank terms with b's negated; nothing is densified unless one
    side is dense. The result has a's Δθ and readouts.
    """
    if [s.name for s in a.slots] != [s.name for s in b.slots] or a.n_features != b.n_features:
        raise ConfigError("the two feature sets belong to different models; compute both with the same DualModel")
    if (a.n_examples, a.n_outputs) != (b.n_examples, b.n_outputs):
        raise ConfigError(
            f"the two feature sets cover different data ({a.n_examples}×{a.n_outputs} vs "
            f"{b.n_examples}×{b.n_outputs} example×component pairs); compute both on the same data"
        )
    factors = {name: difference(a.factors[name], b.factors[name]) for name in a.factors}
    return EffectiveFeatures(factors, a.ids, a.delta, a.z_init, a.z_trained, a.order, a.scalar, dict(a.meta))


# ---- the table -------------------------------------------------------------------------------------------
class _Labels(Sequence[str]):
    """Feature ids in table order, formed on access (a table of a million features holds no strings)."""

    def __init__(self, ids: FeatureIds, positions: Tensor):
        self.feature_ids = ids
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self.feature_ids[int(p)] for p in self.positions[i]]
        return self.feature_ids[int(self.positions[i])]

    def __iter__(self) -> Iterator[str]:
        for p in self.positions.tolist():
            yield self.feature_ids[p]


class Row(NamedTuple):
    """One row of a `FeatureTable`."""

    rank: int  # 1 = best
    id: str
    score: float
    size: int


@register
@dataclass
class FeatureTable:
    """Features or groups sorted by score, best first.

    Attributes:
        ids: ``[G]`` feature or group ids, descending score (``"0.weight[3,1]"``, ``"0.weight[3,:]"``,
            ``"0.weight"``, ``"blocks.0.attn.head[2]"`` or a mapping's names).
        scores: ``[G]`` tensor of scores, aligned with `ids`.
        group: ``"param" | "neuron" | "input" | "module" | "head" | "custom"``.
        by: the score, one of `BY`.
        sizes: ``[G]`` number of features in each row's group.
        meta: ``n_examples``, ``n_outputs``, ``order`` and ``n_features`` of the features ranked.
    """

    ids: Sequence[str]
    scores: Tensor
    group: str
    by: str
    sizes: Tensor
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, i: int) -> Row:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for a table of {len(self)} rows")
        i %= len(self)
        return Row(i + 1, self.ids[i], float(self.scores[i]), int(self.sizes[i]))

    def __iter__(self) -> Iterator[Row]:
        for i in range(len(self)):
            yield self[i]

    def to_records(self) -> list[dict[str, Any]]:
        """``[{"rank", "id", "score", "size"}, ...]``, rank 1 first (e.g. for ``pandas.DataFrame``)."""
        return [row._asdict() for row in self]

    def __repr__(self) -> str:
        return self.render(20)

    __str__ = __repr__

    def render(self, rows: int = 20) -> str:
        """The first `rows` rows as an aligned text table."""
        shown = [self[i] for i in range(min(rows, len(self)))]
        head = (
            f"FeatureTable(by={self.by!r}, group={self.group!r}, rows={len(self):,}, "
            f"N={self.meta.get('n_examples')}, K={self.meta.get('n_outputs')}, order={self.meta.get('order')!r})"
        )
        width = max([len("id")] + [len(r.id) for r in shown])
        lines = [head, f"{'rank':>6}  {'id':<{width}}  {'score':>12}" + ("  size" if self.group != "param" else "")]
        for r in shown:
            size = f"  {r.size:>4}" if self.group != "param" else ""
            lines.append(f"{r.rank:>6}  {r.id:<{width}}  {r.score:>12.5g}{size}")
        if len(self) > len(shown):
            lines.append(f"{'...':>6}  ({len(self) - len(shown):,} more)")
        return "\n".join(lines)

    # ---- persistence ----------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {"scores": self.scores, "sizes": self.sizes}
        meta: dict[str, Any] = {"kind": "FeatureTable", "group": self.group, "by": self.by, "meta": dict(self.meta)}
        if isinstance(self.ids, _Labels):
            tensors["positions"] = self.ids.positions
            meta["slots"] = [s.to_json() for s in self.ids.feature_ids.slots]
        else:
            meta["ids"] = list(self.ids)
        return tensors, meta

    @classmethod
    def validate_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Refuse (`SaveFileError`) a table whose rows, ids and scores do not fit together."""
        fields = {"kind": io.text(("FeatureTable",)), "group": io.text((*GROUPS, "custom")), "by": io.text()}
        fields["meta"] = lambda v, where: io.record(v, where, {}, _TABLE_META, others=io.anything)
        m = io.record(meta, "meta", fields, {"slots": io.slots, "ids": io.list_of(io.text(), unique=True)})
        scores = io.tensor(tensors, "scores", "float", ndim=1)
        sizes = io.tensor(tensors, "sizes", "int", shape=scores.shape)
        if len(sizes) and int(sizes.min()) < 1:
            io.invalid("tensor 'sizes'", "at least 1 in every row", int(sizes.min()))
        if ("slots" in m) == ("ids" in m):
            raise SaveFileError("meta must hold either the parameter slots or the ids of the rows")
        if "ids" in m:
            io.tensor_names(tensors, {"scores", "sizes"})
            if len(m["ids"]) != len(scores):
                io.invalid("meta.ids", f"a list of {len(scores)} ids (one per score)", f"{len(m['ids'])} ids")
            return
        io.tensor_names(tensors, {"scores", "sizes", "positions"})
        positions = io.tensor(tensors, "positions", "int", shape=scores.shape)
        n_features = m["slots"][-1].offset + m["slots"][-1].numel if m["slots"] else 0
        if len(positions) and not (0 <= int(positions.min()) and int(positions.max()) < n_features):
            io.invalid("tensor 'positions'", f"feature positions in [0, {n_features})", positions.tolist()[:5])
        if len(torch.unique(positions)) != len(positions):
            raise SaveFileError("tensor 'positions' names a feature twice")

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> FeatureTable:
        if "slots" in meta:
            slots = [ParamSlot.from_json(s) for s in meta["slots"]]
            ids: Sequence[str] = _Labels(FeatureIds(slots), tensors["positions"])
        else:
            ids = list(meta["ids"])
        return cls(ids, tensors["scores"], meta["group"], meta["by"], tensors["sizes"], dict(meta["meta"]))
