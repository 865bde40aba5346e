"""How examples are shown: images as images, token sequences as text, low-dimensional inputs as tables."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from ..errors import ConfigError, DataError

INPUT_KINDS = ("image", "tokens", "table")


@dataclass(frozen=True)
class Examples:
    """Indexable inputs (and labels, when the data has them) for drawing examples.

    inputs: ``[N, ...]``; labels: ``[N]`` or None; kind: one of `INPUT_KINDS`; image_shape: ``(H, W)`` for images.
    """

    inputs: Tensor
    labels: Tensor | None
    kind: str
    image_shape: tuple[int, int] | None
    decode: Callable[[Sequence[int]], str] | None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def image(self, i: int) -> np.ndarray:
        """``[H, W]`` pixels of example i."""
        return self.inputs[i].detach().double().reshape(self.image_shape).cpu().numpy()

    def text(self, i: int) -> str:
        """Example i as text: decoded tokens, or the input values rounded."""
        x = self.inputs[i].detach().cpu()
        if not (x.is_floating_point() or x.is_complex()):
            tokens = [int(t) for t in x.reshape(-1)]
            return self.decode(tokens) if self.decode else " ".join(str(t) for t in tokens)
        flat = x.double().reshape(-1).numpy()
        shown = ", ".join(f"{v:.3g}" for v in flat[:12])
        return f"[{shown}{', …' if flat.size > 12 else ''}]"

    def label(self, i: int) -> str | None:
        if self.labels is None:
            return None
        y = self.labels[i]
        return str(int(y)) if y.numel() == 1 and not y.is_floating_point() else None


def as_examples(
    data: Any,
    kind: str | None = None,
    image_shape: tuple[int, int] | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> Examples:
    """Wrap a tensor of inputs, an ``(inputs, targets)`` tuple or a dict batch for drawing.

    A dict (``model(**batch)``) is drawn from its ``"input_ids"`` (else ``"inputs"``, ``"x"`` or its first
    tensor), labelled by its ``"labels"`` (or ``"label"``, ``"targets"``, ``"y"``) when it has them.
    kind: ``"image" | "tokens" | "table"``; guessed when None: integer inputs are tokens, inputs of
    ``[N, H, W]`` / ``[N, 1, H, W]`` or ``[N, D]`` with D a square ≥ 16 are images, the rest tables.
    """
    if isinstance(data, dict) and any(isinstance(v, Tensor) for v in data.values()):
        data = _from_dict(data)
    if isinstance(data, Tensor):
        inputs, labels = data, None
    elif isinstance(data, tuple | list) and data and isinstance(data[0], Tensor):
        inputs = data[0]
        labels = data[1] if len(data) > 1 and isinstance(data[1], Tensor) else None
    else:
        raise DataError(
            f"examples can be drawn from a tensor of inputs, an (inputs, targets) tuple or a dict of tensors, got "
            f"{type(data).__name__}; "
            "pass data as a tensor (concatenate the batches of a DataLoader first)"
        )
    if labels is not None and (labels.shape[:1] != inputs.shape[:1] or labels.ndim > 1 or labels.is_floating_point()):
        labels = None  # regression targets or per-token targets: nothing to print as a label
    kind = kind or _guess_kind(inputs)
    if kind not in INPUT_KINDS:
        raise ConfigError(f"unknown input kind {kind!r}; choose one of {', '.join(repr(k) for k in INPUT_KINDS)}")
    if kind == "image":
        image_shape = image_shape or _image_shape(inputs)
        if image_shape is None or math.prod(image_shape) != math.prod(inputs.shape[1:]):
            raise ConfigError(
                f"inputs of shape {tuple(inputs.shape[1:])} cannot be drawn as images of shape {image_shape}; "
                "pass image_shape=(height, width) with height·width equal to the input size"
            )
    return Examples(inputs, labels, kind, image_shape if kind == "image" else None, decode)


def _from_dict(batch: dict[str, Any]) -> Tensor | tuple[Tensor, Tensor]:
    """``inputs`` or ``(inputs, labels)`` of a dict batch (see `as_examples`)."""
    tensors = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
    key = next((k for k in ("input_ids", "inputs", "x") if k in tensors), next(iter(tensors)))
    label = next((k for k in ("labels", "label", "targets", "y") if k in tensors and k != key), None)
    return tensors[key] if label is None else (tensors[key], tensors[label])


def _guess_kind(inputs: Tensor) -> str:
    if not (inputs.is_floating_point() or inputs.is_complex()):
        return "tokens"
    return "image" if _image_shape(inputs) is not None else "table"


def _image_shape(inputs: Tensor) -> tuple[int, int] | None:
    shape = tuple(inputs.shape[1:])
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) == 2 and min(shape) >= 4:
        return shape  # type: ignore[return-value]
    if len(shape) == 1 and shape[0] >= 16 and math.isqrt(shape[0]) ** 2 == shape[0]:
        side = math.isqrt(shape[0])
        return side, side
    return None


def to_numpy(t: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(t, Tensor):
        return t.detach().double().cpu().numpy()
    return np.asarray(t, dtype=float)
