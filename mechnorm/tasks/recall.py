"""Key-value recall (induction): ``a 3 b 7 c 1 b`` -> ``7``.

Two to six distinct single-letter keys are each followed by a digit; the prompt ends by
repeating one key, and the answer is the digit that followed it. The cues are the key's
earlier occurrence and the value after it. Values may repeat across keys; the foil is a
value bound to another key (a random other digit when every key holds the answer).

Keys and values are adjacent, with no ``=`` between them, so the task is exactly what an
induction head does (find the earlier copy of the current token, copy what came next);
with ``a = 3 ... b =`` a two-layer model must first learn to look two tokens back, which
small models trained for minutes on a CPU do not.

For training, ``continuation`` goes on with ten more queries (``a 3 c 1 a 3 ...``), so a
full sequence supervises many recalls, not one: with a single recall per sequence a small
model does not find the induction mechanism within a few minutes of CPU training.
"""

from __future__ import annotations

import random

from . import vocab
from .base import Example, Task, make_example

MIN_PAIRS, MAX_PAIRS, N_REQUERIES = 2, 6, 10


class Recall(Task):
    """Predict the value that followed the repeated key.

    ``meta``: ``query_key``, ``n_pairs``, ``foil_position`` (token position of the foil's
    in-context occurrence, or None).

    Example:
        >>> ex = Recall().test(1)[0]
        >>> ex.tokens[ex.cue_positions[0]] == ex.tokens[-1]
        True
    """

    name = "recall"
    kind = "lm"
    description = "key-value recall: a 3 b 7 c 1 b -> 7 (induction)"

    def sample(self, rng: random.Random) -> Example:
        n_pairs = rng.randint(MIN_PAIRS, MAX_PAIRS)
        keys = rng.sample(vocab.KEYS, n_pairs)
        values = [rng.choice(vocab.VALUES) for _ in keys]
        query = rng.randrange(n_pairs)
        words = [w for pair in zip(keys, values) for w in pair] + [keys[query]]
        answer = values[query]
        others = [i for i, v in enumerate(values) if v != answer]
        if others:
            other = rng.choice(others)
            foil, foil_position = values[other], 2 * other + 1 + 1  # + 1 for [BOS]
        else:
            foil, foil_position = rng.choice([v for v in vocab.VALUES if v != answer]), None
        requery = rng.choices(range(n_pairs), k=N_REQUERIES)
        return make_example(
            self.name,
            words,
            answer,
            cues=[2 * query, 2 * query + 1],
            foil=foil,
            continuation=[w for i in requery for w in (keys[i], values[i])],
            meta={"query_key": keys[query], "n_pairs": n_pairs, "foil_position": foil_position},
        )
