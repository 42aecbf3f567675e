"""What the ``mechnorm`` command prints that is not a report: the methods table (fits 100
columns) and the logit lens (``explain --methods logit_lens``) as text plus its figure."""

from __future__ import annotations

import textwrap
from pathlib import Path

__all__ = ["methods_table", "lens_summary", "explain_lens"]


def lens_summary(lens, texts, max_rows: int = 12) -> str:
    """The logit lens as text: per sequence, at evenly spaced layers (always the last), the
    prediction's probability and rank and the layer's own top token; then the first layer
    from which the prediction is the top token.

    Example:
        >>> print(lens_summary(mechnorm.logit_lens(cache, head), ["The keys to the"]))  # doctest: +SKIP
    """
    frame = lens.to_frame()
    layers = list(lens.layers)
    step = max(1, -(-len(layers) // max_rows))
    shown = sorted(set(layers[::step]) | {layers[-1]})
    lines = []
    for b, text in enumerate(texts):
        rows = frame[frame.batch == b]
        target = rows.target.iloc[-1]
        top1 = rows.target_rank.to_numpy() == 1
        stays = next((i for i in range(len(rows)) if top1[i:].all()), None)
        settled = "never" if stays is None else f"from layer {int(rows.layer.iloc[stays])} on"
        lines.append(f"Sequence {b}: {text!r} -> logit lens of {target!r}: the top token {settled}")
        table = rows[rows.layer.isin(shown)][["layer", "target_prob", "target_rank", "top1", "top1_prob"]]
        lines += ["  " + line for line in table.round(3).to_string(index=False).splitlines()] + [""]
    return "\n".join(lines)


def methods_table(width: int = 100) -> str:
    """The registered methods as text no wider than ``width``: name, needs gradients, layer-wise,
    and the description wrapped under its own column.

    Example:
        >>> print(methods_table())                                      # doctest: +SKIP
    """
    import mechnorm

    frame = mechnorm.list_methods()
    name_width = max(len("name"), *(len(n) for n in frame.name)) + 2
    left = f"{'name':<{name_width}}{'grad':<6}{'layers':<8}"
    lines = [left + "description"]
    for row in frame.itertuples():
        flags = f"{row.name:<{name_width}}{'yes' if row.needs_gradients else '-':<6}{'yes' if row.layerwise else '-':<8}"
        wrapped = textwrap.wrap(row.description, width - len(left)) or [""]
        lines += [flags + wrapped[0]] + [" " * len(left) + line for line in wrapped[1:]]
    return "\n".join(lines)


def explain_lens(model, texts, head, out: Path) -> str:
    """``explain --methods logit_lens``: the lens at each text's prediction position, its
    heatmaps written to ``out``; returns the text to print.

    Example:
        >>> print(explain_lens(model, ["The keys to the"], None, Path("lens.html")))  # doctest: +SKIP
    """
    import mechnorm

    batch = mechnorm.tokenize(model, texts)
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("logit_lens"))
    if head is None:
        head, target = mechnorm.UnembedHead(model), None
    else:  # a classifier: follow the head's own prediction
        from .compare import _head_prediction

        target = _head_prediction(model, head, cache, batch.attention_mask)
    lens = mechnorm.logit_lens(cache, head, target, top_k=min(5, head.n_outputs), attention_mask=batch.attention_mask,
                               tokens=batch.tokens)
    if getattr(head, "labels", None):  # a classifier's outputs are its class names, not vocabulary tokens
        lens.vocab = dict(enumerate(head.labels))
    figures = [mechnorm.plot.lens_heatmap(lens, batch=b) for b in range(len(batch))]
    body = "".join(fig.to_html(full_html=False, include_plotlyjs=i == 0) for i, fig in enumerate(figures))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{body}</body></html>", encoding="utf-8")
    return f"{lens_summary(lens, texts)}\n{out}"
