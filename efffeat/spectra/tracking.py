"""An analysis repeated over training checkpoints: the series and its central-difference derivative."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import io
from .._savable import register
from ..errors import ConfigError, DataError, SaveFileError


def central_difference(values: Tensor | Sequence[float], epochs: Tensor | Sequence[float] | None = None) -> Tensor:
    """``[T]`` derivative of a series: central differences inside, one-sided at the two ends.

    ``d_i = (y_{i+1} − y_{i−1}) / (x_{i+1} − x_{i−1})``; x defaults to ``0 … T−1``.
    """
    y = torch.as_tensor(values, dtype=torch.float64)
    x = torch.arange(y.shape[0]) if epochs is None else torch.as_tensor(epochs)
    x = x.to(torch.float64)
    if y.ndim != 1 or y.shape[0] < 2 or x.shape != y.shape:
        raise ConfigError("central_difference needs matching 1-d series of at least two points")
    if bool((x[1:] <= x[:-1]).any()):
        raise ConfigError("epochs must be strictly increasing")
    d = torch.empty_like(y)
    d[0] = (y[1] - y[0]) / (x[1] - x[0])
    d[-1] = (y[-1] - y[-2]) / (x[-1] - x[-2])
    d[1:-1] = (y[2:] - y[:-2]) / (x[2:] - x[:-2])
    return d


@register
@dataclass
class Tracking:
    """A scalar analysis over training checkpoints and its derivative.

    Attributes:
        epochs: ``[T]``; values: ``[T]`` the analysis at each checkpoint; derivative: ``[T]`` its central
        difference with respect to the epoch.
    """

    epochs: Tensor
    values: Tensor
    derivative: Tensor

    @property
    def peak_epoch(self) -> int:
        """The epoch where the derivative is largest."""
        return int(self.epochs[int(self.derivative.argmax())])

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        return {"epochs": self.epochs, "values": self.values, "derivative": self.derivative}, {}

    @classmethod
    def validate_state(cls, tensors: dict[str, Tensor], meta: dict) -> None:
        """Refuse (`SaveFileError`) series of different lengths or epochs that do not increase."""
        io.record(meta, "meta", {})
        io.tensor_names(tensors, {"epochs", "values", "derivative"})
        epochs = io.tensor(tensors, "epochs", "float", ndim=1)
        for name in ("values", "derivative"):
            io.tensor(tensors, name, "float", shape=epochs.shape)
        if len(epochs) < 2 or bool((epochs[1:] <= epochs[:-1]).any()):
            raise SaveFileError("tensor 'epochs' must hold at least two strictly increasing epochs")

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict) -> Tracking:
        return cls(tensors["epochs"], tensors["values"], tensors["derivative"])


def track(checkpoints: Iterable[tuple[int, Any]], analyse: Callable[[Any], float], progress: bool = True) -> Tracking:
    """Run ``analyse(state)`` on each ``(epoch, state)`` checkpoint; return the series and its derivative.

    state is whatever the checkpoints hold (a state_dict, a model); `analyse` returns one number, e.g. the
    overlap of a block of eigenmodes with a feature family.
    """
    epochs, values = [], []
    items = list(checkpoints)
    for epoch, state in tqdm(items, desc="checkpoints", disable=None if progress else True, leave=False):
        epochs.append(float(epoch))
        values.append(float(analyse(state)))
    if len(values) < 2:
        raise DataError(f"track needs at least two checkpoints, got {len(values)}")
    e = torch.tensor(epochs, dtype=torch.float64)
    v = torch.tensor(values, dtype=torch.float64)
    return Tracking(e, v, central_difference(v, e))
