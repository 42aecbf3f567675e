"""The mechnorm plotly theme, figure construction, HTML embedding and static export."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

FONT_FAMILY = "Helvetica, Arial, 'Liberation Sans', sans-serif"
SEQUENTIAL = "Viridis"  # perceptually uniform, colour-blind safe, prints in greyscale
DIVERGING = "RdBu_r"  # signed scores: blue < 0 < red
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
#: pixels at the top of every figure kept free for plotly's toolbar (it is ~25 px tall), so
#: the toolbar that appears on hover in notebooks and HTML reports never covers the title
TOOLBAR_SPACE = 34
#: the plotly ``config`` for figures embedded in HTML: toolbar on hover only, no logo, and
#: PNG downloads at twice the size; ``figure_html`` uses it
HTML_CONFIG = {"displayModeBar": "hover", "displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}

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
        # the title sits below the toolbar's strip (TOOLBAR_SPACE), centred
        title=dict(font=dict(size=16), x=0.5, xanchor="center", y=1, yref="container", yanchor="top",
                   pad=dict(t=TOOLBAR_SPACE)),
        paper_bgcolor="white",
        plot_bgcolor="white",
        colorway=PALETTE,
        xaxis=_axis,
        yaxis=_axis,
        coloraxis=dict(colorscale=SEQUENTIAL, colorbar=dict(outlinewidth=0, ticks="outside")),
        colorscale=dict(sequential=SEQUENTIAL, diverging=DIVERGING),
        legend=dict(bgcolor="rgba(255,255,255,0)", borderwidth=0),
        margin=dict(l=70, r=30, t=TOOLBAR_SPACE + 56, b=60),
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


def _symmetric_range(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def figure_html(fig: go.Figure, include_plotlyjs: bool | str = True) -> str:
    """A figure as an HTML fragment for a report, with :data:`HTML_CONFIG` (toolbar on hover,
    clear of the title). ``include_plotlyjs=True`` embeds plotly.js (once per page is enough).

    Example:
        >>> import plotly.graph_objects as go
        >>> "displaylogo" in figure_html(go.Figure(), include_plotlyjs=False)
        True
    """
    return fig.to_html(full_html=False, include_plotlyjs=include_plotlyjs, config=HTML_CONFIG)


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
            fig.write_html(target, include_plotlyjs=True, config=HTML_CONFIG)
        else:
            fig.write_image(target, format=fmt, scale=scale if fmt == "png" else 1)
        written.append(target)
    return written
