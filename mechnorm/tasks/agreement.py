"""Subject-verb number agreement with attractors (BLiMP / Linzen et al. 2016 style).

Prompts like ``the key to the cabinets that the men like`` ask for the verb: ``is`` after a
singular subject, ``are`` after a plural one. The subject noun (token 2, after ``[BOS] the``)
is the only token whose number decides the answer; modifiers between it and the verb,
prepositional phrases and object relative clauses, carry nouns of random number, and those
of the other number are *attractors*. The verb of a relative clause agrees with its own
subject, never with the head noun, so it carries no cue either.

A subject phrase has no, one or two modifiers, equally likely, as in English, where the
verb often follows its subject directly. The prompt stops where the verb goes; a language
model cannot know that no further modifier follows, but the verb is always the single most
likely next word. Bare subjects (``the key`` → ``is``) are training material only: there
are just 48 of them, and a hash split would hold some out entirely, so the model would never
see those nouns followed by their verb. In the training stream the verb therefore follows the
subject with probability 0.38, the first modifier with 1/2 and the second with 1. The test
split is the agreement-through-modifiers paradigm: one or two modifiers, half each.
"""

from __future__ import annotations

import random

from . import vocab
from .base import Example, Split, Task, make_example

SINGULAR, PLURAL = 0, 1
MODIFIER_COUNTS = (0, 1, 2)  # equally likely


class Agreement(Task):
    """Predict ``is``/``are`` after a subject phrase with attractor nouns.

    ``meta``: ``number`` ("singular"/"plural"), ``attractor_positions`` (token positions of
    nouns of the other number), ``noun_positions`` (all nouns after the subject).

    Example:
        >>> ex = Agreement().test(1)[0]
        >>> ex.answer_text in ("is", "are"), ex.cue_positions
        (True, (2,))
    """

    name = "agreement"
    kind = "lm"
    description = "subject-verb agreement (is/are) across prepositional phrases and relative clauses"

    def split_of(self, text: str) -> Split:
        """Bare subjects (``the key``) are training material only; the rest split by hash."""
        return "train" if len(text.split()) == 2 else super().split_of(text)

    def sample(self, rng: random.Random) -> Example:
        subject = rng.randrange(len(vocab.NOUNS))
        number = rng.randrange(2)
        words = ["the", vocab.NOUNS[subject][number]]
        noun_positions, attractors = [], []
        for _ in range(rng.choice(MODIFIER_COUNTS)):
            noun = rng.choice([n for i, n in enumerate(vocab.NOUNS) if i != subject])
            noun_number = rng.randrange(2)
            if rng.random() < 0.6:  # prepositional phrase: "to the cabinets"
                words += [rng.choice(vocab.PREPOSITIONS), "the", noun[noun_number]]
                position = len(words) - 1
            else:  # object relative clause: "that the men like"
                words += ["that", "the", noun[noun_number], rng.choice(vocab.VERBS)[noun_number]]
                position = len(words) - 2
            noun_positions.append(position + 1)  # + 1 for [BOS]
            if noun_number != number:
                attractors.append(position + 1)
        return make_example(
            self.name,
            words,
            vocab.COPULAS[number],
            cues=[1],
            foil=vocab.COPULAS[1 - number],
            continuation=[rng.choice(vocab.PREDICATES), "."],
            meta={
                "number": ("singular", "plural")[number],
                "attractor_positions": attractors,
                "noun_positions": noun_positions,
            },
        )
