"""The model zoo: TMS geometry, determinism, bit-exact save/load, damaged files, and the Fourier helpers."""

from __future__ import annotations

import math

import pytest
import torch

import efffeat.zoo as zoo
from efffeat import spectra
from efffeat.baselines.metrics import feature_dimensionality
from efffeat.errors import ConfigError, SaveFileError

# The CPU-fast TMS setting: lr 1e-2 (the literature's 1e-3 needs 10k steps). Measured over seeds 0–5:
# S = 0.975 gives the pentagon (every D_i within 0.015 of 0.4) after 500 steps, S = 0 keeps exactly the two
# most important features after 2000 steps.
FAST = {"lr": 1e-2, "n_data": 64}


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("seed", [0, 1])
def test_tms_sparse_regime_is_a_pentagon(seed):
    run = zoo.tms(n_features=5, n_hidden=2, sparsity=0.975, seed=seed, **FAST).train(500, progress=False)
    W = run.model.W.detach()
    D = feature_dimensionality(W)
    assert torch.allclose(D, torch.full_like(D, 0.4), atol=0.03), D
    angles = torch.atan2(W[1], W[0]).sort().values
    gaps = torch.diff(torch.cat([angles, angles[:1] + 2 * math.pi]))
    assert torch.allclose(gaps, torch.full_like(gaps, 2 * math.pi / 5), atol=0.1), gaps  # a regular pentagon


def test_tms_dense_regime_keeps_the_two_most_important_features():
    run = zoo.tms(n_features=5, n_hidden=2, sparsity=0.0, seed=0, **FAST).train(2000, progress=False)
    W = run.model.W.detach()
    norms, D = W.norm(dim=0), feature_dimensionality(W)
    assert (norms[:2] > 0.95).all() and (D[:2] > 0.95).all(), (norms, D)
    assert (norms[2:] < 0.1).all(), norms


def test_tms_structure_and_ground_truth():
    run = zoo.tms(n_features=20, n_hidden=5, importance=0.7, sparsity=0.9, n_data=32)
    assert run.ground_truth.equal(torch.eye(20)) and run.data.shape == (32, 20)
    assert set(run.model.state_dict()) == {"encoder.weight", "decoder.bias"}  # W is tied, stored once
    assert run.model.decoder.source is run.model.encoder
    frac_zero = float((run.data == 0).float().mean())
    assert 0.85 < frac_zero < 0.95
    x = run.data[:4]
    want = torch.relu(x @ run.model.W.T @ run.model.W + run.model.decoder.bias)
    assert torch.allclose(run.model(x), want)
    with pytest.raises(ConfigError, match="sparsity"):
        zoo.tms(sparsity=1.0)


def test_training_is_deterministic_and_keeps_init():
    a = zoo.tms(sparsity=0.9, seed=3, n_data=16).train(40, progress=False)
    b = zoo.tms(sparsity=0.9, seed=3, n_data=16).train(40, progress=False)
    c = zoo.tms(sparsity=0.9, seed=4, n_data=16)
    assert _states_equal(a.model.state_dict(), b.model.state_dict())
    assert a.history == b.history and len(a.history) == 40
    assert _states_equal(a.init_state, b.init_state)
    assert not torch.equal(a.init_state["encoder.weight"], c.init_state["encoder.weight"])
    assert not torch.equal(a.init_state["encoder.weight"], a.model.state_dict()["encoder.weight"])
    before = torch.get_rng_state()
    zoo.tms(seed=5)
    assert torch.equal(before, torch.get_rng_state())  # building does not touch the global RNG


def test_save_load_is_bit_exact_and_resumes_exactly(tmp_path):
    run = zoo.tms(sparsity=0.9, seed=1, n_data=16).train(20, progress=False)
    path = run.save(tmp_path / "tms.safetensors")
    loaded = zoo.load(path)
    assert loaded.config == run.config and loaded.history == run.history
    assert _states_equal(loaded.init_state, run.init_state)
    assert _states_equal(loaded.model.state_dict(), run.model.state_dict())
    assert torch.equal(loaded.data, run.data) and torch.equal(loaded.ground_truth, run.ground_truth)
    straight = zoo.tms(sparsity=0.9, seed=1, n_data=16).train(40, progress=False)
    loaded.train(20, progress=False)  # optimizer and sampler state were saved: resuming equals not stopping
    assert _states_equal(loaded.model.state_dict(), straight.model.state_dict())
    tensors, meta = run.to_state()
    again = zoo.Run.from_state(tensors, meta)
    assert _states_equal(again.to_state()[0], tensors)


def test_untrained_and_tuple_data_runs_round_trip(tmp_path):
    run = zoo.teacher_student(d=6, hidden=8, n_train=32, n_test=16)
    loaded = zoo.load(run.save(tmp_path / "ts.safetensors"))
    assert isinstance(loaded.data, tuple) and all(torch.equal(a, b) for a, b in zip(loaded.data, run.data))
    assert torch.equal(loaded.extra["test_x"], run.extra["test_x"]) and loaded.steps_done == 0


def test_damaged_files_raise_save_file_error(tmp_path):
    run = zoo.tms(sparsity=0.9, seed=0, n_data=16).train(5, progress=False)
    path = run.save(tmp_path / "run.safetensors")
    raw = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SaveFileError):
        zoo.load(truncated)
    corrupt = tmp_path / "corrupt.safetensors"
    flipped = bytearray(raw)
    flipped[-8] ^= 0xFF  # a byte of tensor data
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(SaveFileError, match="corrupt"):
        zoo.load(corrupt)
    with pytest.raises(SaveFileError):
        zoo.load(tmp_path / "missing.safetensors")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["corrupt.safetensors", "run.safetensors", "truncated.safetensors"]  # no temporary files left


def test_teacher_student_target_and_ground_truth():
    run = zoo.teacher_student(d=10, k=2, hidden=16, n_train=64, n_test=8, seed=2)
    U = run.ground_truth
    assert U.shape == (2, 10) and torch.allclose(U @ U.T, torch.eye(2), atol=1e-6)
    x, y = run.data
    z = x @ U.T
    assert torch.allclose(y[:, 0], z[:, 0] * z[:, 1], atol=1e-5)
    run.train(200, progress=False)
    assert run.history[-1] < 0.5 * run.history[0]
    assert run.readout == 0
    with pytest.raises(ConfigError, match="even"):
        zoo.teacher_student(k=3)


def test_digits_mlp_learns():
    run = zoo.digits_mlp(seed=0).train(300, progress=False)
    metrics = run.evaluate()
    assert metrics["test_accuracy"] > 0.9, metrics
    x, y = run.data
    assert x.shape[1] == 64 and float(x.max()) <= 1 and len(run.extra["test_y"]) == round(0.25 * 1797)
    out = run.model(x[:5])
    assert torch.equal(zoo.correct_logit(out, (x[:5], y[:5])), out[torch.arange(5), y[:5]])


def test_modular_addition_small(tmp_path):
    run = zoo.modular_addition(p=7, d_model=16, n_heads=2, d_mlp=32, seed=0)
    tokens, labels = run.data
    assert tokens.shape == (49, 3) and bool((tokens[:, 2] == 7).all())
    assert torch.equal(labels, (tokens[:, 0] + tokens[:, 1]) % 7)
    assert len(run.extra["train_idx"]) == round(0.3 * 49)
    assert set(run.extra["train_idx"].tolist()).isdisjoint(run.extra["test_idx"].tolist())
    run.train(3, progress=False)
    assert run.model(tokens[:2]).shape == (2, 3, 7)
    assert set(run.evaluate()) == {"train_loss", "train_accuracy", "test_loss", "test_accuracy"}
    loaded = zoo.load(run.save(tmp_path / "modadd.safetensors"))
    assert _states_equal(loaded.model.state_dict(), run.model.state_dict())
    assert _states_equal(loaded.init_state, run.init_state)
    assert len(zoo.run_key_frequencies(run)) >= 1


def test_fourier_helpers_find_planted_frequencies():
    p, gen = 31, torch.Generator().manual_seed(0)
    basis = spectra.dft_matrix(p)
    assert torch.allclose(basis @ basis.T, torch.eye(p, dtype=torch.float64), atol=1e-10)
    a = torch.arange(p, dtype=torch.float64)
    freqs = [4, 11, 7]
    cols = [f(2 * math.pi * k * a / p) * (3 - i) for i, k in enumerate(freqs) for f in (torch.cos, torch.sin)]
    emb = torch.stack(cols, dim=1) @ torch.randn(len(cols), 16, generator=gen, dtype=torch.float64)
    emb = emb + 1e-3 * torch.randn(p, 16, generator=gen, dtype=torch.float64)
    assert spectra.key_frequencies(emb) == freqs
    assert spectra.key_frequencies(emb, n=2) == freqs[:2]
    tokens, _ = zoo.all_pairs(p)
    ta, tb = tokens[:, 0], tokens[:, 1]
    w = 2 * math.pi * 4 / p
    funcs = torch.stack(
        [torch.cos(w * (ta + tb)), torch.sin(w * (ta - tb)), torch.randn(p * p, generator=gen, dtype=torch.float64)],
        dim=1,
    )
    align = spectra.fourier_alignment(funcs, ta, tb, p, [4])
    assert align[0] > 1 - 1e-9 and align[1] > 1 - 1e-9 and align[2] < 0.05
