"""Turning what a user passes as data into batches, and calling the model on a batch.

A batch is one of

- a tensor of inputs ``[n, ...]``: ``model(batch)``;
- a tuple or list whose first element is the inputs (``(inputs, targets)``): ``model(batch[0])`` (a dict first
  element is passed as keyword arguments);
- a dict of model inputs (``{"input_ids": ..., "attention_mask": ...}``, the Hugging Face way): ``model(**batch)``;
- anything else, when the `DualModel` is given ``forward=callable(model, batch)``.

The length of a batch is the first dimension of its model inputs (of a dict's entries: the largest; entries of
length 1 are shared by all examples); tensors whose first dimension is that length are sliced and checked with
the batch, every tensor is moved, every other entry passes through as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import DataError, NonFiniteError

if TYPE_CHECKING:
    from ._swap import Forward, ParameterSwap

Batch = Any  # a Tensor, a tuple/list whose first element is the inputs, a dict of model inputs, or any object


def _is_dict(x: Any) -> bool:
    return isinstance(x, Mapping)


def _leaves(x: Any) -> Iterator[Tensor]:
    """Every tensor in a (nested) tuple, list or dict, in order."""
    if isinstance(x, Tensor):
        yield x
    elif _is_dict(x):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, tuple | list):
        for v in x:
            yield from _leaves(v)


def _map(x: Any, fn: Any) -> Any:
    """`x` with `fn` applied to every tensor of a (nested) tuple, list or dict; other entries as they are."""
    if isinstance(x, Tensor):
        return fn(x)
    if _is_dict(x):
        return {k: _map(v, fn) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_map(v, fn) for v in x)
    return x


def _length(x: Any) -> int | None:
    """The number of examples of `x`: the first dimension of a tensor, of the first tensor of a tuple or list,
    the largest first dimension in a dict (entries of length 1 broadcast over the examples); None if no tensor."""
    if _is_dict(x):
        return max((t.shape[0] for t in _leaves(x) if t.ndim), default=None)
    return next((t.shape[0] for t in _leaves(x) if t.ndim), None)


@dataclass(frozen=True)
class Batches:
    """An iterable of batches with a known total size where one can be known.

    `source` is a tensor, a tuple of tensors sharing the first dimension (`(inputs, targets)`), a dict of
    tensors sharing the first dimension (model inputs by name), or an iterable of batches.
    """

    source: Any
    batch_size: int

    def __iter__(self) -> Iterator[Batch]:
        n = self._sliceable_length()
        if n is None:
            yield from self.source
            return
        for i in range(0, n, self.batch_size):
            yield slice_batch(self.source, slice(i, i + self.batch_size))

    def _sliceable_length(self) -> int | None:
        """N when `source` is one dataset to cut into batches (a tensor, tuple or dict); None for an iterable."""
        if isinstance(self.source, Tensor | tuple) or _is_dict(self.source):
            return batch_len(self.source)
        return None

    @property
    def n_examples(self) -> int | None:
        n = self._sliceable_length()
        if n is not None:
            return n
        dataset = getattr(self.source, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__"):
            return len(dataset)
        return None

    @property
    def n_batches(self) -> int | None:
        n = self._sliceable_length()
        if n is not None:
            return -(-n // self.batch_size)
        return len(self.source) if hasattr(self.source, "__len__") else None


def as_batches(data: Any, batch_size: int) -> Batches:
    """Validate `data` and wrap it as `Batches`.

    Raises `DataError` for empty data, a tuple or dict whose tensors disagree in length, or something that is
    neither a tensor, a tuple of tensors, a dict of model inputs nor an iterable.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
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
    elif _is_dict(data):
        lengths = {k: t.shape[0] for k, t in data.items() if isinstance(t, Tensor) and t.ndim}
        if not lengths:
            raise DataError(
                f"a dict of data must hold tensors of model inputs sharing their first (example) dimension, e.g. "
                f"{{'input_ids': [N, T], 'attention_mask': [N, T]}}; got keys {list(data)}"
            )
        if len(set(lengths.values()) - {1}) > 1:
            raise DataError(
                f"the tensors in the data dict have different lengths {lengths}; each holds one row per example "
                "(entries of length 1 are shared by all examples)"
            )
        if max(lengths.values()) == 0:
            raise DataError("data is empty; pass at least one example")
    elif not isinstance(data, Iterable) or isinstance(data, str | bytes):
        raise DataError(
            f"cannot read data of type {type(data).__name__}: pass a tensor of inputs, a tuple "
            "(inputs, targets), a dict of model inputs, or an iterable of batches such as a DataLoader"
        )
    return Batches(data, batch_size)


def batch_inputs(batch: Batch) -> Tensor | Mapping[str, Any]:
    """What the model is called on: the batch itself, its first element, or a dict of keyword inputs."""
    if isinstance(batch, Tensor) or _is_dict(batch):
        return batch
    if isinstance(batch, tuple | list) and batch and (isinstance(batch[0], Tensor) or _is_dict(batch[0])):
        return batch[0]
    raise DataError(
        "a batch must be a tensor, a tuple/list whose first element is the input tensor, or a dict of model "
        f"inputs (for anything else pass forward=callable(model, batch) to the DualModel), got {type(batch).__name__}"
    )


def forward_batch(model: nn.Module, batch: Batch, forward: Forward | None = None) -> Any:
    """The model's output on a batch: ``forward(model, batch)`` when given; else ``model(**inputs)`` for a dict
    of inputs and ``model(inputs)`` otherwise (``inputs = batch_inputs(batch)``)."""
    if forward is not None:
        return forward(model, batch)
    inputs = batch_inputs(batch)
    return model(**inputs) if _is_dict(inputs) else model(inputs)


def call_model(swap: ParameterSwap, params: Mapping[str, Tensor], batch: Batch) -> Any:
    """The model's output on a batch computed with `params` (``{named_parameters name: tensor}``, a subset is
    fine), called the way the swap's ``forward`` (or the default convention of `forward_batch`) says."""
    with swap.use(params):
        return forward_batch(swap.model, batch, swap.forward)


def describe_batch(batch: Batch) -> str:
    """One line naming the shapes and dtypes of a batch's model inputs."""

    def one(t: Any) -> str:
        return f"shape {tuple(t.shape)} and dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__

    try:
        inputs = batch_inputs(batch)
    except DataError:
        return type(batch).__name__
    if _is_dict(inputs):
        return "{" + ", ".join(f"{k}: {one(v)}" for k, v in inputs.items()) + "}"
    return f"inputs of {one(inputs)}"


def batch_to(batch: Batch, device: torch.device, dtype: torch.dtype | None) -> Batch:
    """Move every tensor of a batch to `device`; cast floating tensors to `dtype` when it is given, and integer
    tensors (token ids of any integer dtype: int32, uint8, ...) to int64, the index type of embeddings."""

    def move(t: Tensor) -> Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        if not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool:
            return t.to(device=device, dtype=torch.int64)
        return t.to(device=device)

    return _map(batch, move)


def check_finite_inputs(batch: Batch, offset: int) -> None:
    """Raise `NonFiniteError` naming the first example (global index) whose model input holds NaN or inf.

    The model inputs are the batch, its first element, or every entry of a dict (see `batch_inputs`); for any
    other batch (a ``forward=`` callable's) every tensor of the batch.
    """
    n = batch_len(batch)
    try:
        inputs = batch_inputs(batch)
    except DataError:
        inputs = batch
    first: int | None = None
    for t in _leaves(inputs):
        if (t.is_floating_point() or t.is_complex()) and t.numel() and t.ndim and t.shape[0] == n:
            if bool(torch.isfinite(t).all()):
                continue
            bad = ~torch.isfinite(t.reshape(n, -1)).all(dim=1)
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                first = i if first is None else min(first, i)
    if first is not None:
        raise NonFiniteError(
            f"input example {first + offset} contains NaN or inf; clean or drop it before computing features"
        )


def batch_len(batch: Batch) -> int:
    """Number of examples in a batch: the first dimension of its model inputs (of its first tensor)."""
    try:
        inputs = batch_inputs(batch)
    except DataError:
        inputs = batch
    n = _length(inputs)
    if n is None and isinstance(inputs, Tensor):
        raise DataError(
            f"a batch's input is a 0-d tensor ({inputs}); each batch must hold examples along its first axis"
        )
    if n is None:
        raise DataError(
            f"cannot tell the number of examples of a batch of type {type(batch).__name__}: a batch must hold "
            "tensors with the examples along their first dimension (a tensor, a tuple/list whose first element "
            "is the input tensor, or a dict of model inputs)"
        )
    return n


def slice_batch(batch: Batch, sl: slice | Tensor) -> Batch:
    """Examples `sl` (a slice or an index tensor) of a batch: every tensor whose first dimension is the batch's
    length is sliced, other entries are kept."""
    n = batch_len(batch)
    return _map(batch, lambda t: t[sl] if t.ndim and t.shape[0] == n else t)
