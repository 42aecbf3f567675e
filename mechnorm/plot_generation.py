"""The figure of an explained generation: generated tokens × the context each one could see."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .plot import DIVERGING, SEQUENTIAL, apply_theme

__all__ = ["generation_heatmap"]


def generation_heatmap(generation, layer: int = -1, normalize: bool = False, title: str | None = None) -> go.Figure:
    """Heatmap of a :class:`~mechnorm.generation_result.GenerationAttribution` at one layer.

    Rows are the generated tokens, first at the top; columns are the prompt followed by the
    generated tokens (the last generated token is never a source, so it has no column). A
    step's future positions are blank (NaN), so the filled cells form a staircase. A dotted
    line separates the prompt from the generations; the hover shows the step's probability.

    Args:
        generation: the result of ``mechnorm.explain_generation`` (or ``attribute(..., generate=N)``).
        layer: the layer to show (blocks applied), -1 for the last computed row.
        normalize: divide each step's row by its largest absolute score, so steps with
            small scores stay readable.
        title: the figure title; by default the method, layer and prompt length.

    Returns:
        A ``plotly.graph_objects.Figure`` (not shown).

    Example:
        >>> fig = mechnorm.plot_generation.generation_heatmap(gen)              # doctest: +SKIP
        >>> fig.write_html("generation.html")                                  # doctest: +SKIP
    """
    z = generation.row(layer).numpy()[:, :-1].copy()  # [step, context pos]
    if normalize:
        scale = np.nanmax(np.abs(z), axis=1, keepdims=True)
        z = z / np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    n_steps, n_context = z.shape
    context = [_label(generation, p) for p in range(n_context)]
    rows = [f"{t}: {_label(generation, generation.prompt_length + t)}" for t in range(n_steps)]
    finite = np.abs(z[np.isfinite(z)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    colour = dict(colorscale=DIVERGING, zmid=0, zmin=-bound, zmax=bound) if generation.signed else dict(colorscale=SEQUENTIAL)
    probability = np.repeat(generation.probabilities.numpy()[:, None], n_context, axis=1)
    heat = go.Heatmap(
        z=z,
        x=list(range(n_context)),
        y=list(range(n_steps)),
        customdata=np.dstack([np.array([context] * n_steps, dtype=object), probability.astype(object)]),
        hovertemplate="generated %{y}<br>source %{customdata[0]} (pos %{x})<br>score %{z:.4g}"
                      "<br>p(generated) %{customdata[1]:.3f}<extra></extra>",
        colorbar=dict(title=dict(text="score / row max" if normalize else "score", side="right")),
        xgap=1,
        ygap=1,
        **colour,
    )
    shown = generation.layers[-1] if layer == -1 else layer
    fig = go.Figure(heat)
    apply_theme(fig)
    fig.update_layout(
        title=title or f"{generation.method}, layer {shown}: each generated token over the tokens before it",
        xaxis=dict(title="prompt and earlier generations", tickmode="array", tickvals=list(range(n_context)),
                   ticktext=context, tickangle=-45, showline=False, ticks=""),
        yaxis=dict(title="generated token (step)", tickmode="array", tickvals=list(range(n_steps)), ticktext=rows,
                   autorange="reversed", showline=False, ticks=""),
        width=max(480, 30 * n_context + 260),
        height=max(320, 26 * n_steps + 200),
    )
    boundary = generation.prompt_length - 0.5
    fig.add_vline(x=boundary, line=dict(color="#444", width=1, dash="dot"))
    return fig


def _label(generation, pos: int) -> str:
    return generation._token(pos)
