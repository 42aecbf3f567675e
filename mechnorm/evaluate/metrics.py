"""The evaluation metrics as a small registry: name, range, and which direction is better.

Each metric declares whether lower is better, so a results table can sort itself and mark
the best method per column (:func:`best_first`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class MetricSpec:
    """What a metric measures and how to read it."""

    name: str
    description: str
    lower_is_better: bool
    range: tuple[float, float]
    family: str  # faithfulness, alignment, agreement, sanity or cost

    @property
    def arrow(self) -> str:
        """``"↓"`` when lower is better, else ``"↑"``."""
        return "↓" if self.lower_is_better else "↑"


_METRICS: dict[str, MetricSpec] = {}


def register_metric(name: str, description: str, lower_is_better: bool, range: tuple[float, float], family: str) -> MetricSpec:
    """Add a metric to the registry (an error if the name is taken).

    Example:
        >>> spec = register_metric("my_metric", "demo", False, (0, 1), "alignment")   # doctest: +SKIP
    """
    if name in _METRICS:
        raise ValueError(f"A metric named {name!r} is already registered.")
    spec = MetricSpec(name, description, lower_is_better, (float(range[0]), float(range[1])), family)
    _METRICS[name] = spec
    return spec


def get_metric(name: str) -> MetricSpec:
    """The metric called ``name``; a clear error lists the known names.

    Example:
        >>> get_metric("sufficiency").lower_is_better
        True
    """
    try:
        return _METRICS[name]
    except KeyError:
        raise KeyError(f"No metric named {name!r}. Known metrics: {sorted(_METRICS)}.") from None


def list_metrics() -> pd.DataFrame:
    """Every registered metric: name, family, range, lower_is_better, description.

    Example:
        >>> "average_precision" in set(list_metrics()["name"])
        True
    """
    rows = [
        {"name": s.name, "family": s.family, "range": s.range, "lower_is_better": s.lower_is_better, "description": s.description}
        for s in _METRICS.values()
    ]
    return pd.DataFrame(rows, columns=["name", "family", "range", "lower_is_better", "description"])


def best_first(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows of ``table`` sorted by column ``metric``, best first by the metric's direction.

    Example:
        >>> frame = pd.DataFrame({"sufficiency": [0.3, 0.1]}, index=["a", "b"])
        >>> best_first(frame, "sufficiency").index.tolist()
        ['b', 'a']
    """
    return table.sort_values(metric, ascending=get_metric(metric).lower_is_better, na_position="last")


_INF = math.inf
register_metric("comprehensiveness", "confidence drop of the prediction when the top-K % tokens are removed "
                "(AOPC over K when k is NaN)", False, (-1, 1), "faithfulness")
register_metric("comprehensiveness_accuracy", "accuracy against gold labels with the top-K % tokens removed",
                True, (0, 1), "faithfulness")
register_metric("sufficiency", "confidence drop of the prediction when only the top-K % tokens are kept "
                "(AOPC over K when k is NaN)", True, (-1, 1), "faithfulness")
register_metric("sufficiency_accuracy", "accuracy against gold labels with only the top-K % tokens kept",
                False, (0, 1), "faithfulness")
register_metric("average_precision", "average precision of the token ranking against the known cue tokens",
                False, (0, 1), "alignment")
register_metric("cue_mass", "dot product of L1-normalised scores with the cue indicator (share of mass on cues)",
                False, (-1, 1), "alignment")
register_metric("hit_at_1", "whether the top-ranked token is a cue token (its mean: share of sequences)",
                False, (0, 1), "alignment")
register_metric("spearman", "Spearman rank correlation between two rankings of the same tokens", False, (-1, 1), "agreement")
register_metric("kendall", "Kendall tau-b between two rankings of the same tokens", False, (-1, 1), "agreement")
register_metric("randomization_spearman", "Spearman correlation of attributions before/after re-initialising blocks "
                "(lower = more sensitive to the weights, as a faithful method should be)", True, (-1, 1), "sanity")
register_metric("seconds_per_instance", "wall time of the method per sequence", True, (0, _INF), "cost")
register_metric("peak_mb", "largest rise of resident memory while the method ran on one batch", True, (0, _INF), "cost")
register_metric("mb_per_instance", "memory per extra sequence, from peaks at two batch sizes", True, (0, _INF), "cost")
register_metric("max_batch", "largest batch that fits the memory budget, extrapolated", False, (0, _INF), "cost")
