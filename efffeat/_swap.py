"""Run a module with other parameter tensors, restoring its own afterwards.

``torch.func.functional_call`` swaps through ``setattr`` and, on TransformerLens bridges (whose blocks are
reachable under two paths), leaves plain tensors behind in place of the model's parameters. Writing the
module's ``_parameters`` slots directly, at every place a parameter is registered, avoids that and handles tied
parameters (one tensor registered in several modules) by construction.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn


class ParameterSwap:
    """Where each ``named_parameters()`` tensor of a model is registered: ``{name: [(module, attr), ...]}``."""

    def __init__(self, model: nn.Module):
        self.model = model
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.slots: dict[str, list[tuple[nn.Module, str]]] = {n: [] for n in name_of.values()}
        for module in model.modules():
            for attr, p in module._parameters.items():
                if p is not None and id(p) in name_of:
                    self.slots[name_of[id(p)]].append((module, attr))

    @contextmanager
    def use(self, params: Mapping[str, Tensor]) -> Iterator[None]:
        """Within the block the model computes with `params` (named_parameters names; a subset is fine)."""
        saved: list[tuple[nn.Module, str, Any]] = []
        try:
            for name, tensor in params.items():
                for module, attr in self.slots[name]:
                    saved.append((module, attr, module._parameters[attr]))
                    module._parameters[attr] = tensor
            yield
        finally:
            for module, attr, original in reversed(saved):
                module._parameters[attr] = original

    def call(self, params: Mapping[str, Tensor], *args: Any) -> Any:
        """``model(*args)`` computed with `params`."""
        with self.use(params):
            return self.model(*args)
