"""How units meet a ground truth: the score rows recipes give `efffeat.compare` (`Recipe.score`).

Each function turns one method's `Units` into ``{column: value}`` for its row of the `ComparisonTable`.
"""

from __future__ import annotations

from torch import Tensor

from . import metrics


def direction_scores(truth: Tensor, directions: Tensor, in_span: bool = True) -> dict[str, float | int | None]:
    """Directions ``[n, d]`` against true directions ``[n_true, d]`` in the same (input) space.

    ``mmcs``: mean over true directions of the best |cos| to a unit; ``matched``: how many true directions are
    some unit's best match; ``in_span``: the mean fraction of a unit's norm² inside the true span (None when
    `in_span` is False, e.g. when the truth spans the whole space); ``polysemanticity``: the mean effective
    number of true directions a unit mixes (`efffeat.metrics`).
    """
    return {
        "mmcs": metrics.mmcs(truth, directions),
        "matched": metrics.n_matched(truth, directions),
        "in_span": float(metrics.subspace_alignment(directions, truth).mean()) if in_span else None,
        "polysemanticity": float(metrics.polysemanticity(directions, truth).mean()),
    }


def label_scores(functions: Tensor, labels: Tensor, k: int = 20) -> dict[str, float]:
    """Functions ``[N, n]`` over labelled data (``labels [N]``), by their magnitude |unit value|.

    ``purity@k``: the mean fraction of a unit's k largest examples sharing their most common label;
    ``selectivity``: the mean class selectivity (`efffeat.metrics.class_selectivity`).
    """
    magnitude = functions.abs()
    return {
        f"purity@{k}": float(metrics.top_k_purity(magnitude, labels, k).mean()),
        "selectivity": float(metrics.class_selectivity(magnitude, labels).mean()),
    }
