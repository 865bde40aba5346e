"""Throughput of the streaming max-activation search against a plain forward+backward pass.

Both stream the same batches through the same model: the baseline computes the readout and backpropagates
it to the parameters (one ``loss.backward()`` per batch); `max_activating` computes each batch's effective
features and keeps the top-k of 16 single features and 4 neuron groups. For the ``nlo`` order a second baseline
carries the forward-mode tangent Δθ through the same forward and backward (forward-over-reverse, what the nlo
features need at least).

    python scripts/bench.py search [--n 4096] [--batch-size 512] [--repeat 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

import efffeat as ef
from efffeat._autodiff import autodiff_context
from efffeat.ranking import rank
from efffeat.search import max_activating

CONFIGS = [
    ("64-256-256-10", (64, 256, 256, 10), 0, "init"),
    ("64-256-256-10", (64, 256, 256, 10), 0, "nlo"),
    ("512-1024-512-10", (512, 1024, 512, 10), 0, "init"),
    ("512-1024-512-10", (512, 1024, 512, 10), 0, "nlo"),
    ("64-256-256-10", (64, 256, 256, 10), "output", "init"),
]


def _model(widths: tuple[int, ...]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, init


def _plain(model: nn.Module, dual: ef.DualModel, x: torch.Tensor, batch_size: int) -> float:
    """Seconds for forward + readout + backward to the parameters over every batch."""
    start = time.perf_counter()
    for xb in x.split(batch_size):
        model.zero_grad()
        dual.readout(model(xb), xb).sum().backward()
    return time.perf_counter() - start


def tangent_pass(
    model: nn.Module, delta: dict[str, torch.Tensor], batches: list, readout: Callable[[Any, Any], torch.Tensor]
) -> Callable[[], None]:
    """Forward + readout + backward to the parameters over every batch with the tangent Δθ carried along
    (forward-over-reverse: what the ``nlo`` features need at least), under the settings efffeat's passes use
    (math attention, no attention fast path, composite norms)."""

    def run() -> None:
        for batch in batches:
            with fwAD.dual_level(), autodiff_context(model, forward_ad=True):
                leaves = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
                params = {n: fwAD.make_dual(p, delta[n]) for n, p in leaves.items()}
                out = readout(functional_call(model, params, (batch,)), batch).sum()
                torch.autograd.grad(out, list(leaves.values()))

    return run


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py search")
    parser.add_argument("--n", type=int, default=4096, help="number of inputs")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"### search: max_activating vs a plain forward+backward pass, {args.n:,} inputs, batches of "
        f"{args.batch_size} (float32, {torch.get_num_threads()} torch threads)\n"
    )
    print(
        "| model | readout | order | features searched | plain fwd+bwd (ex/s) | max_activating (ex/s) | ratio "
        "| plain fwd+bwd with the tangent (ex/s) | ratio to it |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, widths, readout, order in CONFIGS:
        model, init = _model(widths)
        x = torch.randn(args.n, widths[0], generator=torch.Generator().manual_seed(1))
        dual = ef.DualModel(model, init, readout=readout, order=order, progress=False)
        table = rank(dual.features(x[:256]), by="contribution")
        specs = list(table.ids[:16]) + [f"0.weight[{i},:]" for i in range(4)]
        plain = search = jvp = float("inf")
        for _ in range(args.repeat):  # interleaved, best of `repeat`: robust to other load on the machine
            plain = min(plain, _plain(model, dual, x, args.batch_size))
            start = time.perf_counter()
            max_activating(dual, x, specs, k=16, batch_size=args.batch_size, progress=False)
            search = min(search, time.perf_counter() - start)
            if order == "nlo":
                start = time.perf_counter()
                tangent_pass(model, dual.delta, list(x.split(args.batch_size)), dual.readout)()
                jvp = min(jvp, time.perf_counter() - start)
        k_out = "scalar" if readout == 0 else f"vector (K={widths[-1]})"
        floor = f"{args.n / jvp:,.0f} | {jvp / search:.2f}×" if order == "nlo" else "— | —"
        print(
            f"| {name} | {k_out} | {order} | {len(specs)} | {args.n / plain:,.0f} | {args.n / search:,.0f} | "
            f"{plain / search:.2f}× | {floor} |"
        )
    print(
        "\nratio = max_activating throughput / plain forward+backward throughput (target ≥ 0.5× for a scalar "
        "readout, ≥ 0.3× for K = 10); ratio to it: against the forward+backward that carries the tangent."
    )
