"""An MLP classifier on scikit-learn's 8×8 digits (``load_digits`` ships with scikit-learn: no download)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..baselines.base import correct_logit
from ..errors import ConfigError
from .run import SEED, STEPS, Built, Recipe, Run, checked_config, count, rate, register, widths, within_budget

if TYPE_CHECKING:
    from ..baselines import Probe, Units


def mlp(d_in: int, hidden: tuple[int, ...], d_out: int) -> nn.Sequential:
    """``Linear, ReLU, …, Linear``."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    return nn.Sequential(*layers, nn.Linear(d_in, d_out))


def _build(config: dict) -> Built:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(int(config["seed"]) + 2)
    order = torch.randperm(len(y), generator=gen)
    n_test = round(config["test_fraction"] * len(y))
    test, train = order[:n_test], order[n_test:]
    model = mlp(64, tuple(config["hidden"]), 10)
    return Built(model, (x[train], y[train]), None, {"test_x": x[test], "test_y": y[test]})


def _optimizer(model: nn.Module, config: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])


def _loss(run: Run, generator: torch.Generator) -> Tensor:
    x, y = run.data
    idx = torch.randint(len(y), (run.config["batch_size"],), generator=generator)
    return F.cross_entropy(run.model(x[idx]), y[idx])


def _evaluate(run: Run) -> dict[str, float]:
    x, y = run.data
    tx, ty = run.extra["test_x"], run.extra["test_y"]
    return {
        "train_accuracy": float((run.model(x).argmax(1) == y).float().mean()),
        "test_accuracy": float((run.model(tx).argmax(1) == ty).float().mean()),
    }


def _probe(config: dict) -> Probe:
    """The first hidden layer after its ReLU (W₁ the first Linear ``[hidden, 64]``, W₂ the one reading it).

    Label-free: the effective methods read all ten logits, each class's logit over every example
    (``per_component``), never the example's own label.
    """
    from ..baselines import Probe

    single = len(config["hidden"]) == 1  # then W₂ = "2.weight" maps the probed units to the logits
    return Probe(
        "1",
        "0.weight",
        n_units=16,
        readout="output",
        per_component=True,
        scored="functions",
        out_weight="2.weight" if single else None,
    )


def _score(run: Run, units: Units) -> dict[str, Any]:
    """Label purity (|value| and both ends of signed functions) and class selectivity over the training digits."""
    from ..baselines import label_scores

    return label_scores(units.functions, run.data[1])


# Examples in scikit-learn's digits (``load_digits()``), split into train and test by ``test_fraction``.
N_DIGITS = 1797

_OPTIONS = {
    "hidden": widths(),
    "steps": STEPS,
    "lr": rate(),
    "weight_decay": rate(strict=False),
    "batch_size": count(),
    "test_fraction": rate(0.0, 1.0, below=True),
    "seed": SEED,
}


def _check(config: dict) -> dict:
    """The config with every option checked; both splits non-empty, the weights and a batch within budget."""
    c = checked_config("digits_mlp", config, _OPTIONS)
    if not 1 <= round(c["test_fraction"] * N_DIGITS) < N_DIGITS:
        raise ConfigError(
            f"test_fraction must leave both splits of the {N_DIGITS} digits non-empty, got {c['test_fraction']}"
        )
    sizes = [64, *c["hidden"], 10]
    weights = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    within_budget("digits_mlp", weights + c["batch_size"] * sum(sizes), "the weights and a batch's activations")
    return c


register(
    "digits_mlp",
    Recipe(_build, _optimizer, _loss, _evaluate, readout=correct_logit, probe=_probe, score=_score, check=_check),
)


def digits_mlp(
    hidden: tuple[int, ...] = (32,),
    steps: int = 2000,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> Run:
    """An MLP ``64 -> hidden -> 10`` on the digits (untrained; about 96–97 % test accuracy once trained).

    ``run.data = (x [n_train, 64] in [0, 1], labels [n_train])``; the test split is ``run.extra["test_x"]``,
    ``["test_y"]``. The readout is the correct-class logit (`correct_logit`).
    """
    return Run(
        {
            "kind": "digits_mlp",
            "hidden": list(hidden) if isinstance(hidden, tuple | list) else hidden,
            "steps": steps,
            "lr": lr,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "test_fraction": test_fraction,
            "seed": seed,
        }
    )
