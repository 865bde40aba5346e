"""Effective features against neurons, sparse autoencoders and dictionaries on every zoo model.

Prints one `efffeat.compare` table per model (the tables in docs/validation/baselines.md), plus the known-dictionary
check (Sharkey et al.'s setting, non-negative and signed codes). Every table states the order of the effective
features and the completeness residual of that dual model, per row.

    python scripts/reproduce_baselines.py --quick     # CPU-fast settings (a few minutes)
    python scripts/reproduce_baselines.py             # longer training (TMS at the literature's settings)
    python scripts/reproduce_baselines.py --only digits --only teacher-student
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

import efffeat.zoo as zoo
from efffeat.baselines import dictionary, metrics
from efffeat.baselines.compare import compare

DIRECTIONS = ("effective", "weight-change", "kernel-change", "kernel-subspace", "eigen", "neurons", "agop")
FUNCTIONS = ("effective", "kernel-change", "eigen", "neurons")
DICTIONARIES = ("sae", "pca", "ica", "minibatch-dl", "nmf")
LABELS = ("effective-label", "label-control")


def runs(quick: bool) -> dict[str, tuple[str, zoo.Run, tuple[str, ...]]]:
    """{key: (title, untrained run with its step count in the config, methods)}; seeds other than the defaults."""
    tms_fast = {"lr": 1e-2} if quick else {}
    steps = 500 if quick else 10_000
    directions = DIRECTIONS + DICTIONARIES
    return {
        "tms-pentagon": (
            "TMS (5, 2), S = 0.975 (pentagon)",
            zoo.tms(sparsity=0.975, steps=steps, seed=1, **tms_fast),
            directions,
        ),
        "tms-dense": (
            "TMS (5, 2), S = 0 (dense)",
            zoo.tms(sparsity=0.0, steps=2000 if quick else 10_000, seed=1, **tms_fast),
            directions,
        ),
        "tms-20-5": (
            "TMS (20, 5), importance 0.7, S = 0.9",
            zoo.tms(20, 5, sparsity=0.9, importance=0.7, steps=2000 if quick else 10_000, seed=1, **tms_fast),
            directions,
        ),
        "teacher-student": (
            "teacher–student y = z1·z2 (d = 20, k = 2)",
            zoo.teacher_student(steps=1000 if quick else 2000, seed=1),
            directions,
        ),
        "digits": (
            "digits MLP (64-32-10), label-free",
            zoo.digits_mlp(steps=1000 if quick else 2000, seed=1),
            FUNCTIONS + DICTIONARIES + LABELS,
        ),
        "modular-addition": (
            "modular addition (p = 23, not grokked)",
            zoo.modular_addition(p=23, train_fraction=0.5, steps=300 if quick else 1500, seed=1),
            FUNCTIONS + DICTIONARIES,
        ),
    }


def known_dictionary() -> str:
    """MMCS against the atoms of a known dictionary: 64 atoms in 32 dims, 3 active per sample."""
    from sklearn.datasets import make_sparse_coded_signal

    X, atoms, codes = make_sparse_coded_signal(
        n_samples=2048, n_components=64, n_features=32, n_nonzero_coefs=3, random_state=0
    )
    lines = ["| codes | sae | minibatch-dl | ica | pca |", "|---|---|---|---|---|"]
    for name, data in (("non-negative (|codes|)", np.abs(codes) @ atoms), ("signed", X)):
        row = []
        for method, kw in (
            ("sae", {"l1": 0.3, "steps": 1000, "lr": 1e-2, "batch_size": 512}),
            ("minibatch-dl", {"alpha": 0.3, "max_iter": 5, "positive_code": name != "signed"}),
            ("ica", {}),
            ("pca", {}),
        ):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row.append(metrics.mmcs(atoms, dictionary(data, method, 64, **kw).components_))
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU-fast settings")
    parser.add_argument("--order", default="path", help="effective-feature order (default path)")
    parser.add_argument("--nodes", type=int, default=4, help="Gauss–Legendre nodes of the path order")
    parser.add_argument("--only", action="append", help="run only these models (keys of runs())")
    parser.add_argument("--no-dictionary", action="store_true", help="skip the known-dictionary check")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # these models are tiny; one thread is fastest
    warnings.filterwarnings("ignore", message=".*(converge|Objective did not).*")  # scikit-learn's lasso sub-solver
    if not args.no_dictionary and not args.only:
        print("## Known dictionary (MMCS to the true atoms)\n")
        print(known_dictionary())
    chosen = runs(args.quick)
    for key in args.only or list(chosen):
        title, run, methods = chosen[key]
        start = time.perf_counter()
        run.train(progress=False)
        trained = time.perf_counter() - start
        quality = ", ".join(f"{k} {v:.3g}" for k, v in run.evaluate().items())
        sae = {"sae": {"steps": 1000, "l1": 0.1}}
        table = compare(run, methods=methods, order=args.order, nodes=args.nodes, method_options=sae)
        print(f"\n## {title}\n\n{run.config['steps']} steps in {trained:.0f} s; {quality}\n")
        print(table)


if __name__ == "__main__":
    main()
