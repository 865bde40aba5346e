"""Width scaling: how far the theory's predictions and the dual models are from actually trained networks.

    python scripts/validate_scaling.py --quick   # CI: tanh, 1 hidden layer, widths 64–512, T = 150, k = 1, 3; asserts
    python scripts/validate_scaling.py           # full: tanh/ReLU × 1/2 hidden layers, widths 64–2048, 4 seeds, T = 500
    python scripts/validate_scaling.py --archs tanh-2 --widths 64 128 256 512    # any part of it

The measured tables are in docs/validation/scaling.md.

Setting (docs/validation/scaling.md): an MLP in NTK parameterisation (`ef.theory.ntk_mlp`), float64, a fixed regression
task (d = 4, 8 training and 4 test points, y = sin(2 x·u / √d)), full-batch gradient descent on ½ Σ (z − y)² with
η = 1/λ_max of the network's own initial NTK, T steps. Per width and seed, against the trained network on all
12 points (rms error of the outputs, which are O(1)):

- LO: `ef.theory.kernel_gd` with the network's own initial NTK;
- NLO-dNTK: `ef.theory.nlo_predict` (LO plus the dNTK correction);
- Taylor k: `ef.theory.taylorized_train` of order k = 1, 2, 3 with the same optimizer and steps;

and the completeness of the dual model of each order (`init`, `nlo`, `trained`, `path`) on all 12 points, the
relative change of the NTK over training and the rms of the dNTK. Seed means are fitted by log–log slopes with
bootstrap (over seeds) 95% intervals. Prints markdown tables and writes a plotly figure to --out.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import efffeat as ef
from efffeat import theory

ARCHS = {"tanh-1": ("tanh", 1), "tanh-2": ("tanh", 2), "relu-1": ("relu", 1), "relu-2": ("relu", 2)}
ERRORS = ("LO", "NLO-dNTK", "Taylor k=1", "Taylor k=2", "Taylor k=3")
COMPLETENESS = tuple(f"compl. {o}" for o in ef.ORDERS)
KERNEL = ("NTK change", "dNTK rms")
METRICS = ERRORS + COMPLETENESS + KERNEL
FULL = {"archs": list(ARCHS), "widths": [64, 128, 256, 512, 1024, 2048], "seeds": 4, "steps": 500}
QUICK = {"archs": ["tanh-1"], "widths": [64, 128, 256, 512], "seeds": 4, "steps": 150, "orders": [1, 3]}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "validation" / "scaling.html"
N_TRAIN, N_TEST, D_IN = 8, 4, 4


def task(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed regression task: ``x_train [8, 4]``, ``y_train [8]``, ``x_test [4, 4]``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_TEST, D_IN, generator=gen, dtype=torch.float64)
    u = torch.randn(D_IN, generator=gen, dtype=torch.float64)
    y = torch.sin(x @ u / math.sqrt(D_IN) * 2)
    return x[:N_TRAIN].to(dtype), y[:N_TRAIN].to(dtype), x[N_TRAIN:].to(dtype)


def half_sq(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The summed loss ½ Σ (z − y)² of a ``[N, 1]`` output and ``[N]`` targets."""
    return 0.5 * (z[:, 0] - y).square().sum()


def rms_err(pred: torch.Tensor, z_nn: torch.Tensor) -> float:
    return float((pred - z_nn).square().mean().sqrt())


def run_one(arch: str, width: int, seed: int, steps: int, orders: list[int]) -> dict[str, float]:
    """Every metric for one network (errors of the predictors, completeness of the dual orders, kernel drift)."""
    activation, depth = ARCHS[arch]
    x_train, y, x_test = task()
    x_all = torch.cat([x_train, x_test])
    model = theory.ntk_mlp(D_IN, width, depth, activation=activation, seed=seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    feats0 = ef.DualModel(model, init, readout=0, order="init", progress=False).features(x_all)
    h0, z0 = feats0.kernel(), feats0.z_init[:, 0]  # [12, 12], [12]
    k_train, k_test = h0[:N_TRAIN, :N_TRAIN], h0[N_TRAIN:, :N_TRAIN]
    lr = 1 / float(torch.linalg.eigvalsh(k_train).max())

    def sgd(params):
        return torch.optim.SGD(params, lr=lr)

    trained = copy.deepcopy(model)
    opt = sgd(trained.parameters())
    for _ in range(steps):
        opt.zero_grad()
        half_sq(trained(x_train), y).backward()
        opt.step()
    with torch.no_grad():
        z_nn = trained(x_all)[:, 0]
    out: dict[str, float] = {}
    lo = theory.kernel_gd(k_train, k_test, y, z0[:N_TRAIN], z0[N_TRAIN:], lr, steps)
    out["LO"] = rms_err(torch.cat(lo), z_nn)
    dh = theory.dntk(model, init, x_all, x_train, readout=0, progress=False)
    nlo = theory.nlo_predict(k_train, k_test, dh, y, z0[:N_TRAIN], z0[N_TRAIN:], lr, steps)
    out["NLO-dNTK"] = rms_err(torch.cat(nlo), z_nn)
    out["dNTK rms"] = float(dh.square().mean().sqrt())
    for k in orders:
        taylor = theory.taylorized_train(model, init, k, (x_train, y), half_sq, sgd, steps, progress=False)
        out[f"Taylor k={k}"] = rms_err(taylor.predict(x_all)[:, 0], z_nn)
    dual = ef.DualModel(trained, init, readout=0, progress=False)
    for order in ef.ORDERS:
        out[f"compl. {order}"] = dual.completeness(x_all, order=order)
    h1 = dual.features(x_all, order="trained").kernel()
    out["NTK change"] = float((h1 - h0).norm() / h0.norm())
    return out


def slope(widths: list[int], values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Log–log slope of the seed mean of ``values [seeds, widths]`` and its bootstrap (over seeds) 95% interval."""
    logw = np.log(np.asarray(widths, dtype=float))

    def fit(v: np.ndarray) -> float:
        return float(np.polyfit(logw, np.log(v.mean(axis=0)), 1)[0])

    rng = np.random.default_rng(seed)
    boots = [fit(values[rng.integers(0, values.shape[0], values.shape[0])]) for _ in range(n_boot)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return fit(values), float(lo), float(hi)


def sweep(archs: list[str], widths: list[int], seeds: int, steps: int, orders: list[int], progress: bool) -> dict:
    """``{arch: {metric: array [seeds, widths]}}`` (NaN where a metric was not computed)."""
    from tqdm.auto import tqdm

    results = {a: {m: np.full((seeds, len(widths)), np.nan) for m in METRICS} for a in archs}
    jobs = [(a, wi, s) for a in archs for wi in range(len(widths)) for s in range(seeds)]
    for arch, wi, s in tqdm(jobs, desc="networks", disable=None if progress else True):
        for metric, value in run_one(arch, widths[wi], s, steps, orders).items():
            results[arch][metric][s, wi] = value
    return results


def tables(results: dict, widths: list[int]) -> tuple[str, dict]:
    """Markdown tables (seed means, then the fitted slope with its interval) and ``{arch: {metric: slope triple}}``."""
    lines, slopes = [], {}
    for arch, metrics in results.items():
        shown = [m for m in METRICS if not np.isnan(metrics[m]).all()]
        slopes[arch] = {m: slope(widths, metrics[m]) for m in shown}
        lines += [f"\n**{arch}** (activation, hidden layers); seed means\n"]
        lines += ["| width | " + " | ".join(shown) + " |", "|---:|" + "---:|" * len(shown)]
        for wi, w in enumerate(widths):
            lines.append(f"| {w} | " + " | ".join(f"{metrics[m][:, wi].mean():.3g}" for m in shown) + " |")
        lines.append(
            "| slope | " + " | ".join(f"{s:.2f} [{lo:.2f}, {hi:.2f}]" for s, lo, hi in slopes[arch].values()) + " |"
        )
    return "\n".join(lines), slopes


def figure(results: dict, widths: list[int], path: Path) -> None:
    """Log–log plot of every error and completeness against width, one panel per architecture."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    archs = list(results)
    fig = make_subplots(rows=1, cols=len(archs), subplot_titles=archs, shared_yaxes=True)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
    for col, arch in enumerate(archs, start=1):
        for i, metric in enumerate(ERRORS + COMPLETENESS):
            values = results[arch][metric]
            if np.isnan(values).all():
                continue
            fig.add_trace(
                go.Scatter(
                    x=widths,
                    y=values.mean(axis=0),
                    error_y={"type": "data", "array": values.std(axis=0)},
                    name=metric,
                    legendgroup=metric,
                    showlegend=col == 1,
                    line={"color": palette[i % len(palette)], "dash": "dot" if metric in COMPLETENESS else "solid"},
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(type="log", title_text="width", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col)
    fig.update_yaxes(title_text="rms error vs the trained network; completeness", row=1, col=1)
    fig.update_layout(title="Theory vs trained networks (NTK parameterisation, full-batch GD)", height=520)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs="cdn")


def check_robust_facts(results: dict, widths: list[int], slopes: dict) -> list[str]:
    """The facts asserted in --quick: LO slope in [−1.3, −0.7]; Taylor k=3 beats k=1 at every width ≥ 256."""
    failures = []
    for arch, metrics in results.items():
        s = slopes[arch]["LO"][0]
        if not -1.3 <= s <= -0.7:
            failures.append(f"{arch}: LO error slope {s:.2f} is outside [-1.3, -0.7]")
        for wi, w in enumerate(widths):
            k1, k3 = metrics["Taylor k=1"][:, wi].mean(), metrics["Taylor k=3"][:, wi].mean()
            if w >= 256 and not np.isnan(k1 + k3) and not k3 < k1:
                failures.append(f"{arch}, width {w}: Taylor k=3 error {k3:.3g} is not below k=1 error {k1:.3g}")
    return failures


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep, print the tables, write the figure; with --quick, raise AssertionError if a robust fact fails."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI settings: " + str(QUICK))
    parser.add_argument("--archs", nargs="+", choices=list(ARCHS))
    parser.add_argument("--widths", nargs="+", type=int)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--orders", nargs="+", type=int, default=None, help="Taylorized orders (default 1 2 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="plotly HTML figure")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the networks are tiny: 1 is fastest)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    settings.setdefault("orders", [1, 2, 3])
    for key in ("archs", "widths", "seeds", "steps", "orders"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    widths = sorted(settings["widths"])
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        results = sweep(
            settings["archs"], widths, settings["seeds"], settings["steps"], settings["orders"], not args.no_progress
        )
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - started
    text, slopes = tables(results, widths)
    print(
        f"widths {widths}, {settings['seeds']} seeds, T = {settings['steps']}, Taylorized orders "
        f"{settings['orders']}; {elapsed:.0f} s on {args.threads} torch thread(s)"
    )
    print(text)
    figure(results, widths, args.out)
    print(f"\nfigure: {args.out}")
    failures = check_robust_facts(results, widths, slopes) if args.quick else []
    if failures:
        raise AssertionError("; ".join(failures))
    return {"results": results, "slopes": slopes, "widths": widths, "seconds": elapsed}


if __name__ == "__main__":
    main(sys.argv[1:])
