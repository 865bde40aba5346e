"""Benchmarks of efffeat against its peers, side by side in one run.

    python scripts/bench.py kernel      # the kernel vs torch.func Jacobian contraction / per-example autograd
    python scripts/bench.py rank        # ranking every weight of a ~1M-parameter MLP over 10k inputs
    python scripts/bench.py search      # streaming max-activation search vs a plain forward+backward pass
    python scripts/bench.py scale       # features and kernels for N up to 100k examples
    python scripts/bench.py peers       # Opacus, BackPACK, torch.func, neural-tangents side by side (bench extra)
    python scripts/bench.py real_models # a CNN, a TransformerEncoder, a GRU and a MiniLM-shaped BERT vs fwd+bwd
    python scripts/bench.py all         # kernel, rank, search, scale and real_models

Each prints a markdown table (the one recorded in docs/BENCHMARKS.md) with the machine it ran on.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from pathlib import Path

import torch

NAMES = ("kernel", "rank", "search", "scale", "peers", "real_models")
ALL = ("kernel", "rank", "search", "scale", "real_models")


def machine() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, Python {platform.python_version()}, load average {load}"
    )


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in (*NAMES, "all"):
        print(__doc__)
        raise SystemExit(2)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(f"machine: {machine()}\n")
    for name in ALL if argv[0] == "all" else (argv[0],):
        importlib.import_module(f"benchmarks.{name}").main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
