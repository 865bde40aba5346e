"""Readable, stable feature ids: ``"<state_dict name>[i,j]"`` for one parameter entry.

A model with a million weights has a million features, so `FeatureIds` is a lazy sequence: ids are formed
on access and parsed back to flat positions without a table.
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
        slot, index = self.parse(fid)
        if any(isinstance(i, slice) for i in index):
            raise FeatureIdError(f"{fid!r} names a group of features, not one; use ef.rank(..., group=...)")
        flat = 0
        for i, d in zip(index, slot.shape):
            flat = flat * d + i
        return slot.offset + flat

    def parse(self, fid: str) -> tuple[ParamSlot, tuple[int | slice, ...]]:
        """Split an id into its parameter slot and index tuple; ``:`` entries become slices.

        A bare tensor name (``"0.weight"``) is the whole tensor (all slices).
        """
        if not isinstance(fid, str):
            raise FeatureIdError(f"a feature id is a string such as '0.weight[3,1]', got {fid!r}")
        m = _ID.match(fid.strip())
        name, raw = (m["name"], m["index"]) if m else (fid, None)
        if name not in self._by_name:
            raise FeatureIdError(self._unknown(fid, name))
        slot = self._by_name[name]
        if raw is None:
            return slot, tuple(slice(None) for _ in slot.shape)
        parts = [p.strip() for p in raw.split(",")] if raw.strip() else []
        if len(parts) != len(slot.shape):
            raise FeatureIdError(
                f"{fid!r}: {slot.state_name} has shape {list(slot.shape)}, so its ids take "
                f"{len(slot.shape)} indices, e.g. {self[slot.offset]!r}"
            )
        index: list[int | slice] = []
        for p, d in zip(parts, slot.shape):
            if p == ":":
                index.append(slice(None))
                continue
            try:
                j = int(p)
            except ValueError:
                raise FeatureIdError(f"{fid!r}: index {p!r} is not an integer or ':'") from None
            if not 0 <= j < d:
                raise FeatureIdError(f"{fid!r}: index {j} is out of range for a dimension of size {d}")
            index.append(j)
        return slot, tuple(index)

    def _unknown(self, fid: str, name: str) -> str:
        names = list(self._by_name)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        shown = ", ".join(s.state_name for s in self.slots[:6]) + (", ..." if len(self.slots) > 6 else "")
        return f"unknown feature id {fid!r}: no parameter called {name!r}.{hint} Parameters: {shown}"
