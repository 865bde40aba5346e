"""``dual.features(x).kernel()`` (factored, from hooks) against the peers that build the per-example Jacobian.

1. A 3-hidden-layer tanh MLP (d_in 64, width 512, scalar output), N = 512, float32: efffeat's kernel against
   `torch.func` Jacobian contraction (``vmap(jacrev)`` then ``J Jᵀ``), the empirical NTK both ways.
2. A 1-layer mod-add-shaped TransformerBridge (d_model 128, 4 heads, d_mlp 512, vocab 114, n_ctx 3),
   N = 1024, readout = the logit of the correct answer: efffeat against a per-example autograd loop.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import efffeat as ef


def _timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def mlp_case(n: int, width: int, repeat: int) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, 1),
    )
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(n, 64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def jacobian_contraction():
        def f(p, xi):
            return functional_call(model, p, (xi[None],))[0, 0]

        jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
        flat = torch.cat([j.reshape(n, -1) for j in jac.values()], dim=1)
        return flat @ flat.T

    t_peer, k_peer = _timed(jacobian_contraction, repeat)
    rows = []
    for order in ("trained", "nlo"):
        dual = ef.DualModel(model, init, readout=0, order=order, progress=False)
        t_ef, k_ef = _timed(lambda dual=dual: dual.features(x, batch_size=n).kernel(), repeat)
        row = {
            "case": f"MLP 64-{width}x3-1, N={n}",
            "order": order,
            "efffeat_s": t_ef,
            "peer": "torch.func vmap(jacrev) J Jᵀ",
            "peer_s": t_peer,
            "speedup": t_peer / t_ef,
        }
        row["rel_diff"] = _rel(k_ef, k_peer) if order == "trained" else float("nan")
        rows.append(row)
    return rows


def bridge_case(n: int, repeat: int) -> list[dict]:
    from benchmarks.peers import bridge_model, correct_logit

    model, init, p = bridge_model()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, p, (n,), generator=g), torch.randint(0, p, (n,), generator=g)
    x = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    y = (a + b) % p

    def autograd_loop():
        params = list(model.parameters())
        rows = []
        for i in range(n):
            r = correct_logit(model(x[i : i + 1]), (x[i : i + 1], y[i : i + 1]))[0]
            rows.append(torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(r, params)]))
        jac = torch.stack(rows)
        return jac @ jac.T

    t_peer, k_peer = _timed(autograd_loop, 1)
    rows = []
    for order in ("trained", "nlo"):
        dual = ef.DualModel(model, init, readout=correct_logit, order=order, progress=False)
        t_ef, k_ef = _timed(lambda dual=dual: dual.features((x, y), batch_size=256).kernel(), repeat)
        rows.append(
            {
                "case": f"TransformerBridge mod-add p={p}, N={n}",
                "order": order,
                "efffeat_s": t_ef,
                "peer": "per-example autograd loop",
                "peer_s": t_peer,
                "speedup": t_peer / t_ef,
                "rel_diff": _rel(k_ef, k_peer) if order == "trained" else float("nan"),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | order | efffeat (s) | peer | peer (s) | speed-up | rel. diff |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['order']} | {r['efffeat_s']:.3f} | {r['peer']} | {r['peer_s']:.2f} | "
            f"{r['speedup']:.0f}× | {r['rel_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py kernel")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--n-bridge", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    rows = mlp_case(args.n, args.width, args.repeat) + bridge_case(args.n_bridge, args.repeat)
    print("## kernel: efffeat's factored kernel vs Jacobian-based peers (float32, CPU)\n")
    print(table(rows))
    print(
        "\n(speed-up = peer time / efffeat time, both in the same run; rel. diff = ‖K_efffeat − K_peer‖/‖K_peer‖;"
        " the nlo kernel has no peer and is timed against the same first-order peer.)"
    )
