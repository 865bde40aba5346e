"""The ``efffeat`` command: train a zoo model, analyse it, search its features, compare with baselines, report.

::

    efffeat train tms --out runs/tms              # trains and saves runs/tms/run.safetensors
    efffeat analyse runs/tms --order nlo --report runs/tms/report.html
    efffeat search runs/tms --feature "encoder.weight[1,:]" -k 16
    efffeat compare runs/tms
    efffeat report runs/tms

Exit codes: 0 done; 1 an unexpected failure (a bug: rerun with ``--debug`` for the traceback); 2 bad usage
or bad input (unknown option, missing run, bad path, unknown feature id...). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import traceback
from collections.abc import Callable, Sequence
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
    run = constructor(**options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run.train(steps=args.steps, progress=True)
    path = run.save(out / RUN_FILE)
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in run.evaluate().items())
    print(f"trained {run.kind} for {run.steps_done} steps ({metrics})")
    print(f"saved {path}")


def cmd_analyse(args: argparse.Namespace) -> None:
    run = _load_run(args.dir)
    an = _analysis(run, args.order, args.max_examples, args.by, args.group)
    dual, feats, table = an.dual, an.features, an.table
    completeness = an.completeness_by_order()
    print(f"{run.kind}: {dual.n_features:,} parameters, {feats.n_examples:,} examples, readout {dual.readout.name}")
    print("completeness residual of the dual model (0 = exact):")
    for o, c in completeness.items():
        print(f"  {o:<8} {c:.4g}{'   <- features shown' if o == args.order else ''}")
    print(f"top {min(args.top, len(table))} of {len(table)} by {args.by} (group {args.group}):")
    for row in table.to_records()[: args.top]:
        print(f"  {row['rank']:>3}. {row['id']:<40} {row['score']:.4g}")
    analysis = {
        "order": args.order,
        "by": args.by,
        "group": args.group,
        "completeness": completeness,
        "ranking": table.to_records()[: args.top],
    }
    _write_json(Path(args.dir) / ANALYSIS_FILE, analysis)
    if args.report:
        path = _write_report(run, an, Path(args.report), top=args.dashboards)
        print(f"report: {path}")


def cmd_search(args: argparse.Namespace) -> None:
    from .search import max_activating

    run = _load_run(args.dir)
    settings = _analysis_settings(args.dir)
    dual, data = _dual(run, args.order or settings.get("order", "nlo"), args.max_examples)
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

    run = _load_run(args.dir)
    table = compare(run, methods=tuple(args.methods)) if args.methods else compare(run)
    print(table)
    path = _write_json(Path(args.dir) / COMPARISON_FILE, table.to_records())
    print(f"saved {path}")


def cmd_report(args: argparse.Namespace) -> None:
    run = _load_run(args.dir)
    settings = _analysis_settings(args.dir)
    order = args.order or settings.get("order", "nlo")
    an = _analysis(run, order, args.max_examples, settings.get("by", "contribution"), settings.get("group", "neuron"))
    comparison_path = Path(args.dir) / COMPARISON_FILE
    comparison = json.loads(comparison_path.read_text()) if comparison_path.is_file() else None
    out = Path(args.out) if args.out else Path(args.dir) / REPORT_FILE
    path = _write_report(run, an, out, comparison=comparison, top=args.dashboards)
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


def _dual(run: Any, order: str, max_examples: int) -> tuple[Any, Any]:
    """The run's `DualModel` at `order` and its first `max_examples` analysis examples."""
    from .dual import DualModel

    data = run.data
    if isinstance(data, tuple):
        data = tuple(t[:max_examples] for t in data)
    else:
        data = data[:max_examples]
    return DualModel(run.model, init=run.init_state, readout=run.readout, order=order), data


def _analysis(run: Any, order: str, max_examples: int, by: str, group: str) -> Any:
    """The `Analysis` of a run's first `max_examples` examples at `order`, ranked `by` / `group`."""
    from .analysis import Analysis

    dual, data = _dual(run, order, max_examples)
    return Analysis(dual, data, by=by, group=group)


def _write_report(run: Any, an: Any, path: Path, **options: Any) -> Path:
    from . import viz

    return viz.report(
        an,
        path,
        figures_extra=run.recipe.figures(run),
        dashboard_options=run.recipe.dashboard_options(run),
        title=f"efffeat report: {run.kind}",
        **options,
    )


def _analysis_settings(directory: str) -> dict[str, Any]:
    path = Path(directory) / ANALYSIS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e}); run efffeat analyse {directory} again") from e


def _write_json(path: Path, obj: Any) -> Path:
    from ._atomic import write_text_atomic

    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _label(t: Any) -> str:
    return str(t.item()) if t.numel() == 1 else str(t.tolist())


# ---- argument parsing ------------------------------------------------------------------------------------
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
    from .dual import ORDERS
    from .ranking import CRITERIA, GROUPS

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
        parents=[debug, run_dir, examples],
        help="dual model, completeness, ranking (and a report)",
        description="Compute the effective features of a run, print the completeness of every order and the "
        "top ranked features, save analysis.json, and write the HTML report with --report.",
    )
    p.add_argument("--order", choices=ORDERS, default="nlo", help="order of the effective features (default nlo)")
    p.add_argument("--by", choices=list(CRITERIA), default="contribution", help="ranking score (default contribution)")
    p.add_argument("--group", choices=GROUPS, default="neuron", help="ranking groups (default neuron)")
    p.add_argument("--top", type=_positive, default=10, help="rows of the ranking printed (default 10)")
    p.add_argument("--dashboards", type=_count, default=5, help="feature dashboards in the report")
    p.add_argument("--report", metavar="PATH", default=None, help="write the HTML report to PATH")
    p.set_defaults(func=cmd_analyse)

    p = sub.add_parser(
        "search",
        parents=[debug, run_dir, examples],
        help="examples that activate a feature most",
        description="Print the examples of the run's data with the largest values of one feature.",
    )
    p.add_argument("--feature", required=True, metavar="ID", help="feature or group id, e.g. '0.weight[3,:]'")
    p.add_argument("-k", type=_positive, default=16, help="examples to show (default 16)")
    p.add_argument("--by", choices=("value", "contribution"), default="value", help="value φᴱ or contribution")
    p.add_argument("--bottom", action="store_true", help="the smallest values instead of the largest")
    p.add_argument("--order", choices=ORDERS, default=None, help="order (default: the analysis's, else nlo)")
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
    p.add_argument("--order", choices=ORDERS, default=None, help="order (default: the analysis's, else nlo)")
    p.add_argument("--dashboards", type=_count, default=5, help="feature dashboards in the report")
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
