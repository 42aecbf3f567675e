"""Layer × layer similarity heatmaps (CKA, Procrustes, …)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .theme import SEQUENTIAL, _figure


def _as_matrix(matrix) -> tuple[np.ndarray, list[str] | None, list[str] | None, dict]:
    """Values, row labels, column labels and metric info from any accepted input."""
    info: dict = {}
    if hasattr(matrix, "labels_a") and hasattr(matrix, "matrix"):  # LayerSimilarity
        info = dict(
            name=matrix.name,
            range=matrix.info.range,
            higher_is_similar=matrix.info.higher_is_similar,
            n_tokens=matrix.n_tokens,
        )
        return np.asarray(matrix.matrix, dtype=float), list(matrix.labels_a), list(matrix.labels_b), info
    if hasattr(matrix, "to_numpy") and hasattr(matrix, "index"):  # pandas DataFrame
        return (
            matrix.to_numpy(dtype=float),
            [str(v) for v in matrix.index],
            [str(v) for v in matrix.columns],
            info,
        )
    if hasattr(matrix, "detach"):  # torch tensor
        matrix = matrix.detach().cpu().numpy()
    arr = np.asarray(matrix, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {arr.shape}")
    return arr, None, None, info


def similarity_heatmap(
    matrix,
    *,
    labels_x: list[str] | None = None,
    labels_y: list[str] | None = None,
    title: str | None = None,
    xaxis_title: str = "layer of B (blocks applied)",
    yaxis_title: str = "layer of A (blocks applied)",
    zmin: float | None = None,
    zmax: float | None = None,
    annotate: bool | None = None,
    width: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Heatmap of a layer x layer similarity matrix (rows = A's layers, top to bottom).

    Args:
        matrix: a :class:`mechnorm.similarity.LayerSimilarity`, a pandas DataFrame, a
            tensor or an array ``[layers_a, layers_b]``.
        labels_x, labels_y: axis tick labels (columns, rows); taken from the result or the
            DataFrame when not given, else ``0 … n−1``.
        title: figure title; defaults to the metric name and token count.
        xaxis_title, yaxis_title: axis titles.
        zmin, zmax: colour range; defaults to the metric's range (0..1 for CKA; 0..2 for
            Procrustes, where the scale is reversed so that bright = similar throughout).
        annotate: print values in the cells; default when the matrix has ≤ 16 x 16 cells.
        width, height: figure size in pixels (default: square-ish from the matrix shape).

    Returns:
        A ``plotly.graph_objects.Figure`` (not shown).

    Example:
        >>> fig = similarity_heatmap(torch.eye(3), title="toy")  # doctest: +SKIP
        >>> fig.write_html("cka.html")                            # doctest: +SKIP
    """
    z, rows, cols, info = _as_matrix(matrix)
    n_rows, n_cols = z.shape
    cols = [str(v) for v in (labels_x or cols or range(n_cols))]
    rows = [str(v) for v in (labels_y or rows or range(n_rows))]
    if (len(rows), len(cols)) != z.shape:
        raise ValueError(f"{len(rows)} row / {len(cols)} column labels for a {z.shape} matrix")
    lo, hi = info.get("range", (0.0, 1.0))
    zmin = lo if zmin is None else zmin
    zmax = hi if zmax is None else zmax
    if title is None:
        title = info.get("name", "similarity")
        if "n_tokens" in info:
            title += f" ({info['n_tokens']} tokens)"
    if annotate is None:
        annotate = n_rows <= 16 and n_cols <= 16
    heat = go.Heatmap(
        z=z,
        x=cols,
        y=rows,
        zmin=zmin,
        zmax=zmax,
        colorscale=SEQUENTIAL,
        reversescale=not info.get("higher_is_similar", True),
        colorbar=dict(title=dict(text=info.get("name", "")), thickness=14),
        hovertemplate="A %{y} · B %{x}: %{z:.3f}<extra></extra>",
        texttemplate="%{z:.2f}" if annotate else None,
        xgap=1,
        ygap=1,
    )
    fig = _figure(
        heat,
        title=dict(text=title),
        width=width or 160 + 46 * max(n_cols, 4),
        height=height or 170 + 40 * max(n_rows, 4),
    )
    fig.update_xaxes(title_text=xaxis_title, type="category", showline=False, ticks="")
    # first layer at the top, as in a printed matrix
    fig.update_yaxes(title_text=yaxis_title, type="category", autorange="reversed", showline=False, ticks="")
    return fig

