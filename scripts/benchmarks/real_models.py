"""Bring your own model: what features cost on convolutional, attention and recurrent networks, against a plain
forward and backward pass over the same batches, and the kernel against `torch.func` Jacobian contraction.

    python scripts/bench.py real_models [--repeat 3] [--no-minilm]

1. The digits CNN (Conv2d 1→16→32, 3×3, MaxPool, Linear 128→10; all 1797 scikit-learn digits, readout = logit 0):
   features at every order against a plain forward+backward; the order-``init`` kernel against ``vmap(jacrev)``
   then ``J Jᵀ`` at the same θ0.
2. ``nn.TransformerEncoder`` (batch_first, d_model 64, 4 heads, 2 layers, T=16, key padding mask), N=512, every
   order, and the floor of ``nlo``: the plain pass carrying the tangent Δθ.
3. ``nn.GRU`` (8→32, T=20), N=256, every order: factored step by step.
4. The capture of a 64-512-512-512-1 tanh MLP at N=512.
5. A MiniLM-L6-shaped BERT (22.6M parameters), N=256 sequences of 16 tokens: one ``ef.rank`` of every parameter
   against the lean capture it ranks (``dual.features(tokens, need="features")``).

Features rows time ``dual.features(x)`` (``need="all"``: with the readouts at θ0 and θ* that completeness needs)
and, for every order, the lean ``need="features"`` a ranking or search runs. The floor rows time what any exact
route must do: for the CNN's kernel one Gram of its convolutions' per-example gradients, for the BERT's ranking
the per-example gradients of its 16-position layers and the sort.

float32, one torch thread. Times are the process's CPU time (with one thread, robust to other load on the
machine), the best of ``--repeat`` runs; ratios are within one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import efffeat as ef
from efffeat.factors import LowRankFactor


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.process_time()
        out = fn()
        best = min(best, time.process_time() - start)
    return best, out


def _perturbed(model: nn.Module, step: float) -> dict[str, torch.Tensor]:
    init = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(step * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return init


def _plain(model: nn.Module, batches: list[Any], readout: Callable[[Any], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for batch in batches:
            model.zero_grad()
            readout(model(batch)).sum().backward()

    return run


def _feature_rows(
    case: str, model: nn.Module, init: dict, x: Any, readout: Any, plain_s: float, orders: tuple, repeat: int
) -> list[dict]:
    rows = []
    for order, need in [(order, "all") for order in orders] + [(order, "features") for order in orders]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ef.FallbackWarning)
            warnings.simplefilter("ignore", ef.CompletenessWarning)
            dual = ef.DualModel(model, init, readout=readout, order=order, nodes=2, progress=False)
            t, _ = _timed(lambda dual=dual, need=need: dual.features(x, batch_size=256, need=need), repeat)
        fallback = [w for w in caught if issubclass(w.category, ef.FallbackWarning)]
        route = "fallback (loop)" if any("one example at a time" in str(w.message) for w in fallback) else "factored"
        route = "fallback (vmap)" if route == "factored" and fallback else route
        what = f"features ({order})" if need == "all" else f"features ({order}, need='features')"
        rows.append({"case": case, "what": what, "route": route, "s": t, "ratio": t / plain_s})
    return rows


def digits_cnn(repeat: int) -> list[dict]:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    images, _ = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    n = len(x)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 10),
    ).eval()
    init = _perturbed(model, 0.01)
    case = f"digits CNN, N={n}"
    plain_s, _ = _timed(_plain(model, list(x.split(256)), lambda out: out[:, 0]), repeat)
    rows = [{"case": case, "what": "plain forward+backward", "route": "-", "s": plain_s, "ratio": 1.0}]
    rows += _feature_rows(case, model, init, x, 0, plain_s, ("init", "nlo", "trained", "path"), repeat)
    theta0 = {name: init[name] for name, _ in model.named_parameters()}

    def jacobian_contraction() -> torch.Tensor:
        def f(p: dict, xi: torch.Tensor) -> torch.Tensor:
            return functional_call(model, p, (xi[None],))[0, 0]

        jac = vmap(jacrev(f), in_dims=(None, 0))(theta0, x)
        flat = torch.cat([j.reshape(n, -1) for j in jac.values()], dim=1)
        return flat @ flat.T

    peer_s, k_peer = _timed(jacobian_contraction, repeat)
    dual = ef.DualModel(model, init, readout=0, order="init", progress=False)
    kernel_s, k_ef = _timed(lambda: dual.features(x, batch_size=256).kernel(), repeat)
    rel = float((k_ef - k_peer).norm() / k_peer.norm())
    rows.append(
        {"case": case, "what": "torch.func vmap(jacrev) J Jᵀ", "route": "-", "s": peer_s, "ratio": peer_s / plain_s}
    )
    # The floor of any exact kernel: the Gram of the convolutions' per-example gradients (their 16 and 64 positions
    # make the position-pair route dearer than forming them), one [N, P_conv] matmul; the peer's J Jᵀ alone.
    p_conv = sum(p.numel() for m in model if isinstance(m, nn.Conv2d) for p in m.parameters())
    for what, width in (
        ("J Jᵀ alone (the peer's contraction)", sum(p.numel() for p in model.parameters())),
        (f"floor: one [N, {p_conv:,}] Gram (the convolutions' per-example gradients)", p_conv),
    ):
        j = torch.randn(n, width)
        t, _ = _timed(lambda j=j: j @ j.T, repeat)
        rows.append(
            {
                "case": case,
                "what": f"{what}: {peer_s / t:.1f}× faster than torch.func",
                "route": "-",
                "s": t,
                "ratio": t / plain_s,
            }
        )
    rows.append(
        {
            "case": case,
            "what": f"features(x).kernel() (init): {peer_s / kernel_s:.1f}× faster than torch.func, diff {rel:.1e}",
            "route": "factored",
            "s": kernel_s,
            "ratio": kernel_s / plain_s,
        }
    )
    return rows


def transformer_encoder(repeat: int, n: int = 512) -> list[dict]:
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(64, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pad = x.abs().sum(-1) == 0
            h = self.enc(x, src_key_padding_mask=pad)
            keep = (~pad).to(h.dtype)[..., None]
            return self.head((h * keep).sum(1) / keep.sum(1))[:, 0]

    model = Encoder().eval()
    init = _perturbed(model, 0.01)
    x = torch.randn(n, 16, 64)
    lengths = torch.randint(8, 17, (n,), generator=torch.Generator().manual_seed(1))
    x[torch.arange(16)[None, :] >= lengths[:, None]] = 0
    case = f"nn.TransformerEncoder d=64 T=16, N={n}"
    plain_s, _ = _timed(_plain(model, list(x.split(256)), lambda out: out), repeat)
    rows = [{"case": case, "what": "plain forward+backward", "route": "-", "s": plain_s, "ratio": 1.0}]
    rows += _feature_rows(case, model, init, x, "output", plain_s, ("init", "nlo", "trained", "path"), repeat)
    from benchmarks.search import tangent_pass

    delta = {name: p.detach() - init[name] for name, p in model.named_parameters()}
    tangent_s, _ = _timed(tangent_pass(model, delta, list(x.split(256)), lambda out, batch: out), repeat)
    what = "floor of nlo: forward+backward with the tangent Δθ on the parameters (no hooks, no factors)"
    return rows + [{"case": case, "what": what, "route": "-", "s": tangent_s, "ratio": tangent_s / plain_s}]


def gru(repeat: int, n: int = 256) -> list[dict]:
    torch.manual_seed(0)

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(8, 32, batch_first=True)
            self.out = nn.Linear(32, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(x)[0][:, -1])[:, 0]

    model = Recurrent().eval()
    init = _perturbed(model, 0.01)
    x = torch.randn(n, 20, 8)
    case = f"nn.GRU 8→32 T=20, N={n}"
    plain_s, _ = _timed(_plain(model, [x], lambda out: out), repeat)
    rows = [{"case": case, "what": "plain forward+backward", "route": "-", "s": plain_s, "ratio": 1.0}]
    return rows + _feature_rows(case, model, init, x, "output", plain_s, ("init", "nlo", "trained", "path"), repeat)


def mlp_capture(repeat: int, n: int = 512) -> list[dict]:
    from efffeat.capture import capture_batch, hooked_layers

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, 512), nn.Tanh()]
    layers += [nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 1)]
    model = nn.Sequential(*layers)
    init = _perturbed(model, 0.01)
    x = torch.randn(n, 64)
    case = f"MLP 64-512x3-1 tanh, N={n}"
    plain_s, _ = _timed(_plain(model, [x], lambda out: out), repeat * 5)
    dual = ef.DualModel(model, init, readout="output", order="init", progress=False)
    hooked = hooked_layers(model, set())
    rows = [{"case": case, "what": "plain forward+backward", "route": "-", "s": plain_s, "ratio": 1.0}]
    for order, tangent in (("init", None), ("nlo", dual.delta)):
        t, _ = _timed(
            lambda t=tangent: capture_batch(dual.swap, hooked, dual.theta_init, x, dual.readout, t), repeat * 5
        )
        rows.append({"case": case, "what": f"capture ({order})", "route": "factored", "s": t, "ratio": t / plain_s})
    return rows


def minilm(repeat: int, n: int = 256) -> list[dict]:
    from benchmarks.peers import minilm_times

    t_cap, t_rank, p, feats = minilm_times(n, repeat, clock=time.process_time)
    case = f"MiniLM-L6-shaped BERT (P = {p:,}), N={n}, T=16"
    # What exact scores cannot avoid: every per-example gradient of the 16-position layers (Σ_t δ_t a_tᵀ) formed
    # once, and its square summed over the examples; then the sort of P scores.
    seq = [f for f in feats.factors.values() if isinstance(f, LowRankFactor) and f.rank > 1]

    def gradients(square: bool) -> None:
        for f in seq:
            out = torch.zeros(f.shape)
            for start in range(0, f.n_examples, 8):
                g = torch.matmul(f.u[start : start + 8].transpose(-1, -2), f.v[start : start + 8])
                if square:
                    for one in g.reshape(-1, *f.shape):
                        out.addcmul_(one, one)

    t_grad, _ = _timed(lambda: gradients(False), repeat)
    t_sq, _ = _timed(lambda: gradients(True), repeat)
    t_sort, _ = _timed(lambda: torch.sort(torch.rand(p), descending=True, stable=True), repeat)
    p_seq = sum(f.numel for f in seq)
    return [
        {"case": case, "what": "features (trained, need='features')", "route": "factored", "s": t_cap, "ratio": 1.0},
        {
            "case": case,
            "what": "ef.rank, every parameter (× the capture)",
            "route": "factored",
            "s": t_rank,
            "ratio": t_rank / t_cap,
        },
        {
            "case": case,
            "what": f"floor: the per-example gradients of the {p_seq:,} sequence-layer weights, formed",
            "route": "-",
            "s": t_grad,
            "ratio": t_grad / t_cap,
        },
        {
            "case": case,
            "what": "floor: the same, squared and summed over the examples",
            "route": "-",
            "s": t_sq,
            "ratio": t_sq / t_cap,
        },
        {
            "case": case,
            "what": f"torch.sort of {p:,} scores (stable)",
            "route": "-",
            "s": t_sort,
            "ratio": t_sort / t_cap,
        },
    ]


def table(rows: list[dict]) -> str:
    lines = ["| case | what | route | time (s) | × plain |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['what']} | {r['route']} | {r['s']:.3f} | {r['ratio']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="real_models.py")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-minilm", action="store_true", help="leave out the BERT row (a minute)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load}; "
        f"1 torch thread, torch {torch.__version__}\n"
    )
    rows = digits_cnn(args.repeat) + transformer_encoder(args.repeat) + gru(args.repeat) + mlp_capture(args.repeat)
    rows += [] if args.no_minilm else minilm(args.repeat)
    print("## bring your own model: features against a plain forward+backward over the same batches (float32)\n")
    print(table(rows))
    print(
        "\n× plain = time / the plain forward+backward of the same case (for the BERT rank row: / the capture); "
        "CPU time, best of the repeats."
    )


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
