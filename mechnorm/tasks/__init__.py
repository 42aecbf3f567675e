"""Synthetic tasks whose evidence tokens are known, over one shared word vocabulary.

Each task yields :class:`Example` records (text, token ids, answer, foil, cue positions)
from a seeded generator with a fixed train/test split; :func:`collate` pads them into
tensors. The zoo models (``mechnorm.zoo``) were trained on these tasks.

Example:
    >>> from mechnorm import tasks
    >>> tasks.list_tasks()
    ['agreement', 'lexicon', 'recall']
    >>> batch = tasks.collate(tasks.get_task("recall").test(8))
    >>> batch.tokens.shape[0]
    8
"""

from __future__ import annotations

from .agreement import Agreement
from .base import Example, Task, TaskBatch, collate
from .lexicon import Lexicon
from .recall import Recall
from .vocab import tokenizer, vocabulary

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Agreement, Recall, Lexicon)}


def get_task(name: str, seed: int = 0) -> Task:
    """The task called ``name``, seeded.

    Example:
        >>> get_task("agreement", seed=1).seed
        1
    """
    try:
        return TASKS[name](seed=seed)
    except KeyError:
        raise KeyError(f"Unknown task {name!r}; available: {list_tasks()}.") from None


def list_tasks() -> list[str]:
    """Names of the available tasks.

    Example:
        >>> "recall" in list_tasks()
        True
    """
    return sorted(TASKS)


__all__ = [
    "Agreement", "Example", "Lexicon", "Recall", "TASKS", "Task", "TaskBatch",
    "collate", "get_task", "list_tasks", "tokenizer", "vocabulary",
]
