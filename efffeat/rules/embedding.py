"""``nn.Embedding``: the gradient of a lookup ``E[token]`` is δ added to the token's row, stored as the token ids."""

from __future__ import annotations

from torch import Tensor, nn

from ..factors import EmbeddingFactor, Factor
from .base import Rule, present, rank_terms, register_rule


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        if module.max_norm is not None:  # renormalises its weight in place: no clean derivative
            return {}
        return present(module, "weight")

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Factor]:
        n, k = delta.shape[:2]
        ids = rec.reshape(n, -1)
        v = rank_terms(delta, n, k, delta.shape[-1])
        if module.padding_idx is not None:  # the padding row is a constant: its lookups contribute nothing
            v = v * (ids != module.padding_idx)[:, None, :, None].to(v.dtype)
        return {"weight": EmbeddingFactor(ids, v, module.num_embeddings)}
