"""Subword -> word aggregation (Attribution.by_word) on the three tokenizer conventions, checked
against words and sums written out by hand."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import mechnorm
from mechnorm.result import token_strings
from mechnorm.words import word_label, word_starts

from conftest import TEXTS


def unigram(pieces, pre_tokenizer, decoder):
    """A tokenizer whose only pieces are ``pieces`` (so the split is known by construction)."""
    tokenizer = Tokenizer(models.Unigram([("<unk>", 0.0)] + [(p, -1.0) for p in pieces], unk_id=0, byte_fallback=False))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizer, decoder
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def gpt2_style():
    """Byte-level pieces (Ġ = a leading space, Ċ = newline), decoded with GPT-2's ByteLevel decoder."""
    pieces = ["<|endoftext|>", "The", "Ġcabin", "ets", "Ġare", "Ċ", "un", "locked", "."]
    return unigram(pieces, pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())


def llama_style():
    """SentencePiece pieces (▁ = a leading space) with the Metaspace decoder, which drops the ▁ of a lone token."""
    return unigram(["<s>", "▁The", "▁cabin", "ets", "▁are", "▁un", "locked", "."], pre_tokenizers.Metaspace(), decoders.Metaspace())


def bert_style():
    """WordPiece: continuation pieces start with ##."""
    words = ["[UNK]", "[CLS]", "[SEP]", "the", "cabin", "##ets", "are", "un", "##lock", "##ed", "."]
    tokenizer = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def attribution(tokenizer, first: str, text: str, pad: int = 0, protected_last: bool = False):
    """Scores 1, 2, 4, 8, … (layer 0) and their negatives (layer 1) over ``first`` + ``text``,
    left-padded by ``pad`` positions; token strings decoded one by one, as mechnorm.attribute does."""
    ids = [tokenizer.convert_tokens_to_ids(first)] + tokenizer.encode(text, add_special_tokens=False)
    ids = [0] * pad + ids
    n = len(ids)
    mask = torch.tensor([[False] * pad + [True] * (n - pad)])
    values = torch.tensor([0.0] * pad + [2.0**i for i in range(n - pad)])
    protected = None
    if protected_last:
        protected = torch.zeros(1, n, dtype=torch.bool)
        protected[0, pad] = protected[0, -1] = True
    attr = mechnorm.Attribution(torch.stack([values, -values])[:, None], layers=(0, 1), mask=mask, method="logat",
                                tokens=token_strings(tokenizer, torch.tensor([ids])), protected=protected)
    return attr, [tokenizer.convert_ids_to_tokens(ids)]


def test_gpt2_style_leading_spaces_and_newline_make_words():
    attr, _ = attribution(gpt2_style(), "<|endoftext|>", "The cabinets are\nunlocked.")
    assert attr.tokens[0] == ["<|endoftext|>", "The", " cabin", "ets", " are", "\n", "un", "locked", "."]
    words = attr.by_word()
    # by hand: <|endoftext|> | The | cabin+ets | are | \n | un+locked+. -> scores 1 | 2 | 4+8 | 16 | 32 | 64+128+256
    assert words.tokens[0] == ["<|endoftext|>", "The", "cabinets", "are", "\n", "unlocked."]
    assert words.scores[0, 0].tolist() == [1, 2, 12, 16, 32, 448]
    assert words.scores[1, 0].tolist() == [-1, -2, -12, -16, -32, -448]
    assert words.metadata["word_index"][0].tolist() == [0, 1, 2, 2, 3, 4, 5, 5, 5]


def test_llama_style_pieces_recover_the_boundaries_the_decoded_strings_lost():
    attr, pieces = attribution(llama_style(), "<s>", "The cabinets are unlocked.")
    assert attr.tokens[0] == ["<s>", "The", "cabin", "ets", "are", "un", "locked", "."]  # ▁ dropped on decode
    with pytest.warns(UserWarning, match="no word boundaries"):
        fallback = attr.by_word()
    assert fallback.tokens[0] == attr.tokens[0]  # one word per token, said so
    words = attr.by_word(pieces=pieces)
    assert pieces[0][2] == "▁cabin"
    assert words.tokens[0] == ["<s>", "The", "cabinets", "are", "unlocked."]
    assert words.scores[0, 0].tolist() == [1, 2, 4 + 8, 16, 32 + 64 + 128]
    # the raw pieces as token strings work alone too
    attr.tokens = pieces
    assert attr.by_word().tokens[0] == ["<s>", "The", "cabinets", "are", "unlocked."]


def test_bert_wordpiece_continuations_join_and_punctuation_stays_a_word():
    attr, _ = attribution(bert_style(), "[CLS]", "the cabinets are unlocked.")
    assert attr.tokens[0] == ["[CLS]", "the", "cabin", "##ets", "are", "un", "##lock", "##ed", "."]
    words = attr.by_word()
    assert words.tokens[0] == ["[CLS]", "the", "cabinets", "are", "unlocked", "."]
    assert words.scores[0, 0].tolist() == [1, 2, 4 + 8, 16, 32 + 64 + 128, 256]


@pytest.mark.parametrize("how, expected", [("mean", [1, 2, 6, 16, 32, 448 / 3]), ("max", [1, 2, 8, 16, 32, 256]),
                                           ("absmax", [1, 2, 8, 16, 32, 256])])
def test_other_reductions(how, expected):
    attr, _ = attribution(gpt2_style(), "<|endoftext|>", "The cabinets are\nunlocked.")
    words = attr.by_word(how=how)
    assert words.scores[0, 0].tolist() == pytest.approx(expected)
    assert words.scores[1, 0].tolist() == pytest.approx([-v for v in expected] if how != "max" else
                                                        [-1, -2, -4, -16, -32, -64])
    assert words.metadata["by_word"] == how


def test_protected_positions_stay_words_of_their_own():
    attr, _ = attribution(gpt2_style(), "<|endoftext|>", "The cabinets are\nunlocked.", protected_last=True)
    words = attr.by_word()
    # the protected last piece "." no longer joins "unlocked"
    assert words.tokens[0] == ["<|endoftext|>", "The", "cabinets", "are", "\n", "unlocked", "."]
    assert words.scores[0, 0].tolist() == [1, 2, 12, 16, 32, 64 + 128, 256]
    assert words.protected[0].tolist() == [True, False, False, False, False, False, True]
    assert "." not in words.top_k(10).token.tolist()


def test_padding_does_not_change_the_words():
    alone, _ = attribution(bert_style(), "[CLS]", "the cabinets are unlocked.")
    padded, _ = attribution(bert_style(), "[CLS]", "the cabinets are unlocked.", pad=3)
    a, b = alone.by_word(), padded.by_word()
    assert a.tokens == b.tokens and torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0, equal_nan=True)
    assert b.metadata["word_index"][0, :3].tolist() == [-1, -1, -1]


def test_by_word_on_a_real_batch_keeps_each_sequence_and_maps_the_prediction_position(model_dirs):
    model = mechnorm.load_model(model_dirs["gpt2"])
    attr = mechnorm.attribute(model, TEXTS, methods=("rollout",), padding_side="left")["rollout"]
    attr.tokens = [[t if i == 0 or t in ("<bos>", "<pad>") else " " + t for i, t in enumerate(row)] for row in attr.tokens]
    words = attr.by_word()  # word-level tokens with spaces: one word per token, left padding dropped
    for b in range(len(TEXTS)):
        real = attr.mask[b].nonzero().flatten()
        n = len(real)
        assert words.mask[b].sum() == n and words.mask[b, :n].all()
        torch.testing.assert_close(words.scores[:, b, :n], attr.scores[:, b, real])
        assert words.metadata["positions"][b] == n - 1  # the last real token is the last word


def test_helpers_and_errors():
    assert word_starts(["Ġa", "b", "Ġc"]) == [True, False, True]
    assert word_starts(["<s>", "ab", "##c"], keep=[False, False, True]) == [True, True, True]
    assert word_label(["▁cabin", "ets"]) == "cabinets"
    attr, _ = attribution(bert_style(), "[CLS]", "the cabinets")
    with pytest.raises(ValueError, match="how must be one of"):
        attr.by_word(how="median")
    with pytest.raises(ValueError, match="one string per position"):
        attr.by_word(pieces=[["the"]])
