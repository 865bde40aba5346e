"""Readouts: what scalar (or K-vector) of the network output the features explain."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ._data import batch_len
from .errors import ConfigError, DataError, EfffeatError, ReadoutError

ReadoutSpec = str | int | Callable[[Any, Any], Tensor]


def _last_position(output: Tensor) -> Tensor:
    """`[N, T, V]` sequence outputs are read at the last position; other outputs are flattened to `[N, K]`."""
    if output.ndim == 3:
        return output[:, -1]
    if output.ndim == 1:
        return output[:, None]
    return output.reshape(output.shape[0], -1)


def _describe(output: Any) -> str:
    return f"a tensor of shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__


class Readout:
    """Turns a model output (and its batch) into a `[N, K]` tensor of the quantities being explained.

    Specs:
      - ``"output"``: every output coordinate (vector readout, K = number of outputs). A `[N]` output is a
        scalar readout; `[N, T, V]` sequence outputs are read at the last position.
      - ``int i``: output coordinate i (scalar readout; sequence models: last position).
      - a callable ``readout(output, batch) -> [N] or [N, K]``; `batch` is what the data iterable yields.

    `scalar` is True when the readout is one number per example (APIs then drop the K axis).
    """

    def __init__(self, spec: ReadoutSpec):
        if isinstance(spec, bool) or not (spec == "output" or isinstance(spec, int) or callable(spec)):
            raise ConfigError(
                f"readout must be 'output', an output index (int) or a callable(output, batch), got {spec!r}"
            )
        self.spec = spec
        self.scalar: bool | None = None if callable(spec) else (spec != "output")

    @property
    def name(self) -> str:
        if callable(self.spec):
            return getattr(self.spec, "__name__", "callable")
        return str(self.spec)

    def __call__(self, output: Any, batch: Any) -> Tensor:
        """`[N, K]` readout values (K = 1 for a scalar readout)."""
        n = batch_len(batch)
        spec = self.spec
        if spec == "output" or isinstance(spec, int):
            if not isinstance(output, Tensor):
                raise ReadoutError(
                    f"the model returned {type(output).__name__}, not a tensor; pass a callable readout "
                    "that picks the tensor to explain, e.g. readout=lambda out, batch: out.logits[:, -1, 0]"
                )
            if output.ndim == 0 or output.shape[0] != n:
                raise DataError(
                    f"the model returned shape {tuple(output.shape)} for a batch of {n} examples; the data must "
                    "hold one example per row ([N, ...]): a single example x is x[None]"
                )
            flat = _last_position(output)
            if output.ndim == 1 and spec == "output":
                self.scalar = True
            if isinstance(spec, int):
                if not -flat.shape[1] <= spec < flat.shape[1]:
                    raise ReadoutError(
                        f"readout={spec} is out of range: the model has {flat.shape[1]} outputs per example"
                    )
                return flat[:, spec].unsqueeze(1)
            return flat
        try:
            value = spec(output, batch)
        except EfffeatError:
            raise
        except Exception as e:  # the user's readout failed, whatever its error type
            raise ReadoutError(
                f"the readout raised {type(e).__name__}: {e}; check it against the model's output ({_describe(output)})"
            ) from e
        if not isinstance(value, Tensor):
            raise ReadoutError(f"the readout returned {type(value).__name__}; it must return a tensor [N] or [N, K]")
        if value.ndim not in (1, 2) or value.shape[0] != n:
            raise ReadoutError(
                f"the readout returned shape {tuple(value.shape)} for a batch of {n} examples; "
                f"it must return [N] (one scalar per example) or [N, K]"
            )
        if not value.is_floating_point():
            raise ReadoutError(
                f"the readout returned dtype {value.dtype}; it must be floating point and differentiable"
            )
        scalar = value.ndim == 1
        if self.scalar is not None and self.scalar != scalar:
            raise ReadoutError("the readout returned [N] for one batch and [N, K] for another; keep one shape")
        self.scalar = scalar
        return value[:, None] if scalar else value
