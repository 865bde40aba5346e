"""Readable, stable feature ids: ``"<state_dict name>[i,j]"`` for one parameter entry.

A model with a million weights has a million features, so `FeatureIds` is a lazy sequence: ids are formed
on access and parsed back to flat positions without a table. Group ids use the same syntax:

===============================  ==========  ==============================================
id                               kind        features
===============================  ==========  ==============================================
``"0.weight[3,1]"``              param       one entry
``"0.weight[3,:]"``              neuron      a weight row (the layer's bias entry joins it)
``"0.weight[:,1]"``              input       a weight column
``"0.weight"``                   module      the whole tensor
``"0.weight[:,1,:,:]"`` …        slice       any other mix of indices and ``:``
``"blocks.0.attn.head[2]"``      head        an attention head (`efffeat.groups`)
===============================  ==========  ==============================================

`parse` reads the syntax of an id; `FeatureIds.parse` also checks it against a model's parameters.
"""

from __future__ import annotations

import bisect
import difflib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .errors import FeatureIdError

_ID = re.compile(r"^(?P<name>.+?)(?:\[(?P<index>[^\]]*)\])?$")
_HEAD = re.compile(r"^(?P<attn>.+)\.head\[(?P<h>\d+)\]$")
KINDS = ("param", "neuron", "input", "module", "slice", "head")


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter tensor sits in the flat feature axis."""

    name: str  # named_parameters() name
    state_name: str  # state_dict() name, used in ids
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> list:
        """``[name, state_name, shape, offset]`` (the form saved in files)."""
        return [self.name, self.state_name, list(self.shape), self.offset]

    @staticmethod
    def from_json(item: list) -> ParamSlot:
        name, state_name, shape, offset = item
        return ParamSlot(name, state_name, tuple(shape), offset)


@dataclass(frozen=True)
class ParsedId:
    """A feature or group id, read.

    Attributes:
        id: the id as given (stripped); kind: one of `KINDS` (module table).
        tensor: the parameter tensor's name (``"0.weight"``; for a head, the attention module ``"blocks.0.attn"``).
        index: one entry per tensor dimension, an ``int`` or ``slice(None)`` for ``:`` (``()`` for a head or a
            bare tensor name before it is checked against a model); head: the head number, or None.
        slot: the model's `ParamSlot` when parsed by `FeatureIds.parse` (None for a head or a syntax-only parse).
    """

    id: str
    kind: str
    tensor: str
    index: tuple[int | slice, ...]
    head: int | None = None
    slot: ParamSlot | None = None

    @property
    def layer(self) -> str:
        """The module the features belong to: ``"0"`` for ``"0.weight[3,:]"``, ``"blocks.0.attn"`` for a head."""
        return self.tensor if self.kind == "head" else self.tensor.rpartition(".")[0]

    @property
    def row(self) -> int | None:
        """The first index when it is a number (a neuron's row, a single entry's row)."""
        return self.index[0] if self.index and isinstance(self.index[0], int) else None

    @property
    def column(self) -> int | None:
        """The second index when it is a number (an input column)."""
        return self.index[1] if len(self.index) > 1 and isinstance(self.index[1], int) else None


def _kind(index: tuple[int | slice, ...]) -> str:
    if all(isinstance(i, int) for i in index):
        return "param"
    if all(isinstance(i, slice) for i in index):
        return "module"
    if len(index) >= 2 and isinstance(index[0], int) and all(isinstance(i, slice) for i in index[1:]):
        return "neuron"
    if len(index) >= 2 and isinstance(index[1], int) and all(isinstance(i, slice) for i in index[:1] + index[2:]):
        return "input"
    return "slice"


def parse(fid: str) -> ParsedId:
    """The syntax of an id (`ParsedId`), without a model: ``parse("0.weight[3,:]").kind == "neuron"``.

    A bare name is a whole tensor (``kind="module"``, ``index=()``); use `FeatureIds.parse` to check an id
    against a model and fill in the index of a bare name.
    """
    if not isinstance(fid, str):
        raise FeatureIdError(f"a feature id is a string such as '0.weight[3,1]', got {fid!r}")
    text = fid.strip()
    head = _HEAD.match(text)
    if head is not None:
        return ParsedId(text, "head", head["attn"], (), int(head["h"]))
    m = _ID.match(text)
    if m is None or m["index"] is None:
        return ParsedId(text, "module", text, ())
    raw = m["index"]
    index: list[int | slice] = []
    for p in ([q.strip() for q in raw.split(",")] if raw.strip() else []):
        if p == ":":
            index.append(slice(None))
            continue
        try:
            index.append(int(p))
        except ValueError:
            raise FeatureIdError(f"{fid!r}: index {p!r} is not an integer or ':'") from None
    return ParsedId(text, _kind(tuple(index)) if index else "param", m["name"], tuple(index))


class FeatureIds(Sequence[str]):
    """The P feature ids in `named_parameters()` order, each parameter flattened row-major."""

    def __init__(self, slots: list[ParamSlot]):
        self.slots = slots
        self._by_name: dict[str, ParamSlot] = {}
        for s in slots:
            self._by_name[s.state_name] = s
            self._by_name.setdefault(s.name, s)
        self._offsets = [s.offset for s in slots]
        self._total = slots[-1].offset + slots[-1].numel if slots else 0

    def __len__(self) -> int:
        return self._total

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += self._total
        if not 0 <= i < self._total:
            raise IndexError(f"feature index {i} out of range for {self._total} features")
        slot = self.slots[bisect.bisect_right(self._offsets, i) - 1]
        local = i - slot.offset
        if not slot.shape:
            return f"{slot.state_name}[]"
        idx = []
        for d in reversed(slot.shape):
            idx.append(local % d)
            local //= d
        return f"{slot.state_name}[{','.join(str(j) for j in reversed(idx))}]"

    def __iter__(self) -> Iterator[str]:
        for i in range(self._total):
            yield self[i]

    def __contains__(self, fid: object) -> bool:
        try:
            self.index(fid)  # type: ignore[arg-type]
        except FeatureIdError:
            return False
        return True

    def slot(self, name: str) -> ParamSlot:
        """The parameter slot called `name` (state_dict or named_parameters name)."""
        if not isinstance(name, str):
            raise FeatureIdError(f"a parameter is named by a string such as '0.weight', got {name!r}")
        try:
            return self._by_name[name]
        except KeyError:
            raise FeatureIdError(self._unknown(name, name)) from None

    def index(self, fid: str, *_args) -> int:  # type: ignore[override]
        """Flat position of a single-entry id such as ``"0.weight[3,1]"``."""
        parsed = self.parse(fid)
        if parsed.kind != "param" or parsed.slot is None:
            raise FeatureIdError(f"{fid!r} names a group of features, not one; use ef.rank(..., group=...)")
        slot = parsed.slot
        flat = 0
        for i, d in zip(parsed.index, slot.shape):
            flat = flat * d + i
        return slot.offset + flat

    def parse(self, fid: str) -> ParsedId:
        """An id read and checked against the model's parameters (`ParsedId` with its `ParamSlot`).

        A bare tensor name (``"0.weight"``) is the whole tensor (all slices). Head ids are read but not
        checked here (heads are resolved by `efffeat.groups`, which knows the attention layout).
        """
        parsed = parse(fid)
        if parsed.kind == "head":
            return parsed
        name = parsed.tensor
        if name not in self._by_name:
            raise FeatureIdError(self._unknown(fid, name))
        slot = self._by_name[name]
        if parsed.kind == "module" and not parsed.index:
            index: tuple[int | slice, ...] = tuple(slice(None) for _ in slot.shape)
            return ParsedId(parsed.id, "module" if slot.shape else "param", name, index, None, slot)
        if len(parsed.index) != len(slot.shape):
            raise FeatureIdError(
                f"{fid!r}: {slot.state_name} has shape {list(slot.shape)}, so its ids take "
                f"{len(slot.shape)} indices, e.g. {self[slot.offset]!r}"
            )
        for j, d in zip(parsed.index, slot.shape):
            if isinstance(j, int) and not 0 <= j < d:
                raise FeatureIdError(f"{fid!r}: index {j} is out of range for a dimension of size {d}")
        kind = parsed.kind if parsed.index else "param"
        return ParsedId(parsed.id, kind, name, parsed.index, None, slot)

    def _unknown(self, fid: str, name: str) -> str:
        names = list(self._by_name)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        shown = ", ".join(s.state_name for s in self.slots[:6]) + (", ..." if len(self.slots) > 6 else "")
        return f"unknown feature id {fid!r}: no parameter called {name!r}.{hint} Parameters: {shown}"
