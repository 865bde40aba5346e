"""Reference models that keep their initialisation: toy models of superposition, a teacher–student MLP, a digits
MLP and a modular-addition transformer; and `minilm`, the pretrained all-MiniLM-L6-v2 (the ``examples`` extra)
fine-tuned offline on a word-property task, with the measurements of what the fine-tune changed. Each of the
first four constructors returns an untrained `Run`; ``run.train()`` trains it,
``run.save(path)`` / `load` keep it. Each kind's `Recipe` also says where `efffeat.compare` probes it, how its
units are scored, and which figures its report shows (``run.recipe.figures(run)``: `tms_geometry_figure`,
`fourier_figure`).
"""

from __future__ import annotations

from . import minilm
from .digits import correct_logit, digits_mlp
from .modular_addition import all_pairs, embedding, fourier_figure, modular_addition, run_key_frequencies
from .run import Run, load
from .teacher_student import teacher_student
from .tms import ToyModel, tms, tms_geometry_figure

__all__ = [
    "Run",
    "ToyModel",
    "all_pairs",
    "correct_logit",
    "digits_mlp",
    "embedding",
    "fourier_figure",
    "load",
    "minilm",
    "modular_addition",
    "run_key_frequencies",
    "teacher_student",
    "tms",
    "tms_geometry_figure",
]
