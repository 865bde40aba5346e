"""`Analysis`: everything efffeat says about one model on one dataset, each result computed once.

The features of the dataset (one pass over the data), their ranking, the spectrum of their kernel, on request
the eigenfeatures of the kernel change ΔΘ = Θ_order − Θ_init (what training changed; one more pass, at
``init``) and the completeness of the dual model at each order are computed on first use and kept; the
report, the command line and the dashboards read them from here instead of computing them again. Searches
over the analysed data run on the stored features (no further pass). The order of the features
(``order="auto"`` decided on the analysed data), why it was chosen and the notes a reader should see (low
precision, a large completeness residual, a θ0 that is not a random initialisation) are `order`,
`order_reason` and `notes`.

Example::

    an = ef.analyse(dual, x, by="contribution", group="neuron", n_change=10)
    an.table.ids[:5], an.completeness(), an.completeness_by_order()
    an.order, an.order_reason, an.notes
    an.kernel_change.values, an.kernel_change.input_directions("0.weight")
    top = an.max_activating(an.table.ids[:3], k=8)
    ef.report(an, "report.html")
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

from ._check import integer, one_of, positive_int
from .dual import AUTO, ORDERS, WARN_RESIDUAL, DualModel
from .errors import ConfigError
from .features import EffectiveFeatures
from .groups import GroupSpec, check
from .ranking import FeatureTable, criterion, rank
from .search import FeatureSpec, TopK, max_activating
from .spectra import KernelChange, Spectrum, eigenfeatures, kernel_change
from .spectra.change import subtracted_features


class Analysis:
    """One model's effective features on one dataset, their ranking, spectrum and completeness.

    Args:
        dual: the `DualModel`.
        data: the examples (a tensor, an ``(inputs, targets)`` tuple, or an iterable of batches).
        order: the order of the features (default: the model's; a model's ``"auto"`` is decided on `data`).
        by, group: the ranking (`efffeat.rank`).
        n_eigen: eigenfeatures of the kernel to compute (0 for none); capped by the kernel's rank bound.
        n_change: eigenfeatures of the kernel change ΔΘ = Θ_order − Θ_init to compute (default 0: none; none at
            order ``init``, where ΔΘ = 0); they cost one feature pass at ``init`` when first used (the report
            shows them when asked for; ``efffeat analyse`` asks for 10).
        batch_size: examples per batch of the feature pass (None: sized from the memory available).
        features: the features of `data` at `order` when they are already computed (no pass is made).

    Attributes are computed on first access and kept: `features`, `table`, `spectrum`, `kernel_change`;
    `completeness(order)` keeps one value per order.
    """

    def __init__(
        self,
        dual: DualModel,
        data: Any,
        order: str | None = None,
        by: str = "contribution",
        group: GroupSpec = "neuron",
        n_eigen: int = 20,
        n_change: int = 0,
        batch_size: int | None = None,
        features: EffectiveFeatures | None = None,
    ):
        if not isinstance(dual, DualModel):
            raise ConfigError(f"an Analysis is of a DualModel, got {type(dual).__name__}")
        self.dual = dual
        self.data = data
        self._order = None if order is None else one_of("order", order, ORDERS)
        criterion(by)
        check(group)
        self.by = by
        self.group = group
        self.n_eigen = integer("n_eigen", n_eigen, minimum=0)
        self.n_change = integer("n_change", n_change, minimum=0)
        self.batch_size = None if batch_size is None else positive_int("batch_size", batch_size)
        self._completeness: dict[str, float] = {}
        if features is not None and self._order is None and dual.order == AUTO:
            self._order = getattr(features, "order", None)
        if features is not None:
            if not isinstance(features, EffectiveFeatures) or features.order != self.order:
                raise ConfigError(
                    f"features= must be the EffectiveFeatures of the data at order {self.order!r}, got "
                    f"{getattr(features, 'order', type(features).__name__)!r}"
                )
            if len(features.ids) != dual.n_features:
                raise ConfigError("features= belong to a model with other parameters than this DualModel")
            self.__dict__["features"] = features  # the cached value of the `features` property

    def __repr__(self) -> str:
        done = [name for name in ("features", "table", "spectrum", "kernel_change") if name in self.__dict__]
        return (
            f"Analysis({type(self.dual.model).__name__}, order={self._order or self.dual.order!r}, by={self.by!r}, "
            f"group={self.group!r}, computed={done + sorted(self._completeness)})"
        )

    @property
    def order(self) -> str:
        """The order of the features: the one given, else the model's (``"auto"`` decided on the data now)."""
        return self._order or self.dual.resolve_order(self.data, self.batch_size)

    @property
    def order_reason(self) -> str:
        """Why the features are of `order` (the auto decision's measurements, or who set it)."""
        if "features" in self.__dict__:
            return str(self.features.meta.get("order_reason"))
        if self._order is not None:
            return f"order={self._order!r} passed to the Analysis"
        self.order  # noqa: B018  (decides "auto")
        return str(self.dual.order_reason)

    @property
    def notes(self) -> list[str]:
        """Sentences a reader of the results should see: a θ0 that is not the network's random initialisation
        (`DualModel.init_kind`), a model computing below float32, and features whose completeness residual is
        above 0.5 (they explain little of what the network learned)."""
        out = self.dual.notes
        value = self.features.meta.get("completeness")
        if value is not None and value > WARN_RESIDUAL:
            out.append(
                f"the {self.order!r} features leave a completeness residual of {value:.3g} (> {WARN_RESIDUAL:g}): "
                "they explain little of what the network learned; order='path' explains the network"
            )
        return out

    @cached_property
    def features(self) -> EffectiveFeatures:
        """The effective features of the data at `order` (one pass over the data)."""
        return self.dual.features(self.data, batch_size=self.batch_size, order=self._order)

    @cached_property
    def table(self) -> FeatureTable:
        """The ranking `by` / `group` of every feature or group."""
        return rank(self.features, by=self.by, group=self.group)

    @cached_property
    def spectrum(self) -> Spectrum | None:
        """The top `n_eigen` eigenfeatures of the effective kernel (None when `n_eigen` is 0)."""
        if not self.n_eigen:
            return None
        f = self.features
        # the kernel J Jᵀ has rank at most min(N·K, P): no more eigenpairs are worth asking for
        return eigenfeatures(f, k=min(self.n_eigen, f.n_examples * f.n_outputs, f.n_features))

    @cached_property
    def kernel_change(self) -> KernelChange | None:
        """The top `n_change` eigenfeatures (by |λ|, signed, centred) of ΔΘ = Θ_order − Θ_init on the data: the
        directions in function space that training added or removed (`efffeat.kernel_change`). None when
        `n_change` is 0 or the order is ``init``. Computed from the stored features and one pass at ``init``."""
        if not self.n_change or self.order == "init":
            return None
        f = self.features
        init = subtracted_features(self.dual, self.data, "init", self.batch_size)
        return kernel_change(f, against=init, k=min(self.n_change, f.n_examples * f.n_outputs))

    def completeness(self, order: str | None = None) -> float:
        """The dual model's relative residual ``‖Σ Δθ φ^E − Δz‖ / ‖Δz‖`` at `order` (default: the analysis's).

        Every order is computed the same way, by one pass of directional derivatives over the data
        (`DualModel.completeness`; no feature pass), and at most once.
        """
        order = one_of("order", order or self.order, ORDERS)
        if order not in self._completeness:
            self._completeness[order] = self.dual.completeness(self.data, self.batch_size, order=order)
        return self._completeness[order]

    def completeness_by_order(self, orders: Sequence[str] = ORDERS) -> dict[str, float]:
        """``{order: completeness}`` for each of `orders`, each computed at most once."""
        return {o: self.completeness(o) for o in orders}

    def max_activating(
        self, features: FeatureSpec | Sequence[FeatureSpec], k: int = 16, by: str = "value", largest: bool = True
    ) -> TopK:
        """`efffeat.max_activating` over the analysed data, from the stored features (no pass over the data)."""
        return max_activating(self.features, features, k=k, by=by, largest=largest)


def analyse(dual: DualModel, data: Any, **options: Any) -> Analysis:
    """An `Analysis` of `dual` on `data` with its features and ranking computed (options as `Analysis`)."""
    an = Analysis(dual, data, **options)
    an.table  # noqa: B018  (computes the features and the ranking now)
    return an
