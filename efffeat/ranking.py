"""Rank effective features, and groups of them, by how much they matter.

Every score comes from the factors with matmuls (``sq_sums``, ``rmatvec``); the ``[N, P]`` feature matrix is
never formed. Over N examples and K readout components, for one feature μ:

=====================  ===========================================================  ==============
``by``                 per-feature score                                            group score
=====================  ===========================================================  ==============
``"contribution"``     RMS of ``c_μ(x, k) = Δθ_μ φ^E_μ(x, k)``: ``√(Σ_{x,k} c² / NK)``  ``√Σ_{μ∈G} s_μ²``
``"mean_contribution"`` signed mean ``Σ_{x,k} c_μ / NK``                              ``Σ_{μ∈G} s_μ``
``"variance"``         ``(1/K) Σ_k Var_x φ^E_μ(x, k)`` (population variance)          ``Σ_{μ∈G} s_μ``
``"learned"``          RMS of ``φ^E_μ − φ_μ(θ0)`` (needs ``init=``)                   ``√Σ_{μ∈G} s_μ²``
``"weight"``           ``|Δθ_μ|``                                                   ``√Σ_{μ∈G} s_μ²``
=====================  ===========================================================  ==============

Group scores are exact aggregates, not samples: for the RMS scores the group score is the root of the summed
mean squares, ``√(Σ_{μ∈G} Σ_{x,k} c_μ(x, k)² / NK)`` — normalised by the number of (example, component)
pairs, *not* by the group size, so a group's score is the total energy of its members and a one-member
group scores like that member. The ``"mean_contribution"`` of a group is the mean of the group's summed
contribution ``Σ_{μ∈G} c_μ(x, k)`` (its share of the mean output change); its ``"variance"`` is the trace of
the members' covariance.

Tables are sorted by score, descending; the signed ``"mean_contribution"`` is sorted by magnitude. Ties keep
feature order (stable sort), so a ranking is deterministic.

Groups (``group=``): ``"param"`` every entry; ``"neuron"`` a weight row ``"0.weight[3,:]"`` with the
layer's bias entry ``"0.bias[3]"``; ``"input"`` a weight column ``"0.weight[:,5]"``; ``"module"`` a whole
parameter tensor ``"0.weight"``; ``"head"`` an attention head of a TransformerLens bridge
``"blocks.0.attn.head[2]"`` (rows ``h·d_head:(h+1)·d_head`` of the q/k/v weights and biases, the same columns of
the o weight); or a mapping ``{group name: [feature or group ids]}``. One-dimensional tensors a rule does not
absorb (biases without a weight, LayerNorm gains) are one group per entry under ``"neuron"`` and ``"input"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .errors import ConfigError, FeatureIdError
from .factors import DenseFactor, Factor, LowRankFactor
from .features import EffectiveFeatures
from .ids import FeatureIds, ParamSlot

BY = ("contribution", "mean_contribution", "variance", "learned", "weight")
GROUPS = ("param", "neuron", "input", "module", "head")
_RMS = {"contribution", "learned", "weight"}
_HEAD_ID = re.compile(r"^(?P<attn>.+)\.head\[(?P<h>\d+)\]$")


# ---- the ranking ---------------------------------------------------------------------------------------
def rank(
    features: EffectiveFeatures,
    by: str = "contribution",
    group: str | Mapping[str, Sequence[str]] = "param",
    top: int | None = None,
    init: EffectiveFeatures | None = None,
    n_heads: int | None = None,
) -> FeatureTable:
    """Score every feature (or group of features) and sort, from the factors.

    Args:
        features: effective features of a dataset (``dual.features(data)``).
        by: ``"contribution" | "mean_contribution" | "variance" | "learned" | "weight"`` (module docstring).
        group: ``"param" | "neuron" | "input" | "module" | "head"`` or ``{name: [ids]}``.
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
    if by not in BY:
        raise ConfigError(f"unknown by={by!r}; choose one of {', '.join(repr(b) for b in BY)}")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 1):
        raise ConfigError(f"top must be a positive integer or None, got {top!r}")
    per_feature = feature_scores(features, by, init)
    group_name = group if isinstance(group, str) else "custom"
    if group == "param":
        scores, labels, sizes = per_feature, None, None
    else:
        heads = n_heads if n_heads is not None else features.meta.get("n_heads")
        names, pos, gid = partition(features.ids, group, heads)
        values = per_feature.square() if by in _RMS else per_feature
        scores = torch.zeros(len(names), dtype=values.dtype).index_add_(0, gid, values[pos])
        scores = scores.sqrt() if by in _RMS else scores
        labels = names
        sizes = torch.zeros(len(names), dtype=torch.long).index_add_(0, gid, torch.ones_like(gid))
    key = scores.abs() if by == "mean_contribution" else scores
    order = torch.sort(key, descending=True, stable=True).indices
    if top is not None:
        order = order[:top]
    meta = {
        "n_examples": features.n_examples,
        "n_outputs": features.n_outputs,
        "order": features.order,
        "n_features": features.n_features,
    }
    if labels is None:
        return FeatureTable(
            _Labels(features.ids, order), scores[order], group_name, by, torch.ones(len(order), dtype=torch.long), meta
        )
    return FeatureTable([labels[i] for i in order.tolist()], scores[order], group_name, by, sizes[order], meta)


def feature_scores(features: EffectiveFeatures, by: str, init: EffectiveFeatures | None = None) -> Tensor:
    """``[P]`` per-feature score `by` (see the module docstring), from the factors."""
    n_pairs = features.n_examples * features.n_outputs
    delta = features.flat_delta()
    if by == "weight":
        return delta.abs()
    if by == "contribution":
        return (delta.square() * features.sq_sums() / n_pairs).sqrt()
    if by == "mean_contribution":
        return delta * _component_sums(features).sum(0) / n_pairs
    if by == "variance":
        mean = _component_sums(features) / features.n_examples  # [K, P]
        return (features.sq_sums() / n_pairs - mean.square().mean(0)).clamp_min(0)
    if by == "learned":
        if init is None:
            raise ConfigError(
                "by='learned' compares the features with those at init: pass "
                "init=dual.features(data, order='init') computed on the same data"
            )
        return (features_difference(features, init).sq_sums() / n_pairs).sqrt()
    raise ConfigError(f"unknown by={by!r}; choose one of {', '.join(repr(b) for b in BY)}")


def _component_sums(features: EffectiveFeatures) -> Tensor:
    """``[K, P]``: ``Σ_x φ^E_μ(x, k)`` for every readout component, one rmatvec each."""
    n, k = features.n_examples, features.n_outputs
    rows = []
    for j in range(k):
        c = torch.zeros(n, k, dtype=features.dtype, device=features.device)
        c[:, j] = 1
        rows.append(features.rmatvec(c[:, 0] if features.scalar else c))
    return torch.stack(rows)


def features_difference(a: EffectiveFeatures, b: EffectiveFeatures) -> EffectiveFeatures:
    """Factored ``φ_a − φ_b`` of two feature sets of the same model and data (e.g. ``"nlo"`` minus ``"init"``).

    Low-rank factors are joined by concatenating rank terms with b's ``u`` negated; nothing is densified
    unless one side is dense. The result has a's Δθ and readouts.
    """
    if [s.name for s in a.slots] != [s.name for s in b.slots] or a.n_features != b.n_features:
        raise ConfigError("the two feature sets belong to different models; compute both with the same DualModel")
    if (a.n_examples, a.n_outputs) != (b.n_examples, b.n_outputs):
        raise ConfigError(
            f"the two feature sets cover different data ({a.n_examples}×{a.n_outputs} vs "
            f"{b.n_examples}×{b.n_outputs} example×component pairs); compute both on the same data"
        )
    factors = {name: _factor_difference(a.factors[name], b.factors[name]) for name in a.factors}
    return EffectiveFeatures(factors, a.ids, a.delta, a.z_init, a.z_trained, a.order, a.scalar, dict(a.meta))


def _factor_difference(fa: Factor, fb: Factor) -> Factor:
    if isinstance(fa, LowRankFactor) and isinstance(fb, LowRankFactor):
        return LowRankFactor.cat_rank([fa, LowRankFactor(-fb.u, fb.v)])
    return DenseFactor(fa.to_dense().g - fb.to_dense().g)


# ---- groups ----------------------------------------------------------------------------------------------
def partition(
    ids: FeatureIds, group: str | Mapping[str, Sequence[str]], n_heads: int | None = None
) -> tuple[list[str], Tensor, Tensor]:
    """The groups of `group` as (names ``[G]``, feature positions ``[M]``, group index of each ``[M]``).

    Built groups ("neuron", "input", "module") partition the features; "head" covers the attention
    weights only; a user mapping may overlap.
    """
    if isinstance(group, Mapping):
        return _mapped(ids, group, n_heads)
    if group == "head":
        return _heads(ids, n_heads)
    if group not in ("neuron", "input", "module"):
        raise ConfigError(
            f"unknown group={group!r}; choose one of {', '.join(repr(g) for g in GROUPS)} or pass a mapping "
            "{group name: [feature ids]}"
        )
    names: list[str] = []
    pos: list[Tensor] = []
    gid: list[Tensor] = []
    absorbed = _absorbed_biases(ids) if group == "neuron" else {}
    bias_groups: dict[str, int] = {}
    for slot in ids.slots:
        local = torch.arange(slot.numel)
        if slot.state_name in absorbed.values():
            continue
        if group == "module" or len(slot.shape) == 0:
            labels, index = [slot.state_name], torch.zeros(slot.numel, dtype=torch.long)
        elif len(slot.shape) == 1:
            labels, index = [f"{slot.state_name}[{i}]" for i in range(slot.shape[0])], local
        elif group == "neuron":
            labels, index = [_row_id(slot, i) for i in range(slot.shape[0])], local // math.prod(slot.shape[1:])
        else:
            labels, index = [_col_id(slot, j) for j in range(slot.shape[1])], _column_of(slot)
        if slot.state_name in absorbed:
            bias_groups[absorbed[slot.state_name]] = len(names)
        pos.append(local + slot.offset)
        gid.append(index + len(names))
        names.extend(labels)
    for slot in ids.slots:
        if slot.state_name in bias_groups:
            pos.append(torch.arange(slot.numel) + slot.offset)
            gid.append(torch.arange(slot.numel) + bias_groups[slot.state_name])
    return names, torch.cat(pos), torch.cat(gid)


def group_positions(ids: FeatureIds, group_id: str, n_heads: int | None = None) -> Tensor:
    """``[m]`` flat positions of the features in one group id.

    ``"0.weight[3,1]"`` one feature; ``"0.weight[3,:]"`` a neuron (its bias entry included);
    ``"0.weight[:,1]"`` an input column; ``"0.weight"`` a whole tensor; ``"blocks.0.attn.head[2]"`` a head.
    """
    m = _HEAD_ID.match(group_id.strip()) if isinstance(group_id, str) else None
    if m is not None and not _is_param(ids, group_id):
        names, pos, gid = _heads(ids, n_heads, prefix=m["attn"])
        h = int(m["h"])
        if h >= len(names):
            raise FeatureIdError(f"{group_id!r}: head {h} does not exist; the layer has {len(names)} heads")
        return pos[gid == h]
    slot, index = ids.parse(group_id)
    grid = torch.arange(slot.numel).reshape(slot.shape) if slot.shape else torch.zeros((), dtype=torch.long)
    local = grid[tuple(index)].reshape(-1)
    out = local + slot.offset
    is_row = len(slot.shape) >= 2 and isinstance(index[0], int) and all(isinstance(i, slice) for i in index[1:])
    bias = _absorbed_biases(ids).get(slot.state_name) if is_row else None
    if bias is not None:
        out = torch.cat([out, torch.tensor([ids.slot(bias).offset + index[0]])])
    return out


def _is_param(ids: FeatureIds, name: str) -> bool:
    try:
        ids.parse(name)
    except FeatureIdError:
        return False
    return True


def _row_id(slot: ParamSlot, i: int) -> str:
    return f"{slot.state_name}[{','.join([str(i)] + [':'] * (len(slot.shape) - 1))}]"


def _col_id(slot: ParamSlot, j: int) -> str:
    return f"{slot.state_name}[{','.join([':', str(j)] + [':'] * (len(slot.shape) - 2))}]"


def _column_of(slot: ParamSlot) -> Tensor:
    """``[numel]``: the column (second index) of every entry of a tensor with ≥ 2 dims."""
    grid = torch.arange(slot.shape[1]).reshape(1, slot.shape[1], *([1] * (len(slot.shape) - 2)))
    return grid.expand(slot.shape).reshape(-1)


def _absorbed_biases(ids: FeatureIds) -> dict[str, str]:
    """``{weight state name: bias state name}`` for weights ``X.weight [d0, ...]`` with a bias ``X.bias [d0]``."""
    by_state = {s.state_name: s for s in ids.slots}
    out = {}
    for s in ids.slots:
        if len(s.shape) >= 2 and s.state_name.endswith("weight"):
            bias = by_state.get(s.state_name[: -len("weight")] + "bias")
            if bias is not None and bias.shape == (s.shape[0],):
                out[s.state_name] = bias.state_name
    return out


def _heads(ids: FeatureIds, n_heads: int | None, prefix: str | None = None) -> tuple[list[str], Tensor, Tensor]:
    """Attention heads of TransformerLens bridges (``<attn>.q/k/v/o.weight``), one group per head."""
    by_state = {s.state_name: s for s in ids.slots}
    attns = [s.state_name[: -len(".q.weight")] for s in ids.slots if s.state_name.endswith(".q.weight")]
    attns = [a for a in attns if f"{a}.o.weight" in by_state and (prefix is None or a == prefix)]
    if not attns:
        where = f"under {prefix!r}" if prefix is not None else "in this model"
        raise ConfigError(
            f"group='head' needs attention layers with q/k/v/o projections (TransformerLens bridges: "
            f"'blocks.0.attn.q.weight'), and there are none {where}; use group='module' or a mapping"
        )
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads < 1:
        raise ConfigError(
            f"group='head' needs the number of attention heads: pass n_heads=model.cfg.n_heads (got {n_heads!r})"
        )
    names: list[str] = []
    pos: list[Tensor] = []
    gid: list[Tensor] = []
    for attn in attns:
        q = by_state[f"{attn}.q.weight"]
        if q.shape[0] % n_heads:
            raise ConfigError(f"{attn}.q.weight has {q.shape[0]} rows, not a multiple of n_heads={n_heads}")
        d_head = q.shape[0] // n_heads
        for h in range(n_heads):
            rows = slice(h * d_head, (h + 1) * d_head)
            parts = []
            for proj in "qkv":
                w = by_state.get(f"{attn}.{proj}.weight")
                if w is None:
                    continue
                if w.shape[0] != q.shape[0]:
                    raise ConfigError(
                        f"{attn}.{proj}.weight has {w.shape[0]} rows but q has {q.shape[0]}: grouped-query "
                        "attention shares k/v between heads; rank it with a mapping {name: [ids]}"
                    )
                parts.append(_grid(w)[rows].reshape(-1) + w.offset)
                b = by_state.get(f"{attn}.{proj}.bias")
                if b is not None:
                    parts.append(torch.arange(b.numel)[rows] + b.offset)
            o = by_state[f"{attn}.o.weight"]
            parts.append(_grid(o)[:, rows].reshape(-1) + o.offset)
            p = torch.cat(parts)
            names.append(f"{attn}.head[{h}]")
            pos.append(p)
            gid.append(torch.full_like(p, len(names) - 1))
    return names, torch.cat(pos), torch.cat(gid)


def _grid(slot: ParamSlot) -> Tensor:
    return torch.arange(slot.numel).reshape(slot.shape)


def _mapped(
    ids: FeatureIds, mapping: Mapping[str, Sequence[str]], n_heads: int | None
) -> tuple[list[str], Tensor, Tensor]:
    if not mapping:
        raise ConfigError("the group mapping is empty; pass {group name: [feature ids]}")
    names, pos, gid = [], [], []
    for name, members in mapping.items():
        if isinstance(members, str) or not isinstance(members, Sequence) or not members:
            raise ConfigError(f"group {name!r} must map to a non-empty list of feature ids, got {members!r}")
        p = torch.unique(torch.cat([group_positions(ids, m, n_heads) for m in members]))
        pos.append(p)
        gid.append(torch.full_like(p, len(names)))
        names.append(str(name))
    return names, torch.cat(pos), torch.cat(gid)


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
            meta["slots"] = [[s.name, s.state_name, list(s.shape), s.offset] for s in self.ids.feature_ids.slots]
        else:
            meta["ids"] = list(self.ids)
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> FeatureTable:
        if "slots" in meta:
            slots = [ParamSlot(n, s, tuple(shape), off) for n, s, shape, off in meta["slots"]]
            ids: Sequence[str] = _Labels(FeatureIds(slots), tensors["positions"])
        else:
            ids = list(meta["ids"])
        return cls(ids, tensors["scores"], meta["group"], meta["by"], tensors["sizes"], dict(meta["meta"]))
