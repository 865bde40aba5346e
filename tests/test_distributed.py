"""efffeat.distributed: two gloo processes under torchrun give the single-process results.

Run as a script (``torchrun --nproc-per-node 2 tests/test_distributed.py OUT``) this file is the worker: every
rank computes its shard and the combined results are written to OUT for the test to compare.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as td
from _models import mlp, perturbed

import efffeat as ef
from efffeat import distributed as dist
from efffeat.ranking import rank
from efffeat.search import max_activating

F64 = torch.float64
N = 11  # odd: the two shards differ in size
IDS = ["0.weight[1,2]", "0.bias[3]", "2.weight[0,4]", "2.weight[2,6]"]
SEARCHED = ["0.weight[1,:]", "2.weight[0,4]", "2.weight"]


def setup() -> tuple[ef.DualModel, torch.Tensor]:
    torch.manual_seed(0)
    model = mlp(5, (7,), 3).to(F64)
    init = perturbed(model, 0.3)
    x = torch.randn(N, 5, dtype=F64)
    return ef.DualModel(model, init, readout="output", order="nlo", progress=False), x


def auto_dual(dual: ef.DualModel) -> ef.DualModel:
    """The same network at order "auto", taking dict batches ``{"x": [n, 5]}``."""
    return ef.DualModel(
        dual.model, dual.theta_init, order="auto", forward=lambda model, batch: model(batch["x"]), progress=False
    )


def auto_data(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dict batches whose second half (rank 1's shard) is small: deciding "auto" there alone would pick nlo
    where the dataset's first batch needs path."""
    return {"x": torch.cat([x[:5], 0.1 * x[5:]])}


def global_weights() -> torch.Tensor:
    """``[N, 3]`` example weights for the weighted reductions."""
    return torch.linspace(-1, 2, N * 3, dtype=F64).reshape(N, 3)


def tie_values(columns: torch.Tensor) -> torch.Tensor:
    """``[n, m]`` coarse values of some feature columns (rounded, so there are ties to break)."""
    return torch.round(columns[:, 0, :] * 2)


def results(dual: ef.DualModel, x: torch.Tensor, out: Path) -> dict:
    """Everything the test compares, computed with the distributed functions (any world size)."""
    feats = dist.features(dual, x, batch_size=4)
    offset = dist.example_offset(feats.n_examples)
    rows = slice(offset, offset + feats.n_examples)
    values = tie_values(feats.columns(IDS))
    local_index = torch.arange(feats.n_examples) + offset
    top_v, top_i = dist.merge_topk(values, local_index, k=3)
    top_v, top_i = dist.all_gather_topk(top_v, top_i, k=3)
    tables = {
        (by, group): dist.rank(feats, by=by, group=group)
        for by in ("contribution", "mean_contribution", "variance", "net_contribution")
        for group in ("param", "neuron")
    }
    on_disk = dist.kernel_to_disk(dual, x, out / "kernel.npy", block=2)
    search = dist.max_activating(dual, x, SEARCHED, k=4, by="contribution", batch_size=3, progress=False)
    auto = auto_dual(dual)
    auto_feats = dist.features(auto, auto_data(x), batch_size=4)
    return {
        "auto": (auto.order, auto.nodes),
        "auto_kernel": dist.kernel(auto_feats),
        "search": search_summary(search),
        "n": dist.n_examples(feats),
        "kernel": dist.kernel(feats),
        "kernel_dst": dist.kernel(feats, dst=0),
        "kernel_layer": dist.kernel(feats, params=["2.weight"]),
        "gathered_z": dist.gather_features(feats).z_trained,
        "sq_sums": dist.sq_sums(feats),
        "weighted_sq_sums": dist.sq_sums(feats, global_weights()[rows]),
        "rmatvec": dist.rmatvec(feats, global_weights()[rows]),
        "top": (top_v, top_i),
        "tables": {key: (list(t.ids), t.scores) for key, t in tables.items()},
        "disk": torch.from_numpy(np.array(on_disk)),
    }


def reference(dual: ef.DualModel, x: torch.Tensor) -> dict:
    """The same quantities on one process with the plain single-process API."""
    feats = dual.features(x, batch_size=4)
    values = tie_values(feats.columns(IDS))
    order = torch.sort(values, dim=0, descending=True, stable=True).indices[:3]  # stable: smaller index first
    tables = {
        (by, group): rank(feats, by=by, group=group)
        for by in ("contribution", "mean_contribution", "variance", "net_contribution")
        for group in ("param", "neuron")
    }
    search = max_activating(dual, x, SEARCHED, k=4, by="contribution", batch_size=3, progress=False)
    auto = auto_dual(dual)
    auto_feats = auto.features(auto_data(x), batch_size=4)
    return {
        "auto": (auto.order, auto.nodes),
        "auto_kernel": auto_feats.kernel(),
        "search": search_summary(search),
        "n": N,
        "kernel": feats.kernel(),
        "kernel_dst": feats.kernel(),
        "kernel_layer": feats.kernel(params=["2.weight"]),
        "gathered_z": feats.z_trained,
        "sq_sums": feats.sq_sums(),
        "weighted_sq_sums": feats.sq_sums(global_weights()),
        "rmatvec": feats.rmatvec(global_weights()),
        "top": (values.gather(0, order), order),
        "tables": {key: (list(t.ids), t.scores) for key, t in tables.items()},
        "disk": feats.kernel(),
    }


def search_summary(top) -> dict:
    entries = {label: (e.indices, e.components, e.values, e.n_zero) for label, e in top.entries.items()}
    return entries | {"meta": top.meta}


def assert_match(got: dict, want: dict) -> None:
    assert got["n"] == want["n"]
    assert got["auto"] == want["auto"]  # decided once, on the dataset's first batch, the same on every rank
    assert got["search"]["meta"] == want["search"]["meta"]
    for label in SEARCHED:
        (gi, gc, gv, gz), (wi, wc, wv, wz) = got["search"][label], want["search"][label]
        assert torch.equal(gi, wi) and torch.equal(gc, wc) and gz == wz, label
        torch.testing.assert_close(gv, wv, rtol=1e-12, atol=1e-12)
    for key in (
        "kernel",
        "kernel_dst",
        "kernel_layer",
        "gathered_z",
        "sq_sums",
        "weighted_sq_sums",
        "rmatvec",
        "disk",
        "auto_kernel",
    ):
        assert got[key].shape == want[key].shape, key
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12, msg=key)
    assert torch.equal(got["top"][0], want["top"][0]) and torch.equal(got["top"][1], want["top"][1])
    for key, (ids, scores) in want["tables"].items():  # same scores per id (near-ties may swap places)
        got_ids, got_scores = got["tables"][key]
        assert sorted(got_ids) == sorted(ids), key
        by_id = dict(zip(got_ids, got_scores.tolist()))
        got_aligned = torch.tensor([by_id[i] for i in ids], dtype=scores.dtype)
        torch.testing.assert_close(got_aligned, scores, rtol=1e-12, atol=1e-12, msg=str(key))


def test_one_process_without_a_group_is_the_plain_api(tmp_path):
    dual, x = setup()
    assert dist.world() == (0, 1)
    assert_match(results(dual, x, tmp_path), reference(dual, x))


@pytest.mark.skipif(not (td.is_available() and td.is_gloo_available()), reason="torch.distributed gloo unavailable")
def test_two_gloo_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__]
    proc = subprocess.run([*cmd, str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dual, x = setup()
    want = reference(dual, x)
    by_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert by_rank[1]["kernel_dst"] is None  # gathered to rank 0 only
    for r, got in enumerate(by_rank):
        if r:
            got["kernel_dst"] = want["kernel_dst"]
        assert_match(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernel.npy", "rank0.pt", "rank1.pt"]


def test_merge_topk_equals_the_top_k_of_everything():
    g = torch.Generator().manual_seed(3)
    values = torch.randint(0, 4, (40, 5), generator=g).double()  # many ties
    index = torch.randperm(40, generator=g)
    want = torch.sort(values[torch.argsort(index)], dim=0, descending=True, stable=True)
    parts = [dist.merge_topk(values[s : s + 13], index[s : s + 13], k=6) for s in range(0, 40, 13)]
    got_v, got_i = dist.merge_topk(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), k=6)
    assert torch.equal(got_v, want.values[:6]) and torch.equal(got_i, want.indices[:6])
    low_v, _ = dist.merge_topk(values, index, k=3, largest=False)
    assert torch.equal(low_v, torch.sort(values, dim=0).values[:3])
    with pytest.raises(ef.ConfigError):
        dist.merge_topk(values, index, k=0)


def test_kernel_to_disk_scalar_readout_in_uneven_blocks(tmp_path):
    torch.manual_seed(1)
    model = mlp(3, (4,), 2).to(F64)
    dual = ef.DualModel(model, perturbed(model, 0.2), readout=1, order="path", nodes=2, progress=False)
    x = torch.randn(10, 3, dtype=F64)
    on_disk = dist.kernel_to_disk(dual, x, tmp_path / "sub" / "k.npy", block=3)
    assert isinstance(on_disk, np.memmap) and on_disk.shape == (10, 10) and on_disk.dtype == np.float64
    torch.testing.assert_close(torch.from_numpy(np.array(on_disk)), dual.features(x).kernel(), rtol=1e-13, atol=1e-13)
    assert np.array_equal(np.load(tmp_path / "sub" / "k.npy"), np.array(on_disk))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["k.npy"]


def test_init_outside_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ef.ConfigError, match="torchrun"):
        dist.init()
    for bad in (0, -1.0, float("nan"), "5"):
        with pytest.raises(ef.ConfigError, match="timeout"):
            dist.init(timeout=bad)


def test_an_error_of_one_process_is_raised_with_its_global_index_and_rank():
    dual, x = setup()
    x = x.clone()
    x[7, 2] = float("nan")
    with pytest.raises(ef.NonFiniteError, match=r"input example 7 contains NaN"):
        dist.features(dual, x)


def _spawn(case: str, out: Path) -> list[subprocess.Popen]:
    """Two gloo processes running `_case(case)` of this file, joined through a free local port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return [
        subprocess.Popen(
            [sys.executable, __file__, "--case", case, str(out)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}
        )
        for r in range(2)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait up to `timeout` seconds for the processes; kill those still running."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.mark.skipif(not (td.is_available() and td.is_gloo_available()), reason="torch.distributed gloo unavailable")
def test_nan_on_one_rank_is_raised_on_every_rank_with_the_global_index(tmp_path):
    procs = _spawn("nan", tmp_path)
    _finish(procs, 120)
    assert [p.returncode for p in procs] == [0, 0]
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["type"] == "NonFiniteError", got
        assert got["message"].startswith("input example 7 contains NaN or inf"), got  # global: rank 1's local 2
        assert "(rank 1 of 2, whose shard starts at global example 5)" in got["message"], got


@pytest.mark.skipif(not (td.is_available() and td.is_gloo_available()), reason="torch.distributed gloo unavailable")
def test_a_frozen_rank_stops_the_others_after_the_timeout(tmp_path):
    procs = _spawn("frozen", tmp_path)
    _finish(procs[:1], 120)
    _finish(procs[1:], 0)  # the frozen rank
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert 2.5 < got["seconds"] < 30 and "Timed out" in got["message"], got


def _case(case: str, out: Path) -> None:
    """A worker of the two-process tests: `case` "nan" or "frozen"; writes what it saw to OUT/rank<r>.json."""
    (out / f"ready{os.environ['RANK']}").touch()  # both ranks join at once, however long their imports took
    while not all((out / f"ready{r}").exists() for r in range(2)):
        time.sleep(0.01)
    rank, _ = dist.init("gloo", timeout=3 if case == "frozen" else 120)
    torch.set_num_threads(1)
    dual, x = setup()
    start = time.monotonic()
    if case == "nan":
        x[7, 2] = float("nan")  # global example 7: rank 1's example 2
    elif rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen: answers no collective
    try:
        dist.rank(dist.features(dual, x), by="contribution")
        seen = {"type": None, "message": ""}
    except Exception as e:
        seen = {"type": type(e).__name__, "message": str(e)}
    (out / f"rank{rank}.json").write_text(json.dumps({**seen, "seconds": time.monotonic() - start}))
    if case == "nan":  # every rank took part in the error's collectives: the group is whole, close it cleanly
        td.destroy_process_group()  # (left to the interpreter's exit, gloo's threads may abort the process)


def _worker(out: Path) -> None:
    dist.init("gloo")
    torch.set_num_threads(1)
    dual, x = setup()
    torch.save(results(dual, x, out), out / f"rank{dist.world()[0]}.pt")
    td.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "--case":
        _case(sys.argv[2], Path(sys.argv[3]))
    else:
        _worker(Path(sys.argv[1]))
