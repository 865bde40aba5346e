"""`feature_dashboard`: one feature, group, eigenfeature or neuron on one page.

Its top and bottom examples — images as images, tables of numbers, token sequences as highlighted text (each
token coloured by the part of the value its position carries) —, the distributions of its value and of its
contribution over the data, its weights θ* and their change Δθ in a shape that means something
(`efffeat.viz._pictures`), the attention patterns of a head on its top sequences, its rank and score, and
the completeness of the order the features were computed at.

What is shown for each kind of feature (the ordering is `efffeat.max_activating`'s):

==================  ==============================  ===========================  ============================
feature             examples ordered by             first histogram              second histogram
==================  ==============================  ===========================  ============================
one entry           its value φᴱ_μ(x)               value φᴱ_μ                   contribution Δθ_μ φᴱ_μ
a group (neuron,    its signed contribution          ‖φᴱ_G(x)‖, how strongly its  signed contribution
input, head, …)     Σ_{μ∈G} Δθ_μ φᴱ_μ(x)             features respond             Σ_{μ∈G} Δθ_μ φᴱ_μ(x)
an eigenfeature     its projection φᴱ(x)·dᵢ          the projection               (Δθ·dᵢ)(φᴱ(x)·dᵢ)
a neuron            its activation                   activation                   (none: not a dual-model term)
==================  ==============================  ===========================  ============================

Exact zeros (a group that takes no part in an example) are left out of the example lists and counted.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor, nn

from .._atomic import write_text_atomic
from .._check import integer
from ..errors import ConfigError, DataError, FeatureIdError
from ..groups import group_positions, n_heads_of
from ..search import TopKEntry, best_examples, feature_values, position_values
from ..spectra.fourier import frequency_norms
from . import _tokens
from ._inputs import Examples, as_examples, to_numpy
from ._pictures import Picture, layer_input_shapes, weight_pictures

TEMPLATE = "plotly_white"
VALUE_COLOR = "#3b6fb6"
CONTRIBUTION_COLOR = "#d1752b"
# Grid columns of a dashboard: every row's panels span a divisor of it.
_COLUMNS = 24
# Attention patterns drawn for a head (its top sequences).
_ATTENTION_SEQUENCES = 4


@dataclass
class FeatureView:
    """What the dashboard draws for one feature, already evaluated over the data.

    ranked: ``[N]`` what the examples are ordered by (`ranked_name`); histograms: ``[(name, [N] values,
    colour)]``; contributions: ``[N]`` its contribution to the readout change (None where it has none);
    delta_z: ``[N]`` the readout change Δz the contributions of all features add up to; pictures: weight
    panels (`Picture`); positions: ``([N, T], [N])`` the ranked value split over the sequence positions
    and the part no position carries, for token inputs; attention: the head ``(attention module, head)``.
    """

    label: str
    ranked: np.ndarray
    ranked_name: str
    histograms: list[tuple[str, np.ndarray, str]]
    contributions: np.ndarray | None = None
    delta_z: np.ndarray | None = None
    pictures: list[Picture] = field(default_factory=list)
    picture_name: str = ""
    note: str = ""
    positions: tuple[np.ndarray, np.ndarray] | None = None
    attention: tuple[str, int] | None = None


@dataclass
class Dashboard:
    """A feature dashboard: the plotly `figure`, and for token inputs the highlighted sequences as HTML.

    In a notebook it displays itself (the sequences, then the figure); `to_html` and `write_html` give one page.
    """

    figure: go.Figure
    examples_html: str = ""

    def to_html(self, full_html: bool = True, include_plotlyjs: bool | str = True) -> str:
        """The sequences and the figure as HTML (a page, or a fragment with ``full_html=False``)."""
        body = self.examples_html + self.figure.to_html(
            full_html=False, include_plotlyjs=include_plotlyjs, config={"displaylogo": False, "responsive": True}
        )
        if not full_html:
            return body
        return f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'></head><body>{body}</body></html>\n"

    def write_html(self, path: str | Path) -> Path:
        """Write `to_html` (plotly.js inlined: it opens offline) to `path`, atomically."""
        path = Path(path)
        write_text_atomic(path, self.to_html())
        return path

    def show(self) -> None:
        """Display in a notebook (or the figure alone in a browser outside one)."""
        try:
            from IPython import get_ipython
            from IPython.display import HTML, display
        except ImportError:
            self.figure.show()
            return
        if get_ipython() is None:
            self.figure.show()
            return
        if self.examples_html:
            display(HTML(self.examples_html))
        display(self.figure)

    def _ipython_display_(self) -> None:
        self.show()


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
    token_text: Callable[[int], str] | None = None,
    cyclic: int | None = None,
) -> Dashboard:
    """A `Dashboard` describing one feature (module docstring: what is shown for which kind).

    Args:
        dual: the `DualModel` (its θ* and Δθ give the weight pictures; its features of `data` are computed when
            `features` is not given).
        feature: a feature id (``"0.weight[3,12]"``), a group id (a neuron ``"0.weight[3,:]"``, an input
            ``"0.weight[:,12]"``, a tensor ``"0.weight"``, a head ``"blocks.0.attn.head[1]"``) or, with
            `eigen`, the index of an eigenfeature (or the eigenfeature ``eig[i]`` itself).
        topk: an ``ef.max_activating`` result holding this feature; its top examples are shown when given.
        data: the examples, a tensor of inputs or an ``(inputs, targets)`` tuple (targets are shown as labels).
        features: `EffectiveFeatures` of `data`, to avoid recomputing them; or ``ef.baselines.neurons(...)``
            activations, and `feature` one of their ids (``"1[3]"``) to show a neuron.
        table: an ``ef.rank`` `FeatureTable`; the feature's rank and score are read from it.
        eigen: ``ef.eigenfeatures`` of `data` (a `Spectrum`; eigenvalues may be negative: |λ| scales the
            values, the sign is in the title); `feature` is then an eigenfeature index.
        completeness: the dual model's completeness residual at the features' order, when already known
            (an `efffeat.Analysis` has it); computed from `features` otherwise.
        n_examples: top and bottom examples shown.
        component: readout component drawn for a vector readout; by default the one the feature contributes
            most to.
        input_kind: ``"image" | "tokens" | "table"`` (guessed from the data when None); image_shape: ``(H, W)``;
            decode: ``tokens -> str`` for token inputs shown as one string (tables); token_text:
            ``token id -> str`` for the highlighted tokens (default: the id).
        cyclic: the first `cyclic` rows of an embedding are the residues 0 … cyclic − 1 of a cyclic group
            (modular arithmetic): its columns are drawn as Fourier spectra.

    Example::

        feats = dual.features(x)
        table = ef.rank(feats, by="contribution", group="neuron")
        ef.viz.feature_dashboard(dual, table.ids[0], data=x, features=feats, table=table)   # shows in a notebook
    """
    if data is None:
        raise DataError("feature_dashboard needs data=: the tensor of inputs (or (inputs, targets)) to draw examples")
    integer("n_examples", n_examples)
    if cyclic is not None:
        integer("cyclic", cyclic, minimum=3)
    examples = as_examples(data, input_kind, image_shape, decode)
    if hasattr(feature, "source") and hasattr(feature, "index"):  # an eigenfeature handle, eig[i]
        eigen, feature = feature.source, feature.index
    if eigen is not None:
        view = _eigen_view(dual, eigen, feature, component)
        lam = float(eigen.values[int(feature)])
        sign = " (negative)" if lam < 0 else ""
        of = " of the kernel change ΔΘ" if eigen.meta.get("against") else ""
        rank_text = f"eigenfeature {int(feature)} of {len(eigen.values)}{of}, eigenvalue {lam:.4g}{sign}"
        order = eigen.meta.get("order")
    else:
        if features is None:
            features = dual.features(data)
        if getattr(features, "delta", None) is None:  # neurons (ef.baselines.neurons): values, no contributions
            values = to_numpy(features.column(feature))
            view = FeatureView(str(feature), values, "activation", [("activation", values, VALUE_COLOR)])
        else:
            view = _id_view(dual, features, feature, component, examples, cyclic)
        rank_text = _rank_text(table, feature)
        order = getattr(features, "order", None)
        if completeness is None and hasattr(features, "completeness"):
            completeness = features.completeness()
    if len(view.ranked) != len(examples):
        raise DataError(
            f"the feature has values for {len(view.ranked)} examples but data has {len(examples)}; "
            "pass the same data the features (or eigenfeatures) were computed on"
        )
    top = best_examples(torch.from_numpy(view.ranked), n_examples, largest=True)
    bottom = best_examples(torch.from_numpy(view.ranked), n_examples, largest=False)
    if topk is not None:  # a vector readout's top pairs may repeat an example: keep each once, in order
        given = topk[feature]
        shown = list(dict.fromkeys(to_numpy(given.indices).astype(int).tolist()))[:n_examples]
        top = TopKEntry(
            torch.tensor(shown, dtype=torch.long),
            torch.from_numpy(view.ranked[shown]),
            None,
            int(getattr(given, "n_zero", 0)),
        )
    attention = _attention(dual, examples, view, top)
    summary = _summary(view, rank_text, order, completeness)
    figure = _figure(view, examples, top, bottom, attention, summary)
    tokens_html = _tokens_html(view, examples, top, bottom, token_text) if examples.kind == "tokens" else ""
    return Dashboard(figure, tokens_html)


# ---- evaluating the feature ------------------------------------------------------------------------------
def _id_view(dual: Any, feats: Any, fid: str, component: int | None, ex: Examples, cyclic: int | None) -> FeatureView:
    """A feature id's values ``φᴱ_μ(x)`` and contributions; a group's norm ‖φᴱ_G(x)‖ and signed contribution."""
    if not isinstance(fid, str):
        raise FeatureIdError(
            f"a feature is named by its id such as '0.weight[3,1]', got {fid!r}; pass an eigenfeature as eig[i]"
        )
    parsed = feats.ids.parse(fid)
    single = parsed.kind == "param"
    contributions = _matrix(feature_values(feats, fid, "contribution"))
    k = _component(contributions, component)
    if single:
        values = _matrix(feature_values(feats, fid, "value"))[:, k]
        ranked, ranked_name = values, "value φᴱ"
        histograms = [("value φᴱ", values, VALUE_COLOR)]
    else:
        norms = _matrix(feature_values(feats, fid, "norm"))[:, k]
        ranked, ranked_name = contributions[:, k], "signed contribution Σ Δθ·φᴱ"
        model = getattr(dual, "model", None)
        members = len(group_positions(feats.ids, fid, None if model is None else n_heads_of(model)))
        histograms = [(f"‖φᴱ_G‖, norm of its {members} features", norms, VALUE_COLOR)]
    histograms.append(("contribution Δθ·φᴱ" if single else ranked_name, contributions[:, k], CONTRIBUTION_COLOR))
    pictures: list[Picture] = []
    picture_name = ""
    slot = parsed.slot
    if slot is not None:
        theta = getattr(dual, "theta_trained", {}).get(slot.name)
        tensors = [(t, v) for t, v in (("θ*", theta), ("Δθ", feats.delta[slot.name])) if v is not None]
        holder = _module_of(dual, slot.name)
        embedding = holder is not None and isinstance(holder[1], nn.Embedding)
        pictures, where = weight_pictures(
            tensors,
            parsed.index,
            single,
            _input_shape(dual, holder, ex),
            cyclic if embedding else None,
            frequency_norms,
        )
        picture_name = f"{slot.state_name}, {where}"
    positions = None
    if ex.kind == "tokens":
        length = ex.inputs.reshape(len(ex), -1).shape[1]
        per_position, shared = position_values(feats, fid, "value" if single else "contribution", length)
        if bool(per_position.any()) or not bool(shared.any()):  # some factor kept its per-token terms
            positions = (to_numpy(per_position[:, k]), to_numpy(shared[:, k]))
    note = "" if contributions.shape[1] == 1 else f"readout component {k} of {contributions.shape[1]}"
    return FeatureView(
        fid,
        ranked,
        ranked_name,
        histograms,
        contributions[:, k],
        _matrix(feats.delta_z())[:, k],
        pictures,
        picture_name,
        note,
        positions,
        (parsed.tensor, parsed.head) if parsed.kind == "head" else None,
    )


def _module_of(dual: Any, param: str) -> tuple[str, nn.Module] | None:
    """``(named_modules name, module)`` of the module that holds parameter `param` (a named_parameters name;
    TransformerLens bridges name their modules and parameters differently)."""
    model = getattr(dual, "model", None)
    target = None if model is None else dict(model.named_parameters()).get(param)
    if target is None:
        return None
    return next(
        ((name, m) for name, m in model.named_modules() if any(p is target for p in m._parameters.values())), None
    )


def _input_shape(dual: Any, holder: tuple[str, nn.Module] | None, ex: Examples) -> tuple[int, ...] | None:
    """The per-example shape of what the layer `holder` reads, before it was flattened (if known)."""
    if holder is None:
        return ex.image_shape
    x = ex.inputs[:1]
    if x.is_floating_point():
        x = x.to(getattr(dual, "dtype", x.dtype))
    shapes = layer_input_shapes(dual.model, x.to(getattr(dual, "device", x.device)))
    return shapes.get(holder[0], ex.image_shape)


def _eigen_view(dual: Any, eigen: Any, i: Any, component: int | None) -> FeatureView:
    """Eigenfeature i: its value ``√|λ_i| u_i(x) = φᴱ(x)·d_i`` and contribution ``(Δθ·d_i) √|λ_i| u_i(x)``."""
    n = len(eigen.values)
    if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= int(i) < n:
        raise FeatureIdError(f"with eigen= the feature is an eigenfeature index in 0..{n - 1}, got {i!r}")
    i = int(i)
    scale = abs(float(eigen.values[i])) ** 0.5
    values = _matrix(eigen.functions[..., i]) * scale
    direction = eigen.directions(i)
    flat_delta = torch.cat([dual.delta[s.name].reshape(-1) for s in eigen.slots]).to(direction.dtype)
    contributions = values * float(flat_delta @ direction)
    k = _component(contributions, component)
    parts = {s.state_name: direction[s.offset : s.offset + s.numel].view(s.shape) for s in eigen.slots}
    name = max(parts, key=lambda key: float(parts[key].square().sum()))
    part = parts[name]
    row = int(part.reshape(part.shape[0], -1).square().sum(1).argmax()) if part.ndim >= 2 else None
    index = (row,) + (slice(None),) * (part.ndim - 1) if row is not None else tuple(slice(None) for _ in part.shape)
    pictures, where = weight_pictures([("direction dᵢ", part)], index, False, None, None, frequency_norms)
    return FeatureView(
        eigen[i].id,
        values[:, k],
        "value φᴱ·dᵢ",
        [
            ("value φᴱ·dᵢ", values[:, k], VALUE_COLOR),
            ("contribution (Δθ·dᵢ)(φᴱ·dᵢ)", contributions[:, k], CONTRIBUTION_COLOR),
        ],
        contributions[:, k],
        pictures=pictures,
        picture_name=f"the largest part of dᵢ, {name} {where}",
        note="" if values.shape[1] == 1 else f"readout component {k} of {values.shape[1]}",
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


def _summary(view: FeatureView, rank_text: str, order: str | None, completeness: float | None) -> str:
    parts = [rank_text, view.note, f"pictures: {view.picture_name}" if view.picture_name else ""]
    if order is not None and completeness is not None:
        parts.append(f"order {order}: completeness residual {completeness:.3g}")
    return " · ".join(p for p in parts if p)


def _attention(dual: Any, ex: Examples, view: FeatureView, top: TopKEntry) -> list[tuple[int, np.ndarray]]:
    """``[(example, [T, T] pattern)]`` of the head on its top sequences (empty for anything but a head)."""
    model = getattr(dual, "model", None)
    if view.attention is None or model is None or ex.kind != "tokens" or not len(top.indices):
        return []
    shown = top.indices[:_ATTENTION_SEQUENCES]
    patterns = _tokens.attention_patterns(model, _tokens.as_token_ids(ex.inputs[shown]), *view.attention)
    return [] if patterns is None else list(zip(shown.tolist(), patterns))


def _tokens_html(
    view: FeatureView, ex: Examples, top: TopKEntry, bottom: TopKEntry, token_text: Callable[[int], str] | None
) -> str:
    """The top and bottom sequences, each token highlighted by the part of the ranked value it carries."""
    blocks = []
    for which, entry in (("top", top), ("bottom", bottom)):
        rows = []
        for i in entry.indices.tolist():
            ids = _tokens.as_token_ids(ex.inputs[i : i + 1])[0].tolist()
            per, shared = (
                (None, None) if view.positions is None else (view.positions[0][i], float(view.positions[1][i]))
            )
            rows.append(
                _tokens.TokenRow(
                    i, ex.label(i), float(view.ranked[i]), _tokens.token_text(ids, token_text), per, shared
                )
            )
        note = _zeros_note(entry)
        if view.positions is None:
            why = "no per-position split: its factors hold no per-token terms (stored dense, or read all at once)"
            note = " · ".join(n for n in (note, why) if n)
        blocks.append(_tokens.rows_html(f"{which} {len(rows)} examples by {view.ranked_name}", rows, note))
    return "<div class='ef-dashboard-tokens'>" + "".join(blocks) + "</div>"


def _zeros_note(entry: TopKEntry) -> str:
    n = int(getattr(entry, "n_zero", 0))
    return f"{n} examples at exactly 0 not listed" if n else ""


# ---- drawing ---------------------------------------------------------------------------------------------
@dataclass
class _Row:
    """One row of the dashboard grid: panels (subplot type, colspan, title) and its height in pixels."""

    panels: list[tuple[str, int, str]]
    height: int
    gap: bool = False  # one empty column after each panel


def _figure(
    view: FeatureView,
    ex: Examples,
    top: TopKEntry,
    bottom: TopKEntry,
    attention: list[tuple[int, np.ndarray]],
    summary: str,
) -> go.Figure:
    images = ex.kind == "image"
    rows: list[_Row] = []
    lists = (("top", top), ("bottom", bottom))
    if images:
        n = max(len(top.indices), len(bottom.indices), 1)
        span = max(1, _COLUMNS // n)
        for _, entry in lists:
            titles = [_example_title(ex, int(i), view.ranked[int(i)]) for i in entry.indices]
            rows.append(_Row([("xy", span, t) for t in titles], 130))
    elif ex.kind == "table":
        for which, entry in lists:
            title = f"{which} {len(entry.indices)} examples by {view.ranked_name}"
            note = _zeros_note(entry)
            rows.append(
                _Row([("table", _COLUMNS, title + (f" ({note})" if note else ""))], 60 + 24 * len(entry.indices))
            )
    n_hist = len(view.histograms) + (1 if view.contributions is None else 0)
    hist_titles = [f"{name} over {len(values)} examples" for name, values, _ in view.histograms]
    if view.contributions is None:
        hist_titles.append("contribution")
    else:
        hist_titles[-1] = _contribution_title(view)
    rows.append(_Row([("xy", _COLUMNS // n_hist, t) for t in hist_titles], 260))
    if view.pictures:
        span = _COLUMNS // len(view.pictures)
        rows.append(_Row([("xy", span - 1, p.title) for p in view.pictures], 300, gap=True))
    if attention:
        span = _COLUMNS // max(len(attention), 2)
        titles = [f"#{i}: attention of head {view.attention[1]}" for i, _ in attention]  # type: ignore[index]
        rows.append(_Row([("xy", span, t) for t in titles], 300))
    specs, titles = [], []
    for row in rows:
        spec: list[Any] = []
        for kind, span, title in row.panels:
            spec += [{"type": kind, "colspan": span}] + [None] * (span - 1)
            if row.gap:
                spec.append(None)
            titles.append(title)
        specs.append(spec + [None] * (_COLUMNS - len(spec)))
    gap = 70
    height = sum(r.height for r in rows) + gap * (len(rows) - 1) + 110
    fig = make_subplots(
        rows=len(rows),
        cols=_COLUMNS,
        specs=specs,
        subplot_titles=titles,
        row_heights=[r.height for r in rows],
        vertical_spacing=gap / height,
        horizontal_spacing=0.006 if images else 0.012,
    )
    at = 1
    if images:
        for row, (which, entry) in enumerate(lists, start=1):
            _add_images(fig, ex, entry.indices.numpy(), row, _COLUMNS // max(len(top.indices), len(bottom.indices), 1))
            note = _zeros_note(entry)
            fig.update_yaxes(title_text=f"{which} {len(entry.indices)}", row=row, col=1)
            if note:
                _corner_note(fig, row, 1, note)
        at = 3
    elif ex.kind == "table":
        for row, (_, entry) in enumerate(lists, start=1):
            fig.add_trace(_example_table(ex, entry.indices.numpy(), view.ranked, view.ranked_name), row=row, col=1)
        at = 3
    span = _COLUMNS // n_hist
    for j, (name, values, color) in enumerate(view.histograms):
        col = j * span + 1
        fig.add_trace(go.Histogram(x=values, nbinsx=40, marker_color=color, name=name), row=at, col=col)
    if view.contributions is None:
        _empty_note(fig, at, (n_hist - 1) * span + 1, "no contribution: this is not a term of the dual model")
    fig.update_yaxes(title_text="examples", row=at, col=1)
    at += 1
    if view.pictures:
        span = _COLUMNS // len(view.pictures)
        for j, picture in enumerate(view.pictures):
            _add_picture(fig, picture, at, j * span + 1, j == len(view.pictures) - 1 or picture.kind == "bars")
        at += 1
    if attention:
        span = _COLUMNS // max(len(attention), 2)
        for j, (i, pattern) in enumerate(attention):
            labels = _tokens.token_text(_tokens.as_token_ids(ex.inputs[i : i + 1])[0].tolist(), None)
            _add_attention(fig, pattern, labels, at, j * span + 1)
    fig.update_layout(
        template=TEMPLATE,
        title={"text": f"<b>{html.escape(view.label)}</b><br><sup>{html.escape(summary)}</sup>", "x": 0.01},
        showlegend=False,
        height=height,
        width=1100,
        margin={"l": 60, "r": 40, "t": 100, "b": 40},
        bargap=0.05,
    )
    fig.update_annotations(font_size=11)
    return fig


def _contribution_title(view: FeatureView) -> str:
    title = view.histograms[-1][0] + " per example"
    if view.contributions is None or view.delta_z is None or not np.abs(view.delta_z).sum():
        return title
    share = np.abs(view.contributions).sum() / np.abs(view.delta_z).sum()
    return f"{title} (Σ|c| = {share:.1%} of Σ|Δz|)"


def _example_title(ex: Examples, i: int, value: float) -> str:
    label = ex.label(int(i))
    return f"#{int(i)}{f' y={label}' if label is not None else ''}<br>{value:.3g}"


def _add_images(fig: go.Figure, ex: Examples, idx: np.ndarray, row: int, span: int) -> None:
    pixels = [ex.image(int(i)) for i in idx]
    lo = min((float(p.min()) for p in pixels), default=0.0)
    hi = max((float(p.max()) for p in pixels), default=1.0)
    for j, p in enumerate(pixels):
        col = j * span + 1
        fig.add_trace(
            go.Heatmap(z=p, colorscale="gray_r", zmin=lo, zmax=hi, showscale=False, hoverinfo="skip"), row=row, col=col
        )
        _square_pixels(fig, row, col)


def _add_picture(fig: go.Figure, picture: Picture, row: int, col: int, show_scale: bool) -> None:
    if picture.kind == "bars":
        colors = np.where(picture.z >= 0, CONTRIBUTION_COLOR, VALUE_COLOR).tolist()
        line = [2 if j == picture.mark else 0 for j in range(len(picture.z))]
        fig.add_trace(
            go.Bar(
                x=picture.x,
                y=picture.z,
                marker={"color": colors, "line": {"width": line, "color": "#111111"}},
                hovertemplate="%{x}: %{y:.4g}<extra></extra>",
            ),
            row=row,
            col=col,
        )
        fig.update_xaxes(
            title_text=picture.x_title or "entry", dtick=1 if len(picture.z) <= 24 else None, row=row, col=col
        )
        return
    bound = float(np.nanmax(np.abs(picture.z))) if np.isfinite(picture.z).any() else 1.0
    low, high = fig.get_subplot(row, col).yaxis.domain
    fig.add_trace(
        go.Heatmap(
            z=picture.z,
            colorscale="RdBu",
            reversescale=True,
            zmid=0.0,
            zmin=-(bound or 1.0),
            zmax=bound or 1.0,
            showscale=show_scale,
            colorbar={"len": high - low, "thickness": 12, "x": 1.0, "y": (low + high) / 2},
            hovertemplate="[%{y},%{x}] = %{z:.4g}<extra></extra>",
        ),
        row=row,
        col=col,
    )
    if isinstance(picture.mark, tuple):
        r, c = picture.mark
        fig.add_trace(
            go.Scatter(
                x=[c],
                y=[r],
                mode="markers",
                hoverinfo="skip",
                marker={"symbol": "square-open", "size": 14, "color": "#111111", "line": {"width": 2}},
            ),
            row=row,
            col=col,
        )
    _square_pixels(fig, row, col)


def _add_attention(fig: go.Figure, pattern: np.ndarray, labels: list[str], row: int, col: int) -> None:
    ticks = list(range(len(labels)))
    fig.add_trace(
        go.Heatmap(
            z=pattern,
            colorscale="Blues",
            zmin=0.0,
            zmax=1.0,
            showscale=False,
            name="attention pattern",
            hovertemplate="query %{y} → key %{x}: %{z:.3f}<extra></extra>",
        ),
        row=row,
        col=col,
    )
    fig.update_xaxes(tickvals=ticks, ticktext=labels, title_text="key", row=row, col=col)
    fig.update_yaxes(tickvals=ticks, ticktext=labels, title_text="query", autorange="reversed", row=row, col=col)


def _square_pixels(fig: go.Figure, row: int, col: int) -> None:
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


def _example_table(ex: Examples, idx: np.ndarray, values: np.ndarray, name: str) -> go.Table:
    columns = {"example": [int(i) for i in idx], name: [f"{values[i]:.4g}" for i in idx]}
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


def _corner_note(fig: go.Figure, row: int, col: int, text: str) -> None:
    fig.add_annotation(
        text=text,
        showarrow=False,
        xref="x domain",
        yref="y domain",
        x=0.0,
        y=-0.12,
        xanchor="left",
        font={"size": 10, "color": "#55607a"},
        row=row,
        col=col,
    )
