"""``nn.MultiheadAttention``: its projections are applied inside the functional, so the rule has its own forward.

``F.multi_head_attention_forward`` slices ``in_proj_weight`` into the q/k/v projections and uses
``out_proj.weight`` directly (``out_proj`` is never called as a module), so a forward hook sees none of them.
During capture the rule computes the same output from the module's own parameter tensors — q, k, v by
``F.linear``, scores ``q kᵀ/√d`` plus the merged additive mask, softmax, ``· v``, ``out_proj`` — and taps q, k,
v and the output. Per example then, as for ``nn.Linear`` (one rank term per position):

- ``in_proj_weight [3E, E]``: self-attention (query, key and value the same tensor) u = ``[δq | δk | δv]``
  against the input x; otherwise three blocks of rank terms, zero outside their rows.
  ``q/k/v_proj_weight`` (``kdim``/``vdim`` ≠ E) each their own block.
- ``in_proj_bias = [Σδq, Σδk, Σδv]``; ``out_proj.weight``: δ_out against the heads' concatenated output;
  ``out_proj.bias = Σ δ_out``.

Masks follow ``F.multi_head_attention_forward``: boolean masks are ``-inf`` where True, float masks are added,
a 3-D ``attn_mask`` is ``[N·H, T, S]``, and ``is_causal`` without a key padding mask and without weights uses the
causal mask itself. Not handled (the module's parameters go to the exact fallback instead): ``bias_k``/``bias_v``,
``add_zero_attn``, dropout in training mode, unbatched inputs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..factors import DenseFactor, Factor, LowRankFactor
from .base import Rule, position_sum, present, register_rule

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: masked) as ``0 / -inf``; a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def attention_forward(
    module: nn.MultiheadAttention,
    tap: Callable[[str, Tensor], Tensor],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[tuple[Tensor, Tensor | None], dict[str, Tensor]]:
    """``module(query, key, value, ...)`` (batched, eval) decomposed, and the record ``{x_q, x_k, x_v, o_in}``.

    Inputs ``[N, T, E]`` (``[T, N, E]`` unless batch_first); the record is batch-first.
    """
    self_attention = query is key and key is value
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    n, t, e = query.shape
    s, h = key.shape[1], module.num_heads
    d = e // h
    bias = module.in_proj_bias
    if self_attention and module._qkv_same_embed_dim:
        q, k, v = tap("qkv", F.linear(query, module.in_proj_weight, bias)).chunk(3, dim=-1)
    else:
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.chunk(3)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        q, k, v = (tap(name, F.linear(x, w, b)) for name, x, w, b in zip("qkv", (query, key, value), weights, biases))
    q, k, v = (y.reshape(n, -1, h, d).transpose(1, 2) for y in (q, k, v))  # [N, H, T|S, d]
    padding = _additive(key_padding_mask, query.dtype)
    if is_causal and padding is None and not need_weights:  # as SDPA's is_causal: attn_mask is only a hint
        mask = _additive(torch.ones(t, s, dtype=torch.bool, device=query.device).triu(1), query.dtype)
    else:
        mask = _additive(attn_mask, query.dtype)
    if mask is not None:
        mask = mask.view(n, h, t, s) if mask.dim() == 3 else mask.view(1, 1, t, s)
    if padding is not None:
        padding = padding.view(n, 1, 1, s)
        mask = padding if mask is None else mask + padding
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    attn = scores.softmax(dim=-1)  # [N, H, T, S]
    heads = (attn @ v).transpose(1, 2).reshape(n, t, e)
    out = tap("out", F.linear(heads, module.out_proj.weight, module.out_proj.bias))
    weights_out = (attn.mean(dim=1) if average_attn_weights else attn) if need_weights else None
    record = {"x_q": query, "x_k": key, "x_v": value, "o_in": heads}
    return (out if module.batch_first else out.transpose(0, 1), weights_out), record


def _rows_block(delta: Tensor, block: int, e: int) -> Tensor:
    """δ ``[N, K, R, E]`` placed in rows ``block·E … (block+1)·E`` of a ``[N, K, R, 3E]`` tensor (zeros elsewhere)."""
    return F.pad(delta, (block * e, (2 - block) * e))


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        if module.bias_k is not None or module.bias_v is not None or module.add_zero_attn:
            return {}
        if module.training and module.dropout > 0:
            return {}
        claimed = present(module, "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias")
        claimed.update({f"out_proj.{a}": p for a, p in present(module.out_proj, "weight", "bias").items()})
        return claimed

    def forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], tap: Callable[[str, Tensor], Tensor]
    ) -> tuple[Any, Any]:
        bound = _SIGNATURE.bind(module, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        if arguments["query"].dim() != 3:  # unbatched: decline (the fallback computes it)
            return nn.MultiheadAttention.forward(module, *args, **kwargs), None
        return attention_forward(module, tap, **arguments)

    def terms(self, module: nn.Module, rec: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, Factor]:
        e = module.embed_dim
        out: dict[str, Factor] = {}
        if "qkv" in delta:  # one rank term per position: [δq | δk | δv] ⊗ x
            d_qkv = delta["qkv"]  # [N, K, T, 3E]
            out["in_proj_weight"] = LowRankFactor(d_qkv, rec["x_q"][:, None])
            if module.in_proj_bias is not None:
                out["in_proj_bias"] = DenseFactor(position_sum(d_qkv))
        else:
            parts = [delta[p] for p in "qkv"]  # [N, K, T|S, E]
            inputs = [rec[f"x_{p}"][:, None] for p in "qkv"]
            if module._qkv_same_embed_dim:
                u = torch.cat([_rows_block(dp, i, e) for i, dp in enumerate(parts)], dim=2)
                out["in_proj_weight"] = LowRankFactor(u, torch.cat(inputs, dim=2))
            else:
                for p, dp, x in zip("qkv", parts, inputs):
                    out[f"{p}_proj_weight"] = LowRankFactor(dp, x)
            if module.in_proj_bias is not None:
                out["in_proj_bias"] = DenseFactor(torch.cat([dp.sum(dim=2) for dp in parts], dim=-1))
        d_out = delta["out"]  # [N, K, T, E]
        out["out_proj.weight"] = LowRankFactor(d_out, rec["o_in"][:, None])
        if module.out_proj.bias is not None:
            out["out_proj.bias"] = DenseFactor(position_sum(d_out))
        return out
