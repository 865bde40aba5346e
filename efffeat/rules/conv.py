"""``nn.Conv1d`` and ``nn.Conv2d``: per example ``∂z/∂W = Σ_p δ_p ⊗ patch_p`` over the output positions p.

The weight ``[C_out, C_in/G, (kh,) kw]`` is read as a matrix ``[C_out, (C_in/G)·kh·kw]`` (row-major, so feature
ids are those of the weight tensor); every output position is one rank term, as a sequence position is for
``nn.Linear``: u the output cotangent δ_p ``[C_out]``, v the unfolded input patch that produced it. Any stride,
dilation, padding (numbers, ``"same"``, ``"valid"``) and padding mode (the module's own padding is applied
first, then the patches are unfolded without padding). With G > 1 groups the gradient is block diagonal: group
g's rank terms have u zero outside its ``C_out/G`` rows and v the patch of its ``C_in/G`` channels.
``∂z/∂b = Σ_p δ_p``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..factors import DenseFactor, Factor, LowRankFactor
from .base import Rule, position_sum, present, register_rule


def _patches(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """``[N, G, P, (C_in/G)·kh·kw]``: the input patch of every output position, one block per group.

    x: ``[N, C_in, (H,) W]``.
    """
    one_d = isinstance(module, nn.Conv1d)

    def two_d(t: Any) -> tuple[int, int]:
        return (1, *t) if one_d else tuple(t)  # type: ignore[return-value]

    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding: tuple[int, int] = (0, 0)
    else:
        padding = (0, *module.padding) if one_d else tuple(module.padding)  # type: ignore[assignment]
    if one_d:
        x = x.unsqueeze(2)
    cols = F.unfold(
        x, two_d(module.kernel_size), dilation=two_d(module.dilation), padding=padding, stride=two_d(module.stride)
    )  # [N, C_in·kh·kw, P], channel-major rows
    n, _, p = cols.shape
    return cols.view(n, module.groups, -1, p).transpose(2, 3)


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        return present(module, "weight", "bias")

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> Tensor:
        return _patches(module, args[0])  # type: ignore[arg-type]

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Factor]:
        """rec ``[N, G, P, D]``; delta ``[N, K, C_out, *spatial]`` → u ``[N, K, G·P, C_out]``, v ``[N, 1, G·P, D]``."""
        n, k, c_out = delta.shape[:3]
        groups = module.groups
        per_position = delta.reshape(n, k, c_out, -1).transpose(2, 3)  # [N, K, P, C_out]
        p = per_position.shape[2]
        if groups == 1:
            u = per_position
        else:  # group g's terms keep only its output channels: [N, K, G, P, G, C_out/G] with a diagonal in g
            blocks = per_position.reshape(n, k, p, groups, c_out // groups)
            eye = torch.eye(groups, dtype=delta.dtype, device=delta.device)
            u = torch.einsum("nkpgc,gh->nkgphc", blocks, eye).reshape(n, k, groups * p, c_out)
        out: dict[str, Factor] = {"weight": LowRankFactor(u, rec.reshape(n, 1, groups * p, rec.shape[-1]))}
        if module.bias is not None:
            out["bias"] = DenseFactor(position_sum(per_position))
        return out
