"""Neurons: the hidden-unit activations of one layer, exposed like effective features.

`NeuronActivations` offers the parts of the `efffeat.EffectiveFeatures` interface that make sense for
activations (``ids``, ``columns``, ``column``, ``matvec``, ``rmatvec``, ``sq_sums``, ``kernel``, ``dense``,
``select_rows``), so code that scores or searches effective features by their values works on neurons. Neurons
have no regression weights, so there are no contributions. `efffeat.compare` uses them as the ``"neurons"``
method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import io
from .._data import as_batches, forward_batch
from .._savable import register
from .._swap import kept_modes
from ..errors import ConfigError, DataError, FeatureIdError


@register
@dataclass
class NeuronActivations:
    """Activations of a layer's units over a dataset.

    Attributes:
        values: ``[N, n_units]`` activations.
        layer: the module name they were read at; at: ``"output"`` or ``"input"`` of that module.
    """

    values: Tensor
    layer: str
    at: str = "output"

    scalar = True  # one value per example and unit, like a scalar readout's features

    @property
    def n_examples(self) -> int:
        return self.values.shape[0]

    @property
    def n_features(self) -> int:
        return self.values.shape[1]

    @property
    def n_outputs(self) -> int:
        return 1

    @property
    def ids(self) -> list[str]:
        """``"<layer>[j]"`` for every unit j."""
        return [f"{self.layer}[{j}]" for j in range(self.n_features)]

    def __repr__(self) -> str:
        return f"NeuronActivations(layer={self.layer!r}, at={self.at!r}, N={self.n_examples}, units={self.n_features})"

    def _position(self, unit: str | int) -> int:
        if isinstance(unit, str):
            prefix = f"{self.layer}["
            if not (unit.startswith(prefix) and unit.endswith("]") and unit[len(prefix) : -1].isdigit()):
                raise FeatureIdError(f"unknown neuron id {unit!r}; neuron ids look like {self.ids[0]!r}")
            unit = int(unit[len(prefix) : -1])
        if not 0 <= int(unit) < self.n_features:
            raise FeatureIdError(f"neuron {unit} is out of range for a layer of {self.n_features} units")
        return int(unit)

    def columns(self, ids: Sequence[str] | Sequence[int]) -> Tensor:
        """``[N, m]``: the activations of the units given (ids or positions)."""
        return self.values[:, [self._position(i) for i in ids]]

    def column(self, unit: str | int) -> Tensor:
        """``[N]``: one unit's activations."""
        return self.values[:, self._position(unit)]

    def dense(self) -> Tensor:
        """``[N, n_units]``."""
        return self.values

    def matvec(self, v: Tensor) -> Tensor:
        """``[N]``: ``Σ_j a_j(x) v_j``."""
        return self.values @ torch.as_tensor(v, dtype=self.values.dtype)

    def rmatvec(self, u: Tensor) -> Tensor:
        """``[n_units]``: ``Σ_x u(x) a_j(x)``."""
        return self.values.T @ torch.as_tensor(u, dtype=self.values.dtype)

    def sq_sums(self, weights: Tensor | None = None) -> Tensor:
        """``[n_units]``: ``Σ_x w(x) a_j(x)²``."""
        sq = self.values.square()
        return sq.sum(dim=0) if weights is None else torch.as_tensor(weights, dtype=sq.dtype) @ sq

    def kernel(self, other: NeuronActivations | None = None) -> Tensor:
        """``[N, M]``: the activation Gram matrix."""
        return self.values @ (self if other is None else other).values.T

    def select_rows(self, index: Tensor | slice) -> NeuronActivations:
        return NeuronActivations(self.values[index], self.layer, self.at)

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        return {"values": self.values.detach().clone()}, {"layer": self.layer, "at": self.at}

    @classmethod
    def validate_state(cls, tensors: dict[str, Tensor], meta: dict) -> None:
        """Refuse (`SaveFileError`) anything but ``values [N, n_units]`` read at a module's output or input."""
        io.record(meta, "meta", {"layer": io.text(empty=True), "at": io.text(("output", "input"))})
        io.tensor_names(tensors, {"values"})
        io.tensor(tensors, "values", "float", ndim=2)

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict) -> NeuronActivations:
        return cls(tensors["values"], meta["layer"], meta["at"])


def neurons(
    model: nn.Module, data: Any, layer: str, at: str = "output", position: int = -1, batch_size: int = 1024
) -> NeuronActivations:
    """Read the activations of module `layer` over `data`.

    model: any module; layer: a name from ``model.named_modules()`` (e.g. ``"1"`` for the ReLU of an
    ``nn.Sequential`` MLP) or, for TransformerLens models, a hook name as ``run_with_cache`` gives it
    (``"blocks.1.attn.hook_pattern"``, ``"blocks.0.mlp.hook_post"``) or a component path (``"blocks.0.mlp.out"``),
    `find_module`; at: ``"output"`` (the module's output) or ``"input"`` (its first input, e.g. the
    post-activation hidden units entering an MLP's output projection); position: for sequence activations
    ``[N, T, d]``, the position read (default the last). data: a tensor, ``(inputs, targets)`` or an iterable
    of batches. Returns `NeuronActivations` with ``values [N, d]`` (float32 or the model's dtype).
    """
    if at not in ("output", "input"):
        raise ConfigError(f"at must be 'output' or 'input', got {at!r}")
    module = find_module(model, layer)
    chunks: list[Tensor] = []

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        t = output if at == "output" else args[0]
        if not isinstance(t, Tensor):
            raise DataError(f"module {layer!r} {at} is {type(t).__name__}, not a tensor; pick another layer")
        t = t.detach()
        if t.ndim == 3:
            t = t[:, position]
        chunks.append(t.reshape(t.shape[0], -1))

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad(), kept_modes(model, training=False):
            for batch in as_batches(data, batch_size):
                forward_batch(model, batch)
    finally:
        handle.remove()
    if not chunks:
        raise DataError("data is empty; pass at least one example")
    return NeuronActivations(torch.cat(chunks), layer, at)


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule `name` names: a ``model.named_modules()`` name, a TransformerLens hook name
    (``model.hook_dict``: ``"blocks.1.attn.hook_pattern"``, what ``run_with_cache`` calls it) or an attribute
    path (``"blocks.0.mlp.out"``, the bridge's component names)."""
    if not isinstance(name, str):
        raise ConfigError(f"a layer is named by a string such as 'blocks.0.mlp.hook_post', got {name!r}")
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    hooks = getattr(model, "hook_dict", None)
    if isinstance(hooks, Mapping) and isinstance(hooks.get(name), nn.Module):
        return hooks[name]
    found: Any = model
    for part in name.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            found = None
            break
    if isinstance(found, nn.Module) and found is not model:
        return found
    names = [n for n in (list(hooks) if isinstance(hooks, Mapping) else []) + list(modules) if n][:12]
    raise ConfigError(f"the model has no module {name!r}; modules and hooks include: {', '.join(names)}")
