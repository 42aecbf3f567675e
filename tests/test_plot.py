"""Figures built from real results, checked for their content (labels, scales, traces)."""

import html
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import mechnorm
from mechnorm import plot
from mechnorm.names import DISPLAY_NAMES
from conftest import TEXTS

METHODS = ("normxlogit", "logat", "embedding_norm", "rollout", "grad_x_input")


@pytest.fixture(scope="module")
def comparison(model_dirs):
    model = mechnorm.load_model(model_dirs["gpt2"])
    return mechnorm.attribute(model, TEXTS, methods=METHODS, padding_side="left")


def test_layer_token_heatmap_labels_tokens_and_centres_signed_scores(comparison):
    attr = comparison["normxlogit"]
    b = 2
    fig = plot.layer_token_heatmap(attr, batch=b)
    real = attr.mask[b].nonzero().flatten().tolist()
    grey = "<span style='color:#9a9a9a'>{}</span>"  # protected positions (BOS, the prediction position)
    expected = [(grey if attr.protected[b, p] else "{}").format(html.escape(attr.tokens[b][p])) for p in real]
    assert list(fig.layout.xaxis.ticktext) == expected and attr.protected[b, real].sum() == 2
    assert list(fig.layout.yaxis.ticktext) == [str(layer) for layer in attr.layers]
    heat = fig.data[0]
    np.testing.assert_allclose(np.asarray(heat.z), attr.scores[:, b, real].numpy(), rtol=1e-6)
    assert heat.zmid == 0 and heat.zmin == -heat.zmax
    # the default range: the larger of the final layer's and the median layer's max |score|, unprotected tokens only
    free = [p for p in real if not attr.protected[b, p]]
    peaks = attr.scores[:, b, free].abs().amax(dim=1)
    assert heat.zmax == pytest.approx(max(float(peaks[-1]), float(np.median(peaks.numpy()))))
    assert fig.layout.title.text == f"NormXLogit — target {attr.target_labels[b]!r}"


def test_unsigned_heatmap_uses_a_sequential_scale(comparison):
    import plotly.colors

    fig = plot.layer_token_heatmap(comparison["embedding_norm"], batch=0)
    assert fig.data[0].zmid is None
    viridis = [c for _, c in plotly.colors.get_colorscale("Viridis")]
    assert [c for _, c in fig.data[0].colorscale] == viridis


def test_token_highlight_shades_by_relative_magnitude_and_sign(comparison):
    attr = comparison["normxlogit"]
    page = plot.token_highlight(attr, batch=0)
    real = attr.mask[0].nonzero().flatten().tolist()
    values = attr.row(-1)[0, real]
    alphas = [float(a) for a in re.findall(r"rgba\(\d+,\d+,\d+,([0-9.]+)\)", page)]
    assert len(alphas) == len(real)
    np.testing.assert_allclose(alphas, (values.abs() / values.abs().max()).numpy(), atol=0.006)
    assert page.count("178,24,43") == int((values >= 0).sum()) and page.count("33,102,172") == int((values < 0).sum())
    assert attr._repr_html_().count("<span") == int(attr.mask.sum())  # every sequence


def test_compare_methods_has_one_row_per_method_each_scaled_to_one(comparison):
    fig = plot.compare_methods(comparison, batch=1)
    heat = fig.data[0]
    assert list(heat.y) == ["NormXLogit", "LogAt", "Embedding norm", "Attention rollout", "Gradient × input"]
    z = np.asarray(heat.z)
    real = comparison["logat"].mask[1].nonzero().flatten().tolist()
    np.testing.assert_allclose(np.asarray(heat.customdata)[1], comparison["logat"].row(-1)[1, real].numpy(), rtol=1e-6)
    # each row is scaled by its max over unprotected tokens: those reach exactly ±1
    free = [i for i, p in enumerate(real) if not comparison["logat"].protected[1, p]]
    np.testing.assert_allclose(np.abs(z[:, free]).max(axis=1), 1.0)


def test_agreement_matrix_shows_the_comparison_agreement(comparison):
    fig = plot.agreement_matrix(comparison)
    expected = comparison.agreement()
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), expected.to_numpy(), rtol=1e-6)
    assert list(fig.data[0].x) == [DISPLAY_NAMES[m] for m in expected.columns]
    assert fig.data[0].zmin == -1 and fig.data[0].zmax == 1


def test_lens_heatmap_shows_top1_tokens_and_target_probability(model_dirs):
    model = mechnorm.load_model(model_dirs["llama"])
    batch = mechnorm.tokenize(model, TEXTS[0])
    _, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("logit_lens"))
    lens = mechnorm.logit_lens(cache, mechnorm.UnembedHead(model), positions="all", tokens=batch.tokens)
    fig = plot.lens_heatmap(lens)
    heat = fig.data[0]
    np.testing.assert_allclose(np.asarray(heat.z), lens.target_prob[:, 0].numpy(), rtol=1e-6)
    top1 = [[lens.vocab[int(i)] for i in row] for row in lens.top_ids[:, 0, :, 0]]
    assert [list(r) for r in heat.text] == top1
    assert list(fig.layout.xaxis.ticktext) == [html.escape(t) for t in batch.strings[0]]


def test_faithfulness_curves_one_trace_per_method_at_its_last_layer():
    frame = pd.DataFrame(
        [
            {"method": "normxlogit", "layer": 1.0, "metric": "comprehensiveness", "k": 0.1, "value": 0.0},
            {"method": "normxlogit", "layer": 2.0, "metric": "comprehensiveness", "k": 0.1, "value": 0.3},
            {"method": "normxlogit", "layer": 2.0, "metric": "comprehensiveness", "k": 0.5, "value": 0.6},
            {"method": "normxlogit", "layer": 2.0, "metric": "comprehensiveness", "k": np.nan, "value": 0.45},
            {"method": "random", "layer": 0.0, "metric": "comprehensiveness", "k": 0.1, "value": 0.1},
            {"method": "random", "layer": 0.0, "metric": "comprehensiveness", "k": 0.5, "value": 0.2},
            {"method": "random", "layer": 0.0, "metric": "sufficiency", "k": 0.5, "value": 0.9},
        ]
    )
    fig = plot.faithfulness_curves(frame)
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {"NormXLogit", "random"}  # the paper's name; unknown names as given
    assert list(traces["NormXLogit"].x) == [10, 50] and list(traces["NormXLogit"].y) == [0.3, 0.6]
    assert list(traces["random"].y) == [0.1, 0.2]
    with pytest.raises(ValueError, match="No per-K rows"):
        plot.faithfulness_curves(frame, metric="average_precision")


def test_save_rejects_unknown_formats(tmp_path, comparison):
    with pytest.raises(ValueError, match="Unsupported format"):
        plot.save(plot.agreement_matrix(comparison), tmp_path / "fig", formats=["bmp"])


@pytest.mark.skipif(
    shutil.which("chromium") is None and shutil.which("google-chrome") is None,
    reason="static export needs Chromium for kaleido (make test installs Debian's chromium where apt-get works)",
)
def test_save_writes_png_svg_pdf(tmp_path, comparison):
    written = plot.save(plot.layer_token_heatmap(comparison["normxlogit"]), tmp_path / "figs" / "heatmap")
    assert [p.suffix for p in written] == [".png", ".svg", ".pdf"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in written[1].read_bytes()[:500]
    assert written[2].read_bytes()[:4] == b"%PDF"
