"""A self-contained HTML report of a Comparison: figures, highlights and a top-token table.

plotly.js is embedded once in the page, so the report opens offline (no CDN).
"""

from __future__ import annotations

import html
from pathlib import Path

from . import plot


def write_report(comparison, path: str | Path, title: str = "mechnorm report", k: int = 5) -> Path:
    """Write ``comparison`` as one offline HTML page and return its path.

    For every sequence: the prediction, each method's top-k tokens, the token highlight of
    each method and the layer-by-layer heatmap of every layer-wise method; then the method
    agreement matrix.

    Example:
        >>> comparison = mechnorm.attribute(model, ["The keys to the cabinet"])  # doctest: +SKIP
        >>> write_report(comparison, "report.html")                             # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    first_figure = True

    def figure_html(fig) -> str:
        nonlocal first_figure
        out = fig.to_html(full_html=False, include_plotlyjs=first_figure)  # embed plotly.js once
        first_figure = False
        return out

    labels = predicted_labels(comparison)
    batch = comparison.batch
    for b in range(len(batch)):
        real = batch.attention_mask[b].nonzero().flatten().tolist()
        text = "".join(batch.strings[b][p] for p in real) if batch.strings else ""
        parts.append(f"<h2>Sequence {b}: {html.escape(text)} → <code>{html.escape(labels[b])}</code></h2>")
        parts.append(_top_table(comparison, b, k))
        for method in comparison.methods:
            parts.append(f"<div><b>{html.escape(method)}</b> {plot.token_highlight(comparison[method], batch=b)}</div>")
        for method in comparison.methods:
            attribution = comparison[method]
            if len(attribution.layers) > 1:
                parts.append(figure_html(plot.layer_token_heatmap(attribution, batch=b)))
    if len(comparison.methods) > 1:
        parts.append("<h2>Method agreement</h2>")
        parts.append(figure_html(plot.agreement_matrix(comparison)))
    body = "\n".join(parts)
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>body{{font-family:{plot.FONT_FAMILY};max-width:1100px;margin:2em auto;color:#222}}"
        "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}</style>"
        f"</head><body>{body}</body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path


def predicted_labels(comparison) -> tuple[str, ...]:
    """The explained output of each sequence, from the first method that records it."""
    for method in comparison.methods:
        labels = comparison[method].target_labels
        if labels:
            return labels
    return ("?",) * len(comparison.batch)


def _top_table(comparison, batch: int, k: int) -> str:
    rows = []
    for method in comparison.methods:
        top = comparison[method].top_k(k)
        tokens = top[top.batch == batch].token.tolist()
        cells = "".join(f"<td><code>{html.escape(t)}</code></td>" for t in tokens)
        rows.append(f"<tr><th>{html.escape(method)}</th>{cells}</tr>")
    header = "".join(f"<th>#{i + 1}</th>" for i in range(k))
    return f"<table><tr><th>method</th>{header}</tr>{''.join(rows)}</table>"
