"""Figures of token attributions: layer × token heatmaps, inline highlights, method comparisons."""

from __future__ import annotations

import html
from typing import Iterable, Literal

import numpy as np
import plotly.graph_objects as go

from ..names import display_name
from .labels import PROTECTED_COLOUR, _ticks, _protected, _real_positions, _token_labels, method_title, target_text
from .theme import DIVERGING, SEQUENTIAL, _figure

#: methods whose scores are a share of attention mass; a row with more than
#: DEGENERATE_SHARE of it on the first token is flagged as degenerate
MASS_METHODS = ("rollout", "attention", "globenc", "alti")
DEGENERATE_SHARE = 0.9


def first_token_share(attribution, batch: int = 0) -> float | None:
    """Share of the last row's (non-negative) mass on the sequence's first real token, for the
    attention-mass methods (:data:`MASS_METHODS`); None for other methods.

    Example:
        >>> first_token_share(mechnorm.rollout(cache, head, target))          # doctest: +SKIP
        0.97
    """
    if attribution.method not in MASS_METHODS:
        return None
    values = attribution.scores[-1, batch, _real_positions(attribution.mask, batch)].double()
    total = float(values.clamp(min=0).sum())
    return float(values[0].clamp(min=0)) / total if total > 0 else None


def _rows(attribution, layers: Iterable[int] | None) -> list[int]:
    """Row indices of ``attribution.scores`` for the requested layer indices (-1 = last)."""
    if layers is None:
        return list(range(len(attribution.layers)))
    out = []
    for layer in [layers] if isinstance(layers, int) else list(layers):
        if layer == -1:
            out.append(len(attribution.layers) - 1)
        elif layer in attribution.layers:
            out.append(attribution.layers.index(layer))
        else:
            raise ValueError(f"Layer {layer} was not computed; choose layers from {attribution.layers} (or -1 for the last).")
    if not out:
        raise ValueError(f"layers selects nothing; choose from {attribution.layers}.")
    return out


def _peak(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def _default_limit(z: np.ndarray) -> float:
    """The larger of the last row's peak |value| and the median of the rows' peaks (see
    :func:`layer_token_heatmap`); 1 when everything is zero."""
    peaks = [_peak(row) for row in z]
    return max(peaks[-1], float(np.median(peaks))) or 1.0


def layer_token_heatmap(
    attribution,
    batch: int = 0,
    layers: Iterable[int] | int | None = None,
    zmax: float | None = None,
    normalize: Literal["layer"] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Layers × tokens heatmap of one sequence's scores, layer 0 at the bottom.

    Signed methods get a diverging scale centred on zero; unsigned ones a sequential scale.
    The x axis shows the sequence's tokens with whitespace made visible (``␣``, ``↵``);
    protected positions (``attribution.protected``: BOS, the prediction position) are greyed
    and left out of the colour range. The title gives the paper's method name and the target
    (``"NormXLogit — target ' Paris'"``); attention-mass methods with more than 90 % of the
    mass on the first token say they are degenerate.

    **Default colour range: the larger of the last row's max |score| and the median over
    rows of each row's max |score|**, over unprotected tokens. The last row shown is the
    final layer, the paper's score, so it always spans its full share of the range. A few
    layers can be an order of magnitude larger than the rest (NormXLogit's layer 0 on
    SmolLM2 reaches ±133 while the final layer peaks at ±32); a range set by them leaves
    the final row pale, so they saturate instead, the colour bar says where it clips, and
    the hover always shows the raw score. The median keeps the middle layers readable when
    the final row is itself near zero (a degenerate rollout) instead of saturating them all.

    Args:
        attribution: an :class:`~mechnorm.result.Attribution`.
        batch: which sequence.
        layers: layer indices to show (from ``attribution.layers``; -1 = the last), default all.
        zmax: the colour range's upper limit (``[-zmax, zmax]`` for signed scores).
        normalize: ``"layer"`` divides each row by its own max |score| (range ±1), so every
            layer's pattern is readable; the hover keeps the raw score.
        title: replaces the default title.

    Example:
        >>> fig = mechnorm.plot.layer_token_heatmap(attr, layers=[0, 10, 20, 30], normalize="layer")  # doctest: +SKIP
    """
    if normalize not in (None, "layer"):
        raise ValueError(f"normalize must be None or 'layer', got {normalize!r}.")
    if zmax is not None and not zmax > 0:
        raise ValueError(f"zmax must be positive, got {zmax}.")
    rows = _rows(attribution, layers)
    layer_ids = [attribution.layers[r] for r in rows]
    positions = _real_positions(attribution.mask, batch)
    raw = attribution.scores[rows][:, batch, positions].numpy()
    labels = _token_labels(attribution.tokens, batch, positions)
    protected = _protected(attribution, batch, positions)
    free = ~np.array(protected, dtype=bool) if not all(protected) else np.ones(len(positions), dtype=bool)
    z = raw
    if normalize == "layer":
        peaks = np.array([_peak(row[free]) for row in raw])[:, None]
        z = raw / np.where(peaks > 0, peaks, 1.0)
    limit = zmax or (1.0 if normalize else _default_limit(z[:, free]))
    clipped = _peak(z[:, free]) > limit * (1 + 1e-6)
    unit = "score / layer max|score|" if normalize else "score"
    bar = f"{unit}<br>(clipped at {'±' if attribution.signed else ''}{limit:.3g})" if clipped else unit
    if attribution.signed:
        colour = dict(colorscale=DIVERGING, zmid=0, zmin=-limit, zmax=limit)
    else:
        low = np.nanmin(z[:, free]) if np.isfinite(z[:, free]).any() else 0.0
        colour = dict(colorscale=SEQUENTIAL, zmin=min(0.0, float(low)), zmax=limit)
    hover = [[f"token {html.escape(label)}<br>layer {layer}" for label in labels] for layer in layer_ids]
    traces = [go.Heatmap(
        z=z, x=list(range(len(positions))), y=list(range(len(rows))), text=hover, customdata=raw,
        hovertemplate="%{text}<br>score %{customdata:.4g}<extra></extra>",
        colorbar=dict(title=dict(text=bar, side="right")), name="scores", **colour,
    )]
    if any(protected):
        grey = np.where(np.array(protected)[None, :], 1.0, np.nan).repeat(len(rows), axis=0)
        traces.append(go.Heatmap(
            z=grey, x=list(range(len(positions))), y=list(range(len(rows))), colorscale=[[0, PROTECTED_COLOUR], [1, PROTECTED_COLOUR]],
            showscale=False, opacity=0.8, hoverinfo="skip", name="protected",
        ))
    if title is None:
        title = method_title(attribution, batch)
        share = first_token_share(attribution, batch)
        if share is not None and share > DEGENERATE_SHARE:
            title += (f"<br><sup>degenerate: {share:.0%} of the attention mass on the first token "
                      f"({html.escape(labels[0])})</sup>")
    return _figure(
        traces,
        title=dict(text=title),
        xaxis=dict(title="token", tickmode="array", tickvals=list(range(len(labels))), ticktext=_ticks(labels, protected), tickangle=-45),
        yaxis=dict(title="layer (blocks applied)", tickmode="array", tickvals=list(range(len(rows))), ticktext=[str(layer) for layer in layer_ids]),
        height=max(340, 26 * len(rows) + 190),
        width=max(480, 48 * len(labels) + 200),
    )


def token_highlight(attribution, layer: int = -1, batch: int | None = None) -> str:
    """The sentence(s) as inline HTML, each token shaded by its score at ``layer``.

    Red for positive, blue for negative (signed methods), opacity ∝ |score| / max |score| of
    the sequence; hovering a token shows its score; whitespace-only tokens show as ``␣``/``↵``
    and protected positions in grey text. Used by ``Attribution._repr_html_``.

    Example:
        >>> from IPython.display import HTML
        >>> HTML(mechnorm.plot.token_highlight(attr))               # doctest: +SKIP
    """
    scores = attribution.row(layer)
    rows = range(attribution.batch_size) if batch is None else [batch]
    lines = []
    for b in rows:
        positions = _real_positions(attribution.mask, b)
        values = scores[b, positions]
        peak = float(values.abs().max()) if values.numel() else 0.0
        cells = []
        for pos, label, grey in zip(positions, _token_labels(attribution.tokens, b, positions), _protected(attribution, b, positions)):
            value = float(scores[b, pos])
            alpha = abs(value) / peak if peak > 0 else 0.0
            rgb = "178,24,43" if value >= 0 or not attribution.signed else "33,102,172"
            colour = f"color:{PROTECTED_COLOUR};" if grey else ""
            cells.append(
                f'<span title="{value:.4g}" style="background:rgba({rgb},{alpha:.2f});{colour}'
                f'padding:1px 3px;margin:1px;border-radius:3px;white-space:pre">{html.escape(label)}</span>'
            )
        target = f" → <b>{html.escape(attribution.target_labels[b])}</b>" if attribution.target_labels else ""
        lines.append(f"<div style='font-family:monospace;line-height:1.9'>{''.join(cells)}{target}</div>")
    return "\n".join(lines)


def compare_methods(comparison, batch: int = 0, layer: int = -1) -> go.Figure:
    """One row per method (by its paper name): the sequence's token scores side by side, each
    row scaled to its max |score| over unprotected tokens.

    Rows are normalised separately because methods live on different scales; hover shows
    the raw score. Protected positions are greyed.

    Example:
        >>> fig = mechnorm.plot.compare_methods(mechnorm.attribute(model, "The keys to the cabinet"))  # doctest: +SKIP
    """
    methods = list(comparison.methods)
    first = comparison[methods[0]]
    positions = _real_positions(first.mask, batch)
    labels = _token_labels(first.tokens, batch, positions)
    protected = _protected(first, batch, positions)
    free = ~np.array(protected, dtype=bool) if not all(protected) else np.ones(len(positions), dtype=bool)
    raw = np.stack([comparison[m].row(layer)[batch, positions].numpy() for m in methods])
    peaks = np.array([_peak(row[free]) for row in raw])[:, None]
    scaled = raw / np.where(peaks > 0, peaks, 1.0)
    names = [display_name(m) for m in methods]
    traces = [go.Heatmap(
        z=scaled, x=list(range(len(labels))), y=names, customdata=raw, colorscale=DIVERGING, zmid=0, zmin=-1, zmax=1,
        hovertemplate="%{y}<br>token %{x}<br>score %{customdata:.4g}<extra></extra>",
        colorbar=dict(title=dict(text="score / max|score|", side="right")),
    )]
    if any(protected):
        grey = np.where(np.array(protected)[None, :], 1.0, np.nan).repeat(len(methods), axis=0)
        traces.append(go.Heatmap(z=grey, x=list(range(len(labels))), y=names, colorscale=[[0, PROTECTED_COLOUR], [1, PROTECTED_COLOUR]],
                                 showscale=False, opacity=0.8, hoverinfo="skip", name="protected"))
    target = target_text(first, batch)
    return _figure(
        traces,
        title=dict(text=f"Methods compared — target {target}" if target else "Methods compared"),
        xaxis=dict(title="token", tickmode="array", tickvals=list(range(len(labels))), ticktext=_ticks(labels, protected), tickangle=-45),
        yaxis=dict(title="", autorange="reversed"),
        height=max(330, 34 * len(methods) + 190),
        width=max(480, 48 * len(labels) + 260),
    )


def agreement_matrix(comparison, layer: int = -1) -> go.Figure:
    """Methods × methods mean Spearman rank correlation (``Comparison.agreement``), on [-1, 1].

    Example:
        >>> fig = mechnorm.plot.agreement_matrix(comparison)        # doctest: +SKIP
    """
    frame = comparison.agreement(layer=layer)
    names = [display_name(m) for m in frame.columns]
    heatmap = go.Heatmap(
        z=frame.to_numpy(), x=names, y=[display_name(m) for m in frame.index], colorscale=DIVERGING, zmid=0, zmin=-1, zmax=1,
        text=np.round(frame.to_numpy(), 2), texttemplate="%{text}", colorbar=dict(title=dict(text="Spearman ρ", side="right")),
    )
    n = len(frame)
    return _figure(heatmap, title=dict(text="Method agreement (rank correlation)"), yaxis=dict(autorange="reversed"),
                   width=240 + 80 * n, height=210 + 60 * n)
