"""`Run`: a reference model that keeps its initialisation, its data and its training recipe.

A run is everything the dual model needs — the network, θ0 (`init_state`), θ* (the model's current weights)
and the data to analyse it on — plus the recipe that trained it, so training is reproducible bit for bit and a
saved run resumes exactly where it stopped (optimizer and sampler state are saved too).

A run is a function of its config, and the config is checked before anything is built: every option's type and
range, and the sizes of what the build would allocate (at most `MAX_ELEMENTS` numbers; `MAX_STEPS` training
steps), so that neither a typo nor a saved file can ask for a model that does not fit.

Saved with `efffeat.io` (one safetensors file, atomic write, checksums): tensors under ``init.*``, ``trained.*``,
``data.*``, ``extra.*``, ``optim.*``, ``rng`` and ``ground_truth``; the kind, config and loss history as JSON. A
truncated, corrupted or edited file raises `SaveFileError` before any model is built.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import io
from .._check import integer, real
from .._savable import register as savable
from ..errors import ConfigError, SaveFileError

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

    from ..baselines import Probe, Units

FORMAT = "efffeat.zoo.Run"
VERSION = 1

# The most numbers a run's build may allocate (parameters, data and one training batch: 2 GiB of float32), the
# most training steps a config may ask for, and the largest size or seed an option may take.
MAX_ELEMENTS = 1 << 29
MAX_STEPS = 10**8
MAX_SIZE = 1 << 24
MAX_SEED = (1 << 63) - 16

Data = Tensor | tuple[Tensor, ...]
Option = Callable[[str, Any], Any]  # (option name, value) -> the checked value, or raise ConfigError


# ---- checking a config -------------------------------------------------------------------------------------
def count(minimum: int = 1, maximum: int = MAX_SIZE) -> Option:
    """An integer option in ``[minimum, maximum]``."""

    def check(name: str, value: Any) -> int:
        out = integer(name, value, minimum)
        if out > maximum:
            raise ConfigError(f"{name} must be at most {maximum:,}, got {out:,}")
        return out

    return check


def rate(minimum: float = 0.0, maximum: float = math.inf, strict: bool = True, below: bool = False) -> Option:
    """A finite real option above `minimum` (strictly when `strict`) and at most `maximum` (below it: `below`)."""

    def check(name: str, value: Any) -> float:
        out = real(name, value, minimum, strict)
        if out > maximum or (below and out == maximum):
            raise ConfigError(f"{name} must be {'below' if below else 'at most'} {maximum:g}, got {out!r}")
        return out

    return check


def widths(maximum: int = MAX_SIZE, most: int = 64) -> Option:
    """A list of 1 to `most` positive integers (hidden layer widths)."""

    def check(name: str, value: Any) -> list[int]:
        if not isinstance(value, list | tuple) or not 1 <= len(value) <= most:
            raise ConfigError(f"{name} must be a list of 1 to {most} layer widths such as [32, 16], got {value!r}")
        return [count(1, maximum)(f"{name}[{i}]", w) for i, w in enumerate(value)]

    return check


STEPS = count(0, MAX_STEPS)
SEED = count(0, MAX_SEED)


def checked_config(kind: str, config: dict, options: dict[str, Option]) -> dict:
    """``{"kind": kind, option: checked value}`` of `config`, which must hold exactly the `options`."""
    if not isinstance(config, dict):
        raise ConfigError(f"a {kind} config is a dict of options, got {type(config).__name__}")
    missing = [k for k in options if k not in config]
    unknown = [k for k in config if k != "kind" and k not in options]
    if missing or unknown:
        raise ConfigError(
            f"a {kind} config needs exactly the options {', '.join(options)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(map(str, unknown))}" if unknown else "")
        )
    return {"kind": kind, **{k: check(k, config[k]) for k, check in options.items()}}


def within_budget(kind: str, n_elements: int, what: str) -> None:
    """Refuse a config whose build would allocate more than `MAX_ELEMENTS` numbers (`what` says which)."""
    if n_elements > MAX_ELEMENTS:
        raise ConfigError(
            f"this {kind} config would allocate {n_elements:,} numbers ({what}), more than the {MAX_ELEMENTS:,} "
            "a zoo run may; choose smaller sizes"
        )


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
    check: ``config -> config``, the config with every option checked (`checked_config`) and the sizes it
        would allocate bounded (`within_budget`); raises `ConfigError`. Runs before every build, a loaded
        file's included (default: the config as it is).
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
    check: Callable[[dict], dict] = dict


_RECIPES: dict[str, Recipe] = {}


def register(kind: str, recipe: Recipe) -> None:
    """Make a model kind known to `Run` (and so to `load`)."""
    _RECIPES[kind] = recipe


def recipe_for(kind: str) -> Recipe:
    if not isinstance(kind, str) or kind not in _RECIPES:
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
        if not isinstance(config, dict) or not isinstance(config.get("kind"), str):
            raise ConfigError(f"a run's config is a dict with its 'kind', got {config!r}")
        self.recipe = recipe_for(config["kind"])
        self.config = self.recipe.check(dict(config))
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
        steps = STEPS("steps", self.config["steps"] if steps is None else steps)
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
    def validate_state(cls, tensors: dict[str, Tensor], meta: dict) -> None:
        """Refuse (`SaveFileError`) a saved run whose description or config is wrong, before anything is built.

        The config passes its recipe's `Recipe.check` (types, ranges, sizes); the tensors are the run's
        kinds, the data parts numbered from 0 and of one length, the random state a generator's.
        """
        optimizer = {"param_groups": io.list_of(io.dict_of()), "scalars": io.dict_of(io.number(finite=False))}
        m = io.record(
            meta,
            "meta",
            {
                "format": io.text((FORMAT,)),
                "version": io.whole(VERSION, VERSION),
                "config": io.dict_of(),
                "history": io.list_of(io.number(finite=False)),
                "data_is_tuple": io.flag,
                "optimizer": io.nullable(lambda v, where: io.record(v, where, optimizer)),
            },
        )
        try:
            recipe_for(m["config"].get("kind")).check(dict(m["config"]))
        except ConfigError as e:
            raise SaveFileError(f"meta.config: {e}") from None
        io.tensor_names(tensors, lambda k: k in ("rng", "ground_truth") or k.startswith(_PREFIXES))
        io.tensor(tensors, "rng", "int", shape=tuple(torch.Generator().get_state().shape))
        if tensors["rng"].dtype != torch.uint8:
            io.invalid("tensor 'rng'", "a generator state (uint8)", tensors["rng"].dtype)
        data = _prefixed(tensors, "data.")
        if set(data) != {str(i) for i in range(len(data))} or not data or (len(data) > 1 and not m["data_is_tuple"]):
            raise SaveFileError(f"the data tensors {sorted(data)} are not data.0, data.1, ... (one unless a tuple)")
        parts = [data[str(i)] for i in range(len(data))]
        if any(t.ndim == 0 for t in parts):
            raise SaveFileError("a data tensor has no example axis (it is 0-dimensional)")
        if len({len(t) for t in parts}) != 1:
            raise SaveFileError(f"the data tensors have different lengths {[len(t) for t in parts]}")
        if (m["optimizer"] is None) != (not _prefixed(tensors, "optim.")):
            raise SaveFileError("optimizer tensors are saved without the optimizer's description, or the reverse")

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict) -> Run:
        """Rebuild a run from `to_state`'s output (bit-exact); `validate_state` has checked it."""
        run = cls(meta["config"])
        trained = _prefixed(tensors, "trained.")
        init = _prefixed(tensors, "init.")
        _check_like(trained, run.model.state_dict(), f"the trained weights of the {run.kind} model")
        _check_like(init, run.model.state_dict(), f"the initial weights of the {run.kind} model")
        _check_like(_prefixed(tensors, "extra."), run.extra, f"the {run.kind} run's fixed tensors")
        built_truth = {} if run.ground_truth is None else {"ground_truth": run.ground_truth}
        _check_like({k: v for k, v in tensors.items() if k == "ground_truth"}, built_truth, "the ground truth")
        data = _prefixed(tensors, "data.")
        parts = tuple(data[str(i)] for i in range(len(data)))
        built = run.data if isinstance(run.data, tuple) else (run.data,)
        kinds = [(t.dtype, t.shape[1:]) for t in parts]
        if meta["data_is_tuple"] != isinstance(run.data, tuple) or kinds != [(t.dtype, t.shape[1:]) for t in built]:
            raise SaveFileError(f"the saved data is not of the kind the {run.kind} run's config builds")
        run.model.load_state_dict(trained)
        run.init_state = init
        run.data = parts if meta["data_is_tuple"] else parts[0]
        run.extra = _prefixed(tensors, "extra.")
        run.ground_truth = tensors.get("ground_truth")
        run.history = [float(v) for v in meta["history"]]
        run.generator.set_state(tensors["rng"])
        if meta["optimizer"] is not None:
            state = _unflatten_optimizer(_prefixed(tensors, "optim."), meta["optimizer"])
            _check_optimizer(state, run.optimizer)
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


_PREFIXES = ("init.", "trained.", "data.", "extra.", "optim.")


def _prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_like(saved: dict[str, Tensor], built: dict[str, Tensor], what: str) -> None:
    """Refuse saved tensors whose names, shapes or dtypes differ from those the config builds."""
    odd = sorted(set(saved) ^ set(built)) or [
        k for k, t in saved.items() if (t.shape, t.dtype) != (built[k].shape, built[k].dtype)
    ]
    if odd:
        raise SaveFileError(
            f"{what} do not match what the run's config builds ({', '.join(odd[:4])} differ); "
            "the file is damaged or from another version"
        )


def _check_optimizer(saved: dict, optimizer: torch.optim.Optimizer) -> None:
    """Refuse a saved optimizer state that does not fit the run's optimizer: other parameter groups or settings
    (numbers may differ, e.g. a changed learning rate, but stay finite and non-negative, betas below 1), state
    for parameters it does not have, of other shapes, or not the same for every parameter."""
    built = optimizer.state_dict()["param_groups"]
    if len(saved["param_groups"]) != len(built):
        raise SaveFileError(f"the saved optimizer has {len(saved['param_groups'])} parameter groups, not {len(built)}")
    for i, (group, own) in enumerate(zip(saved["param_groups"], built)):
        if set(group) != set(own) or group["params"] != own["params"]:
            raise SaveFileError(f"the saved optimizer's parameter group {i} is not that of the run's optimizer")
        for key, value in own.items():
            if not _same_setting(group[key], value, 1.0 if key == "betas" else math.inf):
                raise SaveFileError(f"the saved optimizer setting {key}={group[key]!r} does not fit ({value!r})")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len({frozenset(entries) for entries in saved["state"].values()}) > 1:
        raise SaveFileError("the saved optimizer holds different state for different parameters")
    for idx, entries in saved["state"].items():
        for name, value in entries.items():
            if not 0 <= idx < len(params) or (
                isinstance(value, Tensor) and value.ndim and value.shape != params[idx].shape
            ):
                raise SaveFileError(f"the saved optimizer state {idx}.{name} does not fit the run's parameters")


def _same_setting(saved: Any, built: Any, below: float) -> bool:
    """Whether a saved optimizer setting can stand for the built one: flags and names equal, numbers finite,
    non-negative and below `below`, sequences of such numbers as long."""
    if isinstance(built, bool) or built is None or isinstance(built, str):
        return saved == built
    if isinstance(built, int | float):
        return isinstance(saved, int | float) and not isinstance(saved, bool) and 0 <= saved < below
    if isinstance(built, list | tuple):
        return (
            isinstance(saved, list | tuple)
            and len(saved) == len(built)
            and all(_same_setting(s, b, below) for s, b in zip(saved, built))
        )
    return saved == built


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
        idx, _, name = key.partition(".")
        if not (idx.isdigit() and name):
            raise SaveFileError(f"the optimizer state {key!r} is not named '<parameter index>.<name>'")
        if name in state.get(int(idx), {}):
            raise SaveFileError(f"the optimizer state {key!r} is saved twice")
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
