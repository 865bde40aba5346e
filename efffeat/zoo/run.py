"""`Run`: a reference model that keeps its initialisation, its data and its training recipe.

A run is everything the dual model needs — the network, θ0 (`init_state`), θ* (the model's current weights)
and the data to analyse it on — plus the recipe that trained it, so training is reproducible bit for bit and a
saved run resumes exactly where it stopped (optimizer and sampler state are saved too).

Saved with `efffeat.io` (one safetensors file, atomic write, checksums): tensors under ``init.*``, ``trained.*``,
``data.*``, ``extra.*``, ``optim.*``, ``rng`` and ``ground_truth``; the kind, config and loss history as JSON. A
truncated or corrupted file raises `SaveFileError` before any model is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._savable import register as savable
from ..errors import ConfigError, SaveFileError

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

    from ..baselines import Probe, Units

FORMAT = "efffeat.zoo.Run"
VERSION = 1

Data = Tensor | tuple[Tensor, ...]


@dataclass
class Built:
    """What a recipe's `build` returns: the freshly initialised model and the run's fixed tensors.

    data: what the dual model is analysed on (inputs, or ``(inputs, targets)``); ground_truth: directions
    ``[n_true, d]`` in the space the recipe documents, or None; extra: other fixed tensors (train/test splits).
    """

    model: nn.Module
    data: Data
    ground_truth: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)


def _nothing(run: Run) -> dict:
    return {}


@dataclass(frozen=True)
class Recipe:
    """How one kind of zoo model is built, trained, evaluated, compared and shown.

    build: ``config -> Built``, deterministic in the config (its ``"seed"``).
    optimizer: ``(model, config) -> torch.optim.Optimizer``.
    loss: ``(run, generator) -> scalar loss`` of one training step (the generator draws the step's batch).
    evaluate: ``run -> {metric: value}`` (e.g. test accuracy).
    readout: the readout a `DualModel` of this run should use (``"output"``, an index or a callable).
    probe: ``config -> efffeat.baselines.Probe``, where `efffeat.compare` reads the model (None: the kind is
        not compared).
    score: ``(run, efffeat.baselines.Units) -> {column: value}``, how one method's units meet the run's ground
        truth in `efffeat.compare` (e.g. `efffeat.baselines.direction_scores`).
    figures: ``run -> {title: plotly Figure}``, the kind's own figures in its report (default none).
    dashboard_options: ``run -> {option: value}``, keyword arguments of its feature dashboards (e.g. a token
        ``decode``; default none).
    """

    build: Callable[[dict], Built]
    optimizer: Callable[[nn.Module, dict], torch.optim.Optimizer]
    loss: Callable[[Run, torch.Generator], Tensor]
    evaluate: Callable[[Run], dict[str, float]]
    readout: Any = "output"
    probe: Callable[[dict], Probe] | None = None
    score: Callable[[Run, Units], dict[str, Any]] | None = None
    figures: Callable[[Run], dict[str, Figure]] = _nothing
    dashboard_options: Callable[[Run], dict[str, Any]] = _nothing


_RECIPES: dict[str, Recipe] = {}


def register(kind: str, recipe: Recipe) -> None:
    """Make a model kind known to `Run` (and so to `load`)."""
    _RECIPES[kind] = recipe


def recipe_for(kind: str) -> Recipe:
    if kind not in _RECIPES:
        raise ConfigError(f"unknown zoo model kind {kind!r}; known kinds: {', '.join(sorted(_RECIPES))}")
    return _RECIPES[kind]


def seeded_build(build: Callable[[dict], Built], config: dict) -> Built:
    """Call `build` with torch's global RNG seeded from ``config["seed"]``, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config["seed"]))
        return build(config)


@savable
class Run:
    """A zoo model: network, θ0, data, ground truth and the recipe that trains it.

    Attributes:
        model: the network; its parameters are θ* once trained (trained in place).
        init_state: ``state_dict()`` at initialisation, cloned (θ0 for `efffeat.DualModel`).
        data: the analysis data, a tensor of inputs or an ``(inputs, targets)`` tuple.
        ground_truth: ``[n_true, d]`` known directions (see the constructor's docs for the space), or None.
        config: JSON-able settings, including ``"kind"``; the run is a function of it.
        extra: other fixed tensors (e.g. ``"train_x"``, ``"test_y"``).
        history: the training loss of every step taken so far.

    Example::

        run = ef.zoo.tms(sparsity=0.9, seed=0).train()
        dual = ef.DualModel(run.model, init=run.init_state, readout=run.readout)
    """

    def __init__(self, config: dict):
        self.config = dict(config)
        self.recipe = recipe_for(self.config["kind"])
        built = seeded_build(self.recipe.build, self.config)
        self.model = built.model
        self.model.eval()
        self.init_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.data = built.data
        self.ground_truth = built.ground_truth
        self.extra = built.extra
        self.history: list[float] = []
        self.generator = torch.Generator().manual_seed(int(self.config["seed"]) + 1)
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def steps_done(self) -> int:
        return len(self.history)

    @property
    def readout(self) -> Any:
        """The readout to analyse this run with (pass it to `efffeat.DualModel`)."""
        return self.recipe.readout

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = self.recipe.optimizer(self.model, self.config)
        return self._optimizer

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.config.items() if k != "kind"}
        loss = f", loss={self.history[-1]:.4g}" if self.history else ""
        return f"Run({self.kind}, {shown}, steps_done={self.steps_done}{loss})"

    def train(self, steps: int | None = None, progress: bool = True) -> Run:
        """Train in place for `steps` more steps (default: the config's ``"steps"``); returns the run."""
        steps = int(self.config["steps"]) if steps is None else steps
        if not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"steps must be a non-negative integer, got {steps!r}")
        opt = self.optimizer
        self.model.train()
        bar = tqdm(range(steps), desc=f"train {self.kind}", disable=None if progress else True, leave=False)
        for _ in bar:
            opt.zero_grad(set_to_none=True)
            loss = self.recipe.loss(self, self.generator)
            loss.backward()
            opt.step()
            self.history.append(float(loss.detach()))
            if len(self.history) % 100 == 0:
                bar.set_postfix(loss=f"{self.history[-1]:.4g}")
        self.model.eval()
        return self

    def evaluate(self) -> dict[str, float]:
        """The recipe's metrics of the model as it is now (e.g. ``{"test_accuracy": 0.97}``)."""
        with torch.no_grad():
            return self.recipe.evaluate(self)

    # ---- persistence ---------------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        """``(tensors, meta)``: every tensor of the run and its JSON-able description."""
        tensors: dict[str, Tensor] = {}
        tensors.update({f"init.{k}": v for k, v in self.init_state.items()})
        tensors.update({f"trained.{k}": v for k, v in self.model.state_dict().items()})
        data = self.data if isinstance(self.data, tuple) else (self.data,)
        tensors.update({f"data.{i}": t for i, t in enumerate(data)})
        tensors.update({f"extra.{k}": v for k, v in self.extra.items()})
        if self.ground_truth is not None:
            tensors["ground_truth"] = self.ground_truth
        tensors["rng"] = self.generator.get_state()
        optim_meta = None
        if self._optimizer is not None:
            optim_tensors, optim_meta = _flatten_optimizer(self._optimizer.state_dict())
            tensors.update({f"optim.{k}": v for k, v in optim_tensors.items()})
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config,
            "history": self.history,
            "data_is_tuple": isinstance(self.data, tuple),
            "optimizer": optim_meta,
        }
        return {k: v.detach().clone().contiguous() for k, v in tensors.items()}, meta

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict) -> Run:
        """Rebuild a run from `to_state`'s output (bit-exact)."""
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise SaveFileError(
                f"not a saved zoo run of format version {VERSION} (found format={meta.get('format')!r}, "
                f"version={meta.get('version')!r}); save it again with this efffeat version"
            )
        run = cls(meta["config"])
        trained = _prefixed(tensors, "trained.")
        init = _prefixed(tensors, "init.")
        expected = set(run.model.state_dict())
        if set(trained) != expected or set(init) != expected:
            raise SaveFileError(
                f"the saved {run.kind} run's tensors do not match the model its config builds "
                f"(expected keys {sorted(expected)[:4]}...); the file is damaged or from another version"
            )
        run.model.load_state_dict(trained)
        run.init_state = init
        data = _prefixed(tensors, "data.")
        parts = tuple(data[str(i)] for i in range(len(data)))
        run.data = parts if meta["data_is_tuple"] else parts[0]
        run.extra = _prefixed(tensors, "extra.")
        run.ground_truth = tensors.get("ground_truth")
        run.history = [float(v) for v in meta["history"]]
        run.generator.set_state(tensors["rng"])
        if meta["optimizer"] is not None:
            state = _unflatten_optimizer(_prefixed(tensors, "optim."), meta["optimizer"])
            run.optimizer.load_state_dict(state)
        return run

    def save(self, path: str | os.PathLike) -> Path:
        """Write the run to `path` with `efffeat.io.save` (one safetensors file, atomic); returns the path."""
        from ..io import save

        return save(self, path)


def load(path: str | os.PathLike) -> Run:
    """Load a run written by `Run.save`; a corrupt, partial or foreign file raises `SaveFileError`."""
    from ..io import load as load_any

    run = load_any(path)
    if not isinstance(run, Run):
        raise SaveFileError(f"{str(path)!r} holds a {type(run).__name__}, not a zoo run; load it with efffeat.load")
    return run


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    """An optimizer ``state_dict()`` as flat tensors ``"<param index>.<name>"`` plus JSON for the rest."""
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
