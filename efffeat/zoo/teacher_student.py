"""A teacher–student regression with a planted subspace: the target depends on the input only through ``Uᵀx``.

``x ~ N(0, I_d)``, ``z = Uᵀ x`` with ``U [d, k]`` orthonormal (random, seeded), target
``y = Σ_j z_{2j−1} z_{2j}`` (``y = z₁z₂`` for k = 2). The student is a one-hidden-layer ReLU MLP trained by
full-batch Adam on mean squared error. Ground truth: the rows of ``Uᵀ`` ``[k, d]``, directions in input space.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .run import SEED, STEPS, Built, Recipe, Run, checked_config, count, rate, register, within_budget

if TYPE_CHECKING:
    from ..baselines import Probe, Units


def target(x: Tensor, U: Tensor) -> Tensor:
    """``[N, 1]``: ``Σ_j z_{2j−1} z_{2j}`` with ``z = x U`` (x ``[N, d]``, U ``[d, k]``)."""
    z = x @ U
    return (z[:, 0::2] * z[:, 1::2]).sum(dim=1, keepdim=True)


def _build(config: dict) -> Built:
    d, k = config["d"], config["k"]
    model = nn.Sequential(nn.Linear(d, config["hidden"]), nn.ReLU(), nn.Linear(config["hidden"], 1))
    gen = torch.Generator().manual_seed(int(config["seed"]) + 2)
    U, _ = torch.linalg.qr(torch.randn(d, k, generator=gen))
    x = torch.randn(config["n_train"] + config["n_test"], d, generator=gen)
    y = target(x, U)
    n = config["n_train"]
    return Built(model, (x[:n], y[:n]), U.T.contiguous(), {"test_x": x[n:], "test_y": y[n:]})


def _optimizer(model: nn.Module, config: dict) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=config["lr"])


def _loss(run: Run, generator: torch.Generator) -> Tensor:
    x, y = run.data
    return (run.model(x) - y).square().mean()


def _evaluate(run: Run) -> dict[str, float]:
    x, y = run.extra["test_x"], run.extra["test_y"]
    mse = (run.model(x) - y).square().mean()
    train_mse = float(_loss(run, torch.Generator()))
    return {"train_mse": train_mse, "test_mse": float(mse), "test_r2": float(1 - mse / y.var())}


def _probe(config: dict) -> Probe:
    """The hidden units after the ReLU; W₁ is the first Linear ``[hidden, d]``."""
    from ..baselines import Probe

    return Probe("1", "0.weight", n_units=8)


def rotated_basis(truth: Tensor) -> Tensor:
    """``[k, d]``: ``(u_{2j−1} ± u_{2j}) / √2``, the basis the product target uses (``z₁z₂ = (r₁² − r₂²) / 2``)."""
    first, second = truth[0::2], truth[1::2]
    return torch.cat([first + second, first - second]) / 2**0.5


def _score(run: Run, units: Units) -> dict[str, Any]:
    """Directions against the planted subspace: MMCS to ``Uᵀ [k, d]`` and to the rotated basis the target uses,
    the share of span U the top-k units span, their recall and in-span fraction."""
    from ..baselines import direction_scores
    from ..baselines.metrics import mmcs

    truth = run.ground_truth.double()
    scores = direction_scores(truth, units.directions, subspace=True)
    scores["mmcs_rotated"] = mmcs(rotated_basis(truth), units.directions)
    return scores


_OPTIONS = {
    "d": count(2),
    "k": count(2),
    "hidden": count(),
    "n_train": count(),
    "n_test": count(),
    "steps": STEPS,
    "lr": rate(),
    "seed": SEED,
}


def _check(config: dict) -> dict:
    """The config with every option checked; k even and at most d; the data and weights within budget."""
    c = checked_config("teacher_student", config, _OPTIONS)
    d, k = c["d"], c["k"]
    if k % 2 or k > d:
        raise ConfigError(f"k must be even and between 2 and d = {d} (the target pairs coordinates), got {k}")
    n = c["n_train"] + c["n_test"]
    within_budget("teacher_student", n * (d + 1 + c["hidden"]) + (d + 2) * c["hidden"], "the data and a full batch")
    return c


register(
    "teacher_student",
    Recipe(_build, _optimizer, _loss, _evaluate, readout=0, probe=_probe, score=_score, check=_check),
)


def teacher_student(
    d: int = 20,
    k: int = 2,
    hidden: int = 64,
    n_train: int = 2048,
    n_test: int = 1024,
    steps: int = 2000,
    lr: float = 3e-3,
    seed: int = 0,
) -> Run:
    """A student MLP ``d -> hidden -> 1`` learning ``y = z₁z₂`` of a planted k-dim subspace (untrained).

    ``run.data = (x [n_train, d], y [n_train, 1])``; ``run.ground_truth = Uᵀ [k, d]``; the test split is in
    ``run.extra``.
    """
    return Run(
        {
            "kind": "teacher_student",
            "d": d,
            "k": k,
            "hidden": hidden,
            "n_train": n_train,
            "n_test": n_test,
            "steps": steps,
            "lr": lr,
            "seed": seed,
        }
    )
