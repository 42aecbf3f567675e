"""Results that cannot mislead: protected positions, labels, score statements, NaN detection, reports."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import KINDS, TEXTS

import mechnorm
from mechnorm import fetch
from mechnorm.evaluate.predictor import Predictor
from mechnorm.protected import protected_positions
from mechnorm.report import text_summary, write_report
from mechnorm.residual import NonFiniteError

pytestmark = pytest.mark.filterwarnings("ignore::mechnorm.ProcessedWeightsWarning")


def _attr(protected=None, tokens=None):
    scores = torch.tensor([[[9.0, 1.0, 5.0, 7.0], [0.0, 4.0, 8.0, 6.0]]])
    mask = torch.tensor([[True, True, True, True], [False, True, True, True]])
    tokens = tokens or [["<bos>", "a", " D", "b"], ["<pad>", " D", "c", " D"]]
    return mechnorm.Attribution(scores, layers=(2,), mask=mask, method="normxlogit", tokens=tokens,
                                target_labels=(" are", " is"), protected=protected)


def test_top_k_leaves_out_protected_positions_unless_asked():
    protected = torch.tensor([[True, False, False, True], [False, False, True, False]])
    attr = _attr(protected)
    top = attr.top_k(2)
    assert top[top.batch == 0].pos.tolist() == [2, 1]  # 9 (BOS) and 7 (prediction) are not evidence
    assert top[top.batch == 1].pos.tolist() == [3, 1]  # 8 is protected; padding (0) never ranked
    assert not top.protected.any()
    full = attr.top_k(2, include_protected=True)
    assert full[full.batch == 0].pos.tolist() == [0, 3] and full.protected.tolist() == [True, True, True, False]
    frame = attr.to_frame()
    assert frame.protected.tolist() == [True, False, False, True, False, True, False]


def test_nan_scores_at_real_tokens_warn_and_rank_last():
    scores = torch.tensor([[[float("nan"), 1.0, 2.0]]])
    with pytest.warns(UserWarning, match="NaN or inf at 1 real .* batch 0, pos 0"):
        attr = mechnorm.Attribution(scores, layers=(1,), mask=torch.ones(1, 3, dtype=torch.bool), method="demo")
    assert attr.top_k(3).pos.tolist() == [2, 1, 0]  # torch's own descending sort puts NaN first


def test_labels_quote_tokens_and_mark_repeats_with_their_position():
    attr = _attr()
    top = attr.top_k(4, include_protected=True)
    by_pos = {(b, p): label for b, p, label in zip(top.batch, top.pos, top.label)}
    assert by_pos[0, 2] == "' D'" and by_pos[0, 1] == "'a'"  # ' D' occurs once in sequence 0
    assert by_pos[1, 1] == "' D'@1" and by_pos[1, 3] == "' D'@3" and by_pos[1, 2] == "'c'"
    # padding is not an occurrence: sequence 1's pad token is not counted
    assert _attr(tokens=[["x", "y", "y", "z"], ["y", "y", "w", "v"]]).label(1, 1) == "'y'"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_protected_agrees_with_evaluation_and_by_hand(load, kind, side):
    model = load("gpt2", kind)
    batch = mechnorm.tokenize(model, TEXTS, padding_side=side)
    comp = mechnorm.attribute(model, batch, methods=("normxlogit", "rollout", "saliency"))
    special = set(model.tokenizer.all_special_ids)
    expected = torch.zeros_like(batch.attention_mask)
    for b in range(len(TEXTS)):  # by hand: last real token, and the first real one when it is BOS
        real = batch.attention_mask[b].nonzero().flatten().tolist()
        expected[b, real[-1]] = True
        if int(batch.tokens[b, real[0]]) in special:
            expected[b, real[0]] = True
    assert expected.sum() == 2 * len(TEXTS)  # the tiny models prepend BOS
    predictor = Predictor(model)
    evaluation = predictor.protected(batch.tokens, batch.attention_mask, predictor.prediction_positions(batch.attention_mask))
    assert torch.equal(evaluation, expected)
    assert torch.equal(comp["normxlogit"].protected, expected) and torch.equal(comp["saliency"].protected, expected)
    first = torch.zeros_like(expected)
    first[torch.arange(len(TEXTS)), batch.attention_mask.long().argmax(-1)] = True
    assert torch.equal(comp["rollout"].protected, expected | first)  # the sink, here = BOS, for attention mass


def test_protected_positions_without_tokens_and_with_a_sink():
    mask = torch.tensor([[False, True, True, True]])
    assert protected_positions(None, mask, torch.tensor([3])).tolist() == [[False, False, False, True]]
    assert protected_positions(None, mask, torch.tensor([3]), sink=True).tolist() == [[False, True, False, True]]
    tokens = torch.tensor([[0, 5, 6, 7]])
    assert protected_positions(tokens, mask, torch.tensor([3]), special_ids=[5]).tolist() == [[False, True, False, True]]
    with pytest.raises(ValueError, match="tokens has shape"):
        protected_positions(tokens[:, :2], mask, torch.tensor([3]), special_ids=[5])


def test_describe_states_method_layer_target_probability_units_and_sign(load):
    model = load("gpt2", KINDS[0])
    batch = mechnorm.tokenize(model, TEXTS[0])
    comp = mechnorm.attribute(model, batch, methods=("normxlogit", "logat", "rollout", "saliency", "embedding_norm"))
    logits = mechnorm.run_with_cache(model, batch)[0]
    probs = logits[0, -1].softmax(-1)
    label = model.tokenizer.decode([int(probs.argmax())])
    p = f"(p = {float(probs.max()):.2f})"
    text = comp["normxlogit"].describe()
    assert text.startswith(f"NormXLogit at layer 2 (final, blocks applied), explaining {label!r} {p}: ")
    assert f"the logit of {label!r} read from" in text and "signed (logit × norm)" in text
    assert text.endswith(f"larger = more evidence for {label!r}.")
    assert comp["logat"].describe().startswith("LogAt at layer 2 (final")
    assert comp["rollout"].describe().startswith(f"Attention rollout at layer 2 (final, blocks applied), explaining {label!r} {p}")
    assert "unsigned" in comp["rollout"].describe() and f"not specific to {label!r}" in comp["rollout"].describe()
    assert "Saliency" in comp["saliency"].describe() and "L1 norm" in comp["saliency"].describe()
    assert "Embedding norm" in comp["embedding_norm"].describe()
    one_layer = mechnorm.normxlogit(mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("normxlogit"))[1],
                                    mechnorm.UnembedHead(model), mechnorm.token_target(3), layers=1)
    assert one_layer.describe().startswith("NormXLogit at layer 1 (blocks applied)")  # not "final"


@pytest.mark.parametrize("stream", [True, False])
def test_a_given_target_gets_its_probability_on_both_routes(load, stream):
    model = load("gpt2", KINDS[0])
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    target = mechnorm.token_target(" is", model)
    comp = mechnorm.attribute(model, batch, methods=("normxlogit", "saliency"), target=target, stream=stream)
    with torch.no_grad():  # by hand: each sequence alone, unpadded, the softmax at its last token
        expected = torch.stack([model(row[real][None])[0, -1].softmax(-1)[int(target.ids[0])]
                                for row, real in zip(batch.tokens, batch.attention_mask.bool())])
    for name in ("normxlogit", "saliency"):
        torch.testing.assert_close(comp[name].target_probs, expected.float(), atol=1e-5, rtol=1e-4)
    assert f"(p = {float(expected[0]):.2f})" in comp["normxlogit"].describe()
    # a classifier head's classes are not the vocabulary: no probability is claimed for them
    head = mechnorm.LinearHead(torch.randn(3, model.cfg.d_model), norm=mechnorm.FinalNorm.from_model(model))
    classes = mechnorm.attribute(model, batch, methods=("normxlogit",), target=mechnorm.token_target(1), head=head,
                                 stream=stream)
    assert classes["normxlogit"].target_probs is None


def _nan_cache(model, method, hook, index, padding_side="right"):
    batch = mechnorm.tokenize(model, TEXTS, padding_side=padding_side)
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for(method))
    target = mechnorm.predicted(logits, batch.attention_mask)
    with torch.inference_mode():
        cache[hook][index] = float("nan")
    return batch, cache, target


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["normxlogit", "logat", "logit_lens"])
def test_nan_in_a_cached_residual_raises_naming_hook_and_layer(load, kind, method):
    model = load("llama", kind)
    batch, cache, target = _nan_cache(model, method, "blocks.0.hook_resid_post", (0, 2, 5))
    function = mechnorm.get_method(method).function
    with pytest.raises(NonFiniteError, match=r"blocks\.0\.hook_resid_post \(layer 1 = after block 0\) holds NaN at batch 0, pos 2"):
        function(cache, mechnorm.UnembedHead(model), target, attention_mask=batch.attention_mask)


@pytest.mark.parametrize("kind", KINDS)
def test_inf_in_the_input_embedding_and_nan_in_an_attention_pattern_raise(load, kind):
    model = load("gpt2", kind)
    batch, cache, target = _nan_cache(model, "normxlogit", "blocks.0.hook_resid_pre", (1, 0, 3))
    with torch.inference_mode():
        cache["blocks.0.hook_resid_pre"][1, 0, 3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"blocks\.0\.hook_resid_pre \(layer 0, the input\) holds inf at batch 1, pos 0"):
        mechnorm.normxlogit(cache, mechnorm.UnembedHead(model), target, attention_mask=batch.attention_mask)
    batch, cache, _ = _nan_cache(model, "rollout", "blocks.1.attn.hook_pattern", (0, 2, 3, 1))
    with pytest.raises(NonFiniteError, match=r"blocks\.1\.attn\.hook_pattern \(block 1\) holds NaN at batch 0, head 2, query 3"):
        mechnorm.attention_rollout(cache, attention_mask=batch.attention_mask)


@pytest.mark.parametrize("method", ["normxlogit", "rollout"])
def test_nan_at_padding_changes_nothing(load, method):
    model = load("gpt2", KINDS[0])
    batch = mechnorm.tokenize(model, TEXTS)  # sequence 1 ("the key") is right-padded from position 3
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for(method))
    target = mechnorm.predicted(logits, batch.attention_mask)
    args = (cache, mechnorm.UnembedHead(model), target) if method == "normxlogit" else (cache,)
    clean = mechnorm.get_method(method).function(*args, attention_mask=batch.attention_mask).scores
    hook = "blocks.1.hook_resid_post" if method == "normxlogit" else "blocks.1.attn.hook_pattern"
    with torch.inference_mode():
        cache[hook][1, ..., 4, :] = float("nan")  # a padded position (query row for the pattern)
    dirty = mechnorm.get_method(method).function(*args, attention_mask=batch.attention_mask).scores
    torch.testing.assert_close(dirty, clean, equal_nan=True)


def test_report_shows_prediction_probability_statement_and_scores(load, tmp_path):
    model = load("gpt2", KINDS[0])
    comp = mechnorm.attribute(model, TEXTS[:2], methods=("normxlogit", "rollout"))
    page = write_report(comp, tmp_path / "r.html", k=3).read_text()
    batch = mechnorm.tokenize(model, TEXTS[:2])
    logits = mechnorm.run_with_cache(model, batch)[0]
    for b in range(2):
        last = int(batch.attention_mask[b].sum()) - 1
        probs = logits[b, last].softmax(-1)
        label = model.tokenizer.decode([int(probs.argmax())])
        assert f"Predicted {label!r} (p = {float(probs.max()):.2f})." in page.replace("&#x27;", "'")
    attr = comp["normxlogit"]
    top = attr.top_k(3)
    for label, score in zip(top.label, top.score):
        assert f"<code>{label}</code> {score:.3g}".replace("'", "&#x27;") in page
    assert comp["rollout"].describe(1).replace("'", "&#x27;") in page
    first = batch.strings[0][0]
    assert f"not ranked: {first!r}@0".replace("'", "&#x27;").replace("<", "&lt;").replace(">", "&gt;") in page
    summary = text_summary(comp, k=3)  # what `mechnorm explain` prints
    ranked = " | ".join(f"{label} {score:.3g}" for label, score in zip(top.label[top.batch == 1], top.score[top.batch == 1]))
    assert f"  {attr.describe(1)}\n    {ranked}   [not ranked: {first!r}@0," in summary
    assert summary.count("(p = ") == 2 * (1 + 2)  # each sequence's prediction line and both methods' statements


needs_smollm2 = pytest.mark.skipif(not fetch.is_fetched("smollm2-135m"), reason="run `mechnorm fetch smollm2-135m`")


@needs_smollm2
def test_demo_sentences_on_smollm2_no_longer_rank_the_last_or_sink_token_first():
    from mechnorm.demo import CASES

    model = mechnorm.load_model("smollm2-135m")
    comp = mechnorm.attribute(model, [case.text for case in CASES], methods=("normxlogit", "rollout"))
    mask = comp.batch.attention_mask
    last = mask.sum(1) - 1
    for method in ("normxlogit", "rollout"):
        attr = comp[method]
        top = attr.top_k(1)
        assert (top.pos.values != last.numpy()).all()
        everything = attr.top_k(1, include_protected=True)
        if method == "normxlogit":  # today's ranking put the prediction position (' cabinet') first
            assert everything.pos.tolist()[0] == int(last[0])
        else:  # and rollout's first token (the attention sink) in every sentence
            assert everything.pos.tolist() == [0] * len(CASES) and (top.pos.values != 0).all()
    agreement = comp["normxlogit"].top_k(3)
    assert "' cabinet'" not in agreement[agreement.batch == 0].label.tolist()
    assert not math.isnan(float(comp["normxlogit"].target_probs[0]))


def test_token_label_names_the_position_only_of_a_repeated_token():
    from mechnorm.result import token_label

    strings = [" D", " and", " D", " went"]
    assert [token_label(strings, p, [0, 1, 2, 3]) for p in range(4)] == ["' D'@0", "' and'", "' D'@2", "' went'"]
    assert token_label(strings, 2, [1, 2, 3]) == "' D'"  # the other ' D' is not among the ranked positions
