"""How units meet a ground truth: the score rows recipes give `efffeat.compare` (`Recipe.score`).

Each function turns one method's units into ``{column: value}`` for its row of the `ComparisonTable`.
"""

from __future__ import annotations

from torch import Tensor

from . import metrics


def direction_scores(
    truth: Tensor, directions: Tensor, in_span: bool = True, subspace: bool = False
) -> dict[str, float | int | None]:
    """Directions ``[n, d]`` (ordered, best first) against true directions ``[n_true, d]`` in the same space.

    ``mmcs``: mean over true directions of the best |cos| to a unit; ``matched``: how many true directions are
    some unit's best match; ``in_span``: the mean fraction of a unit's norm² inside the true span (None when
    `in_span` is False, e.g. when the truth spans the whole space); ``polysemanticity``: the mean effective
    number of true directions a unit mixes (`efffeat.metrics`).

    subspace: the truth is a subspace, not a basis (any rotation of it is as true): add ``share``, the share of
    it the top-``n_true`` units span (`efffeat.metrics.subspace_share`, mean cos² of the principal angles), and
    ``recall``, the same for the span of all the units. MMCS against one basis of a subspace rewards the
    methods that happen to pick that rotation.
    """
    out: dict[str, float | int | None] = {
        "mmcs": metrics.mmcs(truth, directions),
        "matched": metrics.n_matched(truth, directions),
        "in_span": float(metrics.subspace_alignment(directions, truth).mean()) if in_span else None,
        "polysemanticity": float(metrics.polysemanticity(directions, truth).mean()),
    }
    if subspace:
        k = truth.shape[0]
        out["share"] = metrics.subspace_share(directions[:k], truth) if directions.shape[0] >= k else None
        out["recall"] = metrics.subspace_share(directions, truth)
    return out


def label_scores(functions: Tensor, labels: Tensor, k: int = 20) -> dict[str, float]:
    """Functions ``[N, n]`` over labelled data (``labels [N]``).

    ``purity@k``: the mean fraction of a unit's k largest examples by |value| sharing their most common label;
    ``purity@k ±``: the same with each signed function counted as its two ends, the first ⌈n/2⌉ functions
    (`efffeat.metrics.signed_ends`; non-negative functions as they are), so every method spends n units;
    ``selectivity``: the mean class selectivity of |value| (`efffeat.metrics.class_selectivity`).
    """
    magnitude = functions.abs()
    return {
        f"purity@{k}": float(metrics.top_k_purity(magnitude, labels, k).mean()),
        f"purity@{k} ±": float(metrics.top_k_purity(metrics.signed_ends(functions), labels, k).mean()),
        "selectivity": float(metrics.class_selectivity(magnitude, labels).mean()),
    }
