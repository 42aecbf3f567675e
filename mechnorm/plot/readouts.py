"""Figures of what the model reads out: the logit-lens trajectory and faithfulness curves."""

from __future__ import annotations

import html

import plotly.graph_objects as go

from .labels import _real_positions, _ticks, _token_labels, visible
from .theme import SEQUENTIAL, _figure

_LENS_VALUES = {
    "target_prob": ("probability of", "probability"),
    "target_logit": ("logit of", "logit"),
    "target_rank": ("rank of", "rank"),
    "entropy": ("entropy of the distribution (nats)", "entropy (nats)"),
    "kl": ("KL(final ‖ layer) (nats)", "KL (nats)"),
}


def lens_title(lens, batch: int, value: str, columns: list[int]) -> str:
    """``"Logit lens: probability of ' Paris'"``, naming the followed token when every column
    follows the same one, else saying what each column follows.

    Example:
        >>> lens_title(lens, 0, "target_prob", [5])                  # doctest: +SKIP
        "Logit lens: probability of ' Paris'"
    """
    what, _ = _LENS_VALUES[value]
    if value in ("entropy", "kl"):
        return f"Logit lens: {what}"
    ids = sorted({int(i) for i in lens.target_ids[batch, columns].tolist()})
    vocab = lens.vocab or {}
    if len(ids) == 1:
        target = repr(vocab.get(ids[0], f"token {ids[0]}"))
    elif lens.metadata.get("target") == "final prediction":
        target = "each position's final-layer prediction"
    else:
        target = "each position's target token"
    return f"Logit lens: {what} {html.escape(target, quote=False)}"


def lens_heatmap(lens, batch: int = 0, value: str = "target_prob") -> go.Figure:
    """Logit-lens trajectory: layers × positions coloured by ``value``, top-k tokens on hover.

    ``value`` is a ``LensResult`` field of shape ``[layer, batch, pos]``: ``"target_prob"``,
    ``"target_logit"``, ``"target_rank"``, ``"entropy"`` or ``"kl"``. Each cell shows the
    layer's top-1 token (whitespace made visible); the title says what is followed
    (``"Logit lens: probability of ' Paris'"``).

    Example:
        >>> fig = mechnorm.plot.lens_heatmap(mechnorm.logit_lens(cache, head, positions="all"))  # doctest: +SKIP
    """
    if value not in _LENS_VALUES:
        raise ValueError(f"value must be one of {list(_LENS_VALUES)}, got {value!r}.")
    columns = _real_positions(lens.mask, batch)
    z = getattr(lens, value)[:, batch, columns].float().numpy()
    vocab = lens.vocab or {}
    name = lambda i: vocab.get(int(i), str(int(i)))  # noqa: E731
    top_ids = lens.top_ids[:, batch, columns]  # [layer, col, k]
    top_probs = lens.top_probs[:, batch, columns]
    text = [[html.escape(visible(name(top_ids[l, c, 0])), quote=False) for c in range(len(columns))] for l in range(len(lens.layers))]
    hover = [
        ["<br>".join(f"{html.escape(repr(name(i)))} {p:.3f}" for i, p in zip(top_ids[l, c].tolist(), top_probs[l, c].tolist())) for c in range(len(columns))]
        for l in range(len(lens.layers))
    ]
    labels = _token_labels(lens.tokens, batch, columns)
    heatmap = go.Heatmap(
        z=z, x=list(range(len(columns))), y=list(range(len(lens.layers))), text=text, texttemplate="%{text}",
        customdata=hover, hovertemplate="layer %{y}, token %{x}<br>%{customdata}<extra></extra>",
        colorscale=SEQUENTIAL, colorbar=dict(title=dict(text=_LENS_VALUES[value][1], side="right")),
    )
    return _figure(
        heatmap,
        title=dict(text=lens_title(lens, batch, value, columns)),
        xaxis=dict(title="input token", tickmode="array", tickvals=list(range(len(labels))), ticktext=_ticks(labels), tickangle=-45),
        yaxis=dict(title="layer (blocks applied)", tickmode="array", tickvals=list(range(len(lens.layers))), ticktext=[str(x) for x in lens.layers]),
        height=max(340, 26 * len(lens.layers) + 190),
        width=max(480, 60 * len(labels) + 200),
    )


def faithfulness_curves(frame, metric: str = "comprehensiveness", layer: str | int = "last") -> go.Figure:
    """Confidence drop against K (fraction of tokens removed or kept), one line per method.

    ``frame`` is the tidy output of ``mechnorm.evaluate.run`` (columns method, layer, metric,
    k, value); per-K rows of ``metric`` are plotted, at each method's last layer by default.

    Example:
        >>> fig = mechnorm.plot.faithfulness_curves(mechnorm.evaluate.run(model, data))  # doctest: +SKIP
    """
    from ..names import display_name

    rows = frame[(frame["metric"] == metric) & frame["k"].notna()]
    if rows.empty:
        raise ValueError(f"No per-K rows for metric {metric!r}; metrics present: {sorted(frame['metric'].unique())}.")
    fig = _figure(title=dict(text=f"{metric.capitalize()} (higher is more faithful)" if metric == "comprehensiveness" else metric.capitalize()))
    for method, group in rows.groupby("method", sort=False):
        if layer == "last" and group["layer"].notna().any():
            group = group[group["layer"] == group["layer"].max()]
        elif layer != "last":
            group = group[group["layer"] == layer]
        group = group.groupby("k", as_index=False)["value"].mean().sort_values("k")
        fig.add_trace(go.Scatter(x=group["k"] * 100, y=group["value"], mode="lines+markers", name=display_name(str(method))))
    fig.update_layout(xaxis=dict(title="K (% of tokens)"), yaxis=dict(title="confidence drop"), width=640, height=450)
    return fig
