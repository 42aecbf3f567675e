"""Plotly figures for mechnorm, all in one theme. Figures are returned, never shown.

The theme is a plotly template registered as ``"mechnorm"`` (:data:`TEMPLATE`): white
background, a sans-serif font at sizes that stay readable in a notebook and in a PDF column,
thin grey axes, no grid clutter. Every figure in this module is built through
:func:`_figure` (or themed afterwards with :func:`apply_theme`), so new plotting functions
get the same look by doing the same. Shared colour scales: :data:`SEQUENTIAL` for values in
[0, 1] (similarities, probabilities), :data:`DIVERGING` for signed scores.

The global plotly default is left alone; use ``plotly.io.templates.default = "mechnorm"``
to apply the theme to your own figures as well.

Export: :func:`save` writes PNG, SVG and PDF for papers through kaleido >= 1, which needs a
Chrome/Chromium it can find (Debian: ``apt-get install chromium``); ``fig.write_html`` always works.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

__all__ = [
    "TEMPLATE", "SEQUENTIAL", "DIVERGING", "FONT_FAMILY", "apply_theme", "similarity_heatmap",
    "layer_token_heatmap", "token_highlight", "compare_methods", "agreement_matrix", "lens_heatmap",
    "faithfulness_curves", "save",
]

FONT_FAMILY = "Helvetica, Arial, 'Liberation Sans', sans-serif"
SEQUENTIAL = "Viridis"  # perceptually uniform, colour-blind safe, prints in greyscale
DIVERGING = "RdBu_r"  # signed scores: blue < 0 < red
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]

_axis = dict(
    showline=True,
    linecolor="#444",
    linewidth=1,
    ticks="outside",
    tickcolor="#444",
    showgrid=False,
    zeroline=False,
    title=dict(standoff=8),
    automargin=True,
)

TEMPLATE = go.layout.Template(
    layout=go.Layout(
        font=dict(family=FONT_FAMILY, size=14, color="#222"),
        title=dict(font=dict(size=16), x=0.5, xanchor="center"),
        paper_bgcolor="white",
        plot_bgcolor="white",
        colorway=PALETTE,
        xaxis=_axis,
        yaxis=_axis,
        coloraxis=dict(colorscale=SEQUENTIAL, colorbar=dict(outlinewidth=0, ticks="outside")),
        colorscale=dict(sequential=SEQUENTIAL, diverging=DIVERGING),
        legend=dict(bgcolor="rgba(255,255,255,0)", borderwidth=0),
        margin=dict(l=70, r=30, t=60, b=60),
        hoverlabel=dict(font=dict(family=FONT_FAMILY)),
    )
)
pio.templates["mechnorm"] = TEMPLATE


def apply_theme(fig: go.Figure) -> go.Figure:
    """Give an existing figure the mechnorm theme (in place; also returned).

    Example:
        >>> import plotly.express as px
        >>> fig = apply_theme(px.line(x=[0, 1], y=[1, 0]))
    """
    fig.update_layout(template=TEMPLATE)
    return fig


def _figure(data: Any = None, **layout) -> go.Figure:
    """A new themed figure; ``layout`` keywords go to ``update_layout``."""
    fig = go.Figure(data=data, layout=go.Layout(template=TEMPLATE))
    if layout:
        fig.update_layout(**layout)
    return fig


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
        height=height or 140 + 40 * max(n_rows, 4),
    )
    fig.update_xaxes(title_text=xaxis_title, type="category", showline=False, ticks="")
    # first layer at the top, as in a printed matrix
    fig.update_yaxes(title_text=yaxis_title, type="category", autorange="reversed", showline=False, ticks="")
    return fig


# --------------------------------------------------------------------------- attributions


def _real_positions(mask, batch: int) -> list[int]:
    return mask[batch].nonzero().flatten().tolist()


def _token_labels(tokens, batch: int, positions: list[int]) -> list[str]:
    if tokens is None:
        return [str(p) for p in positions]
    return [tokens[batch][p] for p in positions]


def _symmetric_range(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def layer_token_heatmap(attribution, batch: int = 0, title: str | None = None) -> go.Figure:
    """Layers × tokens heatmap of one sequence's scores, layer 0 at the bottom.

    Signed methods get a diverging scale centred on zero (symmetric limits); unsigned ones a
    sequential scale. The x axis is labelled with the sequence's tokens (by position, so a
    repeated token keeps its own column) and the title names the method and the prediction.

    Example:
        >>> fig = mechnorm.plot.layer_token_heatmap(mechnorm.normxlogit(cache, head, target))  # doctest: +SKIP
    """
    positions = _real_positions(attribution.mask, batch)
    z = attribution.scores[:, batch, positions].numpy()
    labels = _token_labels(attribution.tokens, batch, positions)
    colour = dict(colorscale=DIVERGING, zmid=0, zmin=-_symmetric_range(z), zmax=_symmetric_range(z)) if attribution.signed else dict(colorscale=SEQUENTIAL)
    heatmap = go.Heatmap(
        z=z,
        x=list(range(len(positions))),
        y=list(range(len(attribution.layers))),
        customdata=np.array([[label] * len(attribution.layers) for label in labels]).T,
        hovertemplate="token %{customdata}<br>layer %{y}<br>score %{z:.4g}<extra></extra>",
        colorbar=dict(title=dict(text="score", side="right")),
        **colour,
    )
    predicted = f" → {attribution.target_labels[batch]!r}" if attribution.target_labels else ""
    fig = _figure(
        heatmap,
        title=title or f"{attribution.method}{predicted}",
        xaxis=dict(title="token", tickmode="array", tickvals=list(range(len(labels))), ticktext=labels, tickangle=-45),
        yaxis=dict(title="layer (blocks applied)", tickmode="array", tickvals=list(range(len(attribution.layers))), ticktext=[str(layer) for layer in attribution.layers]),
        height=max(320, 26 * len(attribution.layers) + 160),
        width=max(480, 48 * len(labels) + 200),
    )
    return fig


def token_highlight(attribution, layer: int = -1, batch: int | None = None) -> str:
    """The sentence(s) as inline HTML, each token shaded by its score at ``layer``.

    Red for positive, blue for negative (signed methods), opacity ∝ |score| / max |score| of
    the sequence; hovering a token shows its score. Used by ``Attribution._repr_html_``.

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
        for pos, label in zip(positions, _token_labels(attribution.tokens, b, positions)):
            value = float(scores[b, pos])
            alpha = abs(value) / peak if peak > 0 else 0.0
            rgb = "178,24,43" if value >= 0 or not attribution.signed else "33,102,172"
            cells.append(
                f'<span title="{value:.4g}" style="background:rgba({rgb},{alpha:.2f});'
                f'padding:1px 3px;margin:1px;border-radius:3px;white-space:pre">{html.escape(label)}</span>'
            )
        target = f" → <b>{html.escape(attribution.target_labels[b])}</b>" if attribution.target_labels else ""
        lines.append(f"<div style='font-family:monospace;line-height:1.9'>{''.join(cells)}{target}</div>")
    return "\n".join(lines)


def compare_methods(comparison, batch: int = 0, layer: int = -1) -> go.Figure:
    """One row per method: the sequence's token scores side by side, each row scaled to its max |score|.

    Rows are normalised separately because methods live on different scales; hover shows
    the raw score.

    Example:
        >>> fig = mechnorm.plot.compare_methods(mechnorm.attribute(model, "The keys to the cabinet"))  # doctest: +SKIP
    """
    methods = list(comparison.methods)
    first = comparison[methods[0]]
    positions = _real_positions(first.mask, batch)
    labels = _token_labels(first.tokens, batch, positions)
    raw = np.stack([comparison[m].row(layer)[batch, positions].numpy() for m in methods])
    peaks = np.abs(raw).max(axis=1, keepdims=True)
    scaled = raw / np.where(peaks > 0, peaks, 1.0)
    heatmap = go.Heatmap(
        z=scaled, x=list(range(len(labels))), y=methods, customdata=raw, colorscale=DIVERGING, zmid=0, zmin=-1, zmax=1,
        hovertemplate="%{y}<br>token %{x}<br>score %{customdata:.4g}<extra></extra>",
        colorbar=dict(title=dict(text="score / max|score|", side="right")),
    )
    return _figure(
        heatmap,
        title="Methods compared",
        xaxis=dict(title="token", tickmode="array", tickvals=list(range(len(labels))), ticktext=labels, tickangle=-45),
        yaxis=dict(title="", autorange="reversed"),
        height=max(300, 34 * len(methods) + 160),
        width=max(480, 48 * len(labels) + 260),
    )


def agreement_matrix(comparison, layer: int = -1) -> go.Figure:
    """Methods × methods mean Spearman rank correlation (``Comparison.agreement``), on [-1, 1].

    Example:
        >>> fig = mechnorm.plot.agreement_matrix(comparison)        # doctest: +SKIP
    """
    frame = comparison.agreement(layer=layer)
    heatmap = go.Heatmap(
        z=frame.to_numpy(), x=list(frame.columns), y=list(frame.index), colorscale=DIVERGING, zmid=0, zmin=-1, zmax=1,
        text=np.round(frame.to_numpy(), 2), texttemplate="%{text}", colorbar=dict(title=dict(text="Spearman ρ", side="right")),
    )
    n = len(frame)
    return _figure(heatmap, title="Method agreement (rank correlation)", yaxis=dict(autorange="reversed"), width=220 + 70 * n, height=180 + 60 * n)


def lens_heatmap(lens, batch: int = 0, value: str = "target_prob") -> go.Figure:
    """Logit-lens trajectory: layers × positions coloured by ``value``, top-k tokens on hover.

    ``value`` is a ``LensResult`` field of shape ``[layer, batch, pos]``: ``"target_prob"``,
    ``"target_logit"``, ``"entropy"`` or ``"kl"``. Each cell shows the layer's top-1 token.

    Example:
        >>> fig = mechnorm.plot.lens_heatmap(mechnorm.logit_lens(cache, head, positions="all"))  # doctest: +SKIP
    """
    columns = _real_positions(lens.mask, batch)
    z = getattr(lens, value)[:, batch, columns].float().numpy()
    vocab = lens.vocab or {}
    name = lambda i: vocab.get(int(i), str(int(i)))  # noqa: E731
    top_ids = lens.top_ids[:, batch, columns]  # [layer, col, k]
    top_probs = lens.top_probs[:, batch, columns]
    text = [[name(top_ids[l, c, 0]) for c in range(len(columns))] for l in range(len(lens.layers))]
    hover = [
        ["<br>".join(f"{name(i)!r} {p:.3f}" for i, p in zip(top_ids[l, c].tolist(), top_probs[l, c].tolist())) for c in range(len(columns))]
        for l in range(len(lens.layers))
    ]
    labels = _token_labels(lens.tokens, batch, columns)
    heatmap = go.Heatmap(
        z=z, x=list(range(len(columns))), y=list(range(len(lens.layers))), text=text, texttemplate="%{text}",
        customdata=hover, hovertemplate="layer %{y}, token %{x}<br>%{customdata}<extra></extra>",
        colorscale=SEQUENTIAL, colorbar=dict(title=dict(text=value, side="right")),
    )
    return _figure(
        heatmap,
        title=f"Logit lens ({value})",
        xaxis=dict(title="input token", tickmode="array", tickvals=list(range(len(labels))), ticktext=labels, tickangle=-45),
        yaxis=dict(title="layer (blocks applied)", tickmode="array", tickvals=list(range(len(lens.layers))), ticktext=[str(x) for x in lens.layers]),
        height=max(320, 26 * len(lens.layers) + 160),
        width=max(480, 60 * len(labels) + 200),
    )


def faithfulness_curves(frame, metric: str = "comprehensiveness", layer: str | int = "last") -> go.Figure:
    """Confidence drop against K (fraction of tokens removed or kept), one line per method.

    ``frame`` is the tidy output of ``mechnorm.evaluate.run`` (columns method, layer, metric,
    k, value); per-K rows of ``metric`` are plotted, at each method's last layer by default.

    Example:
        >>> fig = mechnorm.plot.faithfulness_curves(mechnorm.evaluate.run(model, data))  # doctest: +SKIP
    """
    rows = frame[(frame["metric"] == metric) & frame["k"].notna()]
    if rows.empty:
        raise ValueError(f"No per-K rows for metric {metric!r}; metrics present: {sorted(frame['metric'].unique())}.")
    fig = _figure(title=f"{metric.capitalize()} (higher is more faithful)" if metric == "comprehensiveness" else metric.capitalize())
    for method, group in rows.groupby("method", sort=False):
        if layer == "last" and group["layer"].notna().any():
            group = group[group["layer"] == group["layer"].max()]
        elif layer != "last":
            group = group[group["layer"] == layer]
        group = group.groupby("k", as_index=False)["value"].mean().sort_values("k")
        fig.add_trace(go.Scatter(x=group["k"] * 100, y=group["value"], mode="lines+markers", name=str(method)))
    fig.update_layout(xaxis=dict(title="K (% of tokens)"), yaxis=dict(title="confidence drop"), width=640, height=420)
    return fig


def save(fig: go.Figure, path: str | os.PathLike, formats: Iterable[str] | None = None, scale: float = 2.0) -> list[Path]:
    """Write a figure for a paper: PNG, SVG and PDF (or the ``formats`` given, or the path's suffix).

    Static export uses kaleido, which needs a Chrome/Chromium (Debian: ``apt-get install
    chromium``). Returns the written paths.

    Example:
        >>> mechnorm.plot.save(fig, "figures/heatmap")              # doctest: +SKIP
        [PosixPath('figures/heatmap.png'), PosixPath('figures/heatmap.svg'), PosixPath('figures/heatmap.pdf')]
    """
    path = Path(path)
    if formats is None:
        formats = [path.suffix.lstrip(".")] if path.suffix else ["png", "svg", "pdf"]
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        if fmt not in ("png", "svg", "pdf", "html"):
            raise ValueError(f"Unsupported format {fmt!r}; use png, svg, pdf or html.")
        target = path.with_suffix(f".{fmt}")
        if fmt == "html":
            fig.write_html(target, include_plotlyjs=True)
        else:
            fig.write_image(target, format=fmt, scale=scale if fmt == "png" else 1)
        written.append(target)
    return written


from .circuits.patching_plots import patching_heatmap  # noqa: E402  (circuits' plots use this module's theme)

__all__ += ["patching_heatmap"]

from .circuits.plots import component_bars, head_token_heatmap, layer_head_heatmap  # noqa: E402

__all__ += ["component_bars", "layer_head_heatmap", "head_token_heatmap"]
