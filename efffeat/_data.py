"""Turning what a user passes as data into batches: a tensor, an `(inputs, targets)` tuple, or any iterable."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import DataError, NonFiniteError

Batch = Any  # a Tensor of inputs, or a tuple/list whose first element is the inputs


@dataclass(frozen=True)
class Batches:
    """An iterable of batches with a known total size where one can be known.

    `source` is a tensor, a tuple of tensors sharing the first dimension (`(inputs, targets)`), or an
    iterable of batches (each a tensor or a tuple/list whose first element is the model input).
    """

    source: Any
    batch_size: int

    def __iter__(self) -> Iterator[Batch]:
        src = self.source
        if isinstance(src, Tensor):
            for i in range(0, src.shape[0], self.batch_size):
                yield src[i : i + self.batch_size]
        elif isinstance(src, tuple):
            n = src[0].shape[0]
            for i in range(0, n, self.batch_size):
                yield tuple(t[i : i + self.batch_size] for t in src)
        else:
            yield from src

    @property
    def n_examples(self) -> int | None:
        src = self.source
        if isinstance(src, Tensor):
            return src.shape[0]
        if isinstance(src, tuple):
            return src[0].shape[0]
        dataset = getattr(src, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__"):
            return len(dataset)
        return None

    @property
    def n_batches(self) -> int | None:
        n = self.n_examples
        if isinstance(self.source, Tensor | tuple) and n is not None:
            return -(-n // self.batch_size)
        return len(self.source) if hasattr(self.source, "__len__") else None


def as_batches(data: Any, batch_size: int) -> Batches:
    """Validate `data` and wrap it as `Batches`.

    Raises `DataError` for empty data, a tuple whose tensors disagree in length, or something that is
    neither a tensor, a tuple of tensors nor an iterable.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(data, Tensor):
        if data.ndim == 0 or data.shape[0] == 0:
            raise DataError(f"data is empty (shape {tuple(data.shape)}); pass at least one example")
    elif isinstance(data, tuple):
        if not data or not all(isinstance(t, Tensor) for t in data):
            raise DataError(
                "a tuple of data must hold tensors, e.g. (inputs, targets); for a list of batches pass a list"
            )
        lengths = {t.shape[0] if t.ndim else -1 for t in data}
        if len(lengths) != 1 or -1 in lengths:
            raise DataError(f"the tensors in the data tuple have different lengths {sorted(lengths)}")
        if data[0].shape[0] == 0:
            raise DataError("data is empty; pass at least one example")
    elif not isinstance(data, Iterable) or isinstance(data, str | bytes | dict):
        raise DataError(
            f"cannot read data of type {type(data).__name__}: pass a tensor of inputs, a tuple "
            "(inputs, targets), or an iterable of batches such as a DataLoader"
        )
    return Batches(data, batch_size)


def batch_inputs(batch: Batch) -> Tensor:
    """The model input of a batch: the batch itself or its first element. `[n, ...]`"""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise DataError(
        f"a batch must be a tensor or a tuple/list whose first element is the input tensor, got {type(batch).__name__}"
    )


def batch_to(batch: Batch, device: torch.device, dtype: torch.dtype | None) -> Batch:
    """Move every tensor of a batch to `device`; cast floating tensors to `dtype` when it is given."""

    def move(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    if isinstance(batch, tuple | list):
        return type(batch)(move(t) for t in batch)
    return move(batch)


def check_finite_inputs(batch: Batch, offset: int) -> None:
    """Raise `NonFiniteError` naming the first example (global index) whose input holds NaN or inf."""
    x = batch_inputs(batch)
    if x.ndim == 0:
        raise DataError(f"a batch's input is a 0-d tensor ({x}); each batch must hold examples along its first axis")
    if (x.is_floating_point() or x.is_complex()) and x.numel():
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            idx = int(torch.nonzero(bad)[0]) + offset
            raise NonFiniteError(f"input example {idx} contains NaN or inf; clean or drop it before computing features")


def batch_len(batch: Batch) -> int:
    """Number of examples in a batch."""
    return batch_inputs(batch).shape[0]


def slice_batch(batch: Batch, sl: slice) -> Batch:
    """Examples `sl` of a batch (every tensor with the batch's length is sliced, other items kept)."""
    n = batch_len(batch)
    if isinstance(batch, Tensor):
        return batch[sl]
    return type(batch)(t[sl] if isinstance(t, Tensor) and t.ndim and t.shape[0] == n else t for t in batch)
