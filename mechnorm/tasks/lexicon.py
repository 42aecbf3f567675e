"""Sentence polarity set by a lexicon, with negation (SST-2-like).

A sentence is one to four clauses ``the <topic> was [not] <adjective>`` joined by ``and``.
One or two clauses carry a polarity adjective (``good``, ``awful``, ...); ``not`` before it
flips it, and when there are two their flipped polarities agree, so the label is never
ambiguous. The other clauses carry neutral adjectives, sometimes negated (a negator that
decides nothing), and fillers (``overall``, ``really``) pad the sentence.

Cues: the polarity adjectives and the ``not`` right before any of them. Tokens start with
``[CLS]``, where a classifier reads the label (0 = negative, 1 = positive).
"""

from __future__ import annotations

import random

from . import vocab
from .base import Example, Task

LABELS = ("negative", "positive")
P_NEGATE_POLARITY, P_NEGATE_NEUTRAL, P_INTENSIFIER, P_OPENER = 0.35, 0.25, 0.2, 0.3


class Lexicon(Task):
    """Classify a sentence as negative (0) or positive (1).

    ``meta``: ``polarity_positions``, ``negator_positions`` (negators of polarity words),
    ``neutral_negator_positions`` (negators of neutral adjectives: not cues).

    Example:
        >>> ex = Lexicon().test(1)[0]
        >>> ex.answer_text in ("negative", "positive"), ex.tokens[0] == vocab.token_id("[CLS]")
        (True, True)
    """

    name = "lexicon"
    kind = "classification"
    description = "sentence polarity from one or two lexicon words, with negation (SST-2-like)"
    labels = LABELS

    def sample(self, rng: random.Random) -> Example:
        label = rng.randrange(2)
        clauses = [("polarity", rng.random() < P_NEGATE_POLARITY) for _ in range(rng.choice((1, 2)))]
        clauses += [("neutral", rng.random() < P_NEGATE_NEUTRAL) for _ in range(rng.choice((0, 1, 2)))]
        rng.shuffle(clauses)

        words = [rng.choice(("overall", "honestly", "frankly"))] if rng.random() < P_OPENER else []
        polarity, negators, neutral_negators = [], [], []
        for i, (role, negated) in enumerate(clauses):
            if i:
                words.append("and")
            words += ["the", rng.choice(vocab.TOPICS), "was"]
            if negated:
                (negators if role == "polarity" else neutral_negators).append(len(words))
                words.append("not")
            elif rng.random() < P_INTENSIFIER:
                words.append(rng.choice(("really", "quite")))
            if role == "polarity":
                positive = bool(label) != negated  # "not" flips the word's polarity
                polarity.append(len(words))
                words.append(rng.choice(vocab.POSITIVE if positive else vocab.NEGATIVE))
            else:
                words.append(rng.choice(vocab.NEUTRAL_ADJECTIVES))

        shift = 1  # [CLS]
        return Example(
            task=self.name,
            text=" ".join(words),
            tokens=tuple(vocab.ids([vocab.CLS, *words])),
            answer=label,
            answer_text=LABELS[label],
            foil=1 - label,
            cue_positions=tuple(sorted(p + shift for p in polarity + negators)),
            meta={
                "polarity_positions": [p + shift for p in polarity],
                "negator_positions": [p + shift for p in negators],
                "neutral_negator_positions": [p + shift for p in neutral_negators],
            },
        )
