"""`feature_dashboard`: one feature, group, eigenfeature or neuron on one page.

Top and bottom examples, the distribution of its values and of its contributions over the data, the weight
and Δθ pictures, its rank and score, and the completeness of the order the features were computed at.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from ..errors import ConfigError, DataError, FeatureIdError
from ..groups import group_positions, n_heads_of
from ._inputs import Examples, as_examples, as_image, to_numpy, top_bottom

TEMPLATE = "plotly_white"
VALUE_COLOR = "#3b6fb6"
CONTRIBUTION_COLOR = "#d1752b"


@dataclass
class FeatureView:
    """What the dashboard draws for one feature, already evaluated over the data.

    values: ``[N]`` the feature's value per example; contributions: ``[N]`` its contribution to the readout
    change per example (None where it has none); pictures: ``[(title, [H, W] array)]`` of the parameters
    `picture_name`; delta_z: ``[N]`` the readout change Δz the contributions of all features add up to.
    """

    label: str
    values: np.ndarray
    contributions: np.ndarray | None
    pictures: list[tuple[str, np.ndarray]]
    value_name: str = "value φᴱ"
    note: str = ""
    delta_z: np.ndarray | None = None  # [N] the readout change the contributions add up to
    mark: tuple[int, int] | None = None  # (row, col) of the single entry in the pictures
    picture_name: str = ""


def feature_dashboard(
    dual: Any,
    feature: str | int,
    topk: Any = None,
    data: Any = None,
    *,
    features: Any = None,
    table: Any = None,
    eigen: Any = None,
    completeness: float | None = None,
    n_examples: int = 8,
    component: int | None = None,
    input_kind: str | None = None,
    image_shape: tuple[int, int] | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> go.Figure:
    """A plotly figure describing one feature.

    Args:
        dual: the `DualModel` (its Δθ gives the weight pictures; its features of `data` are computed when
            `features` is not given).
        feature: a feature id (``"0.weight[3,12]"``), a group id (a neuron ``"0.weight[3,:]"``, an input
            ``"0.weight[:,12]"``, a tensor ``"0.weight"``) or, with `eigen`, the index of an eigenfeature.
        topk: an ``ef.max_activating`` result holding this feature; its top examples are shown when given.
        data: the examples, a tensor of inputs or an ``(inputs, targets)`` tuple (targets are shown as labels).
        features: `EffectiveFeatures` of `data`, to avoid recomputing them; or ``ef.baselines.neurons(...)``
            activations, and `feature` one of their ids (``"1[3]"``) to show a neuron.
        table: an ``ef.rank`` `FeatureTable`; the feature's rank and score are read from it.
        eigen: ``ef.eigenfeatures`` of `data`; `feature` is then an eigenfeature index.
        completeness: the dual model's completeness residual at the features' order, when already known
            (an `efffeat.Analysis` has it); computed from `features` otherwise.
        n_examples: top and bottom examples shown.
        component: readout component drawn for a vector readout; by default the one the feature contributes
            most to.
        input_kind: ``"image" | "tokens" | "table"`` (guessed from the data when None); image_shape: ``(H, W)``;
            decode: ``tokens -> str`` for token inputs.

    Example::

        feats = dual.features(x)
        table = ef.rank(feats, by="contribution", group="neuron")
        ef.viz.feature_dashboard(dual, table.ids[0], data=x, features=feats, table=table).show()
    """
    if data is None:
        raise DataError("feature_dashboard needs data=: the tensor of inputs (or (inputs, targets)) to draw examples")
    if not isinstance(n_examples, int) or n_examples < 1:
        raise ConfigError(f"n_examples must be a positive integer, got {n_examples!r}")
    examples = as_examples(data, input_kind, image_shape, decode)
    if hasattr(feature, "source") and hasattr(feature, "index"):  # an eigenfeature handle, eig[i]
        eigen, feature = feature.source, feature.index
    if eigen is not None:
        view = _eigen_view(dual, eigen, feature, component, examples)
        rank_text = f"eigenfeature {int(feature)} of {len(eigen.values)}, eigenvalue {float(eigen.values[feature]):.4g}"
        order = eigen.meta.get("order")
    else:
        if features is None:
            features = dual.features(data)
        if getattr(features, "delta", None) is None:  # neurons (ef.baselines.neurons): values, no contributions
            view = FeatureView(str(feature), to_numpy(features.column(feature)), None, [], "activation")
        else:
            view = _id_view(dual, features, feature, component, examples)
        rank_text = _rank_text(table, feature)
        order = getattr(features, "order", None)
        if completeness is None and hasattr(features, "completeness"):
            completeness = features.completeness()
    if len(view.values) != len(examples):
        raise DataError(
            f"the feature has values for {len(view.values)} examples but data has {len(examples)}; "
            "pass the same data the features (or eigenfeatures) were computed on"
        )
    top, bottom = _top_bottom(view, topk, feature, n_examples)
    return _figure(view, examples, top, bottom, _summary(view, rank_text, order, completeness))


# ---- evaluating the feature ------------------------------------------------------------------------------
def _id_view(dual: Any, feats: Any, fid: str, component: int | None, examples: Examples) -> FeatureView:
    """A feature id's values ``φᴱ_μ(x)`` and contributions; a group id's summed contribution ``Σ_{μ∈G} c_μ(x)``."""
    if not isinstance(fid, str):
        raise FeatureIdError(
            f"a feature is named by its id such as '0.weight[3,1]', got {fid!r}; pass an eigenfeature as eig[i]"
        )
    model = getattr(dual, "model", None)
    positions = group_positions(feats.ids, fid, None if model is None else n_heads_of(model))
    parsed = feats.ids.parse(fid)
    slot, index = parsed.slot, parsed.index
    single = parsed.kind == "param"
    if single:
        values = _matrix(feats.column(fid))
        contributions = _matrix(feats.contributions([fid])[..., 0])
    else:
        weights = torch.zeros(feats.n_features, dtype=feats.dtype, device=feats.device)
        weights[positions] = feats.flat_delta()[positions]
        contributions = _matrix(feats.matvec(weights))
        values = contributions
    k = _component(contributions, component)
    pictures = []
    if slot is not None:
        theta = getattr(dual, "theta_trained", {}).get(slot.name)
        for title, tensor in (("θ*", theta), ("Δθ", feats.delta[slot.name])):
            if tensor is not None:
                picture = as_image(_picture(tensor, index), examples.image_shape)
                pictures.append((title, picture))
    return FeatureView(
        fid,
        values[:, k],
        contributions[:, k],
        pictures,
        "value φᴱ" if single else f"group contribution Σ Δθ φᴱ ({len(positions)} features)",
        "" if values.shape[1] == 1 else f"readout component {k}",
        _matrix(feats.delta_z())[:, k] if hasattr(feats, "delta_z") else None,
        _mark(slot, index, pictures[0][1].shape) if single and pictures else None,
        _picture_name(slot, index) if slot is not None else "",
    )


def _mark(slot: Any, index: tuple, shape: tuple[int, ...]) -> tuple[int, int]:
    """Where a single entry sits in its picture (the row of its weight, reshaped)."""
    if len(index) == 2:
        return divmod(index[1], shape[1])
    flat = int(np.ravel_multi_index(index, slot.shape)) if index else 0
    return divmod(flat, shape[1])


def _picture(tensor: Tensor, index: tuple) -> Tensor:
    """The part of a parameter tensor a feature lives in: its row for a weight entry or row group."""
    if len(index) == 2 and isinstance(index[0], int):
        return tensor[index[0]]
    if len(index) == 2 and isinstance(index[1], int):
        return tensor[:, index[1]]
    return tensor


def _picture_name(slot: Any, index: tuple) -> str:
    if len(index) == 2 and isinstance(index[0], int):
        return f"{slot.state_name}[{index[0]},:]"
    if len(index) == 2 and isinstance(index[1], int):
        return f"{slot.state_name}[:,{index[1]}]"
    return slot.state_name


def _eigen_view(dual: Any, eigen: Any, i: Any, component: int | None, examples: Examples) -> FeatureView:
    """Eigenfeature i: its value ``√λ_i u_i(x) = φᴱ(x)·d_i`` and contribution ``(Δθ·d_i) √λ_i u_i(x)``."""
    n = len(eigen.values)
    if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= int(i) < n:
        raise FeatureIdError(f"with eigen= the feature is an eigenfeature index in 0..{n - 1}, got {i!r}")
    i = int(i)
    scale = float(eigen.values[i]) ** 0.5
    values = _matrix(eigen.functions[..., i]) * scale
    direction = eigen.directions(i)
    flat_delta = torch.cat([dual.delta[s.name].reshape(-1) for s in eigen.slots]).to(direction.dtype)
    contributions = values * float(flat_delta @ direction)
    k = _component(contributions, component)
    parts = {s.state_name: direction[s.offset : s.offset + s.numel].view(s.shape) for s in eigen.slots}
    name = max(parts, key=lambda key: float(parts[key].square().sum()))
    part = parts[name]
    row = int(part.square().sum(1).argmax()) if part.ndim == 2 else None
    picture = as_image(part if row is None else part[row], examples.image_shape)
    where = name if row is None else f"{name}[{row},:]"
    return FeatureView(
        f"eigenfeature {i}",
        values[:, k],
        contributions[:, k],
        [("direction dᵢ", picture)],
        "value φᴱ·dᵢ",
        "" if values.shape[1] == 1 else f"readout component {k}",
        picture_name=f"the largest part of dᵢ, {where}",
    )


def _matrix(t: Tensor) -> np.ndarray:
    """``[N]`` or ``[N, K]`` tensor as an ``[N, K]`` array."""
    a = to_numpy(t)
    return a[:, None] if a.ndim == 1 else a.reshape(a.shape[0], -1)


def _component(values: np.ndarray, component: int | None) -> int:
    k = values.shape[1]
    if component is None:
        return int(np.argmax(np.sqrt(np.mean(values**2, axis=0)))) if k > 1 else 0
    if not -k <= component < k:
        raise ConfigError(f"component={component} is out of range: the readout has {k} component(s)")
    return component % k


def _rank_text(table: Any, fid: str) -> str:
    if table is None:
        return ""
    r = next((i for i, name in enumerate(table.ids) if name == fid), None)
    if r is None:
        return f"not among the {len(table.ids)} ranked by {table.by}"
    score = float(table.scores[r])
    return f"rank {r + 1} of {len(table.ids)} by {table.by} ({table.group}), score {score:.4g}"


def _top_bottom(view: FeatureView, topk: Any, fid: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    top, bottom = top_bottom(view.values, n)
    if topk is not None:  # a vector readout's top pairs may repeat an example: keep each once, in order
        top = np.array(list(dict.fromkeys(to_numpy(topk[fid].indices).astype(int).tolist()))[:n], dtype=int)
    return top, bottom


def _summary(view: FeatureView, rank_text: str, order: str | None, completeness: float | None) -> str:
    parts = [rank_text, view.note, f"pictures: {view.picture_name}" if view.picture_name else ""]
    if order is not None and completeness is not None:
        parts.append(f"order {order}: completeness residual {completeness:.3g}")
    return " · ".join(p for p in parts if p)


# ---- drawing ---------------------------------------------------------------------------------------------
def _figure(view: FeatureView, ex: Examples, top: np.ndarray, bottom: np.ndarray, summary: str) -> go.Figure:
    n_cols = max(len(top), len(bottom), 4)
    n_pics = len(view.pictures)
    images = ex.kind == "image"
    row_kind = {"type": "xy"} if images else {"type": "table", "colspan": n_cols}
    example_row = [dict(row_kind) for _ in range(n_cols)] if images else [row_kind] + [None] * (n_cols - 1)
    hist_span = (n_cols - n_pics) // 2 if n_pics else n_cols // 2
    last = [{"colspan": hist_span}] + [None] * (hist_span - 1)
    last += [{"colspan": n_cols - hist_span - n_pics}] + [None] * (n_cols - hist_span - n_pics - 1)
    last += [{} for _ in range(n_pics)]
    titles = []
    for which, idx in (("top", top), ("bottom", bottom)):
        if images:
            titles += [_example_title(ex, i, view.values[i]) for i in idx] + [""] * (n_cols - len(idx))
        else:
            titles.append(f"{which} {len(idx)} examples")
    titles += [f"{view.value_name} over {len(view.values)} examples", _contribution_title(view)]
    titles += [t for t, _ in view.pictures]
    fig = make_subplots(
        rows=3,
        cols=n_cols,
        specs=[example_row, list(example_row), last],
        subplot_titles=titles,
        row_heights=[0.3, 0.3, 0.4],
        vertical_spacing=0.09,
        horizontal_spacing=0.02 if images else 0.04,
    )
    for row, idx in ((1, top), (2, bottom)):
        if images:
            _add_images(fig, ex, idx, row)
        else:
            fig.add_trace(_example_table(ex, idx, view.values), row=row, col=1)
    fig.add_trace(go.Histogram(x=view.values, nbinsx=40, marker_color=VALUE_COLOR, name=view.value_name), row=3, col=1)
    contrib_col = hist_span + 1
    if view.contributions is not None:
        fig.add_trace(
            go.Histogram(x=view.contributions, nbinsx=40, marker_color=CONTRIBUTION_COLOR, name="contribution"),
            row=3,
            col=contrib_col,
        )
    else:
        _empty_note(fig, 3, contrib_col, "no contribution: this is not a term of the dual model")
    for j, (_, picture) in enumerate(view.pictures):
        col = n_cols - n_pics + j + 1
        fig.add_trace(_picture_heatmap(picture, j == n_pics - 1), row=3, col=col)
        if view.mark is not None:
            fig.add_trace(_mark_trace(view.mark), row=3, col=col)
        _square_pixels(fig, 3, col, picture)
    fig.update_xaxes(title_text=view.value_name, row=3, col=1)
    fig.update_xaxes(title_text="contribution", row=3, col=contrib_col)
    fig.update_yaxes(title_text="examples", row=3, col=1)
    if images:
        fig.update_yaxes(title_text=f"top {len(top)}", row=1, col=1)
        fig.update_yaxes(title_text=f"bottom {len(bottom)}", row=2, col=1)
    fig.update_layout(
        template=TEMPLATE,
        title={"text": f"<b>{html.escape(view.label)}</b><br><sup>{html.escape(summary)}</sup>", "x": 0.01},
        showlegend=False,
        height=720 if images else 1000,
        width=max(900, 120 * n_cols),
        margin={"l": 50, "r": 30, "t": 100, "b": 40},
        bargap=0.05,
    )
    fig.update_annotations(font_size=11)
    return fig


def _contribution_title(view: FeatureView) -> str:
    title = "contribution Δθ·φᴱ per example"
    if view.contributions is None or view.delta_z is None or not np.abs(view.delta_z).sum():
        return title
    share = np.abs(view.contributions).sum() / np.abs(view.delta_z).sum()
    return f"{title} (Σ|c| = {share:.2%} of Σ|Δz|)"


def _example_title(ex: Examples, i: int, value: float) -> str:
    label = ex.label(int(i))
    return f"#{int(i)}{f' y={label}' if label is not None else ''}<br>{value:.3g}"


def _add_images(fig: go.Figure, ex: Examples, idx: np.ndarray, row: int) -> None:
    pixels = [ex.image(int(i)) for i in idx]
    lo = min((float(p.min()) for p in pixels), default=0.0)
    hi = max((float(p.max()) for p in pixels), default=1.0)
    for j, p in enumerate(pixels):
        fig.add_trace(
            go.Heatmap(z=p, colorscale="gray_r", zmin=lo, zmax=hi, showscale=False, hoverinfo="skip"),
            row=row,
            col=j + 1,
        )
        _square_pixels(fig, row, j + 1, p)


def _square_pixels(fig: go.Figure, row: int, col: int, picture: np.ndarray) -> None:
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, row=row, col=col)
    fig.update_yaxes(
        autorange="reversed",
        showticklabels=False,
        showgrid=False,
        zeroline=False,
        row=row,
        col=col,
        scaleanchor=_axis_name(fig, row, col),
        constrain="domain",
    )


def _axis_name(fig: go.Figure, row: int, col: int) -> str:
    ref = fig.get_subplot(row, col)
    return ref.xaxis.plotly_name.replace("axis", "")


def _picture_heatmap(picture: np.ndarray, show_scale: bool) -> go.Heatmap:
    bound = float(np.abs(picture).max()) or 1.0
    return go.Heatmap(
        z=picture,
        colorscale="RdBu",
        reversescale=True,
        zmid=0.0,
        zmin=-bound,
        zmax=bound,
        showscale=show_scale,
        colorbar={"len": 0.35, "y": 0.18, "thickness": 12, "x": 1.0},
        hovertemplate="[%{y},%{x}] = %{z:.4g}<extra></extra>",
    )


def _mark_trace(mark: tuple[int, int]) -> go.Scatter:
    row, col = mark
    return go.Scatter(
        x=[col],
        y=[row],
        mode="markers",
        hoverinfo="skip",
        marker={"symbol": "square-open", "size": 14, "color": "#111111", "line": {"width": 2}},
    )


def _example_table(ex: Examples, idx: np.ndarray, values: np.ndarray) -> go.Table:
    columns = {"example": [int(i) for i in idx], "value": [f"{values[i]:.4g}" for i in idx]}
    if ex.labels is not None:
        columns["label"] = [ex.label(int(i)) or "" for i in idx]
    columns["input"] = [ex.text(int(i)) for i in idx]
    widths = [1] * (len(columns) - 1) + [5]
    return go.Table(
        columnwidth=widths,
        header={"values": [f"<b>{c}</b>" for c in columns], "fill_color": "#e8edf5", "align": "left"},
        cells={"values": list(columns.values()), "align": "left", "height": 22},
    )


def _empty_note(fig: go.Figure, row: int, col: int, text: str) -> None:
    fig.add_annotation(text=text, showarrow=False, xref="x domain", yref="y domain", x=0.5, y=0.5, row=row, col=col)
