"""Issue #15 item 13 and item 9's figures: readable colour ranges, paper names and targets in
titles, visible whitespace, greyed protected positions, a degenerate-rollout note, titles clear
of the toolbar, and .plot()/.show() on the result classes."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import mechnorm
from mechnorm import plot
from mechnorm.methods.lens import LensResult

from conftest import TEXTS

GREY = "<span style='color:#9a9a9a'>{}</span>"
MODEBAR_PX = 26  # plotly.js's modebar: 22 px buttons + 2 px padding above and below


def smollm_like(protected_bos: bool = False) -> mechnorm.Attribution:
    """31 layers × 6 tokens shaped like NormXLogit on SmolLM2: layer 0 at ±150, the final layer at ±5."""
    torch.manual_seed(0)
    scores = torch.randn(31, 1, 6)
    scores[0] = torch.tensor([150.0, -120, 90, -60, 30, 10])
    scores[-1] = torch.tensor([1.0, -2, 3, -4, 5, 0.5])
    protected = None
    if protected_bos:
        scores[-1, 0, 0] = 1000.0  # an attention-sink-sized score at a protected position
        protected = torch.tensor([[True, False, False, False, False, True]])
    return mechnorm.Attribution(scores, layers=range(31), mask=torch.ones(1, 6, dtype=torch.bool), method="normxlogit",
                                tokens=[["<s>", " The", " capital", " of", " France", " is"]], target_labels=(" Paris",),
                                protected=protected)


def test_default_range_keeps_the_final_layer_readable():
    attr = smollm_like()
    fig = plot.layer_token_heatmap(attr)
    heat = fig.data[0]
    final = np.asarray(heat.z)[-1]
    # the final layer spans the whole colour range (before: 5 / 150 = 3 % of it)
    assert np.abs(final).max() / heat.zmax == pytest.approx(1.0)
    assert heat.zmin == -heat.zmax == -5.0 and heat.zmid == 0
    assert "clipped at ±5" in heat.colorbar.title.text  # layer 0 saturates and the colour bar says so
    np.testing.assert_array_equal(np.asarray(heat.customdata), attr.scores[:, 0].numpy())  # hover: raw values


def test_default_range_does_not_saturate_every_layer_when_the_final_one_is_near_zero():
    scores = torch.full((9, 1, 4), 0.3)
    scores[:, 0, 0] = 0.1
    scores[-1] = torch.tensor([1e-7, 2e-7, 1e-7, 3e-7])
    attr = mechnorm.Attribution(scores, layers=range(9), mask=torch.ones(1, 4, dtype=torch.bool), method="rollout",
                                tokens=[["a", "b", "c", "d"]], signed=False)
    heat = plot.layer_token_heatmap(attr).data[0]
    assert heat.zmax == pytest.approx(0.3) and heat.zmin == 0  # the median layer's peak, not the final 3e-7


def test_zmax_layer_selection_and_per_layer_normalisation():
    attr = smollm_like()
    assert plot.layer_token_heatmap(attr, zmax=50.0).data[0].zmax == 50.0
    chosen = plot.layer_token_heatmap(attr, layers=[0, 15, -1])
    assert list(chosen.layout.yaxis.ticktext) == ["0", "15", "30"]
    np.testing.assert_array_equal(np.asarray(chosen.data[0].z), attr.scores[[0, 15, 30], 0].numpy())
    norm = plot.layer_token_heatmap(attr, normalize="layer").data[0]
    z = np.asarray(norm.z)
    np.testing.assert_allclose(np.abs(z).max(axis=1), 1.0)
    np.testing.assert_allclose(z[0], np.array([150.0, -120, 90, -60, 30, 10]) / 150)
    assert norm.zmax == 1.0 and "layer max" in norm.colorbar.title.text
    with pytest.raises(ValueError, match=r"choose layers from \(0, 1"):
        plot.layer_token_heatmap(attr, layers=[31])
    with pytest.raises(ValueError, match="normalize must be"):
        plot.layer_token_heatmap(attr, normalize="global")


def test_protected_positions_are_grey_and_left_out_of_the_range():
    attr = smollm_like(protected_bos=True)
    fig = plot.layer_token_heatmap(attr)
    assert fig.data[0].zmax == 5.0  # not the protected 1000
    overlay = [t for t in fig.data if t.name == "protected"]
    assert len(overlay) == 1 and not overlay[0].showscale
    grey = np.asarray(overlay[0].z, dtype=float)
    assert grey.shape == (31, 6) and (~np.isnan(grey)).all(axis=0).tolist() == [True, False, False, False, False, True]
    ticks = list(fig.layout.xaxis.ticktext)
    assert ticks[0] == GREY.format("&lt;s&gt;") and ticks[5] == GREY.format(" is") and ticks[1] == " The"


def test_whitespace_tokens_are_visible():
    tokens = [["<s>", " ", "\n", "\t", "  ", " Paris", "", "a\nb"]]
    attr = mechnorm.Attribution(torch.ones(2, 1, 8), layers=(0, 1), mask=torch.ones(1, 8, dtype=torch.bool),
                                method="logat", tokens=tokens)
    ticks = list(plot.layer_token_heatmap(attr).layout.xaxis.ticktext)
    assert ticks == ["&lt;s&gt;", "␣", "↵", "⇥", "␣␣", " Paris", "∅", "a↵b"]
    assert ">␣<" in plot.token_highlight(attr) and ">↵<" in plot.token_highlight(attr)


def test_titles_use_the_papers_names_and_say_what_the_target_is():
    assert plot.layer_token_heatmap(smollm_like()).layout.title.text == "NormXLogit — target ' Paris'"
    gx = mechnorm.Attribution(torch.ones(1, 1, 2), layers=(2,), mask=torch.ones(1, 2, dtype=torch.bool),
                              method="grad_x_input", target_labels=(" are",))
    assert plot.layer_token_heatmap(gx).layout.title.text == "Gradient × input — target ' are'"
    lens = synthetic_lens(target_ids=[[5, 5]])
    assert plot.lens_heatmap(lens).layout.title.text == "Logit lens: probability of ' Paris'"
    assert plot.lens_heatmap(lens, value="target_rank").layout.title.text == "Logit lens: rank of ' Paris'"
    assert plot.lens_heatmap(lens, value="kl").layout.title.text == "Logit lens: KL(final ‖ layer) (nats)"
    several = synthetic_lens(target_ids=[[5, 6]])
    assert plot.lens_heatmap(several).layout.title.text == "Logit lens: probability of each position's final-layer prediction"


def synthetic_lens(target_ids) -> LensResult:
    layers, batch, pos = 3, 1, 2
    shape = (layers, batch, pos)
    return LensResult(
        target_logit=torch.zeros(shape), target_prob=torch.full(shape, 0.5), target_rank=torch.ones(shape, dtype=torch.long),
        top_ids=torch.full((*shape, 2), 5), top_probs=torch.full((*shape, 2), 0.25), entropy=torch.ones(shape),
        kl=torch.zeros(shape), layers=(0, 1, 2), positions=torch.tensor([[0, 1]]), mask=torch.ones(1, 2, dtype=torch.bool),
        target_ids=torch.tensor(target_ids), tokens=[["<s>", " The"]], vocab={5: " Paris", 6: "\n"},
        metadata={"target": "final prediction"},
    )


@pytest.mark.parametrize("first, degenerate", [(0.95, True), (0.5, False)])
def test_degenerate_rollout_says_so(first, degenerate):
    rest = (1 - first) / 3
    scores = torch.tensor([[first, rest, rest, rest]])[None].repeat(3, 1, 1)
    attr = mechnorm.Attribution(scores, layers=(0, 1, 2), mask=torch.ones(1, 4, dtype=torch.bool), method="rollout",
                                tokens=[["<s>", " a", " b", " c"]], target_labels=(" d",), signed=False)
    title = plot.layer_token_heatmap(attr).layout.title.text
    assert title.startswith("Attention rollout — target ' d'")
    assert ("degenerate" in title) is degenerate
    if degenerate:
        assert "95% of the attention mass on the first token (&lt;s&gt;)" in title
    assert plot.first_token_share(attr) == pytest.approx(first)


def test_titles_sit_below_the_toolbar_in_every_figure(model_dirs):
    model = mechnorm.load_model(model_dirs["gpt2"])
    comp = mechnorm.attribute(model, TEXTS[:2], methods=("normxlogit", "rollout"))
    figures = [plot.layer_token_heatmap(comp["normxlogit"]), plot.compare_methods(comp), plot.agreement_matrix(comp),
               plot.lens_heatmap(synthetic_lens([[5, 5]])), plot.similarity_heatmap(np.eye(3))]
    for fig in figures:
        title = fig.layout.title
        template = fig.layout.template.layout.title
        assert (title.yref or template.yref) == "container" and (title.yanchor or template.yanchor) == "top"
        top = (title.pad.t if title.pad.t is not None else template.pad.t)
        margin = fig.layout.margin.t if fig.layout.margin.t is not None else fig.layout.template.layout.margin.t
        assert top >= MODEBAR_PX + 4  # below the toolbar strip
        assert margin >= top + 2 * 16 + 8  # room for a two-line title (16 px font) above the plot
    page = plot.figure_html(figures[0], include_plotlyjs=False)
    assert '"displayModeBar": "hover"' in page and '"displaylogo": false' in page


def test_plot_and_show_on_the_result_classes(monkeypatch, model_dirs):
    model = mechnorm.load_model(model_dirs["llama"])
    comp = mechnorm.attribute(model, TEXTS[:2], methods=("normxlogit", "rollout"))
    batch = mechnorm.tokenize(model, TEXTS[0])
    _, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("logit_lens"))
    lens = mechnorm.logit_lens(cache, mechnorm.UnembedHead(model), positions="all", tokens=batch.tokens)
    shown = []
    monkeypatch.setattr(go.Figure, "show", lambda fig, *a, **k: shown.append(fig))
    cases = [(comp["rollout"], plot.layer_token_heatmap, {"batch": 1}), (comp, plot.compare_methods, {"batch": 1}),
             (lens, plot.lens_heatmap, {"value": "entropy"})]
    for result, function, kwargs in cases:
        assert result.plot(**kwargs).to_dict() == function(result, **kwargs).to_dict()
        assert result.show(**kwargs) is None
        assert shown[-1].to_dict() == function(result, **kwargs).to_dict()
    assert len(shown) == 3
