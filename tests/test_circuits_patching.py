"""Activation and attribution patching against hand-written hooks, finite differences and analytic cases."""

import pytest
import scipy.stats
import torch
from conftest import ARCHITECTURES, KINDS, WORDS

import mechnorm
from mechnorm.circuits.patching_result import units_for

CLEAN, CORRUPTED = "the keys to the old cabinet", "the key to the old cabinet"
ARE, IS = WORDS.index("are"), WORDS.index("is")
WHERES = ("resid_pre", "attn_out", "mlp_out", "head_out", "head_pos", "pattern")


def tokens_of(model, text):
    return mechnorm.tokenize(model, text).tokens


def hand_metric(model, tokens, hooks=()):
    """are − is at the last position, from the model's full output logits."""
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=list(hooks))
    return float(logits[0, -1, ARE] - logits[0, -1, IS])


def hand_units(model, where, n_pos):
    """(hook name, index after the batch axis) of every unit, written out per where."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    resid = lambda l: f"blocks.{l}.hook_resid_pre" if l < L else f"blocks.{L - 1}.hook_resid_post"  # noqa: E731
    if where == "resid_pre":
        return [(resid(l), (p,)) for l in range(L + 1) for p in range(n_pos)]
    if where in ("attn_out", "mlp_out"):
        return [(f"blocks.{l}.hook_{where}", (p,)) for l in range(L) for p in range(n_pos)]
    if where == "head_out":
        return [(f"blocks.{l}.attn.hook_z", (slice(None), h)) for l in range(L) for h in range(H)]
    if where == "head_pos":
        return [(f"blocks.{l}.attn.hook_z", (p, h)) for l in range(L) for h in range(H) for p in range(n_pos)]
    return [(f"blocks.{l}.attn.hook_pattern", (h,)) for l in range(L) for h in range(H)]


def hand_patching(model, clean, corrupted, where):
    """One plain re-run per unit, replacing that activation by its clean value."""
    names = {name for name, _ in hand_units(model, where, clean.shape[1])}
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
    patched = []
    for name, index in hand_units(model, where, clean.shape[1]):
        def hook(act, hook, name=name, index=index):
            act = act.clone()
            act[(0, *index)] = cache[name][(0, *index)]
            return act
        patched.append(hand_metric(model, corrupted, [(name, hook)]))
    return torch.tensor(patched)


def flat(result):
    """Scores of pair 0 in the units' row-major order."""
    return result.raw[:, 0].flatten(), result.scores[:, 0].flatten()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_activation_patching_matches_a_hand_written_hook_per_unit(load, arch, kind):
    model = load(arch, kind)
    clean, corrupted = tokens_of(model, CLEAN), tokens_of(model, CORRUPTED)
    target = mechnorm.contrast("are", "is", model)
    m_clean, m_corr = hand_metric(model, clean), hand_metric(model, corrupted)
    for where in WHERES:
        result = mechnorm.activation_patching(model, CLEAN, CORRUPTED, target, where=where, progress=False)
        expected = hand_patching(model, clean, corrupted, where)
        raw, scores = flat(result)
        torch.testing.assert_close(raw, expected, atol=1e-4, rtol=1e-4, msg=where)
        torch.testing.assert_close(scores, (expected - m_corr) / (m_clean - m_corr), atol=1e-4, rtol=1e-4)
        assert result.clean_metric.item() == pytest.approx(m_clean, abs=1e-4)
        assert result.corrupted_metric.item() == pytest.approx(m_corr, abs=1e-4)
        assert expected.std() > 1e-3, f"{where}: the hand loop must see patches that matter"


def test_normalisation_analytic_cases(load):
    model = load("gpt2", KINDS[0])
    target = mechnorm.contrast("are", "is", model)
    result = mechnorm.activation_patching(model, CLEAN, CORRUPTED, target, progress=False)
    final, first = result.scores[-1, 0], result.scores[0, 0]
    n = final.shape[0]
    # the final residual at the prediction position is everything the logits read: fully restored
    assert final[n - 1].item() == pytest.approx(1.0, abs=1e-5)
    # the final residual elsewhere is never read; an input position whose token is unchanged is identical
    torch.testing.assert_close(final[: n - 1], torch.zeros(n - 1), atol=1e-5, rtol=0)
    same = [p for p in range(n) if result.tokens[0][p] == result.corrupted_tokens[0][p]]
    torch.testing.assert_close(first[same], torch.zeros(len(same)), atol=1e-5, rtol=0)
    changed = [p for p in range(n) if p not in same]
    assert changed == [2] and abs(first[2].item()) > 0.05  # " keys" vs " key"
    # normalisation by hand from the raw values
    expected = (result.raw - result.corrupted_metric) / (result.clean_metric - result.corrupted_metric)
    torch.testing.assert_close(result.scores, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attribution_patching_matches_finite_differences(load, arch, kind):
    """(clean − corrupted) · ∂m/∂a is the directional derivative along clean − corrupted."""
    model = load(arch, kind)
    clean, corrupted = tokens_of(model, CLEAN), tokens_of(model, CORRUPTED)
    target = mechnorm.contrast("are", "is", model)
    m_clean, m_corr = hand_metric(model, clean), hand_metric(model, corrupted)
    eps = 1e-2
    for where in ("resid_pre", "head_out", "pattern"):
        units = hand_units(model, where, clean.shape[1])
        names = {name for name, _ in units}
        _, c_cache = model.run_with_cache(clean, names_filter=lambda n: n in names)
        _, x_cache = model.run_with_cache(corrupted, names_filter=lambda n: n in names)
        derivative = []
        for name, index in units:
            def nudged(step):
                def hook(act, hook):
                    act = act.clone()
                    direction = c_cache[name][(0, *index)] - x_cache[name][(0, *index)]
                    act[(0, *index)] = act[(0, *index)] + step * direction
                    return act
                return hand_metric(model, corrupted, [(name, hook)])
            derivative.append((nudged(eps) - nudged(-eps)) / (2 * eps))
        derivative = torch.tensor(derivative)
        result = mechnorm.attribution_patching(model, CLEAN, CORRUPTED, target, where=where)
        raw, scores = flat(result)
        torch.testing.assert_close(raw - m_corr, derivative, atol=2e-3 * derivative.abs().max().item() + 1e-4, rtol=1e-2)
        torch.testing.assert_close(scores, derivative / (m_clean - m_corr), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("where", ["resid_pre", "head_pos", "pattern"])
def test_batching_equals_one_run_per_unit(load, where):
    model = load("llama", KINDS[-1])
    target = mechnorm.contrast("are", "is", model)
    one = mechnorm.activation_patching(model, CLEAN, CORRUPTED, target, where=where, batch_size=1, progress=False)
    for size in (5, None):
        many = mechnorm.activation_patching(model, CLEAN, CORRUPTED, target, where=where, batch_size=size, progress=False)
        torch.testing.assert_close(many.raw, one.raw, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ["activation_patching", "attribution_patching"])
def test_padding_does_not_change_a_pairs_result(load, side, method):
    model = load("gpt2", KINDS[-1])
    texts = [(CLEAN, CORRUPTED), ("a dog near the red tables runs", "a dog near the red table runs")]
    target = mechnorm.Target(ids=torch.tensor([ARE, WORDS.index("runs")]), foil=torch.tensor([IS, WORDS.index("run")]))
    clean = mechnorm.tokenize(model, [c for c, _ in texts], padding_side=side)
    corrupted = mechnorm.tokenize(model, [x for _, x in texts], padding_side=side)
    patch = getattr(mechnorm, method)
    both = patch(model, clean, corrupted, target, where="head_pos", progress=False)
    for i, (c, x) in enumerate(texts):
        alone = patch(model, c, x, mechnorm.Target(ids=target.ids[i:i + 1], foil=target.foil[i:i + 1]),
                      where="head_pos", progress=False)
        real = clean.attention_mask[i]
        torch.testing.assert_close(both.raw[:, i][..., real], alone.raw[:, 0], atol=1e-4, rtol=1e-4)
        assert both.raw[:, i][..., ~real].isnan().all()


def test_positions_are_counted_from_each_sequences_first_real_token(load):
    model = load("gpt2", KINDS[0])
    clean = mechnorm.tokenize(model, [CLEAN, "the key"], padding_side="left")
    corrupted = mechnorm.tokenize(model, [CORRUPTED, "the keys"], padding_side="left")
    result = mechnorm.activation_patching(model, clean, corrupted, where="resid_pre", positions=[0, -1], progress=False)
    patched = ~result.raw[0].isnan()  # [batch, pos]
    first = clean.attention_mask.long().argmax(-1)
    assert patched.sum(-1).tolist() == [2, 2]
    assert patched[1, first[1]] and patched[1, -1] and patched[0, 0] and patched[0, -1]


def test_length_mismatch_names_both_token_lists(load):
    model = load("gpt2", KINDS[0])
    with pytest.raises(ValueError, match="same length") as error:
        mechnorm.activation_patching(model, CLEAN, "the keys to the cabinet", progress=False)
    assert "'keys', 'to', 'the', 'old', 'cabinet'" in str(error.value).replace('"', "'")
    assert "6 tokens" in str(error.value) or "7 tokens" in str(error.value)


def test_bad_where_positions_and_missing_hooks_are_explained(load):
    model = load("gpt2", KINDS[0])
    with pytest.raises(ValueError, match="where must be one of"):
        mechnorm.activation_patching(model, CLEAN, CORRUPTED, where="resid_mid")
    with pytest.raises(ValueError, match="positions= applies to"):
        mechnorm.activation_patching(model, CLEAN, CORRUPTED, where="head_out", positions=[1])
    with pytest.raises(ValueError, match="blocks 0…1"):
        mechnorm.activation_patching(model, CLEAN, CORRUPTED, where="attn_out", layers=[2])

    class NoZ:
        cfg, hook_dict = model.cfg, {k: v for k, v in model.hook_dict.items() if "hook_z" not in k}

    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_z.*does not hook"):
        units_for(NoZ(), "head_out", None, "all", torch.ones(1, 4, dtype=torch.bool))


def test_default_target_is_the_clean_prediction(load):
    model = load("neox", KINDS[-1])
    clean = tokens_of(model, CLEAN)
    with torch.no_grad():
        logits = model(clean)[0, -1]
    result = mechnorm.activation_patching(model, CLEAN, CORRUPTED, where="head_out", progress=False)
    assert result.clean_metric.item() == pytest.approx(float(logits.max()), abs=1e-4)


def test_compare_agrees_with_scipy_and_with_itself(load):
    model = load("llama", KINDS[0])
    target = mechnorm.contrast("are", "is", model)
    act = mechnorm.activation_patching(model, CLEAN, CORRUPTED, target, where="head_pos", progress=False)
    att = mechnorm.attribution_patching(model, CLEAN, CORRUPTED, target, where="head_pos")
    stats = att.compare(act, k=4)
    a, b = att.mean().flatten().numpy(), act.mean().flatten().numpy()
    assert stats["pearson"] == pytest.approx(scipy.stats.pearsonr(a, b)[0], abs=1e-6)
    assert stats["spearman"] == pytest.approx(scipy.stats.spearmanr(a, b)[0], abs=1e-6)
    top = lambda x: set(abs(x).argsort()[::-1][:4].tolist())  # noqa: E731
    assert stats["top_k_overlap"] == len(top(a) & top(b)) / 4
    assert act.compare(act)["top_k_overlap"] == 1.0 and act.compare(act)["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="patch the same units"):
        act.compare(mechnorm.activation_patching(model, CLEAN, CORRUPTED, target, where="head_out", progress=False))


def test_frame_plot_and_html(load):
    model = load("gpt2", KINDS[0])
    target = mechnorm.contrast("are", "is", model)
    result = mechnorm.activation_patching(model, CLEAN, CORRUPTED, target, where="resid_pre", progress=False)
    frame = result.to_frame()
    n_pos = result.mask.sum().item()
    assert len(frame) == (model.cfg.n_layers + 1) * n_pos
    assert set(frame.columns) >= {"layer", "pos", "token", "score", "raw", "clean", "corrupted"}
    row = frame[(frame.layer == 1) & (frame.pos == 2)].iloc[0]
    assert row.score == pytest.approx(result.scores[1, 0, 2].item()) and row.token == result.tokens[0][2]
    fig = mechnorm.plot.patching_heatmap(result)
    assert list(fig.layout.xaxis.ticktext) == result.tokens[0]
    assert fig.data[0].z.shape == (model.cfg.n_layers + 1, n_pos)
    heads = mechnorm.activation_patching(model, CLEAN, CORRUPTED, target, where="head_out", progress=False).plot()
    assert heads.data[0].z.shape == (model.cfg.n_layers, model.cfg.n_heads)
    assert "activation patching" in result._repr_html_() and "<table" in result._repr_html_()


def test_identical_clean_and_corrupted_warn_and_give_nan(load):
    model = load("gpt2", KINDS[0])
    target = mechnorm.contrast("are", "is", model)
    with pytest.warns(UserWarning, match="nothing to restore"):
        result = mechnorm.activation_patching(model, CLEAN, CLEAN, target, where="head_out", progress=False)
    assert result.scores.isnan().all()
    torch.testing.assert_close(result.raw, result.clean_metric.expand_as(result.raw))  # patching clean into clean changes nothing


def test_an_encoder_is_refused_with_the_reason():
    model = mechnorm.load_model("zoo:bert-lexicon")
    with pytest.raises(ValueError, match="bidirectional encoder"):
        mechnorm.activation_patching(model, "[CLS] a", "[CLS] b", progress=False)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_is_refused_only_where_it_would_fire(load, kind):
    """A HookedTransformer has no dropout, so train() changes nothing; the bridge's HF GPT-2 has
    attention, residual and embedding dropout (0.1), which would make patching random."""
    model = load("gpt2", kind)
    clean, corrupted = "the keys to the old cabinet", "the key to the old cabinet"
    expected = mechnorm.activation_patching(model, clean, corrupted, where="attn_out", progress=False).scores
    model.train()
    try:
        if kind == "hooked":
            result = mechnorm.activation_patching(model, clean, corrupted, where="attn_out", progress=False)
            torch.testing.assert_close(result.scores, expected, equal_nan=True)
        else:
            with pytest.raises(ValueError, match=r"Dropout is active \(.*dropout.*model\.eval\(\)"):
                mechnorm.activation_patching(model, clean, corrupted, where="attn_out", progress=False)
    finally:
        model.eval()
