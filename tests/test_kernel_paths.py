"""Every route of the factored kernel against ``J Jᵀ`` of plain-autograd per-example gradients (float64).

The kernel folds a layer's bias into its weight's Gram, joins dense factors into one GEMM, computes only the
upper block triangle of a self-kernel, contracts sequence layers position pair by position pair (or through the
per-example gradients when those are cheaper) and drops rank terms that are zero for every example; each is
checked here, for self and cross kernels, scalar and vector readouts, and every output reduction.
"""

from __future__ import annotations

import pytest
import torch
from _models import bridge, init_params, mlp, params_of, perturbed
from _reference import reference_features, rel_err
from torch import nn

import efffeat as ef
import efffeat.factors as factors
from efffeat.factors import DenseFactor, EmbeddingFactor, LowRankFactor, factor_gram, gram_sum
from efffeat.features import reduce_outputs

F64 = torch.float64
ORDERS = ["init", "nlo", "trained", "path"]


def jacobians(model, init, x, readout, order, nodes=3):
    return reference_features(model, init_params(model, init), params_of(model), x, readout, order, nodes)


def gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nkp,mlp->nkml", a, b)


def folded(feats: ef.EffectiveFeatures) -> int:
    """How many of the store's biases the kernel folds into their weights."""
    names = [s.name for s in feats.slots]
    fs = [feats.factors[n] for n in names]
    bias_of = feats._bias_positions(names)
    left, _ = factors._fold_biases(fs, fs, bias_of)
    return len(fs) - len(left)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("readout", ["output", 1])
def test_mlp_kernel_is_the_jacobian_gram(order, readout):
    torch.manual_seed(0)
    model = mlp(4, (6, 5), 3, nn.Tanh).to(F64)
    init = perturbed(model, 0.2)
    x, x2 = torch.randn(7, 4, dtype=F64), torch.randn(5, 4, dtype=F64)
    ref_readout = (lambda out: out) if readout == "output" else (lambda out: out[:, 1:2])
    j1, j2 = jacobians(model, init, x, ref_readout, order), jacobians(model, init, x2, ref_readout, order)
    dual = ef.DualModel(model, init, readout=readout, order=order, nodes=3, progress=False)
    f1, f2 = dual.features(x, batch_size=4), dual.features(x2)
    squeeze = (lambda t: t[:, 0, :, 0]) if readout == 1 else (lambda t: t)
    assert rel_err(f1.kernel(), squeeze(gram(j1, j1))) <= 1e-10
    assert rel_err(f1.kernel(f2), squeeze(gram(j1, j2))) <= 1e-10
    # every bias folds into its weight's Gram where the weight is stored low-rank (at NLO a weight whose input
    # has a tangent has a rank-2 factor, and its bias is the sum of the first, value, half)
    low = sum(isinstance(f1.factors[f"{i}.weight"], LowRankFactor) for i in (0, 2, 4))
    assert folded(f1) == low and (low > 0 or (order, readout) == ("path", 1))


@pytest.mark.parametrize("other", [False, True])
@pytest.mark.parametrize("reduce", ["flatten", "diagonal", "pairs"])
def test_output_reductions_of_self_and_cross_kernels(reduce, other):
    torch.manual_seed(1)
    model = mlp(3, (5,), 4, nn.Tanh).to(F64)
    init = perturbed(model, 0.3)
    x, x2 = torch.randn(6, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    dual = ef.DualModel(model, init, readout="output", order="nlo", progress=False)
    f1, f2 = dual.features(x), dual.features(x2)
    j1 = jacobians(model, init, x, lambda out: out, "nlo")
    j2 = jacobians(model, init, x2, lambda out: out, "nlo") if other else j1
    w = torch.tensor([0.5, 1.0, 2.0, 0.0], dtype=F64)
    got = f1.kernel(f2 if other else None, reduce=reduce, output_weights=w)
    assert rel_err(got, reduce_outputs(gram(j1, j2), reduce, w)) <= 1e-10


def test_symmetric_blocks_mirror_and_joined_dense_factors(monkeypatch):
    torch.manual_seed(2)
    model = mlp(3, (4, 4), 2, nn.Tanh).to(F64)
    init = perturbed(model, 0.3)
    x = torch.randn(11, 3, dtype=F64)
    feats = ef.DualModel(model, init, readout="output", order="trained", progress=False).features(x)
    j = jacobians(model, init, x, lambda out: out, "trained")
    for rows, join in [(3, 1), (4, 1 << 30), (100, 1)]:  # several uneven blocks; dense factors apart or joined
        monkeypatch.setattr(factors, "_SYMMETRIC_BLOCK_ROWS", rows)
        monkeypatch.setattr(factors, "_JOIN_ELEMENTS", join)
        k = feats.kernel()
        assert rel_err(k, gram(j, j)) <= 1e-10
        assert torch.equal(k, k.permute(2, 3, 0, 1))  # mirrored exactly


def test_a_bias_used_outside_its_layer_is_not_folded():
    class BiasTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.lin(x)) * self.lin.bias)

    torch.manual_seed(3)
    model = BiasTwice().to(F64)
    init = perturbed(model, 0.3)
    x = torch.randn(6, 3, dtype=F64)
    with pytest.warns(ef.FallbackWarning):
        dual = ef.DualModel(model, init, readout="output", order="trained", progress=False)
        feats = dual.features(x)
    assert dual.fallback_params == ["lin.bias"]
    j = jacobians(model, init, x, lambda out: out, "trained")
    assert rel_err(feats.kernel(), gram(j, j)) <= 1e-10
    assert folded(feats) == 1  # out.bias only


@pytest.mark.parametrize("order", ["trained", "nlo"])
def test_transformer_bridge_kernel_with_sequences_and_embeddings(order):
    model = bridge(n_layers=1).to(F64)
    init = perturbed(model, 0.05, seed=4)
    g = torch.Generator().manual_seed(5)
    x, x2 = torch.randint(0, 11, (6, 3), generator=g), torch.randint(0, 11, (4, 3), generator=g)

    def last(out):
        return out[:, -1, :3]

    dual = ef.DualModel(model, init, readout=lambda out, batch: last(out), order=order, progress=False)
    f1, f2 = dual.features(x, batch_size=4), dual.features(x2)
    j1, j2 = jacobians(model, init, x, last, order), jacobians(model, init, x2, last, order)
    assert rel_err(f1.kernel(), gram(j1, j1)) <= 1e-10
    assert rel_err(f1.kernel(f2), gram(j1, j2)) <= 1e-10
    assert rel_err(f1.kernel(reduce="diagonal"), reduce_outputs(gram(j1, j1), "diagonal")) <= 1e-10
    kinds = {type(f) for f in f1.factors.values()}
    assert {LowRankFactor, EmbeddingFactor} <= kinds
    # the readout reads the last position only: the query's cotangent is zero at the others, those terms dropped
    query = f1.factors[f1.ids.slot("blocks.0.attn.q.weight").name]
    assert query.rank == (1 if order == "trained" else 2)


def test_off_diagonal_pairs_on_many_blocks(monkeypatch):
    model = bridge(n_layers=1).to(F64)
    init = perturbed(model, 0.05, seed=6)
    x = torch.randint(0, 11, (7, 3), generator=torch.Generator().manual_seed(7))
    feats = ef.DualModel(model, init, readout=lambda out, batch: out[:, -1, :2], progress=False).features(x)
    fs = list(feats.factors.values())
    want = gram_sum(fs, fs)  # both sides given: every (r, s) pair in full, no symmetry
    for rows in (2, 3, 100):  # diagonal and off-diagonal blocks of uneven sizes
        monkeypatch.setattr(factors, "_SYMMETRIC_BLOCK_ROWS", rows)
        assert rel_err(gram_sum(fs), want) <= 1e-13


def _lowrank(n, ku, kv, r, d0, d1, seed):
    g = torch.Generator().manual_seed(seed)
    return LowRankFactor(
        torch.randn(n, ku, r, d0, generator=g, dtype=F64), torch.randn(n, kv, r, d1, generator=g, dtype=F64)
    )


@pytest.mark.parametrize(("ku", "kv"), [(3, 1), (1, 3), (3, 3)])
@pytest.mark.parametrize(("r", "d"), [(2, 6), (8, 3)])  # rank-pair products; the per-example gradient route
def test_lowrank_gram_routes_and_folded_bias(ku, kv, r, d):
    a, b = _lowrank(5, ku, kv, r, d, d + 1, 8), _lowrank(4, ku, kv, r, d, d + 1, 9)
    pair, dense = a._gram_pair_cost(b, symmetric=False)
    assert (2 * dense < pair) == (r == 8)
    da, db = a.dense().expand(5, 3, -1), b.dense().expand(4, 3, -1)
    assert rel_err(factor_gram(a, b), gram(da, db)) <= 1e-12
    assert rel_err(factor_gram(a), gram(da, da)) <= 1e-12
    if ku == 3:  # a dense layer's bias is the sum of the weight's output-side terms
        ba, bb = DenseFactor(a.u.sum(2)), DenseFactor(b.u.sum(2))
        assert a._bias_terms(ba) == [1.0] * r
        wa, wb = torch.cat([da, ba.g], -1), torch.cat([db, bb.g], -1)
        assert rel_err(gram_sum([a, ba], [b, bb], bias_of={0: 1}), gram(wa, wb)) <= 1e-12
        assert rel_err(gram_sum([a, ba], bias_of={0: 1}), gram(wa, wa)) <= 1e-12
        other = DenseFactor(ba.g + 1e-3)  # not the sum: computed apart
        assert a._bias_terms(other) is None
        wo = torch.cat([da, other.g], -1)
        assert rel_err(gram_sum([a, other], bias_of={0: 1}), gram(wo, wo)) <= 1e-12


def test_embedding_gram_is_the_one_hot_gram():
    g = torch.Generator().manual_seed(10)
    ids = torch.randint(0, 4, (6, 5), generator=g)
    v = torch.randn(6, 2, 5, 3, generator=g, dtype=F64)
    a = EmbeddingFactor(ids, v, 4)
    b = EmbeddingFactor(ids[:3].flip(1), v[:3] * 2, 4)
    assert rel_err(factor_gram(a), factor_gram(a.to_lowrank())) <= 1e-13
    assert rel_err(factor_gram(a, b), gram(a.dense(), b.dense())) <= 1e-13
    # mixed layouts meet in the one both can take
    assert rel_err(factor_gram(a, b.to_lowrank()), gram(a.dense(), b.dense())) <= 1e-13
    assert rel_err(factor_gram(a, b.to_dense()), gram(a.dense(), b.dense())) <= 1e-13
