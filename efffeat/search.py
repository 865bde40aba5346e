"""Which inputs activate a feature: streaming dataset top-k, and synthetic inputs by gradient ascent.

`max_activating` streams any iterable of batches, computes each batch's effective features once (the lean
capture: no readout at θ0 or θ* beyond the capture's own, unless a callable is searched, which may read them)
and keeps, for every feature asked about, the k best (example, readout component) pairs seen so far — memory
O(k × features), whatever the dataset size. Given features that are already computed
(``max_activating(feats, ids)``) it makes no pass over the data at all. Ties keep the earlier example (a
stable merge), so the result equals a stable sort of the whole dataset.

What a "feature" is here, and its value at an input x:

- a feature id ``"0.weight[3,1]"``: ``φ^E_μ(x)`` (``by="value"``) or ``c_μ(x) = Δθ_μ φ^E_μ(x)``
  (``by="contribution"``);
- a group id (``"0.weight[3,:]"`` neuron with its bias, ``"0.weight[:,1]"`` input, ``"0.weight"`` tensor,
  ``"blocks.0.attn.head[2]"`` head): the group's **signed contribution** ``Σ_{μ∈G} c_μ(x)`` — its share of the
  readout change at x, positive where the group pushes the readout up (``by="value"`` and
  ``by="contribution"`` alike); ``by="norm"`` gives ``‖φ^E_G(x)‖ = (Σ_{μ∈G} φ^E_μ(x)²)^½``, how strongly
  the group's features respond to x whatever the sign of Δθ (the activation-like view; for one feature
  ``|φ^E_μ(x)|``);
- an eigenfeature ``eig[i]`` (or ``(eig, i)``): the projection ``φ^E(x)·d_i`` on its parameter direction
  (``by="contribution"``: ``(Δθ·d_i)(φ^E(x)·d_i)``, its share of the output change);
- a callable ``fn(features_of_batch) -> [n] | [n, K]`` of the batch's `EffectiveFeatures`.

Exact zeros: a group's contribution is exactly 0 wherever none of its features is used (a dead unit, a
readout that reads another class's logit, a pixel that is always blank). With ``skip_zeros=True`` (the
default) such ties at 0 are left out of the lists whenever the feature has non-zero values, and counted in
``TopKEntry.n_zero``; a top list then holds the largest non-zero values, a bottom list the smallest
(most negative first).

Every value except a callable's and a norm is linear in the features, ``Σ_μ w_μ φ^E_μ(x)``, and is
evaluated on the factors restricted to the rows and columns the weights touch; those on one parameter tensor
are evaluated together, one weight column each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import io
from ._check import one_of, positive_int
from ._data import as_batches
from ._savable import register
from .dual import DualModel
from .errors import ConfigError, DataError, FeatureIdError, SaveFileError
from .factors import Selection
from .features import ORDERS, EffectiveFeatures
from .groups import group_positions
from .ids import FeatureIds, ParamSlot
from .spectra import Eigenfeature, Spectrum

# The per-example quantities examples are sorted by (the ranking criteria of `efffeat.rank` summarise them).
BY = ("value", "contribution", "norm")
# Entries of a group's features evaluated at once by a norm (elements of the [n, K, m] block).
_NORM_CHUNK_ELEMENTS = 1 << 22
# Linear functionals on one tensor are evaluated together while their merged weight block has at most this many
# entries (rows × columns × functionals) and at most twice, plus the slack, the entries of their own blocks.
_MERGED_ELEMENTS = 1 << 14
_MERGE_SLACK = 1 << 12
# Feature values of a search's batches (entries of [features, pairs]) held before they are merged into the top k.
_PENDING_ELEMENTS = 1 << 22
FeatureSpec = str | Eigenfeature | tuple | Callable[[EffectiveFeatures], Tensor]


@dataclass(frozen=True)
class _Space:
    """What resolving feature specs needs of a model: its ids, ``[P]`` Δθ, dtype and attention heads."""

    ids: FeatureIds
    delta: Tensor
    dtype: torch.dtype
    n_heads: int | None

    @staticmethod
    def of(source: DualModel | EffectiveFeatures) -> _Space:
        if isinstance(source, EffectiveFeatures):
            return _Space(source.ids, source.flat_delta(), source.dtype, source.meta.get("n_heads"))
        return _Space(source.ids, source.flat_delta(), source.dtype, source.n_heads)


# ---- linear functionals of the features ----------------------------------------------------------------
@dataclass
class _Functional:
    """``Σ_μ w_μ φ^E_μ(x, k)``: per parameter tensor a sparse weight vector (`efffeat.factors.Selection`)."""

    parts: dict[str, Selection]  # named_parameters name -> positions and weights on that tensor

    def __call__(self, feats: EffectiveFeatures) -> Tensor:
        """``[n, K]`` values on a batch's features."""
        out = torch.zeros(feats.n_examples, feats.n_outputs, dtype=feats.dtype, device=feats.device)
        for name, sel in self.parts.items():
            out += feats.factors[name].selected(sel)
        return out

    def as_direction(self, like: dict[str, Tensor]) -> dict[str, Tensor]:
        """The weights as a parameter-shaped tangent ``{name: [*shape]}`` (zeros where untouched)."""
        out = {n: torch.zeros_like(p) for n, p in like.items()}
        for name, sel in self.parts.items():
            out[name].view(-1).index_add_(0, sel.flat, sel.w.to(out[name].dtype))
        return out


@dataclass
class _GroupNorm:
    """``‖φ^E_G(x, k)‖``: the norm of a group's features, per parameter tensor the flat positions ``[m]``."""

    parts: dict[str, Tensor]

    def __call__(self, feats: EffectiveFeatures) -> Tensor:
        """``[n, K]`` norms on a batch's features (the entries are formed a chunk of positions at a time)."""
        sq = torch.zeros(feats.n_examples, feats.n_outputs, dtype=feats.dtype, device=feats.device)
        step = max(1, _NORM_CHUNK_ELEMENTS // max(1, feats.n_examples * feats.n_outputs))
        for name, flat in self.parts.items():
            for chunk in flat.split(step):
                sq += feats.factors[name].entries(chunk.to(feats.device)).square().sum(dim=2)
        return sq.sqrt()


def _by_tensor(space: _Space, positions: Tensor) -> list[tuple[ParamSlot, Tensor | slice]]:
    """The parameter tensors flat feature positions ``[m]`` fall in, each with the index of its own (a mask
    ``[m]``; ``slice(None)`` when every position falls in one tensor)."""
    slots = space.ids.slots
    starts = torch.tensor([s.offset for s in slots], dtype=positions.dtype)
    which = torch.searchsorted(starts, positions, right=True) - 1  # [m] slot of each position
    used = torch.unique(which).tolist()
    if len(used) == 1:
        return [(slots[used[0]], slice(None))]
    return [(slots[i], which == i) for i in used]


def _parts(space: _Space, positions: Tensor) -> dict[str, Tensor]:
    """``{named_parameters name: local flat positions}`` of flat feature positions ``[m]``."""
    return {s.name: positions[at] - s.offset for s, at in _by_tensor(space, positions)}


def _functional(space: _Space, positions: Tensor, weights: Tensor) -> _Functional:
    """Group flat feature positions ``[m]`` and weights ``[m]`` by parameter tensor."""
    return _Functional(
        {s.name: Selection(s.shape, positions[at] - s.offset, weights[at]) for s, at in _by_tensor(space, positions)}
    )


def _resolve(space: _Space, spec: FeatureSpec, by: str) -> tuple[str, Callable[[EffectiveFeatures], Tensor]]:
    """A (label, value function) for one feature spec."""
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], Spectrum):
        spec = spec[0][spec[1]]
    if isinstance(spec, Eigenfeature):
        if by == "norm":
            raise ConfigError(
                f"by='norm' is the norm of a group's features; {spec.id} is one direction: search it by='value' "
                "(its projection φᴱ(x)·dᵢ) or by='contribution'"
            )
        return spec.id, _eigen_functional(space, spec, by)
    if isinstance(spec, str):
        positions = group_positions(space.ids, spec, space.n_heads)
        if by == "norm":
            return spec.strip(), _GroupNorm(_parts(space, positions))
        single = space.ids.parse(spec).kind == "param"
        delta = space.delta
        weights = torch.ones_like(delta[positions]) if single and by == "value" else delta[positions]
        return spec.strip(), _functional(space, positions, weights)
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__), spec
    raise ConfigError(
        f"cannot search for {spec!r}: pass feature ids ('0.weight[3,1]'), group ids ('0.weight[3,:]'), "
        "eigenfeatures (eig[i] or (eig, i)) or callables fn(features_of_batch) -> [n]"
    )


def _eigen_functional(space: _Space, handle: Eigenfeature, by: str) -> _Functional:
    d = handle.direction()
    if d.numel() != len(space.ids):
        raise ConfigError(
            f"eigenfeature {handle.id} belongs to a model with {d.numel()} parameters, this one has "
            f"{len(space.ids)}; compute the eigenfeatures from this model's features"
        )
    d = d.to(space.dtype)
    if by == "contribution":
        d = d * (space.delta @ d)
    positions = torch.nonzero(d).reshape(-1)
    return _functional(space, positions, d[positions])


def _as_list(features: Any) -> list:
    if isinstance(features, str | Eigenfeature) or callable(features):
        return [features]
    if isinstance(features, tuple) and len(features) == 2 and isinstance(features[0], Spectrum):
        return [features]
    if isinstance(features, Spectrum):
        return list(features)
    if not isinstance(features, Sequence) or not features:
        raise ConfigError("features must be a feature id, an eigenfeature, a callable, or a non-empty list of them")
    return list(features)


# ---- the search ------------------------------------------------------------------------------------------
def max_activating(
    source: DualModel | EffectiveFeatures,
    data: Any = None,
    features: FeatureSpec | Sequence[FeatureSpec] | Spectrum | None = None,
    k: int = 16,
    by: str = "value",
    batch_size: int = 256,
    largest: bool = True,
    progress: bool = True,
    skip_zeros: bool = True,
) -> TopK:
    """The `k` (example, component) pairs with the largest (or smallest) value of each feature.

    Args:
        source: a `DualModel` (its features are computed batch by batch over `data`, in one pass) or
            `EffectiveFeatures` already computed (no pass over any data; call ``max_activating(feats, ids)``).
        data: with a `DualModel`, a tensor, an ``(inputs, targets)`` tuple, or any iterable of batches.
        features: one or a list of feature ids, group ids, eigenfeatures, callables (module docstring).
        k: pairs kept per feature.
        by: ``"value"`` (φ^E; a group's signed contribution), ``"contribution"`` (Δθ_μ φ^E_μ) or ``"norm"``
            (a group's ‖φ^E_G(x)‖).
        batch_size: examples per batch for tensor data.
        largest: top-k (True) or bottom-k (False, most negative first).
        progress: a tqdm bar over batches.
        skip_zeros: leave pairs whose value is exactly 0 out of the lists when the feature has non-zero
            values (they are counted in ``n_zero``); False keeps the plain stable sort.

    Returns:
        `TopK`: ``result[feature].indices`` (example indices into the data, in order of the stream; at most
        k, fewer when zeros were skipped), ``.components``, ``.values``, ``.n_zero``, ``.examples(data)``.

    Example::

        top = ef.max_activating(dual, x, ["0.weight[3,:]", eig[0]], k=16)
        top = ef.max_activating(feats, ["0.weight[3,:]"], k=16)       # from features already computed
        top["0.weight[3,:]"].examples(x)
    """
    one_of("by", by, BY)
    positive_int("k", k)
    if not isinstance(skip_zeros, bool):
        raise ConfigError(f"skip_zeros must be True or False, got {skip_zeros!r}")
    if isinstance(source, EffectiveFeatures):
        if features is None:
            data, features = None, data
        if data is not None:
            raise ConfigError("features already hold their data: call max_activating(feats, features, k=...)")
        stream: Any = [source]
        known: int | None = source.n_examples
        scalar_readout = source.scalar
    elif isinstance(source, DualModel):
        if data is None or features is None:
            raise ConfigError("pass the data and the features to search: max_activating(dual, data, features)")
        known = as_batches(data, batch_size).n_examples
        scalar_readout = bool(source.readout.scalar)
    else:
        raise ConfigError(
            f"max_activating searches a DualModel's data or EffectiveFeatures, got {type(source).__name__}"
        )
    specs = _as_list(features)
    if isinstance(source, DualModel):  # the readouts only for a callable, which may read them
        need = "all" if any(callable(s) for s in specs) else "features"
        stream = source.iter_features(data, batch_size, progress=progress, need=need)
    space = _Space.of(source)
    resolved = [_resolve(space, s, by) for s in specs]
    labels = _unique_labels([label for label, _ in resolved])
    if known is not None and scalar_readout and k > known:
        raise DataError(f"k={k} is larger than the data ({known} examples); pass k ≤ {known}")
    zeros = torch.zeros(len(labels), dtype=torch.long)
    offset, n_outputs, scalar = 0, 1, True
    evaluate = _Evaluator(labels, [fn for _, fn in resolved])
    kept = _Kept(len(labels), k, largest, skip_zeros)
    for feats in stream:
        n = feats.n_examples
        n_outputs, scalar = feats.n_outputs, feats.scalar
        values = evaluate(feats).reshape(len(labels), n * n_outputs)  # pairs example-major: (x, k) at x·K + k
        zeros += (values == 0).sum(dim=1).cpu()
        kept.add(values, torch.arange(offset * n_outputs, (offset + n) * n_outputs))
        offset += n
    best_values, best_pairs = kept.best()
    if best_values is None or best_pairs is None:
        raise DataError("data is empty; pass at least one example")
    if best_values.shape[1] < k:
        raise DataError(
            f"k={k} is larger than the data ({offset} examples × {n_outputs} components); pass k ≤ {offset * n_outputs}"
        )
    entries = {
        label: _entry(best_values[i], best_pairs[i], int(zeros[i]), n_outputs, scalar, skip_zeros)
        for i, label in enumerate(labels)
    }
    meta = {
        "k": k,
        "by": by,
        "largest": largest,
        "skip_zeros": skip_zeros,
        "n_examples": offset,
        "n_outputs": n_outputs,
        "order": source.order,
    }
    return TopK(labels, entries, meta, _originals={id(s): lab for s, lab in zip(specs, labels)})


class _Kept:
    """The k best (value, pair) of each of m features over a stream of batches: the batches' values wait until
    they hold `_PENDING_ELEMENTS` entries and are then merged with the best so far in one `_best` (fewer, larger
    operations than a merge per batch; the same stable result)."""

    def __init__(self, m: int, k: int, largest: bool, skip_zeros: bool):
        self.k, self.largest, self.skip_zeros = k, largest, skip_zeros
        self.room = max(4 * k, _PENDING_ELEMENTS // max(1, m))  # pending columns before a merge
        self.values: list[Tensor] = []  # [m, n_i]
        self.pairs: list[Tensor] = []  # [n_i]
        self.waiting = 0
        self.kept: tuple[Tensor, Tensor] | None = None  # [m, ≤ k] values and pairs

    def add(self, values: Tensor, pairs: Tensor) -> None:
        """One batch's ``values [m, n]`` at example-major ``pairs [n]``."""
        self.values.append(values)
        self.pairs.append(pairs)
        self.waiting += values.shape[1]
        if self.waiting >= self.room:
            self._merge()

    def best(self) -> tuple[Tensor | None, Tensor | None]:
        self._merge()
        return (None, None) if self.kept is None else self.kept

    def _merge(self) -> None:
        if not self.values:
            return
        m = self.values[0].shape[0]
        values, pairs = torch.cat(self.values, dim=1), torch.cat(self.pairs).expand(m, -1)
        if self.kept is not None:
            values, pairs = torch.cat([self.kept[0], values], dim=1), torch.cat([self.kept[1], pairs], dim=1)
        self.kept = _best(values, pairs, self.k, self.largest, self.skip_zeros)
        self.values, self.pairs, self.waiting = [], [], 0


def _best(values: Tensor, pairs: Tensor, k: int, largest: bool, skip_zeros: bool) -> tuple[Tensor, Tensor]:
    """The k best of ``values [m, n]`` per row (stable: ties keep the earlier pair); with `skip_zeros`, exact
    zeros rank after every non-zero value (they are dropped later if any non-zero value is kept)."""
    key = values
    if skip_zeros:
        key = values.masked_fill(values == 0, -math.inf if largest else math.inf)
    order = _stable_top(key, k, largest)
    return values.gather(1, order), pairs.gather(1, order)


def _stable_top(key: Tensor, k: int, largest: bool) -> Tensor:
    """``[m, k]`` positions of the k best of every row of ``key [m, n]``, ties in position order: the values
    better than the row's k-th (found by `torch.topk`) and the first of those equal to it, k in all, stably
    sorted."""
    m, n = key.shape
    if n <= 4 * k or bool(key.isnan().any()):
        return torch.sort(key, dim=1, descending=largest, stable=True).indices[:, :k]
    kth = key.topk(k, dim=1, largest=largest).values[:, -1:]
    better = key > kth if largest else key < kth
    tie = key == kth
    room = k - better.sum(dim=1, keepdim=True)  # places left for values equal to the k-th
    chosen = better | (tie & (tie.cumsum(dim=1) <= room))  # exactly k a row
    at = chosen.nonzero(as_tuple=True)[1].reshape(m, k)  # in position order
    return at.gather(1, torch.sort(key.gather(1, at), dim=1, descending=largest, stable=True).indices)


def _entry(values: Tensor, pairs: Tensor, n_zero: int, n_outputs: int, scalar: bool, skip_zeros: bool) -> TopKEntry:
    """One feature's `TopKEntry` from its kept ``values [k]`` and example-major ``pairs [k]``."""
    if skip_zeros:
        keep = values != 0
        if bool(keep.any()):
            values, pairs = values[keep], pairs[keep]
    n_zero -= int((values == 0).sum())
    return TopKEntry(pairs // n_outputs, values, None if scalar else pairs % n_outputs, n_zero)


def best_examples(values: Tensor, k: int, largest: bool = True, skip_zeros: bool = True) -> TopKEntry:
    """The `max_activating` selection of one feature's values over a dataset, ``values [N]``: the k largest
    (or smallest) examples, exact zeros skipped as there."""
    v = torch.as_tensor(values).reshape(1, -1)
    chosen, pairs = _best(v, torch.arange(v.shape[1])[None], min(k, v.shape[1]), largest, skip_zeros)
    return _entry(chosen[0], pairs[0], int((v == 0).sum()), 1, True, skip_zeros)


def feature_values(features: EffectiveFeatures, feature: FeatureSpec, by: str = "value") -> Tensor:
    """``[N, K]``: the value of one feature, group, eigenfeature or callable on every (example, component)
    pair, exactly as `max_activating` ranks them (module docstring)."""
    one_of("by", by, BY)
    label, fn = _resolve(_Space.of(features), feature, by)
    return _Evaluator([label], [fn])(features)[0]


def position_values(
    features: EffectiveFeatures, feature: str, by: str = "value", n_positions: int | None = None
) -> tuple[Tensor, Tensor]:
    """A feature's or group's value split over the positions of its sequences.

    The features of a sequence model sum over positions (``∂z/∂W = Σ_t δ_t a_tᵀ``); the factors keep one
    rank term per position, in blocks of T (one block per use of a weight, order term or quadrature node).
    Returns ``(per_position [N, K, T], shared [N, K])``: the part of the value carried by each of the T
    positions, and the part no position carries alone (biases, norm gains, factors stored dense); they add up
    to `feature_values`. n_positions: T, the sequence length (default: the fewest rank terms of any factor).
    """
    one_of("by", by, ("value", "contribution"))
    label, fn = _resolve(_Space.of(features), feature, by)
    if not isinstance(fn, _Functional):
        raise ConfigError(f"{label!r} is not a feature or group id; per-position values need one")
    n, k = features.n_examples, features.n_outputs
    terms = {name: features.factors[name].selected_terms(sel) for name, sel in fn.parts.items()}
    ranks = {t.shape[2] for t in terms.values() if t.shape[2] > 1}
    if n_positions is None:
        n_positions = min(ranks) if ranks else 1
    positive_int("n_positions", n_positions)
    per_position = torch.zeros(n, k, n_positions, dtype=features.dtype, device=features.device)
    shared = torch.zeros(n, k, dtype=features.dtype, device=features.device)
    for t in terms.values():
        r = t.shape[2]
        if r > 1 and r % n_positions == 0:
            per_position += t.expand(n, k, r).reshape(n, k, r // n_positions, n_positions).sum(dim=2)
        else:
            shared += t.expand(n, k, r).sum(dim=2)
    return per_position, shared


class _Evaluator:
    """Every feature's values on a batch, ``[m, n, K]``: the linear functionals together, one `Selection` with a
    weight column per functional for each parameter tensor (in chunks whose merged block stays small and costs
    at most about what the functionals cost one by one), the others one by one."""

    def __init__(self, labels: list[str], fns: list[Callable[[EffectiveFeatures], Tensor]]):
        self.labels, self.fns = labels, fns
        self.others = [i for i, fn in enumerate(fns) if not isinstance(fn, _Functional)]
        by_tensor: dict[str, list[tuple[int, Selection]]] = {}
        for i, fn in enumerate(fns):
            if isinstance(fn, _Functional):
                for name, sel in fn.parts.items():
                    by_tensor.setdefault(name, []).append((i, sel))
        self.chunks = [(name, *_merged(chunk)) for name, items in by_tensor.items() for chunk in _chunked(items)]

    def __call__(self, feats: EffectiveFeatures) -> Tensor:
        out = torch.zeros(len(self.fns), feats.n_examples, feats.n_outputs, dtype=feats.dtype, device=feats.device)
        for name, sel, members in self.chunks:
            out.index_add_(0, members.to(out.device), feats.factors[name].selected(sel).movedim(-1, 0))
        for i in self.others:
            out[i] = _values(self.fns[i], feats, self.labels[i])
        return out


def _touched(sel: Selection) -> tuple[set[int], set[int]]:
    """The rows and columns of a matrix a selection touches (of another tensor: its positions, and no columns)."""
    if len(sel.shape) != 2:
        return set(sel.flat.tolist()), {0}
    rows, cols, _ = sel.block
    return set(rows.tolist()), set(cols.tolist())


def _chunked(items: list[tuple[int, Selection]]) -> list[list[tuple[int, Selection]]]:
    """The selections on one tensor in chunks evaluated together, smallest first: a selection joins the chunk
    while the merged block (rows × columns × selections) has at most `_MERGED_ELEMENTS` entries and at most
    twice, plus `_MERGE_SLACK`, the entries of the members' own blocks."""
    touched = [_touched(sel) for _, sel in items]
    by_size = sorted(range(len(items)), key=lambda i: len(touched[i][0]) * len(touched[i][1]))
    chunks: list[list[tuple[int, Selection]]] = []
    rows: set[int] = set()
    cols: set[int] = set()
    own = 0
    for i in by_size:
        r, c = touched[i]
        size = len(r) * len(c)
        if chunks:
            merged = len(rows | r) * len(cols | c) * (len(chunks[-1]) + 1)
            if merged <= _MERGED_ELEMENTS and merged <= 2 * (own + size) + _MERGE_SLACK:
                chunks[-1].append(items[i])
                rows, cols, own = rows | r, cols | c, own + size
                continue
        chunks.append([items[i]])
        rows, cols, own = set(r), set(c), size
    return chunks


def _merged(chunk: list[tuple[int, Selection]]) -> tuple[Selection, Tensor]:
    """One selection with a weight column per member ``w [m, G]``, and the members' places in the list ``[G]``."""
    flat = torch.cat([s.flat for _, s in chunk])
    w = torch.zeros(len(flat), len(chunk), dtype=chunk[0][1].w.dtype)
    start = 0
    for g, (_, s) in enumerate(chunk):
        w[start : start + len(s.flat), g] = s.w
        start += len(s.flat)
    return Selection(chunk[0][1].shape, flat, w), torch.tensor([j for j, _ in chunk])


def _values(fn: Callable[[EffectiveFeatures], Tensor], feats: EffectiveFeatures, label: str) -> Tensor:
    """``[n, K]`` values of one feature on a batch; a callable's output is checked."""
    v = fn(feats)
    if not isinstance(v, Tensor) or v.ndim not in (1, 2) or v.shape[0] != feats.n_examples:
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ConfigError(f"feature {label!r} returned {got} for a batch of {feats.n_examples}; return [n] or [n, K]")
    v = v.reshape(feats.n_examples, -1)
    if v.shape[1] not in (1, feats.n_outputs):
        raise ConfigError(
            f"feature {label!r} returned {v.shape[1]} values per example; the readout has {feats.n_outputs}"
        )
    return v.expand(feats.n_examples, feats.n_outputs).detach()


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


@dataclass
class TopKEntry:
    """The top-k of one feature.

    Attributes:
        indices: ``[k']`` example indices (positions in the stream of examples), best first; k' ≤ k when
            exact zeros were skipped.
        values: ``[k']`` the feature's values there.
        components: ``[k']`` readout components of each pair (None for a scalar readout).
        n_zero: (example, component) pairs whose value is exactly 0 and that are not listed.
    """

    indices: Tensor
    values: Tensor
    components: Tensor | None = None
    n_zero: int = 0

    def examples(self, data: Any) -> Any:
        """The top-k inputs of tensor data (``[k, ...]``; a tuple of tensors gives a tuple)."""
        if isinstance(data, Tensor):
            return data[self.indices]
        if isinstance(data, tuple) and all(isinstance(t, Tensor) for t in data):
            return tuple(t[self.indices] for t in data)
        raise DataError(
            f"examples() indexes tensor data or a tuple of tensors, got {type(data).__name__}; "
            "index your dataset with .indices instead"
        )


@register
@dataclass
class TopK:
    """Streaming top-k results, one `TopKEntry` per feature.

    Attributes:
        features: feature labels in the order asked (ids as given, ``eigen[i]``, callables' names).
        entries: ``{label: TopKEntry}``.
        meta: ``k``, ``by``, ``largest``, ``n_examples``, ``n_outputs``, ``order``.

    ``result[key]`` takes a label, a position, or the object that was passed (an eigenfeature, a callable).
    """

    features: list[str]
    entries: dict[str, TopKEntry]
    meta: dict[str, Any]
    _originals: dict[int, str] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.features)

    def __iter__(self) -> Iterator[str]:
        return iter(self.features)

    def __getitem__(self, key: Any) -> TopKEntry:
        if isinstance(key, int) and not isinstance(key, bool):
            return self.entries[self.features[key]]
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], Spectrum):
            key = key[0][key[1]]
        if isinstance(key, Eigenfeature):
            key = key.id
        label = key.strip() if isinstance(key, str) else self._originals.get(id(key))
        if label not in self.entries:
            raise FeatureIdError(f"{key!r} is not among the features searched: {', '.join(self.features[:10])}")
        return self.entries[label]

    def __repr__(self) -> str:
        lines = [
            f"TopK(k={self.meta['k']}, by={self.meta['by']!r}, largest={self.meta['largest']}, "
            f"N={self.meta['n_examples']})"
        ]
        for label in self.features[:10]:
            e = self.entries[label]
            shown = ", ".join(f"{i}:{v:.3g}" for i, v in zip(e.indices[:5].tolist(), e.values[:5].tolist()))
            zeros = f" ({e.n_zero} at 0 not listed)" if e.n_zero else ""
            lines.append(f"  {label}: {shown}{', ...' if len(e.indices) > 5 else ''}{zeros}")
        return "\n".join(lines)

    # ---- persistence ----------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        tensors: dict[str, Tensor] = {}
        for i, label in enumerate(self.features):
            e = self.entries[label]
            tensors[f"{i}.indices"] = e.indices
            tensors[f"{i}.values"] = e.values
            if e.components is not None:
                tensors[f"{i}.components"] = e.components
        n_zero = [self.entries[label].n_zero for label in self.features]
        return tensors, {"kind": "TopK", "features": list(self.features), "meta": dict(self.meta), "n_zero": n_zero}

    @classmethod
    def validate_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Refuse (`SaveFileError`) a result whose entries do not fit its description."""
        about = {
            "k": io.whole(1),
            "by": io.text(BY),
            "largest": io.flag,
            "n_examples": io.whole(1),
            "n_outputs": io.whole(1),
            "order": io.text(ORDERS),
            "skip_zeros": io.flag,
        }
        m = io.record(
            meta,
            "meta",
            {
                "kind": io.text(("TopK",)),
                "features": io.list_of(io.text(), unique=True),
                "meta": lambda v, where: io.record(v, where, about),
                "n_zero": io.list_of(io.whole(0)),
            },
        )
        if len(m["n_zero"]) != len(m["features"]):
            raise SaveFileError("meta.n_zero needs one count per feature")
        n, n_outputs, k = m["meta"]["n_examples"], m["meta"]["n_outputs"], m["meta"]["k"]
        names, with_components = set(), {f"{i}.components" in tensors for i in range(len(m["features"]))}
        if len(with_components) > 1:
            raise SaveFileError("some entries have readout components and others not")
        for i in range(len(m["features"])):
            indices = io.tensor(tensors, f"{i}.indices", "int", ndim=1)
            io.tensor(tensors, f"{i}.values", "float", shape=indices.shape)
            if len(indices) > k or (len(indices) and not 0 <= int(indices.min()) <= int(indices.max()) < n):
                raise SaveFileError(f"entry {i} holds more than k={k} examples or indices outside [0, {n})")
            names |= {f"{i}.indices", f"{i}.values"}
            if f"{i}.components" in tensors:
                comp = io.tensor(tensors, f"{i}.components", "int", shape=indices.shape)
                if len(comp) and not 0 <= int(comp.min()) <= int(comp.max()) < n_outputs:
                    raise SaveFileError(f"entry {i} holds readout components outside [0, {n_outputs})")
                names.add(f"{i}.components")
        io.tensor_names(tensors, names)

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> TopK:
        n_zero = meta["n_zero"]
        entries = {
            label: TopKEntry(
                tensors[f"{i}.indices"], tensors[f"{i}.values"], tensors.get(f"{i}.components"), int(n_zero[i])
            )
            for i, label in enumerate(meta["features"])
        }
        return cls(list(meta["features"]), entries, dict(meta["meta"]))


# ---- synthetic inputs ----------------------------------------------------------------------------------
def synthesize(
    dual: DualModel,
    feature: str | Eigenfeature | tuple,
    init: Tensor | None = None,
    steps: int = 200,
    lr: float = 0.05,
    l2: float = 1e-3,
    tv: float = 0.0,
    clamp: tuple[float, float] | None = None,
    by: str = "value",
    component: int | None = None,
    shape: Sequence[int] | None = None,
    tv_shape: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Tensor:
    """An input that maximises a feature, by regularised gradient ascent (Adam) on the input.

    Maximises ``value(x) − l2·‖x‖² − tv·TV(x)`` per example, projecting onto ``clamp`` after each step.
    ``value(x) = Σ_μ w_μ φ^E_μ(x)`` is the feature's value as in `max_activating`, differentiable in x: a
    directional derivative of the readout along w at the order's parameters (``"nlo"`` adds ½ the mixed
    second derivative along w and Δθ), by forward-mode ``torch.func.jvp``.

    Args:
        feature: a feature id, group id or eigenfeature.
        init: ``[b, *input_shape]`` starting points, each optimised on its own (e.g. ``x[:4]``); default one
            start of small seeded noise of per-example `shape` (or the first Linear layer's ``in_features``).
        component: the readout component to maximise (required when the readout has several).
        tv_shape: the per-example shape the total variation is taken over (e.g. ``(8, 8)`` for flattened
            8×8 images); default the input's own per-example shape (last two dims, or the vector).

    Returns:
        ``[b, *input_shape]`` the optimised inputs, detached (b = 1 without `init`).

    Token (integer) inputs cannot be optimised by gradients: use `max_activating` over the whole input space
    (e.g. every (a, b) pair of a modular-addition model).
    """
    one_of("by", by, ("value", "contribution"))
    if callable(feature) and not isinstance(feature, Eigenfeature):
        raise ConfigError("synthesize needs a feature id, group id or eigenfeature (a callable is not differentiable)")
    label, functional = _resolve(_Space.of(dual), feature, by)
    assert isinstance(functional, _Functional)
    x0 = _start(dual, init, shape, seed)
    direction = functional.as_direction(dual.theta_trained)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in tqdm(range(steps), desc=f"synthesize {label}", disable=None if progress else True, leave=False):
        value = _pick(dual.directional(x, direction), component)  # [b]
        penalty = l2 * x.square().flatten(1).sum(1) + (tv * _total_variation(x, tv_shape) if tv else 0.0)
        loss = -(value - penalty).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if clamp is not None:
            with torch.no_grad():
                x.clamp_(*clamp)
    return x.detach()


def _pick(values: Tensor, component: int | None) -> Tensor:
    """``[b]`` one readout component of ``[b, K]`` values."""
    k = values.shape[1]
    if component is None:
        if k > 1:
            raise ConfigError(f"the readout has {k} components; pass component= (0..{k - 1}) to choose one")
        return values[:, 0]
    if not -k <= component < k:
        raise ConfigError(f"component={component} is out of range for a readout with {k} components")
    return values[:, component]


def _start(dual: DualModel, init: Tensor | None, shape: Sequence[int] | None, seed: int) -> Tensor:
    """``[b, *input_shape]`` the starting inputs."""
    first = next((m for m in dual.model.modules() if list(m.parameters(recurse=False))), None)
    if isinstance(first, nn.Embedding) or (init is not None and not init.is_floating_point()):
        raise ConfigError(
            "synthesize optimises continuous inputs by gradient ascent, and this model takes integer "
            "(token) inputs; enumerate the input space instead and search it with "
            "ef.max_activating(dual, all_inputs, feature) — e.g. all p² pairs of a modular-addition model"
        )
    if init is not None:
        if init.ndim < 2:
            raise ConfigError(f"init must be a batch [b, *input_shape] (e.g. x[:1]), got shape {tuple(init.shape)}")
        return init.detach().to(device=dual.device, dtype=dual.dtype)
    if shape is None:
        if not isinstance(first, nn.Linear):
            raise ConfigError("cannot infer the input shape of this model; pass init= (e.g. x[:1]) or shape=")
        shape = (first.in_features,)
    g = torch.Generator().manual_seed(seed)
    return 0.01 * torch.randn(1, *shape, generator=g, dtype=dual.dtype).to(dual.device)


def _total_variation(x: Tensor, tv_shape: Sequence[int] | None) -> Tensor:
    """``[b]`` anisotropic total variation over the last two dims (or the vector) of each example."""
    img = x.reshape(x.shape[0], *tv_shape) if tv_shape is not None else x
    if img.ndim == 2:
        return (img[:, 1:] - img[:, :-1]).abs().sum(1)
    dh = (img[..., 1:, :] - img[..., :-1, :]).abs().flatten(1).sum(1)
    dw = (img[..., :, 1:] - img[..., :, :-1]).abs().flatten(1).sum(1)
    return dh + dw
