"""Direct logit attribution, direct effect, exactness and head-token attribution.

DLA is checked against the model's own output logits (it must sum to them with the head's
constant), the direct effect against a re-run of the plain ``transformers`` model's final
norm and unembedding on ``x − c``, and head-token attribution against an explicit loop over
heads and source tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KINDS
from test_circuits_decompose import CIRCUIT_ARCHS, TOKENS, circuit_dirs, circuit_model, padded, run  # noqa: F401
from transformers import AutoModelForCausalLM

import mechnorm
from mechnorm.residual import MissingHooksError


def setup(circuit_model, arch, kind, side="right", names_filter=None, rows=TOKENS):
    model = circuit_model(arch, kind)
    tokens, mask = padded(side, rows)
    logits, cache = run(model, tokens, mask, names_filter)
    target = mechnorm.predicted(logits, attention_mask=mask)
    return model, tokens, mask, logits, cache, target


def hf_readout(hf, arch):
    """The plain transformers model's final norm and unembedding."""
    norm = {"gpt2": lambda: hf.transformer.ln_f, "neox": lambda: hf.gpt_neox.final_layer_norm}.get(arch, lambda: hf.model.norm)()
    return lambda x: hf.get_output_embeddings()(norm(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", CIRCUIT_ARCHS)
def test_dla_plus_constant_is_the_models_logit(circuit_model, arch, kind):
    model, tokens, mask, logits, cache, target = setup(circuit_model, arch, kind)
    last = mask.long().sum(-1) - 1
    rows = torch.arange(len(last))
    expected = logits[rows, last].gather(-1, target.ids[:, None])[:, 0]
    for ln in ("recompute", "frozen"):  # the head's own mode does not matter: DLA freezes the norm
        for by in ("component", "layer"):
            dla = mechnorm.direct_logit_attribution(cache, mechnorm.UnembedHead(model, ln=ln), target, by=by)
            assert dla.scores.shape == (len(dla.labels), len(TOKENS))
            torch.testing.assert_close(dla.scores.sum(0) + dla.constant, expected, atol=2e-4, rtol=1e-4)
    foil = torch.tensor([5, 9, 12])
    diff = mechnorm.direct_logit_attribution(cache, mechnorm.UnembedHead(model), mechnorm.contrast(target, mechnorm.Target(foil)))
    expected_diff = expected - logits[rows, last, foil]
    torch.testing.assert_close(diff.total(), expected_diff, atol=2e-4, rtol=1e-4)
    heads = mechnorm.direct_logit_attribution(cache, mechnorm.UnembedHead(model), target, by="head")
    full = mechnorm.direct_logit_attribution(cache, mechnorm.UnembedHead(model), target)
    assert heads.labels == [lab for lab in full.labels if "H" in lab and "." not in lab]
    torch.testing.assert_close(heads.scores, full.scores[[full.labels.index(lab) for lab in heads.labels]])


def hand_components(model, cache, b, p):
    """A few components of the final residual at (b, p), computed here from the cache."""
    w_o = model.blocks[1].attn.W_O.detach()
    return {
        "embed": cache["hook_embed"][b, p],
        "L1H2": cache["blocks.1.attn.hook_z"][b, p, 2] @ w_o[2],
        "L0.mlp": cache["blocks.0.hook_mlp_out"][b, p],
        "L1.mlp": cache["blocks.1.hook_mlp_out"][b, p],
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", CIRCUIT_ARCHS)
def test_direct_effect_matches_removing_the_component_by_hand(circuit_model, circuit_dirs, arch, kind):  # noqa: F811
    model, tokens, mask, logits, cache, target = setup(circuit_model, arch, kind)
    hf = AutoModelForCausalLM.from_pretrained(circuit_dirs[arch]).eval()
    readout = hf_readout(hf, arch)
    effect = mechnorm.direct_logit_attribution(cache, mechnorm.UnembedHead(model), target, ln="recompute")
    last = mask.long().sum(-1) - 1
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    errors, sizes = [], []
    dla = mechnorm.direct_logit_attribution(cache, mechnorm.UnembedHead(model), target, ln="frozen")
    for b in range(len(TOKENS)):
        x, t = final[b, last[b]], int(target.ids[b])
        with torch.no_grad():
            for label, c in hand_components(model, cache, b, int(last[b])).items():
                de = readout(x)[t] - readout(x - c)[t]
                i = effect.labels.index(label)
                torch.testing.assert_close(effect.scores[i, b], de, atol=2e-4, rtol=1e-4)
                errors.append((dla.scores[i, b] - de).abs())
                sizes.append(de.abs())
    assert torch.stack(errors).max() > 1e-3  # with a final norm, DLA is not the direct effect
    by_layer = mechnorm.direct_logit_attribution(cache, mechnorm.UnembedHead(model), target, by="layer", ln="recompute")
    for b in range(len(TOKENS)):  # a whole attention layer, as the model cached it
        x, t, c = final[b, last[b]], int(target.ids[b]), cache["blocks.0.hook_attn_out"][b, last[b]]
        with torch.no_grad():
            de = readout(x)[t] - readout(x - c)[t]
        torch.testing.assert_close(by_layer.scores[by_layer.labels.index("L0.attn"), b], de, atol=2e-4, rtol=1e-4)
    frame = mechnorm.dla_exactness(cache, mechnorm.UnembedHead(model), target)
    all_errors = (dla.scores - effect.scores).abs()
    assert frame["component"].iloc[-1] == "overall"
    assert frame["nmae"].iloc[-1] == pytest.approx((all_errors.mean() / effect.scores.abs().mean()).item(), rel=1e-5)
    row = frame.set_index("component").loc["L1H2"]
    i = dla.labels.index("L1H2")
    assert row["nmae"] == pytest.approx((all_errors[i].mean() / effect.scores[i].abs().mean()).item(), rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_without_a_norm_dla_is_the_direct_effect(circuit_model, kind):
    """A linear probe with no norm: frozen and recomputed readings coincide, NMAE = 0."""
    model, tokens, mask, logits, cache, target = setup(circuit_model, "gpt2", kind)
    torch.manual_seed(1)
    probe = mechnorm.LinearHead(torch.randn(3, model.cfg.d_model), bias=torch.randn(3))
    target = mechnorm.token_target([0, 2, 1])
    frame = mechnorm.dla_exactness(cache, probe, target, attention_mask=mask)
    assert frame["nmae"].abs().max() < 1e-5
    dla = mechnorm.direct_logit_attribution(cache, probe, target, attention_mask=mask)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    last = mask.long().sum(-1) - 1
    expected = probe(final, columns=target.columns(3), cache=cache)[torch.arange(3), last, 0]
    torch.testing.assert_close(dla.total(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_normalising_linear_head_sums_to_its_own_logit(circuit_model, arch, kind):
    model, tokens, mask, logits, cache, target = setup(circuit_model, arch, kind)
    torch.manual_seed(2)
    probe = mechnorm.LinearHead(torch.randn(4, model.cfg.d_model), torch.randn(4), norm=mechnorm.FinalNorm.from_model(model))
    target = mechnorm.contrast(mechnorm.Target(torch.tensor([1])), mechnorm.Target(torch.tensor([3])))
    dla = mechnorm.direct_logit_attribution(cache, probe, target, positions="all")
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    expected = target.reduce(probe(final, columns=target.columns(3)))
    assert dla.scores.shape == (len(dla.labels), *tokens.shape)
    # no mask passed: it is read from the pad id in the cached tokens, so padding is NaN
    torch.testing.assert_close(dla.total()[mask.bool()], expected[mask.bool()], atol=2e-4, rtol=1e-4)
    assert torch.isnan(dla.total()[~mask.bool()]).all()
    hta = mechnorm.head_token_attribution(cache, probe, target, attention_mask=mask)  # scale from the final residual
    per_head = mechnorm.direct_logit_attribution(cache, probe, target, by="head", attention_mask=mask)
    torch.testing.assert_close(hta.per_head(), per_head.layer_head()[0], atol=1e-4, rtol=1e-4)


def loop_head_tokens(model, cache, target, mask, block, kind_of_norm):
    """score[h, b, j] by explicit loops: pattern · (v_j W_O^h) read through the frozen final norm."""
    head = mechnorm.UnembedHead(model)
    w_u, norm = model.W_U.detach(), head.norm
    w_o = model.blocks[block].attn.W_O.detach()
    pattern, v = cache[f"blocks.{block}.attn.hook_pattern"], cache[f"blocks.{block}.attn.hook_v"]
    group = model.cfg.n_heads // v.shape[2]
    last = mask.long().sum(-1) - 1
    out = torch.zeros(model.cfg.n_heads, *mask.shape)
    for h in range(model.cfg.n_heads):
        for b in range(mask.shape[0]):
            p = int(last[b])
            scale = cache["ln_final.hook_scale"][b, p, 0]
            for j in range(mask.shape[1]):
                vec = pattern[b, h, p, j] * (v[b, j, h // group] @ w_o[h])
                if kind_of_norm == "layernorm":
                    vec = vec - vec.mean()
                out[h, b, j] = (vec * norm.weight / scale) @ w_u[:, int(target.ids[b])]
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", CIRCUIT_ARCHS)
def test_head_token_attribution_matches_a_loop_and_sums_to_head_dla(circuit_model, arch, kind):
    model, tokens, mask, logits, cache, target = setup(circuit_model, arch, kind)
    head = mechnorm.UnembedHead(model)
    hta = mechnorm.head_token_attribution(cache, head, target, attention_mask=mask)
    assert hta.scores.shape == (model.cfg.n_layers, model.cfg.n_heads, *tokens.shape)
    for block in range(model.cfg.n_layers):
        expected = loop_head_tokens(model, cache, target, mask, block, head.norm.kind)
        torch.testing.assert_close(hta.scores[block].nan_to_num(0.0), expected * mask, atol=1e-4, rtol=1e-4)
    assert torch.isnan(hta.scores[:, :, ~mask]).all()
    dla = mechnorm.direct_logit_attribution(cache, head, target, by="head")
    grid, blocks = dla.layer_head()
    torch.testing.assert_close(hta.per_head(), grid, atol=1e-4, rtol=1e-4)
    only = mechnorm.head_token_attribution(cache, head, target, layers=[-1], attention_mask=mask)
    assert only.blocks == (model.cfg.n_layers - 1,)
    torch.testing.assert_close(only.scores, hta.scores[-1:], equal_nan=True)
    explicit = mechnorm.head_token_attribution(cache, head, mechnorm.Target(target.ids), positions=mask.long().sum(-1) - 1, attention_mask=mask)
    torch.testing.assert_close(explicit.scores, hta.scores, equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_each_sequence_what_it_gets_alone(circuit_model, kind, side):
    model, tokens, mask, logits, cache, target = setup(circuit_model, "gpt2", kind, side)
    head = mechnorm.UnembedHead(model)
    dla = mechnorm.direct_logit_attribution(cache, head, target, attention_mask=mask)
    effect = mechnorm.direct_logit_attribution(cache, head, target, ln="recompute", attention_mask=mask)
    hta = mechnorm.head_token_attribution(cache, head, target, attention_mask=mask)
    for b, row in enumerate(TOKENS):
        _, _, alone_mask, _, alone, alone_target = setup(circuit_model, "gpt2", kind, side, rows=[row])
        torch.testing.assert_close(dla.scores[:, b], mechnorm.direct_logit_attribution(alone, head, alone_target).scores[:, 0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(effect.scores[:, b], mechnorm.direct_logit_attribution(alone, head, alone_target, ln="recompute").scores[:, 0], atol=1e-4, rtol=1e-4)
        single = mechnorm.head_token_attribution(alone, head, alone_target)
        torch.testing.assert_close(hta.scores[:, :, b][..., mask[b]], single.scores[:, :, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_minimal_caches_suffice_nothing_is_mutated_and_missing_hooks_are_named(circuit_model, kind):
    model, tokens, mask, logits, cache, target = setup(circuit_model, "neox", kind, "left", mechnorm.hooks_for("dla", "head_token_attribution"))
    head = mechnorm.UnembedHead(model)
    assert "blocks.0.hook_attn_out" not in cache and "blocks.1.hook_resid_post" not in cache  # minimal
    before = {k: v.clone() for k, v in cache.items()}
    mechnorm.direct_logit_attribution(cache, head, target, attention_mask=mask)
    every = mechnorm.direct_logit_attribution(cache, head, target, ln="recompute", positions="all", attention_mask=mask)
    assert torch.isnan(every.scores[:, ~mask]).all() and not torch.isnan(every.scores[:, mask]).any()
    frozen = mechnorm.direct_logit_attribution(cache, head, target, positions="all", attention_mask=mask)
    exact = mechnorm.dla_exactness(cache, head, target, positions="all", attention_mask=mask)
    real_error = (frozen.scores - every.scores)[:, mask].abs()
    assert exact["nmae"].iloc[-1] == pytest.approx((real_error.mean() / every.scores[:, mask].abs().mean()).item(), rel=1e-5)
    mechnorm.head_token_attribution(cache, head, target, attention_mask=mask)
    for name, value in before.items():
        assert torch.equal(cache[name], value), name
    _, partial = run(model, tokens, mask, mechnorm.hooks_for("components"))
    with pytest.raises(MissingHooksError, match="ln_final.hook_scale"):
        mechnorm.direct_logit_attribution(partial, head, target, attention_mask=mask)
    with pytest.raises(MissingHooksError, match=r"blocks\.0\.attn\.hook_pattern"):
        mechnorm.head_token_attribution(partial, head, target, attention_mask=mask)
    with pytest.raises(ValueError, match="one query per sequence"):
        mechnorm.head_token_attribution(cache, head, target, positions=[1, 2])
    with pytest.raises(ValueError, match="by must be"):
        mechnorm.direct_logit_attribution(cache, head, target, by="neuron")
    with pytest.raises(ValueError, match="outside the head's"):
        mechnorm.direct_logit_attribution(cache, head, mechnorm.token_target([10_000]))
    with pytest.raises(TypeError, match="ModuleHead is not linear"):
        mechnorm.direct_logit_attribution(cache, mechnorm.ModuleHead(torch.nn.Linear(32, 2), 2), mechnorm.token_target([0]))
    assert "dla" not in set(mechnorm.list_methods()["name"])  # not a token-attribution method


@pytest.mark.parametrize("kind", KINDS)
def test_results_tabulate_and_plot_their_own_numbers(circuit_model, kind):
    model, tokens, mask, logits, cache, target = setup(circuit_model, "gpt2", kind)
    head = mechnorm.UnembedHead(model)
    dla = mechnorm.direct_logit_attribution(cache, head, target, tokens=tokens)
    frame = dla.to_frame()
    assert len(frame) == len(dla.labels) * len(TOKENS)
    assert frame.query("component == 'L1H3' and batch == 1")["score"].item() == pytest.approx(dla.scores[dla.labels.index("L1H3"), 1].item())
    top = dla.top_k(3)
    assert top.query("batch == 0")["score"].tolist() == sorted(dla.scores[:, 0].tolist(), reverse=True)[:3]
    assert "<table" in dla._repr_html_()
    fig = mechnorm.plot.component_bars(dla, batch=2, top=4)
    largest = sorted(dla.scores[:, 2].tolist(), key=abs)[::-1][:4]  # top 4 by magnitude, largest drawn on top
    assert list(fig.data[0].x)[::-1] == pytest.approx(largest)
    assert list(fig.data[0].y)[::-1] == [dla.labels[dla.scores[:, 2].tolist().index(v)] for v in largest]
    grid_fig = mechnorm.plot.layer_head_heatmap(mechnorm.direct_logit_attribution(cache, head, target, by="head"), batch=1)
    torch.testing.assert_close(torch.tensor(grid_fig.data[0].z), dla.layer_head()[0][:, :, 1], check_dtype=False)
    hta = mechnorm.head_token_attribution(cache, head, target, attention_mask=mask, tokens=tokens)
    fig = mechnorm.plot.head_token_heatmap(hta, batch=1, top=None)
    assert list(fig.layout.xaxis.ticktext) == hta.tokens[1][: int(mask[1].sum())]
    torch.testing.assert_close(torch.tensor(fig.data[0].z), hta.scores[:, :, 1][..., mask[1]].flatten(0, 1), check_dtype=False)
    assert hta.to_frame()["score"].sum() == pytest.approx(hta.scores.nansum().item(), rel=1e-4)
