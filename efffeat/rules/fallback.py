"""The exact fallback for parameters no rule covers: per-example Jacobians by ``torch.func``.

``vmap(jacrev)`` over the examples of the model called with swapped-in parameters, a chunk of examples at a
time; for the ``"nlo"`` order the features ``J + ½ d/dε J(θ + εΔθ)`` come from one ``jvp`` of the Jacobian
computation. Slower than a factored rule and dense (``[n, K, numel]`` per parameter), but exact.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vmap
from torch.utils._pytree import tree_map

from .._data import Batch, batch_len, call_model, slice_batch
from .._swap import ParameterSwap
from ..factors import DenseFactor
from ..readout import Readout


class FallbackWarning(UserWarning):
    """A parameter's features are computed by the slower ``torch.func`` per-example Jacobian fallback."""


def fallback_factors(
    swap: ParameterSwap,
    names: list[str],
    params: dict[str, Tensor],
    batch: Batch,
    readout: Readout,
    tangent: dict[str, Tensor] | None = None,
    chunk: int = 32,
) -> dict[str, DenseFactor]:
    """Per-example Jacobians of the readout w.r.t. the parameters `names`: ``{name: DenseFactor [n, K, numel]}``.

    params: every ``named_parameters()`` tensor at the evaluation point; tangent: Δθ for the ``"nlo"`` features.
    """
    n = batch_len(batch)

    def jac(all_params: dict[str, Tensor], sub: Batch) -> dict[str, Tensor]:
        fb = {k: all_params[k] for k in names}
        rest = {k: v for k, v in all_params.items() if k not in fb}

        def one(p_fb: dict[str, Tensor], example: Batch) -> Tensor:
            ex = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
            out = call_model(swap, {**rest, **p_fb}, ex)
            return readout(out, ex)[0]  # [K]

        return vmap(jacrev(one), in_dims=(None, 0))(fb, sub)  # name -> [m, K, *shape]

    parts: dict[str, list[Tensor]] = {k: [] for k in names}
    for s in range(0, n, chunk):
        sub = slice_batch(batch, slice(s, s + chunk))
        if tangent is None:
            j = jac(params, sub)
        else:
            j0, j_dot = jvp(lambda p, sub=sub: jac(p, sub), (params,), (tangent,))
            j = {k: j0[k] + 0.5 * j_dot[k] for k in names}
        for k in names:
            parts[k].append(j[k].reshape(j[k].shape[0], j[k].shape[1], -1).detach())
    return {k: DenseFactor(torch.cat(v)) for k, v in parts.items()}


def owners(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """``{"path (Type)": [attribute, ...]}``: the modules that hold the parameters `names`."""
    out: dict[str, list[str]] = {}
    modules = dict(model.named_modules())
    for name in names:
        path = name.rsplit(".", 1)[0] if "." in name else ""
        kind = type(modules.get(path, model)).__name__
        out.setdefault(f"{path or '<root>'} ({kind})", []).append(name.rsplit(".", 1)[-1])
    return out


def describe(model: nn.Module, names: list[str]) -> str:
    """One line naming the modules whose parameters `names` are, and those parameters."""
    return "; ".join(f"{m}: {', '.join(p)}" for m, p in owners(model, names).items())


def warn_fallback(model: nn.Module, names: list[str], reason: str) -> None:
    """One line naming the modules whose parameters use the ``torch.func`` fallback."""
    warnings.warn(
        f"efffeat: {reason} — per-example torch.func Jacobians (slower, exact) for {describe(model, names)}",
        FallbackWarning,
        stacklevel=3,
    )
