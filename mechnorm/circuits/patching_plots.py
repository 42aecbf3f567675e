"""Heatmaps of patching results (layer × position with token labels, block × head), in mechnorm's theme."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ..plot import DIVERGING, _figure, _symmetric_range


def patching_heatmap(result, batch: int | None = None, title: str | None = None) -> go.Figure:
    """Heatmap of a :class:`~mechnorm.circuits.patching_result.PatchingResult`, layer 0 at the bottom.

    ``resid_pre``/``attn_out``/``mlp_out`` give layer (or block) × position with the clean
    tokens as labels; ``head_out`` and ``pattern`` give block × head; ``head_pos`` gives one row
    per head (``L1H2``) × position. The colour scale is diverging and centred on 0, where 1 is
    "this patch alone restores the clean behaviour".

    Args:
        result: what ``mechnorm.activation_patching`` / ``attribution_patching`` returned.
        batch: one pair to show; None averages over the pairs (positions then read as indices
            into the padded batch, labelled with pair 0's tokens).
        title: replaces the default title.

    Example:
        >>> fig = mechnorm.plot.patching_heatmap(mechnorm.activation_patching(model, clean, corrupted, target))  # doctest: +SKIP
    """
    values = result.mean() if batch is None else result.scores[:, batch]
    values = values.numpy()
    first = result.dims[0]
    if "head" in result.dims and "pos" in result.dims:  # [block, head, pos] -> rows L{b}H{h}
        rows = [f"L{b}H{h}" for b in result.coords[first] for h in result.coords["head"]]
        values = values.reshape(len(rows), -1)
    else:
        rows = [str(v) for v in result.coords[first]]
    if "pos" in result.dims:
        shown = np.isfinite(values).any(0).nonzero()[0].tolist() if np.isfinite(values).any() else list(range(values.shape[1]))
        values = values[:, shown]
        pair = 0 if batch is None else batch
        tokens = result.tokens[pair] if result.tokens is not None else None
        columns = [f"{tokens[p]!s}" if tokens else str(p) for p in shown]
        x_title = "token" if batch is not None or result.batch_size == 1 else "position (pair 0's tokens)"
    else:
        columns = [str(h) for h in result.coords["head"]]
        x_title = "head"
    limit = _symmetric_range(values)
    heatmap = go.Heatmap(
        z=values,
        x=list(range(len(columns))),
        y=list(range(len(rows))),
        colorscale=DIVERGING, zmid=0, zmin=-limit, zmax=limit,
        customdata=np.array([[f"{r} · {c}" for c in columns] for r in rows]),
        hovertemplate="%{customdata}<br>score %{z:.3g}<extra></extra>",
        colorbar=dict(title=dict(text="restored", side="right")),
    )
    y_title = {"layer": "layer (blocks applied)", "block": "block"}[first] + (" · head" if len(rows) > len(result.coords[first]) else "")
    which = "mean of %d pairs" % result.batch_size if batch is None else f"pair {batch}"
    target = f" · {result.target_labels[batch or 0]}" if result.target_labels else ""
    return _figure(
        heatmap,
        title=title or f"{result.method}: {result.where} ({which}){target}",
        xaxis=dict(title=x_title, tickmode="array", tickvals=list(range(len(columns))), ticktext=columns, tickangle=-45 if "pos" in result.dims else 0),
        yaxis=dict(title=y_title, tickmode="array", tickvals=list(range(len(rows))), ticktext=rows),
        height=max(320, 24 * len(rows) + 160),
        width=max(420, 40 * len(columns) + 220),
    )


__all__ = ["patching_heatmap"]
