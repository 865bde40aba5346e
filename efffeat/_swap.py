"""Run a module with other parameter (and buffer) tensors, restoring its own afterwards; keep its modes.

``torch.func.functional_call`` swaps through ``setattr`` and, on TransformerLens bridges (whose blocks are
reachable under two paths), leaves plain tensors behind in place of the model's parameters. Writing the
module's ``_parameters`` / ``_buffers`` slots directly, at every place a tensor is registered, avoids that and
handles tied tensors (one tensor registered in several modules) by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

Forward = Callable[[nn.Module, Any], Any]  # forward(model, batch) -> output


def _slots(model: nn.Module, kind: str) -> dict[str, list[tuple[nn.Module, str]]]:
    """``{name: [(module, attr), ...]}`` of every ``_parameters`` or ``_buffers`` registration of a tensor."""
    named = model.named_parameters() if kind == "_parameters" else model.named_buffers()
    name_of = {id(t): n for n, t in named}
    slots: dict[str, list[tuple[nn.Module, str]]] = {n: [] for n in name_of.values()}
    for module in model.modules():
        for attr, t in getattr(module, kind).items():
            if t is not None and id(t) in name_of:
                slots[name_of[id(t)]].append((module, attr))
    return slots


class ParameterSwap:
    """Where each ``named_parameters()`` and ``named_buffers()`` tensor of a model is registered.

    Attributes:
        model: the module.
        forward: how the model is called on a batch (``forward(model, batch)``), or None for the default
            convention of `efffeat._data.forward_batch`.
        slots: ``{parameter name: [(module, attr), ...]}``; buffer_slots: the same for buffers.
    """

    def __init__(self, model: nn.Module, forward: Forward | None = None):
        self.model = model
        self.forward = forward
        self.slots = _slots(model, "_parameters")
        self.buffer_slots = _slots(model, "_buffers")

    @contextmanager
    def use(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None = None) -> Iterator[None]:
        """Within the block the model computes with `params` (named_parameters names; a subset is fine) and
        `buffers` (named_buffers names; a subset or None)."""
        saved: list[tuple[dict, str, Any]] = []
        try:
            swaps = ((params, self.slots, "_parameters"), (buffers or {}, self.buffer_slots, "_buffers"))
            for table, slots, kind in swaps:
                for name, tensor in table.items():
                    for module, attr in slots[name]:
                        registry = getattr(module, kind)
                        saved.append((registry, attr, registry[attr]))
                        registry[attr] = tensor
            yield
        finally:
            for registry, attr, original in reversed(saved):
                registry[attr] = original

    def call(self, params: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` computed with `params`."""
        with self.use(params):
            return self.model(*args, **kwargs)


@contextmanager
def kept_modes(model: nn.Module, training: bool | None = None) -> Iterator[None]:
    """Restore every module's own ``training`` flag when the block ends (on success and on error).

    training: set every module to this mode inside the block (None: leave the modes as they are). Unlike
    ``model.train(was_training)`` afterwards, a sub-module the user froze in eval mode inside a training model
    is given back in eval mode.
    """
    saved = [(m, m.training) for m in model.modules()]
    try:
        if training is not None:
            model.train(training)
        yield
    finally:
        for module, flag in saved:
            module.training = flag
