"""A self-contained HTML report of a Comparison: figures, highlights and a top-token table.

plotly.js is embedded once in the page, so the report opens offline (no CDN).
"""

from __future__ import annotations

import html
from pathlib import Path

from . import plot
from .names import display_name


def write_report(comparison, path: str | Path, title: str = "mechnorm report", k: int = 5) -> Path:
    """Write ``comparison`` as one offline HTML page and return its path.

    For every sequence: the prediction and its probability, what each method's score is
    (:meth:`~mechnorm.Attribution.describe`), each method's top-k tokens with their scores
    (protected positions such as the prediction position and a leading BOS left out, and
    named), the token highlight of each method and the layer-by-layer heatmap of every
    layer-wise method; then the method agreement matrix.

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
        out = plot.figure_html(fig, include_plotlyjs=first_figure)  # embed plotly.js once
        first_figure = False
        return out

    labels = predicted_labels(comparison)
    batch = comparison.batch
    for b in range(len(batch)):
        real = batch.attention_mask[b].nonzero().flatten().tolist()
        text = "".join(batch.strings[b][p] for p in real) if batch.strings else ""
        parts.append(f"<h2>Sequence {b}: {html.escape(text)} → <code>{html.escape(labels[b])}</code></h2>")
        parts.append(f"<p>{html.escape(prediction_sentence(comparison, b))}</p>")
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
        "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}"
        "td.what{color:#555;font-size:90%}td.note{color:#9a9a9a;font-size:90%}</style>"
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


def prediction_sentence(comparison, batch: int) -> str:
    """``Predicted ' are' (p = 0.62).`` for one sequence; the probability when a method recorded it.

    Example:
        >>> prediction_sentence(comparison, 0)                              # doctest: +SKIP
        "Predicted ' are' (p = 0.62)."
    """
    label = predicted_labels(comparison)[batch]
    probs = next((a.target_probs for a in comparison.attributions.values() if a.target_probs is not None), None)
    chance = f" (p = {float(probs[batch]):.2f})" if probs is not None else " (probability not recorded)"
    return f"Predicted {label!r}{chance}."


def text_summary(comparison, k: int = 5) -> str:
    """The report's tables as plain text, for a terminal: per sequence the prediction and its
    probability, then per method what the score is and its top-k tokens with their scores.

    Example:
        >>> print(text_summary(mechnorm.attribute(model, ["The keys to the cabinet"])))   # doctest: +SKIP
        Sequence 0: 'The keys to the cabinet' -> Predicted ' are' (p = 0.62).
          NormXLogit at layer 30 (final, blocks applied), explaining ' are' (p = 0.62): ...
            ' keys' 73.7 | 'The' 42.4 | ...   [not ranked: ' cabinet'@4]
    """
    batch = comparison.batch
    lines = []
    for b in range(len(batch)):
        real = batch.attention_mask[b].nonzero().flatten().tolist()
        text = "".join(batch.strings[b][p] for p in real) if batch.strings else ""
        lines.append(f"Sequence {b}: {text!r} -> {prediction_sentence(comparison, b)}")
        for method in comparison.methods:
            attribution = comparison[method]
            top = attribution.top_k(k)
            top = top[top.batch == b]
            ranked = " | ".join(f"{label} {score:.3g}" for label, score in zip(top.label, top.score))
            note = protected_note(attribution, b)
            lines += [f"  {attribution.describe(b)}", f"    {ranked}" + (f"   [{note}]" if note else "")]
        lines.append("")
    return "\n".join(lines)


def protected_note(attribution, batch: int) -> str:
    """``not ranked: 'The'@0, ' cabinet'@6``: the protected positions of one sequence, or ``""``.

    Example:
        >>> protected_note(comparison["rollout"], 0)                       # doctest: +SKIP
        "not ranked: 'The'@0, ' cabinet'@6"
    """
    protected = attribution.protected
    if protected is None or not bool(protected[batch].any()):
        return ""
    shown = [f"{attribution._token(batch, p)!r}@{p}" for p in protected[batch].nonzero().flatten().tolist()]
    return "not ranked: " + ", ".join(shown)


def _top_table(comparison, batch: int, k: int) -> str:
    """Per method: what the score is, then its top-k tokens (label and score), protected ones named."""
    rows = []
    for method in comparison.methods:
        attribution = comparison[method]
        top = attribution.top_k(k)
        top = top[top.batch == batch]
        cells = "".join(f"<td><code>{html.escape(label)}</code> {score:.3g}</td>" for label, score in zip(top.label, top.score))
        cells += "<td></td>" * (k - len(top))
        note = protected_note(attribution, batch)
        rows.append(f"<tr><th>{html.escape(display_name(method))}</th>{cells}<td class='note'>{html.escape(note)}</td></tr>")
        rows.append(f"<tr><td></td><td colspan='{k + 1}' class='what'>{html.escape(attribution.describe(batch))}</td></tr>")
    header = "".join(f"<th>#{i + 1} (score)</th>" for i in range(k))
    return f"<table><tr><th>method</th>{header}<th>protected</th></tr>{''.join(rows)}</table>"
