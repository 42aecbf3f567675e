"""RepMatch figures in mechnorm's theme; returned, never shown."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from ..plot import PALETTE, apply_theme, similarity_heatmap


def similarity_matrix_heatmap(matrix, *, title: str = "RepMatch φ (mean over layers and matrices)", **kwargs) -> go.Figure:
    """Heatmap of φ between data subsets: a :class:`~mechnorm.repmatch.SimilarityMatrix` or an n × n DataFrame.

    Example:
        >>> import pandas as pd
        >>> fig = similarity_matrix_heatmap(pd.DataFrame([[1, .2], [.2, 1]], index=["a", "b"], columns=["a", "b"]))
        >>> fig.data[0].type
        'heatmap'
    """
    frame = matrix.mean() if hasattr(matrix, "values") and hasattr(matrix, "names") else matrix
    kwargs.setdefault("xaxis_title", "adapter")
    kwargs.setdefault("yaxis_title", "adapter")
    fig = similarity_heatmap(frame, title=title, zmin=0.0, zmax=1.0, **kwargs)
    fig.data[0].colorbar.title.text = "φ"
    return fig


def instance_scores_plot(scores, *, groups: Sequence[str] | None = None, title: str = "RepMatch instance scores by layer") -> go.Figure:
    """Box plot of instance scores per layer, one box colour per group (e.g. shortcut vs rest).

    ``scores`` is an :class:`~mechnorm.repmatch.InstanceScores`; ``groups`` one label per instance.

    Example:
        >>> import torch
        >>> from mechnorm.repmatch import InstanceScores
        >>> s = InstanceScores([(0, "query"), (1, "query")], torch.rand(6, 2, dtype=torch.float64))
        >>> len(instance_scores_plot(s, groups=["a", "b"] * 3).data)
        2
    """
    by_layer = scores.by_layer()
    n = len(by_layer)
    groups = ["all"] * n if groups is None else list(groups)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} labels for {n} instances; give one per instance.")
    fig = go.Figure()
    for colour, group in zip(PALETTE * 4, dict.fromkeys(groups)):
        rows = np.array([g == group for g in groups])
        part = by_layer[rows]
        fig.add_trace(go.Box(
            x=np.repeat([str(c) for c in part.columns], len(part)),
            y=part.to_numpy().T.ravel(),
            name=str(group), marker_color=colour, boxmean=True,
        ))
    fig.update_layout(boxmode="group", title=title, xaxis_title="layer (block index)", yaxis_title="φ", yaxis_range=[0, 1])
    return apply_theme(fig)
