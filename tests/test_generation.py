"""Explaining a generation from one pass equals explaining each step on its own prefix.

The reference for step t is an independent pass over the prefix ``ids[:p_t]`` alone, with the
model's own prediction there as target; the generated tokens are checked against a greedy
argmax loop in plain transformers, and their probabilities against its softmax.
"""

import types

import pytest
import torch

import mechnorm
from mechnorm import fetch
from conftest import ARCHITECTURES, KINDS, TEXTS

N = 4


def step_by_step(model, gen, method, **options):
    """``[step, layer, visible pos]`` scores from a separate forward pass per step (list per step)."""
    head = mechnorm.UnembedHead(model)
    function = mechnorm.get_method(method).function
    rows = []
    for t in range(gen.n_steps):
        p = gen.prompt_length + t
        prefix = gen.token_ids[:p][None]
        logits, cache = mechnorm.run_with_cache(model, mechnorm.Batch(prefix, torch.ones_like(prefix, dtype=torch.bool)),
                                                mechnorm.hooks_for(method))
        target = mechnorm.predicted(logits)
        assert target.ids.item() == gen.generated[t].item()  # the step's prediction is the generated token
        if method in ("normxlogit", "logat"):
            result = function(cache, head, target, **options)
        elif method == "embedding_norm":
            result = function(cache, **options)
        else:
            result = function(cache, target=target, **options)
        rows.append(result.scores[:, 0])
    return rows


def assert_matches_steps(gen, rows, rtol=1e-5, atol=1e-5):
    for t, expected in enumerate(rows):
        p = gen.prompt_length + t
        torch.testing.assert_close(gen.scores[t, :, :p], expected, rtol=rtol, atol=atol)
        assert torch.isnan(gen.scores[t, :, p:]).all()  # the future is not scored
        assert gen.mask[t].tolist() == [i < p for i in range(len(gen.token_ids))]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_normxlogit_of_one_pass_equals_each_step_run_alone(load, arch, kind):
    model = load(arch, kind)
    gen = mechnorm.attribute(model, TEXTS[0], generate=N, progress=False)
    assert isinstance(gen, mechnorm.GenerationAttribution) and gen.method == "normxlogit"
    assert gen.scores.shape == (N, model.cfg.n_layers + 1, len(gen.token_ids))
    assert_matches_steps(gen, step_by_step(model, gen, "normxlogit"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "method, options",
    [("logat", {}), ("logat", {"space": "logprob"}), ("normxlogit", {"norm": "token"}), ("embedding_norm", {}),
     ("rollout", {}), ("rollout", {"head_fusion": "max", "discard_ratio": 0.3}), ("attention", {"layer": 1})],
)
def test_every_supported_method_equals_each_step_run_alone(load, kind, method, options):
    model = load("llama", kind)
    gen = mechnorm.explain_generation(model, TEXTS[2], N, method=method, options=dict(options), progress=False)
    assert len(set(gen.generated.tolist())) == N  # every step has its own target
    assert_matches_steps(gen, step_by_step(model, gen, method, **options))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generated_tokens_and_probabilities_equal_a_greedy_loop_in_transformers(load, hf_model, arch):
    model, hf = load(arch, KINDS[-1]), hf_model(arch)
    gen = mechnorm.attribute(model, TEXTS[1], generate=6, progress=False)
    ids = gen.token_ids[: gen.prompt_length][None]
    probabilities = []
    with torch.no_grad():
        for _ in range(6):
            last = hf(ids).logits[0, -1]
            probabilities.append(last.softmax(-1).max())
            ids = torch.cat([ids, last.argmax()[None, None]], dim=1)
    assert gen.token_ids.tolist() == ids[0].tolist()
    torch.testing.assert_close(gen.probabilities, torch.stack(probabilities), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ("gpt2", "llama"))  # a position table, and rotary positions
def test_left_padded_prompts_get_what_each_gets_alone(load, arch, kind):
    model = load(arch, kind)
    together = mechnorm.attribute(model, TEXTS, generate=3, progress=False)
    assert len(together) == len(TEXTS)
    for text, gen in zip(TEXTS, together):
        alone = mechnorm.attribute(model, text, generate=3, progress=False)
        assert gen.token_ids.tolist() == alone.token_ids.tolist() and gen.prompt_length == alone.prompt_length
        assert gen.tokens == alone.tokens
        torch.testing.assert_close(gen.scores, alone.scores, rtol=1e-4, atol=1e-5, equal_nan=True)
    # a right-padded Batch is re-padded on the left; token ids of one prompt give one result
    from_batch = mechnorm.attribute(model, mechnorm.tokenize(model, TEXTS), generate=3, progress=False)
    assert [g.token_ids.tolist() for g in from_batch] == [g.token_ids.tolist() for g in together]
    from_ids = mechnorm.attribute(model, together[1].token_ids[: together[1].prompt_length], generate=3, progress=False)
    torch.testing.assert_close(from_ids.scores, together[1].scores, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_figure_has_generated_tokens_by_context_with_the_future_blank(load):
    model = load("neox")
    gen = mechnorm.attribute(model, TEXTS[0], generate=N, progress=False)
    fig = gen.plot()
    heat = fig.data[0]
    z = torch.tensor(heat.z, dtype=torch.float32)
    P = gen.prompt_length
    assert z.shape == (N, P + N - 1)  # rows: generated tokens; columns: prompt + earlier generations
    assert list(fig.layout.xaxis.ticktext) == gen.tokens[:-1]
    assert [label.split(": ", 1)[1] for label in fig.layout.yaxis.ticktext] == gen.generated_tokens
    future = torch.arange(P + N - 1)[None, :] >= (P + torch.arange(N))[:, None]
    assert torch.isnan(z[future]).all() and torch.isfinite(z[~future]).all()
    torch.testing.assert_close(z[~future], gen.row(-1)[:, :-1][~future])
    normed = torch.tensor(gen.plot(normalize=True).data[0].z, dtype=torch.float32)
    assert torch.allclose(normed.nan_to_num(0).abs().amax(1), torch.ones(N))  # each row's largest |score| is 1


def test_frame_and_top_k_read_the_visible_scores(load):
    model = load("llama")
    gen = mechnorm.attribute(model, TEXTS[1], generate=N, progress=False)
    frame = gen.to_frame()
    assert len(frame) == int(gen.mask.sum()) * len(gen.layers)
    last = frame[frame.layer == gen.layers[-1]]
    assert (last.pos < gen.prompt_length + last.step).all()
    P = gen.prompt_length
    assert gen.tokens[0] == "<bos>"
    for t in range(N):  # ranked: visible positions but BOS and the step's prediction position
        allowed = [p for p in range(P + t) if p not in (0, P + t - 1)]
        expected = gen.row(-1)[t, allowed].sort(descending=True).values[:3]
        top = gen.top_k(step=t, k=3)
        assert top.score.tolist() == pytest.approx(expected.tolist())
        assert (top.generated == gen.generated_tokens[t]).all() and not top.pos.isin([0, P + t - 1]).any()
        full = gen.top_k(step=t, k=P + t, include_protected=True)
        assert sorted(full.pos.tolist()) == list(range(P + t))
        visible = [gen.tokens[p] for p in range(P + t)]  # a repeated token's label names its position
        for row in full.itertuples():
            suffix = f"@{row.pos}" if visible.count(row.token) > 1 else ""
            assert row.label == repr(row.token) + suffix
    assert len(gen.summary()) == N
    assert len(gen.top_k()) == sum(min(5, P + t - 2) for t in range(N))
    assert frame.protected.sum() == 2 * N * len(gen.layers)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(methods=("saliency",)), "explain each step separately"),
        (dict(methods=("integrated_gradients",)), "needs gradients"),
        (dict(methods=("alti",)), "not supported with generate="),
        (dict(methods=("normxlogit", "rollout")), "one method at a time"),
        (dict(target=mechnorm.token_target(3)), "drop target="),
        (dict(generate=0), "positive number"),
        (dict(generate=100), "exceed the model's context"),
        (dict(options={"normxlogit": {"bogus": 1}}), "'space' and 'norm'"),
    ],
)
def test_what_one_pass_cannot_do_is_refused_naming_the_alternative(load, kwargs, message):
    model = load("gpt2")
    kwargs = {"generate": 2, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        mechnorm.attribute(model, TEXTS[1], **kwargs)


def test_an_encoder_is_refused():
    encoder = types.SimpleNamespace(cfg=types.SimpleNamespace(attention_dir="bidirectional"))
    with pytest.raises(ValueError, match="bidirectional"):
        mechnorm.explain_generation(encoder, "the key", 2)


def test_cli_explain_generate_prints_each_step_and_writes_the_figure(load, model_dirs, tmp_path, capsys):
    from mechnorm.cli import main

    out = tmp_path / "gen.html"
    code = main(["explain", "--model", model_dirs["gpt2"], "--text", "the key", "--generate", "3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    gen = mechnorm.attribute(load("gpt2"), "the key", generate=3, progress=False)
    assert "probability" in printed and str(out) in printed
    assert all(token in printed for token in gen.generated_tokens)
    assert "Plotly.newPlot" in out.read_text()


@pytest.mark.skipif(not fetch.is_fetched("smollm2-135m"), reason="run `mechnorm fetch smollm2-135m`")
def test_smollm2_one_pass_equals_each_step_run_alone():
    model = mechnorm.load_model("smollm2-135m")
    gen = mechnorm.attribute(model, "The capital of France is", generate=3, progress=False)
    scale = float(gen.scores.nan_to_num(0).abs().max())
    assert_matches_steps(gen, step_by_step(model, gen, "normxlogit"), rtol=1e-5, atol=1e-5 * scale)
