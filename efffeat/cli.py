"""The ``efffeat`` command: train a zoo model, analyse it, search its features, compare with baselines, report.

::

    efffeat train tms --out runs/tms              # trains and saves runs/tms/run.safetensors
    efffeat analyse runs/tms --report runs/tms/report.html   # --order auto: nlo, else path with nodes
    efffeat search runs/tms --feature "encoder.weight[1,:]" -k 16
    efffeat compare runs/tms
    efffeat report runs/tms

Your own model: a factory that builds it (``pkg.module:function`` or ``path/to/file.py:function``, called with
no arguments, returning an ``nn.Module``), its weights at initialisation and after training (``.safetensors``,
or ``.pt`` files of a ``state_dict`` read with ``torch.load(weights_only=True)``, so no code in them runs) and
the data (a tensor, a tuple of tensors or a dict of tensors, in a ``.pt`` or ``.safetensors`` file)::

    efffeat analyse out/ --model mypkg.models:build --init init.pt --trained trained.pt --data data.pt

writes the same table, ``out/analysis.json`` and ``--report`` as for a zoo run; ``efffeat search out/`` and
``efffeat report out/`` then analyse the same model and files again (``analysis.json`` names them).
``--init-kind pretrained`` says that θ0 are pretrained weights that were fine-tuned (``other``: θ0 is no
initialisation at all), and every result says so.

Exit codes: 0 done; 1 an unexpected failure (a bug: rerun with ``--debug`` for the traceback); 2 bad usage
or bad input (unknown option, a value out of range, missing run, bad path or file, unknown feature id, a full
disk...). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import pickle
import sys
import traceback
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_FILE = "run.safetensors"
ANALYSIS_FILE = "analysis.json"
COMPARISON_FILE = "comparison.json"
REPORT_FILE = "report.html"

# CLI name -> (zoo constructor, what it trains)
MODELS = {
    "tms": ("tms", "toy model of superposition (5 features in 2 dimensions by default)"),
    "digits": ("digits_mlp", "MLP on scikit-learn's 8×8 digits"),
    "teacher": ("teacher_student", "student MLP learning a planted 2-d teacher"),
    "modadd": ("modular_addition", "one-layer transformer on (a + b) mod p"),
}


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


@dataclass
class Subject:
    """What a command analyses: a network with its θ0, readout and data, and what its report adds.

    A zoo run (`from_run`) or a user's model and files (`_own_model`).
    """

    name: str
    model: Any  # nn.Module, its parameters at θ*
    init: dict[str, Any]  # θ0, a state_dict
    readout: Any
    data: Any
    figures: Callable[[], dict[str, Any]] = dict  # {title: figure} of the report
    dashboard_options: dict[str, Any] = field(default_factory=dict)
    init_kind: str = "initialisation"
    files: dict[str, str] | None = None  # your own model: --model and the files, as analysis.json keeps them

    @staticmethod
    def from_run(run: Any) -> Subject:
        return Subject(
            run.kind,
            run.model,
            run.init_state,
            run.readout,
            run.data,
            lambda: run.recipe.figures(run),
            run.recipe.dashboard_options(run),
        )


# ---- commands --------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> None:
    from . import zoo

    constructor = getattr(zoo, MODELS[args.model][0])
    options = dict(args.set)
    if args.seed is not None:
        options["seed"] = args.seed
    known = inspect.signature(constructor).parameters
    unknown = [k for k in options if k not in known]
    if unknown:
        raise UsageError(f"{args.model} has no option {', '.join(unknown)}; its options: {', '.join(known)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is a file; pass a directory for the run")
    if (out / RUN_FILE).exists() and not args.force:
        raise UsageError(f"{out / RUN_FILE} already exists; pass --force to overwrite it, or choose another --out")
    run = constructor(**options)  # checks every option before anything is built
    if args.steps is not None:
        from .zoo.run import STEPS

        STEPS("--steps", args.steps)
    out.mkdir(parents=True, exist_ok=True)
    run.train(steps=args.steps, progress=True)
    path = run.save(out / RUN_FILE)
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in run.evaluate().items())
    print(f"trained {run.kind} for {run.steps_done} steps ({metrics})")
    print(f"saved {path}")


def cmd_analyse(args: argparse.Namespace) -> None:
    own = [f"--{k}" for k in ("init", "trained", "data") if getattr(args, k) is not None]
    if args.model is None and own:
        raise UsageError(
            f"{', '.join(own)} {'is' if len(own) == 1 else 'are'} for your own model: add --model MODULE:FUNCTION"
        )
    if args.model is None and args.init_kind is not None:
        raise UsageError("--init-kind is for your own model (a zoo run starts from its initialisation)")
    subject = _own_model(args) if args.model is not None else Subject.from_run(_load_run(args.dir))
    if args.readout is not None:
        subject.readout = args.readout
    an = _analysis(subject, args.order, args.max_examples, args.by, args.group, args.nodes, args.change)
    dual, feats, table = an.dual, an.features, an.table
    completeness = an.completeness_by_order()
    print(f"{subject.name}: {dual.n_features:,} parameters, {feats.n_examples:,} examples, readout {dual.readout.name}")
    order = an.order
    nodes = f" ({dual.nodes} nodes)" if order == "path" else ""
    print(f"order {order}{nodes}: {an.order_reason}")
    for note in an.notes:
        print(f"note: {note}")
    print("completeness residual of the dual model (0 = exact):")
    for o, c in completeness.items():
        print(f"  {o:<8} {c:.4g}{'   <- features shown' if o == order else ''}")
    print(f"top {min(args.top, len(table))} of {len(table)} by {args.by} (group {args.group}):")
    for row in table.to_records()[: args.top]:
        print(f"  {row['rank']:>3}. {row['id']:<40} {row['score']:.4g}")
    change = an.kernel_change
    if change is not None:
        print(f"kernel change ΔΘ = Θ_{order} − Θ_init, top {len(change)} modes (centred, by |λ|):")
        for i in range(len(change)):
            where = ", ".join(f"{name} {share:.0%}" for name, share in list(change.tensor_shares(i).items())[:3])
            print(f"  {i:>3}. λ {float(change.values[i]):<11.4g} {where}")
    analysis = {
        "order": order,
        "order_reason": an.order_reason,
        "nodes": dual.nodes,
        "by": args.by,
        "group": args.group,
        "completeness": completeness,
        "ranking": table.to_records()[: args.top],
    }
    if subject.files is not None:
        analysis["model"] = subject.files
    _write_json(Path(args.dir) / ANALYSIS_FILE, analysis)
    if args.report:
        path = _write_report(subject, an, Path(args.report), top=args.dashboards)
        print(f"report: {path}")


def cmd_search(args: argparse.Namespace) -> None:
    from .dual import AUTO
    from .search import max_activating

    settings = _analysis_settings(args.dir)
    subject = _subject(args.dir, settings)
    order = args.order or settings.get("order", AUTO)
    dual, data = _dual(subject, order, args.max_examples, settings.get("nodes", 4))
    top = max_activating(dual, data, [args.feature], k=args.k, by=args.by, largest=not args.bottom)
    entry = top[args.feature]
    labels = data[1] if isinstance(data, tuple) and len(data) > 1 else None
    print(f"{'bottom' if args.bottom else 'top'} {args.k} examples of {args.feature} by {args.by}:")
    for i, (index, value) in enumerate(zip(entry.indices.tolist(), entry.values.tolist())):
        extra = f"  component {int(entry.components[i])}" if entry.components is not None else ""
        label = f"  label {_label(labels[index])}" if labels is not None else ""
        print(f"  {i + 1:>3}. example {index:<6} value {value:.4g}{label}{extra}")


def cmd_compare(args: argparse.Namespace) -> None:
    from .baselines.compare import compare

    if not (Path(args.dir) / RUN_FILE).is_file() and "model" in _analysis_settings(args.dir):
        raise UsageError(
            "compare scores against a zoo run's ground truth; for your own model call "
            "ef.compare(dual, data, probe=..., labels=...) or truth=... in Python"
        )
    run = _load_run(args.dir)
    table = compare(run, methods=tuple(args.methods)) if args.methods else compare(run)
    print(table)
    path = _write_json(Path(args.dir) / COMPARISON_FILE, table.to_records())
    print(f"saved {path}")


def cmd_report(args: argparse.Namespace) -> None:
    from .dual import AUTO

    settings = _analysis_settings(args.dir)
    subject = _subject(args.dir, settings)
    order = args.order or settings.get("order", AUTO)
    by, group = settings.get("by", "contribution"), settings.get("group", "neuron")
    an = _analysis(subject, order, args.max_examples, by, group, settings.get("nodes", 4), args.change)
    comparison = _comparison(args.dir)
    out = Path(args.out) if args.out else Path(args.dir) / REPORT_FILE
    path = _write_report(subject, an, out, comparison=comparison, top=args.dashboards)
    print(f"report: {path}")


# ---- shared steps ----------------------------------------------------------------------------------------
def _load_run(directory: str) -> Any:
    from .zoo import load

    path = Path(directory)
    if not path.is_dir():
        raise UsageError(f"{directory!r} is not a directory; train a run first: efffeat train tms --out {directory}")
    if not (path / RUN_FILE).is_file():
        raise UsageError(
            f"no run in {directory!r} (no {RUN_FILE}); train one first: efffeat train tms --out {directory}"
        )
    return load(path / RUN_FILE)


def _subject(directory: str, settings: dict[str, Any]) -> Subject:
    """What `directory` holds: a zoo run, or your own model and files as ``efffeat analyse --model`` named them."""
    if (Path(directory) / RUN_FILE).is_file() or "model" not in settings:
        return Subject.from_run(_load_run(directory))
    files = settings["model"]
    args = argparse.Namespace(dir=directory, **{k: files.get(k) for k in ("model", "init", "trained", "data")})
    args.init_kind = files.get("init_kind")
    subject = _own_model(args)
    subject.readout = files.get("readout", "output")
    return subject


def _dual(subject: Subject, order: str, max_examples: int, nodes: int = 4) -> tuple[Any, Any]:
    """The subject's `DualModel` at `order` and its first `max_examples` examples."""
    from .dual import DualModel

    data = subject.data
    if isinstance(data, tuple):
        data = tuple(t[:max_examples] for t in data)
    elif isinstance(data, dict):
        data = {k: t[:max_examples] for k, t in data.items()}
    else:
        data = data[:max_examples]
    dual = DualModel(
        subject.model, init=subject.init, readout=subject.readout, order=order, nodes=nodes, init_kind=subject.init_kind
    )
    return dual, data


def _analysis(
    subject: Subject, order: str, max_examples: int, by: str, group: str, nodes: int = 4, n_change: int = 10
) -> Any:
    """The `Analysis` of the subject's first `max_examples` examples at `order`, ranked `by` / `group`."""
    from .analysis import Analysis

    dual, data = _dual(subject, order, max_examples, nodes)
    return Analysis(dual, data, by=by, group=group, n_change=n_change)


def _write_report(subject: Subject, an: Any, path: Path, **options: Any) -> Path:
    from . import viz

    return viz.report(
        an,
        path,
        figures_extra=subject.figures(),
        dashboard_options=subject.dashboard_options,
        title=f"efffeat report: {subject.name}",
        **options,
    )


# ---- the files the commands read ---------------------------------------------------------------------------
def _read_json(path: Path, check: Callable[[Any, str], Any], fix: str) -> Any:
    """The JSON in `path`, checked by `check` (an `efffeat.io` check); one-line `UsageError` otherwise."""
    from .errors import SaveFileError

    try:
        return check(json.loads(path.read_text(encoding="utf-8")), path.name)
    except (ValueError, RecursionError, SaveFileError) as e:  # bad UTF-8, bad JSON, a wrong value
        raise UsageError(f"{path} is not what efffeat wrote there ({_one_line(e)[:200]}); {fix}") from None


def _analysis_settings(directory: str) -> dict[str, Any]:
    """``analysis.json`` of a run directory (its order, ranking criterion and group), or {} if there is none."""
    from . import io
    from .dual import INIT_KINDS, ORDERS
    from .ranking import CRITERIA, GROUPS

    path = Path(directory) / ANALYSIS_FILE
    if not path.is_file():
        return {}

    def readout(value: Any, where: str) -> str | int:
        return value if value == "output" else io.whole()(value, where)

    def check(value: Any, where: str) -> dict[str, Any]:
        fields = {
            "order": io.text(ORDERS),
            "by": io.text(tuple(CRITERIA)),
            "group": io.text(GROUPS),
            "completeness": io.dict_of(io.number(finite=False)),
            "ranking": io.list_of(io.dict_of()),
        }
        model = {"model": io.text(), "init": io.text(), "trained": io.text(), "data": io.text()}
        model_options = {"init_kind": io.text(INIT_KINDS), "readout": readout}
        optional = {
            "order_reason": io.text(),
            "nodes": io.whole(minimum=1),
            "model": lambda v, w: io.record(v, w, model, model_options),
        }
        return io.record(value, where, fields, optional)

    return _read_json(path, check, f"run efffeat analyse {directory} again")


def _comparison(directory: str) -> list[dict[str, Any]] | None:
    """The records of ``comparison.json`` of a run directory, or None if there is none."""
    from .baselines.compare import ComparisonTable

    path = Path(directory) / COMPARISON_FILE
    if not path.is_file():
        return None

    def check(value: Any, where: str) -> Any:
        ComparisonTable.validate_state({}, {"rows": value, "meta": {}})
        return value

    return _read_json(path, check, f"run efffeat compare {directory} again")


# ---- your own model ---------------------------------------------------------------------------------------
def _own_model(args: argparse.Namespace) -> Subject:
    """The model `--model` builds with the `--trained` weights, its `--init` state and the `--data`."""
    from torch import nn

    missing = [f"--{k}" for k in ("init", "trained", "data") if getattr(args, k) is None]
    if missing:
        raise UsageError(f"--model needs {', '.join(missing)} too (the weights at init, after training, the data)")
    build = _factory(args.model)
    init = _state_dict(args.init, "--init")
    trained = _state_dict(args.trained, "--trained")
    data = _data_file(args.data)
    try:
        model = build()
    except Exception as e:
        raise UsageError(f"--model {args.model}() failed: {type(e).__name__}: {_one_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {args.model}() returned a {type(model).__name__}, not a torch.nn.Module")
    _check_weights(trained, model.state_dict(), args.trained)
    _check_weights(init, model.state_dict(), args.init)
    model.load_state_dict(trained)
    model.eval()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    files = {
        "model": _absolute(args.model),
        "init": str(Path(args.init).resolve()),
        "trained": str(Path(args.trained).resolve()),
        "data": str(Path(args.data).resolve()),
        "init_kind": args.init_kind or "initialisation",
    }
    if getattr(args, "readout", None) is not None:
        files["readout"] = args.readout
    return Subject(args.model, model, init, "output", data, init_kind=files["init_kind"], files=files)


def _absolute(spec: str) -> str:
    """`spec` with a ``file.py`` made absolute, so that later commands find it from any directory."""
    target, _, name = spec.rpartition(":")
    return f"{Path(target).resolve()}:{name}" if target.endswith(".py") else spec


def _factory(spec: str) -> Callable[[], Any]:
    """The function `spec` names: ``pkg.module:function`` (imported) or ``path/to/file.py:function``."""
    target, sep, name = spec.rpartition(":")
    if not (sep and target and name.isidentifier()):
        raise UsageError(f"--model takes pkg.module:function or path/to/file.py:function, got {spec!r}")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UsageError(f"--model: {target!r} is not a file")
            loader_spec = importlib.util.spec_from_file_location(f"_efffeat_model_{path.stem}", path)
            if loader_spec is None or loader_spec.loader is None:
                raise UsageError(f"--model: {target!r} cannot be imported as a Python file")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except UsageError:
        raise
    except Exception as e:  # an import error, or any error raised by the module's own code
        raise UsageError(f"--model: cannot import {target!r} ({type(e).__name__}: {_one_line(e)})") from e
    build = getattr(module, name, None)
    if not callable(build):
        raise UsageError(f"--model: {target!r} has no function {name!r}")
    return build


def _tensor_file(path_text: str, option: str) -> Any:
    """What a ``.safetensors`` or ``torch.save`` file holds, read without running any code in it."""
    import torch
    from safetensors.torch import load_file

    path = Path(path_text)
    if not path.is_file():
        raise UsageError(f"{option} {path_text!r} is not a file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
            raise UsageError(f"{option} {path_text!r} is not a torch.save or safetensors file of tensors") from None
        raise UsageError(
            f"{option} {path_text!r} holds objects other than tensors, which efffeat does not load (it reads "
            "torch.save files with weights_only=True, so no code in them runs); save tensors only"
        ) from None
    except Exception as e:  # safetensors' and pickle's own errors for damaged or foreign files
        raise UsageError(
            f"{option} {path_text!r} cannot be read as tensors ({type(e).__name__}: {_one_line(e)[:200]}); save it "
            "with torch.save or safetensors"
        ) from e


def _state_dict(path_text: str, option: str) -> dict[str, Any]:
    from torch import Tensor

    state = _tensor_file(path_text, option)
    if not (
        isinstance(state, dict)
        and state
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        raise UsageError(f"{option} {path_text!r} must hold a state_dict {{name: tensor}} (model.state_dict())")
    return state


def _check_weights(state: dict[str, Any], expected: dict[str, Any], path_text: str) -> None:
    """Refuse a state_dict whose names or shapes are not the model's."""
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unknown or shapes:
        parts = [
            f"{what} {', '.join(keys[:4])}"
            for what, keys in (("missing", missing), ("unexpected", unknown), ("of another shape", shapes))
            if keys
        ]
        raise UsageError(f"{path_text!r} does not fit the model: {'; '.join(parts)}")


def _data_file(path_text: str) -> Any:
    """The data: a tensor, a tuple of tensors or a dict of tensors, each with one row per example."""
    from torch import Tensor

    data = _tensor_file(path_text, "--data")
    items = data if isinstance(data, tuple) else list(data.values()) if isinstance(data, dict) else [data]
    if not (
        items
        and all(isinstance(t, Tensor) and t.ndim for t in items)
        and (not isinstance(data, dict) or all(isinstance(k, str) for k in data))
    ):
        raise UsageError(
            f"--data {path_text!r} must hold a tensor, a tuple of tensors or a dict of tensors with one row per "
            f"example, got {type(data).__name__}"
        )
    return data


def _write_json(path: Path, obj: Any) -> Path:
    from ._atomic import write_text_atomic

    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _label(t: Any) -> str:
    return str(t.item()) if t.numel() == 1 else str(t.tolist())


# ---- argument parsing ------------------------------------------------------------------------------------
def _readout(text: str) -> str | int:
    """An argparse type: ``output`` or an integer output index."""
    if text == "output":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'output' or an output index, got {text!r}") from None


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _integer(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer ≥ `minimum` (1: a positive integer, 0: a count)."""
    kind = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {value}")
        return value

    return parse


_positive, _count = _integer(1), _integer(0)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .dual import AUTO, INIT_KINDS, ORDERS
    from .ranking import CRITERIA, GROUPS
    from .search import BY as SEARCH_BY

    parser = _Parser(
        prog="efffeat",
        description="Interpretability with effective features: train, analyse, search, compare and report.",
        epilog="Exit codes: 0 ok, 1 unexpected failure (use --debug), 2 bad usage or input.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    run_dir = argparse.ArgumentParser(add_help=False)
    run_dir.add_argument("dir", metavar="DIR", help="the run's directory (written by efffeat train)")
    examples = argparse.ArgumentParser(add_help=False)
    examples.add_argument(
        "--max-examples", type=_positive, default=2000, help="use the first N examples of the run's data (2000)"
    )

    p = sub.add_parser(
        "train", parents=[debug], help="train a zoo model and save it", description="Train a zoo model and save it."
    )
    p.add_argument("model", choices=list(MODELS), help="; ".join(f"{k}: {v[1]}" for k, v in MODELS.items()))
    p.add_argument("--out", required=True, metavar="DIR", help="directory to save the run in (created)")
    p.add_argument("--force", action="store_true", help="overwrite a run already saved in --out")
    p.add_argument("--steps", type=_count, default=None, help="training steps (default: the model's own)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument(
        "--set",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="constructor option, e.g. --set n_features=20 --set sparsity=0.97 (repeatable)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "analyse",
        aliases=["analyze"],
        parents=[debug, examples],
        help="dual model, completeness, ranking (and a report)",
        description="Compute the effective features of a run (or of your own model: --model, --init, --trained, "
        "--data), print the completeness of every order and the top ranked features, save analysis.json, and "
        "write the HTML report with --report.",
    )
    p.add_argument(
        "dir", metavar="DIR", help="the run's directory (written by efffeat train); with --model, where to write"
    )
    own = p.add_argument_group("your own model")
    own.add_argument(
        "--model", metavar="MODULE:FUNCTION", help="pkg.module:function or file.py:function (no arguments)"
    )
    own.add_argument("--init", metavar="FILE", help="its state_dict at initialisation (.safetensors or .pt)")
    own.add_argument("--trained", metavar="FILE", help="its state_dict after training (.safetensors or .pt)")
    own.add_argument("--data", metavar="FILE", help="a tensor, a tuple or a dict of tensors (.pt or .safetensors)")
    own.add_argument(
        "--readout", type=_readout, default=None, help="'output' (default) or an output index (default: the run's)"
    )
    own.add_argument(
        "--init-kind",
        choices=INIT_KINDS,
        default=None,
        help="what --init is: initialisation (default), pretrained (then fine-tuned), other (no initialisation)",
    )
    p.add_argument(
        "--order",
        choices=(AUTO, *ORDERS),
        default=AUTO,
        help="order of the effective features (default auto: nlo if its residual is ≤ 0.1, else path)",
    )
    p.add_argument("--nodes", type=_positive, default=4, help="Gauss–Legendre nodes of path (auto: the first tried)")
    p.add_argument("--by", choices=list(CRITERIA), default="contribution", help="ranking score (default contribution)")
    p.add_argument("--group", choices=GROUPS, default="neuron", help="ranking groups (default neuron)")
    p.add_argument("--top", type=_positive, default=10, help="rows of the ranking printed (default 10)")
    p.add_argument("--dashboards", type=_count, default=5, help="feature dashboards in the report")
    p.add_argument("--report", metavar="PATH", default=None, help="write the HTML report to PATH")
    p.add_argument("--change", type=_count, default=10, help="modes of the kernel change ΔΘ shown (default 10)")
    p.set_defaults(func=cmd_analyse)

    p = sub.add_parser(
        "search",
        parents=[debug, run_dir, examples],
        help="examples that activate a feature most",
        description="Print the examples of the run's data with the largest values of one feature.",
    )
    p.add_argument("--feature", required=True, metavar="ID", help="feature or group id, e.g. '0.weight[3,:]'")
    p.add_argument("-k", type=_positive, default=16, help="examples to show (default 16)")
    p.add_argument(
        "--by", choices=SEARCH_BY, default="value", help="value φᴱ, contribution Δθ·φᴱ, or a group's norm ‖φᴱ_G‖"
    )
    p.add_argument("--bottom", action="store_true", help="the smallest values instead of the largest")
    p.add_argument("--order", choices=ORDERS, default=None, help="order (default: the analysis's, else auto)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "compare",
        parents=[debug, run_dir],
        help="effective features against baselines",
        description="Score effective features and baselines against the run's ground truth; save comparison.json.",
    )
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD", help="methods to compare (default: all)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "report",
        parents=[debug, run_dir, examples],
        help="write the HTML report",
        description="Write the run's HTML report (DIR/report.html), with the comparison when compare was run.",
    )
    p.add_argument("--out", metavar="PATH", default=None, help="where to write it (default DIR/report.html)")
    p.add_argument("--order", choices=ORDERS, default=None, help="order (default: the analysis's, else auto)")
    p.add_argument("--dashboards", type=_count, default=5, help="feature dashboards in the report")
    p.add_argument("--change", type=_count, default=10, help="modes of the kernel change ΔΘ (default 10)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 unexpected failure, 2 bad usage or input)."""
    from .errors import EfffeatError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed usage and the error (2) or the help (0)
        return int(e.code or 0)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (UsageError, EfffeatError, OSError) as e:
        _fail(args, e, f"efffeat {args.command}: error: {_one_line(e)}")
        return 2
    except KeyboardInterrupt:
        print("efffeat: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        hint = "" if args.debug else " (rerun with --debug for the traceback)"
        _fail(args, e, f"efffeat {args.command}: unexpected error: {type(e).__name__}: {_one_line(e)}{hint}")
        return 1
    return 0


def _fail(args: argparse.Namespace, error: BaseException, line: str) -> None:
    if args.debug:
        traceback.print_exception(error)
    print(line, file=sys.stderr)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
