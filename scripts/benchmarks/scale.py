"""Features, a ranking reduction and kernels of a small MLP (32-64-64-1, tanh, order "nlo") for N up to 100k.

Each N runs in fresh subprocesses so peak RSS (``ru_maxrss``) is their own: one for ``dual.features``
(the factored store), ``ef.rank(by="contribution", group="neuron")`` plus one ``rmatvec`` (the sums a
distributed run all-reduces) and the in-memory kernel ``feats.kernel()``, peaks cumulative in that order; one
for the kernel written in blocks of rows to a ``.npy`` file (``efffeat.distributed.kernel_to_disk``,
features included), whose memory is bounded by one block.

    python scripts/bench.py scale [--n 1000 10000 100000] [--kernel-max 10000] [--disk-max 10000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(n: int):
    import torch
    from torch import nn

    import efffeat as ef

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # θ* a seeded step from θ0 (timings do not depend on training)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(n, 32)
    dual = ef.DualModel(model, init, readout=0, order="nlo", progress=False)
    dual.features(x[:8])  # warm-up: the first forward-mode pass imports part of torch
    return dual, x


def measure(n: int, kernel: bool) -> dict:
    """Features, ranking and (optionally) the in-memory kernel; timings (s), peak RSS (MiB), sizes (MiB)."""
    import torch

    from efffeat.ranking import rank

    dual, x = _setup(n)
    out: dict = {"N": n, "P": dual.n_features, "rss_start": _peak_mib()}
    t = time.perf_counter()
    feats = dual.features(x, batch_size=4096)
    out["features_s"] = time.perf_counter() - t
    out["rss_features"] = _peak_mib()
    out["store_mib"] = sum(f.nbytes for f in feats.factors.values()) / 2**20
    t = time.perf_counter()
    table = rank(feats, by="contribution", group="neuron")
    feats.rmatvec(torch.ones(n))
    out["rank_s"] = time.perf_counter() - t
    out["rss_rank"] = _peak_mib()
    assert len(table) == 64 + 64 + 1
    if kernel:
        t = time.perf_counter()
        feats.kernel()
        out["kernel_s"] = time.perf_counter() - t
        out["rss_kernel"] = _peak_mib()
    return out


def measure_disk(n: int) -> dict:
    """The kernel written to disk in blocks of 1024 rows, features included, in a process of its own."""
    from efffeat.distributed import kernel_to_disk

    dual, x = _setup(n)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        on_disk = kernel_to_disk(dual, x, Path(tmp) / "kernel.npy", block=1024, batch_size=4096)
        return {"disk_s": time.perf_counter() - t, "disk_mib": on_disk.nbytes / 2**20, "rss_disk": _peak_mib()}


def _child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"scale.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "—"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py scale", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--kernel-max", type=int, default=10000, help="largest N for the in-memory kernel")
    parser.add_argument("--disk-max", type=int, default=10000, help="largest N for the kernel on disk")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--disk", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        result = measure_disk(args.one) if args.disk else measure(args.one, args.one <= args.kernel_max)
        print(json.dumps(result))
        return
    rows = []
    for n in args.n:
        row = _child("--one", str(n), "--kernel-max", str(args.kernel_max))
        if n <= args.disk_max:
            row.update(_child("--one", str(n), "--disk"))
        rows.append(row)
    print(f"Small MLP 32-64-64-1 (P = {rows[0]['P']:,}), order 'nlo', scalar readout, float32. Peak RSS in MiB;")
    print(f"a process starts at ~{rows[0]['rss_start']:.0f} MiB (torch and efffeat imported, warmed up).\n")
    print(
        "| N | features (s) | factored store (MiB) | peak RSS | rank + rmatvec (s) | peak RSS "
        "| kernel in memory (s) | peak RSS | kernel → memmap (s) | file (MiB) | peak RSS |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['N']:,} | {r['features_s']:.2f} | {r['store_mib']:.1f} | {r['rss_features']:.0f} "
            f"| {r['rank_s']:.3f} | {r['rss_rank']:.0f} | {_cell(r, 'kernel_s', '.2f')} "
            f"| {_cell(r, 'rss_kernel', '.0f')} | {_cell(r, 'disk_s', '.2f')} | {_cell(r, 'disk_mib', '.0f')} "
            f"| {_cell(r, 'rss_disk', '.0f')} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
