"""Plotly figures for mechnorm, all in one theme. Figures are returned, never shown.

The theme is a plotly template registered as ``"mechnorm"`` (:data:`TEMPLATE`): white
background, a sans-serif font at sizes that stay readable in a notebook and in a PDF column,
thin grey axes, no grid clutter, and the title placed below the strip where plotly's toolbar
appears on hover (:data:`TOOLBAR_SPACE`), so the toolbar never covers it. Every figure is
built through ``_figure`` (or themed afterwards with :func:`apply_theme`), so new plotting
functions get the same look by doing the same. Shared colour scales: :data:`SEQUENTIAL` for
values in [0, 1] (similarities, probabilities), :data:`DIVERGING` for signed scores. Titles
use the papers' method names (:data:`mechnorm.names.DISPLAY_NAMES`) and token labels show
whitespace (:func:`visible`).

The global plotly default is left alone; use ``plotly.io.templates.default = "mechnorm"``
to apply the theme to your own figures as well.

Modules by family: ``theme`` (template, :func:`save`, :func:`figure_html`), ``labels``
(token labels, titles), ``matrix`` (layer × layer similarity), ``attribution`` (layer × token
heatmaps, highlights, method comparison), ``readouts`` (logit lens, faithfulness curves).

Export: :func:`save` writes PNG, SVG and PDF for papers through kaleido >= 1, which needs a
Chrome/Chromium it can find (Debian: ``apt-get install chromium``); ``fig.write_html`` always
works; :func:`figure_html` embeds a figure in an HTML page with :data:`HTML_CONFIG`.
"""

from __future__ import annotations

from .theme import (  # noqa: F401  (private helpers are used by circuits' plots)
    DIVERGING, FONT_FAMILY, HTML_CONFIG, PALETTE, SEQUENTIAL, TEMPLATE, TOOLBAR_SPACE, _figure, _symmetric_range,
    apply_theme, figure_html, save,
)
from .labels import WHITESPACE_SYMBOLS, _real_positions, _token_labels, method_title, visible  # noqa: F401
from .matrix import _as_matrix, similarity_heatmap  # noqa: F401
from .attribution import (
    DEGENERATE_SHARE, MASS_METHODS, agreement_matrix, compare_methods, first_token_share, layer_token_heatmap,
    token_highlight,
)
from .readouts import faithfulness_curves, lens_heatmap

__all__ = [
    "TEMPLATE", "SEQUENTIAL", "DIVERGING", "FONT_FAMILY", "HTML_CONFIG", "TOOLBAR_SPACE", "apply_theme",
    "similarity_heatmap", "layer_token_heatmap", "token_highlight", "compare_methods", "agreement_matrix",
    "lens_heatmap", "faithfulness_curves", "save", "figure_html", "visible", "method_title", "first_token_share",
    "WHITESPACE_SYMBOLS", "MASS_METHODS", "DEGENERATE_SHARE",
]

from ..circuits.patching_plots import patching_heatmap  # noqa: E402  (circuits' plots use this package's theme)

__all__ += ["patching_heatmap"]

from ..circuits.plots import component_bars, head_token_heatmap, layer_head_heatmap  # noqa: E402

__all__ += ["component_bars", "layer_head_heatmap", "head_token_heatmap"]
