"""Jobs that read only the factors and Δθ (ranking, per-example norms, search) run the lean capture: one forward
and one backward per batch and evaluation point, and no readout beyond the capture's own except on the first
batch's first examples, where the completeness residual is measured."""

from __future__ import annotations

import pytest
import torch
from _models import mlp, perturbed
from torch import nn

import efffeat as ef
from efffeat.dual import PROBE_EXAMPLES

F64 = torch.float64
N = PROBE_EXAMPLES + 44


def setup(order: str = "trained"):
    torch.manual_seed(0)
    model = mlp(3, (10, 10), 2, nn.Tanh).to(F64)
    init = perturbed(model, 0.1)
    x = torch.randn(N, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    dual = ef.DualModel(model, init, order=order, nodes=2, progress=False)
    dual.features(x)  # the plan and the determinism probe, outside what is counted
    return dual, x


def count_batch_sizes(dual: ef.DualModel) -> tuple[list[int], object]:
    """The batch size of every forward of the model, recorded by a hook on its first layer."""
    sizes: list[int] = []
    handle = dual.model.get_submodule("0").register_forward_pre_hook(lambda mod, args: sizes.append(len(args[0])))
    return sizes, handle


@pytest.mark.parametrize("order", ["init", "trained", "path"])
def test_a_lean_pass_measures_completeness_on_the_first_examples_only(order):
    dual, x = setup(order)
    sizes, handle = count_batch_sizes(dual)
    try:
        lean = dual.features(x, batch_size=N, need="features")
    finally:
        handle.remove()
    points = 2 if order == "path" else 1
    missing = 2 if order == "path" else 1  # the readouts the capture does not give
    assert sorted(sizes) == sorted([N] * points + [PROBE_EXAMPLES] * missing)
    assert lean.meta["completeness_examples"] == PROBE_EXAMPLES
    head = dual.features(x[:PROBE_EXAMPLES])
    assert lean.meta["completeness"] == pytest.approx(head.completeness(), rel=1e-10)
    assert lean.meta["completeness"] != pytest.approx(dual.features(x).completeness(), rel=1e-6)


def test_per_example_norms_run_the_lean_capture():
    dual, x = setup("trained")
    sizes, handle = count_batch_sizes(dual)
    try:
        norms = ef.per_example_norms(dual, x, batch_size=N)
    finally:
        handle.remove()
    assert sorted(sizes) == [PROBE_EXAMPLES, N]  # the capture at θ*, and θ0 on the examples completeness reads
    assert torch.allclose(norms, dual.features(x).sq_norms().sqrt(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("order", ["init", "nlo"])
def test_the_cotangents_of_every_readout_component_come_from_one_batched_backward_or_one_each(order, monkeypatch):
    """A vector readout's K components are backpropagated together (``is_grads_batched``); where that fails
    (an op without a batching rule) one pass per component gives the same features."""
    torch.manual_seed(0)
    model = mlp(3, (10, 10), 4, nn.Tanh).to(F64)
    x = torch.randn(20, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    dual = ef.DualModel(model, perturbed(model, 0.1), readout="output", order=order, progress=False)
    dual.features(x)  # the plan, outside what is counted
    calls: list[bool] = []  # is_grads_batched of each backward (a torch-function mode may re-enter grad: once)
    grad = torch.autograd.grad
    depth = [0]

    def patched(refuse_batched: bool):
        def wrapper(*args, **kwargs):
            batched = bool(kwargs.get("is_grads_batched"))
            if depth[0] == 0:
                calls.append(batched)
            if batched and refuse_batched:
                raise RuntimeError("no batching rule")
            depth[0] += 1
            try:
                return grad(*args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    monkeypatch.setattr(torch.autograd, "grad", patched(False))
    together = dual.features(x, need="features")
    assert calls == [True]
    calls.clear()
    monkeypatch.setattr(torch.autograd, "grad", patched(True))
    one_each = dual.features(x, need="features")
    assert calls == [True] + [False] * 4
    assert torch.allclose(together.kernel(), one_each.kernel(), rtol=1e-12, atol=0)
    assert torch.allclose(together.sq_sums(), one_each.sq_sums(), rtol=1e-12, atol=0)
