"""The toy model of superposition (Elhage et al. 2022, "Toy Models of Superposition").

``h = W x``, ``x' = ReLU(Wᵀ h + b)`` with ``W [n_hidden, n_features]``; each input feature is 0 with
probability S (the sparsity) and uniform on [0, 1] otherwise; loss ``Σ_i I_i (x_i − x'_i)²`` with importance
``I_i = importance**i``, averaged over the batch. The decoder is an `efffeat.TransposedLinear` of the encoder,
so efffeat factors both uses of W. Ground truth: the input axes (``eye(n_features)``); feature i is embedded
in the hidden space as column ``W[:, i]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..nn import TransposedLinear
from .run import SEED, STEPS, Built, Recipe, Run, checked_config, count, rate, register, within_budget

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

    from ..baselines import Probe, Units


class ToyModel(nn.Module):
    """``x' = ReLU(Wᵀ W x + b)``: input ``[N, n_features]`` -> reconstruction ``[N, n_features]``."""

    def __init__(self, n_features: int, n_hidden: int):
        super().__init__()
        self.encoder = nn.Linear(n_features, n_hidden, bias=False)
        nn.init.xavier_normal_(self.encoder.weight)
        self.decoder = TransposedLinear(self.encoder, bias=True)

    @property
    def W(self) -> Tensor:
        """``[n_hidden, n_features]``: column i is feature i's embedding."""
        return self.encoder.weight

    def hidden(self, x: Tensor) -> Tensor:
        """``[N, n_hidden]``."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.decoder(self.encoder(x)))


def sample(n: int, n_features: int, sparsity: float, generator: torch.Generator) -> Tensor:
    """``[n, n_features]``: each entry 0 with probability `sparsity`, else U[0, 1]."""
    values = torch.rand(n, n_features, generator=generator)
    keep = torch.rand(n, n_features, generator=generator) >= sparsity
    return values * keep


def importances(config: dict) -> Tensor:
    """``[n_features]``: ``importance**i``."""
    return config["importance"] ** torch.arange(config["n_features"], dtype=torch.float32)


def _build(config: dict) -> Built:
    model = ToyModel(config["n_features"], config["n_hidden"])
    gen = torch.Generator().manual_seed(int(config["seed"]) + 2)
    data = sample(config["n_data"], config["n_features"], config["sparsity"], gen)
    return Built(model, data, torch.eye(config["n_features"]))


def _optimizer(model: nn.Module, config: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])


def _loss(run: Run, generator: torch.Generator) -> Tensor:
    c = run.config
    x = sample(c["batch_size"], c["n_features"], c["sparsity"], generator)
    return (importances(c) * (x - run.model(x)).square()).sum(dim=1).mean()


def _evaluate(run: Run) -> dict[str, float]:
    x = run.data
    loss = (importances(run.config) * (x - run.model(x)).square()).sum(dim=1).mean()
    return {"loss": float(loss)}


def _probe(config: dict) -> Probe:
    """The encoder W ``[n_hidden, n_features]``; its single parameters are the effective units."""
    from ..baselines import Probe

    return Probe("encoder", "encoder.weight", group="param", n_units=config["n_features"])


def _score(run: Run, units: Units) -> dict[str, Any]:
    """Directions against the input axes (which span the input space: no ``in_span``)."""
    from ..baselines import direction_scores

    return direction_scores(run.ground_truth, units.directions, in_span=False)


def tms_geometry_figure(run: Run) -> Figure:
    """`efffeat.viz.tms_geometry` of a TMS run: its trained W ``[n_hidden, n_features]`` and W at init."""
    from ..viz import tms_geometry

    return tms_geometry(run.model.W, run.init_state["encoder.weight"])


_OPTIONS = {
    "n_features": count(),
    "n_hidden": count(),
    "sparsity": rate(0.0, 1.0, strict=False, below=True),
    "importance": rate(0.0, 1.0),
    "steps": STEPS,
    "lr": rate(),
    "weight_decay": rate(strict=False),
    "batch_size": count(),
    "n_data": count(),
    "seed": SEED,
}


def _check(config: dict) -> dict:
    """The config with every option checked; the weights, data and a batch must fit the zoo's budget."""
    c = checked_config("tms", config, _OPTIONS)
    n = c["n_features"]
    within_budget("tms", n * c["n_hidden"] + n * (c["n_data"] + 2 * c["batch_size"]), "W, the data and a batch")
    return c


register(
    "tms",
    Recipe(
        _build,
        _optimizer,
        _loss,
        _evaluate,
        readout="output",
        probe=_probe,
        score=_score,
        figures=lambda run: {"Geometry of the toy model": tms_geometry_figure(run)},
        check=_check,
    ),
)


def tms(
    n_features: int = 5,
    n_hidden: int = 2,
    sparsity: float = 0.9,
    importance: float = 0.9,
    steps: int = 10_000,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 1024,
    n_data: int = 1024,
    seed: int = 0,
) -> Run:
    """A toy model of superposition (untrained; call ``.train()``).

    Defaults follow Elhage et al.: AdamW lr 1e-3, batch 1024, 10k steps. The literature's settings:
    (5, 2) with importance 0.9; (20, 5) with 0.7; (50, 10) with 0.8. ``n_data`` inputs from the same
    distribution are the analysis data (``run.data [n_data, n_features]``).
    """
    return Run(
        {
            "kind": "tms",
            "n_features": n_features,
            "n_hidden": n_hidden,
            "sparsity": sparsity,
            "importance": importance,
            "steps": steps,
            "lr": lr,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "n_data": n_data,
            "seed": seed,
        }
    )
