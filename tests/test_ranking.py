"""Feature ranking against brute-force dense computation, and the properties a ranking must have."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings

import pytest
import torch
from _models import bridge, mlp, perturbed
from torch import nn

import efffeat as ef
from efffeat.ranking import BY, FeatureTable, features_difference, rank

F64 = torch.float64
_ENTRY = re.compile(r"^(?P<name>.+)\[(?P<idx>[^\]]*)\]$")


# ---- brute force -----------------------------------------------------------------------------------------
def dense3(feats: ef.EffectiveFeatures) -> torch.Tensor:
    """``[N, K, P]`` feature matrix."""
    d = feats.dense()
    return d[:, None] if feats.scalar else d


def brute_feature_scores(feats, init_feats, by: str) -> torch.Tensor:
    """``[P]`` scores from the dense ``[N, K, P]`` matrix, by the definitions."""
    phi = dense3(feats)
    delta = feats.flat_delta()
    c = phi * delta
    if by in ("contribution", "net_contribution"):
        return c.square().mean(dim=(0, 1)).sqrt()
    if by == "mean_contribution":
        return c.mean(dim=(0, 1))
    if by == "variance":
        return phi.var(dim=0, unbiased=False).mean(dim=0)
    if by == "learned":
        return (phi - dense3(init_feats)).square().mean(dim=(0, 1)).sqrt()
    return delta.abs()


def brute_groups(ids, group: str, d_head: int | None = None) -> dict[str, list[int]]:
    """Group membership read off the id strings, independently of efffeat.ranking."""
    names = {s.state_name for s in ids.slots}
    out: dict[str, list[int]] = {}
    for p, fid in enumerate(ids):
        m = _ENTRY.match(fid)
        name, idx = m["name"], [int(i) for i in m["idx"].split(",")]
        if group == "module":
            key = name
        elif group == "head":
            attn, proj = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
            if ".attn." not in name or proj not in "qkvo" or (proj == "o" and name.endswith("bias")):
                continue
            h = (idx[1] if proj == "o" else idx[0]) // d_head
            key = f"{attn}.head[{h}]"
        elif len(idx) == 1:
            weight = name[: -len("bias")] + "weight"
            absorbed = group == "neuron" and name.endswith("bias") and weight in names
            key = f"{weight}[{idx[0]},:]" if absorbed else fid
        elif group == "neuron":
            key = f"{name}[{idx[0]},:]"
        else:
            key = f"{name}[:,{idx[1]}]"
        out.setdefault(key, []).append(p)
    return out


def brute_table(feats, init_feats, by, group, d_head=None) -> dict[str, float]:
    s = brute_feature_scores(feats, init_feats, by)
    if group == "param":
        return {fid: float(s[p]) for p, fid in enumerate(feats.ids)}
    members = group if isinstance(group, dict) else brute_groups(feats.ids, group, d_head)
    if isinstance(group, dict):
        members = {k: sorted({p for fid in v for p in _positions(feats.ids, fid)}) for k, v in group.items()}
    if by == "net_contribution":  # the RMS of each group's summed contribution
        c = dense3(feats) * feats.flat_delta()
        return {k: float(c[..., v].sum(-1).square().mean().sqrt()) for k, v in members.items()}
    rms = by in ("contribution", "learned", "weight")
    return {k: float(s[v].square().sum().sqrt() if rms else s[v].sum()) for k, v in members.items()}


def _positions(ids, fid: str) -> list[int]:
    return [p for p, other in enumerate(ids) if other == fid or _inside(other, fid)]


def _inside(fid: str, group_id: str) -> bool:
    """Whether single id `fid` lies in slice/module id `group_id` (neuron rows take their bias)."""
    m, g = _ENTRY.match(fid), _ENTRY.match(group_id)
    if g is None:
        return m["name"] == group_id
    if m["name"] == g["name"]:
        return all(b == ":" or a == b for a, b in zip(m["idx"].split(","), g["idx"].split(",")))
    gidx = g["idx"].split(",")
    bias = g["name"][: -len("weight")] + "bias"
    return m["name"] == bias and gidx[1:] == [":"] * (len(gidx) - 1) and m["idx"] == gidx[0]


def assert_table_matches(table: FeatureTable, want: dict[str, float], by: str) -> None:
    got = {r.id: r.score for r in table}
    assert set(got) == set(want)
    scale = max(abs(v) for v in want.values()) or 1.0
    worst = max(abs(got[k] - want[k]) for k in want) / scale
    assert worst <= 1e-10, f"{by}: max relative deviation {worst:.3g}"
    key = [abs(s) if by == "mean_contribution" else s for s in table.scores.tolist()]
    assert key == sorted(key, reverse=True)


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_feats():
    torch.manual_seed(0)
    model = mlp(4, (6, 5), 3, act=nn.Tanh).to(F64)
    model[2].bias = None  # a weight without a bias
    init = perturbed(model, 0.2, seed=1)
    dual = ef.DualModel(model, init, readout="output", order="nlo", progress=False)
    x = torch.randn(12, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    return dual.features(x), dual.features(x, order="init")


@pytest.fixture(scope="module")
def bridge_feats():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bridge(n_layers=1, d_vocab=7, n_ctx=3, normalization=None)
    model.eval()
    init = perturbed(model, 0.05, seed=3)
    dual = ef.DualModel(model, init, readout=2, order="nlo", dtype=F64, progress=False)
    tokens = torch.randint(0, 7, (6, 3), generator=torch.Generator().manual_seed(4))
    return dual.features(tokens), dual.features(tokens, order="init"), model.cfg.n_heads, model.cfg.d_head


# ---- every by × group against brute force ----------------------------------------------------------------
@pytest.mark.parametrize("by", BY)
@pytest.mark.parametrize("group", ["param", "neuron", "input", "module", "mapping"])
def test_mlp_every_by_and_group_matches_dense(mlp_feats, by, group):
    feats, init = mlp_feats
    if group == "mapping":
        group = {
            "unit1+w": ["0.weight[1,:]", "4.weight[0,2]"],
            "last": ["4.weight", "4.bias"],
            "col": ["2.weight[:,3]"],
        }
    table = rank(feats, by=by, group=group, init=init)
    assert_table_matches(table, brute_table(feats, init, by, group), by)


@pytest.mark.parametrize("by", BY)
@pytest.mark.parametrize("group", ["param", "neuron", "input", "module", "head"])
def test_bridge_every_by_and_group_matches_dense(bridge_feats, by, group):
    feats, init, n_heads, d_head = bridge_feats
    table = rank(feats, by=by, group=group, init=init, n_heads=n_heads)
    assert_table_matches(table, brute_table(feats, init, by, group, d_head), by)
    if group == "head":
        assert len(table) == n_heads and all(r.size == 3 * (16 * 4 + 4) + 16 * 4 for r in table)


def test_groups_partition_the_features(mlp_feats):
    feats, _ = mlp_feats
    total = float(rank(feats, by="contribution").scores.square().sum())
    for group in ("neuron", "input", "module"):
        table = rank(feats, by="contribution", group=group)
        assert int(table.sizes.sum()) == feats.n_features
        assert math.isclose(float(table.scores.square().sum()), total, rel_tol=1e-12)


def test_difference_of_features_matches_dense(mlp_feats):
    feats, init = mlp_feats
    diff = features_difference(feats, init)
    assert torch.allclose(diff.dense(), feats.dense() - init.dense(), atol=1e-14)


# ---- acceptance: dead units, single learned unit, permutations, seeds ------------------------------------
def trained_relu_net(dead: int | None, seed: int = 0):
    """A 3-6-2 ReLU net trained 20 SGD steps on random targets; unit `dead` has bias −1e3 throughout."""
    torch.manual_seed(seed)
    model = mlp(3, (6,), 2, act=nn.ReLU).to(F64)
    if dead is not None:
        with torch.no_grad():
            model[0].bias[dead] = -1e3
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(16, 3, dtype=F64, generator=g)
    y = torch.randn(16, 2, dtype=F64, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    return model, init, x


def test_dead_unit_has_zero_features_and_ranks_last():
    dead = 2
    model, init, x = trained_relu_net(dead)
    dual = ef.DualModel(model, init, readout="output", order="nlo", progress=False)
    feats, init_feats = dual.features(x), dual.features(x, order="init")
    dead_ids = (
        {f"0.weight[{dead},{j}]" for j in range(3)} | {f"0.bias[{dead}]"} | {f"2.weight[{o},{dead}]" for o in (0, 1)}
    )
    for f in (feats, init_feats):
        assert bool((f.columns(sorted(dead_ids)) == 0).all())
    dead_groups = {"param": dead_ids, "neuron": {f"0.weight[{dead},:]"}, "input": {f"2.weight[:,{dead}]"}}
    for by in BY:
        for group, members in dead_groups.items():
            table = rank(feats, by=by, group=group, init=init_feats)
            scores = dict(zip(table.ids, table.scores.tolist()))
            assert all(scores[m] == 0 for m in members), (by, group)
            tail = [fid for fid, s in zip(table.ids, table.scores.tolist()) if s == 0]
            assert members <= set(tail) and list(table.ids)[-len(tail) :] == tail, (by, group)


def test_only_changed_unit_ranks_first():
    torch.manual_seed(0)
    model = mlp(5, (8,), 3, act=nn.Tanh).to(F64)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight[5] += 0.3 * torch.randn(5, dtype=F64)
    dual = ef.DualModel(model, init, readout="output", order="nlo", progress=False)
    table = rank(dual.features(torch.randn(20, 5, dtype=F64)), by="contribution", group="neuron")
    assert table[0].id == "0.weight[5,:]" and table[0].score > 0
    assert bool((table.scores[1:] == 0).all())


@pytest.mark.parametrize("group", ["param", "neuron", "input"])
def test_ranking_is_invariant_under_permuting_hidden_units(group):
    model, init, x = trained_relu_net(None)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(5))
    inv = torch.argsort(perm)

    def permuted(state):
        out = dict(state)
        out["0.weight"], out["0.bias"], out["2.weight"] = (
            state["0.weight"][perm],
            state["0.bias"][perm],
            state["2.weight"][:, perm],
        )
        return out

    model2 = mlp(3, (6,), 2, act=nn.ReLU).to(F64)
    model2.load_state_dict(permuted(model.state_dict()))
    dual1 = ef.DualModel(model, init, readout="output", order="nlo", progress=False)
    dual2 = ef.DualModel(model2, permuted(init), readout="output", order="nlo", progress=False)
    f1, f2 = dual1.features(x), dual2.features(x)
    i1, i2 = dual1.features(x, order="init"), dual2.features(x, order="init")

    def relabel(fid: str) -> str:  # an id of model2 -> the same feature of model
        m = _ENTRY.match(fid)
        idx = m["idx"].split(",")
        pos = {"0.weight": 0, "0.bias": 0, "2.weight": 1}.get(m["name"])
        if pos is not None and idx[pos] != ":":
            idx[pos] = str(int(perm[int(idx[pos])]))
        return f"{m['name']}[{','.join(idx)}]"

    assert int(inv[perm[0]]) == 0
    for by in BY:
        t1, t2 = rank(f1, by=by, group=group, init=i1), rank(f2, by=by, group=group, init=i2)
        s1 = dict(zip(t1.ids, t1.scores.tolist()))
        s2 = {relabel(k): v for k, v in zip(t2.ids, t2.scores.tolist())}
        assert set(s1) == set(s2)
        assert all(math.isclose(s1[k], s2[k], rel_tol=1e-10, abs_tol=1e-14) for k in s1), by


def test_same_seed_gives_identical_tables():
    tables = []
    for _ in range(2):
        model, init, x = trained_relu_net(None, seed=7)
        dual = ef.DualModel(model, init, readout="output", order="nlo", progress=False)
        tables.append(rank(dual.features(x), by="contribution", group="neuron"))
    assert list(tables[0].ids) == list(tables[1].ids)
    assert torch.equal(tables[0].scores, tables[1].scores)


# ---- the table -------------------------------------------------------------------------------------------
def test_table_rows_records_printing_and_top(mlp_feats):
    feats, _ = mlp_feats
    full = rank(feats, by="contribution")
    top = rank(feats, by="contribution", top=5)
    assert len(full) == feats.n_features and len(top) == 5
    assert list(top.ids) == list(full.ids[:5]) and torch.equal(top.scores, full.scores[:5])
    row = full[0]
    assert row.rank == 1 and row.id == full.ids[0] and row.score == float(full.scores[0])
    assert full[-1].id == full.ids[len(full) - 1]
    records = top.to_records()
    assert records[2] == {"rank": 3, "id": top.ids[2], "score": float(top.scores[2]), "size": 1}
    text = str(rank(feats, group="neuron"))
    assert "by='contribution'" in text and "0.weight[" in text and "size" in text
    assert "more" in str(full)


@pytest.mark.parametrize("group", ["param", "neuron"])
def test_table_state_round_trip(mlp_feats, group):
    feats, _ = mlp_feats
    table = rank(feats, by="mean_contribution", group=group)
    back = FeatureTable.from_state(*table.to_state())
    assert list(back.ids) == list(table.ids)
    assert torch.equal(back.scores, table.scores) and torch.equal(back.sizes, table.sizes)
    assert (back.group, back.by, back.meta) == (table.group, table.by, table.meta)


# ---- bad input ---------------------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors(mlp_feats):
    feats, init = mlp_feats
    with pytest.raises(ef.ConfigError, match="unknown by"):
        rank(feats, by="importance")
    with pytest.raises(ef.ConfigError, match="unknown group"):
        rank(feats, group="layer")
    with pytest.raises(ef.ConfigError, match="init="):
        rank(feats, by="learned")
    with pytest.raises(ef.ConfigError, match="top"):
        rank(feats, top=0)
    with pytest.raises(ef.FeatureIdError, match="Did you mean '0.weight'"):
        rank(feats, group={"g": ["0.weigth[1,:]"]})
    with pytest.raises(ef.FeatureIdError, match="out of range"):
        rank(feats, group={"g": ["0.weight[9,:]"]})
    with pytest.raises(ef.ConfigError, match="empty"):
        rank(feats, group={})
    with pytest.raises(ef.ConfigError, match="attention"):
        rank(feats, group="head", n_heads=2)
    with pytest.raises(ef.ConfigError, match="different data"):
        features_difference(feats, init.select_rows(slice(0, 5)))


@pytest.mark.parametrize("group", ["layer", {"g": ["0.weigth[1,:]"]}, {"g": ["0.weight[9,:]"]}, {}, "head"], ids=str)
def test_a_bad_group_is_refused_before_any_score_is_computed(mlp_feats, monkeypatch, group):
    feats, _ = mlp_feats
    scored = []
    monkeypatch.setattr(type(feats), "sq_sums", lambda self, weights=None: scored.append(1))
    with pytest.raises((ef.ConfigError, ef.FeatureIdError)):
        rank(feats, by="contribution", group=group, n_heads=2)
    assert scored == []


def test_head_group_reads_the_number_of_heads_from_the_model(bridge_feats):
    feats, _, _, _ = bridge_feats
    assert feats.meta["n_heads"] == 4
    by_meta = rank(feats, group="head")
    assert by_meta.ids == rank(feats, group="head", n_heads=4).ids
    unknown = dataclasses.replace(feats, meta={})
    with pytest.raises(ef.ConfigError, match="n_heads"):
        rank(unknown, group="head")


# ---- the sort ---------------------------------------------------------------------------------------------
def _ties(seed: int, n: int, dtype=torch.float32) -> torch.Tensor:
    """Scores with many ties, both signed zeros and infinities."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-3, 4, (n,), generator=g) * 0.25).to(dtype)
    x[torch.rand(n, generator=g) < 0.2] = -0.0
    x[:: max(1, n // 5)] = float("inf")
    return x


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sort_is_the_stable_descending_sort(signed, dtype):
    from efffeat.ranking import _sort_descending

    for seed, n, zeros in [(0, 1, 0), (1, 2, 0), (2, 37, 0), (3, 1000, 0), (4, 4097, 0), (5, 999, 0.9), (6, 64, 1)]:
        x = _ties(seed, n, dtype)
        x = x if signed else x.abs()
        x[: int(zeros * n)] = 0  # mostly zero scores are sorted apart (rows of tokens that never occur)
        values, want = torch.sort(x, descending=True, stable=True)
        order, got = _sort_descending(x)
        assert torch.equal(order, want) and torch.equal(got, values + 0.0)  # −0 reads +0
        for top in (1, 3, n):
            order, got = _sort_descending(x, top)
            assert torch.equal(order, want[:top]) and torch.equal(got, values[:top] + 0.0)


def test_sort_with_nan_follows_torch():
    from efffeat.ranking import _sort_descending

    x = _ties(5, 50)
    x[7] = float("nan")
    values, want = torch.sort(x, descending=True, stable=True)
    order, got = _sort_descending(x)
    assert torch.equal(order, want)
    torch.testing.assert_close(got, values, rtol=0, atol=0, equal_nan=True)


def test_ties_rank_in_feature_order():
    model = mlp(3, (4,), 1)
    init = {k: v.clone() for k, v in model.state_dict().items()}  # Δθ = 0: every contribution ties at 0
    feats = ef.DualModel(model, init, readout=0, progress=False).features(torch.randn(5, 3))
    table = rank(feats, by="contribution")
    assert list(table.ids) == list(feats.ids) and not bool(table.scores.any())
    assert list(rank(feats, by="contribution", top=4).ids) == list(feats.ids)[:4]


def test_embedding_features_rank_like_their_one_hot_layout():
    torch.manual_seed(6)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 3)
            self.lin = nn.Linear(3, 2)

        def forward(self, t):
            return self.lin(torch.tanh(self.emb(t))).sum(dim=1)

    model = Tokens().double()
    init = perturbed(model, 0.2)
    x = torch.randint(0, 9, (6, 4), generator=torch.Generator().manual_seed(7))
    feats = ef.DualModel(model, init, readout="output", order="nlo", progress=False).features(x)
    table = feats.factors["emb.weight"]
    one_hot = dataclasses.replace(feats, factors={**feats.factors, "emb.weight": table.to_lowrank()})
    for by in ("contribution", "variance", "mean_contribution"):
        a, b = rank(feats, by=by, group="neuron"), rank(one_hot, by=by, group="neuron")
        assert list(a.ids) == list(b.ids)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-12, atol=1e-300)


def test_net_contribution_lets_cancelling_members_cancel():
    """Two hidden units whose output weights are opposite: each moves the output, together they do not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1, bias=False)).to(F64)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight[1] = model[0].weight[0]
        model[0].bias[1] = model[0].bias[0]
        model[2].weight[0, 1] = -model[2].weight[0, 0]
        init["2.weight"] = model[2].weight.clone() * 0.5  # the output row moved, its two halves opposite
    dual = ef.DualModel(model, init, order="trained", progress=False)
    feats = dual.features(torch.randn(20, 3, dtype=F64))
    energy = rank(feats, by="contribution", group="module")
    net = rank(feats, by="net_contribution", group="module")
    assert dict(zip(energy.ids, energy.scores.tolist()))["2.weight"] > 1e-2
    assert dict(zip(net.ids, net.scores.tolist()))["2.weight"] < 1e-12
