"""The learned-kernel view: ΔΘ = Θ_order − Θ_against against dense brute force, its directions, and ΔW."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _models import mlp, perturbed
from torch import nn

import efffeat as ef
from efffeat import io
from efffeat.spectra import KernelChange, component_features

F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setting():
    """A tanh MLP 5-7-3 a large random step from its init (float64), 14 examples and 5 new ones."""
    torch.manual_seed(0)
    model = mlp(5, (7,), 3).double()
    init = perturbed(model, 0.6, seed=1)
    dual = ef.DualModel(model, init, readout="output", order="path", nodes=6, progress=False)
    g = torch.Generator().manual_seed(2)
    x, x_new = torch.randn(14, 5, generator=g, dtype=F64), torch.randn(5, 5, generator=g, dtype=F64)
    return dual, x, x_new


def dense_pair(dual, x, order="path", against="init"):
    """``J_a, J_b [N·K, P]`` from the dense features."""
    fa, fb = dual.features(x, order=order), dual.features(x, order=against)
    return fa, fb, fa.dense().reshape(-1, fa.n_features), fb.dense().reshape(-1, fb.n_features)


def centring(n: int, k: int) -> torch.Tensor:
    """``H [N·K, N·K]``: each readout component minus its mean over the examples (example-major rows)."""
    return torch.kron(torch.eye(n, dtype=F64) - 1 / n, torch.eye(k, dtype=F64))


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_kernel_change_is_the_top_abs_eigenpairs_of_the_dense_difference(setting, center, method):
    dual, x, _ = setting
    fa, fb, ja, jb = dense_pair(dual, x)
    delta = ja @ ja.T - jb @ jb.T
    if center:
        h = centring(fa.n_examples, fa.n_outputs)
        delta = h @ delta @ h
    evals, evecs = torch.linalg.eigh(delta)
    top = evals.abs().argsort(descending=True)[:6]
    change = ef.kernel_change(fa, against=fb, k=6, center=center, method=method)
    assert isinstance(change, KernelChange) and isinstance(change, ef.Spectrum)
    assert torch.allclose(change.values, evals[top], rtol=1e-8, atol=1e-9)
    assert bool((change.values < 0).any()) and bool((change.values > 0).any())  # ΔΘ is indefinite here
    assert bool((change.values.abs()[:-1] >= change.values.abs()[1:]).all())
    u = change.functions.reshape(-1, 6)
    assert torch.allclose((u.T @ evecs[:, top]).abs().diagonal(), torch.ones(6, dtype=F64), atol=1e-7)
    assert torch.allclose(u.abs().max(dim=0).values, u.max(dim=0).values)  # the largest entry is positive
    # each eigenvector's pair of parameter vectors: ‖J_aᵀu‖² − ‖J_bᵀu‖² = λ, and the change direction
    va, vb = change.order_directions, change.against_directions
    assert torch.allclose(va, (ja.T @ u).T, atol=1e-10) and torch.allclose(vb, (jb.T @ u).T, atol=1e-10)
    assert torch.allclose(va.square().sum(1) - vb.square().sum(1), change.values, rtol=1e-8, atol=1e-9)
    d = (va - vb) / (va - vb).norm(dim=1, keepdim=True)
    assert torch.allclose(torch.stack([change.directions(i) for i in range(6)]), d, atol=1e-12)
    assert torch.allclose(change[2].direction(), d[2], atol=1e-12)
    assert torch.allclose(change.directions(1, "order"), va[1] / va[1].norm(), atol=1e-12)
    assert change[0].value == float(change.values[0]) and change[0].id == "change[0]"
    assert change.meta["center"] is center and change.meta["order"] == "path" and change.meta["against"] == "init"
    assert change.meta["completeness"]["order"] < 1e-4 < change.meta["completeness"]["against"]


def test_the_sign_of_the_change_is_kept(setting):
    dual, x, _ = setting
    with pytest.warns(UserWarning, match="completeness residual"):  # one-point orders do not explain this network
        up = ef.kernel_change(dual, x, order="trained", against="init", k=5, center=False)
    with pytest.warns(UserWarning, match="order 'init'"):
        down = ef.kernel_change(dual, x, order="init", against="trained", k=5, center=False)
    assert torch.allclose(down.values, -up.values, rtol=1e-9)
    assert torch.allclose((down.functions * up.functions).sum(dim=(0, 1)).abs(), torch.ones(5, dtype=F64), atol=1e-8)


@pytest.mark.parametrize("center", [False, True])
def test_project_is_the_nystrom_extension(setting, center):
    dual, x, x_new = setting
    fa, fb, ja, jb = dense_pair(dual, x)
    change = ef.kernel_change(fa, against=fb, k=4, center=center)
    assert torch.allclose(change.project(fa, fb), change.functions, atol=1e-10)  # on the data: u itself
    na, nb = dual.features(x_new, order="path"), dual.features(x_new, order="init")
    ja_new, jb_new = na.dense().reshape(-1, na.n_features), nb.dense().reshape(-1, nb.n_features)
    u = change.functions.reshape(-1, 4)
    applied = (ja @ ja.T - jb @ jb.T) @ u  # ΔΘ(A, A) u
    mean = applied.reshape(14, 3, 4).mean(0) if center else torch.zeros(3, 4, dtype=F64)
    want = ((ja_new @ ja.T - jb_new @ jb.T) @ u).reshape(5, 3, 4) - mean
    assert torch.allclose(change.project(na, nb), want / change.values, atol=1e-10)
    # without the against features: the features along the unit change direction, what search evaluates
    along = torch.stack([change.directions(i) for i in range(4)], dim=1)
    assert torch.allclose(change.project(na), (ja_new @ along).reshape(5, 3, 4), atol=1e-12)


def test_blocks_input_directions_and_subspace(setting):
    dual, x, _ = setting
    change = ef.kernel_change(dual, x, k=4)
    blocks = change.blocks(1)
    assert set(blocks) == {"0.weight", "0.bias", "2.weight", "2.bias"} and blocks["0.weight"].shape == (7, 5)
    flat = torch.cat([blocks[s.state_name].reshape(-1) for s in change.slots])
    assert torch.allclose(flat, change.directions(1))
    dirs = change.input_directions("0.weight")
    want = torch.stack([torch.linalg.svd(change.blocks(i)["0.weight"]).Vh[0] for i in range(4)])
    assert dirs.shape == (4, 5) and torch.allclose((dirs * want).sum(1).abs(), torch.ones(4, dtype=F64), atol=1e-10)
    stacked = torch.cat(
        [
            change.blocks(i)["0.weight"] / change.blocks(i)["0.weight"].norm() * change.values[i].abs().sqrt()
            for i in range(2)
        ]
    )
    sub = change.subspace("0.weight", 3, top=2)
    assert torch.allclose(
        (sub @ torch.linalg.svd(stacked).Vh[:3].T).abs().diagonal(), torch.ones(3, dtype=F64), atol=1e-10
    )
    with pytest.raises(ef.ConfigError, match="not among the tensors"):
        ef.kernel_change(dual, x, k=2, layer="2.weight").input_directions("0.weight")
    with pytest.raises(ef.ConfigError, match="unknown kind"):
        change.directions(0, "both")
    with pytest.raises(ef.ConfigError, match="n=9"):
        change.subspace("0.weight", 9, top=1)


def test_a_component_is_the_kernel_of_that_readout(setting):
    dual, x, _ = setting
    one = ef.DualModel(dual.model, dual.theta_init, readout=1, order="path", nodes=6, progress=False)
    want = ef.kernel_change(one, x, k=5)
    got = ef.kernel_change(dual, x, k=5, component=1)
    assert torch.allclose(got.values, want.values, rtol=1e-9) and got.functions.shape == (14, 5)
    assert torch.allclose(got.functions, want.functions, atol=1e-9)
    assert got.meta["component"] == 1
    fa = dual.features(x)
    assert torch.allclose(got.project(fa), want.project(component_features(fa, 1)), atol=1e-10)
    with pytest.raises(ef.ConfigError, match="component"):
        ef.kernel_change(dual, x, k=2, component=3)


def test_against_none_is_the_centred_kernel_itself(setting):
    dual, x, _ = setting
    fa, _, ja, _ = dense_pair(dual, x)
    h = centring(14, 3)
    evals = torch.linalg.eigvalsh(h @ ja @ ja.T @ h).flip(0)[:4]
    own = ef.kernel_change(fa, against=None, k=4)
    assert torch.allclose(own.values, evals, rtol=1e-9) and own.against_directions is None
    assert torch.allclose(
        ef.kernel_change(fa, against=None, k=4, center=False).values, ef.eigenfeatures(fa, k=4).values
    )
    with pytest.raises(ef.ConfigError, match="no 'against'"):
        own.directions(0, "against")


def test_search_and_persistence(setting, tmp_path):
    dual, x, _ = setting
    change = ef.kernel_change(dual, x, k=3)
    top = ef.max_activating(dual, x, [change[0], change[2]], k=4, progress=False)
    values = change.project(dual.features(x)).reshape(-1, 3)  # pairs example-major
    for i in (0, 2):
        assert torch.equal(top[change[i].id].indices, values[:, i].topk(4).indices // 3)
    back = io.load(io.save(change, tmp_path / "change.safetensors"))
    assert type(back) is KernelChange and back.meta == change.meta
    for name in ("values", "functions", "direction_matrix", "order_directions", "against_directions", "offsets"):
        assert torch.equal(getattr(back, name), getattr(change, name)), name
    assert "Θ_path − Θ_init" in repr(change) and change.cliff.index is not None
    assert change.cliffs(n=1) == [change.cliff.index]


def test_bad_arguments_say_what_to_do(setting):
    dual, x, _ = setting
    fa = dual.features(x)
    with pytest.raises(ef.ConfigError, match="both 'path'"):
        ef.kernel_change(dual, x, against="path")
    with pytest.raises(ef.ConfigError, match="needs a model"):
        ef.kernel_change(fa, against="init")
    with pytest.raises(ef.ConfigError, match="pass the data"):
        ef.kernel_change(dual)
    with pytest.raises(ef.ConfigError, match="DualModel with data or EffectiveFeatures, got Tensor"):
        ef.kernel_change(x)
    with pytest.raises(ef.ConfigError, match="another model, data or readout"):
        ef.kernel_change(fa, against=dual.features(x[:5], order="init"))
    with pytest.raises(ef.DataError, match="k=43"):
        ef.kernel_change(dual, x, k=43)
    with pytest.raises(ef.ConfigError, match="unknown method"):
        ef.kernel_change(dual, x, method="qr")


def test_weight_change_is_the_svd_of_each_tensors_change(setting):
    dual, _, _ = setting
    changes = ef.weight_change(dual, k=3)
    assert list(changes)[0] == max(changes, key=lambda n: changes[n].share)
    assert sum(c.share for c in changes.values()) == pytest.approx(1.0, abs=1e-12)
    delta = dual.delta["0.weight"]
    total = dual.delta_norm() ** 2
    w = changes["0.weight"]
    assert torch.allclose(w.singular_values, torch.linalg.svdvals(delta)[:3])
    assert torch.allclose(w.shares, w.singular_values.square() / total)
    assert torch.allclose(w.left * w.singular_values @ w.right, _rank3(delta), atol=1e-12)
    assert changes["2.bias"].right.shape == (1, 3)  # a vector is one row
    with pytest.raises(ef.ConfigError, match="DualModel or EffectiveFeatures"):
        ef.weight_change(dual.model)


def _rank3(m: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :3] * s[:3] @ vh[:3]


def test_the_kernel_change_of_a_planted_subspace_is_a_function_of_it():
    """y = z₁z₂ + z₃² − 1 on z = Uᵀx: the top centred ΔΘ eigenvectors are cubic functions of z (R² ≥ 0.8), not
    of a random 3-d projection (R² ≤ 0.3); the init kernel's are not functions of z."""
    g = torch.Generator().manual_seed(3)
    d, n = 20, 512
    U, _ = torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=F64))
    x = torch.randn(n, d, generator=g, dtype=F64)
    z = x @ U
    y = z[:, 0] * z[:, 1] + z[:, 2] ** 2 - 1
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 1)).double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        opt.zero_grad()
        (model(x)[:, 0] - y).square().mean().backward()
        opt.step()
    dual = ef.DualModel(model, init, readout=0, order="path", nodes=4, progress=False)
    change = ef.kernel_change(dual, x, k=3)
    from efffeat.baselines.metrics import polynomial_r2

    on_z = [polynomial_r2(change.functions[:, i], z, 3) for i in range(3)]
    on_random = [polynomial_r2(change.functions[:, i], x @ V, 3) for i in range(3)]
    assert sum(on_z) / 3 >= 0.8 and sum(on_random) / 3 <= 0.3, (on_z, on_random)
    with pytest.warns(UserWarning, match="completeness"):
        before = ef.kernel_change(dual, x, order="init", against=None, k=3)
    at_init = [polynomial_r2(before.functions[:, i], z, 3) for i in range(3)]
    assert sum(at_init) / 3 <= 0.4, at_init
    share = ef.baselines.metrics.subspace_share(change.subspace("0.weight", 3), U.T)
    assert share >= 0.7, share


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "reproduce_kernel_change", REPO / "scripts/reproduce_kernel_change.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_reproduce_script_quick(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load_script().main(["--quick"])
    out = capsys.readouterr().out
    for title in ("teacher–student", "planted subspace", "digits", "grokking"):
        assert title in out
