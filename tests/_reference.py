"""Reference per-example derivatives by plain autograd, one example and one readout component at a time.

Slow and obviously correct: the factored features are checked against these. Parameters are set on the
model in place (no functional swapping), so the reference shares no machinery with efffeat.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn


@contextmanager
def _with(model: nn.Module, params: dict[str, Tensor]) -> Iterator[list[Tensor]]:
    """The model with its parameters' values set to `params` in place (restored afterwards)."""
    leaves = [p for _, p in model.named_parameters()]
    saved = [p.detach().clone() for p in leaves]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    try:
        yield leaves
    finally:
        with torch.no_grad():
            for p, s in zip(leaves, saved):
                p.copy_(s)


def _rows(model, params, x, readout, fn) -> Tensor:
    with _with(model, params) as leaves:
        rows = []
        for n in range(x.shape[0]):
            r = readout(model(x[n : n + 1]))[0]
            rows.append(torch.stack([fn(r[k], leaves) for k in range(r.shape[0])]))
    return torch.stack(rows).detach()


def _flat(grads, leaves) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, leaves)])


def jacobian(model: nn.Module, params: dict[str, Tensor], x: Tensor, readout) -> Tensor:
    """``[N, K, P]`` per-example gradients, P in named_parameters order, row-major."""

    def grad(r, leaves):
        return _flat(torch.autograd.grad(r, leaves, retain_graph=True, allow_unused=True), leaves)

    return _rows(model, params, x, readout, grad)


def hvp_rows(model: nn.Module, params: dict[str, Tensor], delta: dict[str, Tensor], x: Tensor, readout) -> Tensor:
    """``[N, K, P]``: ψ(x) Δθ per example by double backward (Hessian-vector product of each readout entry)."""
    d = list(delta.values())

    def hvp(r, leaves):
        g = torch.autograd.grad(r, leaves, create_graph=True, retain_graph=True, allow_unused=True)
        dot = sum((gi * di).sum() for gi, di in zip(g, d) if gi is not None)
        if not isinstance(dot, Tensor) or not dot.requires_grad:
            return torch.zeros(sum(p.numel() for p in leaves), dtype=r.dtype)
        return _flat(torch.autograd.grad(dot, leaves, retain_graph=True, allow_unused=True), leaves)

    return _rows(model, params, x, readout, hvp)


def reference_features(model, theta0, theta1, x, readout, order: str, nodes: int = 4) -> Tensor:
    """``[N, K, P]`` effective features of `order` by plain autograd."""
    delta = {k: theta1[k] - theta0[k] for k in theta0}
    if order == "init":
        return jacobian(model, theta0, x, readout)
    if order == "trained":
        return jacobian(model, theta1, x, readout)
    if order == "nlo":
        return jacobian(model, theta0, x, readout) + 0.5 * hvp_rows(model, theta0, delta, x, readout)
    t, w = np.polynomial.legendre.leggauss(nodes)
    return sum(
        float(wi / 2) * jacobian(model, {k: theta0[k] + float((ti + 1) / 2) * delta[k] for k in theta0}, x, readout)
        for ti, wi in zip(t, w)
    )


def rel_err(a: Tensor, b: Tensor) -> float:
    scale = max(float(b.norm()), 1e-300)
    return float((a - b).norm()) / scale
