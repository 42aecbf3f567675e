"""NormXLogit, LogAt and embedding norms against an independent computation from plain transformers.

The reference is built from HF ``hidden_states`` exactly as the paper describes:
``hidden_states[l]`` through the final norm and ``lm_head``; HF's last hidden state already
has the final norm applied, so it goes through ``lm_head`` alone.
"""

import pytest
import torch

import mechnorm
from conftest import ARCHITECTURES, KINDS, TEXTS, assert_padding_matches_alone


def final_norm(hf):
    """The HF model's final norm module."""
    base = hf.base_model
    for name in ("ln_f", "norm", "final_layer_norm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise AttributeError(type(base).__name__)


def reference(hf, tokens):
    """Per-layer logits [layer, batch, pos, vocab] and embedding norms, by hand from HF."""
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        states = out.hidden_states
        head = hf.get_output_embeddings()
        per_layer = [head(final_norm(hf)(h)) for h in states[:-1]] + [head(states[-1])]
    return torch.stack(per_layer), states[0].norm(dim=-1), out.logits


def assert_rel_close(actual, expected, rtol=1e-4):
    scale = expected.abs().max()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logat_and_normxlogit_equal_hand_computation_from_hf(load, hf_model, arch, kind):
    model, hf = load(arch, kind), hf_model(arch)
    batch = mechnorm.tokenize(model, TEXTS[0])
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("normxlogit"))
    layer_logits, norms, hf_logits = reference(hf, batch.tokens)
    assert_rel_close(logits, hf_logits)

    target = mechnorm.predicted(logits)
    expected_ids = hf_logits[:, -1].argmax(-1)
    assert target.ids.tolist() == expected_ids.tolist()
    expected_logat = layer_logits[..., expected_ids[0]]  # [layer, batch, pos]

    head = mechnorm.UnembedHead(model)
    lat = mechnorm.logat(cache, head, target)
    nxl = mechnorm.normxlogit(cache, head, target)
    assert lat.layers == tuple(range(model.cfg.n_layers + 1))
    assert_rel_close(lat.scores, expected_logat)
    assert_rel_close(mechnorm.embedding_norm(cache).scores[0], norms)
    assert_rel_close(nxl.scores, norms[None] * expected_logat)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_token_embedding_norm_is_the_word_embedding_row_norm(load, arch):
    model = load(arch)
    batch = mechnorm.tokenize(model, TEXTS[2])
    _, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("embedding_norm"))
    expected = model.W_E[batch.tokens].norm(dim=-1)
    torch.testing.assert_close(mechnorm.embedding_norm(cache, which="token").scores[0], expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_padding_gives_each_sequence_its_own_scores(load, arch, kind, padding_side):
    assert_padding_matches_alone(load(arch, kind), "normxlogit", padding_side)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_contrast_is_target_minus_foil_and_logprob_is_log_softmax(load, arch):
    model = load(arch)
    head = mechnorm.UnembedHead(model)
    batch = mechnorm.tokenize(model, TEXTS[0])
    _, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("logat"))
    are, is_ = mechnorm.token_target("are", model), mechnorm.token_target("is", model)
    diff = mechnorm.logat(cache, head, mechnorm.contrast("are", "is", model)).scores
    torch.testing.assert_close(diff, mechnorm.logat(cache, head, are).scores - mechnorm.logat(cache, head, is_).scores)

    resid = torch.stack([cache[mechnorm.residual.resid_hook(l)] for l in range(model.cfg.n_layers + 1)])
    full = head(resid)  # [layer, batch, pos, vocab]: the full-vocabulary route, asked for explicitly
    expected = full.log_softmax(-1)[..., are.ids[0]]
    torch.testing.assert_close(mechnorm.logat(cache, head, are, space="logprob").scores, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.log_normalizer(resid, chunk_size=7), full.logsumexp(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_frozen_norm_matches_model_at_final_layer_and_is_linear(load, arch):
    model = load(arch)
    batch = mechnorm.tokenize(model, TEXTS[0])
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("logat"))
    target = mechnorm.predicted(logits)
    frozen = mechnorm.UnembedHead(model, ln="frozen")
    final = mechnorm.logat(cache, frozen, target, layers=-1).scores[0]
    torch.testing.assert_close(final, logits[0, :, target.ids[0]][None], rtol=1e-4, atol=1e-4)

    # With the scale frozen, the head is affine: head(a + b) = head(a) + head(b) - head(0).
    a = cache["blocks.0.hook_resid_post"]
    b = cache["blocks.1.hook_resid_post"]
    cols = target.columns(1)
    zero = torch.zeros_like(a)
    lhs = frozen(a + b, cols, cache=cache)
    rhs = frozen(a, cols, cache=cache) + frozen(b, cols, cache=cache) - frozen(zero, cols, cache=cache)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_weight_processing_shifts_logat_by_a_per_position_constant_and_centres_norms(model_dirs, load):
    raw = load("gpt2")
    with pytest.warns(mechnorm.ProcessedWeightsWarning, match="center_unembed") as caught:
        processed = mechnorm.load_model(model_dirs["gpt2"], process_weights=True)
        head_p = mechnorm.UnembedHead(processed)
    assert {w.filename for w in caught if w.category is mechnorm.ProcessedWeightsWarning} == {__file__}  # the user's line
    assert mechnorm.weight_processing(processed) == {"fold_ln": True, "center_unembed": True, "center_writing_weights": True}
    assert not any(mechnorm.weight_processing(raw).values())

    batch = mechnorm.tokenize(raw, TEXTS[0])
    _, cache_r = mechnorm.run_with_cache(raw, batch, mechnorm.hooks_for("normxlogit"))
    _, cache_p = mechnorm.run_with_cache(processed, batch, mechnorm.hooks_for("normxlogit"))
    head_r = mechnorm.UnembedHead(raw)
    targets = [mechnorm.token_target(w, raw) for w in ("are", "is", "cabinet")]
    shifts = [
        mechnorm.logat(cache_p, head_p, t).scores - mechnorm.logat(cache_r, head_r, t).scores for t in targets
    ]
    # center_unembed subtracts each position's mean logit: the shift is the same for every token ...
    torch.testing.assert_close(shifts[0], shifts[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shifts[0], shifts[2], rtol=1e-4, atol=1e-4)
    assert shifts[0].abs().max() > 1e-3  # ... and not zero, so LogAt really changed
    # ... and log-probabilities do not change at all.
    torch.testing.assert_close(
        mechnorm.logat(cache_p, head_p, targets[0], space="logprob").scores,
        mechnorm.logat(cache_r, head_r, targets[0], space="logprob").scores,
        rtol=1e-4, atol=1e-4,
    )
    # center_writing_weights centres the input embeddings: norms become those of the centred vectors.
    x0 = cache_r["blocks.0.hook_resid_pre"]
    centred = (x0 - x0.mean(-1, keepdim=True)).norm(dim=-1)
    torch.testing.assert_close(mechnorm.embedding_norm(cache_p).scores[0], centred, rtol=1e-4, atol=1e-5)


def test_processed_warning_is_given_once_per_model(model_dirs, recwarn):
    processed = mechnorm.load_model(model_dirs["llama"], process_weights=True)
    mechnorm.UnembedHead(processed)
    mechnorm.UnembedHead(processed)
    assert sum(issubclass(w.category, mechnorm.ProcessedWeightsWarning) for w in recwarn) == 1


def test_hooks_for_caches_only_what_is_read(load):
    model = load("gpt2")
    batch = mechnorm.tokenize(model, TEXTS[0])
    _, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("normxlogit"))
    expected = {"hook_embed", "blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "ln_final.hook_scale"}
    # a bridge caches its word embedding under embed.hook_out as well (hook_embed is its alias)
    assert set(cache.keys()) == expected | {mechnorm.residual.token_embed_hook(model)}
    # the word embedding's other names: HookedEncoder's and TransformerBridge's
    word = {"embed.hook_embed", "embed.hook_out"}
    assert set(mechnorm.hooks_for("normxlogit").hook_names(2)) == expected | word | {"blocks.0.hook_normalized_resid_post", "blocks.1.hook_normalized_resid_post"}
    assert set(mechnorm.hooks_for("embedding_norm").hook_names(2)) == {"hook_embed", "blocks.0.hook_resid_pre"} | word
    with pytest.raises(KeyError, match="Known methods"):
        mechnorm.hooks_for("no-such-method")


def test_missing_hooks_error_lists_what_to_cache(load):
    model = load("gpt2")
    batch = mechnorm.tokenize(model, TEXTS[0])
    logits, cache = mechnorm.run_with_cache(model, batch, lambda name: name == "blocks.0.hook_resid_pre")
    with pytest.raises(mechnorm.MissingHooksError, match=r"blocks\.1\.hook_resid_post.*hooks_for"):
        mechnorm.normxlogit(cache, mechnorm.UnembedHead(model), mechnorm.predicted(logits))
    with pytest.raises(mechnorm.MissingHooksError, match="ln_final.hook_scale"):
        mechnorm.logat(cache, mechnorm.UnembedHead(model, ln="frozen"), mechnorm.predicted(logits), layers=0)


def test_bad_inputs_raise_clear_errors(load):
    model = load("gpt2")
    head = mechnorm.UnembedHead(model)
    batch = mechnorm.tokenize(model, TEXTS[:2])
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("normxlogit"))
    target = mechnorm.predicted(logits, batch.attention_mask)
    with pytest.raises(ValueError, match="outside the head's"):
        mechnorm.logat(cache, head, mechnorm.token_target(10_000), attention_mask=batch.attention_mask)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        mechnorm.normxlogit(cache, head, target, attention_mask=batch.attention_mask[:, :-1])
    all_padding = batch.attention_mask.clone()
    all_padding[1] = False
    with pytest.raises(ValueError, match="no real tokens"):
        mechnorm.normxlogit(cache, head, target, attention_mask=all_padding)
    with pytest.raises(ValueError, match="tokenise to no tokens"):
        mechnorm.tokenize(model, ["the key", ""], prepend_bos=False)
    with pytest.raises(ValueError, match="out of range"):
        mechnorm.logat(cache, head, target, layers=5, attention_mask=batch.attention_mask)
    with pytest.raises(ValueError, match="3 entries but the batch has 2"):
        mechnorm.logat(cache, head, mechnorm.token_target([3, 4, 5]), attention_mask=batch.attention_mask)
    with pytest.raises(ValueError, match="not one"):
        mechnorm.token_target("the key", model)
    with pytest.raises(ValueError, match="space must be"):
        mechnorm.logat(cache, head, target, space="prob", attention_mask=batch.attention_mask)


def test_methods_do_not_mutate_the_cache(load):
    model = load("llama", "bridge")
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("normxlogit"))
    before = {k: v.clone() for k, v in cache.items()}
    target = mechnorm.predicted(logits, batch.attention_mask)
    for ln in ("recompute", "frozen"):
        mechnorm.normxlogit(cache, mechnorm.UnembedHead(model, ln=ln), target, attention_mask=batch.attention_mask, space="logprob")
    mechnorm.embedding_norm(cache, which="token", attention_mask=batch.attention_mask)
    assert before.keys() == set(cache.keys())
    for name, value in before.items():
        assert torch.equal(value, cache[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_classifier_normxlogit_equals_hand_computation(kind):
    """The paper's BERT-with-head setting: every token's layer-l state through the [CLS] head."""
    from transformers import BertForMaskedLM

    from mechnorm import tasks, zoo

    model = mechnorm.load_model("zoo:bert-lexicon", kind=kind)
    head = zoo.classifier_head("bert-lexicon")
    data = tasks.collate(tasks.get_task("lexicon").test(4))
    logits, cache = mechnorm.run_with_cache(model, mechnorm.Batch(data.tokens, data.attention_mask), mechnorm.hooks_for("normxlogit"))
    hf = BertForMaskedLM.from_pretrained(zoo.path("bert-lexicon")).eval()
    with torch.no_grad():
        states = hf.bert(data.tokens, attention_mask=data.attention_mask.long(), output_hidden_states=True).hidden_states
    per_layer = torch.stack([head(h) for h in states])  # [layer, batch, pos, class]
    predicted = per_layer[-1][:, 0].argmax(-1)  # the classifier reads [CLS]
    target = mechnorm.token_target(predicted)
    nxl = mechnorm.normxlogit(cache, head, target, attention_mask=data.attention_mask)
    expected = states[0].norm(dim=-1)[None] * per_layer.gather(-1, predicted.view(1, -1, 1, 1).expand(len(states), -1, per_layer.shape[2], 1))[..., 0]
    real = data.attention_mask.bool()
    assert_rel_close(nxl.scores[:, real], expected[:, real])
    # the word embedding alone, although the bridge aliases hook_embed to the embedding LayerNorm
    _, word_cache = mechnorm.run_with_cache(model, mechnorm.Batch(data.tokens, data.attention_mask), mechnorm.hooks_for("embedding_norm"))
    word = mechnorm.embedding_norm(word_cache, which="token", attention_mask=data.attention_mask)
    with torch.no_grad():
        assert_rel_close(word.scores[0][real], hf.bert.embeddings.word_embeddings(data.tokens).norm(dim=-1)[real])
