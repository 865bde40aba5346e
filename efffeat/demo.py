"""``python -m efffeat.demo`` (``make demo``): train a small toy model of superposition, analyse it, write the report.

Trains 5 sparse features into 2 hidden dimensions (the pentagon of Elhage et al.), prints the completeness of the
dual model at every order and the top ranked input features, and writes ``runs/demo/report.html``. Training moves
this model far from its initialisation, so the expansions around θ0 (``init``, ``nlo``) and θ* (``trained``)
leave a large residual and the report shows the ``path`` features, the exact dual of the trained network. The
same as::

    efffeat train tms --out runs/demo --force --steps 1500 --set lr=0.01 --set batch_size=256 --set n_data=512
    efffeat analyse runs/demo --order path --group input --report runs/demo/report.html
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import cli

# Fast settings of the default TMS (5 features, 2 hidden, sparsity 0.9): the pentagon in ~1500 steps.
TRAIN_OPTIONS = ("--set", "lr=0.01", "--set", "batch_size=256", "--set", "n_data=512")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m efffeat.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="directory of the run and its report (runs/demo)")
    parser.add_argument("--steps", default="1500", help="training steps (1500)")
    parser.add_argument("--seed", default="0", help="random seed (0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a 15-parameter model: threads only add synchronisation
    out = Path(args.out)
    train = ["train", "tms", "--out", str(out), "--force", "--steps", args.steps, "--seed", args.seed]
    code = cli.main([*train, *TRAIN_OPTIONS])  # --force: each demo replaces the last
    if code:
        return code
    report = out / cli.REPORT_FILE
    return cli.main(["analyse", str(out), "--order", "path", "--group", "input", "--report", str(report)])


if __name__ == "__main__":
    sys.exit(main())
