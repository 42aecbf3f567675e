"""Figures for the circuit analyses, in mechnorm's plot theme. Figures are returned, never shown.

Exposed as ``mechnorm.plot.component_bars``, ``mechnorm.plot.layer_head_heatmap`` and
``mechnorm.plot.head_token_heatmap``.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from ..plot import DIVERGING, PALETTE, _figure, _symmetric_range

__all__ = ["component_bars", "layer_head_heatmap", "head_token_heatmap"]


def _kind_colour(label: str) -> str:
    if "embed" in label:
        return PALETTE[2]
    if label.endswith(".mlp"):
        return PALETTE[1]
    return PALETTE[0]  # attention: heads, biases, whole layers


def component_bars(result, batch: int = 0, position: int = 0, top: int | None = 20, title: str | None = None) -> go.Figure:
    """Horizontal bars of each component's score for one sequence, largest magnitude on top.

    Attention components are blue, MLPs orange, embeddings green. ``top`` keeps the ``top``
    largest in magnitude (None: all, in model order).

    Example:
        >>> fig = mechnorm.plot.component_bars(mechnorm.direct_logit_attribution(cache, head, target))  # doctest: +SKIP
    """
    scores = result.scores[:, batch] if not result.per_position else result.scores[:, batch, position]
    values = scores.numpy()
    order = list(range(len(values))) if top is None else list(np.argsort(-np.abs(values))[:top])
    order = order[::-1]  # plotly draws the first bar at the bottom
    labels = [result.labels[i] for i in order]
    bars = go.Bar(
        x=values[order], y=labels, orientation="h", marker_color=[_kind_colour(lab) for lab in labels],
        hovertemplate="%{y}<br>score %{x:.4g}<extra></extra>",
    )
    target = f" → {result.target_labels[batch]!r}" if result.target_labels else ""
    return _figure(
        bars, title=title or f"{result.method}{target}", xaxis=dict(title="logit contribution"),
        yaxis=dict(title="component", type="category"), height=max(320, 22 * len(labels) + 140), width=640,
    )


def layer_head_heatmap(result, batch: int = 0, position: int = 0, title: str | None = None) -> go.Figure:
    """Block × head heatmap of per-head scores (a :class:`ComponentAttribution` with heads, or a
    :class:`HeadTokenAttribution` summed over source tokens), block 0 at the bottom.

    Example:
        >>> fig = mechnorm.plot.layer_head_heatmap(mechnorm.direct_logit_attribution(cache, head, target, by="head"))  # doctest: +SKIP
    """
    if hasattr(result, "per_head"):
        grid, blocks = result.per_head()[:, :, batch], list(result.blocks)
    else:
        grid, blocks = result.layer_head()
        grid = grid[:, :, batch] if not result.per_position else grid[:, :, batch, position]
    z = grid.numpy()
    limit = _symmetric_range(z)
    heatmap = go.Heatmap(
        z=z, x=list(range(z.shape[1])), y=list(range(len(blocks))), colorscale=DIVERGING, zmid=0, zmin=-limit,
        zmax=limit, colorbar=dict(title=dict(text="logit", side="right")),
        customdata=np.array([[f"L{b}H{h}" for h in range(z.shape[1])] for b in blocks]),
        hovertemplate="%{customdata}<br>score %{z:.4g}<extra></extra>",
    )
    target = f" → {result.target_labels[batch]!r}" if result.target_labels else ""
    method = getattr(result, "method", "head_token_attribution")
    return _figure(
        heatmap, title=title or f"{method} per head{target}",
        xaxis=dict(title="head", tickmode="array", tickvals=list(range(z.shape[1]))),
        yaxis=dict(title="block", tickmode="array", tickvals=list(range(len(blocks))), ticktext=[str(b) for b in blocks]),
        height=max(320, 26 * len(blocks) + 160), width=max(420, 36 * z.shape[1] + 220),
    )


def head_token_heatmap(result, batch: int = 0, top: int | None = 12, title: str | None = None) -> go.Figure:
    """Heads × source tokens heatmap for one sequence, x labelled with the tokens.

    Rows are the ``top`` heads by total magnitude (None: every head, model order).

    Example:
        >>> fig = mechnorm.plot.head_token_heatmap(mechnorm.head_token_attribution(cache, head, target))  # doctest: +SKIP
    """
    real = result.mask[batch].nonzero().flatten().tolist()
    flat = result.scores[:, :, batch][..., real].flatten(0, 1).numpy()  # [block·head, src]
    n_heads = result.scores.shape[1]
    names = [f"L{b}H{h}" for b in result.blocks for h in range(n_heads)]
    order = list(range(len(names))) if top is None else list(np.argsort(-np.abs(flat).sum(1))[:top])[::-1]
    z = flat[order]
    tokens = [result.tokens[batch][p] for p in real] if result.tokens is not None else [str(p) for p in real]
    limit = _symmetric_range(z)
    heatmap = go.Heatmap(
        z=z, x=list(range(len(real))), y=list(range(len(order))), colorscale=DIVERGING, zmid=0, zmin=-limit,
        zmax=limit, colorbar=dict(title=dict(text="logit", side="right")),
        customdata=np.array([[f"{names[i]} ← {tok!r}" for tok in tokens] for i in order]),
        hovertemplate="%{customdata}<br>score %{z:.4g}<extra></extra>",
    )
    target = f" → {result.target_labels[batch]!r}" if result.target_labels else ""
    return _figure(
        heatmap, title=title or f"source tokens per head{target}",
        xaxis=dict(title="source token", tickmode="array", tickvals=list(range(len(tokens))), ticktext=tokens, tickangle=-45),
        yaxis=dict(title="head", tickmode="array", tickvals=list(range(len(order))), ticktext=[names[i] for i in order]),
        height=max(320, 24 * len(order) + 180), width=max(480, 48 * len(tokens) + 220),
    )
