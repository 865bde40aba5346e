"""Weight pictures with a shape that means something.

The part of a parameter tensor a feature lives in (a weight row, a column, the whole tensor) is drawn by what
it is: convolution filters as kernel-shaped images (out × in tiles of kh × kw), a Linear row in the shape of
the layer's input when it is known (an 8×8 image, channels × height × width, sequence × d_model), an embedding
column over a cyclic vocabulary as its Fourier spectrum, vectors (biases, norm gains, rows of a
d-dimensional layer) as bar charts. `layer_input_shapes` records those input shapes with one forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

# Tiles per row of a grid of convolution filters; vectors longer than this are drawn as a heatmap strip.
_TILES_PER_ROW = 8
_MAX_BARS = 512


@dataclass
class Picture:
    """One panel: ``kind`` ``"heatmap"`` (``z [H, W]``, NaN between tiles) or ``"bars"`` (``z [d]`` over `x`).

    mark: where the single feature sits — ``(row, col)`` in a heatmap, a bar position — or None.
    """

    title: str
    z: np.ndarray
    kind: str
    mark: tuple[int, int] | int | None = None
    x: np.ndarray | None = None
    x_title: str = ""


def layer_input_shapes(model: nn.Module, example: Any) -> dict[str, tuple[int, ...]]:
    """``{module name: per-example shape}`` of what each layer with a flat input reads, before it was flattened.

    One forward pass of `example` (a batch of one) with hooks on every module: a module whose input is a flat
    vector of d entries gets the per-example shape of the latest earlier module output (or the model input)
    with d entries and at least two axes. Modules whose input is not flat are not listed.
    """
    seen: list[tuple[int, ...]] = [tuple(example.shape[1:])] if isinstance(example, Tensor) else []
    out: dict[str, tuple[int, ...]] = {}
    names = {id(m): n for n, m in model.named_modules()}

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.ndim == 2:
            d = x.shape[1]
            shape = next((s for s in reversed(seen) if len(s) >= 2 and math.prod(s) == d), None)
            if shape is not None:
                out.setdefault(names[id(module)], shape)
        if isinstance(output, Tensor) and output.ndim >= 2:
            seen.append(tuple(output.shape[1:]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(example)
    except Exception:  # a model that cannot run one example alone draws its rows as plain vectors
        return {}
    finally:
        for h in handles:
            h.remove()
    return out


def weight_pictures(
    tensors: list[tuple[str, Tensor]],
    index: tuple,
    single: bool,
    input_shape: tuple[int, ...] | None,
    cyclic: int | None,
    frequency_norms: Callable[[Tensor], Tensor],
) -> tuple[list[Picture], str]:
    """The pictures of `tensors` (``[(title, parameter tensor)]``, e.g. θ* and Δθ) at a feature's `index`, and
    what they show.

    index: the id's index (ints and ``slice(None)``); single: the id is one entry (it is marked);
    input_shape: the per-example shape of the layer's input when known (`layer_input_shapes`); cyclic: the
    first `cyclic` rows of an embedding are the residues of a cyclic group (its columns are drawn as Fourier
    spectra).
    """
    pictures = []
    name = ""
    for title, tensor in tensors:
        t = tensor.detach().double().cpu()
        part, flat, where = _part(t, index, single)
        if cyclic is not None and t.ndim == 2 and not where.startswith("row") and t.shape[0] >= cyclic:
            norms = frequency_norms(part[:cyclic].reshape(cyclic, -1)).numpy()
            x = np.arange(1, len(norms) + 1)
            pictures.append(Picture(f"{title}: Fourier norms", norms, "bars", x=x, x_title="frequency"))
            name = f"{where}, over the {cyclic} residues"
            continue
        z, kind, mark = _layout(part, flat, input_shape)
        pictures.append(Picture(title, z, kind, mark, np.arange(len(z)) if kind == "bars" else None))
        name = where
    return pictures, name


def _part(t: Tensor, index: tuple, single: bool) -> tuple[Tensor, int | None, str]:
    """The slice of `t` to draw, the flat position of a single entry in it, and a description."""
    if t.ndim >= 2 and index and isinstance(index[0], int) and (single or all(isinstance(i, slice) for i in index[1:])):
        part = t[index[0]]
        flat = int(np.ravel_multi_index(index[1:], tuple(part.shape))) if single else None
        return part, flat, f"row {index[0]}"
    if t.ndim >= 2 and len(index) >= 2 and isinstance(index[1], int) and not single:
        return t[:, index[1]], None, f"column {index[1]}"
    flat = int(np.ravel_multi_index(index, tuple(t.shape))) if single and index else None
    return t, flat, "the whole tensor"


def _layout(part: Tensor, flat: int | None, input_shape: tuple[int, ...] | None) -> tuple[np.ndarray, str, Any]:
    """``(z, kind, mark)`` of one part: tiles, a heatmap or bars."""
    a = part.numpy()
    positions = np.arange(a.size, dtype=float).reshape(a.shape)
    if a.ndim == 1 and input_shape is not None and math.prod(input_shape) == a.size and len(input_shape) >= 2:
        a, positions = a.reshape(input_shape), positions.reshape(input_shape)
    if a.ndim == 1:
        if a.size > _MAX_BARS:
            side = math.ceil(a.size / math.ceil(math.sqrt(a.size)))
            a, positions = _pad_rows(a, side), _pad_rows(positions, side)
        else:
            return a, "bars", flat
    if a.ndim >= 3:
        a, positions = _tiles(a), _tiles(positions)
    mark = None
    if flat is not None:
        where = np.argwhere(positions == flat)
        mark = (int(where[0][0]), int(where[0][1])) if len(where) else None
    return a, "heatmap", mark


def _pad_rows(v: np.ndarray, width: int) -> np.ndarray:
    """A long vector as rows of `width`, NaN-padded: ``[⌈d / width⌉, width]``."""
    rows = math.ceil(v.size / width)
    out = np.full(rows * width, np.nan)
    out[: v.size] = v
    return out.reshape(rows, width)


def _tiles(a: np.ndarray) -> np.ndarray:
    """``[..., h, w]`` images as one ``[H, W]`` grid, one NaN pixel between tiles.

    ``[g, h, w]`` (a filter's input channels) is wrapped at `_TILES_PER_ROW`; ``[r, c, h, w]`` (a whole
    convolution weight: out × in) keeps r rows of c tiles.
    """
    h, w = a.shape[-2:]
    if a.ndim == 3:
        g = a.shape[0]
        cols = min(g, _TILES_PER_ROW)
        rows = math.ceil(g / cols)
        grid = np.full((rows * cols, h, w), np.nan)
        grid[:g] = a
        a = grid.reshape(rows, cols, h, w)
    else:
        a = a.reshape(-1, *a.shape[-3:])
    rows, cols = a.shape[:2]
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
    for r in range(rows):
        for c in range(cols):
            out[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = a[r, c]
    return out
