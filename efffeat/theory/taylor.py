"""Taylorized training (Bai et al. 2020): train the order-k Taylor polynomial of a network in its parameters
around θ0 (`taylorized_train`, `TaylorizedModel`), by Taylor-mode propagation through the layers registered in
`TAYLOR_MODE_RULES` or by nested forward-mode jvp's for any other model."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from itertools import cycle
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp
from tqdm.auto import tqdm

from .._check import integer, positive_int
from .._data import as_batches, batch_to
from .._swap import ParameterSwap
from ..dual import init_parameters
from ..errors import ConfigError, DataError, NonFiniteError
from .ntk_mlp import FanInScale


def _directional_derivatives(
    f: Callable[[dict[str, Tensor]], Tensor], at: dict[str, Tensor], direction: dict[str, Tensor], order: int
) -> tuple[Tensor, ...]:
    """``(f(θ), D f(θ)[v], …, D^order f(θ)[v, …, v])`` by `order` nested jvp's (cost ~2^order forward passes)."""

    def derivatives(k: int) -> Callable[[dict[str, Tensor]], tuple[Tensor, ...]]:
        if k == 0:
            return lambda p: (f(p),)
        inner = derivatives(k - 1)

        def g(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            primal, tangent = jvp(inner, (p,), (direction,))
            return (*primal, tangent[-1])

        return g

    return derivatives(order)(at)


# ---- Taylor mode: one propagation rule per layer family -------------------------------------------------
# ``rule(layer, xs, theta0, delta) -> ys`` maps the Taylor coefficients in t of a layer's input, ``xs = [x_0, …,
# x_k]`` (each ``[N, ...]``), to those of its output along θ0 + tΔ; `theta0` and `delta` hold the layer's own
# parameters by their names in the layer (``"weight"``, ``"bias"``; empty for a parameter-free layer).
_Params = dict[str, Tensor]
TaylorRule = Callable[[nn.Module, list[Tensor], _Params, _Params], list[Tensor]]


def _linear(layer: nn.Linear, xs: list[Tensor], theta0: _Params, delta: _Params) -> list[Tensor]:
    """``x W(t)ᵀ + b(t)`` with ``W(t) = W0 + tΔW``, ``b(t) = b0 + tΔb``: the weights are exactly linear in t."""
    w0, dw = theta0["weight"], delta["weight"]
    ys = [F.linear(xs[0], w0)] + [F.linear(xs[j], w0) + F.linear(xs[j - 1], dw) for j in range(1, len(xs))]
    if layer.bias is not None:
        ys[0] = ys[0] + theta0["bias"]
        if len(ys) > 1:
            ys[1] = ys[1] + delta["bias"]
    return ys


def _fixed_linear(layer: nn.Module, xs: list[Tensor], theta0: _Params, delta: _Params) -> list[Tensor]:
    """A parameter-free layer linear in its input maps each coefficient on its own."""
    return [layer(xj) for xj in xs]


def _relu(layer: nn.ReLU, xs: list[Tensor], theta0: _Params, delta: _Params) -> list[Tensor]:
    """Linear on each side of 0: every coefficient times the mask of ``x_0 > 0``."""
    mask = (xs[0] > 0).to(xs[0].dtype)
    return [xj * mask for xj in xs]


def _tanh(layer: nn.Tanh, xs: list[Tensor], theta0: _Params, delta: _Params) -> list[Tensor]:
    """``y = tanh x`` by the recurrence of ``y' = (1 − y²) x'``."""
    ys = [torch.tanh(xs[0])]
    ss = [1 - ys[0] ** 2]  # Taylor coefficients of tanh'(x(t)) = 1 − y(t)²
    for j in range(1, len(xs)):
        ys.append(sum(i * xs[i] * ss[j - i] for i in range(1, j + 1)) / j)
        ss.append(-sum(ys[i] * ys[j - i] for i in range(j + 1)))
    return ys


# The layers Taylor mode propagates through, by type; a subclass takes the rule of its nearest registered base
# class (register the subclass itself if its forward differs). Add an entry to support another layer.
TAYLOR_MODE_RULES: dict[type[nn.Module], TaylorRule] = {
    nn.Linear: _linear,
    FanInScale: _fixed_linear,
    nn.Tanh: _tanh,
    nn.ReLU: _relu,
    nn.Identity: _fixed_linear,
}


def _taylor_rule(layer: nn.Module) -> TaylorRule | None:
    """The `TAYLOR_MODE_RULES` entry of `layer`'s type or of its nearest base class, None without one."""
    return next((TAYLOR_MODE_RULES[c] for c in type(layer).__mro__ if c in TAYLOR_MODE_RULES), None)


def _mode(model: nn.Module) -> str:
    """``"taylor"`` for an ``nn.Sequential`` whose every layer has a Taylor-mode rule, ``"jvp"`` otherwise."""
    supported = isinstance(model, nn.Sequential) and all(_taylor_rule(m) is not None for m in model)
    return "taylor" if supported else "jvp"


def _taylor_coefficients(
    model: nn.Sequential, x: Tensor, theta0: dict[str, Tensor], delta: dict[str, Tensor], order: int
) -> list[Tensor]:
    """``[g_0, …, g_order]`` with ``f(x; θ0 + tΔ) = Σ_j g_j t^j + O(t^{order+1})``, by Taylor-mode propagation.

    The same coefficients as `_directional_derivatives` (``g_j = D^j f[Δ^j] / j!``) at the cost of about
    ``order + 1`` forward passes instead of ``2^order``: every layer maps the Taylor coefficients of its input
    to those of its output by its rule in `TAYLOR_MODE_RULES`. θ0 and Δ are keyed by ``model.named_parameters()``.
    """
    xs = [x] + [torch.zeros_like(x)] * order
    for name, layer in model.named_children():
        own = [n for n, _ in layer.named_parameters()]
        theta0_own, delta_own = ({n: d[f"{name}.{n}"] for n in own} for d in (theta0, delta))
        xs = _taylor_rule(layer)(layer, xs, theta0_own, delta_own)
    return xs


def _buffer_name(param: str) -> str:
    return "theta_init__" + param.replace(".", "__")


class TaylorizedModel(nn.Module):
    """The order-k Taylor polynomial of a network in its parameters around θ0.

    ``forward(x) = Σ_{j≤k} D^j f(x; θ0)[θ − θ0, …] / j!`` where θ are this module's trainable parameters (those of
    ``self.network``, a copy of the model, starting at θ0) and θ0 is kept in buffers. ``order=1`` is the
    linearised (NTK) model, 2 the quadratic model (dNTK), 3 adds the ddNTK terms. Train it like any module;
    `taylorized_train` does so with the same loss, optimizer and data as the real network.

    Both ways of evaluating the polynomial are exact; which one a model takes is fixed when it is built:

    - ``mode == "taylor"``: an ``nn.Sequential`` whose every layer is one of the Taylor-mode layers —
      ``nn.Linear``, `FanInScale`, ``nn.Tanh``, ``nn.ReLU``, ``nn.Identity`` or a subclass (the entries of
      `TAYLOR_MODE_RULES`, where more can be registered) — propagates Taylor coefficients layer by layer, about
      ``order + 1`` forward passes;
    - ``mode == "jvp"``: any other model (another layer type, a custom module, nested containers) takes
      ``order`` nested forward-mode jvp's, about ``2^order`` forward passes.

    Attributes: ``order``; ``mode``, ``"taylor"`` or ``"jvp"`` as above; after `taylorized_train`,
    ``losses_ [steps]``, the training loss at each step.
    """

    def __init__(
        self, model: nn.Module, init: Mapping[str, Tensor], order: int, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        order = positive_int("order", order)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        network = copy.deepcopy(model)
        if dtype is not None:
            network = network.to(dtype)
        theta0 = init_parameters(network, init)
        with torch.no_grad():
            for n, p in network.named_parameters():
                p.copy_(theta0[n])
        self.network = network
        self._swap = ParameterSwap(network)
        self.order = order
        self.mode = _mode(network)
        self._names = list(theta0)
        for n in self._names:
            self.register_buffer(_buffer_name(n), theta0[n].clone())
        self.losses_: Tensor | None = None

    @property
    def theta_init(self) -> dict[str, Tensor]:
        """θ0 by named_parameters name of `network`."""
        return {n: self.get_buffer(_buffer_name(n)) for n in self._names}

    @property
    def dtype(self) -> torch.dtype:
        return self.get_buffer(_buffer_name(self._names[0])).dtype

    @property
    def device(self) -> torch.device:
        return self.get_buffer(_buffer_name(self._names[0])).device

    def forward(self, x: Any) -> Tensor:
        """The Taylor polynomial's output for inputs `x` (same shape as the network's output)."""
        theta0 = self.theta_init
        delta = {n: p - theta0[n] for n, p in self.network.named_parameters()}
        if self.mode == "taylor":
            return sum(_taylor_coefficients(self.network, x, theta0, delta, self.order))
        terms = _directional_derivatives(lambda p: self._swap.call(p, x), theta0, delta, self.order)
        return sum(t / math.factorial(j) for j, t in enumerate(terms))

    def predict(self, x: Tensor) -> Tensor:
        """``[N, ...]``: the trained Taylor model's output on any inputs (no gradient)."""
        with torch.no_grad():
            return self(batch_to(x, self.device, self.dtype)).detach()

    def extra_repr(self) -> str:
        return f"order={self.order}, mode={self.mode}"


def _training_batches(data: Any) -> Iterator[Any]:
    """Full batch for a tensor tuple ``(inputs, targets)``; otherwise the iterable's batches, cycled."""
    if isinstance(data, tuple):
        as_batches(data, batch_size=1)  # validates
        return cycle([data])
    return cycle(as_batches(data, batch_size=1))


def taylorized_train(
    model: nn.Module,
    init: Mapping[str, Tensor],
    order: int,
    data: Any,
    loss: Callable[[Tensor, Tensor], Tensor],
    optimizer: Callable[[Any], torch.optim.Optimizer],
    steps: int,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> TaylorizedModel:
    """Train the order-k Taylor expansion of `model` around θ0 (Bai et al. 2020, "Taylorized training").

    Args:
        model: the architecture (its current parameters are not used; it is copied, never modified).
        init: θ0, the model's ``state_dict()`` at initialisation.
        order: 1 (linearised/NTK), 2 (quadratic/dNTK) or 3 (adds the ddNTK terms). A step costs about
            ``order + 1`` forward passes for an ``nn.Sequential`` of Taylor-mode layers (``nn.Linear``,
            `FanInScale`, ``nn.Tanh``, ``nn.ReLU``, ``nn.Identity``), and ``2^order`` for any other model, which
            takes nested forward-mode jvp's (just as exact); ``.mode`` of the result tells which (`TaylorizedModel`).
        data: ``(inputs, targets)`` for full-batch training (every step sees the whole tuple), or an iterable of
            ``(inputs, targets)`` batches, cycled one step per batch.
        loss: ``loss(output, targets) -> scalar``, e.g. ``lambda z, y: 0.5 * (z - y).square().sum()``.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``, e.g. ``lambda p: torch.optim.SGD(p, lr=0.1)``.
        steps: optimizer steps.
        dtype: train in this dtype (e.g. ``torch.float64``); inputs and targets are cast to it.

    Returns:
        the trained `TaylorizedModel`; ``.predict(x)`` evaluates it on any inputs, ``.losses_`` the loss curve.
    """
    if not callable(loss) or not callable(optimizer):
        raise ConfigError(
            "loss must be callable(output, targets) and optimizer a factory callable(params), e.g. "
            "optimizer=lambda p: torch.optim.SGD(p, lr=0.1)"
        )
    steps = integer("steps", steps, minimum=0)
    taylor = TaylorizedModel(model, init, order, dtype)
    opt = optimizer(taylor.network.parameters())
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(opt).__name__}")
    batches = _training_batches(data)
    losses = []
    for step in tqdm(range(steps), desc=f"Taylorized training (order {order})", disable=None if progress else True):
        batch = batch_to(next(batches), taylor.device, taylor.dtype)
        if not isinstance(batch, tuple | list) or len(batch) < 2:
            raise DataError("each training batch must be (inputs, targets)")
        value = loss(taylor(batch[0]), batch[1])
        if not bool(torch.isfinite(value.detach())):
            raise NonFiniteError(
                f"the Taylorized model's loss is {float(value.detach())} at step {step}; lower the learning rate"
            )
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    taylor.losses_ = torch.tensor(losses, dtype=torch.float64)
    return taylor
