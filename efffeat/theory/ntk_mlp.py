"""MLPs in NTK parameterisation (`ntk_mlp`, built from `FanInScale` + ``nn.Linear``) and the infinite-width NTK of
the one-hidden-layer ReLU one (`relu_ntk`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._check import one_of, positive_int
from ..errors import DataError

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class FanInScale(nn.Module):
    """``x ↦ x / √fan_in``: the NTK parameterisation's layer scaling, placed in front of an ``nn.Linear``."""

    def __init__(self, fan_in: int) -> None:
        super().__init__()
        self.fan_in = fan_in

    def forward(self, x: Tensor) -> Tensor:
        return x * self.fan_in**-0.5

    def extra_repr(self) -> str:
        return f"fan_in={self.fan_in}"


def ntk_mlp(
    d_in: int,
    width: int,
    depth: int = 1,
    d_out: int = 1,
    activation: str = "tanh",
    bias: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Sequential:
    """An MLP in NTK parameterisation: ``z^{l+1} = W^{l+1} σ(z^l) / √n_l + b^{l+1}``, every W and b ~ N(0, 1).

    Built from `FanInScale` + ``nn.Linear`` so efffeat's factored rules cover every parameter. `depth` hidden
    layers of `width` units; activation ``"tanh" | "relu" | "gelu"``.
    """
    activation = one_of("activation", activation, tuple(_ACTIVATIONS))
    sizes = {"d_in": d_in, "width": width, "depth": depth, "d_out": d_out}
    d_in, width, depth, d_out = (positive_int(name, v) for name, v in sizes.items())
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = d_in
    for _ in range(depth):
        layers += [FanInScale(fan_in), nn.Linear(fan_in, width, bias=bias), _ACTIVATIONS[activation]()]
        fan_in = width
    layers += [FanInScale(fan_in), nn.Linear(fan_in, d_out, bias=bias)]
    model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
    return model


def relu_ntk(x: Tensor, x2: Tensor | None = None) -> Tensor:
    """``[N, M]``: the infinite-width NTK of ``ntk_mlp(d, n, depth=1, activation="relu", bias=False)``.

    ``H(x, x') = ‖x‖‖x'‖ (sin θ + (π − θ) cos θ) / (2π d) + (x·x' / d)(π − θ) / (2π)``, θ the angle between x and
    x' (output-layer plus hidden-layer terms; Cho & Saul's arc-cosine kernels). x: ``[N, d]``, x2: ``[M, d]``.
    """
    x2 = x if x2 is None else x2
    if x.ndim != 2 or x2.ndim != 2 or x.shape[1] != x2.shape[1]:
        raise DataError(f"x and x2 must be [N, d] and [M, d] with the same d, got {tuple(x.shape)}, {tuple(x2.shape)}")
    d = x.shape[1]
    dot = x @ x2.T
    norms = x.norm(dim=1)[:, None] * x2.norm(dim=1)[None, :]
    cos = torch.where(norms > 0, dot / torch.where(norms > 0, norms, 1), 0).clamp(-1, 1)
    theta = torch.arccos(cos)
    output_layer = norms * (torch.sin(theta) + (math.pi - theta) * cos) / (2 * math.pi * d)
    hidden_layer = dot / d * (math.pi - theta) / (2 * math.pi)
    return output_layer + hidden_layer
