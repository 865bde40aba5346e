"""``nn.Conv1d`` and ``nn.Conv2d``: per example ``∂z/∂W = Σ_p δ_p ⊗ patch_p`` over the output positions p.

The weight ``[C_out, C_in/G, (kh,) kw]`` is read as a matrix ``[C_out, (C_in/G)·kh·kw]`` (row-major, so feature
ids are those of the weight tensor); every output position is one rank term, as a sequence position is for
``nn.Linear``: u the output cotangent δ_p ``[C_out]``, v the unfolded input patch that produced it. Any stride,
dilation, padding (numbers, ``"same"``, ``"valid"``) and padding mode (the module's own padding is applied
first, then the patches are cut without padding). With G > 1 groups the gradient is block diagonal: group
g's rank terms have u zero outside its ``C_out/G`` rows and v the patch of its ``C_in/G`` channels.
``∂z/∂b = Σ_p δ_p``.

Where the dense per-example gradient takes at most twice the memory of the rank terms (many positions, narrow
channels: most convolutions) it is stored dense, as one batched matmul: with P positions every product on the
rank terms costs more than on the dense gradient (a Gram pair ``P²·(d0 + d1)`` against ``d0·d1``, a matvec
``P·d0·d1`` against ``d0·d1``), so they are kept only where they save more than half the memory (few positions,
wide channels).
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

    x: ``[N, C_in, (H,) W]``. The module's own padding first (its mode, and the asymmetric split of ``"same"``),
    then strided windows (``Tensor.unfold``: a view, and one copy into the patch layout).
    """
    if any(module._reversed_padding_repeated_twice):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
    lift = (lambda t: (1, *t)) if isinstance(module, nn.Conv1d) else tuple
    kernel, stride, dilation = lift(module.kernel_size), lift(module.stride), lift(module.dilation)
    for axis in (2, 3):  # [N, C, H, W] -> [N, C, Ho, Wo, kh, kw]
        k, s, d = kernel[axis - 2], stride[axis - 2], dilation[axis - 2]
        x = x.unfold(axis, d * (k - 1) + 1, s)[..., ::d]
    n, c, ho, wo = x.shape[:4]
    patches = x.permute(0, 2, 3, 1, 4, 5).reshape(n, ho * wo, module.groups, -1)  # channel-major (c, kh, kw)
    return patches.transpose(1, 2)


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        return present(module, "weight", "bias")

    def record(self, module: nn.Module, args: tuple[Any, ...]) -> Tensor:
        return _patches(module, args[0])  # type: ignore[arg-type]

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Factor]:
        """rec ``[N, G, P, D]``; delta ``[N, K, C_out, *spatial]``.

        Rank terms: u ``[N, K, G·P, C_out]`` (zero outside each group's rows), v ``[N, 1, G·P, D]``. Dense:
        ``Σ_p δ_p ⊗ patch_p`` as one batched matmul, ``[N, K, C_out·D]``.
        """
        n, k, c_out = delta.shape[:3]
        groups, p, d = rec.shape[1:]
        per_channel = delta.reshape(n, k, groups, c_out // groups, p)  # [N, K, G, C_out/G, P]
        out: dict[str, Factor] = {}
        if k * c_out * d <= 2 * groups * p * (k * c_out + d):
            out["weight"] = DenseFactor((per_channel @ rec[:, None]).reshape(n, k, c_out * d))
        else:
            # group g's terms keep only its output channels: [N, K, G, P, G, C_out/G] with a diagonal in g
            eye = torch.eye(groups, dtype=delta.dtype, device=delta.device)
            u = torch.einsum("nkgcp,gh->nkgphc", per_channel, eye).reshape(n, k, groups * p, c_out)
            out["weight"] = LowRankFactor(u, rec.reshape(n, 1, groups * p, d))
        if module.bias is not None:
            out["bias"] = DenseFactor(position_sum(per_channel, dim=4).reshape(n, k, c_out))
        return out
