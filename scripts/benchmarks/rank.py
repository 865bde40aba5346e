"""Rank every weight of a ~1M-parameter MLP (512-1024-512-10) over 10,000 inputs.

Each configuration runs in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own. Capture
(``dual.features(x, need="features")``) and ranking (``ef.rank``) are timed separately; the dense feature
matrix the ranking avoids is sized for comparison.

    python scripts/bench.py rank [--n 10000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [
    {"readout": 0, "order": "init"},
    {"readout": 0, "order": "nlo"},
    {"readout": "output", "order": "init"},
]


def measure(n: int, readout: int | str, order: str) -> dict:
    """Build the model, capture features, rank; return timings (s) and peak RSS (MiB)."""
    import torch
    from torch import nn

    import efffeat as ef
    from efffeat.ranking import rank

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # θ* a small seeded step from θ0 (the timing does not depend on training)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(n, 512)
    dual = ef.DualModel(model, init, readout=readout, order=order, progress=False)
    rss_before = _peak_mib()
    t0 = time.perf_counter()
    feats = dual.features(x, batch_size=1000, need="features")  # the readouts ranking does not need skipped
    t1 = time.perf_counter()
    rss_capture = _peak_mib()
    table = rank(feats, by="contribution", group="param")
    t2 = time.perf_counter()
    neurons = rank(feats, by="contribution", group="neuron")
    t3 = time.perf_counter()
    net = rank(feats, by="net_contribution", group="neuron")  # per-example gradients formed block by block
    t4 = time.perf_counter()
    assert len(table) == dual.n_features and len(neurons) == len(net) == 1024 + 512 + 10
    return {
        "P": dual.n_features,
        "K": feats.n_outputs,
        "capture_s": t1 - t0,
        "rank_s": t2 - t1,
        "rank_neuron_s": t3 - t2,
        "net_neuron_s": t4 - t3,
        "rss_start_mib": rss_before,
        "rss_capture_mib": rss_capture,
        "rss_peak_mib": _peak_mib(),
        "dense_gib": n * feats.n_outputs * dual.n_features * 4 / 2**30,
    }


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py rank")
    parser.add_argument("--n", type=int, default=10_000, help="number of inputs")
    parser.add_argument("--quick", action="store_true", help="only the first configuration")
    args = parser.parse_args(argv)
    print(f"### rank: every weight of a 512-1024-512-10 MLP over {args.n:,} inputs (float32)\n")
    print(
        "| readout | order | P | capture (s) | rank all weights (s) | rank neurons (s) | net_contribution neurons (s) "
        "| peak RSS capture (MiB) | peak RSS total (MiB) | dense [N·K, P] would need |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config in CONFIGS[:1] if args.quick else CONFIGS:
        child = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps({"n": args.n, **config})]
        out = subprocess.run(child, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        readout = "scalar (output 0)" if config["readout"] == 0 else f"vector (K={r['K']})"
        print(
            f"| {readout} | {config['order']} | {r['P']:,} | {r['capture_s']:.1f} | {r['rank_s']:.2f} | "
            f"{r['rank_neuron_s']:.2f} | {r['net_neuron_s']:.2f} | {r['rss_capture_mib']:.0f} | "
            f"{r['rss_peak_mib']:.0f} | {r['dense_gib']:.0f} GiB |"
        )
    print("\nPeak RSS is the process's ru_maxrss (Python, torch and the model included), one fresh process per row.")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(measure(**json.loads(sys.argv[2]))))
    else:
        main(sys.argv[1:])
