"""``nn.RNN``, ``nn.GRU``, ``nn.LSTM``: the fused kernels apply every weight inside one op, so the rule has its
own forward.

During capture the rule runs the recurrence step by step from the module's own parameter tensors, the cell
equations of the PyTorch documentation, and taps the two affine maps of every layer and direction:

- the input side for all positions at once, ``gᵢ = W_ih x_t + b_ih`` ``[N, T, G·H]`` (G = 1 RNN, 3 GRU, 4 LSTM
  gates, in PyTorch's order: r, z, n; i, f, g, o);
- the hidden side at every step, ``gₕ(t) = W_hh h_{t−1} + b_hh`` ``[N, G·H]``.

Per example then, as for a sequence ``nn.Linear`` (one rank term per step): ``weight_ih = Σ_t δgᵢ(t) ⊗ x_t``,
``weight_hh = Σ_t δgₕ(t) ⊗ h_{t−1}``, the biases the sums of their cotangents. The GRU's new gate reads
``r ⊙ (W_hn h + b_hn)``, which is why the two sides keep their own cotangents.

Not handled (the module's parameters go to the exact fallback instead): ``PackedSequence`` inputs, unbatched
inputs, LSTM projections (``proj_size > 0``), dropout between layers in training mode.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..factors import DenseFactor, Factor, LowRankFactor
from .base import Rule, position_sum, register_rule


def _cell(mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One step ``(h_t, c_t)`` from the gates' two affine parts ``gi, gh [N, G·H]``."""
    if mode == "RNN_TANH":
        return torch.tanh(gi + gh), None
    if mode == "RNN_RELU":
        return torch.relu(gi + gh), None
    if mode == "GRU":
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n), None
    assert c is not None
    i, f, g, o = (gi + gh).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _suffixes(module: nn.RNNBase) -> list[tuple[int, int, str]]:
    """``(layer, direction, "_l{layer}[_reverse]")`` in the order of ``h_n``."""
    directions = 2 if module.bidirectional else 1
    return [
        (layer, d, f"_l{layer}{'_reverse' if d else ''}")
        for layer in range(module.num_layers)
        for d in range(directions)
    ]


def recurrent_forward(
    module: nn.RNNBase, tap: Callable[[str, Tensor], Tensor], x: Tensor, hx: Any = None
) -> tuple[Any, dict[str, Tensor]]:
    """``module(x, hx)`` (batched, eval) step by step, and the record ``{x…, h…}`` (batch-first, ``[N, T, ·]``)."""
    lstm = module.mode == "LSTM"
    seq = x if module.batch_first else x.transpose(0, 1)  # [N, T, in]
    n, t = seq.shape[:2]
    directions = 2 if module.bidirectional else 1
    zeros = seq.new_zeros(module.num_layers * directions, n, module.hidden_size)
    h0, c0 = (hx if hx is not None else (zeros, zeros)) if lstm else (zeros if hx is None else hx, None)
    record: dict[str, Tensor] = {}
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    layer_in = seq
    outputs: list[Tensor] = []
    for layer, d, sfx in _suffixes(module):
        if d == 0 and layer > 0:
            layer_in, outputs = torch.cat(outputs, dim=2), []
        w_ih, w_hh = getattr(module, f"weight_ih{sfx}"), getattr(module, f"weight_hh{sfx}")
        b_ih, b_hh = (
            (getattr(module, f"bias_ih{sfx}"), getattr(module, f"bias_hh{sfx}")) if module.bias else (None, None)
        )
        gi = tap(f"ih{sfx}", F.linear(layer_in, w_ih, b_ih))  # [N, T, G·H]
        h = h0[layer * directions + d]
        c = None if c0 is None else c0[layer * directions + d]
        before: list[Tensor] = [h] * t
        after: list[Tensor] = [h] * t
        for s in range(t - 1, -1, -1) if d else range(t):
            before[s] = h
            gh = tap(f"hh{sfx}.{s}", F.linear(h, w_hh, b_hh))  # [N, G·H]
            h, c = _cell(module.mode, gi[:, s], gh, h, c)
            after[s] = h
        record[f"x{sfx}"], record[f"h{sfx}"] = layer_in, torch.stack(before, dim=1)
        outputs.append(torch.stack(after, dim=1))
        h_n.append(h)
        if c is not None:
            c_n.append(c)
    out = torch.cat(outputs, dim=2)
    out = out if module.batch_first else out.transpose(0, 1)
    hidden = torch.stack(h_n)
    return (out, (hidden, torch.stack(c_n)) if lstm else hidden), record


@register_rule(nn.RNN, nn.GRU, nn.LSTM)
class RecurrentRule(Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        assert isinstance(module, nn.RNNBase)
        if module.training and module.dropout > 0 and module.num_layers > 1:
            return {}
        return {name: getattr(module, name) for name in module._flat_weights_names}

    def forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], tap: Callable[[str, Tensor], Tensor]
    ) -> tuple[Any, Any]:
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
        x, hx = bound.arguments["input"], bound.arguments.get("hx")
        if not isinstance(x, Tensor) or x.dim() != 3 or module.proj_size > 0:  # decline: the fallback computes it
            return type(module).forward(module, *args, **kwargs), None
        return recurrent_forward(module, tap, x, hx)

    def terms(self, module: nn.Module, rec: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Factor]:
        assert isinstance(module, nn.RNNBase)
        out: dict[str, Factor] = {}
        for _, _, sfx in _suffixes(module):
            d_ih = delta[f"ih{sfx}"]  # [N, K, T, G·H]
            d_hh = torch.stack([delta[f"hh{sfx}.{s}"] for s in range(d_ih.shape[2])], dim=2)
            out[f"weight_ih{sfx}"] = LowRankFactor(d_ih, rec[f"x{sfx}"][:, None])
            out[f"weight_hh{sfx}"] = LowRankFactor(d_hh, rec[f"h{sfx}"][:, None])
            if module.bias:
                out[f"bias_ih{sfx}"] = DenseFactor(position_sum(d_ih))
                out[f"bias_hh{sfx}"] = DenseFactor(position_sum(d_hh))
        return out
