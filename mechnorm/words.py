"""Subword -> word aggregation of token scores (``Attribution.by_word``).

A *word* is a whitespace-delimited piece of the text, as the tokenizer marks it. Where a
word starts is read from the token strings themselves, per sequence, by the first
convention that applies:

1. **WordPiece** (BERT): some token starts with ``##``; a token continues the previous word
   iff it starts with ``##``.
2. **Word-start markers**: some token starts with ``Ġ`` (GPT-2 byte-level pieces) or ``▁``
   (SentencePiece: Llama-2, Gemma, T5 pieces); a token starts a word iff it starts with the
   marker (or is a newline/tab piece ``Ċ``/``ĉ``).
3. **Decoded strings** (what ``mechnorm.attribute`` stores: ``" keys"``): a token starts a
   word iff it starts with whitespace.

In every convention a token that is only whitespace (``"\\n"``) is a word of its own and the
token after it starts a new word; special tokens (``<s>``, ``<|endoftext|>``, ``[CLS]``) and
protected positions (``attr.protected``) always stay words of their own, so a BOS or
prediction position never merges into a word. Words are labelled by joining their pieces with
the markers and the leading whitespace removed (``"Ġcabin" + "ets"`` -> ``"cabinets"``).

SentencePiece tokenizers of the Llama-2 family drop the ``▁`` when a single token is decoded,
so their decoded strings carry no boundaries at all; pass the raw pieces
(``pieces=[tokenizer.convert_ids_to_tokens(ids) for ids in batch.tokens.tolist()]``). When
no boundary is found in a multi-token sequence, each token is its own word and a warning says so.

Example:
    >>> word_starts(["<s>", " The", " cabin", "ets", " are"])
    [True, True, True, False, True]
    >>> word_starts(["[CLS]", "the", "cabin", "##ets"])
    [True, True, True, False]
"""

from __future__ import annotations

import re
import warnings
from dataclasses import fields, replace

import torch

__all__ = ["word_starts", "word_label", "by_word", "HOW"]

HOW = ("sum", "mean", "max", "absmax")
_MARKERS = ("Ġ", "▁")
_SPACE_PIECES = ("Ċ", "ĉ")  # byte-level newline and tab
_SPECIAL = re.compile(r"^(<\|?[^<>\s]*\|?>|\[[A-Z_]+\])$")


def _is_space(token: str) -> bool:
    return token != "" and (token.isspace() or all(c in _SPACE_PIECES + _MARKERS for c in token))


def word_starts(tokens: list[str], keep: list[bool] | None = None) -> list[bool]:
    """For each token, whether it starts a new word (see the module docstring for the rules).

    Args:
        tokens: one sequence's token strings (real positions only).
        keep: positions that must stay words of their own (protected positions).

    Example:
        >>> word_starts(["▁The", "▁cabin", "ets", "▁are"])
        [True, True, False, True]
    """
    return _starts(tokens, keep)[0]


def _starts(tokens: list[str], keep: list[bool] | None) -> tuple[list[bool], bool]:
    """Word starts, and whether they fell back to one word per token for want of boundaries."""
    keep = keep or [False] * len(tokens)
    alone = [k or bool(_SPECIAL.match(t)) or _is_space(t) for t, k in zip(tokens, keep)]
    if any(t.startswith("##") for t in tokens):
        starts = [not t.startswith("##") for t in tokens]
    elif any(t.startswith(_MARKERS) for t in tokens):
        starts = [t.startswith(_MARKERS + _SPACE_PIECES) for t in tokens]
    else:
        starts = [t[:1].isspace() for t in tokens]
    starts = [s or a or (i > 0 and alone[i - 1]) or i == 0 for i, (s, a) in enumerate(zip(starts, alone))]
    boundaries = any(t.startswith(("##",) + _MARKERS + _SPACE_PIECES) or (t[:1].isspace() and not t.isspace()) for t in tokens)
    if not boundaries and not all(starts):
        return [True] * len(tokens), True  # no convention found: every token is a word (by_word warns)
    return starts, False


def word_label(pieces: list[str]) -> str:
    """The word a run of token strings spells, markers and leading whitespace removed.

    Example:
        >>> word_label(["Ġcabin", "ets"])
        'cabinets'
        >>> word_label(["\\n"])
        '\\n'
    """
    text = "".join(p[2:] if p.startswith("##") else p for p in pieces)
    if _is_space(text):
        return text
    return text.replace("Ġ", " ").replace("▁", " ").strip()


def by_word(attr, how: str = "sum", pieces: list[list[str]] | None = None):
    """Aggregate an Attribution's token scores to words: an Attribution over words.

    Args:
        attr: an :class:`~mechnorm.result.Attribution` with token strings.
        how: ``"sum"`` (the default: additive scores such as LogAt contributions add up),
            ``"mean"``, ``"max"`` or ``"absmax"`` (the piece with the largest magnitude, signed).
        pieces: raw tokenizer pieces per sequence (``[batch][pos]``, padding included), used
            for the word boundaries instead of ``attr.tokens``; needed for Llama-2-style
            SentencePiece tokenizers (see the module docstring).

    Returns:
        An Attribution whose positions are words: ``scores [layer, batch, n_words]``
        (sequences padded on the right with NaN), ``tokens`` the words, ``mask`` True at real
        words, ``protected`` (when the input has it) True at words made of protected
        positions. ``metadata`` is the input's, plus ``"by_word": how`` and
        ``"word_index"`` (``[batch, pos]``: each token's word, -1 at padding); a ``"positions"``
        entry (prediction positions ``[batch]``) is mapped to word indices.

    Example:
        >>> words = attr.by_word()                                  # doctest: +SKIP
        >>> words.top_k(3)                                          # doctest: +SKIP
    """
    if how not in HOW:
        raise ValueError(f"how must be one of {HOW}, got {how!r}.")
    if attr.tokens is None and pieces is None:
        raise ValueError("This Attribution has no token strings; pass pieces=[tokenizer.convert_ids_to_tokens(ids) ...].")
    strings = attr.tokens if attr.tokens is not None else pieces
    marks = pieces if pieces is not None else strings
    if [len(p) for p in marks] != [attr.scores.shape[2]] * attr.batch_size:
        raise ValueError("pieces must hold one string per position (padding included) for every sequence.")
    protected = getattr(attr, "protected", None)
    n_layers, batch, _ = attr.scores.shape
    word_index = torch.full(attr.mask.shape, -1, dtype=torch.long)
    words: list[list[str]] = []
    word_protected: list[list[bool]] = []
    unmarked: list[int] = []
    for b in range(batch):
        real = attr.mask[b].nonzero().flatten().tolist()
        keep = [bool(protected[b, p]) for p in real] if protected is not None else None
        starts, fell_back = _starts([marks[b][p] for p in real], keep)
        if fell_back:
            unmarked.append(b)
        index = torch.tensor(starts, dtype=torch.long).cumsum(0) - 1
        word_index[b, real] = index
        groups: list[list[int]] = [[] for _ in range(int(index[-1]) + 1 if real else 0)]
        for p, w in zip(real, index.tolist()):
            groups[w].append(p)
        words.append([word_label([strings[b][p] for p in g]) for g in groups])
        word_protected.append([bool(keep and keep[real.index(g[0])]) for g in groups])
    if unmarked:
        warnings.warn(f"Sequences {unmarked}: no word boundaries in the token strings (no leading spaces, 'Ġ', '▁' "
                      "or '##'), so each token is a word; for Llama-2-style SentencePiece pass "
                      "pieces=[tokenizer.convert_ids_to_tokens(ids) for ids in tokens.tolist()].", stacklevel=3)
    width = max(1, max(len(w) for w in words))
    scores = torch.full((n_layers, batch, width), float("nan"))
    for b in range(batch):
        for w in range(len(words[b])):
            values = attr.scores[:, b, word_index[b] == w]  # [layer, pieces]
            scores[:, b, w] = _reduce(values, how)
    mask = torch.tensor([[w < len(words[b]) for w in range(width)] for b in range(batch)])
    metadata = dict(attr.metadata, by_word=how, word_index=word_index)
    if isinstance(metadata.get("positions"), torch.Tensor) and metadata["positions"].shape == (batch,):
        metadata["positions"] = word_index[torch.arange(batch), metadata["positions"].long()]
    changes = dict(scores=scores, mask=mask, tokens=[w + [""] * (width - len(w)) for w in words], metadata=metadata)
    if "protected" in {f.name for f in fields(attr)}:
        changes["protected"] = None if protected is None else torch.tensor([p + [False] * (width - len(p)) for p in word_protected])
    return replace(attr, **changes)


def _reduce(values: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce ``[layer, pieces]`` over the pieces."""
    if how == "sum":
        return values.sum(-1)
    if how == "mean":
        return values.mean(-1)
    if how == "max":
        return values.max(-1).values
    return values.gather(-1, values.abs().argmax(-1, keepdim=True))[:, 0]
