"""``nn.Embedding``: the gradient of a lookup ``E[token]`` is δ scattered to the token's row: one-hot ⊗ δ."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..factors import Factor, LowRankFactor
from .base import Rule, present, rank_terms, register_rule


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    def claims(self, module: nn.Module) -> dict[str, Tensor]:
        if module.max_norm is not None:  # renormalises its weight in place: no clean derivative
            return {}
        return present(module, "weight")

    def terms(self, module: nn.Module, rec: Tensor, delta: Tensor) -> dict[str, Factor]:
        n, k = delta.shape[:2]
        onehot = F.one_hot(rec.reshape(n, 1, -1), module.num_embeddings).to(delta.dtype)
        if module.padding_idx is not None:
            onehot[..., module.padding_idx] = 0
        return {"weight": LowRankFactor(onehot, rank_terms(delta, n, k, delta.shape[-1]))}
