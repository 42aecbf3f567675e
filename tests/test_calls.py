"""Calls in TransformerLens habits (issue #15 items 2, 4, 6, 7): a model where a head is expected,
strings/ints/lists/None where a target is, remove_batch_dim caches, TL-style padded batches,
[UNK] in inputs and targets, and every public function name accepted by the registry."""

from __future__ import annotations

import warnings

import pytest
import torch

import mechnorm
from conftest import KINDS, TEXTS

TL_TEXTS = ["the keys to the old cabinet", "the key"]


def _explicit(model, texts, names_filter=None):
    """The documented explicit route: mechnorm.tokenize, run_with_cache with the mask, predicted with the mask."""
    batch = mechnorm.tokenize(model, texts)
    logits, cache = mechnorm.run_with_cache(model, batch, names_filter)
    return batch, logits, cache


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_model_string_int_and_list_targets_equal_the_explicit_call(load, arch, kind):
    model = load(arch, kind)
    batch, logits, cache = _explicit(model, TEXTS[:2] + TEXTS[:1])
    mask, head = batch.attention_mask, mechnorm.UnembedHead(model)
    explicit = mechnorm.normxlogit(cache, head, mechnorm.token_target(" are", model), attention_mask=mask)
    are_id = model.tokenizer.convert_tokens_to_ids("are")
    for target in ("are", are_id, [are_id]):
        short = mechnorm.normxlogit(cache, model, target, attention_mask=mask)
        torch.testing.assert_close(short.scores, explicit.scores, equal_nan=True)
    # one target per sequence: each row equals that sequence explained with its own token
    per_sequence = mechnorm.normxlogit(cache, model, ["are", "is", "was"], attention_mask=mask)
    for i, word in enumerate(["are", "is", "was"]):
        alone = mechnorm.normxlogit(cache, head, mechnorm.token_target(word, model), attention_mask=mask)
        torch.testing.assert_close(per_sequence.scores[:, i], alone.scores[:, i], equal_nan=True)
    assert per_sequence.target_labels == ("are", "is", "was")
    # LogAt through the model: the head's logit of 'are' read from the final residual, by hand
    logat = mechnorm.logat(cache, model, "are", attention_mask=mask, layers=-1)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    by_hand = head(final, torch.full((3, 1), are_id))[..., 0]
    torch.testing.assert_close(logat.scores[0][mask], by_hand[mask])


@pytest.mark.parametrize("kind", KINDS)
def test_no_target_is_the_models_prediction_with_its_probability(load, kind):
    model = load("llama", kind)
    batch, logits, cache = _explicit(model, TEXTS)
    mask = batch.attention_mask
    explicit_target = mechnorm.predicted(logits, mask, tokenizer=model.tokenizer)
    last = mask.long().cumsum(-1).argmax(-1)  # last real position, computed independently
    rows = logits[torch.arange(3), last].float()
    assert explicit_target.positions.tolist() == last.tolist()
    torch.testing.assert_close(explicit_target.probs, rows.softmax(-1).max(-1).values)
    implicit = mechnorm.normxlogit(cache, model, attention_mask=mask)
    explicit = mechnorm.normxlogit(cache, mechnorm.UnembedHead(model), explicit_target, attention_mask=mask)
    torch.testing.assert_close(implicit.scores, explicit.scores, equal_nan=True)
    assert implicit.target_labels == explicit_target.labels
    # head=None: the cache's model
    torch.testing.assert_close(mechnorm.normxlogit(cache, attention_mask=mask).scores, explicit.scores, equal_nan=True)
    # methods that take (cache, head, target) all accept the model and no target
    for method in ("decompx", "alti_logit"):
        names = mechnorm.hooks_for(method, "normxlogit")
        _, logits_m, cache_m = _explicit(model, TEXTS, names)
        function = mechnorm.get_method(method).function
        short = function(cache_m, model, attention_mask=mask)
        full = function(cache_m, mechnorm.UnembedHead(model), mechnorm.predicted(logits_m, mask), attention_mask=mask)
        torch.testing.assert_close(short.scores, full.scores, equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
def test_tokens_are_labelled_from_the_cache_without_tokens(load, kind):
    model = load("gpt2", kind)
    batch, logits, cache = _explicit(model, TEXTS, mechnorm.hooks_for("normxlogit"))
    attr = mechnorm.normxlogit(cache, model, "are", attention_mask=batch.attention_mask)
    expected = [[model.tokenizer.decode([i]) for i in row] for row in batch.tokens.tolist()]
    assert attr.tokens == expected
    rollout_cache = _explicit(model, TEXTS, mechnorm.hooks_for("attention_rollout"))[2]
    assert mechnorm.attention_rollout(rollout_cache, attention_mask=batch.attention_mask).tokens == expected


@pytest.mark.parametrize("kind", KINDS)
def test_remove_batch_dim_caches_read_as_a_batch_of_one(load, kind):
    model = load("neox", kind)
    tokens = mechnorm.tokenize(model, TEXTS[0]).tokens
    logits, batched = model.run_with_cache(tokens)
    _, single = model.run_with_cache(tokens, remove_batch_dim=True)
    assert single["blocks.0.hook_resid_pre"].ndim == 2  # what TransformerLens gives
    target = mechnorm.predicted(logits)
    for name in ("normxlogit", "logat", "decompx", "alti_logit"):
        function = mechnorm.get_method(name).function
        torch.testing.assert_close(function(single, model, target).scores, function(batched, model, target).scores)
    torch.testing.assert_close(mechnorm.attention_rollout(single).scores, mechnorm.attention_rollout(batched).scores)
    torch.testing.assert_close(mechnorm.embedding_norm(single).scores, mechnorm.embedding_norm(batched).scores)
    lens_single, lens_batched = mechnorm.logit_lens(single, model), mechnorm.logit_lens(batched, model)
    torch.testing.assert_close(lens_single.target_prob, lens_batched.target_prob)
    dla = mechnorm.direct_logit_attribution(single, model, target, tokens=tokens[0])
    torch.testing.assert_close(dla.scores, mechnorm.direct_logit_attribution(batched, model, target).scores)


@pytest.mark.parametrize("pad_is_bos", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_tl_style_padded_batch_gives_each_sequence_its_own_result(load, model_dirs, kind, pad_is_bos):
    """model.to_tokens([...]) pads on the right with the pad id; no mask is passed anywhere.
    With ``pad_is_bos`` the pad id is also BOS and EOS, as in GPT-2."""
    if pad_is_bos:
        model = mechnorm.load_model(model_dirs["llama"], kind=kind)  # a copy: its tokenizer is changed
        model.tokenizer.pad_token = model.tokenizer.bos_token
    else:
        model = load("llama", kind)
    tokens = model.to_tokens(TL_TEXTS)
    assert (tokens[1, 3:] == model.tokenizer.pad_token_id).all()  # the batch really is padded
    assert (tokens[:, 0] == model.tokenizer.bos_token_id).all()
    logits, cache = model.run_with_cache(tokens)
    batched = mechnorm.normxlogit(cache, model)
    lens = mechnorm.logit_lens(cache, model)
    target = mechnorm.predicted(logits, tokens=tokens, tokenizer=model.tokenizer)
    assert torch.equal(mechnorm.predicted(logits, tokens=tokens, tokenizer=model).ids, target.ids)
    for i, text in enumerate(TL_TEXTS):
        alone_tokens = model.to_tokens(text)
        n = alone_tokens.shape[1]
        alone_logits, alone_cache = model.run_with_cache(alone_tokens)
        alone = mechnorm.normxlogit(alone_cache, model, mechnorm.predicted(alone_logits))
        torch.testing.assert_close(batched.scores[:, i, :n], alone.scores[:, 0], rtol=1e-4, atol=1e-5)
        assert torch.isnan(batched.scores[:, i, n:]).all()
        assert target.positions[i] == n - 1
        assert target.ids[i] == alone_logits[0, -1].argmax()
        alone_lens = mechnorm.logit_lens(alone_cache, model)
        torch.testing.assert_close(lens.target_prob[:, i], alone_lens.target_prob[:, 0], rtol=1e-4, atol=1e-6)
    # a target read at the padding (predicted without the mask) is refused with the fix
    unmasked = mechnorm.predicted(logits)
    for call in (lambda: mechnorm.normxlogit(cache, model, unmasked), lambda: mechnorm.logit_lens(cache, model, unmasked)):
        with pytest.raises(ValueError, match=r"padding in sequence\(s\) \[1\].*predicted\(logits, attention_mask=mask\)"):
            call()


class _Tok:
    def __init__(self, pad, bos, eos, side="right"):
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.padding_side = pad, bos, eos, side

    def decode(self, ids):
        return f"<{ids[0]}>"


def test_infer_mask_under_each_padding_layout():
    infer = mechnorm.inputs.infer_mask
    t = torch.tensor
    # a pad id of its own: either side, read per sequence
    assert infer(t([[1, 5, 6], [1, 5, 0]]), _Tok(0, 1, 1)).tolist() == [[True] * 3, [True, True, False]]
    assert infer(t([[1, 5, 6], [0, 1, 5]]), _Tok(0, 1, 1, "left")).tolist() == [[True] * 3, [False, True, True]]
    assert infer(t([[1, 5, 6], [1, 5, 6]]), _Tok(0, 1, 1)) is None and infer(t([[1, 5, 0]]), _Tok(0, 1, 1)) is None
    # GPT-2: pad = bos = eos = 9; right padding, every sequence starts with BOS
    gpt2 = _Tok(9, 9, 9)
    assert infer(t([[9, 5, 6, 7], [9, 5, 9, 9]]), gpt2).tolist() == [[True] * 4, [True, True, False, False]]
    # left padding with BOS = pad: the last pad id of each leading run is the sequence's own BOS
    left = infer(t([[9, 5, 6, 7], [9, 9, 9, 5]]), _Tok(9, 9, 9, "left"))
    assert left.tolist() == [[True] * 4, [False, False, True, True]]
    # sequences that all end with EOS (= pad) and have equal length are not padded
    assert not (~infer(t([[5, 6, 9], [7, 8, 9]]), gpt2)).any()
    with pytest.raises(ValueError, match="occurs inside sequence.*attention_mask="):
        infer(t([[1, 0, 6], [1, 5, 6]]), _Tok(0, 1, 1))
    with pytest.raises(ValueError, match="without the tokenizer.*attention_mask="):
        infer(t([[1, 5, 6], [1, 5, 0]]), None)


def test_predicted_infers_the_mask_from_tokens():
    logits = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[1, 5, 6, 7], [1, 5, 0, 0]])
    target = mechnorm.predicted(logits, tokens=tokens, tokenizer=_Tok(0, 1, 1))
    assert target.positions.tolist() == [3, 1]
    assert target.ids.tolist() == [int(logits[0, 3].argmax()), int(logits[1, 1].argmax())]
    left = mechnorm.predicted(logits, tokens=torch.tensor([[1, 5, 6, 7], [0, 0, 1, 5]]), tokenizer=_Tok(0, 1, 1, "left"))
    assert left.positions.tolist() == [3, 3]


def test_unknown_words_warn_in_inputs_and_are_refused_as_targets():
    model = mechnorm.load_model("zoo:gpt2-agree-recall", kind=KINDS[0])
    with pytest.warns(UserWarning, match="'wooden'.*'xylophone'|'xylophone'.*'wooden'"):
        batch = mechnorm.tokenize(model, ["the wooden box is", "a xylophone"])
    assert (batch.tokens == model.tokenizer.unk_token_id).sum() == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in-vocabulary text: no warning
        mechnorm.tokenize(model, "the box is")
    with pytest.raises(ValueError, match="'wooden' is not in the vocabulary.*to_single_token"):
        mechnorm.token_target("wooden", model)
    with pytest.raises(ValueError, match="'boxs' is not in the vocabulary.*'box"):
        mechnorm.contrast("boxs", "box", model)
    assert mechnorm.token_target("box", model).ids.tolist() == [model.tokenizer.convert_tokens_to_ids("box")]
    # the TransformerLens route (model.to_tokens) is warned where the cache is read
    tokens = model.to_tokens("the wooden box is")
    unk_at = (tokens[0] == model.tokenizer.unk_token_id).nonzero().flatten().tolist()
    assert len(unk_at) == 1
    _, cache = model.run_with_cache(tokens)
    with pytest.warns(UserWarning, match=rf"unknown token '\[UNK\]' at \(sequence, position\) \[\(0, {unk_at[0]}\)\]"):
        mechnorm.normxlogit(cache, model, "box")


def test_every_public_function_name_is_a_method_name(load):
    assert mechnorm.get_method("attention_rollout") is mechnorm.get_method("rollout")
    assert mechnorm.get_method("attention_weights") is mechnorm.get_method("attention")
    assert mechnorm.hooks_for("attention_rollout") == mechnorm.hooks_for("rollout")
    assert mechnorm.hooks_for("direct_logit_attribution") == mechnorm.hooks_for("dla")
    table = mechnorm.list_methods().set_index("name")
    assert table.loc["rollout", "alias"] == "attention_rollout"
    for spec_name in table.index:  # every registered function is reachable by its own name
        function = mechnorm.get_method(spec_name).function
        assert mechnorm.get_method(function.__name__).function is function
    with pytest.raises(KeyError, match="Did you mean 'attention_rollout'"):
        mechnorm.get_method("attention_rolout")
    model = load("gpt2")
    by_alias = mechnorm.attribute(model, TEXTS, methods=["attention_rollout"], options={"attention_rollout": {"head_fusion": "max"}})
    batch, _, cache = _explicit(model, TEXTS, mechnorm.hooks_for("rollout"))
    direct = mechnorm.attention_rollout(cache, head_fusion="max", attention_mask=batch.attention_mask)
    torch.testing.assert_close(by_alias.attributions["rollout"].scores, direct.scores, equal_nan=True)


def test_errors_show_a_working_call(load):
    model = load("gpt2")
    batch, logits, cache = _explicit(model, TEXTS[:1])
    with pytest.raises(TypeError, match=r"mechnorm.normxlogit\(cache, model\)"):
        mechnorm.normxlogit(cache, "model")
    with pytest.raises(TypeError, match=r"normxlogit\(cache, model, ' are'\)"):
        mechnorm.normxlogit(cache, model, 1.5)
    _, partial = model.run_with_cache(batch.tokens, names_filter=lambda name: name in ("blocks.0.hook_resid_pre", "hook_embed"))
    with pytest.raises(ValueError, match=r"target=mechnorm.predicted\(logits\)"):
        mechnorm.normxlogit(partial, model)


@pytest.mark.parametrize("kind", KINDS)
def test_classifier_head_predicts_at_cls_and_takes_class_names(kind):
    model = mechnorm.load_model("zoo:bert-lexicon", kind=kind)
    head = mechnorm.zoo.classifier_head("bert-lexicon")
    batch = mechnorm.tokenize(model, ["a good film", "terrible"])  # right padding: [CLS] is position 0
    _, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("normxlogit"))
    final = cache[mechnorm.residual.final_resid_hook(model)]
    class_logits = head(final)[:, 0]  # every class's logit at [CLS], by hand
    explicit = mechnorm.Target(ids=class_logits.argmax(-1), positions=torch.zeros(2, dtype=torch.long))
    implicit = mechnorm.normxlogit(cache, head, attention_mask=batch.attention_mask)
    full = mechnorm.normxlogit(cache, head, explicit, attention_mask=batch.attention_mask)
    torch.testing.assert_close(implicit.scores, full.scores, equal_nan=True)
    assert implicit.target_labels == tuple(head.labels[i] for i in explicit.ids.tolist())
    name = head.labels[1]
    by_name = mechnorm.logat(cache, head, name, attention_mask=batch.attention_mask)
    by_id = mechnorm.logat(cache, head, mechnorm.Target(torch.tensor([1])), attention_mask=batch.attention_mask)
    torch.testing.assert_close(by_name.scores, by_id.scores, equal_nan=True)
    with pytest.raises(ValueError, match="encoder"):
        mechnorm.normxlogit(cache)  # an encoder's prediction needs its classifier head
