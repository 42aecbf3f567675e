"""Comprehensiveness / sufficiency: exact arithmetic on a model whose answer is one token,
then invariance to padding and batch size on real (tiny) transformers."""

from __future__ import annotations

import math

import pytest
import torch

import mechnorm
from mechnorm import evaluate
from mechnorm.evaluate import ERASER_KS, PAPER_KS, Predictor, comprehensiveness, sufficiency
from mechnorm.evaluate.perturb import n_selected, perturb, rank, top_k
from mechnorm.inputs import mask_kwargs

from conftest import KINDS

V, CUE, STRENGTH = 12, 5, 20.0
BOS, PAD, UNK, MASK = 1, 0, 2, 3



class FakeTokenizer:
    bos_token_id, pad_token_id, unk_token_id, mask_token_id, eos_token_id = BOS, PAD, UNK, MASK, None
    all_special_ids = [PAD, BOS, UNK, MASK]


class CuePredictor(Predictor):
    """A two-class 'model' whose logit for class 1 is +20 when token CUE is present, else -20.

    Embeddings are one-hot, so zero/mean ablation at the embedding hides the cue too. It
    checks that every prediction position it is asked about is the last real token.
    """

    def __init__(self):
        self.model, self.head, self.encoder, self.position = None, None, False, "last"
        self.tokenizer, self.embed_hook = FakeTokenizer(), "hook_embed"

    def mean_embedding(self):
        return torch.full((V,), 1.0 / V)

    def logits(self, tokens, attention_mask=None, positions=None, embed_edit=None):
        mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        assert torch.equal(positions, mechnorm.targets.last_positions(mask)), "prediction position moved"
        embeds = torch.nn.functional.one_hot(tokens, V).float()
        if embed_edit is not None:
            embeds = embed_edit(embeds, None)
        present = ((embeds[..., CUE] > 0.5) & mask).any(-1)
        logit = torch.where(present, STRENGTH, -STRENGTH)
        return torch.stack([torch.zeros_like(logit), logit], dim=-1)


P_FULL = 1 / (1 + math.exp(-STRENGTH))  # p(class 1) with the cue
P_GONE = 1 / (1 + math.exp(STRENGTH))  # without it


def cue_batch(n_words: int = 10, batch: int = 4):
    """[BOS] w1 … w_n [final]: the cue at a different word position in each sequence."""
    tokens = torch.randint(6, V, (batch, n_words + 2), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = BOS
    cue_at = torch.arange(batch) % n_words + 1
    tokens[torch.arange(batch), cue_at] = CUE
    return tokens, torch.ones_like(tokens, dtype=torch.bool), cue_at


def ranking(tokens, cue_at, cue_rank: str):
    """Scores that put the cue first or last among the word tokens."""
    scores = torch.linspace(0.5, 0.1, tokens.shape[1]).expand(tokens.shape).clone()
    scores[torch.arange(tokens.shape[0]), cue_at] = 1.0 if cue_rank == "first" else -1.0
    return scores


@pytest.mark.parametrize("replacement", ["unk", 7, "mask", "zero", "mean", "delete"])
def test_cue_first_removes_all_confidence(replacement):
    tokens, mask, cue_at = cue_batch()
    scores = ranking(tokens, cue_at, "first")
    labels = torch.ones(tokens.shape[0], dtype=torch.long)
    comp = comprehensiveness(CuePredictor(), tokens, mask, scores, labels=labels, replacement=replacement)
    suff = sufficiency(CuePredictor(), tokens, mask, scores, labels=labels, replacement=replacement)
    assert comp.ks == PAPER_KS
    assert torch.allclose(comp.full_prob, torch.tensor(P_FULL))
    assert comp.aopc == pytest.approx(P_FULL - P_GONE, abs=1e-6)  # the whole confidence, at every K
    assert suff.aopc == pytest.approx(0.0, abs=1e-6)  # the cue alone suffices
    assert comp.accuracy.tolist() == [0.0] * 9 and comp.accuracy_aopc == 0.0
    assert suff.accuracy.tolist() == [1.0] * 9 and bool(comp.full_correct.all())


def test_cue_last_is_never_removed_below_k_100():
    tokens, mask, cue_at = cue_batch()
    scores = ranking(tokens, cue_at, "last")
    comp = comprehensiveness(CuePredictor(), tokens, mask, scores, replacement="unk")
    suff = sufficiency(CuePredictor(), tokens, mask, scores, replacement="unk")
    assert comp.aopc == pytest.approx(0.0, abs=1e-6)  # 9 of 10 words at most are removed
    assert suff.aopc == pytest.approx(P_FULL - P_GONE, abs=1e-6)
    # at K = 100 % every word goes: comprehensiveness catches the cue, sufficiency keeps all
    comp_all = comprehensiveness(CuePredictor(), tokens, mask, scores, ks=[1.0], replacement="unk")
    suff_all = sufficiency(CuePredictor(), tokens, mask, scores, ks=[1.0], replacement="unk")
    assert comp_all.aopc == pytest.approx(P_FULL - P_GONE, abs=1e-6)
    assert suff_all.aopc == 0.0 and suff_all.n_removed.sum() == 0


def test_random_ranking_matches_its_expectation():
    """With n = 10 words, K removes exactly K·n of them, so P(cue removed) = K: E[AOPC] = mean(K)·Δp."""
    tokens, mask, cue_at = cue_batch(batch=400)
    scores = evaluate.random_attribution(mask, seed=3)
    comp = comprehensiveness(CuePredictor(), tokens, mask, scores, replacement="delete", batch_size=400)
    expected = sum(PAPER_KS) / len(PAPER_KS) * (P_FULL - P_GONE)
    per_sequence = comp.confidence_drop.mean(0)
    tolerance = 4 * float(per_sequence.std()) / math.sqrt(400)
    assert abs(comp.aopc - expected) < tolerance
    curve = comp.confidence_drop.mean(-1)  # per K: P(removed) = K
    assert torch.allclose(curve, torch.tensor(PAPER_KS) * (P_FULL - P_GONE), atol=0.1)


def test_counts_follow_ceil_of_k_times_rankable():
    rankable = torch.ones(1, 10, dtype=torch.bool)
    assert [int(n_selected(rankable, k)) for k in (0.01, 0.1, 0.3, 0.7, 0.95, 1.0)] == [1, 1, 3, 7, 10, 10]
    assert rank(torch.tensor([[0.2, 0.9, 0.2, 0.5]]), torch.tensor([[True, True, True, False]])).tolist() == [[1, 0, 2, 4]]
    assert top_k(torch.tensor([[0.3, 0.9, 0.1]]), torch.ones(1, 3, dtype=torch.bool), 0.5).tolist() == [[True, True, False]]
    tokens, mask, cue_at = cue_batch(n_words=20)
    curve = comprehensiveness(CuePredictor(), tokens, mask, ranking(tokens, cue_at, "first"), ks=ERASER_KS, replacement="unk")
    # 20 words ranked (BOS and the final token are protected): 1, 1, 2, 4, 10 removed
    assert curve.n_removed[:, 0].tolist() == [1, 1, 2, 4, 10]


def test_protected_positions_are_never_removed():
    tokens, mask, cue_at = cue_batch()
    curve = comprehensiveness(CuePredictor(), tokens, mask, ranking(tokens, cue_at, "first"), ks=[1.0], replacement="delete")
    assert curve.n_removed.tolist() == [[10] * 4]  # 12 tokens minus BOS and the prediction position
    out = perturb(tokens, mask, torch.full((4,), 11), torch.zeros_like(mask).index_fill_(1, torch.arange(1, 11), True), "delete")
    assert out.tokens.tolist() == [[BOS, int(t)] for t in tokens[:, -1]] and out.positions.tolist() == [1] * 4
    extra = torch.zeros_like(mask)
    extra[torch.arange(4), cue_at] = True  # protecting the cue means removing it never happens
    comp = comprehensiveness(CuePredictor(), tokens, mask, ranking(tokens, cue_at, "first"), protect=extra, replacement="unk")
    assert comp.aopc == pytest.approx(0.0, abs=1e-6)


def test_deletion_repacks_left_padding_to_the_right():
    tokens = torch.tensor([[PAD, PAD, BOS, 6, CUE, 7], [BOS, 8, 9, CUE, 10, 11]])
    mask = tokens != PAD
    mask[1, 0] = True
    remove = torch.tensor([[False, False, False, True, False, False], [False, True, True, False, False, False]])
    out = perturb(tokens, mask, torch.tensor([5, 5]), remove, "delete")
    assert out.tokens.tolist() == [[BOS, CUE, 7, 0], [BOS, CUE, 10, 11]]
    assert out.attention_mask.tolist() == [[True, True, True, False], [True] * 4]
    assert out.positions.tolist() == [2, 3]


def test_bad_input_errors_name_the_fix():
    tokens, mask, cue_at = cue_batch()
    scores = ranking(tokens, cue_at, "first")
    for ks, hint in (([0.0, 0.5], "(0, 1]"), ([1.5], "(0, 1]"), ([10, 20], "percentages")):
        with pytest.raises(ValueError, match=r"0, 1\]") as err:
            comprehensiveness(CuePredictor(), tokens, mask, scores, ks=ks)
        assert hint in str(err.value)
    with pytest.raises(ValueError, match="Unknown replacement"):
        sufficiency(CuePredictor(), tokens, mask, scores, replacement="blank")
    with pytest.raises(ValueError, match=r"scores are \(4, 3\)"):
        comprehensiveness(CuePredictor(), tokens, mask, scores[:, :3])
    with pytest.raises(ValueError, match="NaN or infinite"):
        comprehensiveness(CuePredictor(), tokens, mask, torch.full_like(scores, float("nan")))
    with pytest.raises(ValueError, match="3 labels for 4"):
        comprehensiveness(CuePredictor(), tokens, mask, scores, labels=torch.ones(3, dtype=torch.long))


# --- real transformers: padding and batch size change nothing ---------------------------


def _padded(model, padding_side):
    batch = mechnorm.tokenize(model, ["the keys to the old cabinet", "the key", "a dog near the red tables runs and"],
                              padding_side=padding_side)
    return batch.tokens, batch.attention_mask


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("replacement", ["delete", "unk", "zero"])
def test_padding_and_batch_size_do_not_change_curves(load, arch, replacement):
    model = load(arch)
    curves = []
    for side, batch_size in (("right", 3), ("left", 3), ("right", 1), ("left", 2)):
        tokens, mask = _padded(model, side)
        scores = evaluate.random_attribution(mask, seed=1)  # padding-invariant by construction
        labels = torch.tensor([5, 6, 7])
        for metric in (comprehensiveness, sufficiency):
            curves.append(metric(model, tokens, mask, scores, labels=labels, ks=(0.2, 0.5, 1.0),
                                 replacement=replacement, batch_size=batch_size))
    reference = curves[:2]
    for i, curve in enumerate(curves[2:]):
        ref = reference[i % 2]
        assert torch.allclose(curve.full_prob, ref.full_prob, atol=1e-5)
        assert torch.allclose(curve.prob, ref.prob, atol=1e-5), (i, curve.prob, ref.prob)
        assert torch.equal(curve.correct, ref.correct) and torch.equal(curve.n_removed, ref.n_removed)


def test_predictor_reads_the_model_output(load):
    model = load("gpt2")
    tokens, mask = _padded(model, "left")
    logits = Predictor(model).logits(tokens, mask)
    with torch.no_grad():
        expected = model(tokens, attention_mask=mask.long())[:, -1]  # left padding: last column is last token
    assert torch.allclose(logits, expected, atol=1e-4)
    # a classifier-style head on the first real token: LinearHead on that token's final residual
    weight = torch.randn(3, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    head = mechnorm.LinearHead(weight, torch.zeros(3))
    first = Predictor(model, head, position="first")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask.long())
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    start = mask.long().argmax(-1)
    assert torch.allclose(first.logits(tokens, mask), resid[torch.arange(3), start] @ weight.T, atol=1e-4)
    # the tracked output defaults to the model's prediction on the full input
    curve = comprehensiveness(model, tokens, mask, evaluate.random_attribution(mask), ks=[0.5])
    assert torch.allclose(curve.full_prob, logits.softmax(-1).max(-1).values, atol=1e-5)


def test_encoder_classifier_reads_its_head_at_cls(tmp_path):
    """A BERT encoder: the prediction is the head on [CLS], the same through HookedEncoder and
    the bridge; its default replacement is the tokenizer's [MASK]."""
    from transformers import BertConfig, BertForMaskedLM

    from mechnorm import tasks

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tasks.vocabulary()), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertForMaskedLM(config).save_pretrained(tmp_path)
    tasks.tokenizer("cls").save_pretrained(tmp_path)
    data = evaluate.as_eval_data(tasks.get_task("lexicon").test(4))
    head = mechnorm.LinearHead(torch.randn(2, 32), torch.zeros(2), norm=mechnorm.FinalNorm("layernorm", eps=1e-12))
    hooked = mechnorm.load_model(tmp_path)  # the default kind: HookedEncoder on transformer-lens 3.x, else the bridge
    with pytest.raises(ValueError, match="classifier head"):
        Predictor(hooked)
    logits = {}
    for kind in KINDS:
        predictor = Predictor(mechnorm.load_model(tmp_path, kind=kind), head)
        assert predictor.encoder and predictor.position == "first"
        logits[kind] = predictor.logits(data.tokens, data.attention_mask)
        assert evaluate.faithfulness.default_replacement(predictor) == "mask"
        assert torch.allclose(logits[kind], logits[KINDS[0]], atol=1e-4)
    with torch.no_grad():
        _, cache = hooked.run_with_cache(data.tokens, **mask_kwargs(hooked, data.attention_mask))
    assert torch.allclose(logits[KINDS[0]], head(cache["blocks.0.hook_resid_post"][:, :1])[:, 0], atol=1e-5)
    curve = comprehensiveness(Predictor(hooked, head), data.tokens, data.attention_mask,
                              evaluate.random_attribution(data.attention_mask), labels=data.labels, ks=[0.5])
    assert curve.correct.shape == (1, 4)
    # [CLS] is protected: K = 100 % removes every other real token
    everything = comprehensiveness(Predictor(hooked, head), data.tokens, data.attention_mask,
                                   evaluate.random_attribution(data.attention_mask), ks=[1.0])
    assert everything.n_removed[0].tolist() == (data.attention_mask.sum(-1) - 1).tolist()
