"""The exact fallback for parameters no rule covers: dense per-example Jacobians, by the fastest route that runs.

=======  ==========================================================  ==============================================
route    how                                                         when
=======  ==========================================================  ==============================================
vmap     ``vmap(jacrev)`` over chunks of examples; ``"nlo"`` adds ½   first choice; the chunk size comes from the
         ``d/dε J(θ + εΔθ)`` by one ``jvp`` (forward-over-reverse)    memory budget (`efffeat._memory`)
loop     one example at a time by plain autograd; ``"nlo"`` adds     when vmap cannot run the model (a recurrent
         ½ ψΔθ = ½ ∇⟨∇z, Δθ⟩ by double backward                      layer over packed sequences, data-dependent
                                                                     control flow, ops without a batching rule)
=======  ==========================================================  ==============================================

Both give the same numbers (the loop is the definition); the loop needs no forward-mode derivative. Each route
says once, with a `FallbackWarning`, which modules it covers, why, and what the first batch cost. When neither
runs, the error names the module, the op and the fix. Every model call goes through `readout_of`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vmap
from torch.utils._pytree import tree_map

from .. import _memory
from .._autodiff import (
    autodiff_context,
    backward_failure_site,
    failure_error,
    failure_message,
    first_line,
    forget_running_modules,
    running_module,
)
from .._data import Batch, batch_len, call_model, slice_batch
from .._swap import ParameterSwap
from ..errors import EfffeatError, ReadoutError, UnsupportedModelError
from ..factors import DenseFactor
from ..readout import Readout

# Share of the available memory one vmap chunk may use (the features being built need the rest).
_CHUNK_MEMORY_FRACTION = 0.25
# Bytes a vmap(jacrev) chunk holds per activation entry and readout component, relative to the forward's own.
_JACREV_ACTIVATION_FACTOR = 4


class FallbackWarning(UserWarning):
    """Some parameters' features are computed by the exact per-example fallback (dense, slower than a rule)."""


def readout_of(swap: ParameterSwap, readout: Readout, params: dict[str, Tensor], batch: Batch) -> Tensor:
    """``[n, K]``: the readout of the model on `batch` computed with `params` (every model call of the fallback)."""
    return readout(call_model(swap, params, batch), batch)


def owners(model: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """``{"path (Type)": [attribute, ...]}``: the modules that hold the parameters `names`."""
    out: dict[str, list[str]] = {}
    modules = dict(model.named_modules())
    for name in names:
        path = name.rsplit(".", 1)[0] if "." in name else ""
        kind = type(modules.get(path, model)).__name__
        out.setdefault(f"{path or '<root>'} ({kind})", []).append(name.rsplit(".", 1)[-1])
    return out


def describe(model: nn.Module, names: Sequence[str]) -> str:
    """One line naming the modules whose parameters `names` are, and those parameters."""
    return "; ".join(f"{m}: {', '.join(p)}" for m, p in owners(model, names).items())


def describe_reasons(model: nn.Module, reasons: dict[str, str]) -> str:
    """``"module (Type): params (reason); ..."`` for ``{parameter: reason}``."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{describe(model, names)} ({reason})" for reason, names in by_reason.items())


def batch_gradient(
    swap: ParameterSwap, readout: Readout, params: dict[str, Tensor], batch: Batch, weights: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """``({name: ∂(Σ_n w_n z[n, 0])/∂θ}, z [n, K])`` by one plain backward pass (the reference of the plan's check).

    weights: ``[n]`` per-example weights w (distinct weights also catch a layer that mixes up examples).
    """
    model = swap.model
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}

    def run() -> tuple[tuple[Tensor | None, ...], Tensor]:
        with torch.enable_grad():
            r = readout_of(swap, readout, leaves, batch)
            if not r.requires_grad:
                raise ReadoutError(
                    "the readout does not depend differentiably on the parameters (did it use .detach(), "
                    ".item(), argmax or integer ops?); return a differentiable float tensor [N] or [N, K]"
                )
            return torch.autograd.grad(r[:, 0] @ weights.to(r.dtype), list(leaves.values()), allow_unused=True), r

    with autodiff_context(model, what="the gradient of the readout"):
        try:
            grads, r = run()
        except (ReadoutError, MemoryError, Warning):
            raise
        except Exception as e:
            site = running_module(model) or backward_failure_site(model, run)
            raise failure_error(e, "the gradient of the readout", site) from e
    return {n: torch.zeros_like(p) if g is None else g.detach() for (n, p), g in zip(leaves.items(), grads)}, r.detach()


class Fallback(Sequence[str]):
    """The parameters no rule covers (a sequence of their names) and the route that computes their features.

    reasons: ``{named_parameters() name: why it is not factored}``; chunk: examples per vmap chunk (None: from
    the memory budget).
    """

    def __init__(self, swap: ParameterSwap, readout: Readout, reasons: dict[str, str], chunk: int | None = None):
        self.swap, self.readout, self.reasons, self.chunk = swap, readout, dict(reasons), chunk
        self.names = list(reasons)
        self.route = "vmap"
        self.vmap_failure: str | None = None
        self._reported: set[str] = set()
        self._sizes: tuple[int, int] | None = None  # (activation entries per example of a forward, K)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: Any) -> Any:
        return self.names[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    @property
    def model(self) -> nn.Module:
        return self.swap.model

    def factors(
        self, params: dict[str, Tensor], batch: Batch, tangent: dict[str, Tensor] | None = None
    ) -> dict[str, DenseFactor]:
        """``{name: DenseFactor [n, K, numel]}``: per-example features at `params` (``"nlo"`` with tangent Δθ)."""
        if self.route == "vmap":
            start = time.perf_counter()
            chunk = self._chunk_size(params, batch, tangent)
            with autodiff_context(self.model, forward_ad=tangent is not None, what=self._what(tangent)):
                try:
                    out = self._vmap(params, batch, tangent, chunk)
                except (MemoryError, Warning):
                    raise
                except Exception as e:  # vmap cannot run this model: the loop can
                    self.route, self.vmap_failure = "loop", first_line(e)
                    forget_running_modules()
                else:
                    source = "from the memory budget" if self.chunk is None else "fallback_chunk"
                    how = f"by torch.func vmap(jacrev), {chunk} examples per chunk ({source})"
                    self._report("vmap", how, time.perf_counter() - start, params, batch)
                    return out
        start = time.perf_counter()
        with autodiff_context(self.model, what=self._what(tangent)):
            try:
                out = self._loop(params, batch, tangent)
            except (MemoryError, Warning):
                raise
            except Exception as e:
                raise UnsupportedModelError(self._failure(e, params, batch, tangent)) from e
        how = (
            f"one example at a time by autograd{' (ψΔθ by double backward)' if tangent is not None else ''}, "
            f"because torch.func.vmap cannot run the model ({self.vmap_failure})"
        )
        self._report("loop", how, time.perf_counter() - start, params, batch)
        return out

    # ---- the routes --------------------------------------------------------------------------------------------
    def _vmap(
        self, params: dict[str, Tensor], batch: Batch, tangent: dict[str, Tensor] | None, chunk: int
    ) -> dict[str, DenseFactor]:
        names = self.names

        def jac(all_params: dict[str, Tensor], sub: Batch) -> dict[str, Tensor]:
            own = {k: all_params[k] for k in names}
            rest = {k: v for k, v in all_params.items() if k not in own}

            def one(p_own: dict[str, Tensor], example: Batch) -> Tensor:
                ex = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
                return readout_of(self.swap, self.readout, {**rest, **p_own}, ex)[0]  # [K]

            return vmap(jacrev(one), in_dims=(None, 0))(own, sub)  # name -> [m, K, *shape]

        parts: dict[str, list[Tensor]] = {k: [] for k in names}
        for s in range(0, batch_len(batch), chunk):
            sub = slice_batch(batch, slice(s, s + chunk))
            if tangent is None:
                j = jac(params, sub)
            else:
                j0, j_dot = jvp(lambda p, sub=sub: jac(p, sub), (params,), (tangent,))
                j = {k: j0[k] + 0.5 * j_dot[k] for k in names}
            for k in names:
                parts[k].append(j[k].reshape(j[k].shape[0], j[k].shape[1], -1).detach())
        return {k: DenseFactor(torch.cat(v)) for k, v in parts.items()}

    def _loop(
        self, params: dict[str, Tensor], batch: Batch, tangent: dict[str, Tensor] | None
    ) -> dict[str, DenseFactor]:
        names = self.names
        wrt = names if tangent is None else list(params)  # ψΔθ: every parameter moves along Δθ
        rows: dict[str, list[Tensor]] = {k: [] for k in names}
        for i in range(batch_len(batch)):
            for k, g in self._example(params, slice_batch(batch, slice(i, i + 1)), tangent, wrt).items():
                rows[k].append(g)
        return {k: DenseFactor(torch.stack(v)) for k, v in rows.items()}

    def _example(
        self, params: dict[str, Tensor], example: Batch, tangent: dict[str, Tensor] | None, wrt: list[str]
    ) -> dict[str, Tensor]:
        """``{name: [K, numel]}`` for one example: φ, plus ½ψΔθ by double backward when `tangent` is given."""
        with torch.enable_grad():
            leaves = {k: params[k].detach().requires_grad_(True) for k in wrt}
            z = readout_of(self.swap, self.readout, {**params, **leaves}, example)[0]  # [K]
            out: dict[str, list[Tensor]] = {k: [] for k in self.names}
            for j in range(z.shape[0]):
                last = j + 1 == z.shape[0]
                g = dict(
                    zip(
                        wrt,
                        torch.autograd.grad(
                            z[j],
                            [leaves[k] for k in wrt],
                            create_graph=tangent is not None,
                            retain_graph=tangent is not None or not last,
                            allow_unused=True,
                        ),
                    )
                )
                hv: dict[str, Tensor | None] = dict.fromkeys(self.names)
                if tangent is not None:
                    dot = sum((gk * tangent[k]).sum() for k, gk in g.items() if gk is not None and gk.requires_grad)
                    if isinstance(dot, Tensor):
                        second = torch.autograd.grad(
                            dot, [leaves[k] for k in self.names], retain_graph=not last, allow_unused=True
                        )
                        hv = dict(zip(self.names, second))
                for k in self.names:
                    row = torch.zeros_like(params[k]) if g[k] is None else g[k].detach()
                    if hv[k] is not None:
                        row = row + 0.5 * hv[k].detach()
                    out[k].append(row.reshape(-1))
        return {k: torch.stack(v) for k, v in out.items()}

    # ---- sizes, reports, failures ------------------------------------------------------------------------------
    def _chunk_size(self, params: dict[str, Tensor], batch: Batch, tangent: dict[str, Tensor] | None) -> int:
        """Examples per vmap chunk: what fits in a share of the available memory, at most the batch."""
        n = batch_len(batch)
        if self.chunk is not None:
            return self.chunk
        if self._sizes is None:
            self._sizes = self._forward_sizes(params, slice_batch(batch, slice(0, 8)))
        activations, k = self._sizes
        size = next(iter(params.values())).element_size()
        own = sum(params[name].numel() for name in self.names)
        per_example = size * k * (own * (3 if tangent is not None else 1) + _JACREV_ACTIVATION_FACTOR * activations)
        budget = _memory.available_bytes() * _CHUNK_MEMORY_FRACTION
        return int(max(1, min(n, budget // max(1, per_example))))

    def _forward_sizes(self, params: dict[str, Tensor], batch: Batch) -> tuple[int, int]:
        """(tensor entries per example that one forward pass produces in every module's output, readout K)."""
        total = 0

        def count(module: nn.Module, args: Any, output: Any) -> None:
            nonlocal total
            for t in output if isinstance(output, tuple | list) else (output,):
                if isinstance(t, Tensor):
                    total += t.numel()

        handle = nn.modules.module.register_module_forward_hook(count)
        try:
            with torch.no_grad(), autodiff_context(self.model):
                k = readout_of(self.swap, self.readout, params, batch).shape[1]
        finally:
            handle.remove()
        return max(1, total // max(1, batch_len(batch))), k

    def _what(self, tangent: dict[str, Tensor] | None) -> str:
        order = "nlo " if tangent is not None else ""
        return f"the exact per-example {order}features of {describe(self.model, self.names)}"

    def _report(self, route: str, how: str, seconds: float, params: dict[str, Tensor], batch: Batch) -> None:
        """Say once per route which modules it covers, why, and what the first batch cost."""
        if route in self._reported:
            return
        self._reported.add(route)
        n = batch_len(batch)
        cost = f"{seconds:.2f} s for the first {n} examples ({1e3 * seconds / n:.2f} ms per example"
        plain = self._plain_seconds(params, batch)
        cost += f", {seconds / plain:.0f}× a plain forward+backward)" if plain else ")"
        warnings.warn(
            f"efffeat: exact per-example fallback for {describe_reasons(self.model, self.reasons)}: {how}; {cost}. "
            "A rule for the module (@ef.register_rule) would factor them",
            FallbackWarning,
            stacklevel=2,
        )

    def _plain_seconds(self, params: dict[str, Tensor], batch: Batch) -> float | None:
        """Seconds of one forward and backward pass over the batch (for the cost in the report)."""
        leaves = {k: params[k].detach().requires_grad_(True) for k in self.names}
        start = time.perf_counter()
        try:
            with torch.enable_grad(), autodiff_context(self.model):
                z = readout_of(self.swap, self.readout, {**params, **leaves}, batch)
                torch.autograd.grad(z.sum(), list(leaves.values()), allow_unused=True)
        except Exception:  # only the report's comparison is lost
            return None
        return time.perf_counter() - start

    def _failure(
        self, error: Exception, params: dict[str, Tensor], batch: Batch, tangent: dict[str, Tensor] | None
    ) -> str:
        """Why the loop failed: efffeat's own check on one example, or PyTorch's error with module and op."""
        if isinstance(error, EfffeatError):  # e.g. the readout of one example alone has another shape
            message = f"efffeat could not compute {self._what(tangent)}, one example at a time: {error}"
        else:
            site = running_module(self.model)
            if site is None:  # it failed in a backward pass: rerun one example to find the module
                wrt = self.names if tangent is None else list(params)
                site = backward_failure_site(
                    self.model, lambda: self._example(params, slice_batch(batch, slice(0, 1)), tangent, wrt)
                )
            hint = (
                "the exact fallback runs the model on one example at a time: make its forward work on a batch of "
                "one (a .squeeze() drops the batch axis), or register a rule for the module (@ef.register_rule)"
            )
            message = failure_message(error, self._what(tangent), site, hint)
        if self.vmap_failure is not None:
            message += f" (torch.func.vmap could not run it either: {self.vmap_failure})"
        return message
