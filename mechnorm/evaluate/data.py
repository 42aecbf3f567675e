"""The evaluation set: token ids, mask, and what is known about each sequence.

:func:`as_eval_data` accepts examples from :mod:`mechnorm.tasks` (a list of ``Example`` or a
collated ``TaskBatch``), a :class:`mechnorm.Batch`, or plain tensors in a dict, and returns
one :class:`EvalData`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..residual import check_mask
from .alignment import cue_indicator


@dataclass
class EvalData:
    """Sequences to evaluate on.

    Attributes:
        tokens: ``[n, pos]`` ids; attention_mask: ``[n, pos]``, False at padding.
        labels: ``[n]`` gold answers (token ids for LMs, classes for classifiers), or None.
        cue_mask: ``[n, pos]`` True on the tokens that decide the answer, or None.
        positions: ``[n]`` prediction positions, or None (the predictor's rule).

    Example:
        >>> data = EvalData(torch.tensor([[1, 5, 6]]), torch.ones(1, 3, dtype=torch.bool))
        >>> len(data)
        1
    """

    tokens: Int[Tensor, "n pos"]
    attention_mask: Bool[Tensor, "n pos"]
    labels: Int[Tensor, "n"] | None = None
    cue_mask: Bool[Tensor, "n pos"] | None = None
    positions: Int[Tensor, "n"] | None = None

    def __post_init__(self) -> None:
        self.tokens = torch.as_tensor(self.tokens).long().cpu()
        if self.tokens.ndim != 2:
            raise ValueError(f"tokens must be [n, pos], got shape {tuple(self.tokens.shape)}.")
        n = self.tokens.shape[0]
        self.attention_mask = check_mask(self.attention_mask, *self.tokens.shape).cpu()
        for name in ("labels", "positions"):
            value = getattr(self, name)
            if value is not None:
                value = torch.as_tensor(value).long().reshape(-1).cpu()
                if value.shape[0] != n:
                    raise ValueError(f"{value.shape[0]} {name} for {n} sequences.")
                setattr(self, name, value)
        if self.cue_mask is not None:
            self.cue_mask = cue_indicator(self.cue_mask, self.attention_mask)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, rows: slice) -> "EvalData":
        """The sequences in ``rows`` (a slice), padding columns kept."""
        cut = lambda t: None if t is None else t[rows]  # noqa: E731
        return EvalData(self.tokens[rows], self.attention_mask[rows], cut(self.labels), cut(self.cue_mask), cut(self.positions))


def as_eval_data(dataset) -> EvalData:
    """An :class:`EvalData` from task examples, a ``TaskBatch``, a ``Batch`` or a dict of tensors.

    A dict takes ``tokens`` and optionally ``attention_mask``, ``labels``, ``cue_positions``
    (a ``[n, pos]`` mask or lists of positions) and ``positions``.

    Example:
        >>> from mechnorm import tasks
        >>> data = as_eval_data(tasks.get_task("recall").test(4))
        >>> len(data), data.cue_mask.sum(-1).tolist()
        (4, [2, 2, 2, 2])
    """
    if isinstance(dataset, EvalData):
        return dataset
    if isinstance(dataset, (list, tuple)) and dataset and hasattr(dataset[0], "cue_positions"):
        from ..tasks import collate

        dataset = collate(dataset)
    if hasattr(dataset, "cue_mask") and hasattr(dataset, "answers"):  # tasks.TaskBatch
        return EvalData(dataset.tokens, dataset.attention_mask, dataset.answers, dataset.cue_mask, dataset.positions)
    if hasattr(dataset, "tokens") and hasattr(dataset, "attention_mask"):  # mechnorm.Batch
        return EvalData(dataset.tokens, dataset.attention_mask)
    if isinstance(dataset, Mapping):
        unknown = set(dataset) - {"tokens", "attention_mask", "labels", "cue_positions", "positions"}
        if unknown or "tokens" not in dataset:
            raise ValueError(
                f"A dataset dict needs 'tokens' and may hold attention_mask, labels, cue_positions, positions; "
                f"got keys {sorted(dataset)}."
            )
        tokens = torch.as_tensor(dataset["tokens"])
        mask = check_mask(dataset.get("attention_mask"), *tokens.shape)
        cues = dataset.get("cue_positions")
        return EvalData(tokens, mask, dataset.get("labels"), None if cues is None else cue_indicator(cues, mask),
                        dataset.get("positions"))
    raise TypeError(
        f"Cannot evaluate on a {type(dataset).__name__}: pass mechnorm.tasks examples, a TaskBatch, a mechnorm.Batch "
        "or a dict with 'tokens' (and attention_mask, labels, cue_positions)."
    )
