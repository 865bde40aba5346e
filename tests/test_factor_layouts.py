"""Factor layouts against each other and against their dense per-example gradients (float64).

`EmbeddingFactor` (token ids and cotangents) must agree with the one-hot `LowRankFactor` it replaces in every
operation; `LowRankFactor`'s two ``sq_sum`` routes and its ``sq_norms`` routes with the dense gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from _models import perturbed
from torch import nn

import efffeat as ef
from efffeat.factors import (
    DenseFactor,
    EmbeddingFactor,
    LowRankFactor,
    Selection,
    cat_examples,
    compact,
    difference,
    factor_gram,
    from_state,
    gather_examples,
    sum_factors,
)

F64 = torch.float64


def embedding(n=6, k=3, r=5, vocab=7, d=4, seed=0) -> EmbeddingFactor:
    """Token ids with repeats within examples, and a padding position (zero cotangent) in two of them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, r), generator=g)
    ids[:, 1] = ids[:, 0]  # a token repeated within each example
    v = torch.randn(n, k, r, d, generator=g, dtype=F64)
    v[:2, :, -1] = 0
    return EmbeddingFactor(ids, v, vocab)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    return float((a - b).norm()) <= tol * max(float(b.norm()), 1e-300)


@pytest.mark.parametrize("k", [1, 3])
def test_embedding_factor_agrees_with_the_one_hot_layout(k):
    f = embedding(k=k)
    low = f.to_lowrank()
    dense = low.dense()
    g = torch.Generator().manual_seed(1)
    n, p = f.n_examples, f.numel
    assert (f.numel, f.n_outputs, f.shape) == (low.numel, low.n_outputs, low.shape)
    assert torch.equal(f.dense(), dense)
    w = torch.randn(p, generator=g, dtype=F64)
    c = torch.randn(n, k, generator=g, dtype=F64)
    assert close(f.matvec(w), low.matvec(w))
    assert close(f.rmatvec(c), low.rmatvec(c))
    flat = torch.tensor([0, 5, 5, p - 1, 9])
    assert close(f.entries(flat), dense[..., flat], 1e-15)
    sel = Selection(f.shape, torch.tensor([3, 9, 10, 27]), torch.randn(4, generator=g, dtype=F64))
    assert close(f.selected(sel), low.selected(sel))
    weights = torch.rand(n, k, generator=g, dtype=F64)
    assert close(f.sq_sum(), dense.square().sum(dim=(0, 1)))
    assert close(f.sq_sum(weights), (dense.square() * weights[:, :, None]).sum(dim=(0, 1)))
    assert close(f.sq_norms(), dense.square().sum(-1))
    wk = torch.rand(k, generator=g, dtype=F64)
    assert close(f.output_sum(wk).dense()[:, 0], torch.einsum("nkp,k->np", dense, wk))
    stacked = f.stacked_outputs(wk)
    assert stacked.n_outputs == 1 and close(stacked.sq_norms()[:, 0], dense.square().sum(-1) @ wk)
    assert close(stacked.dense(), f.to_lowrank().stacked_outputs(wk).dense())
    assert close(f.diagonal_gram(wk), torch.einsum("nkp,mkp,k->nm", dense, dense, wk))
    assert close(factor_gram(f), factor_gram(low), 1e-13)
    assert torch.equal(f.scaled(2.0).dense(), 2 * dense) and torch.equal(f.negated().dense(), -dense)
    assert torch.equal(f.rows(torch.tensor([4, 0])).dense(), dense[[4, 0]])


def test_embedding_factor_state_joins_and_tangents():
    f = embedding(k=2)
    back = from_state(f.state())
    assert isinstance(back, EmbeddingFactor) and torch.equal(back.dense(), f.dense())
    short = EmbeddingFactor(f.ids[:3, :2], f.v[:3, :, :2], f.num_embeddings)
    joined = cat_examples([f, short])  # ranks 5 and 2: padded
    assert isinstance(joined, EmbeddingFactor)
    assert torch.equal(joined.dense(), torch.cat([f.dense(), short.dense()]))
    gathered = gather_examples(f, lambda t: [t[:4], t[4:]], lambda flag: flag)
    assert isinstance(gathered, EmbeddingFactor) and torch.equal(gathered.dense(), f.dense())
    twice = sum_factors([f, f.scaled(0.5)])
    assert isinstance(twice, EmbeddingFactor) and close(twice.dense(), 1.5 * f.dense())
    low = LowRankFactor(torch.randn(6, 1, 1, 7, dtype=F64), torch.randn(6, 2, 1, 4, dtype=F64))
    tied = sum_factors([f, low])  # a table also used as a linear layer's weight
    assert isinstance(tied, LowRankFactor) and close(tied.dense(), f.dense() + low.dense())
    assert close(difference(f, low).dense(), f.dense() - low.dense())
    mixed = cat_examples([f, low])
    assert isinstance(mixed, LowRankFactor) and torch.equal(mixed.dense(), torch.cat([f.dense(), low.dense()]))
    tangent = torch.randn_like(f.v)
    with fwAD.dual_level():
        resolved = EmbeddingFactor(f.ids, fwAD.make_dual(f.v, tangent), f.num_embeddings).with_tangents()
    assert torch.equal(resolved.v, f.v + 0.5 * tangent)


def test_compact_drops_zero_terms_and_keeps_the_smaller_layout():
    f = embedding(k=2)
    f.v[:, :, 3] = 0  # a position no example's gradient reaches
    c = compact(f)
    assert isinstance(c, EmbeddingFactor) and c.rank == f.rank - 1 and torch.equal(c.dense(), f.dense())
    tiny = EmbeddingFactor(f.ids % 2, f.v, 2)  # two rows: dense is smaller
    assert isinstance(compact(tiny), DenseFactor) and torch.equal(compact(tiny).dense(), tiny.dense())
    g = torch.Generator().manual_seed(2)
    low = LowRankFactor(
        torch.randn(5, 2, 4, 9, generator=g, dtype=F64), torch.randn(5, 1, 4, 8, generator=g, dtype=F64)
    )
    low.u[:, :, 1] = 0
    low.v[:, :, 3] = 0
    kept = compact(low)
    assert isinstance(kept, LowRankFactor) and kept.rank == 2 and close(kept.dense(), low.dense(), 1e-15)
    nothing = LowRankFactor(torch.zeros(2, 1, 3, 9, dtype=F64), torch.ones(2, 1, 3, 8, dtype=F64))
    assert compact(nothing).rank == 1  # one term is always kept


def test_embedding_rule_stores_token_ids_and_keeps_the_padding_row_zero():
    torch.manual_seed(3)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 4, padding_idx=0)
            self.lin = nn.Linear(4, 2)

        def forward(self, t):
            return self.lin(torch.tanh(self.emb(t))).sum(dim=1)

    model = Tokens().double()
    init = perturbed(model, 0.2)
    init["emb.weight"][0] = model.emb.weight.detach()[0]
    x = torch.randint(0, 50, (8, 6), generator=torch.Generator().manual_seed(4))
    x[:, 0] = 0
    feats = ef.DualModel(model, init, readout="output", order="nlo", progress=False).features(x, batch_size=3)
    f = feats.factors["emb.weight"]
    assert isinstance(f, EmbeddingFactor) and f.nbytes < f.to_lowrank().nbytes / 4
    dense = f.dense().reshape(8, 2, 50, 4)
    assert not bool(dense[:, :, 0].any()) and bool(dense[:, :, 1:].any())
    assert not bool(f.sq_sum().reshape(50, 4)[0].any())


@pytest.mark.parametrize(("ku", "kv"), [(3, 1), (1, 3), (3, 3), (1, 1)])
@pytest.mark.parametrize("r", [1, 3, 9])  # one term; the rank-pair route; the per-example route
def test_lowrank_sq_sum_and_sq_norms_routes(ku, kv, r):
    g = torch.Generator().manual_seed(5)
    f = LowRankFactor(
        torch.randn(7, ku, r, 5, generator=g, dtype=F64), torch.randn(7, kv, r, 4, generator=g, dtype=F64)
    )
    assert f._per_example_is_cheaper() == (r == 9 and max(ku, kv) == 1)
    dense = f.dense()
    weights = torch.rand(7, 3, generator=g, dtype=F64)
    wide = dense.expand(7, 3, -1)
    assert close(f.sq_sum(), dense.square().sum(dim=(0, 1)))
    assert close(f.sq_sum(weights), (wide.square() * weights[:, :, None]).sum(dim=(0, 1)))
    assert close(f.sq_norms(), dense.square().sum(-1))
    thin = LowRankFactor(f.u[..., :2], f.v[..., :1])  # rank terms larger than the gradient: formed per example
    assert close(thin.sq_norms(), thin.dense().square().sum(-1))
    assert close(DenseFactor(dense).sq_norms(), dense.square().sum(-1))


def _layouts(k: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(3)
    n, r, d0, d1 = 5, 4, 6, 7
    return {
        "lowrank": LowRankFactor(
            torch.randn(n, k, r, d0, generator=g, dtype=F64), torch.randn(n, 1, r, d1, generator=g, dtype=F64)
        ),
        "lowrank, K on v": LowRankFactor(
            torch.randn(n, 1, r, d0, generator=g, dtype=F64), torch.randn(n, k, r, d1, generator=g, dtype=F64)
        ),
        "embedding": embedding(n=n, k=k, r=r, vocab=d0, d=d1),
        "dense": DenseFactor(torch.randn(n, k, d0 * d1, generator=g, dtype=F64)),
    }


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("layout", ["lowrank", "lowrank, K on v", "embedding", "dense"])
def test_a_selection_of_several_weight_vectors_gives_each_vectors_values(layout, k):
    """``w [m, G]`` evaluates G sparse functionals at once, with repeated positions adding up, exactly as G
    selections one by one and as the dense gradients."""
    f = _layouts(k)[layout]
    shape = (6, 7)
    g = torch.Generator().manual_seed(4)
    flat = torch.tensor([3, 9, 10, 27, 3, 41, 0])
    w = torch.randn(len(flat), 3, generator=g, dtype=F64)
    sel = Selection(shape, flat, w)
    together, terms = f.selected(sel), f.selected_terms(sel)
    dense = f.dense()
    assert together.shape == (5, k, 3) and terms.shape[:2] == (5, k) and terms.shape[3] == 3
    assert close(terms.sum(2), together)
    for j in range(3):
        one = Selection(shape, flat, w[:, j])
        assert close(together[..., j], f.selected(one))
        assert close(f.selected_terms(one), terms[..., j])
        want = torch.zeros(dense.shape[-1], dtype=F64).index_add_(0, flat, w[:, j])
        assert close(together[..., j], dense @ want)
