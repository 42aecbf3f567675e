"""What every task shares: the example record, seeded train/test splits, and batching.

A task samples examples from its own generator. The train/test split is decided by a hash
of the example's text, not by the seed, so it is fixed: no test text ever appears in any
training set, whatever seeds the two sides use. The seed only sets which examples are drawn
and in what order; ``train(n)`` is a prefix of ``train(m)`` for ``n <= m``.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from . import vocab

Split = Literal["train", "test"]


@dataclass(frozen=True)
class Example:
    """One task instance, with the positions of the tokens that decide its answer.

    Attributes:
        task: the task's name.
        text: the words the model reads, space-separated, without special tokens.
        tokens: the ids the model sees: ``[BOS]`` (LM tasks) or ``[CLS]`` (classification)
            first, then ``text``.
        answer: the next token's id (LM tasks) or the class id (classification).
        answer_text: the answer as a word or class label.
        foil: the competing token id (or the other class id), or None.
        cue_positions: indices into ``tokens`` of the tokens that determine the answer.
        continuation: ids that follow ``answer`` in a full training sequence (LM tasks),
            ending with ``[EOS]``; empty for classification.
        meta: task-specific details (e.g. attractor positions, the label rule's inputs).
    """

    task: str
    text: str
    tokens: tuple[int, ...]
    answer: int
    answer_text: str
    foil: int | None
    cue_positions: tuple[int, ...]
    continuation: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def prediction_position(self) -> int:
        """Where the answer is read: the last token (LM) or ``[CLS]`` at 0 (classification)."""
        return 0 if self.tokens[0] == vocab.token_id(vocab.CLS) else len(self.tokens) - 1

    def sequence(self) -> tuple[int, ...]:
        """The full training sequence of an LM task: ``tokens + answer + continuation``."""
        return (*self.tokens, self.answer, *self.continuation)


class Task(ABC):
    """A seeded generator of :class:`Example` with a fixed train/test split.

    Subclasses set ``name``, ``kind`` (``"lm"`` or ``"classification"``), ``description``
    and implement :meth:`sample`.

    Example:
        >>> task = get_task("recall")          # doctest: +SKIP
        >>> task.test(2)[0].answer_text        # doctest: +SKIP
        '7'
    """

    name: str
    kind: Literal["lm", "classification"]
    description: str
    labels: tuple[str, ...] = ()  # class names, for classification tasks
    test_fraction: float = 0.2

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    @abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """Draw one example (either split) from ``rng``."""

    def split_of(self, text: str) -> Split:
        """Which split a text belongs to: a hash of the task name and text, seed-independent."""
        digest = hashlib.sha256(f"{self.name}\n{text}".encode()).digest()
        return "test" if int.from_bytes(digest[:8], "big") / 2**64 < self.test_fraction else "train"

    def stream(self, split: Split) -> Iterator[Example]:
        """An endless, deterministic stream of ``split`` examples for this task's seed.

        Example:
            >>> next(get_task("recall").stream("train")).task   # doctest: +SKIP
            'recall'
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        rng = random.Random(f"{self.name}/{self.seed}/{split}")
        while True:
            example = self.sample(rng)
            if self.split_of(example.text) == split:
                yield example

    def examples(self, split: Split, n: int) -> list[Example]:
        """The first ``n`` examples of ``split`` for this task's seed."""
        return list(itertools.islice(self.stream(split), n))

    def train(self, n: int) -> list[Example]:
        """``n`` training examples (deterministic for the seed).

        Example:
            >>> get_task("agreement").train(3)[0].task   # doctest: +SKIP
            'agreement'
        """
        return self.examples("train", n)

    def test(self, n: int) -> list[Example]:
        """``n`` held-out examples; their texts never occur in any ``train`` split.

        Example:
            >>> len(get_task("lexicon").test(5))         # doctest: +SKIP
            5
        """
        return self.examples("test", n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, seed={self.seed})"


def make_example(task: str, words: Sequence[str], answer: str, *, cues: Sequence[int], foil: str | None,
                 continuation: Sequence[str] = (), meta: dict | None = None) -> Example:
    """An LM-task example from words; ``cues`` index ``words`` and are shifted past ``[BOS]``."""
    return Example(
        task=task,
        text=" ".join(words),
        tokens=tuple(vocab.ids([vocab.BOS, *words])),
        answer=vocab.token_id(answer),
        answer_text=answer,
        foil=None if foil is None else vocab.token_id(foil),
        cue_positions=tuple(i + 1 for i in cues),
        continuation=tuple(vocab.ids([*continuation, vocab.EOS])),
        meta=dict(meta or {}),
    )


@dataclass
class TaskBatch:
    """Examples padded on the right into tensors.

    Attributes:
        tokens: ``[batch, pos]`` ids, ``[PAD]`` after each sequence.
        attention_mask: ``[batch, pos]`` True on real tokens.
        answers: ``[batch]`` answer ids (token or class).
        foils: ``[batch]`` foil ids, -1 where an example has none.
        positions: ``[batch]`` where each answer is read (last token, or 0 for ``[CLS]``).
        cue_mask: ``[batch, pos]`` True on cue tokens.
        cue_positions: the cue positions of each example, as lists.
        examples: the examples, in order.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Bool[Tensor, "batch pos"]
    answers: Int[Tensor, "batch"]
    foils: Int[Tensor, "batch"]
    positions: Int[Tensor, "batch"]
    cue_mask: Bool[Tensor, "batch pos"]
    cue_positions: list[list[int]]
    examples: list[Example]

    def __len__(self) -> int:
        return self.tokens.shape[0]


def collate(examples: Sequence[Example], pad_id: int | None = None) -> TaskBatch:
    """Pad examples on the right into a :class:`TaskBatch`.

    Example:
        >>> batch = collate(get_task("recall").test(4))   # doctest: +SKIP
        >>> batch.tokens.shape[0], batch.cue_mask.sum(-1).tolist()  # doctest: +SKIP
        (4, [2, 2, 2, 2])
    """
    if not examples:
        raise ValueError("No examples to collate.")
    pad_id = vocab.token_id(vocab.PAD) if pad_id is None else pad_id
    length = max(len(e.tokens) for e in examples)
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.bool)
    cue_mask = torch.zeros_like(mask)
    for i, example in enumerate(examples):
        tokens[i, : len(example.tokens)] = torch.tensor(example.tokens)
        mask[i, : len(example.tokens)] = True
        cue_mask[i, list(example.cue_positions)] = True
    return TaskBatch(
        tokens=tokens,
        attention_mask=mask,
        answers=torch.tensor([e.answer for e in examples]),
        foils=torch.tensor([-1 if e.foil is None else e.foil for e in examples]),
        positions=torch.tensor([e.prediction_position for e in examples]),
        cue_mask=cue_mask,
        cue_positions=[list(e.cue_positions) for e in examples],
        examples=list(examples),
    )
