"""Comparison: several methods' attributions for the same sequences, and their agreement."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from torch import Tensor

from .inputs import Batch
from .persist import ResultIO
from .result import Attribution


@dataclass
class Comparison(ResultIO):
    """Attributions of several methods for the same sequences and targets.

    Index it by method name (``comp["normxlogit"]``); iterate over the names.

    Attributes:
        attributions: method name -> :class:`~mechnorm.result.Attribution` over all sequences.
        batch: the tokenised inputs (ids, mask, strings).
        seconds: method name -> wall time spent in it (plus ``"forward"`` for the cached passes).

    Example:
        >>> comp = mechnorm.attribute(model, ["The keys to the cabinet"])   # doctest: +SKIP
        >>> comp["normxlogit"].top_k(3)                                      # doctest: +SKIP
        >>> comp.agreement()                                                  # doctest: +SKIP
    """

    attributions: dict[str, Attribution]
    batch: Batch
    seconds: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, method: str) -> Attribution:
        try:
            return self.attributions[method]
        except KeyError:
            raise KeyError(f"No method {method!r} in this comparison; it has {list(self.attributions)}.") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.attributions)

    def __len__(self) -> int:
        return len(self.attributions)

    @property
    def methods(self) -> list[str]:
        """The method names, in the order they were run."""
        return list(self.attributions)

    def to_frame(self) -> pd.DataFrame:
        """Every method's tidy scores stacked: columns method, layer, batch, pos, token, score."""
        return pd.concat([a.to_frame() for a in self.attributions.values()], ignore_index=True)

    def agreement(self, layer: int = -1) -> pd.DataFrame:
        """Spearman rank correlation between methods, per sequence over its real tokens, averaged.

        Args:
            layer: which row of layer-wise methods to compare: -1 for each method's last row,
                or a layer index (blocks applied); single-row methods use their only row.

        Returns:
            A methods × methods DataFrame. Sequences where a method's scores are constant
            (or that have fewer than two real tokens) are skipped for that pair; a pair with
            no usable sequence is NaN.

        Example:
            >>> comp.agreement().round(2)                                    # doctest: +SKIP
        """
        rows = {name: _row(attr, layer) for name, attr in self.attributions.items()}
        mask = next(iter(self.attributions.values())).mask
        names = list(rows)
        table = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                value = _mean_spearman(rows[a], rows[b], mask)
                table.loc[a, b] = table.loc[b, a] = value
        return table

    def __repr__(self) -> str:
        return f"Comparison(methods={self.methods}, sequences={len(self.batch)})"

    def plot(self, **kwargs):
        """Methods × tokens, each row scaled to its max (:func:`mechnorm.plot.compare_methods`).

        Example:
            >>> comp.plot(batch=1)                                          # doctest: +SKIP
        """
        from .plot import compare_methods

        return compare_methods(self, **kwargs)


def _row(attr: Attribution, layer: int) -> Tensor:
    if layer == -1 or len(attr.layers) == 1:
        return attr.row(-1)
    return attr.row(layer)


def _mean_spearman(a: Tensor, b: Tensor, mask: Tensor) -> float:
    values = []
    for i in range(mask.shape[0]):
        real = mask[i]
        x, y = a[i, real].numpy(), b[i, real].numpy()
        if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values.append(spearmanr(x, y).statistic)
    return float(np.mean(values)) if values else float("nan")
